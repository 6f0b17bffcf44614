//! Bodies: the boxed response body gpulink answers with (shared by ingress, upstream and
//! the simulator), a wrapper that bounds each silence in a streamed body, and the reader
//! of the app's request bodies, bounded in size and in time (`listen.max_body`,
//! `listen.body_read_timeout`, `listen.body_min_rate`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response gpulink sends, whatever produced it.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub trait ProxyBodyExt {
    fn full(bytes: Bytes) -> ProxyBody;
    fn empty() -> ProxyBody;
}

impl ProxyBodyExt for ProxyBody {
    fn full(bytes: Bytes) -> ProxyBody {
        Full::new(bytes).map_err(|never| match never {}).boxed()
    }
    fn empty() -> ProxyBody {
        Empty::new().map_err(|never| match never {}).boxed()
    }
}

/// The body went silent for longer than allowed.
#[derive(Debug, thiserror::Error)]
#[error("no data from the upstream for {0:?} (upstream.idle_timeout)")]
pub struct IdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// Fails the body when no frame arrives within `idle`; the timer restarts on every
    /// frame, so a long generation that keeps streaming is never cut.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        idle: Duration,
    }
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep(idle),
            idle,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                let idle = *this.idle;
                this.sleep.as_mut().reset(Instant::now() + idle);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// After a refusal, at most this much of the rest of the body is read and discarded so
/// that ordinary clients (which send the whole body before reading) see the answer rather
/// than a connection reset.
const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);

/// How a request body must arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `listen.max_body`.
    pub max: usize,
    /// `listen.body_read_timeout`: the longest silence, and the allowance the body starts
    /// with.
    pub read_timeout: Duration,
    /// `listen.body_min_rate` in bytes per second (0 = none): each byte received extends
    /// the allowance by `1 / min_rate` seconds, so a trickle runs out of time while a body
    /// that keeps coming at a reasonable rate never does.
    pub min_rate: u64,
    /// `listen.max_in_flight_bytes`: what all requests may hold at once.
    pub in_flight: u64,
    /// `upstream.max_body`: the largest sealed copy a body can have.
    pub max_sealed: u64,
}

impl BodyLimits {
    /// `[listen]`'s body bounds, and `upstream.max_body` for the sealed copy.
    pub fn new(listen: &crate::config::Listen, upstream: &crate::config::Upstream) -> Self {
        Self {
            max: usize::try_from(listen.max_body.bytes()).unwrap_or(usize::MAX),
            read_timeout: listen.body_read_timeout.get(),
            min_rate: listen.body_min_rate.bytes(),
            in_flight: listen.max_in_flight_bytes.bytes(),
            max_sealed: upstream.max_body.bytes(),
        }
    }

    /// What a body of `len` bytes needs from the in-flight budget.
    pub fn needed_for(&self, len: u64) -> u64 {
        crate::inflight::needed_for(len, self.max_sealed)
    }

    /// When the next frame must have arrived.
    fn deadline(&self, started: Instant, last: Instant, received: usize) -> Instant {
        let silence = last + self.read_timeout;
        if self.min_rate == 0 {
            return silence;
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        silence.min(started + self.read_timeout + earned)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than listen.max_body ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("the body arrived too slowly: {received} bytes, then nothing for {silence:?} (listen.body_read_timeout {timeout:?}, listen.body_min_rate {min_rate} bytes/s)")]
    TooSlow {
        received: usize,
        silence: Duration,
        timeout: Duration,
        min_rate: u64,
    },
    #[error("the in-flight body budget is spent")]
    Overloaded,
    #[error("{0}")]
    Read(#[source] hyper::Error),
}

/// Reads the whole body, refusing it as soon as it passes `limits.max`, falls behind its
/// time allowance, or needs more than `held` can grow to in the in-flight budget. The
/// body is copied at most once: a body that arrives in a single frame is passed on as it
/// is.
pub async fn read_body(
    body: &mut Incoming,
    limits: &BodyLimits,
    expected_len: Option<u64>,
    held: &mut crate::inflight::Reservation,
) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt as _;
    let limit = limits.max;
    let mut first: Option<Bytes> = None;
    let mut buffer: Option<BytesMut> = None;
    let mut total = 0usize;
    let started = Instant::now();
    let mut last = started;
    loop {
        let deadline = limits.deadline(started, last, total);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                return Err(BodyError::TooSlow {
                    received: total,
                    silence: last.elapsed(),
                    timeout: limits.read_timeout,
                    min_rate: limits.min_rate,
                })
            }
        };
        last = Instant::now();
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we forward
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(BodyError::TooLarge { limit });
        }
        // Without a Content-Length (reserved up front) the body reserves as it comes.
        if !held.try_grow_to(limits.needed_for(total as u64), limits.in_flight) {
            return Err(BodyError::Overloaded);
        }
        match (&mut first, &mut buffer) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let capacity = expected_len
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(total)
                    .clamp(total, limit);
                let mut b = BytesMut::with_capacity(capacity);
                b.extend_from_slice(head);
                b.extend_from_slice(&data);
                first = None;
                buffer = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&data),
        }
    }
    Ok(match (first, buffer) {
        (_, Some(b)) => b.freeze(),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

/// Stops reading a body refused for lack of budget. HTTP/1.1 drains it (bounded, nothing
/// held) so the client reads the answer instead of a reset; HTTP/2 drops it, which resets
/// the stream and stops its flow control.
pub fn refuse_for_budget(body: Incoming, version: http::Version, tasks: &TaskTracker) {
    if version == http::Version::HTTP_2 {
        drop(body);
    } else {
        drain_in_background(body, tasks);
    }
}

/// Reads and discards up to a bounded amount of the rest of a refused body in the
/// background, so the client gets to read the error answer. The task is one of `tasks`
/// (the runtime's, which shutdown waits for, bounded), and ends by itself within
/// `DRAIN_MAX_TIME`.
pub fn drain_in_background(mut body: Incoming, tasks: &TaskTracker) {
    use http_body_util::BodyExt as _;
    tasks.spawn(async move {
        let drain = async {
            let mut drained = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    drained += data.len() as u64;
                    if drained > DRAIN_MAX_BYTES {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
    });
}

/// A body whose first bytes were already read (to look at them) followed by the rest of
/// the stream: the app receives exactly what the cluster sent.
pub struct Prefixed {
    prefix: Option<Bytes>,
    rest: ProxyBody,
}

impl Prefixed {
    pub fn new(prefix: Bytes, rest: ProxyBody) -> Self {
        Self {
            prefix: Some(prefix).filter(|p| !p.is_empty()),
            rest,
        }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(extra));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(extra));
        }
        hint
    }
}
