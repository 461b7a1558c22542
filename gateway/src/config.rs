use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use madtech_common::config::{ConfigError, Validate};
use madtech_common::db::DatabaseConfig;
use madtech_common::tls::{ClientTls, ServerTls};
use serde::{Deserialize, Serialize};

/// Everything the gateway needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC address callers use.
    pub listen: SocketAddr,
    /// TLS for callers.
    pub tls: ServerTls,
    /// TLS (or mutual TLS, with a client certificate) towards the services,
    /// for `https://` upstream URLs.
    pub upstream_tls: ClientTls,
    pub upstreams: Upstreams,
    /// How often each upstream's name is resolved again: the gateway keeps
    /// a connection to every address (every pod, behind a headless
    /// Service) and spreads calls over them. IP addresses are not resolved.
    #[serde(with = "humantime_serde")]
    pub upstream_resolve_interval: Duration,
    /// The directory holding the casbin policy files.
    pub policy_dir: PathBuf,
    /// How often the policy directory is checked for a new set.
    #[serde(with = "humantime_serde")]
    pub policy_reload_interval: Duration,
    pub auth: AuthConfig,
    /// Where the audit trail of crossings is kept.
    pub audit_database: DatabaseConfig,
    /// A file with the hex-encoded key (at least 32 bytes) that derives
    /// pseudonymous ids; keep it secret and stable, or every destination sees
    /// new ids.
    pub pseudonym_key_file: PathBuf,
    /// The longest a call may wait for its response to start.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Calls handled at once; more are refused with UNAVAILABLE at once
    /// rather than queued.
    pub max_concurrent_requests: usize,
    /// The largest gRPC message a caller may send (each message of a stream
    /// counts alone); larger ones are refused with RESOURCE_EXHAUSTED.
    pub max_request_message_bytes: usize,
    /// Require a token for the reflection service too.
    pub reflection_requires_token: bool,
    /// The gateway's consent view, fed by the consent change stream.
    pub consent_view: crate::consent_view::ConsentViewConfig,
    /// Calls per second per caller role on each gateway replica, e.g.
    /// `{ marketer = 50 }`; roles not named are not limited.
    pub rate_limits: std::collections::BTreeMap<String, u32>,
    /// Pages of one audience export filtered at once, each on its own task
    /// (they are sent in their order all the same); 0, the default, is one
    /// per core the gateway may use.
    pub crossing_workers: usize,
}

/// Where each service listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstreams {
    pub profiles: String,
    pub consent: String,
    pub segments: String,
    pub activation: String,
}

/// How bearer tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// An Ed25519 public key (SPKI PEM) that verifies EdDSA tokens.
    pub public_key_file: PathBuf,
    /// More public keys (PEM), each pinned to its algorithms.
    pub keys: Vec<crate::keys::KeyFile>,
    /// The issuer's JWKS document, fetched at start and refreshed.
    pub jwks: Option<crate::keys::JwksConfig>,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            tls: ServerTls::default(),
            upstream_tls: ClientTls::default(),
            upstreams: Upstreams::default(),
            upstream_resolve_interval: madtech_common::upstream::DEFAULT_RESOLVE_INTERVAL,
            policy_dir: PathBuf::from("policies"),
            policy_reload_interval: Duration::from_secs(2),
            auth: AuthConfig::default(),
            audit_database: DatabaseConfig::default(),
            pseudonym_key_file: PathBuf::new(),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            reflection_requires_token: false,
            max_request_message_bytes: 4 * 1024 * 1024,
            rate_limits: Default::default(),
            consent_view: Default::default(),
            crossing_workers: 0,
        }
    }
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams {
            profiles: "http://127.0.0.1:50052".into(),
            consent: "http://127.0.0.1:50053".into(),
            segments: "http://127.0.0.1:50054".into(),
            activation: "http://127.0.0.1:50055".into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            public_key_file: PathBuf::new(),
            keys: Vec::new(),
            jwks: None,
            issuer: "madtech-dev".into(),
            audience: "madtech".into(),
            leeway: Duration::from_secs(30),
        }
    }
}

impl GatewayConfig {
    /// The most a crossing's pages may be spread over.
    pub const MAX_CROSSING_WORKERS: usize = 64;

    /// How many pages of one export are filtered at once.
    pub fn crossing_workers(&self) -> usize {
        match self.crossing_workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            workers => workers,
        }
        .min(Self::MAX_CROSSING_WORKERS)
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.audit_database.validate("gateway.audit_database")?;
        self.tls.validate("gateway")?;
        self.upstream_tls.validate("gateway.upstream_tls")?;
        let urls = [
            ("profiles", &self.upstreams.profiles),
            ("consent", &self.upstreams.consent),
            ("segments", &self.upstreams.segments),
            ("activation", &self.upstreams.activation),
        ];
        for (name, url) in urls {
            self.upstream_tls.validate_url(
                "gateway.upstream_tls",
                &format!("gateway.upstreams.{name}"),
                url,
            )?;
        }
        if self.upstream_resolve_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "gateway.upstream_resolve_interval must be positive".into(),
            ));
        }
        let required = [
            ("gateway.policy_dir", &self.policy_dir),
            ("gateway.pseudonym_key_file", &self.pseudonym_key_file),
        ];
        for (name, path) in required {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(format!("{name} is required")));
            }
        }
        if self.auth.public_key_file.as_os_str().is_empty()
            && self.auth.keys.is_empty()
            && self.auth.jwks.is_none()
        {
            return Err(ConfigError::Invalid(
                "gateway.auth needs public_key_file, keys or jwks to verify tokens".into(),
            ));
        }
        for (i, key) in self.auth.keys.iter().enumerate() {
            if key.algorithms.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "gateway.auth.keys[{i}].algorithms must name the key's algorithms"
                )));
            }
            for name in &key.algorithms {
                crate::keys::signature_algorithm(name).map_err(|err| {
                    ConfigError::Invalid(format!("gateway.auth.keys[{i}]: {err}"))
                })?;
            }
        }
        if let Some(jwks) = &self.auth.jwks {
            if jwks.source.is_empty() || jwks.refresh.is_zero() {
                return Err(ConfigError::Invalid(
                    "gateway.auth.jwks needs a source and a positive refresh".into(),
                ));
            }
            for name in &jwks.algorithms {
                crate::keys::signature_algorithm(name)
                    .map_err(|err| ConfigError::Invalid(format!("gateway.auth.jwks: {err}")))?;
            }
        }
        if let Some((role, _)) = self.rate_limits.iter().find(|(_, rate)| **rate == 0) {
            return Err(ConfigError::Invalid(format!(
                "gateway.rate_limits.{role} must be at least 1 call per second"
            )));
        }
        if self.crossing_workers > Self::MAX_CROSSING_WORKERS {
            return Err(ConfigError::Invalid(format!(
                "gateway.crossing_workers must be at most {}",
                Self::MAX_CROSSING_WORKERS
            )));
        }
        if self.auth.issuer.is_empty() || self.auth.audience.is_empty() {
            return Err(ConfigError::Invalid(
                "gateway.auth.issuer and gateway.auth.audience are required".into(),
            ));
        }
        if self.request_timeout.is_zero()
            || self.max_concurrent_requests == 0
            || self.max_request_message_bytes == 0
            || self.policy_reload_interval.is_zero()
        {
            return Err(ConfigError::Invalid(
                "gateway.request_timeout, max_concurrent_requests, max_request_message_bytes and policy_reload_interval must be positive"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> GatewayConfig {
        GatewayConfig {
            pseudonym_key_file: "pseudonym.key".into(),
            audit_database: DatabaseConfig {
                url: "sqlite://audit.db?mode=rwc".into(),
                ..DatabaseConfig::default()
            },
            auth: AuthConfig {
                public_key_file: "jwt.pem".into(),
                ..AuthConfig::default()
            },
            ..GatewayConfig::default()
        }
    }

    #[test]
    fn upstreams_are_resolved_again_at_a_positive_interval() {
        let mut config = valid();
        assert_eq!(config.upstream_resolve_interval, Duration::from_secs(5));
        config.upstream_resolve_interval = Duration::ZERO;
        let refused = config.validate().expect_err("never resolved again");
        assert!(
            refused
                .to_string()
                .contains("gateway.upstream_resolve_interval"),
            "{refused}"
        );
    }

    #[test]
    fn crossing_workers_default_to_the_cores_and_are_bounded() {
        let mut config = valid();
        config.validate().expect("a valid config");
        assert!(config.crossing_workers() >= 1, "0 means one per core");
        config.crossing_workers = 3;
        assert_eq!(config.crossing_workers(), 3);
        config.crossing_workers = GatewayConfig::MAX_CROSSING_WORKERS + 1;
        let refused = config.validate().expect_err("too many workers");
        assert!(
            refused.to_string().contains("gateway.crossing_workers"),
            "{refused}"
        );
    }
}
