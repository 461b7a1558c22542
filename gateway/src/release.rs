//! The consent change stream as the adtech zone may see it: each change to a
//! person's consent, re-keyed from the profile id to the pseudonymous id each
//! named destination received in the crossing. Activation follows it to
//! remove people from ad platforms the moment their consent ends.
//!
//! Like `ExportAudience`, it is a crossing: each page of changes is written
//! to the audit trail (per destination: how many releases, a digest of them,
//! the policy version) before any of it is released, and nothing is
//! released when the audit cannot be written.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use consent_pb::consent_service_client::ConsentServiceClient;
use futures::{Stream, StreamExt};
use madtech_common::error::FieldError;
use madtech_common::upstream::Upstream;
use madtech_common::validate;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::gateway::v1 as pb;
use pb::consent_release_service_server::{ConsentReleaseService, ConsentReleaseServiceServer};
use tonic::{Request, Response, Status};

use sha2::{Digest, Sha256};

use crate::audit::{AuditLog, Crossing as AuditedCrossing};
use crate::crossing::Pseudonymiser;
use crate::destinations::DestinationRegistry;
use crate::policy::{Policies, PolicySet};
use crate::token::Caller;

const MAX_DESTINATIONS: usize = 100;
const MAX_ID_LEN: usize = 128;
/// Ledger entries released (and audited) together at most.
const RELEASE_PAGE: usize = 500;
/// The method, as audit records name it.
const WATCH_CONSENT_RELEASES: &str =
    "/madtech.gateway.v1.ConsentReleaseService/WatchConsentReleases";

#[derive(Clone)]
pub struct ConsentReleaseApi {
    pseudonymiser: Pseudonymiser,
    consent: ConsentServiceClient<Upstream>,
    audit: Arc<AuditLog>,
    policies: Policies,
    destinations: DestinationRegistry,
}

impl ConsentReleaseApi {
    pub fn new(
        pseudonymiser: Pseudonymiser,
        consent: Upstream,
        audit: Arc<AuditLog>,
        policies: Policies,
        destinations: DestinationRegistry,
    ) -> Self {
        ConsentReleaseApi {
            pseudonymiser,
            consent: ConsentServiceClient::new(consent),
            audit,
            policies,
            destinations,
        }
    }

    pub fn into_server(self) -> ConsentReleaseServiceServer<Self> {
        ConsentReleaseServiceServer::new(self)
    }

    /// Writes the page's audit records, under the version of the policy
    /// set that decided the page; fails closed.
    async fn audit_page(
        &self,
        caller: &str,
        kinds: &BTreeMap<String, String>,
        policy: Option<&PolicySet>,
        page: &[pb::WatchConsentReleasesResponse],
    ) -> Result<(), Status> {
        let policy_version = policy.map(|set| set.version.as_str()).unwrap_or_default();
        // One transaction for the page's records: a page whose audit fails
        // leaves no record of releases that never happened.
        self.audit
            .append_all(audit_records(caller, policy_version, kinds, page))
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "audit write failed; consent releases stop");
                Status::unavailable("the audit trail is unavailable")
            })?;
        Ok(())
    }

    /// What one ledger entry releases to the destinations: the change of
    /// its purpose, to each of them. A TC string's refusal of one TCF
    /// vendor (`tcf_vendor_<id>`) goes only to destinations of that
    /// vendor's kind, as a denial of every purpose that needs the vendor's
    /// consent, which is what activation removes people for; a vendor's
    /// consent alone grants no purpose and is not released.
    fn release(
        &self,
        destinations: &[String],
        kinds: &BTreeMap<String, String>,
        policy: Option<&PolicySet>,
        entry: &consent_pb::ConsentEntry,
    ) -> pb::WatchConsentReleasesResponse {
        let state = consent_pb::ConsentState::try_from(entry.state).unwrap_or_default();
        // UNSET is released too: a merge can narrow a grant to it, and
        // under opt-in law it ends the person's presence at a destination.
        let releases = if entry.effective
            && matches!(
                state,
                consent_pb::ConsentState::Granted
                    | consent_pb::ConsentState::Denied
                    | consent_pb::ConsentState::Unset
            ) {
            let vendor = entry
                .purpose
                .starts_with(madtech_proto::consent::TCF_VENDOR_PURPOSE_PREFIX);
            destinations
                .iter()
                .flat_map(|destination| {
                    let purposes = match (vendor, policy) {
                        (false, _) => vec![entry.purpose.clone()],
                        (true, Some(policy)) if state == consent_pb::ConsentState::Denied => {
                            let kind = kinds.get(destination).map_or("", String::as_str);
                            policy.purposes_refused_with_vendor(kind, &entry.purpose)
                        }
                        (true, _) => Vec::new(),
                    };
                    let pseudonymous_id = if purposes.is_empty() {
                        String::new()
                    } else {
                        self.pseudonymiser.pseudonym(destination, &entry.profile_id)
                    };
                    purposes.into_iter().map(move |purpose| pb::ConsentRelease {
                        destination_id: destination.clone(),
                        pseudonymous_id: pseudonymous_id.clone(),
                        purpose,
                        state: state.into(),
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        pb::WatchConsentReleasesResponse {
            cursor: entry.cursor,
            releases,
        }
    }
}

/// One audit record per destination for a page of releases: how many, and a
/// digest of exactly what (pseudonymous id, purpose, state, in order).
fn audit_records(
    caller: &str,
    policy_version: &str,
    kinds: &BTreeMap<String, String>,
    page: &[pb::WatchConsentReleasesResponse],
) -> Vec<AuditedCrossing> {
    let mut by_destination: BTreeMap<&str, (u64, Sha256)> = BTreeMap::new();
    for release in page.iter().flat_map(|response| &response.releases) {
        let (count, digest) = by_destination
            .entry(release.destination_id.as_str())
            .or_insert_with(|| (0, Sha256::new()));
        *count += 1;
        digest.update(release.pseudonymous_id.as_bytes());
        digest.update(b"\x1f");
        digest.update(release.purpose.as_bytes());
        digest.update(b"\x1f");
        digest.update(release.state.to_string().as_bytes());
        digest.update(b"\n");
    }
    by_destination
        .into_iter()
        .map(|(destination, (count, digest))| AuditedCrossing {
            caller: caller.to_string(),
            method: WATCH_CONSENT_RELEASES.to_string(),
            destination_id: destination.to_string(),
            destination_kind: kinds.get(destination).cloned().unwrap_or_default(),
            policy_version: policy_version.to_string(),
            outcome: "released".to_string(),
            allowed: count,
            released_digest: hex::encode(digest.finalize()),
            ..AuditedCrossing::default()
        })
        .collect()
}

fn destinations(request: &pb::WatchConsentReleasesRequest) -> Result<Vec<String>, FieldError> {
    if request.destination_ids.is_empty() || request.destination_ids.len() > MAX_DESTINATIONS {
        return Err(FieldError::new(
            "destination_ids",
            format!("1 to {MAX_DESTINATIONS} destination ids"),
        ));
    }
    let mut seen = BTreeSet::new();
    request
        .destination_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let field = format!("destination_ids[{i}]");
            let id = validate::text(&field, id, MAX_ID_LEN)?;
            if !seen.insert(id.to_string()) {
                return Err(FieldError::new(field, "each destination may appear once"));
            }
            Ok(id.to_string())
        })
        .collect()
}

type Releases =
    Pin<Box<dyn Stream<Item = Result<pb::WatchConsentReleasesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConsentReleaseService for ConsentReleaseApi {
    type WatchConsentReleasesStream = Releases;

    async fn watch_consent_releases(
        &self,
        request: Request<pb::WatchConsentReleasesRequest>,
    ) -> Result<Response<Releases>, Status> {
        let caller = request
            .extensions()
            .get::<Caller>()
            .map(|caller| caller.subject.clone())
            .unwrap_or_default();
        let request = request.into_inner();
        let destinations = destinations(&request)?;
        // Releases go only to destinations the registry knows, as for
        // ExportAudience: an id made up by the caller learns nothing.
        let kinds = self.destinations.kinds_of(&destinations, None).await?;
        let changes = self
            .consent
            .clone()
            .watch_consent_changes(consent_pb::WatchConsentChangesRequest {
                after_cursor: request.after_cursor,
            })
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), "consent change stream unavailable");
                Status::unavailable("the consent service is unavailable")
            })?
            .into_inner();
        let api = self.clone();
        let stream = async_stream::try_stream! {
            let mut pages = changes.ready_chunks(RELEASE_PAGE);
            while let Some(page) = pages.next().await {
                // One policy set decides the whole page and is on its record.
                let policy = api.policies.current();
                let mut released = Vec::with_capacity(page.len());
                for change in page {
                    if let Some(entry) = change?.entry {
                        released.push(api.release(&destinations, &kinds, policy.as_deref(), &entry));
                    }
                }
                api.audit_page(&caller, &kinds, policy.as_deref(), &released).await?;
                for response in released {
                    metrics::counter!("madtech_gateway_consent_releases_total")
                        .increment(response.releases.len() as u64);
                    yield response;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn api() -> ConsentReleaseApi {
        let channel = Upstream::new(&Default::default(), "http://127.0.0.1:9").expect("upstream");
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("in-memory audit database");
        let policies = crate::policy::PolicySet::load(&crate::compliance::shipped_policies())
            .await
            .expect("shipped policies");
        ConsentReleaseApi::new(
            Pseudonymiser::new(&[3; 32]).expect("key"),
            channel.clone(),
            Arc::new(AuditLog::new(db)),
            Policies::new(policies),
            DestinationRegistry::new(channel),
        )
    }

    fn entry(state: consent_pb::ConsentState, effective: bool) -> consent_pb::ConsentEntry {
        consent_pb::ConsentEntry {
            cursor: 42,
            profile_id: "profile-1".into(),
            purpose: "ad_targeting".into(),
            state: state.into(),
            effective,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_change_is_released_per_destination_under_its_pseudonym_only() {
        let api = api().await;
        let destinations = vec!["d1".to_string(), "d2".to_string()];
        let out = api.release(
            &destinations,
            &BTreeMap::new(),
            None,
            &entry(consent_pb::ConsentState::Denied, true),
        );
        assert_eq!(out.cursor, 42);
        assert_eq!(out.releases.len(), 2);
        let key = Pseudonymiser::new(&[3; 32]).expect("key");
        assert_eq!(
            out.releases[0].pseudonymous_id,
            key.pseudonym("d1", "profile-1")
        );
        assert_eq!(
            out.releases[1].pseudonymous_id,
            key.pseudonym("d2", "profile-1")
        );
        assert_eq!(out.releases[0].state(), consent_pb::ConsentState::Denied);
        assert!(
            !format!("{out:?}").contains("profile-1"),
            "no profile id crosses"
        );
    }

    #[tokio::test]
    async fn entries_that_changed_nothing_only_advance_the_cursor() {
        let api = api().await;
        let destinations = vec!["d1".to_string()];
        let late = api.release(
            &destinations,
            &BTreeMap::new(),
            None,
            &entry(consent_pb::ConsentState::Granted, false),
        );
        assert_eq!((late.cursor, late.releases.len()), (42, 0));
        let odd = api.release(
            &destinations,
            &BTreeMap::new(),
            None,
            &entry(consent_pb::ConsentState::Unspecified, true),
        );
        assert!(odd.releases.is_empty());
    }

    #[tokio::test]
    async fn a_vendor_refusal_reaches_only_that_vendor_s_destinations_as_a_purpose_denial() {
        let api = api().await;
        let destinations = vec!["google".to_string(), "meta".to_string()];
        let kinds = BTreeMap::from([
            ("google".to_string(), "google_ads".to_string()),
            ("meta".to_string(), "meta".to_string()),
        ]);
        let policy = api.policies.current();
        // Google Advertising Products' vendor id, from consent.toml.
        let vendor = |state| consent_pb::ConsentEntry {
            purpose: madtech_proto::consent::tcf_vendor_purpose(755),
            ..entry(state, true)
        };
        let refused = api.release(
            &destinations,
            &kinds,
            policy.as_deref(),
            &vendor(consent_pb::ConsentState::Denied),
        );
        let released: Vec<(&str, &str, consent_pb::ConsentState)> = refused
            .releases
            .iter()
            .map(|r| (r.destination_id.as_str(), r.purpose.as_str(), r.state()))
            .collect();
        assert_eq!(
            released,
            [("google", "ad_targeting", consent_pb::ConsentState::Denied)],
            "the purposes that need the vendor's consent, to its destination only"
        );
        let key = Pseudonymiser::new(&[3; 32]).expect("key");
        assert_eq!(
            refused.releases[0].pseudonymous_id,
            key.pseudonym("google", "profile-1")
        );
        let given = api.release(
            &destinations,
            &kinds,
            policy.as_deref(),
            &vendor(consent_pb::ConsentState::Granted),
        );
        assert!(
            given.releases.is_empty(),
            "a vendor's consent alone grants no purpose"
        );
        let other_vendor = consent_pb::ConsentEntry {
            purpose: madtech_proto::consent::tcf_vendor_purpose(21),
            ..entry(consent_pb::ConsentState::Denied, true)
        };
        assert!(
            api.release(&destinations, &kinds, policy.as_deref(), &other_vendor)
                .releases
                .is_empty(),
            "The Trade Desk's refusal means nothing to these destinations"
        );
    }

    #[test]
    fn a_page_is_audited_per_destination_with_a_digest_and_no_profile_id() {
        let release = |destination: &str, id: &str| pb::ConsentRelease {
            destination_id: destination.into(),
            pseudonymous_id: id.into(),
            purpose: "ad_targeting".into(),
            state: consent_pb::ConsentState::Denied.into(),
        };
        let page = vec![
            pb::WatchConsentReleasesResponse {
                cursor: 1,
                releases: vec![release("d1", "x"), release("d2", "y")],
            },
            pb::WatchConsentReleasesResponse {
                cursor: 2,
                releases: vec![release("d1", "z")],
            },
            pb::WatchConsentReleasesResponse {
                cursor: 3,
                releases: vec![],
            },
        ];
        let kinds = BTreeMap::from([("d1".to_string(), "meta".to_string())]);
        let records = audit_records("activation", "v7", &kinds, &page);
        assert_eq!(records.len(), 2, "one per destination");
        assert_eq!(
            (records[0].destination_id.as_str(), records[0].allowed),
            ("d1", 2)
        );
        assert_eq!(
            (records[1].destination_id.as_str(), records[1].allowed),
            ("d2", 1)
        );
        assert_eq!(records[0].method, WATCH_CONSENT_RELEASES);
        assert_eq!(records[0].policy_version, "v7");
        assert_eq!(records[0].destination_kind, "meta");
        assert_eq!(records[0].released_digest.len(), 64);
        assert_ne!(records[0].released_digest, records[1].released_digest);
        assert!(audit_records("activation", "v7", &kinds, &page[2..]).is_empty());
    }

    #[test]
    fn destinations_are_validated_by_field() {
        let request = |ids: &[&str]| pb::WatchConsentReleasesRequest {
            destination_ids: ids.iter().map(|s| s.to_string()).collect(),
            after_cursor: 0,
        };
        assert_eq!(
            destinations(&request(&[])).expect_err("none").field,
            "destination_ids"
        );
        assert_eq!(
            destinations(&request(&["a", "a"]))
                .expect_err("twice")
                .field,
            "destination_ids[1]"
        );
        assert_eq!(
            destinations(&request(&["a", " "]))
                .expect_err("blank")
                .field,
            "destination_ids[1]"
        );
        assert_eq!(destinations(&request(&["a", "b"])).expect("valid").len(), 2);
    }
}
