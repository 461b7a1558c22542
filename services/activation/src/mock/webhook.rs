//! A webhook receiver: signed JSON batches with idempotency keys.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::{Platform, Received, arrive, lock, violation};
use crate::destination::webhook_signature;

pub(super) fn router(secret: String, state: Arc<Mutex<Platform>>) -> Router {
    let mock = Arc::new(WebhookMock { secret, state });
    Router::new()
        .route("/hook", post(webhook_batch))
        .with_state(mock)
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
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
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
