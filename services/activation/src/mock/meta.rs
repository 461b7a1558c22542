//! Meta's `/{audience_id}/users`: form-encoded `payload` and `session`,
//! multi-key rows of SHA-256 email and phone, 10,000 at most.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::{Platform, Received, arrive, has_bearer, is_sha256_hex, lock, violation};

pub(super) fn router(audience_id: String, token: String, state: Arc<Mutex<Platform>>) -> Router {
    let mock = Arc::new(MetaMock {
        audience_id,
        token,
        state,
    });
    Router::new()
        .route("/{version}/{audience}/users", any(meta_users))
        .with_state(mock)
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
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    let op = match method {
        Method::POST => "add",
        Method::DELETE => "remove",
        other => return violation(&mut platform, format!("method {other} on /users")),
    };
    if audience != mock.audience_id {
        return violation(&mut platform, format!("unknown audience {audience}"));
    }
    if !has_bearer(&headers, &mock.token) {
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
    if !platform.forget_audience {
        for key in keys {
            if op == "add" {
                platform.audience.insert(key);
            } else {
                platform.audience.remove(&key);
            }
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
