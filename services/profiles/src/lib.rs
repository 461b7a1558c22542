//! The profiles service: people and what we know of them. Identifiers are
//! normalised on the way in ([`identity`]), identifiers seen together resolve
//! to one person ([`store`]), and the gRPC layer ([`service`]) only translates
//! protobuf to these domain types.
//!
//! Raw personal data lives here, in the martech zone; it reaches the adtech
//! zone only through the gateway, hashed.

pub mod config;
pub mod convert;
pub mod error;
pub mod identity;
pub mod resolution;
pub mod service;
pub mod store;
pub mod traits;

pub use config::ProfilesConfig;
pub use error::ProfileError;
pub use service::ProfileApi;

use madtech_common::db::{connect_and_migrate, writer_for};
use madtech_common::server::GrpcServer;

/// Connects to the database, migrates it and returns the service ready to
/// serve.
pub async fn grpc_server(config: &ProfilesConfig) -> Result<GrpcServer, ProfileError> {
    let rules =
        resolution::IdentityRules::load(&config.identity_rules, &config.default_phone_region)?;
    let normaliser = identity::Normaliser::new(&config.default_phone_region)?
        .with_custom_kinds(rules.custom_kinds());
    let db = connect_and_migrate::<store::Migrator>(&config.database).await?;
    let writer_db = writer_for(&config.database, &db).await?;
    let api = ProfileApi::new(
        store::ProfileStore::new(db, writer_db, rules)?,
        normaliser,
        config.watch_poll_interval,
    );
    Ok(GrpcServer::new()
        .with_tls(config.tls.load()?)
        .add_service(api.into_server()))
}
