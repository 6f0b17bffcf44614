//! Body types shared by ingress, upstream and the simulator: the boxed response body
//! gpulink answers with, and a wrapper that bounds each silence in a streamed body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

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
