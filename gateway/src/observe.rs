//! Request metrics: calls by gRPC method and status, and how long the
//! gateway took to start answering. A response whose status comes in its
//! trailers (every stream, and a unary call that succeeds upstream) is not
//! waited for: its status label is `in_trailers`, and its duration is the
//! time to the response's headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::route::api_methods;

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

/// The method label: a method of the MadTech API, else `other`. Paths come
/// from callers before they are authenticated, so anything else as a label
/// would let anyone grow the metrics without bound. The labels are the API's
/// own static strings, so a call allocates none.
fn method_label(path: &str) -> &'static str {
    api_methods().get(path).map_or("other", String::as_str)
}

/// The status label: a gRPC status code (0–16) as sent, `in_trailers` when
/// the headers carry none, `error` when the layers below failed the call.
fn status_label<B>(result: &Result<Response<B>, impl Sized>) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
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

impl<S> Service<Request<Body>> for Observe<S>
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
        let method = method_label(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let status = status_label(&result);
            metrics::histogram!("madtech_gateway_request_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("madtech_gateway_requests_total", "method" => method, "grpc_status" => status)
                .increment(1);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
