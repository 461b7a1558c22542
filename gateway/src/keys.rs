//! The keys tokens are verified with: PEM public keys from files and the keys
//! of a JWKS document (a file or a URL, fetched again on a schedule). Every
//! key carries the algorithms it may verify, pinned by configuration or by
//! the JWK's own `alg`, and never taken from a token: `none` and every HMAC
//! algorithm are refused outright (a public key used as an HMAC secret is
//! the classic confusion attack), and an algorithm only ever meets a key of
//! its own family.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid key {source_name}: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error("algorithm {0:?} is not allowed: only EdDSA, ES256, ES384, RS* and PS* verify tokens")]
    Algorithm(String),
    #[error("cannot fetch the JWKS {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("the JWKS {0} holds no key usable for signatures")]
    Empty(String),
}

/// A PEM public key file and the algorithms it verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub file: PathBuf,
    /// e.g. `["RS256"]`; all of one family.
    pub algorithms: Vec<String>,
    /// Tokens naming a `kid` are tried against keys with that id (and keys
    /// without one).
    #[serde(default)]
    pub kid: Option<String>,
}

/// A JWKS document the issuer publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwksConfig {
    /// An `https://` (or `http://`) URL, or a file path.
    pub source: String,
    /// How often the document is fetched again; a failed fetch keeps the
    /// keys in force.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Algorithms its keys may verify; a key's own `alg` narrows this.
    pub algorithms: Vec<String>,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            source: String::new(),
            refresh: Duration::from_secs(300),
            algorithms: vec!["EdDSA".into(), "ES256".into(), "RS256".into()],
        }
    }
}

/// One key and what it may verify.
#[derive(Clone)]
pub struct VerificationKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Parses an algorithm name, refusing everything that is not a public-key
/// signature algorithm.
pub fn signature_algorithm(name: &str) -> Result<Algorithm, KeyError> {
    match name.parse::<Algorithm>() {
        Ok(algorithm) if algorithm.family() != AlgorithmFamily::Hmac => Ok(algorithm),
        _ => Err(KeyError::Algorithm(name.to_string())),
    }
}

fn algorithms(names: &[String]) -> Result<Vec<Algorithm>, KeyError> {
    names.iter().map(|name| signature_algorithm(name)).collect()
}

impl VerificationKey {
    /// An Ed25519 public key (SPKI PEM) that verifies EdDSA only.
    pub fn ed25519_pem_file(path: &Path) -> Result<Self, KeyError> {
        Self::pem_file(&KeyFile {
            file: path.to_path_buf(),
            algorithms: vec!["EdDSA".into()],
            kid: None,
        })
    }

    pub fn pem_file(config: &KeyFile) -> Result<Self, KeyError> {
        let path = &config.file;
        let invalid = |reason: String| KeyError::Invalid {
            source_name: path.display().to_string(),
            reason,
        };
        let algorithms = algorithms(&config.algorithms)?;
        let family = match algorithms.as_slice() {
            [] => return Err(invalid("no algorithms listed".into())),
            [first, rest @ ..] if rest.iter().all(|a| a.family() == first.family()) => {
                first.family()
            }
            _ => return Err(invalid("algorithms of different families".into())),
        };
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.clone(),
            source,
        })?;
        let key = match family {
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
            AlgorithmFamily::Hmac => return Err(invalid("HMAC is not allowed".into())),
        }
        .map_err(|err| invalid(err.to_string()))?;
        Ok(VerificationKey {
            kid: config.kid.clone(),
            key,
            algorithms,
        })
    }
}

/// The signature keys of a JWKS document that `allowed` algorithms can use.
/// Encryption keys, symmetric keys and keys whose `alg` is not allowed are
/// skipped; a document with no usable key is an error.
pub fn jwks_keys(
    text: &str,
    allowed: &[String],
    source_name: &str,
) -> Result<Vec<VerificationKey>, KeyError> {
    let allowed = algorithms(allowed)?;
    let set: JwkSet = serde_json::from_str(text).map_err(|err| KeyError::Invalid {
        source_name: source_name.to_string(),
        reason: err.to_string(),
    })?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            continue;
        }
        // What the key's type can verify at all.
        let by_type: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            _ => continue,
        };
        let pinned = match &jwk.common.key_algorithm {
            None => None,
            Some(declared) => match key_algorithm(declared) {
                Some(algorithm) => Some(algorithm),
                None => continue,
            },
        };
        let usable: Vec<Algorithm> = by_type
            .into_iter()
            .filter(|a| allowed.contains(a) && pinned.is_none_or(|p| p == *a))
            .collect();
        if usable.is_empty() {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.push(VerificationKey {
            kid: jwk.common.key_id.clone(),
            key,
            algorithms: usable,
        });
    }
    if keys.is_empty() {
        return Err(KeyError::Empty(source_name.to_string()));
    }
    Ok(keys)
}

fn key_algorithm(declared: &KeyAlgorithm) -> Option<Algorithm> {
    signature_algorithm(&declared.to_string()).ok()
}

/// Every key in force, swapped whole when the JWKS changes.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Arc<ArcSwap<Vec<VerificationKey>>>,
}

impl KeySet {
    pub fn new(keys: Vec<VerificationKey>) -> Self {
        KeySet {
            keys: Arc::new(ArcSwap::from_pointee(keys)),
        }
    }

    pub fn replace(&self, keys: Vec<VerificationKey>) {
        self.keys.store(Arc::new(keys));
    }

    pub fn current(&self) -> Arc<Vec<VerificationKey>> {
        self.keys.load_full()
    }
}

/// Fetches the JWKS and keeps the key set current: the fixed keys plus
/// whatever the document holds now.
pub struct JwksRefresher {
    config: JwksConfig,
    fixed: Vec<VerificationKey>,
    set: KeySet,
    client: reqwest::Client,
}

impl JwksRefresher {
    /// Loads the document once; the gateway does not start without it.
    pub async fn start(
        config: JwksConfig,
        fixed: Vec<VerificationKey>,
    ) -> Result<(JwksRefresher, KeySet), KeyError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| KeyError::Fetch {
                url: config.source.clone(),
                reason: err.to_string(),
            })?;
        let refresher = JwksRefresher {
            config,
            fixed,
            set: KeySet::default(),
            client,
        };
        let keys = refresher.load().await?;
        refresher.set.replace(keys);
        let set = refresher.set.clone();
        Ok((refresher, set))
    }

    async fn load(&self) -> Result<Vec<VerificationKey>, KeyError> {
        let source = &self.config.source;
        let text = if source.starts_with("https://") || source.starts_with("http://") {
            let fetch_error = |reason: String| KeyError::Fetch {
                url: source.clone(),
                reason,
            };
            let response = self
                .client
                .get(source)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|err| fetch_error(err.to_string()))?;
            response
                .text()
                .await
                .map_err(|err| fetch_error(err.to_string()))?
        } else {
            tokio::fs::read_to_string(source)
                .await
                .map_err(|err| KeyError::Read {
                    path: PathBuf::from(source),
                    source: err,
                })?
        };
        let mut keys = self.fixed.clone();
        keys.extend(jwks_keys(&text, &self.config.algorithms, source)?);
        Ok(keys)
    }

    /// Fetches again every `refresh` until `shutdown`.
    pub async fn run(self, shutdown: madtech_common::CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.refresh) => {}
            }
            match self.load().await {
                Ok(keys) => {
                    metrics::counter!("madtech_gateway_jwks_refreshes_total", "outcome" => "loaded")
                        .increment(1);
                    self.set.replace(keys);
                }
                Err(err) => {
                    metrics::counter!("madtech_gateway_jwks_refreshes_total", "outcome" => "failed")
                        .increment(1);
                    tracing::warn!(error = %err, "JWKS refresh failed; the keys in force stay");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_key_signature_algorithms_are_accepted() {
        for good in ["EdDSA", "ES256", "ES384", "RS256", "PS512"] {
            assert!(signature_algorithm(good).is_ok(), "{good}");
        }
        for bad in ["none", "HS256", "HS512", "", "rs256", "RSA-OAEP"] {
            assert!(signature_algorithm(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_keep_signature_keys_their_alg_and_the_allow_list_permit() {
        // RFC 8037 appendix A.2: the Ed25519 public key used in its examples.
        // RFC 7517 appendix A.1: the P-256 example key.
        let text = r#"{"keys":[
            {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"EC","crv":"P-256","kid":"ec","use":"sig","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"},
            {"kty":"EC","crv":"P-256","kid":"enc","use":"enc","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"},
            {"kty":"oct","kid":"secret","k":"c2VjcmV0"},
            {"kty":"OKP","crv":"Ed25519","kid":"pinned-elsewhere","alg":"ES256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let keys = jwks_keys(text, &["EdDSA".into(), "ES256".into()], "test").expect("keys");
        let kept: Vec<(Option<&str>, &[Algorithm])> = keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.algorithms.as_slice()))
            .collect();
        assert_eq!(
            kept,
            vec![
                (Some("ed"), &[Algorithm::EdDSA][..]),
                (Some("ec"), &[Algorithm::ES256][..]),
            ]
        );
        let only_rsa = jwks_keys(text, &["RS256".into()], "test");
        assert!(matches!(only_rsa, Err(KeyError::Empty(_))));
        assert!(jwks_keys("not json", &["EdDSA".into()], "test").is_err());
        assert!(jwks_keys(text, &["HS256".into()], "test").is_err());
    }

    #[test]
    fn key_files_pin_one_family() {
        let dir = tempfile::tempdir().expect("dir");
        let (_, public) = crate::token::ensure_dev_keys(dir.path()).expect("keys");
        assert!(VerificationKey::ed25519_pem_file(&public).is_ok());
        let mixed = KeyFile {
            file: public.clone(),
            algorithms: vec!["EdDSA".into(), "RS256".into()],
            kid: None,
        };
        assert!(VerificationKey::pem_file(&mixed).is_err());
        let wrong_family = KeyFile {
            file: public,
            algorithms: vec!["RS256".into()],
            kid: None,
        };
        assert!(
            VerificationKey::pem_file(&wrong_family).is_err(),
            "an Ed25519 key is no RSA key"
        );
    }
}
