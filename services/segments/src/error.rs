use madtech_common::error::{FieldError, internal};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("segment not found")]
    NotFound,
    #[error("a segment named {0:?} already exists")]
    NameTaken(String),
    #[error("profiles service: {0}")]
    Profiles(Status),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("upstream: {0}")]
    Upstream(#[from] madtech_common::upstream::UpstreamError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<SegmentError> for Status {
    fn from(err: SegmentError) -> Self {
        match err {
            SegmentError::Invalid(field) => field.into(),
            SegmentError::NotFound => Status::not_found("segment not found"),
            SegmentError::NameTaken(_) => Status::already_exists(err.to_string()),
            SegmentError::Profiles(ref status) => {
                tracing::warn!(code = ?status.code(), "profiles service failed during export");
                Status::unavailable("the profiles service is unavailable")
            }
            SegmentError::Corrupt(_) | SegmentError::Tls(_) | SegmentError::Upstream(_) => {
                internal("segments", &err)
            }
            SegmentError::Database(ref db) => internal("segments database", db),
        }
    }
}
