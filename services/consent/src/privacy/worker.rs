//! Carries out privacy requests: every due request's pending steps, in
//! order, through the gateway as this service's `compliance` identity. A
//! step that fails is tried again later with backoff; the request stays
//! open with the reason meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use activation_pb::activation_service_client::ActivationServiceClient;
use chrono::Utc;
use gateway_pb::audit_service_client::AuditServiceClient;
use madtech_common::CancellationToken;
use madtech_common::error::json_error;
use madtech_common::upstream::Upstream;
use madtech_proto::activation::MAX_IDENTIFIER_HASHES;
use madtech_proto::activation::v1 as activation_pb;
use madtech_proto::gateway::v1 as gateway_pb;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::MAX_PERSON_RECORD_KEYS;
use madtech_proto::segments::v1 as segments_pb;
use madtech_proto::time::duration_micros;
use profiles_pb::profile_service_client::ProfileServiceClient;
use segments_pb::segment_service_client::SegmentServiceClient;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Status};

use super::store::RequestStore;
use super::{Found, Kind, PrivacyRequest, StepName};
use crate::ledger::{Choice, Entry, Ledger, LegalBasis, Record, RecordedChoice, Source};
use crate::rules::ConsentRules;

/// Requests taken per round.
const BATCH: u64 = 50;
/// How long a claimed request is left to the replica that claimed it
/// before another may take it over (the claimer crashed).
const LEASE_MICROS: i64 = 5 * 60 * 1_000_000;
/// Audit records read per page for an access export.
const AUDIT_PAGE: u32 = 1_000;
/// Ledger entries read per page for an access export.
const HISTORY_PAGE: u64 = 1_000;
/// The longest wait between attempts of a failing step.
const LONGEST_BACKOFF: Duration = Duration::from_secs(300);

/// Why a step did not finish. The summary is ours; the detail is what
/// another service answered, which may quote a person's values, so it is
/// kept on the request for the operator (the request holds the person's data
/// anyway) and never written to a log line.
#[derive(Debug)]
struct StepError {
    summary: String,
    detail: Option<String>,
}

impl From<String> for StepError {
    fn from(summary: String) -> Self {
        StepError {
            summary,
            detail: None,
        }
    }
}

impl StepError {
    /// The whole reason, as the request keeps it.
    fn into_recorded(self) -> String {
        match self.detail {
            Some(detail) => format!("{}: {detail}", self.summary),
            None => self.summary,
        }
    }
}

pub struct Worker {
    store: Arc<RequestStore>,
    ledger: Arc<Ledger>,
    rules: Arc<ConsentRules>,
    gateway: Upstream,
    token_file: PathBuf,
    interval: Duration,
    wake: Notify,
}

impl Worker {
    pub fn new(
        store: Arc<RequestStore>,
        ledger: Arc<Ledger>,
        rules: Arc<ConsentRules>,
        gateway: Upstream,
        token_file: PathBuf,
        interval: Duration,
    ) -> Self {
        Worker {
            store,
            ledger,
            rules,
            gateway,
            token_file,
            interval,
            wake: Notify::new(),
        }
    }

    /// Starts a round now (a request was submitted).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Works until `shutdown`: a round at every wake-up or interval.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(err) = self.round().await {
                tracing::warn!(error = %err, "privacy request round failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// Advances every due request once.
    pub async fn round(&self) -> Result<(), crate::ConsentError> {
        let now = Utc::now().timestamp_micros();
        for request in self.store.due(now, BATCH).await? {
            // Leased from when it is claimed, not from when the round
            // began: the requests before it may have taken a while.
            let claimed_at = Utc::now().timestamp_micros();
            // Another replica may be working on it.
            if self.store.claim(&request, claimed_at, LEASE_MICROS).await? {
                let mut request = request;
                request.next_attempt_micros = claimed_at.saturating_add(LEASE_MICROS);
                self.advance(request).await?;
            }
        }
        Ok(())
    }

    /// Runs the request's steps that are not done, saving after each one.
    /// Each save renews the lease, until a step fails (then the backoff
    /// decides) or the request completes; a save that finds the lease
    /// lost (another replica claimed the request) ends the work here.
    async fn advance(&self, mut request: PrivacyRequest) -> Result<(), crate::ConsentError> {
        let mut held = request.next_attempt_micros;
        for index in 0..request.steps.len() {
            if request.steps[index].done {
                continue;
            }
            let name = request.steps[index].name;
            let outcome = self.run_step(&mut request, name).await;
            let now = Utc::now().timestamp_micros();
            let step = &mut request.steps[index];
            step.attempts = step.attempts.saturating_add(1);
            match outcome {
                Ok(()) => {
                    step.done = true;
                    step.last_error.clear();
                    step.done_at_micros = Some(now);
                    // Saved step by step: a restart resumes after the last
                    // step done, not from the start.
                    request.next_attempt_micros = now.saturating_add(LEASE_MICROS);
                    request.complete_if_done(now);
                    if !self.store.save(&request, held).await? {
                        tracing::warn!(request = %request.id, "privacy request taken over by another replica");
                        return Ok(());
                    }
                    held = request.next_attempt_micros;
                }
                Err(reason) => {
                    tracing::info!(request = %request.id, step = name.as_str(), reason = %reason.summary, "privacy request step not done yet");
                    let wait = backoff(step.attempts);
                    step.last_error = reason.into_recorded();
                    request.next_attempt_micros = now.saturating_add(duration_micros(wait));
                    if !self.store.save(&request, held).await? {
                        tracing::warn!(request = %request.id, "privacy request taken over by another replica");
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn run_step(
        &self,
        request: &mut PrivacyRequest,
        step: StepName,
    ) -> Result<(), StepError> {
        let bearer = madtech_common::bearer::from_file(&self.token_file).await?;
        let found = match step {
            StepName::Resolve => {
                request.found = Some(self.resolve(request, &bearer).await?);
                return Ok(());
            }
            _ => request
                .found
                .clone()
                .ok_or_else(|| "the subject was not resolved".to_string())?,
        };
        match (request.kind, step) {
            (Kind::Access, StepName::Profiles) => {
                let profile = self.export_profile(&found, &bearer).await?;
                request.export.insert("profile".into(), profile);
            }
            (Kind::Access, StepName::Consent) => {
                let mut entries = Vec::new();
                for id in &found.profile_ids {
                    entries.extend(self.history(id).await?.iter().map(entry_json));
                }
                request
                    .export
                    .insert("consent_ledger".into(), Value::Array(entries));
            }
            (Kind::Access, StepName::Segments) => {
                let records = self.segment_records(&found, &bearer).await?;
                let memberships = records
                    .memberships
                    .iter()
                    .map(|m| {
                        json!({
                            "segment_id": m.segment_id,
                            "profile_id": m.profile_id,
                            "entered_at": m.entered_at.as_ref().map(timestamp_json),
                        })
                    })
                    .collect();
                request
                    .export
                    .insert("segment_memberships".into(), Value::Array(memberships));
            }
            (Kind::Access, StepName::Activation) => {
                let delivered = self.deliveries(&found, &bearer).await?;
                let destinations: std::collections::BTreeSet<String> =
                    delivered.iter().map(|d| d.destination_id.clone()).collect();
                let deliveries = delivered
                    .iter()
                    .map(|d| {
                        json!({
                            "destination_id": d.destination_id,
                            "activation_id": d.activation_id,
                            "pseudonymous_id": d.pseudonymous_id,
                            "sent_at": d.synced_at.as_ref().map(timestamp_json),
                            "acknowledged": d.confirmed,
                        })
                    })
                    .collect();
                request
                    .export
                    .insert("sent_to_destinations".into(), Value::Array(deliveries));
                let crossings = self.crossings_to(&destinations, &bearer).await?;
                request
                    .export
                    .insert("crossings".into(), Value::Array(crossings));
            }
            (Kind::Erasure, StepName::Profiles) => self.erase_profile(&found, &bearer).await?,
            (Kind::Erasure, StepName::Activation) => {
                let mut client = ActivationServiceClient::new(self.gateway.clone());
                for hashes in found.identifier_hashes().chunks(MAX_IDENTIFIER_HASHES) {
                    client
                        .forget_people(authed(
                            activation_pb::ForgetPeopleRequest {
                                identifier_sha256s: hashes.to_vec(),
                            },
                            &bearer,
                        ))
                        .await
                        .map_err(|status| failed("activation", &status))?;
                }
            }
            (Kind::Erasure, StepName::Segments) => {
                let records = self.segment_records(&found, &bearer).await?;
                let held = records.memberships.len() as u64 + records.projection_rows;
                if held > 0 {
                    return Err(format!(
                        "segments still holds {held} rows about the person (it erases them when the profiles change stream reaches the erasure)"
                    )
                    .into());
                }
            }
            (Kind::Erasure, StepName::Consent) => {
                self.ledger
                    .erase(&found.profile_ids)
                    .await
                    .map_err(|err| format!("consent ledger: {err}"))?;
                self.store
                    .suppress(
                        &request.id,
                        &found.identifiers,
                        Utc::now().timestamp_micros(),
                    )
                    .await
                    .map_err(|err| format!("suppression list: {err}"))?;
            }
            (Kind::Erasure, StepName::Verify) => {
                request.remaining = self.remaining(&found, &bearer).await?;
                let left: u64 = request.remaining.values().sum();
                if left > 0 {
                    return Err(format!(
                        "the completeness check still finds {:?}",
                        request.remaining
                    )
                    .into());
                }
            }
            (Kind::OptOutOfSaleSharing, StepName::Consent) => {
                if let Some(person) = found.profile_ids.first() {
                    self.record_opt_out(request, person).await?;
                }
            }
            (kind, step) => {
                return Err(format!("{} has no step {}", kind.as_str(), step.as_str()).into());
            }
        }
        Ok(())
    }

    /// The person behind the subject identifier: their profile ids and
    /// normalised identifiers. Nobody found is an answer too (nothing to
    /// export or erase but the identifier itself).
    async fn resolve(
        &self,
        request: &PrivacyRequest,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<Found, StepError> {
        let value = request
            .subject_value
            .clone()
            .ok_or_else(|| "the subject's identifier is no longer held".to_string())?;
        let mut client = ProfileServiceClient::new(self.gateway.clone());
        let lookup =
            profiles_pb::get_profile_request::Lookup::Identifier(profiles_pb::Identifier {
                kind: request.subject_kind.clone(),
                value: value.clone(),
            });
        match client
            .get_profile(authed(
                profiles_pb::GetProfileRequest {
                    lookup: Some(lookup),
                },
                bearer,
            ))
            .await
        {
            Ok(answer) => {
                let profile = answer
                    .into_inner()
                    .profile
                    .ok_or_else(|| "profiles answered without a profile".to_string())?;
                Ok(Found {
                    profile_ids: std::iter::once(profile.profile_id)
                        .chain(profile.merged_profile_ids)
                        .collect(),
                    identifiers: profile
                        .identifiers
                        .into_iter()
                        .map(|id| (id.kind, id.value))
                        .collect(),
                })
            }
            // No such person, or an identifier that cannot be anyone's.
            Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                Ok(Found {
                    profile_ids: Vec::new(),
                    identifiers: vec![(request.subject_kind.clone(), value.trim().to_string())],
                })
            }
            Err(status) => Err(failed("profiles", &status)),
        }
    }

    async fn export_profile(
        &self,
        found: &Found,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<Value, StepError> {
        let Some(person) = found.profile_ids.first() else {
            return Ok(Value::Null);
        };
        let mut client = ProfileServiceClient::new(self.gateway.clone());
        let answer = client
            .export_profile(authed(
                profiles_pb::ExportProfileRequest {
                    lookup: Some(profiles_pb::export_profile_request::Lookup::ProfileId(
                        person.clone(),
                    )),
                },
                bearer,
            ))
            .await;
        match answer {
            Ok(answer) => serde_json::from_slice(&answer.into_inner().json)
                .map_err(|err| format!("profiles export is not JSON: {}", json_error(&err)).into()),
            Err(status) if status.code() == Code::NotFound => Ok(Value::Null),
            Err(status) => Err(failed("profiles", &status)),
        }
    }

    async fn erase_profile(
        &self,
        found: &Found,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<(), StepError> {
        let Some(person) = found.profile_ids.first() else {
            return Ok(());
        };
        let mut client = ProfileServiceClient::new(self.gateway.clone());
        let answer = client
            .erase_profile(authed(
                profiles_pb::EraseProfileRequest {
                    lookup: Some(profiles_pb::erase_profile_request::Lookup::ProfileId(
                        person.clone(),
                    )),
                    // Until they come back with new consent.
                    suppress: true,
                },
                bearer,
            ))
            .await;
        match answer {
            // Erased now, or by an earlier attempt.
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(failed("profiles", &status)),
        }
    }

    async fn history(&self, profile_id: &str) -> Result<Vec<Entry>, StepError> {
        let mut entries = Vec::new();
        let mut cursor = 0;
        loop {
            let page = self
                .ledger
                .history(profile_id, cursor, HISTORY_PAGE)
                .await
                .map_err(|err| format!("consent ledger: {err}"))?;
            let full = page.len() as u64 == HISTORY_PAGE;
            cursor = page.last().map_or(cursor, |e| e.cursor);
            entries.extend(page);
            if !full {
                return Ok(entries);
            }
        }
    }

    async fn segment_records(
        &self,
        found: &Found,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<segments_pb::GetPersonRecordsResponse, StepError> {
        let identifiers: Vec<profiles_pb::Identifier> = found
            .identifiers
            .iter()
            .map(|(kind, value)| profiles_pb::Identifier {
                kind: kind.clone(),
                value: value.clone(),
            })
            .collect();
        // As many calls as the person's ids and identifiers need, each
        // within what one call takes.
        let lookups = found
            .profile_ids
            .chunks(MAX_PERSON_RECORD_KEYS)
            .map(|ids| segments_pb::GetPersonRecordsRequest {
                profile_ids: ids.to_vec(),
                identifiers: Vec::new(),
            })
            .chain(
                identifiers
                    .chunks(MAX_PERSON_RECORD_KEYS)
                    .map(|identifiers| segments_pb::GetPersonRecordsRequest {
                        profile_ids: Vec::new(),
                        identifiers: identifiers.to_vec(),
                    }),
            );
        let mut client = SegmentServiceClient::new(self.gateway.clone());
        let mut records = segments_pb::GetPersonRecordsResponse::default();
        for lookup in lookups {
            let found = client
                .get_person_records(authed(lookup, bearer))
                .await
                .map_err(|status| failed("segments", &status))?
                .into_inner();
            records.memberships.extend(found.memberships);
            // A row found by both a profile id and an identifier counts
            // in each call: what matters is whether any is left.
            records.projection_rows += found.projection_rows;
        }
        records
            .memberships
            .sort_by(|a, b| (&a.segment_id, &a.profile_id).cmp(&(&b.segment_id, &b.profile_id)));
        records
            .memberships
            .dedup_by(|a, b| a.segment_id == b.segment_id && a.profile_id == b.profile_id);
        Ok(records)
    }

    async fn deliveries(
        &self,
        found: &Found,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<Vec<activation_pb::Delivery>, StepError> {
        let mut client = ActivationServiceClient::new(self.gateway.clone());
        let mut deliveries = Vec::new();
        for hashes in found.identifier_hashes().chunks(MAX_IDENTIFIER_HASHES) {
            deliveries.extend(
                client
                    .find_deliveries(authed(
                        activation_pb::FindDeliveriesRequest {
                            identifier_sha256s: hashes.to_vec(),
                        },
                        bearer,
                    ))
                    .await
                    .map_err(|status| failed("activation", &status))?
                    .into_inner()
                    .deliveries,
            );
        }
        // A delivery found through two of the person's hashes, asked for
        // in different calls, is one delivery.
        deliveries.sort_by(|a, b| {
            (&a.activation_id, &a.pseudonymous_id).cmp(&(&b.activation_id, &b.pseudonymous_id))
        });
        deliveries.dedup_by(|a, b| {
            a.activation_id == b.activation_id && a.pseudonymous_id == b.pseudonymous_id
        });
        Ok(deliveries)
    }

    /// The gateway's audit records of crossings to these destinations: when
    /// data went there, for which segment and purpose, under which policy.
    async fn crossings_to(
        &self,
        destinations: &std::collections::BTreeSet<String>,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<Vec<Value>, StepError> {
        if destinations.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = AuditServiceClient::new(self.gateway.clone());
        let mut found = Vec::new();
        let mut after_seq = 0;
        loop {
            let records = client
                .list_audit_records(authed(
                    gateway_pb::ListAuditRecordsRequest {
                        after_seq,
                        page_size: AUDIT_PAGE,
                    },
                    bearer,
                ))
                .await
                .map_err(|status| failed("gateway audit", &status))?
                .into_inner()
                .records;
            let Some(last) = records.last() else {
                return Ok(found);
            };
            after_seq = last.seq;
            found.extend(
                records
                    .iter()
                    .filter(|r| destinations.contains(&r.destination_id))
                    .map(|r| {
                        json!({
                            "at": r.recorded_at.as_ref().map(timestamp_json),
                            "method": r.method,
                            "segment_id": r.segment_id,
                            "destination_id": r.destination_id,
                            "destination_kind": r.destination_kind,
                            "purpose": r.purpose,
                            "policy_version": r.policy_version,
                            "outcome": r.outcome,
                            "audit_seq": r.seq,
                        })
                    }),
            );
        }
    }

    /// The completeness check: what each service still holds about the
    /// person's profile ids and identifiers.
    async fn remaining(
        &self,
        found: &Found,
        bearer: &MetadataValue<Ascii>,
    ) -> Result<std::collections::BTreeMap<String, u64>, StepError> {
        let mut profiles_hits = 0;
        let mut client = ProfileServiceClient::new(self.gateway.clone());
        let lookups = found
            .profile_ids
            .iter()
            .map(|id| profiles_pb::get_profile_request::Lookup::ProfileId(id.clone()))
            .chain(found.identifiers.iter().map(|(kind, value)| {
                profiles_pb::get_profile_request::Lookup::Identifier(profiles_pb::Identifier {
                    kind: kind.clone(),
                    value: value.clone(),
                })
            }));
        for lookup in lookups {
            match client
                .get_profile(authed(
                    profiles_pb::GetProfileRequest {
                        lookup: Some(lookup),
                    },
                    bearer,
                ))
                .await
            {
                Ok(_) => profiles_hits += 1,
                Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {}
                Err(status) => return Err(failed("profiles", &status)),
            }
        }
        let segments = self.segment_records(found, bearer).await?;
        let consent = self
            .ledger
            .rows_about(&found.profile_ids)
            .await
            .map_err(|err| format!("consent ledger: {err}"))?;
        Ok([
            ("profiles".to_string(), profiles_hits),
            (
                "segments".to_string(),
                segments.memberships.len() as u64 + segments.projection_rows,
            ),
            (
                "activation".to_string(),
                self.deliveries(found, bearer).await?.len() as u64,
            ),
            ("consent".to_string(), consent),
        ]
        .into_iter()
        .collect())
    }

    /// Records the opt-out's denials, once: a step run again after a crash
    /// between recording and saving finds them in the ledger and records
    /// only what is missing.
    async fn record_opt_out(
        &self,
        request: &PrivacyRequest,
        person: &str,
    ) -> Result<(), StepError> {
        let derived_from = format!("privacy request {}", request.id);
        let recorded: std::collections::BTreeSet<String> = self
            .history(person)
            .await?
            .into_iter()
            .filter(|entry| entry.derived_from == derived_from)
            .map(|entry| entry.purpose)
            .collect();
        let choices: Vec<RecordedChoice> = self
            .rules
            .privacy()
            .opt_out_purposes
            .iter()
            .filter(|purpose| !recorded.contains(*purpose))
            .map(|purpose| RecordedChoice {
                purpose: purpose.clone(),
                state: Choice::Denied.into(),
                legal_basis: LegalBasis::OptOut,
                signal: None,
                derived_from: derived_from.clone(),
                conflict: None,
                lifetime_micros: None,
                holds: Vec::new(),
            })
            .collect();
        if choices.is_empty() {
            return Ok(());
        }
        self.ledger
            .record(Record {
                profile_id: person.to_string(),
                choices,
                source: Source::PrivacyRequest,
                region: request.region.clone(),
                notice_version: String::new(),
                cmp: None,
                collected_at_micros: Some(request.submitted_at_micros),
            })
            .await
            .map(|_| ())
            .map_err(|err| format!("consent ledger: {err}").into())
    }
}

fn authed<T>(message: T, bearer: &MetadataValue<Ascii>) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    request
}

fn failed(service: &str, status: &Status) -> StepError {
    StepError {
        summary: format!("{service}: {:?}", status.code()),
        detail: Some(status.message().to_string()).filter(|m| !m.is_empty()),
    }
}

/// 1 s doubling per attempt, at most five minutes.
fn backoff(attempts: u32) -> Duration {
    madtech_common::changelog::doubling(
        Duration::from_secs(1),
        attempts.saturating_sub(1),
        LONGEST_BACKOFF,
    )
}

fn timestamp_json(at: &prost_types::Timestamp) -> Value {
    madtech_proto::time::to_micros(at)
        .and_then(chrono::DateTime::from_timestamp_micros)
        .map_or(Value::Null, |at| Value::String(at.to_rfc3339()))
}

fn micros_json(micros: i64) -> Value {
    chrono::DateTime::from_timestamp_micros(micros)
        .map_or(Value::Null, |at| Value::String(at.to_rfc3339()))
}

fn entry_json(entry: &Entry) -> Value {
    json!({
        "profile_id": entry.profile_id,
        "purpose": entry.purpose,
        "state": entry.state.as_str(),
        "legal_basis": entry.legal_basis.as_str(),
        "source": entry.source.as_str(),
        "region": entry.region,
        "notice_version": entry.notice_version,
        "signal": entry.signal.as_ref().map(|s| json!({"kind": s.kind, "raw": s.raw})),
        "cmp": entry.cmp.map(|(id, version)| json!({"id": id, "version": version})),
        "derived_from": entry.derived_from,
        "conflict": entry.conflict,
        "collected_at": micros_json(entry.collected_at_micros),
        "recorded_at": micros_json(entry.recorded_at_micros),
        "expires_at": entry.expires_at_micros.map(micros_json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use madtech_common::db::connect_and_migrate;
    use madtech_common::testing::TestDatabase;

    madtech_common::backend_tests!(
        an_opt_out_run_again_after_a_crash_records_its_denials_once,
        |db: TestDatabase| async move {
            let conn = connect_and_migrate::<crate::ledger::Migrator>(&db.config)
                .await
                .expect("connect");
            let ledger = Arc::new(Ledger::new(conn.clone()));
            let worker = Worker::new(
                Arc::new(RequestStore::new(conn)),
                Arc::clone(&ledger),
                Arc::new(crate::rules::tests::shipped().await),
                Upstream::new(&Default::default(), "http://127.0.0.1:9").expect("upstream"),
                PathBuf::from("unused"),
                Duration::from_secs(1),
            );
            let request = PrivacyRequest::new(
                "opt-1".into(),
                Kind::OptOutOfSaleSharing,
                ("email".into(), "ann@example.com".into()),
                "US-CA".into(),
                ("CCPA".into(), 1_000),
                10,
            );
            // The step records, the process stops before saving it, and
            // the step runs again.
            worker.record_opt_out(&request, "p1").await.expect("first");
            worker.record_opt_out(&request, "p1").await.expect("again");
            let history = worker.history("p1").await.expect("history");
            let mut purposes: Vec<&str> = history.iter().map(|e| e.purpose.as_str()).collect();
            purposes.sort_unstable();
            let mut expected: Vec<&str> = worker
                .rules
                .privacy()
                .opt_out_purposes
                .iter()
                .map(String::as_str)
                .collect();
            expected.sort_unstable();
            assert!(!expected.is_empty());
            assert_eq!(purposes, expected, "each denial once");
        }
    );

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(40), LONGEST_BACKOFF);
    }

    #[test]
    fn what_another_service_said_is_recorded_but_not_in_the_summary_that_is_logged() {
        let answer = Status::invalid_argument("email alice@example.com is not allowed");
        let reason = failed("profiles", &answer);
        assert_eq!(reason.summary, "profiles: InvalidArgument");
        assert_eq!(
            reason.into_recorded(),
            "profiles: InvalidArgument: email alice@example.com is not allowed"
        );
        let ours = StepError::from("segments still holds 2 rows".to_string());
        assert_eq!(ours.into_recorded(), "segments still holds 2 rows");
    }
}
