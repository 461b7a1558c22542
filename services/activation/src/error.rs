use madtech_common::error::{FieldError, internal};
use tonic::Status;

use crate::destination::DeliveryError;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("a destination named {0:?} already exists")]
    NameTaken(String),
    #[error("a sync of this activation is already running")]
    SyncRunning,
    #[error("the gateway refused the audience: {message}")]
    Gateway { code: tonic::Code, message: String },
    #[error("cannot read the gateway token: {0}")]
    Token(String),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("the destination refused {refused} of {batches} batches; the first: {first}")]
    BatchesRefused {
        refused: u64,
        batches: u64,
        first: String,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("tls: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("upstream: {0}")]
    Upstream(#[from] madtech_common::upstream::UpstreamError),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
}

impl From<ActivationError> for Status {
    fn from(err: ActivationError) -> Self {
        err.to_status()
    }
}

impl ActivationError {
    /// The gateway refused or failed a call, keeping its code.
    pub fn gateway(status: tonic::Status) -> Self {
        ActivationError::Gateway {
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The status callers get; internal detail is logged, not returned.
    pub fn to_status(&self) -> Status {
        let err = self;
        match self {
            ActivationError::Invalid(field) => field.clone().into(),
            ActivationError::NotFound(_) => Status::not_found(err.to_string()),
            ActivationError::NameTaken(_) => Status::already_exists(err.to_string()),
            ActivationError::SyncRunning => Status::failed_precondition(err.to_string()),
            // What the caller can act on keeps its meaning; anything else
            // is the gateway being unreachable or failing, worth a retry.
            ActivationError::Gateway { code, .. } => match *code {
                tonic::Code::NotFound
                | tonic::Code::InvalidArgument
                | tonic::Code::PermissionDenied
                | tonic::Code::FailedPrecondition => Status::new(*code, err.to_string()),
                // The service's own token was refused: not the caller's
                // doing, and no retry helps until the token is replaced.
                tonic::Code::Unauthenticated => Status::failed_precondition(err.to_string()),
                // The gateway failed closed on something it should never
                // see; nothing to retry either.
                tonic::Code::Internal => internal("the gateway", err),
                _ => Status::unavailable(err.to_string()),
            },
            // The destination's own answer: fix the destination (its
            // audience, its credential) before running again.
            ActivationError::BatchesRefused { .. }
            | ActivationError::Delivery(DeliveryError::Refused { .. })
            | ActivationError::Delivery(DeliveryError::Credential(_)) => {
                Status::failed_precondition(err.to_string())
            }
            ActivationError::Delivery(DeliveryError::Unavailable { .. }) => {
                Status::unavailable(err.to_string())
            }
            ActivationError::Token(_)
            | ActivationError::Delivery(_)
            | ActivationError::Corrupt(_)
            | ActivationError::Tls(_)
            | ActivationError::Upstream(_) => internal("activation", err),
            ActivationError::Database(db) => internal("activation database", db),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_failures_say_whether_a_retry_can_help() {
        let from = |code| ActivationError::gateway(Status::new(code, "gateway says")).to_status();
        assert_eq!(
            from(tonic::Code::Unauthenticated).code(),
            tonic::Code::FailedPrecondition,
            "this service's token was refused, not the caller's"
        );
        assert_eq!(from(tonic::Code::Internal).code(), tonic::Code::Internal);
        assert_eq!(
            from(tonic::Code::Unavailable).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            from(tonic::Code::PermissionDenied).code(),
            tonic::Code::PermissionDenied
        );
    }
}
