//! The Trade Desk's CRM data: `POST /v3/crmdata/segment/{advertiser}/{crm
//! data id}` (checked `TTD-Auth`, `PiiType`, `MergeMode`) answers a drop URL
//! on the mock, where the batch arrives as base64 SHA-256 hashes, one per
//! line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;

use super::{Platform, Received, arrive, lock, violation};

pub(super) struct Account {
    pub advertiser_id: String,
    pub crm_data_id: String,
    pub token: String,
}

struct TradeDeskMock {
    account: Account,
    addr: SocketAddr,
    /// Drops handed out and not yet used: id → merge mode.
    drops: Mutex<(u64, BTreeMap<u64, &'static str>)>,
    state: Arc<Mutex<Platform>>,
}

pub(super) fn router(account: Account, addr: SocketAddr, state: Arc<Mutex<Platform>>) -> Router {
    let mock = Arc::new(TradeDeskMock {
        account,
        addr,
        drops: Mutex::new((0, BTreeMap::new())),
        state,
    });
    Router::new()
        .route(
            "/{version}/crmdata/segment/{advertiser}/{crm}",
            post(ask_drop),
        )
        .route("/drop/{id}", post(drop_batch))
        .with_state(mock)
}

async fn ask_drop(
    State(mock): State<Arc<TradeDeskMock>>,
    Path((_version, advertiser, crm)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    let auth = headers
        .get("ttd-auth")
        .and_then(|value| value.to_str().ok());
    if auth != Some(mock.account.token.as_str()) {
        platform.violations.push("missing or wrong TTD-Auth".into());
        return (StatusCode::FORBIDDEN, "invalid token").into_response();
    }
    if advertiser != mock.account.advertiser_id || crm != mock.account.crm_data_id {
        return violation(&mut platform, format!("unknown segment {advertiser}/{crm}"));
    }
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mode = match request["MergeMode"].as_str() {
        Some("Add") => "add",
        Some("Remove") => "remove",
        _ => return violation(&mut platform, format!("merge mode in {request}")),
    };
    if request["PiiType"] != "EmailHashedUnifiedId2" {
        return violation(&mut platform, format!("pii type in {request}"));
    }
    let mut drops = mock.drops.lock().unwrap_or_else(|p| p.into_inner());
    drops.0 += 1;
    let id = drops.0;
    drops.1.insert(id, mode);
    let url = format!("http://{}/drop/{id}", mock.addr);
    let answer = serde_json::json!({"ReferenceId": format!("ref-{id}"), "Url": url});
    (StatusCode::OK, answer.to_string()).into_response()
}

async fn drop_batch(
    State(mock): State<Arc<TradeDeskMock>>,
    Path(id): Path<u64>,
    body: Bytes,
) -> Response {
    if let Some(answer) = arrive(&mock.state).await {
        return answer;
    }
    let mut platform = lock(&mock.state);
    let Some(mode) = mock
        .drops
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .1
        .remove(&id)
    else {
        return violation(&mut platform, format!("drop {id} unknown or used"));
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut hashes = Vec::new();
    for line in text.lines() {
        match base64::engine::general_purpose::STANDARD.decode(line) {
            Ok(bytes) if bytes.len() == 32 => hashes.push(hex::encode(bytes)),
            _ => {
                return violation(
                    &mut platform,
                    format!("line {line:?} is not a base64 SHA-256"),
                );
            }
        }
    }
    for hash in &hashes {
        if mode == "add" {
            platform.audience.insert(hash.clone());
        } else {
            platform.audience.remove(hash);
        }
    }
    platform.received.push(Received {
        op: mode,
        session_id: id,
        batch_seq: 0,
        last_batch: true,
        rows: hashes.len(),
        at: Instant::now(),
    });
    StatusCode::OK.into_response()
}
