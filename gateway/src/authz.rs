//! Authorization: the caller's roles against the casbin RBAC policy
//! for the gRPC method. A denied call never reaches its upstream.

use http::Request;
use tonic::Status;
use tonic::body::Body;

use crate::guard::{Check, GuardLayer};
use crate::policy::{Policies, RBAC};
use crate::route::grpc_method;
use crate::token::Caller;

#[derive(Clone)]
pub struct Authorize {
    policies: Policies,
}

/// The authorization layer.
pub fn layer(policies: Policies) -> GuardLayer<Authorize> {
    GuardLayer::new(Authorize { policies })
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

impl Check for Authorize {
    fn check(&self, request: &mut Request<Body>) -> Result<(), Status> {
        decide(
            &self.policies,
            request.extensions().get::<Caller>(),
            request.uri().path(),
        )
        .inspect_err(|status| {
            metrics::counter!("madtech_gateway_denied_total", "code" => format!("{:?}", status.code()))
                .increment(1);
        })
    }
}
