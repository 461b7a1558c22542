use std::net::SocketAddr;

use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use madtech_common::tls::{ClientTls, ServerTls};
use serde::{Deserialize, Serialize};

/// Everything the segments service needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// TLS for this service's gRPC server (mutual TLS with a client CA).
    pub tls: ServerTls,
    pub database: DatabaseConfig,
    /// The profiles service, e.g. `http://127.0.0.1:50052`.
    pub profiles_url: String,
    /// TLS towards the profiles service (for `https://` URLs).
    pub profiles_tls: ClientTls,
    /// Members per `ExportAudience` message (and profiles read per page).
    pub export_chunk_size: u32,
    /// How long an export waits for the projection to catch up with the
    /// profiles service before answering UNAVAILABLE. Written like `5s`.
    #[serde(with = "humantime_serde")]
    pub projection_freshness_timeout: std::time::Duration,
    /// How often a membership watcher looks for changes another replica
    /// wrote (this process's wake watchers at once). Written like `1s`.
    #[serde(with = "humantime_serde")]
    pub watch_poll_interval: std::time::Duration,
    /// How often segments whose rules look back over a window (`last 30d`)
    /// are recomputed, so people leave them as their events age out.
    #[serde(with = "humantime_serde")]
    pub reevaluate_interval: std::time::Duration,
    /// The trait holding a person's birth date (`YYYY-MM-DD` text or a
    /// timestamp), exported to the gateway for the consent policy's age
    /// bands.
    pub birth_date_trait: String,
}

impl Default for SegmentsConfig {
    fn default() -> Self {
        SegmentsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50054)),
            tls: ServerTls::default(),
            database: DatabaseConfig::default(),
            profiles_url: "http://127.0.0.1:50052".into(),
            profiles_tls: ClientTls::default(),
            export_chunk_size: 1000,
            projection_freshness_timeout: std::time::Duration::from_secs(5),
            watch_poll_interval: std::time::Duration::from_secs(1),
            reevaluate_interval: std::time::Duration::from_secs(3600),
            birth_date_trait: "birthdate".into(),
        }
    }
}

impl Validate for SegmentsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate("segments")?;
        self.tls.validate("segments")?;
        self.profiles_tls.validate("segments.profiles_tls")?;
        self.profiles_tls.validate_url(
            "segments.profiles_tls",
            "segments.profiles_url",
            &self.profiles_url,
        )?;
        if self.birth_date_trait.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "segments.birth_date_trait must name a trait".into(),
            ));
        }
        if !(1..=10_000).contains(&self.export_chunk_size) {
            return Err(ConfigError::Invalid(
                "segments.export_chunk_size must be 1 to 10000".into(),
            ));
        }
        if self.watch_poll_interval.is_zero()
            || self.projection_freshness_timeout.is_zero()
            || self.reevaluate_interval.is_zero()
        {
            return Err(ConfigError::Invalid(
                "segments.watch_poll_interval, projection_freshness_timeout and reevaluate_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}
