//! Routing: every method of every service reaches its upstream unchanged
//! (unary and streaming alike, bodies never decoded), except the crossing,
//! which goes through the filter, and the gateway's own services.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use madtech_common::server::BoxedGrpcService as HttpService;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use crate::crossing::{Crossing, EXPORT_AUDIENCE};

/// The service part of a gRPC path: `/pkg.Service/Method` → `pkg.Service`.
pub fn service_name(path: &str) -> &str {
    path.trim_start_matches('/')
        .split_once('/')
        .map_or("", |(service, _)| service)
}

#[derive(Clone)]
pub struct Router {
    crossing: Crossing,
    upstreams: Arc<HashMap<&'static str, Channel>>,
    local: Arc<HashMap<&'static str, HttpService>>,
}

impl Router {
    /// `upstreams` and `local` map gRPC service names to where they are
    /// served.
    pub fn new(
        crossing: Crossing,
        upstreams: HashMap<&'static str, Channel>,
        local: HashMap<&'static str, HttpService>,
    ) -> Self {
        Router {
            crossing,
            upstreams: Arc::new(upstreams),
            local: Arc::new(local),
        }
    }
}

type RouteFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per upstream and checked per call below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path == EXPORT_AUDIENCE {
            let crossing = self.crossing.clone();
            return Box::pin(async move { Ok(crossing.handle(request).await) });
        }
        let service = service_name(path);
        if let Some(local) = self.local.get(service) {
            return Box::pin(local.clone().oneshot(request));
        }
        let Some(channel) = self.upstreams.get(service) else {
            let status = Status::unimplemented(format!("unknown service {service:?}"));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let channel = channel.clone();
        let upstream = service.to_string();
        Box::pin(async move {
            match channel.oneshot(request).await {
                Ok(response) => Ok(response),
                Err(err) => {
                    tracing::warn!(upstream, error = %err, "upstream unreachable");
                    Ok(Status::unavailable(format!("{upstream} is unavailable")).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_come_from_the_path() {
        assert_eq!(
            service_name("/madtech.profiles.v1.ProfileService/GetProfile"),
            "madtech.profiles.v1.ProfileService"
        );
        assert_eq!(service_name("/"), "");
        assert_eq!(service_name("/no-method"), "");
    }
}
