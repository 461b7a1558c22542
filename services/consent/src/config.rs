use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use madtech_common::tls::{ClientTls, ServerTls};
use serde::{Deserialize, Serialize};

/// Everything the consent service needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsentConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// TLS for this service's gRPC server (mutual TLS with a client CA).
    pub tls: ServerTls,
    pub database: DatabaseConfig,
    /// How often a watcher looks for entries written by another replica
    /// (entries written by this process wake watchers at once).
    /// Written like `1s` or `250ms`.
    #[serde(with = "humantime_serde")]
    pub watch_poll_interval: Duration,
    /// The directory holding `consent.toml` (the purpose catalogue and the
    /// consent rules) and the consent policy whose `g2` rows map regions to
    /// regimes.
    pub policy_dir: PathBuf,
    /// Accept TC strings that break TCF 2.2's rules (policy version below 4,
    /// global scope, legitimate interest for purposes 3 to 6). Off by
    /// default: such strings are refused with INVALID_ARGUMENT. Turn it on
    /// only to import consent collected before TCF 2.2 (November 2023).
    pub accept_pre_tcf22_strings: bool,
    /// The profiles service, whose change stream tells consent about merges
    /// (e.g. `http://127.0.0.1:50052`).
    pub profiles_url: String,
    /// TLS towards the profiles service (for `https://` URLs).
    pub profiles_tls: ClientTls,
    /// The gateway, through which data-subject requests reach every
    /// service, e.g. `http://127.0.0.1:50051`.
    pub gateway_url: String,
    /// TLS towards the gateway (for `https://` URLs).
    pub gateway_tls: ClientTls,
    /// A file holding this service's bearer token for the gateway (role
    /// `compliance`). Read before every step, so a rotated token is used.
    pub gateway_token_file: PathBuf,
    /// How often open data-subject requests are looked at (a submitted
    /// request starts at once). Written like `2s`.
    #[serde(with = "humantime_serde")]
    pub privacy_retry_interval: Duration,
}

impl Default for ConsentConfig {
    fn default() -> Self {
        ConsentConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
            tls: ServerTls::default(),
            database: DatabaseConfig::default(),
            watch_poll_interval: Duration::from_secs(1),
            policy_dir: PathBuf::from("policies"),
            accept_pre_tcf22_strings: false,
            profiles_url: "http://127.0.0.1:50052".into(),
            profiles_tls: ClientTls::default(),
            gateway_url: "http://127.0.0.1:50051".into(),
            gateway_tls: ClientTls::default(),
            gateway_token_file: PathBuf::new(),
            privacy_retry_interval: Duration::from_secs(2),
        }
    }
}

impl Validate for ConsentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate("consent")?;
        self.tls.validate("consent")?;
        self.profiles_tls.validate("consent.profiles_tls")?;
        self.gateway_tls.validate("consent.gateway_tls")?;
        self.profiles_tls.validate_url(
            "consent.profiles_tls",
            "consent.profiles_url",
            &self.profiles_url,
        )?;
        self.gateway_tls.validate_url(
            "consent.gateway_tls",
            "consent.gateway_url",
            &self.gateway_url,
        )?;
        if self.gateway_token_file.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "consent.gateway_token_file is required (a token with the compliance role)".into(),
            ));
        }
        if self.privacy_retry_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "consent.privacy_retry_interval must be positive".into(),
            ));
        }
        if self.policy_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "consent.policy_dir must name the policy directory".into(),
            ));
        }
        if self.watch_poll_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "consent.watch_poll_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}
