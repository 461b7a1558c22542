//! The bodies of a forwarded call: the request's, written upstream as it
//! arrives, and the response's, passed back to the caller.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::FutureExt;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::task::AbortHandle;
use tonic::Status;
use tonic::body::Body;

use super::connection::Load;

/// How much of a request body is written when the call begins without
/// waiting for the upstream's window; the rest is copied as the window
/// admits it.
const EAGER_BODY_BYTES: usize = 1024 * 1024;

/// Stops a request body's copying task when dropped while armed.
pub(super) struct CancelOnDrop(pub(super) Option<AbortHandle>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The part of a request body that had arrived when the call began (at
/// most [`EAGER_BODY_BYTES`] of it).
pub(super) struct Arrived {
    pub(super) data: Vec<Bytes>,
    pub(super) trailers: Option<HeaderMap>,
    /// Whether that is the whole body.
    pub(super) complete: bool,
}

impl Arrived {
    pub(super) fn take(body: &mut Body) -> Result<Arrived, Status> {
        let mut arrived = Arrived {
            data: Vec::new(),
            trailers: None,
            complete: false,
        };
        let mut taken = 0;
        while taken < EAGER_BODY_BYTES {
            let Some(frame) = body.frame().now_or_never() else {
                break;
            };
            let Some(frame) = frame else {
                arrived.complete = true;
                break;
            };
            match frame?.into_data() {
                Ok(data) => {
                    taken += data.len();
                    arrived.data.push(data);
                }
                Err(frame) => {
                    arrived.trailers = frame.into_trailers().ok();
                    arrived.complete = true;
                    break;
                }
            }
        }
        Ok(arrived)
    }

    /// Writes what arrived, ending the stream when it is the whole body.
    /// It is bounded by [`EAGER_BODY_BYTES`], so it is sent without waiting
    /// for the upstream's window: h2 holds what the window does not yet
    /// admit.
    /// (A complete body with nothing in it never comes here: its stream
    /// ends with the request's headers.)
    /// (Sending shares the data's buffers, so a call sent again costs no
    /// copy.)
    pub(super) fn send(&self, stream: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        let last = self.data.len().saturating_sub(1);
        let ends_with_data = self.complete && self.trailers.is_none();
        for (index, data) in self.data.iter().enumerate() {
            stream.send_data(data.clone(), ends_with_data && index == last)?;
        }
        match &self.trailers {
            Some(trailers) => stream.send_trailers(trailers.clone()),
            None => Ok(()),
        }
    }

    /// Whether the request is whole and has nothing in it, so its stream
    /// ends with its headers.
    pub(super) fn is_empty(&self) -> bool {
        self.complete && self.data.is_empty() && self.trailers.is_none()
    }
}

/// Copies the rest of a streaming request body upstream, as fast as the
/// upstream's window admits it, until the body ends or either side stops.
pub(super) async fn copy_body(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        let sent = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => send_within_window(&mut stream, data).await,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                    Ok(())
                }
            },
            Some(Err(_)) => {
                stream.send_reset(Reason::CANCEL);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn send_within_window(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            // The stream is closed; there is nowhere to send.
            None => return Ok(()),
        };
        if granted > 0 {
            stream.send_data(data.split_to(granted.min(data.len())), false)?;
        }
    }
    Ok(())
}

/// An upstream response body as the caller reads it (the gateway's server
/// sending it on, or a tonic client decoding it): data as it arrives (its
/// window released as it is passed on, so a slow reader slows the upstream
/// rather than filling memory), then the trailers that carry the gRPC
/// status. Dropped before its end (the caller gone), it
/// stops the request body's copy too.
pub(super) struct UpstreamBody {
    /// Taken only when the body is dropped.
    recv: Option<RecvStream>,
    /// The request's stream, when the call's task wrote all of it. Kept
    /// here because it may be the stream's last handle: tonic drops a
    /// body that has already ended (a trailers-only answer) as soon as it
    /// is wrapped.
    send: Option<SendStream<Bytes>>,
    state: BodyState,
    copying: CancelOnDrop,
    /// The call's address, which keeps the stream once the response has
    /// ended (see `Endpoint::ended`).
    load: Load,
}

#[derive(PartialEq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl UpstreamBody {
    pub(super) fn new(
        recv: RecvStream,
        send: Option<SendStream<Bytes>>,
        mut copying: CancelOnDrop,
        load: Load,
    ) -> Self {
        let state = if recv.is_end_stream() {
            copying.disarm();
            BodyState::Done
        } else {
            BodyState::Data
        };
        UpstreamBody {
            recv: Some(recv),
            send,
            state,
            copying,
            load,
        }
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        self.copying.disarm();
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let Some(recv) = this.recv.as_mut() else {
            return Poll::Ready(None);
        };
        if this.state == BodyState::Data {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => {
                    this.finish();
                    return Poll::Ready(Some(Err(err)));
                }
                None => this.state = BodyState::Trailers,
            }
        }
        if this.state == BodyState::Trailers {
            let trailers = ready!(recv.poll_trailers(cx));
            this.finish();
            return Poll::Ready(trailers.map(|t| t.map(Frame::trailers)).transpose());
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }
}

impl Drop for UpstreamBody {
    /// A response that ended leaves its stream to the endpoint (see
    /// `Endpoint::ended`); one dropped before its end lets go here, so h2
    /// resets the upstream stream (at once for a whole request; a request
    /// still streaming is reset when its aborted copy lets go).
    fn drop(&mut self) {
        if self.state == BodyState::Done
            && let Some(recv) = self.recv.take()
        {
            self.load.keep_ended(recv, self.send.take());
        }
    }
}
