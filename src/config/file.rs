//! Reading the files the configuration names (itself, CA files) without ever hanging or
//! exhausting memory: only a regular file (after following symlinks: a FIFO, a device
//! such as `/dev/zero` or a directory is refused), at most a size limit, opened so that
//! even a file swapped for a FIFO at the last moment cannot block the open.

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The largest configuration file read (a real one is a few KiB).
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;
/// The largest CA file read (a bundle of a few hundred certificates fits).
pub const MAX_CA_FILE: u64 = 1024 * 1024;

/// Reads a regular file of at most `limit` bytes.
pub fn read_regular_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    // Checked before opening: opening a FIFO for reading blocks until a writer appears.
    regular(&std::fs::metadata(path)?, limit)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Should the path have become a FIFO since: the open returns at once, and the
        // check on the opened file below refuses it.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    regular(&file.metadata()?, limit)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

fn regular(metadata: &std::fs::Metadata, limit: u64) -> io::Result<()> {
    if !metadata.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, a device or a directory is refused)",
        ));
    }
    if metadata.len() > limit {
        return Err(too_large(limit));
    }
    Ok(())
}

fn too_large(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {} KiB", limit / 1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, "x = 1\n").unwrap();
        assert_eq!(read_regular_file(&file, 100).unwrap(), b"x = 1\n");
        assert!(read_regular_file(&file, 3).is_err());
        assert!(read_regular_file(dir.path(), 100).is_err());
        assert!(read_regular_file(Path::new("/dev/zero"), 100).is_err());
        let link = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_regular_file(&link, 100).is_err());
        let fifo = dir.path().join("fifo.toml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Returns (no writer ever opens it): refused, not blocked.
        assert!(read_regular_file(&fifo, 100).is_err());
    }
}
