//! The Trade Desk's CRM data upload: for each batch, `POST
//! /crmdata/segment/{advertiser}/{crm data id}` asks for a drop URL for
//! UID2-hashed emails (`PiiType: EmailHashedUnifiedId2`) to add or remove
//! (`MergeMode`), and the batch is then posted to that URL as one SHA-256 per
//! line, base64-encoded. Authentication is the `TTD-Auth` header.
//!
//! The hashes must be of UID2-normalised emails: the identifiers policy gives
//! `the_trade_desk` the `sha256_uid2` form.

use base64::Engine;
use reqwest::Method;
use serde::Deserialize;

use super::http::Prepared;
use super::{Batch, DeliveryError, Op};

pub const MAX_PEOPLE_PER_DROP: usize = 100_000;

pub struct Account<'a> {
    pub base_url: &'a str,
    pub advertiser_id: &'a str,
    pub crm_data_id: &'a str,
    pub auth_token: &'a str,
}

impl Account<'_> {
    pub fn drop_request(&self, op: Op) -> Result<Prepared, DeliveryError> {
        let body = serde_json::json!({
            "PiiType": "EmailHashedUnifiedId2",
            "MergeMode": match op {
                Op::Add => "Add",
                Op::Remove => "Remove",
            },
        });
        let body = serde_json::to_vec(&body)
            .map_err(|err| DeliveryError::Unshapeable(format!("the trade desk: {err}")))?;
        Prepared::json(
            Method::POST,
            format!(
                "{}/crmdata/segment/{}/{}",
                self.base_url, self.advertiser_id, self.crm_data_id
            ),
            body,
        )
        .credential(
            reqwest::header::HeaderName::from_static("ttd-auth"),
            self.auth_token,
        )
    }
}

/// The batch's UID2 email hashes, base64 as The Trade Desk takes them, one
/// per line; `None` when no member has an email.
pub fn drop_body(batch: Batch<'_>) -> Result<Option<Vec<u8>>, DeliveryError> {
    let mut body = String::new();
    for member in batch.members {
        for identifier in member.identifiers.iter().filter(|i| i.kind == "email") {
            let bytes = hex::decode(&identifier.sha256).map_err(|_| {
                DeliveryError::Unshapeable("the trade desk: a hash is not hex".into())
            })?;
            body.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
            body.push('\n');
        }
    }
    Ok((!body.is_empty()).then(|| body.into_bytes()))
}

#[derive(Deserialize)]
struct DropAnswer {
    #[serde(rename = "Url")]
    url: String,
}

/// The drop URL from the platform's answer. It must be HTTPS, or on the
/// same host as the API (a local mock): the batch is not sent anywhere the
/// platform did not plausibly name.
pub fn drop_url(answer: &[u8], base_url: &str) -> Result<String, DeliveryError> {
    let answer: DropAnswer = serde_json::from_slice(answer).map_err(|err| {
        DeliveryError::Unshapeable(format!("the trade desk: unexpected drop answer: {err}"))
    })?;
    let url = reqwest::Url::parse(&answer.url).map_err(|_| {
        DeliveryError::Unshapeable("the trade desk: the drop URL is not a URL".into())
    })?;
    let base = reqwest::Url::parse(base_url)
        .map_err(|_| DeliveryError::Unshapeable("the trade desk: bad base URL".into()))?;
    let same_host = url.host_str() == base.host_str() && url.port() == base.port();
    if url.scheme() == "https" || same_host {
        Ok(answer.url)
    } else {
        Err(DeliveryError::Unshapeable(
            "the trade desk: the drop URL is neither HTTPS nor on the API's host".into(),
        ))
    }
}

pub fn upload(url: String, body: Vec<u8>) -> Prepared {
    Prepared::new(Method::POST, url, "text/plain", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::{HashedIdentifier, Member};

    #[test]
    fn emails_go_base64_one_per_line() {
        // UID2's published vector: "user@example.com" (testdata `uid2_email_1`).
        let members = [
            Member {
                id: "p1".into(),
                identifiers: vec![HashedIdentifier {
                    kind: "email".into(),
                    sha256: "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"
                        .into(),
                }],
            },
            Member {
                id: "p2".into(),
                identifiers: vec![HashedIdentifier {
                    kind: "phone".into(),
                    sha256: "00".into(),
                }],
            },
        ];
        let batch = Batch {
            op: Op::Add,
            session: "s",
            seq: 1,
            last: true,
            total: 2,
            purpose: "ad_targeting",
            members: &members,
        };
        let body = drop_body(batch).expect("shaped").expect("an email");
        assert_eq!(
            String::from_utf8(body).expect("utf-8"),
            "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ=\n"
        );
        let none = Batch {
            members: &members[1..],
            ..batch
        };
        assert!(drop_body(none).expect("shaped").is_none());
    }

    #[test]
    fn drops_ask_for_uid2_emails_with_the_merge_mode() {
        let account = Account {
            base_url: "https://api.thetradedesk.com/v3",
            advertiser_id: "adv1",
            crm_data_id: "crm9",
            auth_token: "tok",
        };
        let request = account.drop_request(Op::Remove).expect("shaped");
        assert_eq!(
            request.url,
            "https://api.thetradedesk.com/v3/crmdata/segment/adv1/crm9"
        );
        assert_eq!(request.headers["ttd-auth"], "tok");
        assert!(request.headers["ttd-auth"].is_sensitive());
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"PiiType": "EmailHashedUnifiedId2", "MergeMode": "Remove"})
        );
    }

    #[test]
    fn drop_urls_must_be_https_or_on_the_api_host() {
        let base = "http://127.0.0.1:9000/v3";
        let answer = |url: &str| {
            serde_json::to_vec(&serde_json::json!({"ReferenceId": "r", "Url": url})).expect("json")
        };
        assert!(drop_url(&answer("https://drop.example/abc"), base).is_ok());
        assert!(drop_url(&answer("http://127.0.0.1:9000/drop/1"), base).is_ok());
        assert!(drop_url(&answer("http://169.254.169.254/latest"), base).is_err());
        assert!(drop_url(b"{}", base).is_err());
    }
}
