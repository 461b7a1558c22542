//! The Google Ads API's offline user data jobs for one Customer Match list:
//! `offlineUserDataJobs:create`, `:addOperations` (100,000 identifiers at
//! most, hashed email and phone only), `:run`, which applies the job to the
//! list. Developer token and bearer are checked on every call. With an
//! OAuth client, `POST /token` mints bearers from the refresh token (RFC
//! 6749, section 6) and only minted, unexpired bearers are accepted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::{Platform, Received, arrive, has_bearer, is_sha256_hex, lock, violation};

pub(super) struct Account {
    pub customer_id: String,
    pub list_id: String,
    /// The fixed bearer accepted, when there is no OAuth client.
    pub token: String,
    pub developer_token: String,
    pub oauth: Option<OAuthClient>,
}

/// The OAuth client the mock's token endpoint knows.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// Lifetime of each minted access token.
    pub expires_in: Duration,
}

#[derive(Default)]
struct Jobs {
    next: u64,
    /// Operations added per job: (op, identifier hashes).
    pending: BTreeMap<u64, Vec<(&'static str, Vec<String>)>>,
}

struct GoogleMock {
    account: Account,
    jobs: Mutex<Jobs>,
    /// Access tokens minted, with when each expires.
    minted: Mutex<Vec<(String, Instant)>>,
    state: Arc<Mutex<Platform>>,
}

pub(super) fn router(account: Account, state: Arc<Mutex<Platform>>) -> Router {
    let mock = Arc::new(GoogleMock {
        account,
        jobs: Mutex::new(Jobs::default()),
        minted: Mutex::new(Vec::new()),
        state,
    });
    Router::new()
        .route("/token", post(mint_token))
        .route("/{version}/customers/{customer}/{call}", post(create_job))
        .route(
            "/{version}/customers/{customer}/offlineUserDataJobs/{call}",
            post(job_call),
        )
        .with_state(mock)
}

/// The refusal for a call without the bearer and developer token, if so.
fn refuse_unauthorised(
    mock: &GoogleMock,
    platform: &mut Platform,
    headers: &HeaderMap,
) -> Option<Response> {
    let bearer_valid = match &mock.account.oauth {
        None => has_bearer(headers, &mock.account.token),
        Some(_) => {
            let now = Instant::now();
            let minted = mock.minted.lock().unwrap_or_else(|p| p.into_inner());
            minted
                .iter()
                .any(|(token, expires)| *expires > now && has_bearer(headers, token))
        }
    };
    let authorised = bearer_valid
        && headers
            .get("developer-token")
            .and_then(|value| value.to_str().ok())
            == Some(mock.account.developer_token.as_str());
    if authorised {
        return None;
    }
    platform
        .violations
        .push("missing developer token or bearer".into());
    Some((StatusCode::UNAUTHORIZED, "UNAUTHENTICATED").into_response())
}

/// The token endpoint: a form-encoded refresh-token grant for the known
/// client answers a new bearer and its lifetime; anything else is
/// `invalid_grant` or `invalid_client`, as RFC 6749 section 5.2 says.
async fn mint_token(State(mock): State<Arc<GoogleMock>>, body: Bytes) -> Response {
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    let Some(client) = &mock.account.oauth else {
        return violation(&mut platform, "token: no OAuth client configured".into());
    };
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str);
    if field("client_id") != Some(&client.client_id)
        || field("client_secret") != Some(&client.client_secret)
    {
        platform.violations.push("token: wrong client".into());
        return (StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#).into_response();
    }
    if field("grant_type") != Some("refresh_token")
        || field("refresh_token") != Some(&client.refresh_token)
    {
        platform.violations.push("token: wrong grant".into());
        return (StatusCode::BAD_REQUEST, r#"{"error":"invalid_grant"}"#).into_response();
    }
    platform.tokens_issued += 1;
    let token = format!("ya29.mock-{}", platform.tokens_issued);
    mock.minted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((token.clone(), Instant::now() + client.expires_in));
    (
        StatusCode::OK,
        serde_json::json!({
            "access_token": token,
            "expires_in": client.expires_in.as_secs(),
            "token_type": "Bearer",
        })
        .to_string(),
    )
        .into_response()
}

async fn create_job(
    State(mock): State<Arc<GoogleMock>>,
    Path((_version, customer, call)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    if let Some(refused) = refuse_unauthorised(&mock, &mut platform, &headers) {
        return refused;
    }
    if call != "offlineUserDataJobs:create" || customer != mock.account.customer_id {
        return violation(&mut platform, format!("unexpected call {customer}/{call}"));
    }
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return violation(&mut platform, "create: body is not JSON".into());
    };
    let job = &request["job"];
    let list = format!(
        "customers/{}/userLists/{}",
        mock.account.customer_id, mock.account.list_id
    );
    let consent = &job["customerMatchUserListMetadata"]["consent"];
    let valid = job["type"] == "CUSTOMER_MATCH_USER_LIST"
        && job["customerMatchUserListMetadata"]["userList"] == list.as_str()
        && consent["adUserData"] == "GRANTED"
        && matches!(
            consent["adPersonalization"].as_str(),
            Some("GRANTED" | "DENIED")
        );
    if !valid {
        return violation(&mut platform, format!("create: job {job}"));
    }
    let mut jobs = mock.jobs.lock().unwrap_or_else(|p| p.into_inner());
    jobs.next += 1;
    let id = jobs.next;
    jobs.pending.insert(id, Vec::new());
    let name = format!(
        "customers/{}/offlineUserDataJobs/{id}",
        mock.account.customer_id
    );
    (
        StatusCode::OK,
        serde_json::json!({"resourceName": name}).to_string(),
    )
        .into_response()
}

async fn job_call(
    State(mock): State<Arc<GoogleMock>>,
    Path((_version, customer, call)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    if let Some(refused) = refuse_unauthorised(&mock, &mut platform, &headers) {
        return refused;
    }
    let mut jobs = mock.jobs.lock().unwrap_or_else(|p| p.into_inner());
    let (id, action) = call.split_once(':').unwrap_or((&call, ""));
    let id: u64 = id.parse().unwrap_or(0);
    if customer != mock.account.customer_id || !jobs.pending.contains_key(&id) {
        return violation(&mut platform, format!("unknown job {customer}/{call}"));
    }
    match action {
        "addOperations" => {
            let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return violation(&mut platform, "addOperations: body is not JSON".into());
            };
            let operations = request["operations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut identifiers = 0;
            let mut added = Vec::new();
            for operation in &operations {
                let (op, data) = match (operation.get("create"), operation.get("remove")) {
                    (Some(data), None) => ("add", data),
                    (None, Some(data)) => ("remove", data),
                    _ => return violation(&mut platform, format!("operation {operation}")),
                };
                let mut hashes = Vec::new();
                for identifier in data["userIdentifiers"].as_array().into_iter().flatten() {
                    let hash = identifier["hashedEmail"]
                        .as_str()
                        .or(identifier["hashedPhoneNumber"].as_str())
                        .unwrap_or_default();
                    if !is_sha256_hex(hash) {
                        return violation(&mut platform, format!("identifier {identifier}"));
                    }
                    hashes.push(hash.to_string());
                }
                identifiers += hashes.len();
                added.push((op, hashes));
            }
            if operations.is_empty() || identifiers > 100_000 {
                return violation(
                    &mut platform,
                    format!(
                        "{identifiers} identifiers in {} operations",
                        operations.len()
                    ),
                );
            }
            jobs.pending.entry(id).or_default().extend(added);
            (StatusCode::OK, "{}").into_response()
        }
        "run" => {
            let Some(operations) = jobs.pending.remove(&id) else {
                return violation(&mut platform, format!("job {id} ran twice"));
            };
            let op = operations.first().map_or("add", |(op, _)| *op);
            for (op, hashes) in &operations {
                for hash in hashes {
                    if *op == "add" {
                        platform.audience.insert(hash.clone());
                    } else {
                        platform.audience.remove(hash);
                    }
                }
            }
            platform.received.push(Received {
                op,
                session_id: id,
                batch_seq: 0,
                last_batch: true,
                rows: operations.len(),
                at: Instant::now(),
            });
            let operation = format!("customers/{customer}/operations/{id}");
            (
                StatusCode::OK,
                serde_json::json!({"name": operation}).to_string(),
            )
                .into_response()
        }
        other => violation(&mut platform, format!("unknown job call {other}")),
    }
}
