use madtech_common::error::{FieldError, internal};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{purpose}: the person said no; under rule {rule:?} they may not be asked again until {}", rfc3339(*until_micros))]
    ReaskTooSoon {
        purpose: String,
        rule: String,
        until_micros: i64,
    },
    #[error("{0}")]
    Policy(#[from] crate::rules::RulesError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("profiles service: {0}")]
    Profiles(tonic::Status),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("upstream: {0}")]
    Upstream(#[from] madtech_common::upstream::UpstreamError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<ConsentError> for Status {
    fn from(err: ConsentError) -> Self {
        match err {
            ConsentError::Invalid(field) => field.into(),
            ConsentError::ReaskTooSoon { .. } => Status::failed_precondition(err.to_string()),
            ConsentError::Policy(_) => internal("consent policy", &err),
            ConsentError::Corrupt(_) => internal("consent data is corrupt", &err),
            ConsentError::Profiles(_) => internal("consent following profiles", &err),
            ConsentError::Tls(_) | ConsentError::Upstream(_) => internal("consent transport", &err),
            ConsentError::Database(ref db) => internal("consent database", db),
        }
    }
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map_or_else(|| micros.to_string(), |at| at.to_rfc3339())
}
