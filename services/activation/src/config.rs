use std::net::SocketAddr;
use std::path::PathBuf;

use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use madtech_common::tls::{ClientTls, ServerTls};
use serde::{Deserialize, Serialize};

use crate::destination::RetryPolicy;

/// Everything the activation service needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivationConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// TLS for this service's gRPC server (mutual TLS with a client CA).
    pub tls: ServerTls,
    pub database: DatabaseConfig,
    /// The gateway, the only way to an audience, e.g. `http://127.0.0.1:50051`.
    pub gateway_url: String,
    /// TLS towards the gateway (for `https://` URLs).
    pub gateway_tls: ClientTls,
    /// A file holding this service's bearer token for the gateway (role
    /// `activation`). Read before every sync, so a rotated token is picked up.
    pub gateway_token_file: PathBuf,
    /// File destinations write below this directory and nowhere else.
    pub file_root: PathBuf,
    /// How requests to ad platforms and webhooks are retried.
    pub retry: RetryPolicy,
    /// How often activations' sync schedules are checked, and removals a
    /// destination did not take after a consent withdrawal are tried again.
    #[serde(with = "humantime_serde")]
    pub schedule_tick: std::time::Duration,
    /// Longest time between full syncs of an activation: a sync in between
    /// applies only the audience's membership changes. A full sync also
    /// applies what changes no membership: consent that ended by expiry or
    /// returned, and identifiers that changed.
    #[serde(with = "humantime_serde")]
    pub full_sync_every: std::time::Duration,
}

impl Default for ActivationConfig {
    fn default() -> Self {
        ActivationConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50055)),
            tls: ServerTls::default(),
            database: DatabaseConfig::default(),
            gateway_url: "http://127.0.0.1:50051".into(),
            gateway_tls: ClientTls::default(),
            gateway_token_file: PathBuf::new(),
            file_root: PathBuf::from("destinations"),
            retry: RetryPolicy::default(),
            schedule_tick: std::time::Duration::from_secs(10),
            full_sync_every: std::time::Duration::from_secs(24 * 3600),
        }
    }
}

impl Validate for ActivationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate("activation")?;
        self.tls.validate("activation")?;
        self.gateway_tls.validate("activation.gateway_tls")?;
        self.gateway_tls.validate_url(
            "activation.gateway_tls",
            "activation.gateway_url",
            &self.gateway_url,
        )?;
        if self.gateway_token_file.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "activation.gateway_token_file is required".into(),
            ));
        }
        if self.file_root.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "activation.file_root is required".into(),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "activation.retry.max_attempts must be at least 1".into(),
            ));
        }
        if self.full_sync_every.is_zero() {
            return Err(ConfigError::Invalid(
                "activation.full_sync_every must be above zero".into(),
            ));
        }
        if self.schedule_tick.is_zero() {
            return Err(ConfigError::Invalid(
                "activation.schedule_tick must be above zero".into(),
            ));
        }
        if self.retry.request_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "activation.retry.request_timeout must be above zero".into(),
            ));
        }
        Ok(())
    }
}
