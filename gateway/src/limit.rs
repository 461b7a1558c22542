//! Request size limit: no gRPC message a caller sends may be larger than
//! `max_request_message_bytes`. Bodies are streamed, never buffered, so the
//! limit is enforced on each message's length prefix as it goes by; a
//! streaming call may send as many messages as it likes. A message over the
//! limit ends the call with RESOURCE_EXHAUSTED before the upstream has its
//! body, and the upstream call is dropped (cancelled).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use tokio::sync::oneshot;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

/// A gRPC message is framed as a 1-byte compression flag and a 4-byte
/// big-endian length (gRPC over HTTP/2, "Length-Prefixed-Message").
const PREFIX_LEN: usize = 5;

#[derive(Clone, Copy)]
pub struct MessageLimitLayer {
    max_message_bytes: usize,
}

impl MessageLimitLayer {
    pub fn new(max_message_bytes: usize) -> Self {
        MessageLimitLayer { max_message_bytes }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

#[derive(Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> Service<Request<Body>> for MessageLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (tripped, mut over) = oneshot::channel();
        let limit = self.max_message_bytes;
        let request = request.map(|body| {
            Body::new(Limited {
                inner: body,
                limit,
                framing: Framing::default(),
                tripped: Some(tripped),
            })
        });
        let response = self.inner.call(request);
        let refused = move |size: usize| {
            metrics::counter!("madtech_gateway_oversized_messages_total").increment(1);
            Status::resource_exhausted(format!(
                "a request message of {size} bytes is larger than the limit of {limit} bytes"
            ))
            .into_http()
        };
        Box::pin(async move {
            tokio::pin!(response);
            let answered = tokio::select! {
                Ok(size) = &mut over => return Ok(refused(size)),
                answered = &mut response => answered,
            };
            // An upstream that fails on the cut body answers in the same poll
            // that cut it; the caller should hear why.
            match over.try_recv() {
                Ok(size) => Ok(refused(size)),
                Err(_) => answered,
            }
        })
    }
}

/// Where the body is in the message framing.
#[derive(Debug, Default, Clone)]
struct Framing {
    /// Prefix bytes gathered so far (a prefix may span data frames).
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// Message bytes still to pass before the next prefix.
    remaining: usize,
}

impl Framing {
    /// Follows `data` through the framing; the size of the first message
    /// over `limit`, if any.
    fn advance(&mut self, mut data: &[u8], limit: usize) -> Option<usize> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let step = self.remaining.min(data.len());
                self.remaining -= step;
                data = &data[step..];
                continue;
            }
            let step = (PREFIX_LEN - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + step].copy_from_slice(&data[..step]);
            self.prefix_len += step;
            data = &data[step..];
            if self.prefix_len == PREFIX_LEN {
                let mut length = &self.prefix[1..];
                let size = length.get_u32() as usize;
                if size > limit {
                    return Some(size);
                }
                self.remaining = size;
                self.prefix_len = 0;
            }
        }
        None
    }
}

/// A request body that reports the first message over the limit and stops.
struct Limited {
    inner: Body,
    limit: usize,
    framing: Framing,
    tripped: Option<oneshot::Sender<usize>>,
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.tripped.is_none() {
            return Poll::Ready(Some(Err(Status::resource_exhausted(
                "request message too large",
            ))));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let limit = self.limit;
            if let Some(size) = self.framing.advance(data, limit) {
                if let Some(tripped) = self.tripped.take() {
                    let _ = tripped.send(size);
                }
                return Poll::Ready(Some(Err(Status::resource_exhausted(
                    "request message too large",
                ))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn message(len: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(len as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(7u8, len));
        framed
    }

    fn grpc_status(response: &Response<Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("").to_string())
    }

    /// An upstream that reads the whole request before answering, as a
    /// unary gRPC server does.
    async fn call(limit: usize, body: Vec<u8>) -> Response<Body> {
        let upstream = tower::service_fn(|request: Request<Body>| async move {
            let read = request.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(match read {
                Ok(_) => Response::new(Body::empty()),
                Err(_) => Status::internal("the upstream saw a broken body").into_http(),
            })
        });
        MessageLimitLayer::new(limit)
            .layer(upstream)
            .oneshot(Request::new(Body::new(http_body_util::Full::new(
                Bytes::from(body),
            ))))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn messages_within_the_limit_pass() {
        let mut body = message(100);
        body.extend(message(100));
        body.extend(message(0));
        assert_eq!(grpc_status(&call(100, body).await), None);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_with_resource_exhausted() {
        let mut body = message(10);
        body.extend(message(101));
        let response = call(100, body).await;
        assert_eq!(grpc_status(&response).as_deref(), Some("8"));
        let message = response
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(message.contains("101"), "{message}");
    }

    #[test]
    fn prefixes_split_across_data_frames_are_followed() {
        let mut body = message(3);
        body.extend(message(200));
        for split in 0..body.len() {
            let mut framing = Framing::default();
            let (a, b) = body.split_at(split);
            let found = framing.advance(a, 100).or_else(|| framing.advance(b, 100));
            assert_eq!(found, Some(200), "split at {split}");
        }
        let mut framing = Framing::default();
        assert_eq!(framing.advance(&message(3), 100), None);
        assert_eq!(
            (framing.prefix_len, framing.remaining),
            (0, 0),
            "back at a message boundary"
        );
    }
}
