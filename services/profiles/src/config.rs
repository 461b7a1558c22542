use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use madtech_common::tls::ServerTls;
use serde::{Deserialize, Serialize};

/// Everything the profiles service needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilesConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// TLS for this service's gRPC server (mutual TLS with a client CA).
    pub tls: ServerTls,
    pub database: DatabaseConfig,
    /// Region (ISO 3166-1 alpha-2) assumed for phone numbers written without
    /// a country code.
    pub default_phone_region: String,
    /// The identity resolution rules (limits, priorities, blocked values,
    /// custom identifier kinds); see `policies/identity.toml`.
    pub identity_rules: PathBuf,
    /// How often a change watcher looks for changes written by another
    /// replica (this process's writes wake watchers at once). Written like
    /// `1s` or `250ms`.
    #[serde(with = "humantime_serde")]
    pub watch_poll_interval: Duration,
}

impl Default for ProfilesConfig {
    fn default() -> Self {
        ProfilesConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            tls: ServerTls::default(),
            database: DatabaseConfig::default(),
            default_phone_region: "US".into(),
            identity_rules: PathBuf::from("policies/identity.toml"),
            watch_poll_interval: Duration::from_secs(1),
        }
    }
}

impl Validate for ProfilesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate("profiles")?;
        self.tls.validate("profiles")?;
        if self
            .default_phone_region
            .parse::<phonenumber::country::Id>()
            .is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "profiles.default_phone_region {:?} is not an ISO 3166-1 alpha-2 code",
                self.default_phone_region
            )));
        }
        if self.identity_rules.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "profiles.identity_rules must name the identity rules file".into(),
            ));
        }
        if self.watch_poll_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "profiles.watch_poll_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}
