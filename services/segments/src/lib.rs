//! The segments service: audiences defined by [`rules`] over what the
//! profiles service knows, and their export, the stream the gateway filters
//! when it crosses into the adtech zone.
//!
//! It keeps its own projection of what rules need, fed by the profiles
//! service's change stream ([`follow`]); it never reads another service's
//! database. Rules compile to SQL over the projection (`store::sql`).

pub mod config;
pub mod convert;
pub mod error;
pub mod evaluate;
pub mod follow;
pub mod rules;
pub mod service;
pub mod store;

pub use config::SegmentsConfig;
pub use error::SegmentError;
pub use service::SegmentApi;

use std::sync::Arc;

use madtech_common::db::connect_and_migrate;
use madtech_common::server::GrpcServer;
use madtech_common::upstream::Upstream;
use madtech_proto::profiles::v1::profile_service_client::ProfileServiceClient;

/// Connects to the database, migrates it and returns the service ready to
/// serve. The profiles connection is lazy, so start order does not matter.
pub async fn grpc_server(config: &SegmentsConfig) -> Result<GrpcServer, SegmentError> {
    let db = connect_and_migrate::<store::Migrator>(&config.database).await?;
    let profiles =
        ProfileServiceClient::new(Upstream::new(&config.profiles_tls, &config.profiles_url)?);
    let writes = store::WriteLock::default();
    let projection = Arc::new(
        store::projection::Projection::new(db.clone(), Arc::clone(&writes))
            .with_birth_date_trait(&config.birth_date_trait),
    );
    let built = projection.prepare_export_docs().await?;
    if built > 0 {
        tracing::info!(people = built, "built export documents");
    }
    let memberships = Arc::new(store::membership::Memberships::new(db.clone(), writes));
    let store = Arc::new(store::SegmentStore::new(db));
    let evaluator =
        evaluate::Evaluator::new(Arc::clone(&store), Arc::clone(&projection), memberships);
    let api = SegmentApi::new(
        store,
        Arc::clone(&projection),
        evaluator.clone(),
        profiles.clone(),
        config.clone(),
    );
    let scheduled = evaluator.clone();
    let interval = config.reevaluate_interval;
    Ok(GrpcServer::new()
        .with_tls(config.tls.load()?)
        .add_service(api.into_server())
        .with_task(Box::new(move |shutdown| {
            Box::pin(follow::follow(projection, evaluator, profiles, shutdown))
        }))
        .with_task(Box::new(move |shutdown| {
            Box::pin(scheduled.run_schedule(interval, shutdown))
        })))
}
