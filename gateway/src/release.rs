//! The consent change stream as the adtech zone may see it: each change to a
//! person's consent, re-keyed from the profile id to the pseudonymous id each
//! named destination received in the crossing. Activation follows it to
//! remove people from ad platforms the moment their consent ends.

use std::collections::BTreeSet;
use std::pin::Pin;

use consent_pb::consent_service_client::ConsentServiceClient;
use futures::Stream;
use madtech_common::error::FieldError;
use madtech_common::validate;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::gateway::v1 as pb;
use pb::consent_release_service_server::{ConsentReleaseService, ConsentReleaseServiceServer};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::crossing::Pseudonymiser;

const MAX_DESTINATIONS: usize = 100;
const MAX_ID_LEN: usize = 128;

#[derive(Clone)]
pub struct ConsentReleaseApi {
    pseudonymiser: Pseudonymiser,
    consent: ConsentServiceClient<Channel>,
}

impl ConsentReleaseApi {
    pub fn new(pseudonymiser: Pseudonymiser, consent: Channel) -> Self {
        ConsentReleaseApi {
            pseudonymiser,
            consent: ConsentServiceClient::new(consent),
        }
    }

    pub fn into_server(self) -> ConsentReleaseServiceServer<Self> {
        ConsentReleaseServiceServer::new(self)
    }

    /// What one ledger entry releases to the destinations.
    fn release(
        &self,
        destinations: &[String],
        entry: &consent_pb::ConsentEntry,
    ) -> pb::WatchConsentReleasesResponse {
        let state = consent_pb::ConsentState::try_from(entry.state).unwrap_or_default();
        let releases = if entry.effective
            && matches!(
                state,
                consent_pb::ConsentState::Granted | consent_pb::ConsentState::Denied
            ) {
            destinations
                .iter()
                .map(|destination| pb::ConsentRelease {
                    destination_id: destination.clone(),
                    pseudonymous_id: self.pseudonymiser.pseudonym(destination, &entry.profile_id),
                    purpose: entry.purpose.clone(),
                    state: state.into(),
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
        let request = request.into_inner();
        let destinations = destinations(&request)?;
        let mut changes = self
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
            while let Some(change) = changes.message().await? {
                if let Some(entry) = change.entry {
                    let released = api.release(&destinations, &entry);
                    metrics::counter!("madtech_gateway_consent_releases_total")
                        .increment(released.releases.len() as u64);
                    yield released;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ConsentReleaseApi {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        ConsentReleaseApi::new(Pseudonymiser::new(&[3; 32]).expect("key"), channel)
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
        let api = api();
        let destinations = vec!["d1".to_string(), "d2".to_string()];
        let out = api.release(
            &destinations,
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
        let api = api();
        let destinations = vec!["d1".to_string()];
        let late = api.release(
            &destinations,
            &entry(consent_pb::ConsentState::Granted, false),
        );
        assert_eq!((late.cursor, late.releases.len()), (42, 0));
        let odd = api.release(
            &destinations,
            &entry(consent_pb::ConsentState::Unspecified, true),
        );
        assert!(odd.releases.is_empty());
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
