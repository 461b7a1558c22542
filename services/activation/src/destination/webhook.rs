//! The webhook destination, for platforms we do not ship: JSON batches
//! `POST`ed to an HTTPS endpoint. The body is signed with HMAC-SHA256 under
//! the destination's secret (`x-madtech-signature: sha256=<hex>`), so the
//! receiver can tell it came from us unaltered, and each batch carries an
//! `idempotency-key` that stays the same when the batch is resent.

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde::Serialize;
use sha2::Sha256;

use super::http::Prepared;
use super::{Batch, DeliveryError, HashedIdentifier, Op};

pub const SIGNATURE_HEADER: &str = "x-madtech-signature";

#[derive(Serialize)]
struct Body<'a> {
    op: Op,
    session: &'a str,
    batch_seq: u32,
    last_batch: bool,
    members: Vec<BodyMember<'a>>,
}

#[derive(Serialize)]
struct BodyMember<'a> {
    id: &'a str,
    identifiers: &'a [HashedIdentifier],
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn request(url: &str, secret: &str, batch: Batch<'_>) -> Result<Prepared, DeliveryError> {
    let body = Body {
        op: batch.op,
        session: batch.session,
        batch_seq: batch.seq,
        last_batch: batch.last,
        members: batch
            .members
            .iter()
            .map(|member| BodyMember {
                id: &member.id,
                identifiers: &member.identifiers,
            })
            .collect(),
    };
    let body = serde_json::to_vec(&body)
        .map_err(|err| DeliveryError::Unshapeable(format!("webhook body: {err}")))?;
    let signed = signature(secret, &body);
    let key = format!("{}/{}/{}", batch.session, batch.op.as_str(), batch.seq);
    Prepared::json(Method::POST, url.to_string(), body)
        .header(SIGNATURE_HEADER, &signed)?
        .header("idempotency-key", &key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Member;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn batches_are_signed_json_with_a_stable_idempotency_key() {
        let members = [Member {
            id: "p1".into(),
            identifiers: vec![HashedIdentifier {
                kind: "email".into(),
                sha256: "ab".into(),
            }],
        }];
        let batch = Batch {
            op: Op::Remove,
            session: "run-7",
            seq: 3,
            last: false,
            total: 5,
            purpose: "ad_targeting",
            members: &members,
        };
        let request = request("https://hooks.example/x", "k", batch).expect("shaped");
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({
                "op": "remove", "session": "run-7", "batch_seq": 3, "last_batch": false,
                "members": [{"id": "p1", "identifiers": [{"kind": "email", "sha256": "ab"}]}],
            })
        );
        assert_eq!(
            request.headers[SIGNATURE_HEADER],
            signature("k", &request.body).as_str()
        );
        assert_eq!(request.headers["idempotency-key"], "run-7/remove/3");
    }
}
