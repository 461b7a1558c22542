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
use tokio::sync::Notify;

/// Connects to the database, migrates it and returns the service ready to
/// serve. The gateway connection is lazy, so start order does not matter.
pub async fn grpc_server(config: &ActivationConfig) -> Result<GrpcServer, ActivationError> {
    let db = connect_and_migrate::<store::Migrator>(&config.database).await?;
    let gateway = config
        .gateway_tls
        .endpoint(&config.gateway_url)?
        .connect_lazy();
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
