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

    /// The same error, for the field as it sits in a message nested at
    /// `parent`.
    pub fn within(self, parent: &str) -> Self {
        FieldError {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
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

/// A JSON decoding failure described by its kind and position only. serde's
/// own message quotes the offending value (``unknown variant `…` ``), and in
/// stored records that value can be personal data, while these errors end
/// up in logs.
pub fn json_error(err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match err.classify() {
        Category::Io => "unreadable JSON",
        Category::Syntax => "malformed JSON",
        Category::Data => "JSON of an unexpected shape",
        Category::Eof => "truncated JSON",
    };
    format!("{kind} at line {} column {}", err.line(), err.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_error_names_no_value() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Kind {
            Email,
        }
        let err = serde_json::from_str::<Kind>(r#""alice@example.com""#).expect_err("unknown");
        assert!(
            err.to_string().contains("alice@example.com"),
            "serde quotes it"
        );
        let described = json_error(&err);
        assert!(!described.contains("alice"), "{described}");
        assert!(described.starts_with("JSON of an unexpected shape at line 1"));
        let err = serde_json::from_str::<Kind>(r#""alice"#).expect_err("truncated");
        assert!(json_error(&err).starts_with("truncated JSON"));
    }
}
