//! OAuth 2 access tokens minted from a refresh token (RFC 6749, section 6),
//! for platforms whose access tokens expire within the hour (Google Ads).
//! The destination stores only where the client secret and the refresh token
//! are; minted access tokens live in this process's memory, never in the
//! database, and are renewed a minute before they expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::DeliveryError;
use super::http::{HttpSender, Prepared};
use super::secret::SecretRef;

/// Google's token endpoint.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// A token is renewed this long before the platform said it expires, so a
/// batch never starts with a token about to lapse.
const RENEW_EARLY: Duration = Duration::from_secs(60);
/// Lifetime assumed when the endpoint does not say (`expires_in` is only
/// RECOMMENDED by RFC 6749).
const ASSUMED_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthRefresh {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretRef,
    pub refresh_token: SecretRef,
}

/// The token endpoint's answer (RFC 6749, section 5.1).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct Minted {
    token: String,
    renew_at: Instant,
}

/// Access tokens minted so far, by token endpoint, client and refresh token
/// (a rotated refresh token mints afresh).
#[derive(Clone, Default)]
pub struct Tokens {
    minted: Arc<Mutex<HashMap<[u8; 32], Minted>>>,
}

impl Tokens {
    /// A current access token for `oauth`, minted when there is none.
    pub async fn access_token(
        &self,
        http: &HttpSender,
        oauth: &OAuthRefresh,
        retries: &mut u64,
    ) -> Result<String, DeliveryError> {
        let client_secret = oauth.client_secret.read().await?;
        let refresh_token = oauth.refresh_token.read().await?;
        let key: [u8; 32] = Sha256::new()
            .chain_update(oauth.token_url.as_bytes())
            .chain_update([0u8])
            .chain_update(oauth.client_id.as_bytes())
            .chain_update([0u8])
            .chain_update(refresh_token.as_bytes())
            .finalize()
            .into();
        if let Some(minted) = self.lock().get(&key)
            && minted.renew_at > Instant::now()
        {
            return Ok(minted.token.clone());
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "refresh_token")
            .append_pair("client_id", &oauth.client_id)
            .append_pair("client_secret", &client_secret)
            .append_pair("refresh_token", &refresh_token)
            .finish();
        let asked = Instant::now();
        let request = Prepared::new(
            Method::POST,
            oauth.token_url.clone(),
            "application/x-www-form-urlencoded",
            body.into_bytes(),
        );
        let answer = http.send(request, retries).await.map_err(|err| match err {
            // A refused refresh token (revoked, wrong client) fails every
            // batch alike: the sync stops rather than refuse them one by one.
            DeliveryError::Refused { status, reason } => DeliveryError::Credential(format!(
                "the OAuth token endpoint refused the refresh token: HTTP {status}: {reason}"
            )),
            other => other,
        })?;
        let (token, lifetime) = parse_answer(&answer)?;
        let renew_at = asked + lifetime.saturating_sub(RENEW_EARLY);
        self.lock().insert(
            key,
            Minted {
                token: token.clone(),
                renew_at,
            },
        );
        Ok(token)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Minted>> {
        self.minted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The access token and how long it lives, from the endpoint's JSON.
fn parse_answer(body: &[u8]) -> Result<(String, Duration), DeliveryError> {
    let answer: TokenAnswer = serde_json::from_slice(body).map_err(|err| {
        DeliveryError::Credential(format!("the OAuth token endpoint's answer: {err}"))
    })?;
    if answer.access_token.is_empty() {
        return Err(DeliveryError::Credential(
            "the OAuth token endpoint answered an empty access token".into(),
        ));
    }
    if let Some(kind) = &answer.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(DeliveryError::Credential(format!(
            "the OAuth token endpoint answered a {kind:?} token, not a bearer token"
        )));
    }
    let lifetime = answer
        .expires_in
        .map_or(ASSUMED_LIFETIME, Duration::from_secs);
    Ok((answer.access_token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_gives_the_token_and_its_lifetime() {
        let (token, lifetime) =
            parse_answer(br#"{"access_token":"ya29.a","expires_in":3599,"token_type":"Bearer"}"#)
                .expect("valid");
        assert_eq!((token.as_str(), lifetime.as_secs()), ("ya29.a", 3599));
        let (_, lifetime) = parse_answer(br#"{"access_token":"t"}"#).expect("valid");
        assert_eq!(lifetime, ASSUMED_LIFETIME);
    }

    #[test]
    fn odd_answers_are_credential_errors_not_panics() {
        for body in [
            &b"not json"[..],
            br#"{"expires_in":10}"#,
            br#"{"access_token":""}"#,
            br#"{"access_token":"t","token_type":"mac"}"#,
            br#"{"access_token":"t","expires_in":-1}"#,
        ] {
            let err = parse_answer(body).expect_err("refused");
            assert!(
                matches!(err, DeliveryError::Credential(_)),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
