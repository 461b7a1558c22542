//! Bearer tokens: the claims MadTech expects, their verification against the
//! key set (`keys.rs`: algorithms pinned per key, so no `none` and no HS/RS
//! confusion), and minting with development keys for `madtech up` and
//! `madtech token`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, KeySet, VerificationKey};

/// The claims of a MadTech bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who is calling (a service or person); logged, never trusted for access.
    pub sub: String,
    /// The caller's roles, each a casbin subject in `rbac_policy.csv`.
    pub roles: Vec<String>,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// The caller a valid token describes; put into request extensions by the
/// authentication layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub roles: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key {path}: {source}")]
    WriteKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid key {path}: {reason}")]
    InvalidKey { path: PathBuf, reason: String },
    #[error("key generation failed")]
    Generate,
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// Why a presented token was refused. The message is what the caller sees,
/// so it never echoes the token or says which check came closest to passing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed authorization header")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
}

/// Verifies tokens against the key set, issuer and audience.
pub struct Verifier {
    keys: KeySet,
    validation: Validation,
    /// Tokens verified already, with their expiry and the key set that
    /// verified them: a caller presents the same token on every call, and a
    /// signature check costs far more than a lookup. A token is taken from
    /// here only while that key set is still in force, so a key the issuer
    /// withdraws from its JWKS stops verifying its tokens at the next refresh.
    verified: std::sync::RwLock<std::collections::HashMap<String, Remembered>>,
}

struct Remembered {
    caller: Caller,
    expires: u64,
    keys: std::sync::Arc<Vec<VerificationKey>>,
}

/// Verified tokens remembered at most; past it the memory starts afresh.
const MAX_REMEMBERED_TOKENS: usize = 10_000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Verifier {
    pub fn new(keys: KeySet, issuer: &str, audience: &str, leeway: Duration) -> Self {
        // The algorithm list is set per key at verification time; this one
        // only carries the claim checks.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = leeway.as_secs();
        Verifier {
            keys,
            validation,
            verified: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// A verifier for one Ed25519 public key (EdDSA only).
    pub fn from_public_key_file(
        path: &Path,
        issuer: &str,
        audience: &str,
        leeway: Duration,
    ) -> Result<Self, KeyError> {
        let key = VerificationKey::ed25519_pem_file(path)?;
        Ok(Self::new(KeySet::new(vec![key]), issuer, audience, leeway))
    }

    /// The caller behind an `authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Caller, Rejected> {
        let header = header.ok_or(Rejected::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(Rejected::Malformed)?
            .trim();
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Caller, Rejected> {
        use jsonwebtoken::errors::ErrorKind;
        let keys = self.keys.current();
        if let Ok(verified) = self.verified.read()
            && let Some(remembered) = verified.get(token)
            && unix_now() < remembered.expires
            && std::sync::Arc::ptr_eq(&remembered.keys, &keys)
        {
            return Ok(remembered.caller.clone());
        }
        // `alg: none` and unknown algorithms fail here already.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejected::Invalid)?;
        // A token naming a key is tried against that key (and keys without
        // an id); the algorithm must be one the key is pinned to.
        let candidates = keys.iter().filter(|key| {
            key.algorithms.contains(&header.alg)
                && match (&header.kid, &key.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        for key in candidates {
            let mut validation = self.validation.clone();
            validation.algorithms = vec![header.alg];
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let caller = Caller {
                        subject: data.claims.sub,
                        roles: data.claims.roles,
                    };
                    if let Ok(mut verified) = self.verified.write() {
                        if verified.len() >= MAX_REMEMBERED_TOKENS {
                            verified.clear();
                        }
                        verified.insert(
                            token.to_string(),
                            Remembered {
                                caller: caller.clone(),
                                expires: data.claims.exp,
                                keys: std::sync::Arc::clone(&keys),
                            },
                        );
                    }
                    return Ok(caller);
                }
                Err(err) if matches!(err.kind(), ErrorKind::ExpiredSignature) => {
                    return Err(Rejected::Expired);
                }
                // Claims were wrong on a good signature: no other key helps.
                Err(err) if !matches!(err.kind(), ErrorKind::InvalidSignature) => {
                    return Err(Rejected::Invalid);
                }
                Err(_) => {}
            }
        }
        Err(Rejected::Invalid)
    }
}

/// Signs tokens with an Ed25519 private key (PKCS#8 PEM).
pub struct Signer {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

impl Signer {
    pub fn from_private_key_file(
        path: &Path,
        issuer: &str,
        audience: &str,
    ) -> Result<Self, TokenError> {
        let pem = std::fs::read(path).map_err(|source| TokenError::ReadKey {
            path: path.to_path_buf(),
            source,
        })?;
        let key = EncodingKey::from_ed_pem(&pem).map_err(|err| TokenError::InvalidKey {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        Ok(Signer {
            key,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        })
    }

    /// A token for `subject` with `roles`, valid from now for `lifetime`.
    pub fn mint(
        &self,
        subject: &str,
        roles: &[String],
        lifetime: Duration,
    ) -> Result<String, TokenError> {
        let now = unix_now();
        let claims = Claims {
            sub: subject.to_string(),
            roles: roles.to_vec(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + lifetime.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|err| TokenError::Sign(err.to_string()))
    }
}

/// File names of the development key pair inside a data directory.
pub const DEV_PRIVATE_KEY: &str = "jwt-signing-key.pem";
pub const DEV_PUBLIC_KEY: &str = "jwt-public-key.pem";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 section 4),
/// followed by the 32-byte raw key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Creates an Ed25519 key pair in `dir` unless one is there; returns the
/// paths of the private and public keys.
pub fn ensure_dev_keys(dir: &Path) -> Result<(PathBuf, PathBuf), TokenError> {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    let private = dir.join(DEV_PRIVATE_KEY);
    let public = dir.join(DEV_PUBLIC_KEY);
    if private.is_file() && public.is_file() {
        return Ok((private, public));
    }
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| TokenError::Generate)?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| TokenError::Generate)?;
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());

    let write = |path: &Path, tag: &str, der: Vec<u8>| -> Result<(), TokenError> {
        let text = pem::encode(&pem::Pem::new(tag, der));
        write_private_file(path, text.as_bytes()).map_err(|source| TokenError::WriteKey {
            path: path.to_path_buf(),
            source,
        })
    };
    write(&private, "PRIVATE KEY", pkcs8.as_ref().to_vec())?;
    write(&public, "PUBLIC KEY", spki)?;
    Ok((private, public))
}

/// Writes a file readable by its owner only.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "madtech-test";
    const AUD: &str = "madtech";

    fn keys() -> (tempfile::TempDir, Signer, Verifier) {
        let dir = tempfile::tempdir().expect("dir");
        let (private, public) = ensure_dev_keys(dir.path()).expect("keys");
        let signer = Signer::from_private_key_file(&private, ISS, AUD).expect("signer");
        let verifier = Verifier::from_public_key_file(&public, ISS, AUD, Duration::from_secs(5))
            .expect("verifier");
        (dir, signer, verifier)
    }

    fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn minted_tokens_verify() {
        let (_dir, signer, verifier) = keys();
        let token = signer
            .mint("alice", &roles(&["admin"]), Duration::from_secs(60))
            .expect("mint");
        let caller = verifier
            .verify_header(Some(&format!("Bearer {token}")))
            .expect("valid");
        assert_eq!(
            caller,
            Caller {
                subject: "alice".into(),
                roles: roles(&["admin"])
            }
        );
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let (_dir, signer, verifier) = keys();
        let token = signer
            .mint("alice", &roles(&["admin"]), Duration::from_secs(60))
            .expect("mint");
        assert!(verifier.verify(&token).is_ok());
        assert!(verifier.verify(&token).is_ok(), "answered from memory");
        // Pretend the remembered expiry has passed.
        if let Ok(mut verified) = verifier.verified.write() {
            for remembered in verified.values_mut() {
                remembered.expires = 0;
            }
        }
        assert!(
            verifier.verify(&token).is_ok(),
            "checked again, still valid by its claims"
        );
        let other = signer
            .mint("bob", &roles(&["ingest"]), Duration::from_secs(60))
            .expect("mint");
        assert_eq!(
            verifier.verify(&other).expect("valid").subject,
            "bob",
            "tokens never mix"
        );
    }

    #[test]
    fn keys_are_kept_across_calls() {
        let dir = tempfile::tempdir().expect("dir");
        let (private, _) = ensure_dev_keys(dir.path()).expect("first");
        let before = std::fs::read(&private).expect("read");
        ensure_dev_keys(dir.path()).expect("second");
        assert_eq!(std::fs::read(&private).expect("read"), before);
    }

    #[test]
    fn foreign_keys_issuers_and_audiences_are_refused() {
        let (_dir, _signer, verifier) = keys();
        let (_other_dir, other_signer, _) = keys();
        let forged = other_signer
            .mint("mallory", &roles(&["admin"]), Duration::from_secs(60))
            .expect("mint");
        assert_eq!(verifier.verify(&forged), Err(Rejected::Invalid));

        let (dir, _, _) = keys();
        let private = dir.path().join(DEV_PRIVATE_KEY);
        let public = dir.path().join(DEV_PUBLIC_KEY);
        let verifier =
            Verifier::from_public_key_file(&public, ISS, AUD, Duration::ZERO).expect("verifier");
        let wrong_iss =
            Signer::from_private_key_file(&private, "someone-else", AUD).expect("signer");
        let wrong_aud = Signer::from_private_key_file(&private, ISS, "other").expect("signer");
        for signer in [wrong_iss, wrong_aud] {
            let token = signer
                .mint("x", &roles(&["admin"]), Duration::from_secs(60))
                .expect("mint");
            assert_eq!(verifier.verify(&token), Err(Rejected::Invalid));
        }
    }

    #[test]
    fn malformed_headers_and_none_algorithm_are_refused() {
        let (_dir, _signer, verifier) = keys();
        assert_eq!(verifier.verify_header(None), Err(Rejected::Missing));
        assert_eq!(
            verifier.verify_header(Some("Basic abc")),
            Err(Rejected::Malformed)
        );
        assert_eq!(
            verifier.verify_header(Some("Bearer not.a.jwt")),
            Err(Rejected::Invalid)
        );
        // {"alg":"none","typ":"JWT"} . {"sub":"x","roles":["admin"],...} . (no signature)
        let unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4Iiwicm9sZXMiOlsiYWRtaW4iXSwiaXNzIjoibWFkdGVjaC10ZXN0IiwiYXVkIjoibWFkdGVjaCIsImlhdCI6MCwibmJmIjowLCJleHAiOjQxMDI0NDQ4MDB9.";
        assert_eq!(verifier.verify(unsigned), Err(Rejected::Invalid));
    }

    #[test]
    fn a_withdrawn_key_stops_verifying_tokens_it_verified_before() {
        let dir = tempfile::tempdir().expect("dir");
        let (private, public) = ensure_dev_keys(dir.path()).expect("keys");
        let signer = Signer::from_private_key_file(&private, ISS, AUD).expect("signer");
        let keys = KeySet::new(vec![
            VerificationKey::ed25519_pem_file(&public).expect("key"),
        ]);
        let verifier = Verifier::new(keys.clone(), ISS, AUD, Duration::ZERO);
        let token = signer
            .mint("svc", &roles(&["admin"]), Duration::from_secs(60))
            .expect("mint");
        assert!(verifier.verify(&token).is_ok());
        assert!(verifier.verify(&token).is_ok(), "remembered");
        // The issuer's JWKS no longer holds the key.
        keys.replace(Vec::new());
        assert_eq!(verifier.verify(&token), Err(Rejected::Invalid));
    }

    #[test]
    fn expired_tokens_say_so() {
        let (dir, _, _) = keys();
        let private = dir.path().join(DEV_PRIVATE_KEY);
        let public = dir.path().join(DEV_PUBLIC_KEY);
        let verifier =
            Verifier::from_public_key_file(&public, ISS, AUD, Duration::ZERO).expect("verifier");
        let key = EncodingKey::from_ed_pem(&std::fs::read(private).expect("read")).expect("key");
        let claims = Claims {
            sub: "x".into(),
            roles: roles(&["admin"]),
            iss: ISS.into(),
            aud: AUD.into(),
            iat: 1_000,
            nbf: 1_000,
            exp: 2_000,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).expect("sign");
        assert_eq!(verifier.verify(&token), Err(Rejected::Expired));
    }
}
