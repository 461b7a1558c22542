//! Credentials by reference. A destination stores where its credential is
//! (an environment variable or a mounted file), and the value is read only
//! when a request needs it, so it never sits in the database, in an API
//! answer or in a log line.

use std::path::{Path, PathBuf};

use madtech_common::error::FieldError;
use serde::{Deserialize, Serialize};

use super::DeliveryError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretRef {
    /// An environment variable of the activation service.
    Env(String),
    /// A file (a mounted Kubernetes Secret), re-read at each use.
    File(PathBuf),
}

impl SecretRef {
    /// Checks a reference given over the API: an environment variable name
    /// (`A-Z`, `0-9`, `_`) or an absolute file path.
    pub fn env(field: &str, name: &str) -> Result<Self, FieldError> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(FieldError::new(
                field,
                "must be an environment variable name (A-Z, 0-9, _)",
            ));
        }
        Ok(SecretRef::Env(name.to_string()))
    }

    pub fn file(field: &str, path: &str) -> Result<Self, FieldError> {
        let path = Path::new(path);
        if !path.is_absolute() {
            return Err(FieldError::new(field, "must be an absolute path"));
        }
        Ok(SecretRef::File(path.to_path_buf()))
    }

    /// Where the credential is, for errors and API answers.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(name) => format!("environment variable {name}"),
            SecretRef::File(path) => format!("file {}", path.display()),
        }
    }

    /// The credential, trimmed. Missing or empty is an error naming where it
    /// was looked for, never what was found.
    pub async fn read(&self) -> Result<String, DeliveryError> {
        let value = match self {
            SecretRef::Env(name) => std::env::var(name).ok(),
            SecretRef::File(path) => tokio::fs::read_to_string(path).await.ok(),
        };
        match value.map(|value| value.trim().to_string()) {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(DeliveryError::Credential(format!(
                "no credential in {}",
                self.describe()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secrets_are_read_from_files_when_needed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let secret = SecretRef::file("f", path.to_str().expect("utf-8")).expect("absolute");
        let missing = secret.read().await.expect_err("not there yet");
        assert!(missing.to_string().contains("token"));
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(secret.read().await.expect("read"), "s3cret");
        std::fs::write(&path, "rotated").expect("rotate");
        assert_eq!(secret.read().await.expect("read"), "rotated");
    }

    #[test]
    fn references_are_checked() {
        assert!(SecretRef::env("e", "META_TOKEN").is_ok());
        for bad in ["", "lower", "9START", "WITH-DASH", "A B"] {
            assert!(SecretRef::env("e", bad).is_err(), "{bad}");
        }
        assert!(SecretRef::file("f", "relative/path").is_err());
    }

    #[test]
    fn a_stored_reference_holds_no_value() {
        let stored = serde_json::to_string(&SecretRef::Env("META_TOKEN".into())).expect("json");
        assert_eq!(stored, r#"{"env":"META_TOKEN"}"#);
    }
}
