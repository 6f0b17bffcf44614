//! Reading the files the configuration names (itself, CA files) without ever hanging or
//! exhausting memory: only a regular file (after following symlinks: a FIFO, a device
//! such as `/dev/zero` or a directory is refused), at most a size limit, opened so that
//! even a file swapped for a FIFO at the last moment cannot block the open. A CA file
//! is checked when the configuration is compiled exactly as `run` loads it, and a file
//! the systemd sandbox hides gets a hint saying why.

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::compile::Problems;

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

/// Loads the CA file exactly as `run` does, so that `check` and `run` never disagree.
/// Opening it first names the sandbox cause when it cannot be read: under the systemd
/// unit a root-owned 0600 file exists but cannot be opened.
pub(super) fn check_ca_file(key: &str, path: &Path, problems: &mut Problems) {
    // Non-blocking: opening a FIFO for reading would otherwise wait for a writer.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    if let Err(e) = opened {
        problems.push(
            key,
            format!(
                "cannot read `{}`: {e}{}",
                path.display(),
                sandbox_hint(key, path, &e)
            ),
        );
        return;
    }
    if let Err(e) = crate::tls::check_ca_file(path) {
        problems.push(key, e.to_string());
    }
}

/// What to check when a file that works from a shell fails under the systemd unit
/// (packaging/systemd/gpulink.service): DynamicUser= runs gpulink as an unprivileged
/// user of its own, and PrivateTmp= gives it an empty /tmp of its own.
pub fn sandbox_hint(key: &str, path: &Path, error: &std::io::Error) -> String {
    let in_tmp = path.starts_with("/tmp") || path.starts_with("/var/tmp");
    match error.kind() {
        io::ErrorKind::PermissionDenied => format!(
            ". Under the systemd unit gpulink runs as an unprivileged dynamic user \
             (DynamicUser=yes): make the file readable by it (a CA certificate is not secret: \
             chmod 0644, and its directories o+x), or hand it over with LoadCredential= \
             (recipe for a CA and for AWS credentials, and what `{key}` then names: \
             /usr/share/doc/gpulink/examples/credentials.conf)"
        ),
        io::ErrorKind::NotFound if in_tmp => format!(
            ". Under the systemd unit /tmp and /var/tmp are private to the service \
             (PrivateTmp=yes), so files placed there from a shell are not visible to it: \
             move the file (e.g. to /etc/gpulink/) and update `{key}`"
        ),
        _ => String::new(),
    }
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
