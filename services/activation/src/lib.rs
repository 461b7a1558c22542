//! The activation service, the adtech zone: destinations, activations
//! (segment → destination for a purpose) and sync runs that send a
//! destination only what changed since the last run.
//!
//! It only ever sees what the gateway released — pseudonymous ids and hashed
//! identifiers — because it fetches audiences through the gateway and has no
//! route to a martech service.

pub mod config;
pub mod destination;
pub mod error;
pub mod follow;
#[cfg(feature = "testing")]
pub mod mock;
pub mod schedule;
pub mod service;
pub mod store;
pub mod sync;

pub use config::ActivationConfig;
pub use error::ActivationError;
pub use service::ActivationApi;

use std::sync::Arc;

use madtech_common::db::connect_and_migrate;
use madtech_common::server::GrpcServer;
use madtech_common::upstream::Upstream;
use tokio::sync::Notify;

/// Adds this service's bearer token for the gateway to every call. The
/// token is read from its file when the client is made, so a rotated token
/// is picked up by the next sync or reconnect.
pub(crate) async fn bearer_interceptor(
    config: &ActivationConfig,
) -> Result<
    impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    ActivationError,
> {
    let bearer = madtech_common::bearer::from_file(&config.gateway_token_file)
        .await
        .map_err(ActivationError::Token)?;
    Ok(move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        Ok(request)
    })
}

/// Connects to the database, migrates it and returns the service ready to
/// serve. The gateway connection is lazy, so start order does not matter.
pub async fn grpc_server(config: &ActivationConfig) -> Result<GrpcServer, ActivationError> {
    let db = connect_and_migrate::<store::Migrator>(&config.database).await?;
    let gateway = Upstream::new(&config.gateway_tls, &config.gateway_url)?;
    let store = Arc::new(store::ActivationStore::new(db));
    let syncer = Arc::new(sync::Syncer::new(
        Arc::clone(&store),
        gateway.clone(),
        config.clone(),
    )?);
    let activations_changed = Arc::new(Notify::new());
    let follower = follow::ConsentFollower {
        store: Arc::clone(&store),
        syncer: Arc::clone(&syncer),
        gateway,
        config: config.clone(),
        activations_changed: Arc::clone(&activations_changed),
    };
    let scheduler = schedule::Scheduler {
        store: Arc::clone(&store),
        syncer: Arc::clone(&syncer),
        tick: config.schedule_tick,
    };
    let api = ActivationApi::new(store, syncer, activations_changed);
    Ok(GrpcServer::new()
        .with_tls(config.tls.load()?)
        .add_service(api.into_server())
        .with_task(Box::new(move |shutdown| Box::pin(follower.run(shutdown))))
        .with_task(Box::new(move |shutdown| Box::pin(scheduler.run(shutdown)))))
}
