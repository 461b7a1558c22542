use madtech_common::error::{FieldError, internal};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<ConsentError> for Status {
    fn from(err: ConsentError) -> Self {
        match err {
            ConsentError::Invalid(field) => field.into(),
            ConsentError::Corrupt(_) => internal("consent data is corrupt", &err),
            ConsentError::Tls(_) => internal("consent transport", &err),
            ConsentError::Database(ref db) => internal("consent database", db),
        }
    }
}
