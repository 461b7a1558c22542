//! Request metrics: calls by gRPC method and status, and how long the
//! gateway took to start answering. Streams report their final status in
//! trailers, which this layer does not wait for; their status label is
//! `streaming`, and their duration is the time to the first response.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::route::grpc_method;

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

/// The method label: the gRPC path when it is one, so arbitrary paths
/// cannot grow the metric's label set.
fn method_label(path: &str) -> String {
    match grpc_method(path) {
        Some(_) => path.to_string(),
        None => "invalid".to_string(),
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
            let status = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| "streaming".to_string(), str::to_string),
                Err(_) => "error".to_string(),
            };
            metrics::histogram!("madtech_gateway_request_duration_seconds", "method" => method.clone())
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
    fn only_grpc_paths_become_labels() {
        assert_eq!(
            method_label("/madtech.profiles.v1.ProfileService/GetProfile"),
            "/madtech.profiles.v1.ProfileService/GetProfile"
        );
        assert_eq!(method_label("/../../etc/passwd"), "invalid");
    }
}
