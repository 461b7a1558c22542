//! What every service's error module builds on: a validation error that names
//! the request field, and the one way internal failures become a status (the
//! detail is logged, the caller gets a generic message).

use tonic::Status;

/// A request field that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field's path in the request, e.g. `identifiers[2].value`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The error for a required field left empty.
    pub fn required(field: impl Into<String>) -> Self {
        FieldError::new(field, "is required")
    }
}

impl From<FieldError> for Status {
    fn from(err: FieldError) -> Self {
        Status::invalid_argument(err.to_string())
    }
}

/// An internal failure: logs `err` with `context` and answers INTERNAL with a
/// message that reveals nothing about the cause.
pub fn internal(context: &'static str, err: &dyn std::error::Error) -> Status {
    tracing::error!(error = %err, "{context}");
    Status::internal("internal error")
}
