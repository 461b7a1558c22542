//! Meta Custom Audiences (Marketing API, `/{audience_id}/users`): `POST` adds
//! and `DELETE` removes, at most 10,000 users per request, form-encoded
//! `payload` (`schema` + `data`, multi-key rows) and `session` (one id per
//! sync and operation, `batch_seq` from 1, `last_batch_flag`), as documented
//! at developers.facebook.com/docs/marketing-api/audiences/guides/custom-audiences.
//!
//! Meta matches on SHA-256 of normalised email and phone. Mobile advertiser
//! ids must reach Meta unhashed, which the crossing never releases, so they
//! are not sent.

use reqwest::Method;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::http::Prepared;
use super::{Batch, DeliveryError, Op};

pub const MAX_USERS_PER_REQUEST: usize = 10_000;
/// The multi-key schema: one column per identifier kind Meta matches on.
const SCHEMA: [(&str, &str); 2] = [("EMAIL", "email"), ("PHONE", "phone")];

#[derive(Serialize)]
struct Payload<'a> {
    schema: [&'static str; 2],
    data: Vec<[&'a str; 2]>,
}

#[derive(Serialize)]
struct Session {
    session_id: u64,
    batch_seq: u32,
    last_batch_flag: bool,
    estimated_num_total: u64,
}

/// Meta wants a 64-bit session id of our choosing; one derived from the
/// sync's session and the operation is the same when a batch is resent.
pub fn session_id(session: &str, op: Op) -> u64 {
    let digest = Sha256::digest(format!("{session}/{}", op.as_str()).as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // Positive when read as a signed integer, as Graph API ids are.
    u64::from_be_bytes(bytes) >> 1
}

/// The request for one batch, or `None` when no member has an identifier
/// Meta can match on (nothing to send).
pub fn request(
    base_url: &str,
    audience_id: &str,
    batch: Batch<'_>,
) -> Result<Option<Prepared>, DeliveryError> {
    let data: Vec<[&str; 2]> = batch
        .members
        .iter()
        .filter_map(|member| {
            let column = |kind: &str| {
                member
                    .identifiers
                    .iter()
                    .find(|identifier| identifier.kind == kind)
                    .map_or("", |identifier| identifier.sha256.as_str())
            };
            let row = SCHEMA.map(|(_, kind)| column(kind));
            row.iter().any(|value| !value.is_empty()).then_some(row)
        })
        .collect();
    if data.is_empty() {
        return Ok(None);
    }
    let payload = Payload {
        schema: SCHEMA.map(|(column, _)| column),
        data,
    };
    let session = Session {
        session_id: session_id(batch.session, batch.op),
        batch_seq: batch.seq,
        last_batch_flag: batch.last,
        estimated_num_total: batch.total,
    };
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &to_json(&payload)?)
        .append_pair("session", &to_json(&session)?)
        .finish();
    let method = match batch.op {
        Op::Add => Method::POST,
        Op::Remove => Method::DELETE,
    };
    Ok(Some(Prepared::new(
        method,
        format!("{base_url}/{audience_id}/users"),
        "application/x-www-form-urlencoded",
        body.into_bytes(),
    )))
}

fn to_json(value: &impl Serialize) -> Result<String, DeliveryError> {
    serde_json::to_string(value)
        .map_err(|err| DeliveryError::Unshapeable(format!("meta payload: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::{HashedIdentifier, Member};

    fn member(id: &str, identifiers: &[(&str, &str)]) -> Member {
        Member {
            id: id.into(),
            identifiers: identifiers
                .iter()
                .map(|(kind, sha)| HashedIdentifier {
                    kind: (*kind).into(),
                    sha256: (*sha).into(),
                })
                .collect(),
        }
    }

    fn form(request: &Prepared) -> std::collections::HashMap<String, serde_json::Value> {
        form_urlencoded::parse(&request.body)
            .map(|(k, v)| (k.into_owned(), serde_json::from_str(&v).expect("json")))
            .collect()
    }

    #[test]
    fn batches_are_multi_key_rows_in_a_session() {
        // Meta's own example hash of `test1@example.com` (testdata `meta_email`).
        let email = "9b431636bd164765d63c573c346708846af4f68fe3701a77a3bdd7e7e5166254";
        let members = [
            member("p1", &[("email", email), ("phone", "ph")]),
            member("p2", &[("phone", "ph2"), ("maid", "m")]),
            member("p3", &[("maid", "only-a-maid")]),
        ];
        let batch = Batch {
            op: Op::Add,
            session: "run-1",
            seq: 2,
            last: true,
            total: 10_003,
            purpose: "ad_targeting",
            members: &members,
        };
        let request = request("http://127.0.0.1:9/v21.0", "123", batch)
            .expect("shaped")
            .expect("something to send");
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.url, "http://127.0.0.1:9/v21.0/123/users");
        let form = form(&request);
        assert_eq!(
            form["payload"],
            serde_json::json!({
                "schema": ["EMAIL", "PHONE"],
                "data": [[email, "ph"], ["", "ph2"]],
            }),
            "a member Meta cannot match is left out"
        );
        assert_eq!(form["session"]["batch_seq"], 2);
        assert_eq!(form["session"]["last_batch_flag"], true);
        assert_eq!(form["session"]["estimated_num_total"], 10_003);
        assert_eq!(
            form["session"]["session_id"],
            session_id("run-1", Op::Add),
            "the same batch resent is the same session"
        );
        assert_ne!(
            session_id("run-1", Op::Add),
            session_id("run-1", Op::Remove)
        );
        assert!(session_id("run-1", Op::Add) <= i64::MAX as u64);
    }

    #[test]
    fn removals_are_deletes_and_empty_batches_send_nothing() {
        let members = [member("p1", &[("email", "e")])];
        let batch = Batch {
            op: Op::Remove,
            session: "s",
            seq: 1,
            last: true,
            total: 1,
            purpose: "ad_targeting",
            members: &members,
        };
        let request = request("https://graph.facebook.com/v21.0", "9", batch)
            .expect("shaped")
            .expect("sent");
        assert_eq!(request.method, Method::DELETE);
        let unmatched = [member("p3", &[("maid", "m")])];
        let batch = Batch {
            members: &unmatched,
            ..batch
        };
        assert!(request_is_none(batch));
    }

    fn request_is_none(batch: Batch<'_>) -> bool {
        request("https://x", "9", batch).expect("shaped").is_none()
    }
}
