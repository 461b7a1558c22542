//! A service's own bearer token for the gateway, read from a file (a
//! Kubernetes Secret, or what `madtech up` mints) at every use, so a rotated
//! token is picked up without a restart.

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};

/// The `authorization` header value for the token in `path`.
pub async fn from_file(path: &Path) -> Result<MetadataValue<Ascii>, String> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|err| format!("{}: {err}", path.display()))?;
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| format!("{}: not a valid header value", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_and_trims_the_token_and_refuses_what_no_header_can_carry() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "abc.def.ghi\n").expect("write");
        assert_eq!(from_file(&path).await.expect("valid"), "Bearer abc.def.ghi");
        std::fs::write(&path, "bad\u{7}token").expect("write");
        assert!(from_file(&path).await.is_err());
        assert!(from_file(&dir.path().join("missing")).await.is_err());
    }
}
