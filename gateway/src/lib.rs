//! The MadTech gateway: the single ingress for callers and the only path from
//! the martech zone to the adtech zone. A tower stack, read top to bottom in
//! [`Gateway::build`], authenticates every call, authorizes it against the
//! compliance team's casbin policy, and routes it; the crossing
//! (`ExportAudience`) is filtered record by record against consent.

pub mod api;
pub mod audit;
pub mod authn;
pub mod authz;
pub mod changes;
pub mod compliance;
pub mod config;
pub mod consent_view;
pub mod crossing;
pub mod destinations;
pub mod error;
pub mod guard;
pub mod keys;
pub mod limit;
pub mod observe;
pub mod ordered;
pub mod page;
pub mod policy;
pub mod ratelimit;
pub mod release;
pub mod rescue;
pub mod route;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;

use http::Request;
use madtech_common::CancellationToken;
use madtech_common::db::connect_and_migrate;
use madtech_common::server::{
    BoxedGrpcService, GrpcServer, ServingHealth, boxed_reflection, serve_routes,
};
use madtech_proto::{activation, consent, gateway as gateway_pb, profiles, segments};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

pub use config::GatewayConfig;
pub use error::GatewayError;

use crate::audit::AuditLog;
use crate::consent_view::ConsentView;
use crate::crossing::{Crossing, Pseudonymiser};
use crate::destinations::DestinationRegistry;
use crate::keys::{JwksRefresher, KeySet, VerificationKey};
use crate::observe::ObserveLayer;
use crate::policy::{Policies, PolicySet, Reloader};
use crate::ratelimit::RateLimits;
use crate::rescue::RescueLayer;
use crate::route::Router;
use crate::token::Verifier;
use madtech_common::upstream::Upstream;

/// A gateway ready to serve.
pub struct Gateway {
    routes: Routes,
    jwks: Option<JwksRefresher>,
    consent_view: Arc<ConsentView>,
    health: ServingHealth,
    reloader: Reloader,
    reload_interval: std::time::Duration,
}

impl Gateway {
    /// Loads the policies and keys and assembles the stack. Fails when the
    /// policies do not load: a gateway without a valid policy set must not
    /// start serving.
    pub async fn build(config: &GatewayConfig) -> Result<Gateway, GatewayError> {
        let policies = Policies::new(PolicySet::load(&config.policy_dir).await?);
        let mut fixed_keys = Vec::new();
        if !config.auth.public_key_file.as_os_str().is_empty() {
            fixed_keys.push(VerificationKey::ed25519_pem_file(
                &config.auth.public_key_file,
            )?);
        }
        for key in &config.auth.keys {
            fixed_keys.push(VerificationKey::pem_file(key)?);
        }
        let (keys, jwks) = match &config.auth.jwks {
            Some(jwks) => {
                let (refresher, keys) = JwksRefresher::start(jwks.clone(), fixed_keys).await?;
                (keys, Some(refresher))
            }
            None => (KeySet::new(fixed_keys), None),
        };
        let verifier = Arc::new(Verifier::new(
            keys,
            &config.auth.issuer,
            &config.auth.audience,
            config.auth.leeway,
        ));
        let pseudonymiser = Pseudonymiser::from_hex_file(&config.pseudonym_key_file)?;
        let audit = Arc::new(AuditLog::new(
            connect_and_migrate::<audit::Migrator>(&config.audit_database).await?,
        ));

        // One upstream per service, shared by the calls forwarded to it and
        // the gateway's own clients of it (the crossing's export, the
        // consent view, the destination registry).
        let upstreams = &config.upstreams;
        let upstream = |url: &str| {
            Upstream::resolving_every(&config.upstream_tls, url, config.upstream_resolve_interval)
        };
        let profiles_upstream = upstream(&upstreams.profiles)?;
        let consent_upstream = upstream(&upstreams.consent)?;
        let segments_upstream = upstream(&upstreams.segments)?;
        let activation_upstream = upstream(&upstreams.activation)?;
        let destinations = DestinationRegistry::new(activation_upstream.clone());
        let upstream_services = HashMap::from([
            (
                profiles::v1::profile_service_server::SERVICE_NAME,
                profiles_upstream,
            ),
            (
                consent::v1::consent_service_server::SERVICE_NAME,
                consent_upstream.clone(),
            ),
            (
                consent::v1::privacy_request_service_server::SERVICE_NAME,
                consent_upstream.clone(),
            ),
            (
                segments::v1::segment_service_server::SERVICE_NAME,
                segments_upstream.clone(),
            ),
            (
                activation::v1::activation_service_server::SERVICE_NAME,
                activation_upstream,
            ),
        ]);
        let mut local: HashMap<&'static str, BoxedGrpcService> = HashMap::from([
            (
                gateway_pb::v1::policy_service_server::SERVICE_NAME,
                BoxedGrpcService::new(api::PolicyStatusApi::new(policies.clone()).into_server()),
            ),
            (
                gateway_pb::v1::audit_service_server::SERVICE_NAME,
                BoxedGrpcService::new(api::AuditApi::new(Arc::clone(&audit)).into_server()),
            ),
            (
                gateway_pb::v1::consent_release_service_server::SERVICE_NAME,
                BoxedGrpcService::new(
                    release::ConsentReleaseApi::new(
                        pseudonymiser.clone(),
                        consent_upstream.clone(),
                        Arc::clone(&audit),
                        policies.clone(),
                        destinations.clone(),
                    )
                    .into_server(),
                ),
            ),
        ]);

        let mut server = GrpcServer::new().with_tls(config.tls.load()?);
        for name in upstream_services.keys().chain(local.keys()) {
            server = server.advertise(name);
        }
        if config.reflection_requires_token {
            let names: Vec<&'static str> = upstream_services
                .keys()
                .chain(local.keys())
                .copied()
                .collect();
            local.extend(boxed_reflection(&names)?);
            server = server.without_reflection();
        }

        let consent_view = ConsentView::new(&config.consent_view, consent_upstream);
        let crossing = Crossing::new(
            policies.clone(),
            audit,
            pseudonymiser,
            segments_upstream,
            Arc::clone(&consent_view),
            destinations,
            config.crossing_workers(),
        );
        let router = Router::new(crossing, upstream_services, local);

        let stack = ServiceBuilder::new()
            // Tonic hands axum's body type in; everything below speaks tonic's.
            .map_request(|request: Request<axum::body::Body>| request.map(Body::new))
            // The request id, the call's span, its failure log line and its
            // metrics, for every call the gateway answers (denials, panics
            // and overload included).
            .layer(ObserveLayer)
            // A bug that panics fails its own call with INTERNAL, never the
            // connection that other callers' calls share.
            .layer(CatchPanicLayer::custom(panic_status))
            // Failures of the layers below (deadline, overload) become gRPC
            // statuses here, so no call ever fails the connection.
            .layer(RescueLayer)
            // A call whose response has not started in time gets
            // DEADLINE_EXCEEDED rather than holding a slot forever.
            .timeout(config.request_timeout)
            // Past the concurrency limit, refuse at once instead of queueing:
            // callers retry elsewhere and the gateway stays responsive.
            .load_shed()
            .concurrency_limit(config.max_concurrent_requests)
            // No message larger than the limit reaches anything below; the
            // caller gets RESOURCE_EXHAUSTED naming the sizes.
            .layer(limit::MessageLimitLayer::new(
                config.max_request_message_bytes,
            ))
            // Who is calling: a valid bearer token or UNAUTHENTICATED.
            .layer(authn::layer(verifier))
            // Within their role's budget, or RESOURCE_EXHAUSTED.
            .layer(ratelimit::layer(Arc::new(RateLimits::new(
                &config.rate_limits,
            ))))
            // May they call this method: the RBAC policy or PERMISSION_DENIED.
            .layer(authz::layer(policies.clone()))
            // Where it goes: the crossing filter, a gateway service, or the
            // upstream that serves it.
            .service(router);

        let (routes, health) = server.into_routes()?;
        let routes: Routes = routes.into_axum_router().fallback_service(stack).into();
        Ok(Gateway {
            routes,
            jwks,
            consent_view,
            health,
            reloader: Reloader::new(&config.policy_dir, policies),
            reload_interval: config.policy_reload_interval,
        })
    }

    /// Serves until `shutdown` is cancelled, putting each new valid policy
    /// set in force as it appears in the policy directory.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        let reloading = tokio::spawn(self.reloader.run(self.reload_interval, shutdown.clone()));
        let following = tokio::spawn(self.consent_view.follow(shutdown.clone()));
        let refreshing = self
            .jwks
            .map(|jwks| tokio::spawn(jwks.run(shutdown.clone())));
        let served = serve_routes(self.routes, self.health, listener, shutdown).await;
        reloading.abort();
        following.abort();
        if let Some(refreshing) = refreshing {
            refreshing.abort();
        }
        served?;
        Ok(())
    }
}

fn panic_status(_panic: Box<dyn std::any::Any + Send + 'static>) -> http::Response<Body> {
    tracing::error!("a gateway call panicked");
    tonic::Status::internal("internal error").into_http()
}
