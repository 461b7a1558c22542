use madtech_common::error::{FieldError, internal};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("profile not found")]
    NotFound,
    /// A request names a profile that does not exist; the field is named.
    #[error("{0}: no such profile")]
    UnknownReference(String),
    /// The stored data does not allow the request (e.g. incrementing a
    /// string trait, or only blocked identifiers).
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Rules(#[from] crate::resolution::RulesError),
    #[error("concurrent update, retry")]
    Conflict,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Stopped(#[from] madtech_common::db::WriteThreadStopped),
    #[error("starting the write thread: {0}")]
    WriteThread(std::io::Error),
}

impl From<ProfileError> for Status {
    fn from(err: ProfileError) -> Self {
        match err {
            ProfileError::Invalid(field) => field.into(),
            ProfileError::NotFound => Status::not_found("profile not found"),
            ProfileError::UnknownReference(_) => Status::not_found(err.to_string()),
            ProfileError::Precondition(reason) => Status::failed_precondition(reason),
            ProfileError::Rules(_) => internal("profiles identity rules", &err),
            ProfileError::Conflict => {
                Status::aborted("concurrent update of the same profile, retry")
            }
            ProfileError::Corrupt(_) => internal("profile data is corrupt", &err),
            ProfileError::Tls(_) => internal("profiles transport", &err),
            ProfileError::Database(ref db) => internal("profiles database", db),
            ProfileError::Stopped(_) => Status::unavailable("the profiles service is stopping"),
            ProfileError::WriteThread(_) => internal("profiles write thread", &err),
        }
    }
}
