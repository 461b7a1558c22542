//! Local stand-ins for the platforms, for tests and benchmarks: they check
//! what each platform's documentation requires (paths, methods, auth
//! headers, payload shapes, batch limits, hash format), keep the audience as
//! the platform would, and answer 429, 500 or 400 on demand.
//!
//! Behind the `testing` feature.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

mod google;

pub use google::OAuthClient;
mod linkedin;
mod meta;
mod ttd;
mod webhook;

/// An answer forced on the next request instead of the normal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// 429 with `Retry-After: seconds`.
    TooManyRequests {
        retry_after_secs: u64,
    },
    ServerError,
    BadRequest,
}

/// One request the mock accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `add` or `remove`.
    pub op: &'static str,
    pub session_id: u64,
    pub batch_seq: u64,
    pub last_batch: bool,
    /// Rows (Meta) or members (webhook) in the request.
    pub rows: usize,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct Platform {
    /// What the audience holds: Meta rows as `email|phone` hashes, webhook
    /// members by pseudonymous id.
    pub audience: BTreeSet<String>,
    pub received: Vec<Received>,
    /// Requests refused for breaking the documented shape, with the reason.
    pub violations: Vec<String>,
    /// Every request that arrived, counted before its delay: forced answers
    /// included, and requests whose sender went away while it waited.
    pub requests: usize,
    /// Webhook batches by idempotency key: the member ids each carried. A
    /// batch sent again under its key replaces itself, as a receiver that
    /// deduplicates would see it.
    pub batches_by_key: BTreeMap<String, Vec<String>>,
    /// OAuth access tokens the mock's token endpoint minted.
    pub tokens_issued: usize,
    /// How long each request takes to answer (to let a test act mid-sync).
    pub delay: Duration,
    /// False: requests are checked and counted but the audience is not
    /// kept (benchmarks, whose memory must be the service's alone).
    pub forget_audience: bool,
    forced: VecDeque<Forced>,
}

/// A running mock; dropped, it stops.
pub struct MockPlatform {
    pub addr: SocketAddr,
    state: Arc<Mutex<Platform>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockPlatform {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl MockPlatform {
    pub fn platform(&self) -> MutexGuard<'_, Platform> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every request take `delay` before it is handled.
    pub fn slow_down(&self, delay: Duration) {
        self.platform().delay = delay;
    }

    /// Stops keeping the audience (see [`Platform::forget_audience`]).
    pub fn forget_audience(&self) {
        self.platform().forget_audience = true;
    }

    /// Answers the next requests with `answers`, in order.
    pub fn force(&self, answers: &[Forced]) {
        self.platform().forced.extend(answers.iter().copied());
    }

    /// Drops the forced answers not given yet: the platform answers as
    /// itself again.
    pub fn stop_forcing(&self) {
        self.platform().forced.clear();
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves the router `build` makes for the mock's address and state.
    async fn start(build: impl FnOnce(SocketAddr, Arc<Mutex<Platform>>) -> Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|err| panic!("mock platform bind: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("mock platform addr: {err}"));
        let state = Arc::new(Mutex::new(Platform::default()));
        let router = build(addr, Arc::clone(&state));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        MockPlatform {
            addr,
            state,
            server,
        }
    }

    /// A Meta Graph API serving `/{version}/{audience_id}/users` for
    /// `audience_id`, accepting `token` as the bearer.
    pub async fn meta(audience_id: &str, token: &str) -> Self {
        let (audience_id, token) = (audience_id.to_string(), token.to_string());
        Self::start(move |_, state| meta::router(audience_id, token, state)).await
    }

    /// A webhook receiver at `/hook` checking signatures under `secret`.
    pub async fn webhook(secret: &str) -> Self {
        let secret = secret.to_string();
        Self::start(move |_, state| webhook::router(secret, state)).await
    }

    /// The Google Ads API for customer `customer_id`'s user list `list_id`,
    /// accepting `token` as the bearer and `developer_token`.
    pub async fn google_ads(
        customer_id: &str,
        list_id: &str,
        token: &str,
        developer_token: &str,
    ) -> Self {
        let account = google::Account {
            customer_id: customer_id.to_string(),
            list_id: list_id.to_string(),
            token: token.to_string(),
            developer_token: developer_token.to_string(),
            oauth: None,
        };
        Self::start(move |_, state| google::router(account, state)).await
    }

    /// The Google Ads API as [`MockPlatform::google_ads`], accepting only
    /// bearers its token endpoint (`/token`) minted for `client`.
    pub async fn google_ads_oauth(
        customer_id: &str,
        list_id: &str,
        client: OAuthClient,
        developer_token: &str,
    ) -> Self {
        let account = google::Account {
            customer_id: customer_id.to_string(),
            list_id: list_id.to_string(),
            token: String::new(),
            developer_token: developer_token.to_string(),
            oauth: Some(client),
        };
        Self::start(move |_, state| google::router(account, state)).await
    }

    /// The Trade Desk's API for one CRM data segment, accepting `token` as
    /// `TTD-Auth`; its drop URLs point back at the mock.
    pub async fn the_trade_desk(advertiser_id: &str, crm_data_id: &str, token: &str) -> Self {
        let account = ttd::Account {
            advertiser_id: advertiser_id.to_string(),
            crm_data_id: crm_data_id.to_string(),
            token: token.to_string(),
        };
        Self::start(move |addr, state| ttd::router(account, addr, state)).await
    }

    /// LinkedIn's Marketing API for DMP segment `segment_id`, accepting
    /// `token` as the bearer.
    pub async fn linkedin(segment_id: &str, token: &str) -> Self {
        let (segment_id, token) = (segment_id.to_string(), token.to_string());
        Self::start(move |_, state| linkedin::router(segment_id, token, state)).await
    }
}

fn lock(state: &Mutex<Platform>) -> MutexGuard<'_, Platform> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What every handler does first: count the request, wait the mock's
/// delay, then answer a forced answer if one is queued.
async fn arrive(state: &Mutex<Platform>) -> Option<Response> {
    let delay = {
        let mut platform = lock(state);
        platform.requests += 1;
        platform.delay
    };
    tokio::time::sleep(delay).await;
    forced(&mut lock(state))
}

/// The forced answer for this request, if one is queued.
fn forced(platform: &mut Platform) -> Option<Response> {
    Some(match platform.forced.pop_front()? {
        Forced::TooManyRequests { retry_after_secs } => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after_secs.to_string())],
            r#"{"error":{"message":"(#80003) too many calls","code":80003}}"#,
        )
            .into_response(),
        Forced::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "unavailable").into_response(),
        Forced::BadRequest => (
            StatusCode::BAD_REQUEST,
            r#"{"error":{"message":"Invalid parameter","code":100}}"#,
        )
            .into_response(),
    })
}

fn violation(platform: &mut Platform, reason: String) -> Response {
    platform.violations.push(reason.clone());
    (StatusCode::BAD_REQUEST, reason).into_response()
}

/// Whether the request carries `Authorization: Bearer <token>`.
fn has_bearer(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        == Some(&format!("Bearer {token}"))
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
