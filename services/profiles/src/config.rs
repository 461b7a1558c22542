use std::net::SocketAddr;

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
}

impl Default for ProfilesConfig {
    fn default() -> Self {
        ProfilesConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            tls: ServerTls::default(),
            database: DatabaseConfig::default(),
            default_phone_region: "US".into(),
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
        Ok(())
    }
}
