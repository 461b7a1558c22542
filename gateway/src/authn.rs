//! Authentication layer: a request needs a valid bearer token; the caller it
//! names goes into the request extensions for the layers below, and the
//! token itself is removed so no upstream ever sees it.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response, header::AUTHORIZATION};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::token::Verifier;

#[derive(Clone)]
pub struct AuthenticateLayer {
    verifier: Arc<Verifier>,
}

impl AuthenticateLayer {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        AuthenticateLayer { verifier }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            verifier: Arc::clone(&self.verifier),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

impl<S> Service<Request<Body>> for Authenticate<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let header = request
            .headers()
            .get(AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or(""));
        match self.verifier.verify_header(header) {
            Ok(caller) => {
                request.headers_mut().remove(AUTHORIZATION);
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(rejected) => {
                metrics::counter!("madtech_gateway_unauthenticated_total", "reason" => rejected.to_string())
                    .increment(1);
                Either::Left(ready(Ok(
                    Status::unauthenticated(rejected.to_string()).into_http()
                )))
            }
        }
    }
}
