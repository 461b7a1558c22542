//! The one way every MadTech component serves gRPC: its services plus the
//! standard health and reflection services, on a listener it is handed (so
//! tests bind `127.0.0.1:0` first and learn the port), until shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// Errors while starting or running a server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `addr`, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// A gRPC server under construction: the services it will serve, with health
/// and reflection always included.
pub struct GrpcServer {
    routes: Routes,
    service_names: Vec<&'static str>,
    /// Served elsewhere (the gateway's upstreams) but listed by reflection.
    advertised: Vec<&'static str>,
    reflection: bool,
    tls: Option<tonic::transport::ServerTlsConfig>,
    health: HealthReporter,
    health_service: HealthServer<HealthService>,
    /// Work that runs beside the server (e.g. following a change stream),
    /// started by `serve` and stopped with it.
    tasks: Vec<BackgroundTask>,
}

/// A background task: given the shutdown token, runs until it is cancelled.
pub type BackgroundTask =
    Box<dyn FnOnce(CancellationToken) -> futures::future::BoxFuture<'static, ()> + Send>;

impl Default for GrpcServer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcServer {
    pub fn new() -> Self {
        let health = HealthReporter::new();
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        GrpcServer {
            routes: Routes::default(),
            service_names: Vec::new(),
            advertised: Vec::new(),
            reflection: true,
            tls: None,
            health,
            health_service,
            tasks: Vec::new(),
        }
    }

    /// Runs `task` beside the server while it serves.
    pub fn with_task(mut self, task: BackgroundTask) -> Self {
        self.tasks.push(task);
        self
    }

    /// Adds a tonic service; health reports it SERVING while the server runs.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Lists `name` in reflection without serving it here (the gateway
    /// forwards it).
    pub fn advertise(mut self, name: &'static str) -> Self {
        self.advertised.push(name);
        self
    }

    /// Serves TLS (mutual, when the configuration names a client CA).
    pub fn with_tls(mut self, tls: Option<tonic::transport::ServerTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Leaves reflection out, for a component that serves it behind its own
    /// authentication.
    pub fn without_reflection(mut self) -> Self {
        self.reflection = false;
        self
    }

    /// The routes with health and reflection added, for components (the
    /// gateway) that add their own fallback before serving.
    pub fn into_routes(self) -> Result<(Routes, ServingHealth), ServeError> {
        let mut routes = self.routes.add_service(self.health_service);
        if self.reflection {
            let names: Vec<&'static str> = self
                .service_names
                .iter()
                .chain(&self.advertised)
                .copied()
                .collect();
            routes = add_reflection(routes, &names)?;
        }
        let health = ServingHealth {
            reporter: self.health,
            service_names: self.service_names,
            tls: self.tls,
        };
        Ok((routes, health))
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains
    /// in-flight calls and returns.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        // A child token: the tasks stop with this server, and stopping them
        // does not stop the rest of an in-process suite.
        let tasks_shutdown = shutdown.child_token();
        let tasks: Vec<_> = std::mem::take(&mut self.tasks)
            .into_iter()
            .map(|task| tokio::spawn(task(tasks_shutdown.clone())))
            .collect();
        let (routes, health) = self.into_routes()?;
        let served = serve_routes(routes, health, listener, shutdown).await;
        tasks_shutdown.cancel();
        for task in tasks {
            let _ = task.await;
        }
        served
    }
}

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// How long in-flight calls get to finish after shutdown is requested
/// (Kubernetes' default grace period is 30 s; this leaves room to exit).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle HTTP/2 connection is pinged, by servers towards their
/// callers and by every component's clients (`crate::upstream`) towards the
/// components they call, so a peer that vanished is noticed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// A gRPC service behind a box, for routing tables keyed by service name.
pub type BoxedGrpcService = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// Reflection over every MadTech proto, listing `names` and the health
/// service.
fn reflection_builder(names: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(madtech_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in names.iter().chain([&HEALTH_SERVICE]) {
        builder = builder.with_service_name(*name);
    }
    builder
}

/// Adds the reflection service (v1, and the v1alpha older tools use).
fn add_reflection(routes: Routes, names: &[&'static str]) -> Result<Routes, ServeError> {
    Ok(routes
        .add_service(reflection_builder(names).build_v1()?)
        .add_service(reflection_builder(names).build_v1alpha()?))
}

/// The reflection services boxed, with the gRPC service names they answer,
/// for a component that routes them itself (behind authentication).
pub fn boxed_reflection(
    names: &[&'static str],
) -> Result<[(&'static str, BoxedGrpcService); 2], ServeError> {
    Ok([
        (
            "grpc.reflection.v1.ServerReflection",
            BoxedGrpcService::new(reflection_builder(names).build_v1()?),
        ),
        (
            "grpc.reflection.v1alpha.ServerReflection",
            BoxedGrpcService::new(reflection_builder(names).build_v1alpha()?),
        ),
    ])
}

/// Flips the health of a set of services between SERVING and NOT_SERVING.
pub struct ServingHealth {
    reporter: HealthReporter,
    service_names: Vec<&'static str>,
    /// How the routes are served: plain text when `None`.
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl ServingHealth {
    pub async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for name in &self.service_names {
            self.reporter.set_service_status(*name, status).await;
        }
    }
}

/// Serves prepared routes; see [`GrpcServer::serve`].
pub async fn serve_routes(
    routes: Routes,
    health: ServingHealth,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    health.set(ServingStatus::Serving).await;
    let draining = shutdown.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = health.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    // The builder's `tcp_nodelay` only reaches sockets it accepts itself; a
    // listener handed in needs it on the incoming stream, or small gRPC
    // frames wait for Nagle.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let serving = builder
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .add_routes(routes.prepare())
        .serve_with_incoming_shutdown(incoming, async move {
            draining.cancelled().await;
            // A probe that sees NOT_SERVING stops sending new calls while the
            // calls in flight finish.
            health.set(ServingStatus::NotServing).await;
        });
    // Streams that never end on their own (change feeds) must not hold a
    // shutdown forever: after the drain timeout the server is dropped.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        result = serving => result.map_err(ServeError::from),
        () = deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "calls still open after the drain timeout; closing them");
            Ok(())
        }
    }
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C) and cancels `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupted, shutting down"),
        _ = terminate => tracing::info!("terminated, shutting down"),
        _ = token.cancelled() => return,
    }
    token.cancel();
}
