//! Google Ads Customer Match, through offline user data jobs (Google Ads API,
//! REST): a batch is one job — `offlineUserDataJobs:create` for the user
//! list (with the EU user consent fields), `:addOperations` with a `create`
//! or `remove` operation per person (hashed email, hashed E.164 phone), then
//! `:run`. At most 100,000 identifiers per `addOperations` request; a person
//! carries at most two, so batches hold 50,000 people.
//!
//! Mobile advertiser ids must reach Google unhashed, which the crossing never
//! releases, so they are not sent.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::http::Prepared;
use super::{Batch, DeliveryError, Op};

pub const MAX_IDENTIFIERS_PER_REQUEST: usize = 100_000;
/// Email and phone: the identifiers a person may carry to Google.
pub const MAX_PEOPLE_PER_BATCH: usize = MAX_IDENTIFIERS_PER_REQUEST / 2;

/// The purpose for which people may see personalised ads; any other
/// purpose sends `adPersonalization: DENIED`. Everyone sent was let
/// through by the consent policy for the activation's purpose, so
/// `adUserData` is always granted.
const PERSONALISATION_PURPOSE: &str = "ad_targeting";

/// Where one Customer Match list is, and the credentials to reach it.
pub struct Account<'a> {
    pub base_url: &'a str,
    pub customer_id: &'a str,
    pub user_list_id: &'a str,
    pub login_customer_id: &'a str,
    pub access_token: &'a str,
    pub developer_token: &'a str,
}

impl Account<'_> {
    fn request(&self, url: String, body: Vec<u8>) -> Result<Prepared, DeliveryError> {
        let request = Prepared::json(Method::POST, url, body)
            .bearer(self.access_token)?
            .header("developer-token", self.developer_token)?;
        if self.login_customer_id.is_empty() {
            Ok(request)
        } else {
            request.header("login-customer-id", self.login_customer_id)
        }
    }

    /// Creates the job for one batch.
    pub fn create_job(&self, purpose: &str) -> Result<Prepared, DeliveryError> {
        let personalization = if purpose == PERSONALISATION_PURPOSE {
            "GRANTED"
        } else {
            "DENIED"
        };
        let body = serde_json::json!({
            "job": {
                "type": "CUSTOMER_MATCH_USER_LIST",
                "customerMatchUserListMetadata": {
                    "userList": format!("customers/{}/userLists/{}", self.customer_id, self.user_list_id),
                    "consent": {
                        "adUserData": "GRANTED",
                        "adPersonalization": personalization,
                    },
                },
            },
        });
        self.request(
            format!(
                "{}/customers/{}/offlineUserDataJobs:create",
                self.base_url, self.customer_id
            ),
            to_json(&body)?,
        )
    }

    /// Adds the batch's people to the job, or `None` when none of them has
    /// an identifier Google matches on.
    pub fn add_operations(
        &self,
        job: &str,
        batch: Batch<'_>,
    ) -> Result<Option<Prepared>, DeliveryError> {
        let operations: Vec<serde_json::Value> = batch
            .members
            .iter()
            .filter_map(|member| {
                let identifiers: Vec<serde_json::Value> = member
                    .identifiers
                    .iter()
                    .filter_map(|identifier| match identifier.kind.as_str() {
                        "email" => Some(serde_json::json!({"hashedEmail": identifier.sha256})),
                        "phone" => {
                            Some(serde_json::json!({"hashedPhoneNumber": identifier.sha256}))
                        }
                        _ => None,
                    })
                    .collect();
                if identifiers.is_empty() {
                    return None;
                }
                let data = serde_json::json!({"userIdentifiers": identifiers});
                Some(match batch.op {
                    Op::Add => serde_json::json!({"create": data}),
                    Op::Remove => serde_json::json!({"remove": data}),
                })
            })
            .collect();
        if operations.is_empty() {
            return Ok(None);
        }
        let body = serde_json::json!({"enablePartialFailure": true, "operations": operations});
        self.request(
            format!("{}/{job}:addOperations", self.base_url),
            to_json(&body)?,
        )
        .map(Some)
    }

    pub fn run_job(&self, job: &str) -> Result<Prepared, DeliveryError> {
        self.request(format!("{}/{job}:run", self.base_url), b"{}".to_vec())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedJob {
    resource_name: String,
}

/// The job's resource name from `offlineUserDataJobs:create`'s answer,
/// checked to be a job of `customer_id` (it becomes part of a URL).
pub fn job_name(answer: &[u8], customer_id: &str) -> Result<String, DeliveryError> {
    let created: CreatedJob = serde_json::from_slice(answer).map_err(|err| {
        DeliveryError::Unshapeable(format!("google ads: unexpected job answer: {err}"))
    })?;
    let prefix = format!("customers/{customer_id}/offlineUserDataJobs/");
    let id = created.resource_name.strip_prefix(&prefix).unwrap_or("");
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DeliveryError::Unshapeable(
            "google ads: the job's resource name is not one of this customer's jobs".into(),
        ));
    }
    Ok(created.resource_name)
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, DeliveryError> {
    serde_json::to_vec(value)
        .map_err(|err| DeliveryError::Unshapeable(format!("google ads: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::{HashedIdentifier, Member};

    fn account() -> Account<'static> {
        Account {
            base_url: "https://googleads.googleapis.com/v21",
            customer_id: "1234567890",
            user_list_id: "555",
            login_customer_id: "",
            access_token: "ya29.token",
            developer_token: "dev-token",
        }
    }

    #[test]
    fn a_job_names_its_list_and_the_consent_given() {
        let request = account().create_job("ad_targeting").expect("shaped");
        assert_eq!(
            request.url,
            "https://googleads.googleapis.com/v21/customers/1234567890/offlineUserDataJobs:create"
        );
        assert_eq!(request.headers["developer-token"], "dev-token");
        assert!(request.headers.get("login-customer-id").is_none());
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
        let metadata = &body["job"]["customerMatchUserListMetadata"];
        assert_eq!(metadata["userList"], "customers/1234567890/userLists/555");
        assert_eq!(metadata["consent"]["adPersonalization"], "GRANTED");
        let measurement = account().create_job("ad_measurement").expect("shaped");
        let body: serde_json::Value = serde_json::from_slice(&measurement.body).expect("json");
        assert_eq!(
            body["job"]["customerMatchUserListMetadata"]["consent"]["adPersonalization"],
            "DENIED"
        );
    }

    #[test]
    fn operations_carry_hashed_email_and_phone() {
        let members = [
            Member {
                id: "p1".into(),
                identifiers: vec![
                    HashedIdentifier {
                        kind: "email".into(),
                        // Google's example input ` Dana@Example.com `, normalised
                        // (testdata `google_email`).
                        sha256: "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"
                            .into(),
                    },
                    HashedIdentifier {
                        kind: "phone".into(),
                        sha256: "ph".into(),
                    },
                ],
            },
            Member {
                id: "p2".into(),
                identifiers: vec![HashedIdentifier {
                    kind: "maid".into(),
                    sha256: "m".into(),
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
        let job = "customers/1234567890/offlineUserDataJobs/77";
        let request = account()
            .add_operations(job, batch)
            .expect("shaped")
            .expect("something to send");
        assert_eq!(
            request.url,
            format!("https://googleads.googleapis.com/v21/{job}:addOperations")
        );
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json");
        assert_eq!(
            body["operations"],
            serde_json::json!([{"remove": {"userIdentifiers": [
                {"hashedEmail": "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"},
                {"hashedPhoneNumber": "ph"},
            ]}}]),
            "mobile ids are not sent hashed"
        );
        assert_eq!(
            account().run_job(job).expect("run").url,
            format!("https://googleads.googleapis.com/v21/{job}:run")
        );
    }

    #[test]
    fn job_names_must_belong_to_the_customer() {
        let answer = br#"{"resourceName":"customers/1234567890/offlineUserDataJobs/77"}"#;
        assert_eq!(
            job_name(answer, "1234567890").expect("ok"),
            "customers/1234567890/offlineUserDataJobs/77"
        );
        for bad in [
            &br#"{"resourceName":"customers/999/offlineUserDataJobs/77"}"#[..],
            br#"{"resourceName":"customers/1234567890/offlineUserDataJobs/../x"}"#,
            br#"{}"#,
            b"not json",
        ] {
            assert!(job_name(bad, "1234567890").is_err());
        }
    }
}
