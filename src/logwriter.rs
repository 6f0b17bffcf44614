//! The log's way out: a writer that can never stop or stall the proxy.
//!
//! Request tasks only format a line and hand it to a bounded queue; one dedicated thread
//! writes the queue to stderr. When stderr is slow or its reader is stalled, the queue
//! fills and further lines are **dropped and counted** (`gpulink_log_lines_dropped_total`)
//! instead of blocking a request. Write errors (a closed pipe: `EPIPE`) are ignored: the
//! line is counted as dropped and the proxy carries on. Rust ignores `SIGPIPE` in its
//! binaries, so a closed pipe is an error here, never a signal that ends the process.
//!
//! Text lines are also made single-line here, whatever produced them: a newline or
//! carriage return inside one event becomes `\n` / `\r`, so text that came from the
//! network cannot forge a log line even when a call site forgot to escape it.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Lines waiting for the writer thread, at most.
const QUEUE_LINES: usize = 8192;
/// Bytes waiting for the writer thread, at most: the queue's memory bound.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// A longer line is cut (an error chain or header value cannot grow without bound).
const MAX_LINE: usize = 16 * 1024;

/// Lines dropped since the process started: queue full, or the write failed.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The writer installed as the process's log, for [`flush`].
static INSTALLED: OnceLock<NonBlocking> = OnceLock::new();

/// Log lines dropped so far (process-wide: there is one stderr).
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it has been written (or dropped).
    Flush(mpsc::Sender<()>),
}

struct Shared {
    queue: SyncSender<Message>,
    queued_bytes: AtomicUsize,
    single_line: bool,
}

/// A `MakeWriter` for `tracing_subscriber`: each event is one queued line.
#[derive(Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

impl NonBlocking {
    /// Starts the writer thread on `out`. With `single_line`, interior line breaks are
    /// escaped (text format; the JSON format escapes them itself).
    pub fn spawn<W: Write + Send + 'static>(out: W, single_line: bool) -> std::io::Result<Self> {
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
        let shared = Arc::new(Shared {
            queue,
            queued_bytes: AtomicUsize::new(0),
            single_line,
        });
        let writer_shared = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("gpulink-log".into())
            .spawn(move || write_lines(out, lines, writer_shared))?;
        Ok(Self { shared })
    }

    /// Starts the writer on the process's stderr and makes it the one [`flush`] waits for.
    pub fn stderr(single_line: bool) -> std::io::Result<Self> {
        Self::installed(std::io::stderr(), single_line)
    }

    /// Starts the writer on `out` (the demo's log file) and makes it the one [`flush`]
    /// waits for.
    pub fn installed<W: Write + Send + 'static>(
        out: W,
        single_line: bool,
    ) -> std::io::Result<Self> {
        let writer = Self::spawn(out, single_line)?;
        let _ = INSTALLED.set(writer.clone());
        Ok(writer)
    }

    fn enqueue(&self, mut line: Vec<u8>) {
        if line.is_empty() {
            return;
        }
        if self.shared.single_line {
            line = single_line(line);
        }
        if line.len() > MAX_LINE {
            line.truncate(MAX_LINE);
            line.extend_from_slice(b"... [line truncated]\n");
        }
        let len = line.len();
        let queued = self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if queued + len > QUEUE_BYTES {
            self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.shared.queue.try_send(Message::Line(line))
        {
            self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits, at most `limit`, until every line queued so far is written.
    pub fn flush_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (done, wait) = mpsc::channel();
        let mut message = Message::Flush(done);
        // A full queue is what a stalled reader looks like: retry until the deadline,
        // never block on it.
        loop {
            match self.shared.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    message = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// Before exit: writes what is queued, waiting at most `limit` (a stalled reader must
/// not keep the process from exiting).
pub fn flush(limit: Duration) {
    if let Some(writer) = INSTALLED.get() {
        writer.flush_within(limit);
    }
}

fn write_lines<W: Write>(mut out: W, lines: Receiver<Message>, shared: std::sync::Weak<Shared>) {
    while let Ok(message) = lines.recv() {
        match message {
            Message::Line(line) => {
                if out.write_all(&line).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(shared) = shared.upgrade() {
                    shared.queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
                }
            }
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
    let _ = out.flush();
}

/// Escapes every line break but a final one.
fn single_line(line: Vec<u8>) -> Vec<u8> {
    let body = line.strip_suffix(b"\n").unwrap_or(&line);
    if !body.iter().any(|b| *b == b'\n' || *b == b'\r') {
        return line;
    }
    let mut out = Vec::with_capacity(line.len() + 8);
    for b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b => out.push(*b),
        }
    }
    out.push(b'\n');
    out
}

/// One event being formatted; queued whole when dropped.
pub struct Line<'a> {
    writer: &'a NonBlocking,
    buffer: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        self.writer.enqueue(std::mem::take(&mut self.buffer));
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlocking {
    type Writer = Line<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        Line {
            writer: self,
            buffer: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that blocks every write until released: a stalled log reader.
    struct Stalled(Arc<Mutex<()>>);
    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _held = self.0.lock();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
    }

    fn log(writer: &NonBlocking, text: &str) {
        let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(writer);
        line.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_stalled_reader_drops_lines_instead_of_blocking() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let writer = NonBlocking::spawn(Stalled(gate.clone()), true).unwrap();
        let before = lines_dropped();
        // More than the queue holds: returns (the test would hang otherwise), and counts.
        for _ in 0..QUEUE_LINES + 100 {
            log(&writer, "a line\n");
        }
        assert!(lines_dropped() >= before + 99, "drops were not counted");
        drop(held);
        writer.flush_within(Duration::from_secs(10));
    }

    #[test]
    fn write_errors_are_counted_not_raised() {
        let writer = NonBlocking::spawn(Broken, true).unwrap();
        let before = lines_dropped();
        log(&writer, "a line\n");
        writer.flush_within(Duration::from_secs(10));
        assert!(lines_dropped() > before);
    }

    #[test]
    fn interior_line_breaks_are_escaped() {
        assert_eq!(single_line(b"a\nb\r\n".to_vec()), b"a\\nb\\r\n".to_vec());
        assert_eq!(single_line(b"plain\n".to_vec()), b"plain\n".to_vec());
        assert_eq!(single_line(b"x\ny".to_vec()), b"x\\ny\n".to_vec());
    }
}
