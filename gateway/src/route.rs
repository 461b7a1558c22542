//! Routing: every method of every service reaches its upstream unchanged
//! (unary and streaming alike, bodies never decoded), except the crossing,
//! which goes through the filter, and the gateway's own services.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use http::{Request, Response};
use madtech_common::server::BoxedGrpcService as HttpService;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::changes::EXPORT_AUDIENCE_CHANGES;
use crate::crossing::{Crossing, EXPORT_AUDIENCE};
use madtech_common::upstream::Upstream;

/// Splits a gRPC path `/pkg.Service/Method` into service and method, or
/// `None` when it is anything else. Only this exact shape is accepted, so no
/// spelling of a path (`//`, a trailing `/`, escapes, non-ASCII) can be routed
/// or authorized differently from how the upstream server would read it.
pub fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let service_ok = !service.is_empty()
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    let method_ok = !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (service_ok && method_ok).then_some((service, method))
}

/// Every gRPC method path the MadTech API defines, from the descriptor set.
pub fn api_methods() -> &'static BTreeSet<String> {
    static METHODS: LazyLock<BTreeSet<String>> = LazyLock::new(|| {
        use prost::Message;
        let Ok(set) = prost_types::FileDescriptorSet::decode(madtech_proto::FILE_DESCRIPTOR_SET)
        else {
            return BTreeSet::new();
        };
        let mut methods = BTreeSet::new();
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                for method in service.method {
                    methods.insert(format!(
                        "/{package}.{name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
        methods
    });
    &METHODS
}

#[derive(Clone)]
pub struct Router {
    crossing: Crossing,
    upstreams: Arc<HashMap<&'static str, Upstream>>,
    local: Arc<HashMap<&'static str, HttpService>>,
}

impl Router {
    /// `upstreams` and `local` map gRPC service names to where they are
    /// served.
    pub fn new(
        crossing: Crossing,
        upstreams: HashMap<&'static str, Upstream>,
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
        let Some((service, _)) = grpc_method(path) else {
            let status = Status::unimplemented("not a gRPC method path");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        if path == EXPORT_AUDIENCE {
            let crossing = self.crossing.clone();
            return Box::pin(async move { Ok(crossing.handle(request).await.map(in_call_span)) });
        }
        if path == EXPORT_AUDIENCE_CHANGES {
            let crossing = self.crossing.clone();
            return Box::pin(async move {
                Ok(crossing.handle_changes(request).await.map(in_call_span))
            });
        }
        if let Some(local) = self.local.get(service) {
            return Box::pin(local.clone().oneshot(request));
        }
        let Some((&service, upstream)) = self.upstreams.get_key_value(service) else {
            let status = Status::unimplemented(format!("unknown service {service:?}"));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let upstream = upstream.clone();
        Box::pin(async move {
            match upstream.call(request).await {
                Ok(response) => Ok(response),
                Err(err) => {
                    tracing::warn!(upstream = service, error = %err, "upstream call failed");
                    Ok(err.status(service).into_http())
                }
            }
        })
    }
}

/// A crossing's body does its work, and logs, as it is polled: inside the
/// call's span, so those lines name the call.
fn in_call_span(body: Body) -> Body {
    Body::new(crate::observe::in_span(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_grpc_paths_are_methods() {
        assert_eq!(
            grpc_method("/madtech.profiles.v1.ProfileService/GetProfile"),
            Some(("madtech.profiles.v1.ProfileService", "GetProfile"))
        );
        for path in [
            "/",
            "/no-method",
            "//madtech.segments.v1.SegmentService/ExportAudience",
            "/madtech.segments.v1.SegmentService/ExportAudience/",
            "/madtech.segments.v1.SegmentService//ExportAudience",
            "/madtech.segments.v1.SegmentService/Export%41udience",
            "/madtech.segments.v1.SegmentService/Exporté",
            "/a b/C",
        ] {
            assert_eq!(grpc_method(path), None, "{path}");
        }
    }
}
