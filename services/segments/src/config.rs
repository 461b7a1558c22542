use std::net::SocketAddr;

use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use serde::{Deserialize, Serialize};

/// Everything the segments service needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    pub database: DatabaseConfig,
    /// The profiles service, e.g. `http://127.0.0.1:50052`.
    pub profiles_url: String,
    /// Members per `ExportAudience` message (and profiles read per page).
    pub export_chunk_size: u32,
}

impl Default for SegmentsConfig {
    fn default() -> Self {
        SegmentsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50054)),
            database: DatabaseConfig::default(),
            profiles_url: "http://127.0.0.1:50052".into(),
            export_chunk_size: 1000,
        }
    }
}

impl Validate for SegmentsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate("segments")?;
        if !(self.profiles_url.starts_with("http://") || self.profiles_url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(
                "segments.profiles_url must be an http:// or https:// URL".into(),
            ));
        }
        if !(1..=10_000).contains(&self.export_chunk_size) {
            return Err(ConfigError::Invalid(
                "segments.export_chunk_size must be 1 to 10000".into(),
            ));
        }
        Ok(())
    }
}
