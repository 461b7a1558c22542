use madtech_common::error::{FieldError, internal};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("profile not found")]
    NotFound,
    #[error("concurrent update, retry")]
    Conflict,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<ProfileError> for Status {
    fn from(err: ProfileError) -> Self {
        match err {
            ProfileError::Invalid(field) => field.into(),
            ProfileError::NotFound => Status::not_found("profile not found"),
            ProfileError::Conflict => {
                Status::aborted("concurrent update of the same profile, retry")
            }
            ProfileError::Corrupt(_) => internal("profile data is corrupt", &err),
            ProfileError::Tls(_) => internal("profiles transport", &err),
            ProfileError::Database(ref db) => internal("profiles database", db),
        }
    }
}
