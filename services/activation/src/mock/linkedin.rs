//! LinkedIn's `/rest/dmpSegments/{segment}/users` with `X-RestLi-Method:
//! BATCH_CREATE`: checked headers, at most 5,000 elements, each `ADD` or
//! `REMOVE` with SHA-256 email ids; a status per element.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::{Platform, Received, arrive, has_bearer, is_sha256_hex, lock, violation};

struct LinkedinMock {
    segment_id: String,
    token: String,
    state: Arc<Mutex<Platform>>,
}

pub(super) fn router(segment_id: String, token: String, state: Arc<Mutex<Platform>>) -> Router {
    let mock = Arc::new(LinkedinMock {
        segment_id,
        token,
        state,
    });
    Router::new()
        .route("/rest/dmpSegments/{segment}/users", post(segment_users))
        .with_state(mock)
}

async fn segment_users(
    State(mock): State<Arc<LinkedinMock>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    if !has_bearer(&headers, &mock.token) {
        platform.violations.push("missing or wrong bearer".into());
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if header("x-restli-method") != Some("BATCH_CREATE")
        || header("x-restli-protocol-version") != Some("2.0.0")
        || header("linkedin-version").is_none_or(|v| v.len() != 6)
    {
        return violation(&mut platform, "missing Rest.li or version headers".into());
    }
    if segment != mock.segment_id {
        return violation(&mut platform, format!("unknown segment {segment}"));
    }
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let elements = request["elements"].as_array().cloned().unwrap_or_default();
    if elements.is_empty() || elements.len() > 5_000 {
        return violation(&mut platform, format!("{} elements", elements.len()));
    }
    let mut op = "add";
    for element in &elements {
        op = match element["action"].as_str() {
            Some("ADD") => "add",
            Some("REMOVE") => "remove",
            _ => return violation(&mut platform, format!("action in {element}")),
        };
        for id in element["userIds"].as_array().into_iter().flatten() {
            let value = id["idValue"].as_str().unwrap_or_default();
            if id["idType"] != "SHA256_EMAIL" || !is_sha256_hex(value) {
                return violation(&mut platform, format!("user id {id}"));
            }
            if op == "add" {
                platform.audience.insert(value.to_string());
            } else {
                platform.audience.remove(value);
            }
        }
    }
    platform.received.push(Received {
        op,
        session_id: 0,
        batch_seq: 0,
        last_batch: true,
        rows: elements.len(),
        at: Instant::now(),
    });
    let statuses: Vec<serde_json::Value> = elements
        .iter()
        .map(|_| serde_json::json!({"status": 201}))
        .collect();
    (
        StatusCode::OK,
        serde_json::json!({"elements": statuses}).to_string(),
    )
        .into_response()
}
