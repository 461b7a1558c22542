//! Authentication: a request needs a valid bearer token; the caller it names
//! goes into the request extensions for the layers below, and the token
//! itself is removed so no upstream ever sees it.

use std::sync::Arc;

use http::Request;
use http::header::AUTHORIZATION;
use tonic::Status;
use tonic::body::Body;

use crate::guard::{Check, GuardLayer};
use crate::token::Verifier;

#[derive(Clone)]
pub struct Authenticate {
    verifier: Arc<Verifier>,
}

/// The authentication layer.
pub fn layer(verifier: Arc<Verifier>) -> GuardLayer<Authenticate> {
    GuardLayer::new(Authenticate { verifier })
}

impl Check for Authenticate {
    fn check(&self, request: &mut Request<Body>) -> Result<(), Status> {
        let header = request
            .headers()
            .get(AUTHORIZATION)
            .map(|value| value.to_str().unwrap_or(""));
        match self.verifier.verify_header(header) {
            Ok(caller) => {
                request.headers_mut().remove(AUTHORIZATION);
                request.extensions_mut().insert(caller);
                Ok(())
            }
            Err(rejected) => {
                metrics::counter!("madtech_gateway_unauthenticated_total", "reason" => rejected.to_string())
                    .increment(1);
                Err(Status::unauthenticated(rejected.to_string()))
            }
        }
    }
}
