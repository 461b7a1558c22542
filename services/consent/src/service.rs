//! The gRPC edge of the consent service: validates requests, converts them to
//! ledger types and back. No consent rules live here.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use madtech_common::changelog::{Page, follow};
use madtech_common::error::FieldError;
use madtech_common::validate;
use madtech_proto::consent::v1 as pb;
use madtech_proto::time::{from_micros, to_micros};
use pb::consent_service_server::{ConsentService, ConsentServiceServer};
use tonic::{Request, Response, Status};

use crate::config::ConsentConfig;
use crate::ledger::{Choice, Entry, Ledger, PurposeState, Record, Source, State};

/// Entries read per page while catching up a watcher.
const WATCH_PAGE: u64 = 500;
const MAX_BATCH: usize = 10_000;
const MAX_CHOICES: usize = 64;
/// Longest profile id or notice version accepted.
const MAX_ID_LEN: usize = 128;
/// How far ahead of this clock a collection time may be (clocks differ).
const CLOCK_SKEW_MICROS: i64 = 5 * 60 * 1_000_000;

#[derive(Clone)]
pub struct ConsentApi {
    ledger: Arc<Ledger>,
    config: ConsentConfig,
}

impl ConsentApi {
    pub fn new(ledger: Ledger, config: ConsentConfig) -> Self {
        ConsentApi {
            ledger: Arc::new(ledger),
            config,
        }
    }

    pub fn into_server(self) -> ConsentServiceServer<Self> {
        ConsentServiceServer::new(self)
    }
}

fn record_from(request: pb::RecordConsentRequest) -> Result<Record, FieldError> {
    let profile_id = validate::text("profile_id", &request.profile_id, MAX_ID_LEN)?.to_string();
    if request.choices.is_empty() {
        return Err(FieldError::new(
            "choices",
            "at least one choice is required",
        ));
    }
    if request.choices.len() > MAX_CHOICES {
        return Err(FieldError::new(
            "choices",
            format!("at most {MAX_CHOICES} choices"),
        ));
    }
    let mut seen = HashSet::new();
    let mut choices = Vec::with_capacity(request.choices.len());
    for (i, choice) in request.choices.iter().enumerate() {
        let name = validate::policy_name(&format!("choices[{i}].purpose"), &choice.purpose)?;
        if !seen.insert(name.clone()) {
            return Err(FieldError::new(
                format!("choices[{i}].purpose"),
                "each purpose may appear once",
            ));
        }
        let state = match pb::ConsentState::try_from(choice.state) {
            Ok(pb::ConsentState::Granted) => Choice::Granted,
            Ok(pb::ConsentState::Denied) => Choice::Denied,
            _ => {
                return Err(FieldError::new(
                    format!("choices[{i}].state"),
                    "must be GRANTED or DENIED",
                ));
            }
        };
        choices.push((name, state));
    }
    let source = match pb::ConsentSource::try_from(request.source) {
        Ok(pb::ConsentSource::Cmp) => Source::Cmp,
        Ok(pb::ConsentSource::Form) => Source::Form,
        Ok(pb::ConsentSource::Api) => Source::Api,
        Ok(pb::ConsentSource::Gpc) => Source::Gpc,
        Ok(pb::ConsentSource::Import) => Source::Import,
        Ok(pb::ConsentSource::PrivacyRequest) => Source::PrivacyRequest,
        _ => {
            return Err(FieldError::new(
                "source",
                "must name how the choice was collected",
            ));
        }
    };
    let collected_at_micros = match &request.collected_at {
        Some(ts) => {
            let micros =
                to_micros(ts).ok_or_else(|| FieldError::new("collected_at", "out of range"))?;
            let latest = chrono::Utc::now().timestamp_micros() + CLOCK_SKEW_MICROS;
            if micros > latest {
                return Err(FieldError::new("collected_at", "is in the future"));
            }
            Some(micros)
        }
        None => None,
    };
    Ok(Record {
        profile_id,
        choices,
        source,
        region: validate::region("region", &request.region)?,
        notice_version: validate::optional_text(
            "notice_version",
            &request.notice_version,
            MAX_ID_LEN,
        )?
        .to_string(),
        collected_at_micros,
    })
}

fn state_to_pb(state: State) -> pb::ConsentState {
    match state {
        State::Unset => pb::ConsentState::Unset,
        State::Granted => pb::ConsentState::Granted,
        State::Denied => pb::ConsentState::Denied,
    }
}

fn source_to_pb(source: Source) -> pb::ConsentSource {
    match source {
        Source::Cmp => pb::ConsentSource::Cmp,
        Source::Form => pb::ConsentSource::Form,
        Source::Api => pb::ConsentSource::Api,
        Source::Gpc => pb::ConsentSource::Gpc,
        Source::Import => pb::ConsentSource::Import,
        Source::PrivacyRequest => pb::ConsentSource::PrivacyRequest,
    }
}

fn entry_to_pb(entry: &Entry) -> pb::ConsentEntry {
    pb::ConsentEntry {
        cursor: entry.cursor,
        profile_id: entry.profile_id.clone(),
        purpose: entry.purpose.clone(),
        state: state_to_pb(entry.choice.into()).into(),
        source: source_to_pb(entry.source).into(),
        region: entry.region.clone(),
        notice_version: entry.notice_version.clone(),
        collected_at: Some(from_micros(entry.collected_at_micros)),
        recorded_at: Some(from_micros(entry.recorded_at_micros)),
        effective: entry.effective,
    }
}

fn states_to_pb(states: &[PurposeState]) -> Vec<pb::PurposeState> {
    states
        .iter()
        .map(|s| pb::PurposeState {
            purpose: s.purpose.clone(),
            state: state_to_pb(s.state).into(),
            cursor: s.cursor,
        })
        .collect()
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchConsentChangesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConsentService for ConsentApi {
    async fn record_consent(
        &self,
        request: Request<pb::RecordConsentRequest>,
    ) -> Result<Response<pb::RecordConsentResponse>, Status> {
        let record = record_from(request.into_inner())?;
        let entries = self.ledger.record(record).await?;
        Ok(Response::new(pb::RecordConsentResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
        }))
    }

    async fn get_consent(
        &self,
        request: Request<pb::GetConsentRequest>,
    ) -> Result<Response<pb::GetConsentResponse>, Status> {
        let profile_id =
            validate::text("profile_id", &request.get_ref().profile_id, MAX_ID_LEN)?.to_string();
        let mut answer = self.ledger.current(&[profile_id], &[]).await?;
        let (profile_id, states) = answer.pop().unwrap_or_default();
        Ok(Response::new(pb::GetConsentResponse {
            profile_id,
            purposes: states_to_pb(&states),
        }))
    }

    async fn batch_get_consent(
        &self,
        request: Request<pb::BatchGetConsentRequest>,
    ) -> Result<Response<pb::BatchGetConsentResponse>, Status> {
        let request = request.into_inner();
        if request.profile_ids.is_empty() || request.profile_ids.len() > MAX_BATCH {
            return Err(FieldError::new(
                "profile_ids",
                format!("1 to {MAX_BATCH} profile ids per call"),
            )
            .into());
        }
        let profile_ids = request
            .profile_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                validate::text(&format!("profile_ids[{i}]"), id, MAX_ID_LEN).map(str::to_string)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let purposes = request
            .purposes
            .iter()
            .enumerate()
            .map(|(i, p)| validate::policy_name(&format!("purposes[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let answer = self.ledger.current(&profile_ids, &purposes).await?;
        Ok(Response::new(pb::BatchGetConsentResponse {
            subjects: answer
                .into_iter()
                .map(|(profile_id, states)| pb::SubjectConsent {
                    profile_id,
                    purposes: states_to_pb(&states),
                })
                .collect(),
        }))
    }

    async fn get_ledger_head(
        &self,
        _request: Request<pb::GetLedgerHeadRequest>,
    ) -> Result<Response<pb::GetLedgerHeadResponse>, Status> {
        Ok(Response::new(pb::GetLedgerHeadResponse {
            cursor: self.ledger.head().await?,
        }))
    }

    type WatchConsentChangesStream = WatchStream;

    async fn watch_consent_changes(
        &self,
        request: Request<pb::WatchConsentChangesRequest>,
    ) -> Result<Response<Self::WatchConsentChangesStream>, Status> {
        let cursor = request.into_inner().after_cursor;
        let ledger = Arc::clone(&self.ledger);
        let appended = ledger.subscribe();
        let stream = follow(
            cursor,
            appended,
            self.config.watch_poll_interval,
            move |cursor| {
                let ledger = Arc::clone(&ledger);
                async move {
                    let entries = ledger.entries_after(cursor, WATCH_PAGE).await?;
                    Ok::<_, Status>(Page {
                        read_to: entries.last().map_or(cursor, |e| e.cursor),
                        items: entries
                            .iter()
                            .map(|entry| pb::WatchConsentChangesResponse {
                                entry: Some(entry_to_pb(entry)),
                            })
                            .collect(),
                    })
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::RecordConsentRequest {
        pb::RecordConsentRequest {
            profile_id: "p1".into(),
            choices: vec![pb::PurposeChoice {
                purpose: "ad_targeting".into(),
                state: pb::ConsentState::Granted.into(),
            }],
            source: pb::ConsentSource::Api.into(),
            region: "fr".into(),
            notice_version: "v1".into(),
            collected_at: None,
        }
    }

    fn field_of(request: pb::RecordConsentRequest) -> String {
        record_from(request).expect_err("invalid").field
    }

    #[test]
    fn a_valid_request_converts() {
        let record = record_from(request()).expect("valid");
        assert_eq!(record.region, "FR");
        assert_eq!(
            record.choices,
            vec![("ad_targeting".to_string(), Choice::Granted)]
        );
    }

    #[test]
    fn each_invalid_field_is_named() {
        let mut r = request();
        r.profile_id = " ".into();
        assert_eq!(field_of(r), "profile_id");

        let mut r = request();
        r.choices.clear();
        assert_eq!(field_of(r), "choices");

        let mut r = request();
        r.choices[0].purpose = "Ad Targeting".into();
        assert_eq!(field_of(r), "choices[0].purpose");

        let mut r = request();
        r.choices[0].state = pb::ConsentState::Unset.into();
        assert_eq!(field_of(r), "choices[0].state");

        let mut r = request();
        r.choices.push(r.choices[0].clone());
        assert_eq!(field_of(r), "choices[1].purpose");

        let mut r = request();
        r.source = 0;
        assert_eq!(field_of(r), "source");

        let mut r = request();
        r.region = "France".into();
        assert_eq!(field_of(r), "region");

        let mut r = request();
        r.collected_at = Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        });
        assert_eq!(field_of(r), "collected_at");
    }
}
