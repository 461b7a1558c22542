use crate::crossing::KeyError;
use crate::keys::KeyError as TokenKeyError;
use crate::policy::PolicyError;
use crate::token::TokenError;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("policies: {0}")]
    Policy(#[from] PolicyError),
    #[error("token verification: {0}")]
    Token(#[from] TokenError),
    #[error("token keys: {0}")]
    TokenKeys(#[from] TokenKeyError),
    #[error("pseudonymisation: {0}")]
    Key(#[from] KeyError),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("upstream: {0}")]
    Upstream(#[from] madtech_common::upstream::UpstreamError),
    #[error("audit database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Serve(#[from] madtech_common::server::ServeError),
}
