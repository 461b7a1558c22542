//! LinkedIn Matched Audiences (Marketing API, versioned): `POST
//! /dmpSegments/{segment}/users` with `X-RestLi-Method: BATCH_CREATE`, one
//! element per person with `action` `ADD` or `REMOVE` and its SHA-256
//! email (`SHA256_EMAIL`, hex). The answer holds a status per element; any
//! element refused refuses the batch.

use reqwest::Method;
use serde::Deserialize;

use super::http::Prepared;
use super::{Batch, DeliveryError, Op};

/// People per request.
pub const MAX_PEOPLE_PER_REQUEST: usize = 5_000;
/// The Marketing API version requests are made against.
pub const API_VERSION: &str = "202411";

pub fn request(
    base_url: &str,
    segment_id: &str,
    access_token: &str,
    batch: Batch<'_>,
) -> Result<Option<Prepared>, DeliveryError> {
    let action = match batch.op {
        Op::Add => "ADD",
        Op::Remove => "REMOVE",
    };
    let elements: Vec<serde_json::Value> = batch
        .members
        .iter()
        .filter_map(|member| {
            let ids: Vec<serde_json::Value> = member
                .identifiers
                .iter()
                .filter(|identifier| identifier.kind == "email")
                .map(|identifier| {
                    serde_json::json!({"idType": "SHA256_EMAIL", "idValue": identifier.sha256})
                })
                .collect();
            (!ids.is_empty()).then(|| serde_json::json!({"action": action, "userIds": ids}))
        })
        .collect();
    if elements.is_empty() {
        return Ok(None);
    }
    let body = serde_json::to_vec(&serde_json::json!({"elements": elements}))
        .map_err(|err| DeliveryError::Unshapeable(format!("linkedin: {err}")))?;
    Prepared::json(
        Method::POST,
        format!("{base_url}/dmpSegments/{segment_id}/users"),
        body,
    )
    .bearer(access_token)?
    .header("linkedin-version", API_VERSION)?
    .header("x-restli-protocol-version", "2.0.0")?
    .header("x-restli-method", "BATCH_CREATE")
    .map(Some)
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    elements: Vec<ElementStatus>,
}

#[derive(Deserialize)]
struct ElementStatus {
    status: u16,
}

/// Refuses the batch when LinkedIn refused any of its elements.
pub fn check_answer(answer: &[u8]) -> Result<(), DeliveryError> {
    let answer: BatchAnswer = serde_json::from_slice(answer)
        .map_err(|err| DeliveryError::Unshapeable(format!("linkedin: unexpected answer: {err}")))?;
    let refused: Vec<u16> = answer
        .elements
        .iter()
        .map(|element| element.status)
        .filter(|status| *status >= 400)
        .collect();
    match refused.first() {
        None => Ok(()),
        Some(status) => Err(DeliveryError::Refused {
            status: *status,
            reason: format!(
                "{} of {} elements refused",
                refused.len(),
                answer.elements.len()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::{HashedIdentifier, Member};

    #[test]
    fn one_element_per_person_with_a_hashed_email() {
        let members = [
            Member {
                id: "p1".into(),
                identifiers: vec![HashedIdentifier {
                    kind: "email".into(),
                    sha256: "abc".into(),
                }],
            },
            Member {
                id: "p2".into(),
                identifiers: vec![HashedIdentifier {
                    kind: "phone".into(),
                    sha256: "def".into(),
                }],
            },
        ];
        let batch = Batch {
            op: Op::Remove,
            session: "s",
            seq: 1,
            last: true,
            total: 2,
            purpose: "ad_targeting",
            members: &members,
        };
        let request = request("https://api.linkedin.com/rest", "10804", "tok", batch)
            .expect("shaped")
            .expect("an email");
        assert_eq!(
            request.url,
            "https://api.linkedin.com/rest/dmpSegments/10804/users"
        );
        assert_eq!(request.headers["x-restli-method"], "BATCH_CREATE");
        assert_eq!(request.headers["linkedin-version"], API_VERSION);
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"elements": [
                {"action": "REMOVE", "userIds": [{"idType": "SHA256_EMAIL", "idValue": "abc"}]},
            ]})
        );
    }

    #[test]
    fn a_refused_element_refuses_the_batch() {
        assert!(check_answer(br#"{"elements":[{"status":201},{"status":201}]}"#).is_ok());
        let refused =
            check_answer(br#"{"elements":[{"status":201},{"status":400}]}"#).expect_err("refused");
        assert!(matches!(
            refused,
            DeliveryError::Refused { status: 400, .. }
        ));
        assert!(check_answer(b"nope").is_err());
    }
}
