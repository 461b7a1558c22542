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
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};

use crate::destination::webhook_signature;

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
    /// How long each request takes to answer (to let a test act mid-sync).
    pub delay: Duration,
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

    /// Answers the next requests with `answers`, in order.
    pub fn force(&self, answers: &[Forced]) {
        self.platform().forced.extend(answers.iter().copied());
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn start(router: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|err| panic!("mock platform bind: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("mock platform addr: {err}"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        MockPlatform {
            addr,
            state: Arc::new(Mutex::new(Platform::default())),
            server,
        }
    }

    /// A Meta Graph API serving `/{version}/{audience_id}/users` for
    /// `audience_id`, accepting `token` as the bearer.
    pub async fn meta(audience_id: &str, token: &str) -> Self {
        let state = Arc::new(Mutex::new(Platform::default()));
        let config = Arc::new(MetaMock {
            audience_id: audience_id.to_string(),
            token: token.to_string(),
            state: Arc::clone(&state),
        });
        let router = Router::new()
            .route("/{version}/{audience}/users", any(meta_users))
            .with_state(config);
        let mut mock = Self::start(router).await;
        mock.state = state;
        mock
    }

    /// A webhook receiver at `/hook` checking signatures under `secret`.
    pub async fn webhook(secret: &str) -> Self {
        let state = Arc::new(Mutex::new(Platform::default()));
        let config = Arc::new(WebhookMock {
            secret: secret.to_string(),
            state: Arc::clone(&state),
        });
        let router = Router::new()
            .route("/hook", post(webhook_batch))
            .with_state(config);
        let mut mock = Self::start(router).await;
        mock.state = state;
        mock
    }
}

fn lock(state: &Mutex<Platform>) -> MutexGuard<'_, Platform> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

struct MetaMock {
    audience_id: String,
    token: String,
    state: Arc<Mutex<Platform>>,
}

async fn meta_users(
    State(mock): State<Arc<MetaMock>>,
    Path((_version, audience)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = {
        let mut platform = lock(&mock.state);
        platform.requests += 1;
        platform.delay
    };
    tokio::time::sleep(delay).await;
    let mut platform = lock(&mock.state);
    if let Some(answer) = forced(&mut platform) {
        return answer;
    }
    let op = match method {
        Method::POST => "add",
        Method::DELETE => "remove",
        other => return violation(&mut platform, format!("method {other} on /users")),
    };
    if audience != mock.audience_id {
        return violation(&mut platform, format!("unknown audience {audience}"));
    }
    let bearer = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok());
    if bearer != Some(&format!("Bearer {}", mock.token)) {
        platform
            .violations
            .push("missing or wrong access token".into());
        return (StatusCode::UNAUTHORIZED, "invalid OAuth access token").into_response();
    }
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let parse = |name: &str| -> Result<serde_json::Value, String> {
        let text = form.get(name).ok_or(format!("no {name} parameter"))?;
        serde_json::from_str(text).map_err(|err| format!("{name}: {err}"))
    };
    let (payload, session) = match (parse("payload"), parse("session")) {
        (Ok(payload), Ok(session)) => (payload, session),
        (Err(reason), _) | (_, Err(reason)) => return violation(&mut platform, reason),
    };
    if payload["schema"] != serde_json::json!(["EMAIL", "PHONE"]) {
        return violation(&mut platform, format!("schema {}", payload["schema"]));
    }
    let Some(rows) = payload["data"].as_array() else {
        return violation(&mut platform, "data is not an array".into());
    };
    if rows.is_empty() || rows.len() > 10_000 {
        return violation(&mut platform, format!("{} rows (1 to 10,000)", rows.len()));
    }
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let values: Vec<&str> = row
            .as_array()
            .map(|cells| cells.iter().filter_map(|cell| cell.as_str()).collect())
            .unwrap_or_default();
        let valid = values.len() == 2
            && values.iter().any(|value| !value.is_empty())
            && values
                .iter()
                .all(|value| value.is_empty() || is_sha256_hex(value));
        if !valid {
            return violation(
                &mut platform,
                format!("row {row} is not two SHA-256 hashes"),
            );
        }
        keys.push(values.join("|"));
    }
    let (Some(session_id), Some(batch_seq), Some(last_batch)) = (
        session["session_id"].as_u64(),
        session["batch_seq"].as_u64(),
        session["last_batch_flag"].as_bool(),
    ) else {
        return violation(&mut platform, format!("session {session}"));
    };
    for key in keys {
        if op == "add" {
            platform.audience.insert(key);
        } else {
            platform.audience.remove(&key);
        }
    }
    platform.received.push(Received {
        op,
        session_id,
        batch_seq,
        last_batch,
        rows: rows.len(),
        at: Instant::now(),
    });
    let answer = serde_json::json!({
        "audience_id": mock.audience_id,
        "session_id": session_id.to_string(),
        "num_received": rows.len(),
        "num_invalid_entries": 0,
        "invalid_entry_samples": {},
    });
    (StatusCode::OK, answer.to_string()).into_response()
}

struct WebhookMock {
    secret: String,
    state: Arc<Mutex<Platform>>,
}

async fn webhook_batch(
    State(mock): State<Arc<WebhookMock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = {
        let mut platform = lock(&mock.state);
        platform.requests += 1;
        platform.delay
    };
    tokio::time::sleep(delay).await;
    let mut platform = lock(&mock.state);
    if let Some(answer) = forced(&mut platform) {
        return answer;
    }
    let signature = headers
        .get("x-madtech-signature")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if signature != webhook_signature(&mock.secret, &body) {
        platform.violations.push("bad signature".into());
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let Ok(batch) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return violation(&mut platform, "body is not JSON".into());
    };
    let op = match batch["op"].as_str() {
        Some("add") => "add",
        Some("remove") => "remove",
        _ => return violation(&mut platform, format!("op {}", batch["op"])),
    };
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
    else {
        return violation(&mut platform, "no idempotency key".into());
    };
    let members = batch["members"].as_array().cloned().unwrap_or_default();
    let mut ids = Vec::with_capacity(members.len());
    for member in &members {
        let Some(id) = member["id"].as_str() else {
            return violation(&mut platform, "member without id".into());
        };
        ids.push(id.to_string());
        if op == "add" {
            platform.audience.insert(id.to_string());
        } else {
            platform.audience.remove(id);
        }
    }
    platform.batches_by_key.insert(key, ids);
    platform.received.push(Received {
        op,
        session_id: 0,
        batch_seq: batch["batch_seq"].as_u64().unwrap_or(0),
        last_batch: batch["last_batch"].as_bool().unwrap_or(false),
        rows: members.len(),
        at: Instant::now(),
    });
    StatusCode::NO_CONTENT.into_response()
}
