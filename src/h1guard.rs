//! The HTTP/1.1 head guard: makes every request head that hyper would refuse with its own
//! bare answer (a 400, 431 or 414 with no body) a refusal of gpulink's, with the JSON error
//! body, `Content-Length` and `Connection: close`.
//!
//! hyper answers a head it cannot parse itself and offers no hook to shape that answer, so
//! the check sits under it: [`H1Guard`] wraps the client socket and follows HTTP/1.1
//! framing as hyper 1.x does: the same parser (httparse, hyper's default configuration and
//! header count), the same `Transfer-Encoding` and `Content-Length` rules. It looks at
//! heads only; a body is skipped by its length or its chunk sizes, never copied.
//!
//! * A head reaches hyper only once it is whole and checked. One that arrives in a single
//!   read (almost every head) is checked in place in hyper's own buffer; one split over
//!   reads is held here until its end arrives, at most [`MAX_HEAD`] bytes.
//! * At a head the guard refuses, the stream ends there for hyper: hyper answers the
//!   requests before it (pipelined or earlier on the keep-alive connection) and closes.
//!   Only then, once hyper has written everything and dropped the socket, does the
//!   connection's supervisor write the refusal ([`answer`]), end its sending side and read
//!   what the client still sends for a moment, so that the answer is not lost to a reset.
//!   A refusal is answered only when hyper did read up to it.
//! * HTTP/2 (the preface), a head after which hyper closes the connection (`Connection:
//!   close`, HTTP/1.0 without keep-alive), and a chunked body hyper would fail (it closes
//!   the connection) end the checking: from there the bytes pass through as they come.
//!   An upgrade or `CONNECT` does not: gpulink never switches protocols, so hyper reads
//!   the next head after answering it.
//!
//! hyper's own bare answers remain behind this guard only if the two parsers ever
//! disagreed: `tests/suite/input.rs` holds the cases that matter, and the `request_head`
//! fuzz target fails on any bare answer behind the guard.
//!
//! Cost: one more httparse pass per head (hyper makes its own), about 3,200 instructions
//! for a 260-byte head of ten fields (callgrind), 1-2 % of the sidecar's CPU per request
//! (`BENCHMARKS.md`); a body costs a comparison per read.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;

use crate::error::Code;

/// The longest request head the guard holds while it arrives: twice the head gpulink
/// forwards ([`crate::forward::MAX_REQUEST_HEAD`]), as the HTTP/2 header-list limit, so
/// every head between the two gets the handler's own 431 (with the request id). It also
/// keeps every head under hyper's own limits (a 64 KiB target or header name).
pub const MAX_HEAD: usize = 2 * crate::forward::MAX_REQUEST_HEAD;

/// hyper's default header count: more is its 431.
const MAX_HEADERS: usize = 100;

/// hyper's longest request target: longer is its 414.
const MAX_TARGET: usize = (u16::MAX - 1) as usize;

/// hyper's largest `Content-Length` (`u64::MAX - 2`; the two above are its markers).
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a held head is read into once hyper's buffer is not where it can stay.
const SCRATCH: usize = 8 * 1024;

/// After a refusal, how long and how much the client's further bytes are read and
/// dropped, so that closing with unread data (a reset) does not destroy the answer.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Why a head is refused. The messages never repeat the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A byte HTTP does not allow in a header name or value, or a line not ended by CRLF.
    HeaderSyntax,
    Method,
    Target,
    Version,
    /// `Transfer-Encoding` in an HTTP/1.0 request.
    TransferEncodingHttp10,
    /// `Transfer-Encoding` whose last coding is not `chunked`.
    TransferEncodingNotChunked,
    /// A `Content-Length` that is not a number, or two that differ.
    ContentLength,
    ContentLengthTooLarge,
    TooManyHeaders,
    /// No end within [`MAX_HEAD`] bytes (or a target over hyper's 64 KiB).
    HeadTooLarge,
}

impl Refusal {
    pub fn code(self) -> Code {
        match self {
            Refusal::TooManyHeaders | Refusal::HeadTooLarge => Code::HeadersTooLarge,
            Refusal::ContentLengthTooLarge => Code::BodyTooLarge,
            _ => Code::BadRequest,
        }
    }

    pub fn message(self) -> String {
        let what = match self {
            Refusal::HeaderSyntax => "a header holds a byte HTTP does not allow (a control character such as DEL, or a line not ended by CRLF)",
            Refusal::Method => "the method is not a valid token",
            Refusal::Target => "the request target is not a valid URI",
            Refusal::Version => "the version is not HTTP/1.0 or HTTP/1.1 (HTTP/2 needs the connection preface)",
            Refusal::TransferEncodingHttp10 => "an HTTP/1.0 request cannot have Transfer-Encoding",
            Refusal::TransferEncodingNotChunked => "the last Transfer-Encoding is not chunked",
            Refusal::ContentLength => "Content-Length is not one decimal number (or two differ)",
            Refusal::ContentLengthTooLarge => "Content-Length is larger than any body can be",
            Refusal::TooManyHeaders => {
                return format!("the request head has more than {MAX_HEADERS} header fields; the connection is closed");
            }
            Refusal::HeadTooLarge => {
                return format!("the request head is over {MAX_HEAD} bytes; gpulink forwards heads of at most {} bytes; the connection is closed", crate::forward::MAX_REQUEST_HEAD);
            }
        };
        format!("the request head is not valid HTTP/1.1: {what}; the connection is closed")
    }

    /// The whole HTTP/1.1 answer: status line, JSON headers, the JSON error body.
    pub fn to_bytes(self) -> Vec<u8> {
        let code = self.code();
        let status: StatusCode = code.status();
        let body =
            serde_json::json!({ "error": { "code": code.as_str(), "message": self.message() } })
                .to_string();
        let mut answer = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body.as_bytes());
        answer
    }
}

/// Where the guard is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At or inside a head; `searched` of its bytes were searched for its end, and
    /// `content` is where it begins after leading empty lines (which hyper skips).
    Head {
        searched: usize,
        content: Option<usize>,
    },
    /// A body of known length: this many bytes are left.
    Body(u64),
    Chunked(Chunk),
    /// Not checked any more: everything passes.
    Through,
}

/// A chunked body (RFC 9112 §7.1) as hyper reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A size line's first hex digit.
    Start,
    /// More hex digits of the size so far.
    Size(u64),
    /// Spaces or tabs after the size.
    Whitespace(u64),
    /// A chunk extension, up to CR.
    Extension(u64),
    /// The LF of the size line.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: a trailer field, or the CR of the end.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What [`Framing::scan`] found in the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// All of them may go to hyper.
    Pass,
    /// The first `n` may; from `n` on a head is still arriving.
    Hold(usize),
    /// The first `n` may; the head at `n` is refused.
    Refuse(usize, Refusal),
}

/// The framing follower, apart from any I/O.
#[derive(Debug)]
struct Framing {
    state: State,
    /// Nothing has been seen yet: the bytes may be HTTP/2's preface.
    first: bool,
    /// hyper closes after this request (or upgrades): stop checking after its body.
    last: bool,
}

const HEAD: State = State::Head {
    searched: 0,
    content: None,
};

impl Framing {
    fn new() -> Self {
        Self {
            state: HEAD,
            first: true,
            last: false,
        }
    }

    /// Follows `bytes`, which begin where the previous call's accepted bytes ended, or,
    /// after a `Hold`, at the held head's first byte (the head again, with more of it).
    fn scan(&mut self, bytes: &[u8]) -> Verdict {
        let mut at = 0;
        loop {
            if at == bytes.len() {
                return Verdict::Pass;
            }
            match self.state {
                State::Through => return Verdict::Pass,
                State::Body(left) => {
                    let n = left.min((bytes.len() - at) as u64);
                    at += n as usize;
                    if n == left {
                        self.end_of_message();
                    } else {
                        self.state = State::Body(left - n);
                    }
                }
                State::Chunked(chunk) => at = self.chunked(chunk, bytes, at),
                State::Head { .. } => match self.head(&bytes[at..]) {
                    HeadStep::Incomplete => return Verdict::Hold(at),
                    HeadStep::Refuse(why) => return Verdict::Refuse(at, why),
                    HeadStep::Accepted(len) => at += len,
                },
            }
        }
    }

    fn end_of_message(&mut self) {
        self.state = if self.last { State::Through } else { HEAD };
    }

    /// One head from its first byte: its end, its checks, its body's framing.
    fn head(&mut self, head: &[u8]) -> HeadStep {
        let State::Head { searched, content } = self.state else {
            return HeadStep::Incomplete;
        };
        if self.first {
            if head.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(head) {
                return HeadStep::Incomplete;
            }
            if head.starts_with(H2_PREFACE) {
                self.state = State::Through;
                return HeadStep::Accepted(head.len());
            }
        }
        // The usual case: a whole head, parsed once, as it arrived.
        let verdict = if searched == 0 {
            check(head)
        } else {
            Err(None)
        };
        let verdict = match verdict {
            Ok(checked) if checked.len <= MAX_HEAD => Ok(checked),
            Ok(_) => Err(Some(Refusal::HeadTooLarge)),
            Err(Some(why)) => Err(Some(why)),
            // Not whole yet (or held): find its end without parsing it again and again.
            Err(None) => self.held_head(head, searched, content),
        };
        self.accept(head, verdict)
    }

    /// A head that did not arrive in one read: its end is searched for in what is new,
    /// and it is parsed only once that end is there.
    fn held_head(
        &mut self,
        head: &[u8],
        mut searched: usize,
        mut content: Option<usize>,
    ) -> Result<Checked, Option<Refusal>> {
        let from = searched;
        let end = find_end(head, &mut searched, &mut content);
        self.state = State::Head { searched, content };
        let Some(end) = end else {
            if head.len() > MAX_HEAD {
                return Err(Some(Refusal::HeadTooLarge));
            }
            // hyper would refuse a bad line before the head ends (a client may wait for
            // that answer): look again whenever a line is complete.
            if from > 0 && head[from..].contains(&b'\n') {
                if let Err(Some(why)) = check(head) {
                    return Err(Some(why));
                }
            }
            return Err(None);
        };
        if end > MAX_HEAD {
            return Err(Some(Refusal::HeadTooLarge));
        }
        match check(&head[..end]) {
            // The parsers disagree on where the head ends: hyper decides.
            Err(None) => {
                self.state = State::Through;
                Err(None)
            }
            verdict => verdict,
        }
    }

    /// Applies a head's verdict: `Err(None)` is a head still arriving, unless the guard
    /// gave up on the connection.
    fn accept(&mut self, head: &[u8], verdict: Result<Checked, Option<Refusal>>) -> HeadStep {
        match verdict {
            Ok(Checked {
                len,
                body,
                keep_alive,
            }) => {
                self.first = false;
                self.last = !keep_alive;
                self.state = match body {
                    BodyLength::Chunked => State::Chunked(Chunk::Start),
                    BodyLength::Bytes(0) if self.last => State::Through,
                    BodyLength::Bytes(0) => HEAD,
                    BodyLength::Bytes(n) => State::Body(n),
                };
                HeadStep::Accepted(len)
            }
            Err(Some(why)) => HeadStep::Refuse(why),
            Err(None) if self.state == State::Through => HeadStep::Accepted(head.len()),
            Err(None) => HeadStep::Incomplete,
        }
    }

    /// Follows a chunked body from `at`; returns where it stopped (the end of `bytes`, or
    /// the first byte after the body).
    fn chunked(&mut self, mut chunk: Chunk, bytes: &[u8], mut at: usize) -> usize {
        while at < bytes.len() {
            if let Chunk::Data(left) = chunk {
                let n = left.min((bytes.len() - at) as u64);
                at += n as usize;
                chunk = if n == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - n)
                };
                continue;
            }
            let byte = bytes[at];
            at += 1;
            let next = match (chunk, byte) {
                (Chunk::Start, b) => hex(b).map(|d| Chunk::Size(u64::from(d))),
                (Chunk::Size(size), b) if hex(b).is_some() => size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(hex(b).unwrap_or(0))))
                    .map(Chunk::Size),
                (Chunk::Size(size) | Chunk::Whitespace(size), b' ' | b'\t') => {
                    Some(Chunk::Whitespace(size))
                }
                (Chunk::Size(size) | Chunk::Whitespace(size), b';') => Some(Chunk::Extension(size)),
                (Chunk::Size(size) | Chunk::Whitespace(size) | Chunk::Extension(size), b'\r') => {
                    Some(Chunk::SizeLf(size))
                }
                (Chunk::Extension(_), b'\n') => None,
                (Chunk::Extension(size), _) => Some(Chunk::Extension(size)),
                (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
                (Chunk::SizeLf(size), b'\n') => Some(Chunk::Data(size)),
                (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
                (Chunk::DataLf, b'\n') => Some(Chunk::Start),
                (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
                (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
                (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
                (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
                (Chunk::EndLf, b'\n') => {
                    self.end_of_message();
                    return at;
                }
                _ => None,
            };
            match next {
                Some(next) => chunk = next,
                // hyper fails this body and closes the connection: nothing after it is
                // read as a head.
                None => {
                    self.state = State::Through;
                    return bytes.len();
                }
            }
        }
        self.state = State::Chunked(chunk);
        at
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

enum HeadStep {
    Incomplete,
    Refuse(Refusal),
    /// The head is this long and passes; the state is its body's.
    Accepted(usize),
}

/// Finds the end of a head (the byte after its empty line), searching only what was not
/// searched before, so a head that arrives a byte at a time costs linear time.
fn find_end(head: &[u8], searched: &mut usize, content: &mut Option<usize>) -> Option<usize> {
    let start = match *content {
        Some(start) => start,
        None => {
            let skip = head[*searched..]
                .iter()
                .position(|&b| b != b'\r' && b != b'\n');
            match skip {
                Some(skip) => {
                    let start = *searched + skip;
                    *content = Some(start);
                    start
                }
                None => {
                    *searched = head.len();
                    return None;
                }
            }
        }
    };
    // An empty line is an LF after an LF, or after an LF and a CR. The first LF after
    // `start` cannot end the head (it ends the request line at the earliest).
    let mut at = (*searched).max(start + 1);
    while let Some(offset) = head[at..].iter().position(|&b| b == b'\n') {
        let lf = at + offset;
        let previous = head[lf - 1];
        if previous == b'\n' || (previous == b'\r' && lf >= 2 && head[lf - 2] == b'\n') {
            *searched = lf + 1;
            return Some(lf + 1);
        }
        at = lf + 1;
    }
    *searched = head.len();
    None
}

enum BodyLength {
    Bytes(u64),
    Chunked,
}

struct Checked {
    len: usize,
    body: BodyLength,
    keep_alive: bool,
}

/// A whole head, as hyper's server would judge it. `Err(None)`: httparse does not see
/// the head end where the guard did (hyper is left to decide).
fn check(head: &[u8]) -> Result<Checked, Option<Refusal>> {
    let mut fields: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        head,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(None),
        Err(httparse::Error::Token) if request.method.is_none() => {
            return Err(Some(Refusal::Method))
        }
        Err(httparse::Error::Token) if request.path.is_none() => return Err(Some(Refusal::Target)),
        Err(httparse::Error::TooManyHeaders) => return Err(Some(Refusal::TooManyHeaders)),
        Err(httparse::Error::Version) => return Err(Some(Refusal::Version)),
        Err(_) => return Err(Some(Refusal::HeaderSyntax)),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(None);
    };
    if target.len() > MAX_TARGET {
        return Err(Some(Refusal::HeadTooLarge));
    }
    http::Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Method)?;
    http::Uri::try_from(target).map_err(|_| Refusal::Target)?;
    let http11 = version == 1;

    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut content_length: Option<u64> = None;
    let mut has_content_length = false;
    let mut chunked = None::<bool>;
    for field in request.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if !http11 {
                return Err(Some(Refusal::TransferEncodingHttp10));
            }
            content_length = None;
            chunked = Some(last_coding_is_chunked(field.value));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_content_length = true;
            if chunked.is_some() {
                continue;
            }
            let n = digits(field.value).ok_or(Refusal::ContentLength)?;
            match content_length {
                Some(previous) if previous != n => return Err(Some(Refusal::ContentLength)),
                Some(_) => {}
                None if n > MAX_CONTENT_LENGTH => return Err(Some(Refusal::ContentLengthTooLarge)),
                None => content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if saw_close || has_token(field.value, b"close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(field.value, b"keep-alive");
            }
        }
    }
    let body = match chunked {
        Some(false) => return Err(Some(Refusal::TransferEncodingNotChunked)),
        Some(true) => {
            if has_content_length {
                keep_alive = false;
            }
            BodyLength::Chunked
        }
        None => BodyLength::Bytes(content_length.unwrap_or(0)),
    };
    Ok(Checked {
        len,
        body,
        keep_alive,
    })
}

/// Visible ASCII (and tabs) only: what `HeaderValue::to_str` accepts.
fn visible(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn last_coding_is_chunked(value: &[u8]) -> bool {
    visible(value)
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    visible(value)
        && value
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Decimal digits only, no sign, no spaces, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// A refused head's socket and answer, handed back by the guard when hyper drops it.
pub type Handback<T> = oneshot::Receiver<(T, Refusal)>;

/// The client socket under hyper; see the module documentation.
pub struct H1Guard<T> {
    /// `None` only once handed back (in `drop`).
    inner: Option<T>,
    framing: Framing,
    /// Bytes read from the client that hyper has not had: the first `ready` of them are
    /// checked and wait for room in hyper's buffer; the rest is a head still arriving.
    held: Vec<u8>,
    ready: usize,
    /// Where held heads are read when they outgrow hyper's buffer; allocated once.
    scratch: Vec<u8>,
    refused: Option<Refusal>,
    /// hyper read up to the refused head (and got the end of the stream).
    reached: bool,
    handback: Option<oneshot::Sender<(T, Refusal)>>,
}

impl<T> H1Guard<T> {
    pub fn new(inner: T) -> (Self, Handback<T>) {
        let (sender, receiver) = oneshot::channel();
        let guard = Self {
            inner: Some(inner),
            framing: Framing::new(),
            held: Vec::new(),
            ready: 0,
            scratch: Vec::new(),
            refused: None,
            reached: false,
            handback: Some(sender),
        };
        (guard, receiver)
    }

    fn inner(&mut self) -> io::Result<&mut T> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Applies a verdict on `self.held` (which begins at a head).
    fn judge_held(&mut self) {
        match self.framing.scan(&self.held) {
            Verdict::Pass => self.ready = self.held.len(),
            Verdict::Hold(n) => self.ready = n,
            Verdict::Refuse(n, why) => {
                self.ready = n;
                self.held.truncate(n);
                self.refused = Some(why);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.refused.is_some() {
                // The end of the stream, for hyper.
                this.reached = true;
                return Poll::Ready(Ok(()));
            }
            if !this.held.is_empty() {
                // More of a held head.
                if this.scratch.is_empty() {
                    this.scratch = vec![0; SCRATCH];
                }
                let Some(inner) = this.inner.as_mut() else {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                };
                let mut read = ReadBuf::new(&mut this.scratch);
                std::task::ready!(Pin::new(inner).poll_read(cx, &mut read))?;
                let got = read.filled().len();
                if got == 0 {
                    // The client ended inside a head: there is no request to answer.
                    this.held.clear();
                    return Poll::Ready(Ok(()));
                }
                this.held.extend_from_slice(&this.scratch[..got]);
                this.judge_held();
                continue;
            }
            // The usual case: straight into hyper's buffer, checked there.
            let before = buf.filled().len();
            let inner = this.inner()?;
            std::task::ready!(Pin::new(inner).poll_read(cx, buf))?;
            let fresh = &buf.filled()[before..];
            if fresh.is_empty() {
                return Poll::Ready(Ok(()));
            }
            match this.framing.scan(fresh) {
                Verdict::Pass => return Poll::Ready(Ok(())),
                Verdict::Hold(n) => {
                    this.held.extend_from_slice(&fresh[n..]);
                    buf.set_filled(before + n);
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Verdict::Refuse(n, why) => {
                    buf.set_filled(before + n);
                    this.refused = Some(why);
                    if n > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H1Guard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.reached && self.refused.is_some() {
            // The refusal is still to be written; [`answer`] shuts down after it.
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.inner()?).poll_shutdown(cx)
    }
}

impl<T> Drop for H1Guard<T> {
    fn drop(&mut self) {
        if !self.reached {
            return;
        }
        if let (Some(inner), Some(why), Some(handback)) =
            (self.inner.take(), self.refused, self.handback.take())
        {
            let _ = handback.send((inner, why));
        }
    }
}

/// Writes a refusal the guard handed back (each write bounded by `send_timeout`), ends
/// the sending side, and reads and drops what the client still sends for a moment.
pub async fn answer<T: AsyncRead + AsyncWrite + Unpin>(
    mut stream: T,
    why: Refusal,
    send_timeout: Duration,
) {
    tracing::debug!(code = %why.code(), "refused an HTTP/1.1 request head");
    let written = tokio::time::timeout(send_timeout, async {
        stream.write_all(&why.to_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut sink = vec![0u8; 16 * 1024];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` in pieces of `step` bytes, as the guard would, and returns the bytes
    /// hyper would get and the refusal, if any.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Option<Refusal>) {
        let mut framing = Framing::new();
        let mut out = Vec::new();
        let mut held: Vec<u8> = Vec::new();
        for piece in input.chunks(step) {
            let bytes = if held.is_empty() {
                piece.to_vec()
            } else {
                held.extend_from_slice(piece);
                std::mem::take(&mut held)
            };
            match framing.scan(&bytes) {
                Verdict::Pass => out.extend_from_slice(&bytes),
                Verdict::Hold(n) => {
                    out.extend_from_slice(&bytes[..n]);
                    held = bytes[n..].to_vec();
                }
                Verdict::Refuse(n, why) => {
                    out.extend_from_slice(&bytes[..n]);
                    return (out, Some(why));
                }
            }
        }
        (out, None)
    }

    fn every_step(input: &[u8]) -> (Vec<u8>, Option<Refusal>) {
        let whole = run(input, input.len().max(1));
        for step in [1, 2, 3, 7, 24, 100] {
            assert_eq!(run(input, step), whole, "step {step}");
        }
        whole
    }

    const GOOD: &[u8] = b"POST /inference HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn good_requests_pass_whole_in_any_pieces() {
        let mut pipelined = GOOD.to_vec();
        pipelined.extend_from_slice(
            b"\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\n{}\r\n0\r\nT: 1\r\n\r\n",
        );
        pipelined.extend_from_slice(GOOD);
        assert_eq!(every_step(&pipelined), (pipelined.clone(), None));
    }

    #[test]
    fn a_bad_head_after_good_requests_is_refused_where_it_starts() {
        let mut input = GOOD.to_vec();
        input.extend_from_slice(GOOD);
        let good = input.clone();
        input.extend_from_slice(b"POST / HTTP/1.1\r\nX-Model-Pool: a\x7fb\r\n\r\n");
        assert_eq!(every_step(&input), (good, Some(Refusal::HeaderSyntax)));
    }

    #[test]
    fn what_hyper_refuses_is_refused_here() {
        let cases: &[(&[u8], Refusal)] = &[
            (b"POST / HTTP/1.1\r\nA: \x01\r\n\r\n", Refusal::HeaderSyntax),
            (b"POST / HTTP/1.1\r\nA b: c\r\n\r\n", Refusal::HeaderSyntax),
            (b"PO\x01ST / HTTP/1.1\r\n\r\n", Refusal::Method),
            (b"POST /\x01 HTTP/1.1\r\n\r\n", Refusal::Target),
            (b"POST http://[::1/ HTTP/1.1\r\n\r\n", Refusal::Target),
            (b"POST / HTTP/2.0\r\n\r\n", Refusal::Version),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::TransferEncodingHttp10,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Refusal::TransferEncodingNotChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}",
                Refusal::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
                Refusal::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
                Refusal::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
                Refusal::ContentLengthTooLarge,
            ),
        ];
        for (input, why) in cases {
            assert_eq!(
                every_step(input),
                (Vec::new(), Some(*why)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let mut many = b"POST / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("A{i}: b\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            every_step(&many),
            (Vec::new(), Some(Refusal::TooManyHeaders))
        );
    }

    #[test]
    fn a_bad_line_is_refused_before_the_head_ends() {
        assert_eq!(
            run(b"POST / HTTP/1.1\r\nA: \x7f\r\nB: c", 4),
            (Vec::new(), Some(Refusal::HeaderSyntax))
        );
        assert_eq!(
            run(b"POST / HTTP/1.1\r\nA: b\r\nB: c", 4),
            (Vec::new(), None)
        );
    }

    #[test]
    fn a_head_without_end_is_refused_past_the_limit_and_held_before() {
        let mut big = b"POST / HTTP/1.1\r\nX-Big: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(run(&big, 4096), (Vec::new(), None));
        big.extend_from_slice(b"aa");
        assert_eq!(run(&big, 4096), (Vec::new(), Some(Refusal::HeadTooLarge)));
    }

    #[test]
    fn http2_and_closing_requests_end_the_checking_upgrades_do_not() {
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00\x7f\x7f");
        assert_eq!(every_step(&h2), (h2.clone(), None));
        let bad = b"POST / HTTP/1.1\r\nA: \x7f\r\n\r\n";
        for first in [
            &b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"[..],
            b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n",
        ] {
            let input = [first, bad].concat();
            assert_eq!(
                every_step(&input),
                (input.clone(), None),
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
        // HTTP/1.0 with keep-alive, and an upgrade gpulink does not make (hyper then reads
        // the next head), go on being checked.
        for first in [
            &b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
        ] {
            let input = [first, bad].concat();
            assert_eq!(
                every_step(&input),
                (first.to_vec(), Some(Refusal::HeaderSyntax))
            );
        }
    }

    #[test]
    fn a_refusal_is_a_whole_json_answer() {
        let answer = Refusal::HeaderSyntax.to_bytes();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "bad_request");
        let answer = String::from_utf8(Refusal::HeadTooLarge.to_bytes()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }
}
