//! Authorization layer: the caller's roles against the casbin RBAC policy
//! for the gRPC method. A denied call never reaches its upstream.

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::policy::{Policies, RBAC};
use crate::route::grpc_method;
use crate::token::Caller;

#[derive(Clone)]
pub struct AuthorizeLayer {
    policies: Policies,
}

impl AuthorizeLayer {
    pub fn new(policies: Policies) -> Self {
        AuthorizeLayer { policies }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            policies: self.policies.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policies: Policies,
}

/// Decides whether `caller` may call `method`, with the status to answer
/// when not.
pub fn decide(policies: &Policies, caller: Option<&Caller>, method: &str) -> Result<(), Status> {
    // Without an authenticated caller or a policy there is nothing to allow.
    let caller = caller.ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
    // Only a plain gRPC path reaches the policy (casbin's matchers are not
    // written for arbitrary strings).
    if grpc_method(method).is_none() {
        return Err(Status::unimplemented("not a gRPC method path"));
    }
    let policy = policies
        .current()
        .ok_or_else(|| Status::unavailable("no valid policy set is loaded"))?;
    for role in &caller.roles {
        match policy.allows_method(role, method) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => {
                tracing::error!(error = %err, "rbac evaluation failed");
                return Err(Status::internal("policy evaluation failed"));
            }
        }
    }
    Err(Status::permission_denied(format!(
        "roles {:?} may not call {method} ({})",
        caller.roles, RBAC.1
    )))
}

impl<S> Service<Request<Body>> for Authorize<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let decision = decide(
            &self.policies,
            request.extensions().get::<Caller>(),
            request.uri().path(),
        );
        match decision {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => {
                metrics::counter!("madtech_gateway_denied_total", "code" => format!("{:?}", status.code()))
                    .increment(1);
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}
