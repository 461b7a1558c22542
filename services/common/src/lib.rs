//! Plumbing that every MadTech component shares and nothing else: typed
//! configuration loading, database connection and migration, the gRPC server
//! bootstrap (health, reflection, graceful shutdown), metrics, logging, and the
//! error helpers that turn failures into `tonic::Status` at the edge.
//!
//! Domain logic never lives here; it stays in its service crate.

pub mod bearer;
pub mod changelog;
pub mod config;
pub mod db;
pub mod digest;
pub mod error;
pub mod hashing;
pub mod server;
pub mod sql;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod validate;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use tokio_util::sync::CancellationToken;
