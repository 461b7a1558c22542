//! The one place where failures of the layers below (a deadline passed, the
//! gateway at capacity, an unexpected error) become gRPC statuses, so a call
//! always gets a status and never a broken connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{BoxError, Layer, Service};

#[derive(Clone, Copy, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rescue {
            inner,
            failed: None,
        }
    }
}

pub struct Rescue<S> {
    inner: S,
    /// A readiness failure, answered to the next call.
    failed: Option<Status>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Rescue {
            inner: self.inner.clone(),
            failed: None,
        }
    }
}

/// The status a layer's error stands for.
pub fn status_for(err: &BoxError) -> Status {
    if err.is::<tower::timeout::error::Elapsed>() {
        Status::deadline_exceeded("the call did not start answering in time")
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        Status::unavailable("the gateway is at capacity, retry shortly")
    } else {
        tracing::error!(error = %err, "gateway layer failed");
        Status::internal("internal error")
    }
}

impl<S> Service<Request<Body>> for Rescue<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => {
                self.failed = Some(status_for(&err.into()));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if let Some(status) = self.failed.take() {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(response),
                Err(err) => Ok(status_for(&err.into()).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    fn grpc_status(response: &Response<Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    #[tokio::test]
    async fn a_slow_call_answers_deadline_exceeded() {
        let slow = service_fn(|_request: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let service = ServiceBuilder::new()
            .layer(RescueLayer)
            .timeout(Duration::from_millis(10))
            .service(slow);
        let response = service
            .oneshot(Request::new(Body::empty()))
            .await
            .expect("infallible");
        assert_eq!(
            grpc_status(&response).as_deref(),
            Some("4"),
            "DEADLINE_EXCEEDED"
        );
    }

    /// A service that is never ready, like a full concurrency limit.
    struct NeverReady;

    impl Service<Request<Body>> for NeverReady {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Pending
        }

        fn call(&mut self, _request: Request<Body>) -> Self::Future {
            std::future::ready(Ok(Response::new(Body::empty())))
        }
    }

    #[tokio::test]
    async fn an_overloaded_gateway_answers_unavailable() {
        let service = ServiceBuilder::new()
            .layer(RescueLayer)
            .load_shed()
            .service(NeverReady);
        let response = service
            .oneshot(Request::new(Body::empty()))
            .await
            .expect("infallible");
        assert_eq!(grpc_status(&response).as_deref(), Some("14"), "UNAVAILABLE");
    }

    #[tokio::test]
    async fn successful_calls_pass_through() {
        let ok = service_fn(|_request: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let service = ServiceBuilder::new().layer(RescueLayer).service(ok);
        let response = service
            .oneshot(Request::new(Body::empty()))
            .await
            .expect("infallible");
        assert_eq!(grpc_status(&response), None);
    }
}
