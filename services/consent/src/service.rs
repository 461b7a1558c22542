//! The gRPC edge of the consent service: validates requests, converts them to
//! ledger types and back. No consent rules live here.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use madtech_common::changelog::{Page, follow};
use madtech_common::error::FieldError;
use madtech_common::upstream::Upstream;
use madtech_common::validate;
use madtech_proto::consent::v1 as pb;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::time::{from_micros, to_micros};
use pb::consent_service_server::{ConsentService, ConsentServiceServer};
use profiles_pb::profile_service_client::ProfileServiceClient;
use tonic::{Request, Response, Status};

use crate::config::ConsentConfig;
use crate::derive::{self, Collection, SignalInput, TcfValidity};
use crate::ledger::{Choice, Entry, Ledger, LegalBasis, PurposeState, Source, State};
use crate::rules::ConsentRules;

/// Entries read per page while catching up a watcher.
const WATCH_PAGE: u64 = 500;
const MAX_BATCH: usize = 10_000;
const MAX_CHOICES: usize = 64;
const MAX_SIGNALS: usize = 8;
/// Longest signal string accepted (a TC string with every vendor listed
/// singly stays well below).
const MAX_SIGNAL_LEN: usize = 16 * 1024;
const DEFAULT_HISTORY_PAGE: u32 = 100;
const MAX_HISTORY_PAGE: u32 = 1000;
/// Longest profile id or notice version accepted.
const MAX_ID_LEN: usize = 128;
/// How far ahead of this clock a collection time may be (clocks differ).
const CLOCK_SKEW_MICROS: i64 = 5 * 60 * 1_000_000;

#[derive(Clone)]
pub struct ConsentApi {
    ledger: Arc<Ledger>,
    rules: Arc<ConsentRules>,
    /// For requests that name the person by an identifier.
    profiles: ProfileServiceClient<Upstream>,
    config: ConsentConfig,
}

impl ConsentApi {
    pub fn new(
        ledger: Arc<Ledger>,
        rules: Arc<ConsentRules>,
        profiles: ProfileServiceClient<Upstream>,
        config: ConsentConfig,
    ) -> Self {
        ConsentApi {
            ledger,
            rules,
            profiles,
            config,
        }
    }

    pub fn into_server(self) -> ConsentServiceServer<Self> {
        ConsentServiceServer::new(self)
    }

    /// The profile behind an identifier. Nobody has it: with a grant the
    /// person came back with new consent, so an erasure's suppression is
    /// lifted and a profile created; without one there is nothing to record
    /// it for.
    async fn person_of(
        &self,
        (kind, value): (String, String),
        grants: bool,
        region: &str,
    ) -> Result<String, Status> {
        let identifier = profiles_pb::Identifier { kind, value };
        let mut profiles = self.profiles.clone();
        let found = profiles
            .get_profile(profiles_pb::GetProfileRequest {
                lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(
                    identifier.clone(),
                )),
            })
            .await;
        match found {
            Ok(answer) => answer
                .into_inner()
                .profile
                .map(|p| p.profile_id)
                .ok_or_else(|| Status::internal("profiles answered without a profile")),
            Err(status) if status.code() == tonic::Code::NotFound && grants => {
                // One write: the suppression is never lifted without the
                // person it lets back.
                let created = profiles
                    .lift_suppression(profiles_pb::LiftSuppressionRequest {
                        identifier: Some(identifier.clone()),
                        then_upsert: Some(profiles_pb::UpsertProfileRequest {
                            identifiers: vec![identifier],
                            region: region.to_string(),
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                created
                    .upserted
                    .and_then(|upserted| upserted.profile)
                    .map(|p| p.profile_id)
                    .ok_or_else(|| Status::internal("profiles answered without a profile"))
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(Status::failed_precondition(
                    "identifier: no profile has it, and a request without a grant creates none",
                ))
            }
            Err(status) => Err(status),
        }
    }

    fn tcf_validity(&self) -> TcfValidity {
        if self.config.accept_pre_tcf22_strings {
            TcfValidity::AcceptOlder
        } else {
            TcfValidity::Tcf22
        }
    }
}

fn collection_from(
    rules: &ConsentRules,
    request: pb::RecordConsentRequest,
) -> Result<Collection, FieldError> {
    let (profile_id, identifier) = match (&request.identifier, request.profile_id.is_empty()) {
        (None, _) => (
            validate::text("profile_id", &request.profile_id, MAX_ID_LEN)?.to_string(),
            None,
        ),
        (Some(id), true) => (
            String::new(),
            Some((
                validate::text("identifier.kind", &id.kind, MAX_ID_LEN)?.to_string(),
                validate::text("identifier.value", &id.value, MAX_ID_LEN * 4)?.to_string(),
            )),
        ),
        (Some(_), false) => {
            return Err(FieldError::new(
                "identifier",
                "give profile_id or identifier, not both",
            ));
        }
    };
    if request.choices.is_empty() && request.signals.is_empty() {
        return Err(FieldError::new(
            "choices",
            "at least one choice or signal is required",
        ));
    }
    if request.choices.len() > MAX_CHOICES {
        return Err(FieldError::new(
            "choices",
            format!("at most {MAX_CHOICES} choices"),
        ));
    }
    if request.signals.len() > MAX_SIGNALS {
        return Err(FieldError::new(
            "signals",
            format!("at most {MAX_SIGNALS} signals"),
        ));
    }
    let mut seen = HashSet::new();
    let mut choices = Vec::with_capacity(request.choices.len());
    for (i, choice) in request.choices.iter().enumerate() {
        let field = format!("choices[{i}].purpose");
        let name = validate::policy_name(&field, &choice.purpose)?;
        if rules.purpose(&name).is_none() {
            return Err(FieldError::new(field, "not in the purpose catalogue"));
        }
        if !seen.insert(name.clone()) {
            return Err(FieldError::new(field, "each purpose may appear once"));
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
    let mut signals = Vec::with_capacity(request.signals.len());
    for (i, signal) in request.signals.into_iter().enumerate() {
        use pb::consent_signal::Signal as S;
        let text = |name: &str, raw: String| -> Result<String, FieldError> {
            let field = format!("signals[{i}].{name}");
            validate::text(&field, &raw, MAX_SIGNAL_LEN)?;
            Ok(raw)
        };
        signals.push(match signal.signal {
            Some(S::TcString(raw)) => SignalInput::Tcf(text("tc_string", raw)?),
            Some(S::GppString(raw)) => SignalInput::Gpp(text("gpp_string", raw)?),
            Some(S::UsPrivacy(raw)) => SignalInput::Usp(text("us_privacy", raw)?),
            Some(S::Gpc(true)) => SignalInput::Gpc,
            Some(S::Gpc(false)) => {
                return Err(FieldError::new(
                    format!("signals[{i}].gpc"),
                    "send GPC only when the browser sent Sec-GPC: 1",
                ));
            }
            None => {
                return Err(FieldError::new(
                    format!("signals[{i}]"),
                    "one of tc_string, gpp_string, us_privacy or gpc is required",
                ));
            }
        });
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
                "must name how the choice was collected (MERGE is the service's own)",
            ));
        }
    };
    let legal_basis = match pb::LegalBasis::try_from(request.legal_basis) {
        Ok(pb::LegalBasis::Unspecified | pb::LegalBasis::Consent) => LegalBasis::Consent,
        Ok(pb::LegalBasis::OptOut) => LegalBasis::OptOut,
        Ok(pb::LegalBasis::LegitimateInterest) => LegalBasis::LegitimateInterest,
        Ok(pb::LegalBasis::Contract) => LegalBasis::Contract,
        Err(_) => return Err(FieldError::new("legal_basis", "unknown legal basis")),
    };
    let cmp = match (request.cmp_id, request.cmp_version) {
        (0, 0) => None,
        (id, version) => Some((
            u16::try_from(id).map_err(|_| FieldError::new("cmp_id", "at most 4095"))?,
            u16::try_from(version).map_err(|_| FieldError::new("cmp_version", "at most 4095"))?,
        )),
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
    Ok(Collection {
        profile_id,
        identifier,
        choices,
        legal_basis,
        signals,
        source,
        region: validate::region("region", &request.region)?,
        notice_version: validate::optional_text(
            "notice_version",
            &request.notice_version,
            MAX_ID_LEN,
        )?
        .to_string(),
        collected_at_micros,
        cmp,
        person_initiated: request.person_initiated,
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
        Source::Merge => pb::ConsentSource::Merge,
    }
}

fn legal_basis_to_pb(basis: LegalBasis) -> pb::LegalBasis {
    match basis {
        LegalBasis::Consent => pb::LegalBasis::Consent,
        LegalBasis::OptOut => pb::LegalBasis::OptOut,
        LegalBasis::LegitimateInterest => pb::LegalBasis::LegitimateInterest,
        LegalBasis::Contract => pb::LegalBasis::Contract,
    }
}

fn entry_to_pb(entry: &Entry) -> pb::ConsentEntry {
    let (signal_kind, raw_signal) = entry
        .signal
        .as_ref()
        .map(|s| (s.kind.clone(), s.raw.clone()))
        .unwrap_or_default();
    let (cmp_id, cmp_version) = entry.cmp.unwrap_or_default();
    pb::ConsentEntry {
        cursor: entry.cursor,
        profile_id: entry.profile_id.clone(),
        purpose: entry.purpose.clone(),
        state: state_to_pb(entry.state).into(),
        source: source_to_pb(entry.source).into(),
        region: entry.region.clone(),
        notice_version: entry.notice_version.clone(),
        collected_at: Some(from_micros(entry.collected_at_micros)),
        recorded_at: Some(from_micros(entry.recorded_at_micros)),
        effective: entry.effective,
        legal_basis: legal_basis_to_pb(entry.legal_basis).into(),
        signal_kind,
        raw_signal,
        cmp_id: cmp_id.into(),
        cmp_version: cmp_version.into(),
        derived_from: entry.derived_from.clone(),
        conflict: entry.conflict.clone().unwrap_or_default(),
        expires_at: entry.expires_at_micros.map(from_micros),
    }
}

fn states_to_pb(states: &[PurposeState]) -> Vec<pb::PurposeState> {
    states
        .iter()
        .map(|s| pb::PurposeState {
            purpose: s.purpose.clone(),
            state: state_to_pb(s.state).into(),
            cursor: s.cursor,
            expires_at: s.expires_at_micros.map(from_micros),
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
        let collection = collection_from(&self.rules, request.into_inner())?;
        let identifier = collection.identifier.clone();
        let region = collection.region.clone();
        let mut plan = derive::plan(&self.rules, collection, self.tcf_validity())?;
        if let Some(identifier) = identifier {
            // Only consent to a purpose of the catalogue brings an erased
            // person back: not an opt-out basis's "not opted out" (a
            // default US Privacy or GPP string), nor a TCF vendor's consent
            // on its own.
            let grants = plan.record.choices.iter().any(|c| {
                c.state == State::Granted
                    && c.legal_basis == LegalBasis::Consent
                    && self.rules.purpose(&c.purpose).is_some()
            });
            plan.record.profile_id = self.person_of(identifier, grants, &region).await?;
        }
        let entries = self.ledger.record(plan.record).await?;
        Ok(Response::new(pb::RecordConsentResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
            notes: plan.notes,
        }))
    }

    async fn consent_history(
        &self,
        request: Request<pb::ConsentHistoryRequest>,
    ) -> Result<Response<pb::ConsentHistoryResponse>, Status> {
        let request = request.into_inner();
        let profile_id = validate::text("profile_id", &request.profile_id, MAX_ID_LEN)?;
        let page_size = match request.page_size {
            0 => DEFAULT_HISTORY_PAGE,
            n if n <= MAX_HISTORY_PAGE => n,
            _ => {
                return Err(
                    FieldError::new("page_size", format!("at most {MAX_HISTORY_PAGE}")).into(),
                );
            }
        };
        // One more than asked tells whether another page follows.
        let mut entries = self
            .ledger
            .history(profile_id, request.after_cursor, u64::from(page_size) + 1)
            .await?;
        let more = entries.len() > page_size as usize;
        entries.truncate(page_size as usize);
        Ok(Response::new(pb::ConsentHistoryResponse {
            next_cursor: if more {
                entries.last().map_or(0, |e| e.cursor)
            } else {
                0
            },
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
        let profile_ids = validate::each("profile_ids", &request.profile_ids, |field, id| {
            validate::text(field, id, MAX_ID_LEN).map(str::to_string)
        })?;
        let purposes = validate::each("purposes", &request.purposes, |field, purpose| {
            validate::policy_name(field, purpose)
        })?;
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
            ..Default::default()
        }
    }

    async fn field_of(request: pb::RecordConsentRequest) -> String {
        let rules = crate::rules::tests::shipped().await;
        collection_from(&rules, request).expect_err("invalid").field
    }

    #[tokio::test]
    async fn a_valid_request_converts() {
        let rules = crate::rules::tests::shipped().await;
        let collection = collection_from(&rules, request()).expect("valid");
        assert_eq!(collection.region, "FR");
        assert_eq!(
            collection.choices,
            vec![("ad_targeting".to_string(), Choice::Granted)]
        );
        assert_eq!(collection.legal_basis, LegalBasis::Consent);
    }

    #[tokio::test]
    async fn each_invalid_field_is_named() {
        let mut r = request();
        r.profile_id = " ".into();
        assert_eq!(field_of(r).await, "profile_id");

        let mut r = request();
        r.choices.clear();
        assert_eq!(field_of(r).await, "choices");

        let mut r = request();
        r.choices[0].purpose = "Ad Targeting".into();
        assert_eq!(field_of(r).await, "choices[0].purpose");

        let mut r = request();
        r.choices[0].purpose = "telepathy".into();
        assert_eq!(
            field_of(r).await,
            "choices[0].purpose",
            "not in the catalogue"
        );

        let mut r = request();
        r.choices[0].state = pb::ConsentState::Unset.into();
        assert_eq!(field_of(r).await, "choices[0].state");

        let mut r = request();
        r.choices.push(r.choices[0].clone());
        assert_eq!(field_of(r).await, "choices[1].purpose");

        let mut r = request();
        r.identifier = Some(profiles_pb::Identifier {
            kind: "email".into(),
            value: "ann@example.com".into(),
        });
        assert_eq!(field_of(r).await, "identifier", "one subject, not two");

        let mut r = request();
        r.profile_id.clear();
        r.identifier = Some(profiles_pb::Identifier {
            kind: "email".into(),
            value: " ".into(),
        });
        assert_eq!(field_of(r).await, "identifier.value");

        let mut r = request();
        r.source = 0;
        assert_eq!(field_of(r).await, "source");

        let mut r = request();
        r.source = pb::ConsentSource::Merge.into();
        assert_eq!(field_of(r).await, "source", "merges are the service's own");

        let mut r = request();
        r.region = "France".into();
        assert_eq!(field_of(r).await, "region");

        let mut r = request();
        r.legal_basis = 99;
        assert_eq!(field_of(r).await, "legal_basis");

        let mut r = request();
        r.cmp_id = 70_000;
        r.cmp_version = 1;
        assert_eq!(field_of(r).await, "cmp_id");

        let mut r = request();
        r.signals.push(pb::ConsentSignal { signal: None });
        assert_eq!(field_of(r).await, "signals[0]");

        let mut r = request();
        r.signals.push(pb::ConsentSignal {
            signal: Some(pb::consent_signal::Signal::Gpc(false)),
        });
        assert_eq!(field_of(r).await, "signals[0].gpc");

        let mut r = request();
        r.signals.push(pb::ConsentSignal {
            signal: Some(pb::consent_signal::Signal::TcString(String::new())),
        });
        assert_eq!(field_of(r).await, "signals[0].tc_string");

        let mut r = request();
        r.collected_at = Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        });
        assert_eq!(field_of(r).await, "collected_at");
    }

    #[tokio::test]
    async fn a_signal_alone_is_enough() {
        let rules = crate::rules::tests::shipped().await;
        let mut r = request();
        r.choices.clear();
        r.signals.push(pb::ConsentSignal {
            signal: Some(pb::consent_signal::Signal::UsPrivacy("1YNN".into())),
        });
        let collection = collection_from(&rules, r).expect("valid");
        assert_eq!(collection.signals, vec![SignalInput::Usp("1YNN".into())]);
    }
}
