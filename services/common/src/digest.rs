//! The one way the suite hashes an identifier when it must remember one it
//! may no longer hold (a data-subject request's subject, an erased person's
//! suppressed identifiers): SHA-256 over `kind:value`, hex.

use sha2::{Digest, Sha256};

/// SHA-256 (hex) of `kind:value`, the value trimmed. Give it normalised
/// values so that every service computes the same digest for the same
/// identifier.
pub fn identifier(kind: &str, value: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{kind}:{}", value.trim()).as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_digest_is_of_kind_and_trimmed_value() {
        // `printf 'email:test@example.com' | sha256sum`
        let expected = "06615e725a325cc3ebc3db686430d14f0eef6d7bb5b60eef61db20d84c2c39f0";
        assert_eq!(super::identifier("email", " test@example.com "), expected);
        assert_ne!(
            super::identifier("email", "a"),
            super::identifier("phone", "a")
        );
    }
}
