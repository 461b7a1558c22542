//! The consent service: what each person agreed to, per purpose, kept as an
//! append-only [`ledger`] whose entries are never changed in place. The
//! current state per purpose is derived from it, and every entry is streamed
//! to watchers (the gateway's cache, activation) in ledger order. It also
//! owns data-subject requests ([`privacy`]), carried out across the suite
//! through the gateway.

pub mod config;
pub mod derive;
pub mod error;
mod follow;
pub mod ledger;
pub mod privacy;
pub mod rules;
pub mod service;

pub use config::ConsentConfig;
pub use error::ConsentError;
pub use service::ConsentApi;

use std::sync::Arc;

use madtech_common::db::connect_and_migrate;
use madtech_common::server::GrpcServer;
use madtech_common::upstream::Upstream;
use madtech_proto::profiles::v1::profile_service_client::ProfileServiceClient;

/// Connects to the database, migrates it and returns the service ready to
/// serve.
pub async fn grpc_server(config: &ConsentConfig) -> Result<GrpcServer, ConsentError> {
    let db = connect_and_migrate::<ledger::Migrator>(&config.database).await?;
    let rules = Arc::new(rules::ConsentRules::load(&config.policy_dir).await?);
    let ledger = Arc::new(ledger::Ledger::new(db.clone()));
    let profiles =
        ProfileServiceClient::new(Upstream::new(&config.profiles_tls, &config.profiles_url)?);
    let requests = Arc::new(privacy::store::RequestStore::new(db));
    let worker = Arc::new(privacy::worker::Worker::new(
        Arc::clone(&requests),
        Arc::clone(&ledger),
        Arc::clone(&rules),
        Upstream::new(&config.gateway_tls, &config.gateway_url)?,
        config.gateway_token_file.clone(),
        config.privacy_retry_interval,
    ));
    let api = ConsentApi::new(
        Arc::clone(&ledger),
        Arc::clone(&rules),
        profiles.clone(),
        config.clone(),
    );
    let privacy_api = privacy::service::PrivacyApi::new(requests, Arc::clone(&worker), rules);
    Ok(GrpcServer::new()
        .with_tls(config.tls.load()?)
        .add_service(api.into_server())
        .add_service(privacy_api.into_server())
        .with_task(Box::new(move |shutdown| {
            Box::pin(follow::follow(ledger, profiles, shutdown))
        }))
        .with_task(Box::new(move |shutdown| Box::pin(worker.run(shutdown)))))
}
