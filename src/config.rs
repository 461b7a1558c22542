//! The configuration of the whole `madtech` binary: one section per
//! component (each the component's own typed struct), plus what the process
//! itself needs. Loaded from defaults, an optional TOML file, `MADTECH_*`
//! variables (`MADTECH_GATEWAY__LISTEN=0.0.0.0:50051`) and flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use madtech_activation::ActivationConfig;
use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use madtech_common::telemetry::TelemetryConfig;
use madtech_common::tls::ServerTls;
use madtech_consent::ConsentConfig;
use madtech_gateway::GatewayConfig;
use madtech_profiles::ProfilesConfig;
use madtech_segments::SegmentsConfig;
use serde::{Deserialize, Serialize};

/// File names `madtech up` keeps in its data directory.
pub const PSEUDONYM_KEY: &str = "pseudonym.key";
pub const ACTIVATION_TOKEN: &str = "activation.token";
pub const CONSENT_TOKEN: &str = "consent.token";
pub const DESTINATIONS_DIR: &str = "destinations";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MadtechConfig {
    /// Where `madtech up` keeps its SQLite files, keys and file destinations.
    pub data_dir: PathBuf,
    pub telemetry: TelemetryConfig,
    /// Prometheus `/metrics` address; none disables it.
    pub metrics_listen: Option<SocketAddr>,
    pub gateway: GatewayConfig,
    pub profiles: ProfilesConfig,
    pub consent: ConsentConfig,
    pub segments: SegmentsConfig,
    pub activation: ActivationConfig,
}

impl Default for MadtechConfig {
    fn default() -> Self {
        MadtechConfig {
            data_dir: PathBuf::from("data"),
            telemetry: TelemetryConfig::default(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            gateway: GatewayConfig::default(),
            profiles: ProfilesConfig::default(),
            consent: ConsentConfig::default(),
            segments: SegmentsConfig::default(),
            activation: ActivationConfig::default(),
        }
    }
}

/// Components validate themselves when they start, after `madtech up` has
/// filled in its development defaults; here only what is shared.
impl Validate for MadtechConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir must not be empty".into()));
        }
        Ok(())
    }
}

impl MadtechConfig {
    /// Fills what `madtech up` derives from the data directory and the listen
    /// addresses: SQLite databases, development keys, the activation service's
    /// token, and the URLs by which components reach each other. Anything set
    /// explicitly is kept.
    pub fn with_suite_defaults(mut self) -> Self {
        let dir = self.data_dir.clone();
        let sqlite = |db: &mut DatabaseConfig, name: &str| {
            if db.is_unset() {
                *db = DatabaseConfig::sqlite(&dir.join(format!("{name}.db")));
            }
        };
        sqlite(&mut self.profiles.database, "profiles");
        sqlite(&mut self.consent.database, "consent");
        sqlite(&mut self.segments.database, "segments");
        sqlite(&mut self.activation.database, "activation");
        sqlite(&mut self.gateway.audit_database, "gateway-audit");

        let set_path = |path: &mut PathBuf, name: &str| {
            if path.as_os_str().is_empty() {
                *path = dir.join(name);
            }
        };
        set_path(
            &mut self.gateway.auth.public_key_file,
            madtech_gateway::token::DEV_PUBLIC_KEY,
        );
        set_path(&mut self.gateway.pseudonym_key_file, PSEUDONYM_KEY);
        set_path(&mut self.activation.gateway_token_file, ACTIVATION_TOKEN);
        set_path(&mut self.consent.gateway_token_file, CONSENT_TOKEN);
        if self.activation.file_root == ActivationConfig::default().file_root {
            self.activation.file_root = dir.join(DESTINATIONS_DIR);
        }

        // A component that serves TLS is reached over https.
        let url = |addr: SocketAddr, tls: &ServerTls| {
            let scheme = if tls.cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{addr}")
        };
        self.gateway.upstreams.profiles = url(self.profiles.listen, &self.profiles.tls);
        self.gateway.upstreams.consent = url(self.consent.listen, &self.consent.tls);
        self.gateway.upstreams.segments = url(self.segments.listen, &self.segments.tls);
        self.gateway.upstreams.activation = url(self.activation.listen, &self.activation.tls);
        self.segments.profiles_url = url(self.profiles.listen, &self.profiles.tls);
        self.consent.profiles_url = url(self.profiles.listen, &self.profiles.tls);
        self.activation.gateway_url = url(self.gateway.listen, &self.gateway.tls);
        self.consent.gateway_url = url(self.gateway.listen, &self.gateway.tls);
        self
    }

    /// The development signing key `madtech up` creates.
    pub fn dev_signing_key(&self) -> PathBuf {
        self.data_dir.join(madtech_gateway::token::DEV_PRIVATE_KEY)
    }

    pub fn validate_components(&self) -> Result<(), ConfigError> {
        self.gateway.validate()?;
        self.profiles.validate()?;
        self.consent.validate()?;
        self.segments.validate()?;
        self.activation.validate()
    }
}
