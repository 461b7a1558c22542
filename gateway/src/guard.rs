//! The shape every admission layer shares: look at (and possibly annotate)
//! the request, then either pass it on or answer a status without calling
//! anything below. Authentication, rate limiting and authorization are each a
//! [`Check`]; this module is their layer, service and future.

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

/// One admission decision.
pub trait Check: Clone {
    /// `Ok` lets the request through (possibly changed); `Err` is the answer.
    fn check(&self, request: &mut Request<Body>) -> Result<(), Status>;
}

#[derive(Clone)]
pub struct GuardLayer<C> {
    check: C,
}

impl<C> GuardLayer<C> {
    pub fn new(check: C) -> Self {
        GuardLayer { check }
    }
}

impl<S, C: Clone> Layer<S> for GuardLayer<C> {
    type Service = Guard<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            check: self.check.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S, C> {
    inner: S,
    check: C,
}

impl<S, C> Service<Request<Body>> for Guard<S, C>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    C: Check,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match self.check.check(&mut request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}
