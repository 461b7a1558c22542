//! What the gateway tells about each call, from one look at its response:
//!
//! - **Request id.** The caller's `x-request-id` when it is a plain token,
//!   else a new UUID; it goes upstream with the call and back on the
//!   response, so a caller can name the call they saw fail. A caller's id
//!   that is anything else (an email, say) is replaced, never logged.
//! - **Span.** One `grpc` span per call, with the method (the same label as
//!   the metrics', so a path a caller made up is never logged) and request id,
//!   entered while the layers below take the call and answer it. A
//!   pass-through body is forwarded outside it; the crossings, whose bodies
//!   log (the audit line among them), carry it into their streams with
//!   [`in_span`].
//! - **Failure log.** A status in the response headers that is not OK is
//!   logged: a warning when it is the gateway's or a service's failure, at
//!   debug when it is the caller's (refusals are counted below, and logging
//!   each at a higher level would cost more than the call).
//! - **Metrics.** Calls by method and status, and the time to the
//!   response's headers.
//!
//! A status that comes in the trailers (every stream, and a unary call that
//! succeeds upstream) is not waited for: its label is `in_trailers`.
//! Refusals and failed unary calls are answered with the status in the
//! headers ("trailers-only"), so they are all seen.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::route::api_methods;

const REQUEST_ID: &str = "x-request-id";

/// The longest caller-chosen request id kept.
const LONGEST_CALLER_ID: usize = 64;

#[derive(Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

/// The caller's request id when it is a plain token (letters, digits and
/// `-_.:`, at most 64 of them), else a new one. Anything else could carry
/// what must not reach a log line.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut id = caller_or_new_id(headers);
    // Every id is new, so HPACK indexing it (upstream and back to the
    // caller) would only churn both connections' header tables: each call
    // would evict an entry and compare its id with every id still there.
    // A never-indexed literal costs neither.
    id.set_sensitive(true);
    id
}

fn caller_or_new_id(headers: &HeaderMap) -> HeaderValue {
    let plain = |id: &&HeaderValue| {
        let id = id.as_bytes();
        !id.is_empty()
            && id.len() <= LONGEST_CALLER_ID
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    };
    if let Some(id) = headers.get(REQUEST_ID).filter(plain) {
        return id.clone();
    }
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The method label: a method of the MadTech API, else `other`. Paths come
/// from callers before they are authenticated, so anything else as a label
/// would let anyone grow the metrics without bound. The labels are the API's
/// own static strings, so a call allocates none.
fn method_label(path: &str) -> &'static str {
    api_methods().get(path).map_or("other", String::as_str)
}

const CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// The status label: a gRPC status code (0–16) as sent, `in_trailers` when
/// the headers carry none, `error` when the layers below failed the call
/// without one.
fn status_label<B>(result: &Result<Response<B>, impl Sized>) -> &'static str {
    let Ok(response) = result else {
        return "error";
    };
    match response.headers().get("grpc-status") {
        None => "in_trailers",
        Some(value) => CODES
            .iter()
            .find(|code| code.as_bytes() == value.as_bytes())
            .copied()
            .unwrap_or("invalid"),
    }
}

/// Logs a failed call by whose fault it is, from its status label.
fn log_failure(status: &'static str, latency: Duration) {
    use tonic::Code;
    let latency_ms = latency.as_millis();
    let code = match status {
        "0" | "in_trailers" => return,
        "error" | "invalid" => {
            tracing::warn!(status, latency_ms, "call failed");
            return;
        }
        code => Code::from_bytes(code.as_bytes()),
    };
    match code {
        Code::Unknown
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss
        | Code::DeadlineExceeded
        | Code::Unimplemented => tracing::warn!(?code, latency_ms, "call failed"),
        _ => tracing::debug!(?code, latency_ms, "call refused"),
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Observe<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let method = method_label(request.uri().path());
        let id = request_id(request.headers());
        let span =
            tracing::info_span!("grpc", method, request_id = id.to_str().unwrap_or_default());
        request.headers_mut().insert(REQUEST_ID, id.clone());
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let answered = async move {
            let mut result = future.await;
            let latency = started.elapsed();
            let status = status_label(&result);
            metrics::histogram!("madtech_gateway_request_duration_seconds", "method" => method)
                .record(latency.as_secs_f64());
            metrics::counter!("madtech_gateway_requests_total", "method" => method, "grpc_status" => status)
                .increment(1);
            log_failure(status, latency);
            if let Ok(response) = &mut result {
                response.headers_mut().insert(REQUEST_ID, id);
            }
            result
        };
        Box::pin(answered.instrument(span))
    }
}

/// `body`, polled (and dropped) inside the current span: for a response
/// whose body does the call's work and logs while doing it.
pub fn in_span<B: Body + Unpin>(body: B) -> InSpan<B> {
    InSpan {
        body: Some(body),
        span: tracing::Span::current(),
    }
}

pub struct InSpan<B> {
    /// Taken only when dropped.
    body: Option<B>,
    span: tracing::Span,
}

impl<B: Body + Unpin> Body for InSpan<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> Drop for InSpan<B> {
    fn drop(&mut self) {
        // A crossing dropped before its end audits itself as aborted; that
        // line names the call too.
        let _entered = self.span.enter();
        drop(self.body.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    #[test]
    fn only_api_methods_become_labels() {
        assert_eq!(
            method_label("/madtech.profiles.v1.ProfileService/GetProfile"),
            "/madtech.profiles.v1.ProfileService/GetProfile"
        );
        // Well-formed, but no method of the API: a caller could send any
        // number of these.
        assert_eq!(method_label("/made.Up/Method1"), "other");
        assert_eq!(method_label("/../../etc/passwd"), "other");
    }

    #[test]
    fn statuses_are_the_codes_sent_or_where_they_are() {
        let with = |status: &str| {
            let mut response = Response::new(());
            response
                .headers_mut()
                .insert("grpc-status", status.parse().expect("header value"));
            Ok::<_, ()>(response)
        };
        assert_eq!(status_label(&with("0")), "0");
        assert_eq!(status_label(&with("16")), "16");
        assert_eq!(status_label(&with("17")), "invalid");
        assert_eq!(status_label(&with("07")), "invalid");
        assert_eq!(status_label(&Ok::<_, ()>(Response::new(()))), "in_trailers");
        assert_eq!(status_label(&Err::<Response<()>, _>(())), "error");
    }

    fn headers_with_id(id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_str(id).expect("header value"));
        headers
    }

    #[test]
    fn a_plain_caller_id_is_kept_and_anything_else_replaced() {
        for kept in [
            "b7e1c3d2-0f4a-4b8e-9c1d-2a3b4c5d6e7f",
            "job-42.retry:3",
            "X_1",
        ] {
            assert_eq!(request_id(&headers_with_id(kept)), kept);
        }
        let longest = "a".repeat(LONGEST_CALLER_ID);
        assert_eq!(request_id(&headers_with_id(&longest)), longest.as_str());
        for replaced in [
            "alice@example.com",
            "id with spaces",
            "",
            &"a".repeat(LONGEST_CALLER_ID + 1),
        ] {
            let id = request_id(&headers_with_id(replaced));
            assert_ne!(id, replaced);
            assert!(uuid::Uuid::parse_str(id.to_str().expect("ascii")).is_ok());
        }
        let first = request_id(&HeaderMap::new());
        let second = request_id(&HeaderMap::new());
        assert_ne!(first, second);
    }

    #[tokio::test]
    async fn the_id_goes_upstream_and_back_to_the_caller() {
        let upstream = tower::service_fn(|request: Request<()>| async move {
            let seen = request.headers().get(REQUEST_ID).cloned();
            let mut response = Response::new(seen);
            response
                .headers_mut()
                .insert("grpc-status", HeaderValue::from_static("5"));
            Ok::<_, Infallible>(response)
        });
        let mut request = Request::new(());
        *request.uri_mut() = "/madtech.profiles.v1.ProfileService/GetProfile"
            .parse()
            .expect("uri");
        request
            .headers_mut()
            .insert(REQUEST_ID, HeaderValue::from_static("call-1"));
        let response = ObserveLayer
            .layer(upstream)
            .oneshot(request)
            .await
            .expect("infallible");
        assert_eq!(response.headers()[REQUEST_ID], "call-1");
        assert_eq!(
            response.body().as_ref().map(HeaderValue::as_bytes),
            Some(&b"call-1"[..])
        );
    }
}
