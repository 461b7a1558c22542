//! Sending a prepared request to a platform, with the retry rules every
//! connector shares: 429 and 5xx and network errors are retried with
//! exponential backoff and full jitter, a `Retry-After` is honoured, and any
//! other 4xx is final for that batch.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// How long and how often a batch is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts per batch, the first included.
    pub max_attempts: u32,
    /// The backoff before the second attempt; it doubles each time.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest backoff, and the longest `Retry-After` waited for (a
    /// longer one ends the batch's attempts).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Time for one request, answer included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`: a random time up to the
    /// exponential backoff ("full jitter"), so many clients retrying at once
    /// spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max_backoff);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The destination answered the batch with a final refusal (a 4xx other
    /// than 429). The batch is recorded as refused; the sync goes on.
    #[error("the destination refused the batch: HTTP {status}: {reason}")]
    Refused { status: u16, reason: String },
    /// Still failing after every attempt: the destination is down or
    /// throttling. The sync stops.
    #[error("the destination is unavailable after {attempts} attempts: {reason}")]
    Unavailable { attempts: u32, reason: String },
    #[error("{0}")]
    Credential(String),
    /// The batch cannot be put into the platform's shape.
    #[error("{0}")]
    Unshapeable(String),
    #[error("{0}")]
    Local(String),
    #[error("destination write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A request ready to send (and send again): method, URL, headers, body.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Prepared {
    pub fn new(method: Method, url: String, content_type: &'static str, body: Vec<u8>) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        Prepared {
            method,
            url,
            headers,
            body: Bytes::from(body),
        }
    }

    pub fn json(method: Method, url: String, body: Vec<u8>) -> Self {
        Self::new(method, url, "application/json", body)
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Result<Self, DeliveryError> {
        let value = HeaderValue::from_str(value)
            .map_err(|_| DeliveryError::Unshapeable(format!("{name}: not a header value")))?;
        self.headers.insert(HeaderName::from_static(name), value);
        Ok(self)
    }

    /// Adds a header carrying a credential, marked sensitive so it is never
    /// printed.
    pub fn credential(mut self, name: HeaderName, value: &str) -> Result<Self, DeliveryError> {
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            DeliveryError::Credential("the credential is not a valid header value".into())
        })?;
        value.set_sensitive(true);
        self.headers.insert(name, value);
        Ok(self)
    }

    /// Adds `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Result<Self, DeliveryError> {
        self.credential(AUTHORIZATION, &format!("Bearer {token}"))
    }
}

/// The `Retry-After` of an answer: seconds, or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// Platforms' error bodies name the problem; a short prefix is kept for the
/// batch's record. They hold hashes at most, never raw identifiers.
fn reason(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if text.is_empty() {
        status.canonical_reason().unwrap_or("").to_string()
    } else {
        text
    }
}

#[derive(Clone)]
pub struct HttpSender {
    client: reqwest::Client,
    retry: RetryPolicy,
}

impl HttpSender {
    pub fn new(retry: RetryPolicy) -> Result<Self, DeliveryError> {
        let client = reqwest::Client::builder()
            .timeout(retry.request_timeout)
            .build()
            .map_err(|err| DeliveryError::Local(format!("http client: {err}")))?;
        Ok(HttpSender { client, retry })
    }

    /// Sends until the destination accepts (2xx), refuses (4xx but 429), or
    /// the attempts run out. `retries` counts the repeated requests.
    pub async fn send(&self, request: Prepared, retries: &mut u64) -> Result<Bytes, DeliveryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .client
                .request(request.method.clone(), &request.url)
                .headers(request.headers.clone())
                .body(request.body.clone())
                .send()
                .await;
            let (reason, wait) = match sent {
                Ok(answer) => {
                    let status = answer.status();
                    let asked_wait = retry_after(answer.headers());
                    let body = answer.bytes().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(body);
                    }
                    let retryable =
                        status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    if !retryable {
                        return Err(DeliveryError::Refused {
                            status: status.as_u16(),
                            reason: reason(status, &body),
                        });
                    }
                    (
                        format!("HTTP {}: {}", status.as_u16(), reason(status, &body)),
                        asked_wait,
                    )
                }
                // No URL in the message: a destination's path may name an
                // audience, and errors end up in run records.
                Err(err) => (err.without_url().to_string(), None),
            };
            let wait = wait.unwrap_or_else(|| self.retry.backoff(attempt));
            if attempt >= self.retry.max_attempts || wait > self.retry.max_backoff {
                return Err(DeliveryError::Unavailable {
                    attempts: attempt,
                    reason,
                });
            }
            *retries += 1;
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling_with_jitter() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..RetryPolicy::default()
        };
        for _ in 0..100 {
            assert!(policy.backoff(1) <= Duration::from_millis(100));
            assert!(policy.backoff(2) <= Duration::from_millis(200));
            assert!(policy.backoff(3) <= Duration::from_millis(350));
            assert!(policy.backoff(40) <= Duration::from_millis(350));
        }
        let spread: std::collections::HashSet<Duration> =
            (0..20).map(|_| policy.backoff(3)).collect();
        assert!(spread.len() > 1, "jittered");
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO), "in the past");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }
}
