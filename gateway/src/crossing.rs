//! The crossing from martech to adtech. `ExportAudience` is decoded record by
//! record: each member's consent is looked up, the consent policy decides,
//! denied members are dropped and counted by reason, allowed identifiers are
//! hashed, everything else is stripped, and the profile id is replaced by a
//! pseudonymous id stable per destination.
//!
//! Fail closed: if consent cannot be looked up or the policy cannot be
//! evaluated, the export fails; nothing crosses undecided.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::Stream;
use hmac::{Hmac, Mac};
use madtech_common::error::FieldError;
use madtech_common::upstream::Upstream;
use madtech_common::validate::{policy_name, require};
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::segments::v1 as segments_pb;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::audit::{self, AuditLog};
use crate::consent_view::{ConsentView, Freshness, Subject};
use crate::destinations::{DestinationRegistry, check_named_kind};
use crate::ordered::Ordered;
use crate::page::{MemberView, PageCodec, read_page};
use crate::policy::Policies;
use crate::policy::{PolicyError, PolicySet};
use crate::token::Caller;
use madtech_common::hashing::Form;

/// Overwrites `target` with `value`, keeping its allocation.
fn replace(target: &mut String, value: &str) {
    target.clear();
    target.push_str(value);
}

/// The gRPC path of the crossing this module filters.
pub const EXPORT_AUDIENCE: &str = "/madtech.segments.v1.SegmentService/ExportAudience";

/// Derives pseudonymous ids: HMAC-SHA256 over the destination and profile
/// ids, so the same person has one id per destination, ids of different
/// destinations cannot be joined, and none leads back without the key.
#[derive(Clone)]
pub struct Pseudonymiser {
    key: Hmac<Sha256>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the pseudonym key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the pseudonym key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot generate a pseudonym key")]
    Generate,
    #[error("the pseudonym key {path} must be hex encoding at least 32 bytes")]
    Invalid { path: String },
}

impl Pseudonymiser {
    pub const MIN_KEY_BYTES: usize = 32;

    pub fn new(key: &[u8]) -> Option<Self> {
        if key.len() < Self::MIN_KEY_BYTES {
            return None;
        }
        Hmac::new_from_slice(key)
            .ok()
            .map(|key| Pseudonymiser { key })
    }

    pub fn from_hex_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        hex::decode(text.trim())
            .ok()
            .and_then(|key| Self::new(&key))
            .ok_or_else(|| KeyError::Invalid {
                path: path.display().to_string(),
            })
    }

    /// Writes a new random key to `path` unless a key is there already.
    pub fn ensure_key_file(path: &std::path::Path) -> Result<(), KeyError> {
        if path.is_file() {
            return Ok(());
        }
        let mut key = [0u8; Self::MIN_KEY_BYTES];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| KeyError::Generate)?;
        crate::token::write_private_file(path, hex::encode(key).as_bytes()).map_err(|source| {
            KeyError::Write {
                path: path.display().to_string(),
                source,
            }
        })
    }

    pub fn pseudonym(&self, destination_id: &str, profile_id: &str) -> String {
        let mut pseudonym = String::new();
        self.pseudonym_into(destination_id, profile_id, &mut pseudonym);
        pseudonym
    }

    /// [`Pseudonymiser::pseudonym`] written over `pseudonym`, reusing its
    /// allocation.
    pub fn pseudonym_into(&self, destination_id: &str, profile_id: &str, pseudonym: &mut String) {
        let mut mac = self.key.clone();
        mac.update(destination_id.as_bytes());
        // A separator no id contains keeps ("ab","c") and ("a","bc") apart.
        mac.update(&[0]);
        mac.update(profile_id.as_bytes());
        madtech_common::hashing::write_hex(&mac.finalize().into_bytes().into(), pseudonym);
    }
}

/// Consent states as the consent policy names them. A state the gateway
/// does not know is `unknown`, which no policy row allows.
pub fn consent_state_name(state: consent_pb::ConsentState) -> &'static str {
    match state {
        consent_pb::ConsentState::Granted => "granted",
        consent_pb::ConsentState::Denied => "denied",
        consent_pb::ConsentState::Unset => "unset",
        consent_pb::ConsentState::Unspecified => "unknown",
    }
}

fn state_index(state: consent_pb::ConsentState) -> usize {
    match state {
        consent_pb::ConsentState::Granted => 0,
        consent_pb::ConsentState::Denied => 1,
        consent_pb::ConsentState::Unset => 2,
        consent_pb::ConsentState::Unspecified => 3,
    }
}

/// The reason a member denied in this state is counted under.
fn denial_reason(state: consent_pb::ConsentState) -> &'static str {
    match state {
        consent_pb::ConsentState::Granted => "consent_granted",
        consent_pb::ConsentState::Denied => "consent_denied",
        consent_pb::ConsentState::Unset => "consent_unset",
        consent_pb::ConsentState::Unspecified => "consent_unknown",
    }
}

/// What was decided in one crossing, for the audit record and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub allowed: u64,
    /// Denied members by reason, e.g. `consent_denied`.
    pub denied: BTreeMap<String, u64>,
    /// Identifiers dropped because the policy does not let their kind cross.
    pub identifiers_stripped: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.allowed += other.allowed;
        self.identifiers_stripped += other.identifiers_stripped;
        for (reason, count) in other.denied {
            *self.denied.entry(reason).or_default() += count;
        }
    }
}

/// What a filter decided and released since it was last settled
/// ([`Filter::settle`]), typically one page: its counts, and the SHA-256 of
/// what it released (`None` when it released nothing: such a page is never
/// sent, so its receiver could not digest it).
#[derive(Debug, Default, PartialEq)]
pub struct Settlement {
    pub tally: Tally,
    released: Option<[u8; 32]>,
}

/// An export's account of what crossed, for its audit record: the counts
/// over all its pages, and the released digest: SHA-256 over each page's
/// SHA-256 of what it released, in the order pages were sent. Digested per
/// page, the pages of one export can be filtered at the same time.
#[derive(Clone, Default)]
pub struct Ledger {
    pub tally: Tally,
    released: Sha256,
}

impl Ledger {
    /// Adds a page's settlement; pages must be recorded in the order they
    /// are released.
    pub fn record(&mut self, settlement: Settlement) {
        self.tally.add(settlement.tally);
        if let Some(page) = settlement.released {
            self.released.update(page);
        }
    }

    /// Hex SHA-256 over the released pages' digests so far, in order.
    pub fn released_digest(&self) -> String {
        hex::encode(self.released.clone().finalize())
    }
}

/// The per-export decision maker. Decisions depend only on (region, consent
/// state, age band) for a fixed destination and purpose, and identifier
/// decisions only on the kind, so each distinct input is evaluated once per
/// export. Age bands are worked out for the day the export started, before
/// any decision: the time-dependent input never lives inside a cached one.
pub struct Filter {
    policy: Arc<PolicySet>,
    pseudonymiser: Pseudonymiser,
    destination_id: String,
    destination_kind: String,
    purpose: String,
    today: chrono::NaiveDate,
    /// Decisions by region, then at `band index * 4 + state_index`.
    decisions: HashMap<String, Vec<Option<bool>>>,
    /// The form each identifier kind crosses in, `None` when it may not.
    forms: HashMap<String, Option<Form>>,
    /// SHA-256 over what was released since the last settlement, member
    /// by member, for the export's [`Ledger`]; `None` until something is.
    released: Option<Sha256>,
    /// The member being written out, kept between members so its strings'
    /// allocations are reused.
    crossed: segments_pb::AudienceMember,
    pub tally: Tally,
}

impl Filter {
    pub fn new(
        policy: Arc<PolicySet>,
        pseudonymiser: Pseudonymiser,
        destination_id: &str,
        destination_kind: &str,
        purpose: &str,
    ) -> Self {
        Filter {
            policy,
            pseudonymiser,
            destination_id: destination_id.to_string(),
            destination_kind: destination_kind.to_string(),
            purpose: purpose.to_string(),
            today: chrono::Utc::now().date_naive(),
            decisions: HashMap::new(),
            forms: HashMap::new(),
            released: None,
            crossed: segments_pb::AudienceMember::default(),
            tally: Tally::default(),
        }
    }

    /// Decides on `member` and, when it may cross, appends it to `page` as
    /// it crosses: an `ExportAudienceResponse.members` entry holding only
    /// the region, the pseudonymous id and the identifiers the policy lets
    /// through, hashed. Answers whether it crossed.
    pub fn cross(
        &mut self,
        member: &MemberView<'_>,
        consent: consent_pb::ConsentState,
        page: &mut Vec<u8>,
    ) -> Result<bool, PolicyError> {
        let Some(crossed) = self.admit(member, consent)? else {
            return Ok(false);
        };
        madtech_proto::segments::export_page::encode_member(crossed, page);
        Ok(true)
    }

    /// Decides on `member` and, when it may cross, answers it as it
    /// crosses (see [`Filter::cross`]); `None` when it may not.
    pub fn admit(
        &mut self,
        member: &MemberView<'_>,
        consent: consent_pb::ConsentState,
    ) -> Result<Option<&segments_pb::AudienceMember>, PolicyError> {
        let state = consent_state_name(consent);
        let bands = self.policy.age_bands();
        let (band_index, band) = bands.band(member.birth_date, self.today);
        let index = band_index * 4 + state_index(consent);
        // Looked up by `&str`: nothing is allocated per member on a hit.
        let cached = self
            .decisions
            .get(member.region)
            .and_then(|decided| decided[index]);
        let allowed = match cached {
            Some(allowed) => allowed,
            None => {
                let allowed = self.policy.allows_crossing(
                    &self.destination_kind,
                    &self.purpose,
                    member.region,
                    state,
                    band,
                )?;
                let slots = bands.count() * 4;
                self.decisions
                    .entry(member.region.to_string())
                    .or_insert_with(|| vec![None; slots])[index] = Some(allowed);
                allowed
            }
        };
        if !allowed {
            let reason = denial_reason(consent);
            match self.tally.denied.get_mut(reason) {
                Some(count) => *count += 1,
                None => {
                    self.tally.denied.insert(reason.to_string(), 1);
                }
            }
            return Ok(None);
        }
        // Taken out while filled in, so `form_of` may borrow the filter.
        let mut crossed = std::mem::take(&mut self.crossed);
        let mut hashed = 0;
        for identifier in &member.identifiers {
            let Some(form) = self.form_of(identifier.kind)? else {
                self.tally.identifiers_stripped += 1;
                continue;
            };
            if crossed.hashed_identifiers.len() == hashed {
                crossed.hashed_identifiers.push(Default::default());
            }
            let slot = &mut crossed.hashed_identifiers[hashed];
            replace(&mut slot.kind, identifier.kind);
            form.hash_into(identifier.kind, identifier.value, &mut slot.sha256);
            replace(&mut slot.form, form.name());
            hashed += 1;
        }
        crossed.hashed_identifiers.truncate(hashed);
        replace(&mut crossed.region, member.region);
        self.pseudonymiser.pseudonym_into(
            &self.destination_id,
            member.profile_id,
            &mut crossed.pseudonymous_id,
        );
        // Everything else (profile id, raw identifiers, merged ids, birth
        // date) stays empty: decided on, never released.
        self.tally.allowed += 1;
        let released = self.released.get_or_insert_with(Sha256::new);
        released.update(crossed.pseudonymous_id.as_bytes());
        for identifier in &crossed.hashed_identifiers {
            released.update(b"\x1f");
            released.update(identifier.kind.as_bytes());
            released.update(b"=");
            released.update(identifier.sha256.as_bytes());
        }
        released.update(b"\n");
        self.crossed = crossed;
        Ok(Some(&self.crossed))
    }

    /// The pseudonymous id under which the destination is told that the
    /// person with `profile_id` is not (or no longer) in the audience;
    /// counted in the released digest like a member.
    pub fn leave(&mut self, profile_id: &str) -> String {
        let pseudonym = self
            .pseudonymiser
            .pseudonym(&self.destination_id, profile_id);
        let released = self.released.get_or_insert_with(Sha256::new);
        released.update(b"-");
        released.update(pseudonym.as_bytes());
        released.update(b"\n");
        pseudonym
    }

    /// What was decided and released since the last settlement, taken out
    /// of the filter for the export's [`Ledger`].
    pub fn settle(&mut self) -> Settlement {
        Settlement {
            tally: std::mem::take(&mut self.tally),
            released: self.released.take().map(|page| page.finalize().into()),
        }
    }

    fn form_of(&mut self, kind: &str) -> Result<Option<Form>, PolicyError> {
        if let Some(form) = self.forms.get(kind) {
            return Ok(*form);
        }
        let form = self.policy.identifier_form(&self.destination_kind, kind)?;
        self.forms.insert(kind.to_string(), form);
        Ok(form)
    }
}

/// Serves `ExportAudience` through the filter.
#[derive(Clone)]
pub struct Crossing {
    pub(crate) policies: Policies,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) pseudonymiser: Pseudonymiser,
    /// Pages come back as bytes (`PageCodec`), read in place.
    pub(crate) segments: tonic::client::Grpc<Upstream>,
    pub(crate) consent: Arc<ConsentView>,
    destinations: DestinationRegistry,
    /// Pages of one export filtered at once, each by its own task.
    workers: usize,
}

type Members = std::pin::Pin<
    Box<dyn Stream<Item = Result<segments_pb::ExportAudienceResponse, Status>> + Send>,
>;

/// A request that crosses: it names a segment, a destination (and perhaps
/// its kind) and a purpose.
pub(crate) trait CrossingRequest {
    /// Checks the fields and trims the ids in place, so the pseudonyms,
    /// the audit record and every call the crossing makes use the one
    /// spelling the destination registry knows (as consent releases do).
    fn validate(&mut self) -> Result<(), FieldError>;
    fn segment_id(&self) -> &str;
    fn purpose(&self) -> &str;
    /// The destination id and the kind the caller named (may be empty).
    fn destination(&self) -> (&str, &str);
    fn destination_kind_mut(&mut self) -> &mut String;
}

/// Checks the fields every crossing request has, trimming its ids.
fn validated(
    segment_id: &mut String,
    destination_id: &mut String,
    purpose: &str,
) -> Result<(), FieldError> {
    *segment_id = require("segment_id", segment_id)?.to_string();
    *destination_id = require("destination_id", destination_id)?.to_string();
    policy_name("purpose", purpose)?;
    Ok(())
}

macro_rules! crossing_request {
    ($message:ty) => {
        impl CrossingRequest for $message {
            fn validate(&mut self) -> Result<(), FieldError> {
                validated(
                    &mut self.segment_id,
                    &mut self.destination_id,
                    &self.purpose,
                )
            }

            fn segment_id(&self) -> &str {
                &self.segment_id
            }

            fn purpose(&self) -> &str {
                &self.purpose
            }

            fn destination(&self) -> (&str, &str) {
                (&self.destination_id, &self.destination_kind)
            }

            fn destination_kind_mut(&mut self) -> &mut String {
                &mut self.destination_kind
            }
        }
    };
}

crossing_request!(segments_pb::ExportAudienceRequest);
crossing_request!(segments_pb::ExportAudienceChangesRequest);

/// A crossing request accepted by [`Crossing::accept`].
pub(crate) struct Accepted<R> {
    /// The caller's subject.
    pub caller: String,
    pub deadline: Option<tokio::time::Instant>,
    /// The request, with the destination's registered kind.
    pub request: R,
    pub policy: Arc<PolicySet>,
}

impl<R: CrossingRequest> Accepted<R> {
    /// What every audit record of this call says of it; `method` is its
    /// gRPC path.
    pub fn audit_base(&self, method: &str) -> audit::Crossing {
        let (destination_id, destination_kind) = self.request.destination();
        audit::Crossing {
            caller: self.caller.clone(),
            method: method.to_string(),
            segment_id: self.request.segment_id().to_string(),
            destination_id: destination_id.to_string(),
            destination_kind: destination_kind.to_string(),
            purpose: self.request.purpose().to_string(),
            policy_version: self.policy.version.clone(),
            ..audit::Crossing::default()
        }
    }
}

/// What a crossing answers while no valid policy set is loaded.
pub(crate) fn no_policy() -> Status {
    Status::failed_precondition("no valid policy set is loaded; nothing may cross")
}

pub(crate) fn policy_failure(err: PolicyError) -> Status {
    tracing::error!(error = %err, "consent policy evaluation failed; nothing crosses");
    Status::internal("policy evaluation failed")
}

impl Crossing {
    pub fn new(
        policies: Policies,
        audit: Arc<AuditLog>,
        pseudonymiser: Pseudonymiser,
        segments: Upstream,
        consent: Arc<ConsentView>,
        destinations: DestinationRegistry,
        workers: usize,
    ) -> Self {
        Crossing {
            policies,
            audit,
            pseudonymiser,
            segments: tonic::client::Grpc::new(segments),
            consent,
            destinations,
            workers: workers.max(1),
        }
    }

    /// Handles one `ExportAudience` call at the HTTP level.
    pub async fn handle(
        self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let codec = tonic_prost::ProstCodec::<
            segments_pb::ExportAudienceResponse,
            segments_pb::ExportAudienceRequest,
        >::default();
        let mut grpc = tonic::server::Grpc::new(codec);
        let service = tower::service_fn(move |request| self.clone().export(request));
        grpc.server_streaming(service, request).await
    }

    /// What every crossing settles before anything crosses: the request
    /// is valid, a policy set is in force (none: nothing crosses), and the
    /// destination is registered; its registered kind, which picks the
    /// policy rows, replaces whatever the request named (another kind is
    /// refused).
    pub(crate) async fn accept<R: CrossingRequest>(
        &self,
        request: Request<R>,
    ) -> Result<Accepted<R>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        // The caller's deadline bounds every call the crossing makes for it.
        let deadline = deadline_of(request.metadata());
        let mut request = request.into_inner();
        request.validate()?;
        let policy = self.policies.current().ok_or_else(no_policy)?;
        let (destination_id, named_kind) = request.destination();
        let kind = self.destinations.kind_of(destination_id, deadline).await?;
        check_named_kind(destination_id, named_kind, &kind)?;
        *request.destination_kind_mut() = kind;
        Ok(Accepted {
            caller: caller.map(|c| c.subject).unwrap_or_default(),
            deadline,
            request,
            policy,
        })
    }

    /// Calls the segments service's `path` for a crossing, within the
    /// caller's deadline.
    pub(crate) async fn upstream<C>(
        &self,
        path: &'static str,
        message: C::Encode,
        deadline: Option<tokio::time::Instant>,
        codec: C,
    ) -> Result<Response<tonic::Streaming<C::Decode>>, Status>
    where
        C: tonic::codec::Codec,
        C::Encode: Send + Sync + 'static,
        C::Decode: Send + Sync + 'static,
    {
        let mut segments = self.segments.clone();
        segments
            .ready()
            .await
            .map_err(|err| Status::unavailable(format!("the segments service: {err}")))?;
        segments
            .server_streaming(
                with_deadline(message, deadline)?,
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await
    }

    /// The consent state each subject crosses under for `purpose` (and, for
    /// a destination that is a TCF vendor, its vendor choice).
    pub(crate) async fn consent_states<M: Subject>(
        &self,
        members: &[M],
        purpose: &str,
        vendor_purpose: Option<&str>,
        freshness: Freshness,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<consent_pb::ConsentState>, Status> {
        let mut states = self
            .consent
            .states(members, purpose, freshness, deadline)
            .await?;
        if let Some(vendor_purpose) = vendor_purpose {
            let vendor_states = self
                .consent
                .states(members, vendor_purpose, freshness, deadline)
                .await?;
            refuse_vendor_denials(&mut states, &vendor_states);
        }
        Ok(states)
    }

    async fn export(
        self,
        request: Request<segments_pb::ExportAudienceRequest>,
    ) -> Result<Response<Members>, Status> {
        let accepted = self.accept(request).await?;
        let base = accepted.audit_base(EXPORT_AUDIENCE);
        let Accepted {
            deadline,
            request,
            policy,
            ..
        } = accepted;
        // Everything recorded before this call is reflected in what crosses.
        let freshness = self.consent.freshness(deadline).await?;
        let upstream = self
            .upstream(EXPORT_AUDIENCE, request.clone(), deadline, PageCodec)
            .await?;
        let membership_cursor = upstream
            .metadata()
            .get(madtech_proto::segments::MEMBERSHIP_CURSOR_HEADER)
            .cloned();
        let filters = (0..self.workers)
            .map(|_| {
                Filter::new(
                    Arc::clone(&policy),
                    self.pseudonymiser.clone(),
                    &request.destination_id,
                    &request.destination_kind,
                    &request.purpose,
                )
            })
            .collect();
        let work = Arc::new(PageWork {
            crossing: self.clone(),
            purpose: request.purpose.clone(),
            vendor_purpose: policy.tcf_vendor_purpose(&request.destination_kind, &request.purpose),
            freshness,
            deadline,
        });
        // Pages are filtered on several tasks and sent in the order they came.
        let mut pages = Ordered::spawn(upstream.into_inner(), filters, move |mut filter, page| {
            let work = Arc::clone(&work);
            async move {
                let crossed = match page {
                    Ok(page) => work.cross(&mut filter, &page).await,
                    Err(status) => Err(status),
                };
                (filter, crossed)
            }
        });
        let mut audited = Audited {
            ledger: Ledger::default(),
            log: Arc::clone(&self.audit),
            base,
            recorded: false,
        };
        let policy_version = policy.version.clone();
        let stream = async_stream::stream! {
            let outcome: Result<(), Status> = loop {
                match pages.next().await {
                    None => break Ok(()),
                    Some(Ok(Ok((page, settlement)))) => {
                        audited.ledger.record(settlement);
                        if !page.is_empty() {
                            yield Ok(segments_pb::ExportAudienceResponse::encoded(page.into()));
                        }
                    }
                    Some(Ok(Err(status))) => break Err(status),
                    Some(Err(stopped)) => {
                        tracing::error!(error = %stopped, "a crossing's filter stopped; nothing more crosses");
                        break Err(Status::internal("the crossing's filter stopped"));
                    }
                }
            };
            // The export succeeds only once its audit record is durable.
            let recorded = audited.record(if outcome.is_ok() { "complete" } else { "failed" }).await;
            match (outcome, recorded) {
                (Ok(()), Ok(())) => {}
                (Err(status), _) => yield Err(status),
                (Ok(()), Err(status)) => yield Err(status),
            }
        };
        let mut response = Response::new(Box::pin(stream) as Members);
        name_policy_version(&mut response, &policy_version);
        if let Some(cursor) = membership_cursor {
            response
                .metadata_mut()
                .insert(madtech_proto::segments::MEMBERSHIP_CURSOR_HEADER, cursor);
        }
        Ok(response)
    }
}

/// Names the policy version a crossing is decided under in its response
/// headers.
pub(crate) fn name_policy_version<T>(response: &mut Response<T>, version: &str) {
    // Hex digits only: always a valid header value.
    if let Ok(version) = version.parse() {
        response
            .metadata_mut()
            .insert(madtech_proto::segments::POLICY_VERSION_HEADER, version);
    }
}

/// The caller's deadline (`grpc-timeout`), which bounds every call a
/// crossing makes for it.
pub(crate) fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    metadata
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(madtech_common::upstream::parse_grpc_timeout)
        .map(|timeout| tokio::time::Instant::now() + timeout)
}

/// A TC string that refused the destination's vendor denies the purpose for
/// that destination; no vendor choice on record leaves the purpose's state.
fn refuse_vendor_denials(
    states: &mut [consent_pb::ConsentState],
    vendor_states: &[consent_pb::ConsentState],
) {
    for (state, vendor) in states.iter_mut().zip(vendor_states) {
        if *vendor == consent_pb::ConsentState::Denied {
            *state = consent_pb::ConsentState::Denied;
        }
    }
}

/// A request that must answer before `deadline`; DEADLINE_EXCEEDED when it
/// has passed already.
pub(crate) fn with_deadline<T>(
    message: T,
    deadline: Option<tokio::time::Instant>,
) -> Result<Request<T>, Status> {
    let mut request = Request::new(message);
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(Status::deadline_exceeded("the caller's deadline passed"));
        }
        request.set_timeout(left);
    }
    Ok(request)
}

/// What each of an export's filtering workers needs besides its filter.
struct PageWork {
    crossing: Crossing,
    purpose: String,
    vendor_purpose: Option<String>,
    freshness: Freshness,
    deadline: Option<tokio::time::Instant>,
}

impl PageWork {
    /// One upstream page as it crosses: its members read in place, their
    /// consent looked up, each decided on and minimised, the crossed ones
    /// written straight into the page sent on. Answers that page and what
    /// the filter settled for it.
    async fn cross(
        &self,
        filter: &mut Filter,
        upstream: &[u8],
    ) -> Result<(Vec<u8>, Settlement), Status> {
        let members = read_page(upstream).map_err(|err| {
            tracing::error!(error = %err, "the segments service sent a malformed export page; nothing crosses");
            Status::internal("the segments service sent a malformed export page")
        })?;
        let states = self
            .crossing
            .consent_states(
                &members,
                &self.purpose,
                self.vendor_purpose.as_deref(),
                self.freshness,
                self.deadline,
            )
            .await?;
        let mut page = Vec::with_capacity(upstream.len() * 2);
        for (member, state) in members.iter().zip(states) {
            filter
                .cross(member, state, &mut page)
                .map_err(policy_failure)?;
        }
        Ok((page, filter.settle()))
    }
}

/// The account of one export and the audit record it owes. The record is
/// written when the export ends, and also when the caller goes away midway
/// (outcome `aborted`): no crossing goes unrecorded.
pub(crate) struct Audited {
    pub(crate) ledger: Ledger,
    pub(crate) log: Arc<AuditLog>,
    pub(crate) base: audit::Crossing,
    pub(crate) recorded: bool,
}

impl Audited {
    fn crossing(&self, outcome: &str) -> audit::Crossing {
        let tally = &self.ledger.tally;
        audit::Crossing {
            outcome: outcome.to_string(),
            allowed: tally.allowed,
            denied: tally.denied.clone(),
            identifiers_stripped: tally.identifiers_stripped,
            released_digest: self.ledger.released_digest(),
            ..self.base.clone()
        }
    }

    pub(crate) async fn record(&mut self, outcome: &str) -> Result<(), Status> {
        let crossing = self.crossing(outcome);
        observe(&crossing);
        // The write runs on its own task: if the caller goes away while it
        // is under way, it still completes, and exactly once.
        let log = Arc::clone(&self.log);
        let write = tokio::spawn(async move { log.append(crossing).await });
        self.recorded = true;
        let failed = |reason: String| {
            tracing::error!(error = %reason, "the crossing could not be audited");
            Status::internal("the crossing could not be audited")
        };
        match write.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(failed(err.to_string())),
            Err(err) => Err(failed(err.to_string())),
        }
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let crossing = self.crossing("aborted");
        observe(&crossing);
        let log = Arc::clone(&self.log);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = log.append(crossing).await {
                        tracing::error!(error = %err, "an aborted crossing could not be audited");
                    }
                });
            }
            Err(_) => tracing::error!("an aborted crossing could not be audited: no runtime"),
        }
    }
}

/// Metrics and the audit log line of a crossing; never a personal identifier.
fn observe(crossing: &audit::Crossing) {
    metrics::counter!("madtech_gateway_crossing_members_total", "outcome" => "allowed")
        .increment(crossing.allowed);
    for (reason, count) in &crossing.denied {
        metrics::counter!(
            "madtech_gateway_crossing_members_total",
            "outcome" => "denied",
            "reason" => reason.clone()
        )
        .increment(*count);
    }
    let denied = serde_json::to_string(&crossing.denied).unwrap_or_default();
    tracing::info!(
        target: "madtech::audit",
        caller = %crossing.caller,
        method = %crossing.method,
        segment = %crossing.segment_id,
        destination = %crossing.destination_id,
        destination_kind = %crossing.destination_kind,
        purpose = %crossing.purpose,
        policy_version = %crossing.policy_version,
        outcome = %crossing.outcome,
        allowed = crossing.allowed,
        denied = %denied,
        identifiers_stripped = crossing.identifiers_stripped,
        released_digest = %crossing.released_digest,
        "crossing"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use madtech_proto::profiles::v1::Identifier;

    #[test]
    fn a_refused_vendor_denies_and_no_vendor_choice_changes_nothing() {
        use consent_pb::ConsentState::{Denied, Granted, Unset};
        let mut states = vec![Granted, Granted, Unset, Granted];
        refuse_vendor_denials(&mut states, &[Denied, Granted, Denied, Unset]);
        assert_eq!(states, vec![Denied, Granted, Denied, Granted]);
    }

    #[test]
    fn a_crossing_request_s_ids_are_trimmed_in_place_before_anything_uses_them() {
        let mut request = segments_pb::ExportAudienceRequest {
            segment_id: " seg-1 ".into(),
            destination_id: "dest-1 ".into(),
            purpose: "ad_targeting".into(),
            ..Default::default()
        };
        request.validate().expect("valid");
        assert_eq!(request.segment_id, "seg-1");
        assert_eq!(
            request.destination(),
            ("dest-1", ""),
            "pseudonyms are keyed by the id the registry knows"
        );
        let mut blank = segments_pb::ExportAudienceChangesRequest {
            segment_id: "seg-1".into(),
            destination_id: "  ".into(),
            purpose: "ad_targeting".into(),
            ..Default::default()
        };
        assert_eq!(blank.validate().expect_err("blank").field, "destination_id");
    }

    async fn filter() -> Filter {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let policy = Arc::new(PolicySet::load(&dir).await.expect("policies"));
        let pseudonymiser = Pseudonymiser::new(&[7; 32]).expect("key");
        Filter::new(policy, pseudonymiser, "dest-1", "file", "ad_targeting")
    }

    fn member(id: &str, region: &str) -> segments_pb::AudienceMember {
        segments_pb::AudienceMember {
            profile_id: id.into(),
            identifiers: vec![
                Identifier {
                    kind: "email".into(),
                    value: "user@example.com".into(),
                },
                Identifier {
                    kind: "phone".into(),
                    value: "+12345678901".into(),
                },
                Identifier {
                    kind: "customer_id".into(),
                    value: "C-1".into(),
                },
            ],
            region: region.into(),
            merged_profile_ids: vec!["merged-1".into()],
            ..Default::default()
        }
    }

    /// `member` through the filter as a crossing sends it: encoded in a
    /// page, read in place, written out, decoded at the receiver.
    fn cross_one(
        filter: &mut Filter,
        member: segments_pb::AudienceMember,
        state: consent_pb::ConsentState,
    ) -> Result<Option<segments_pb::AudienceMember>, PolicyError> {
        use prost::Message;
        let upstream = segments_pb::ExportAudienceResponse::of(vec![member]).encode_to_vec();
        let members = read_page(&upstream).expect("a page");
        let mut page = Vec::new();
        let crossed = filter.cross(&members[0], state, &mut page)?;
        let mut sent = segments_pb::ExportAudienceResponse::decode(page.as_slice()).expect("sent");
        assert_eq!(crossed, sent.members.len() == 1);
        Ok(sent.members.pop())
    }

    /// An audit log on a fresh SQLite database, kept while the first half
    /// of the pair lives.
    async fn audit_log() -> (madtech_common::testing::TestDatabase, Arc<AuditLog>) {
        let db = madtech_common::testing::TestDatabase::sqlite();
        let conn = madtech_common::db::connect_and_migrate::<audit::Migrator>(&db.config)
            .await
            .expect("audit database");
        (db, Arc::new(AuditLog::new(conn)))
    }

    /// A page that fails after its audit record is owed (the consent
    /// service gone, a policy error) drops its `Audited`: the record is
    /// written all the same, as `aborted`, with what had been tallied.
    #[tokio::test]
    async fn an_account_dropped_unrecorded_is_recorded_as_aborted() {
        let (_db, log) = audit_log().await;
        let base = audit::Crossing {
            caller: "activation".into(),
            method: "/madtech.segments.v1.SegmentService/ExportAudienceChanges".into(),
            destination_id: "dest-1".into(),
            ..audit::Crossing::default()
        };
        let mut filter = filter().await;
        cross_one(
            &mut filter,
            member("p1", "FR"),
            consent_pb::ConsentState::Denied,
        )
        .expect("decided");
        let mut ledger = Ledger::default();
        ledger.record(filter.settle());
        drop(Audited {
            ledger,
            log: Arc::clone(&log),
            base,
            recorded: false,
        });

        // The write runs on a task of its own; wait for it.
        let mut records = Vec::new();
        for _ in 0..200 {
            records = log.list(0, 10).await.expect("list");
            if !records.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(records.len(), 1, "exactly one record");
        let crossing = &records[0].crossing;
        assert_eq!(crossing.outcome, "aborted");
        assert_eq!(crossing.destination_id, "dest-1");
        assert_eq!(crossing.allowed, 0);
        assert_eq!(crossing.denied.values().sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn a_recorded_account_is_not_recorded_again_when_dropped() {
        let (_db, log) = audit_log().await;
        let mut audited = Audited {
            ledger: Ledger::default(),
            log: Arc::clone(&log),
            base: audit::Crossing::default(),
            recorded: false,
        };
        audited.record("released").await.expect("recorded");
        drop(audited);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let records = log.list(0, 10).await.expect("list");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].crossing.outcome, "released");
    }

    #[tokio::test]
    async fn a_decoded_member_is_admitted_as_a_page_member_crosses() {
        let (mut by_page, mut decoded) = (filter().await, filter().await);
        let granted = consent_pb::ConsentState::Granted;
        let sent = cross_one(&mut by_page, member("p1", "FR"), granted)
            .expect("decided")
            .expect("allowed");
        let upstream = member("p1", "FR");
        let admitted = decoded
            .admit(&MemberView::of(&upstream), granted)
            .expect("decided")
            .cloned();
        assert_eq!(admitted, Some(sent));
        assert_eq!(by_page.settle(), decoded.settle());
        let refused = decoded
            .admit(&MemberView::of(&upstream), consent_pb::ConsentState::Denied)
            .expect("decided");
        assert!(refused.is_none());
    }

    #[tokio::test]
    async fn people_who_leave_are_named_by_pseudonym_and_digested() {
        let mut filter = filter().await;
        let pseudonym = filter.leave("p1");
        assert_eq!(
            pseudonym,
            Pseudonymiser::new(&[7; 32])
                .expect("key")
                .pseudonym("dest-1", "p1")
        );
        let settled = filter.settle();
        assert_eq!(
            settled.tally,
            Tally::default(),
            "a leaver is not a decision"
        );
        let mut ledger = Ledger::default();
        let before = ledger.released_digest();
        ledger.record(settled);
        assert_ne!(
            ledger.released_digest(),
            before,
            "what was released is digested"
        );
    }

    #[tokio::test]
    async fn pages_filtered_apart_settle_as_if_filtered_by_one() {
        use consent_pb::ConsentState::{Denied, Granted};
        let pages: Vec<Vec<_>> = (0..4)
            .map(|page| {
                (0..3)
                    .map(|i| {
                        let state = if i == 1 { Denied } else { Granted };
                        (member(&format!("p{page}-{i}"), "FR"), state)
                    })
                    .collect()
            })
            .collect();
        let mut one = filter().await;
        let mut alternating = [filter().await, filter().await];
        let (mut by_one, mut by_two) = (Ledger::default(), Ledger::default());
        for (n, page) in pages.into_iter().enumerate() {
            for (member, state) in page {
                cross_one(&mut one, member.clone(), state).expect("decided");
                cross_one(&mut alternating[n % 2], member, state).expect("decided");
            }
            by_one.record(one.settle());
            by_two.record(alternating[n % 2].settle());
        }
        assert_eq!(by_one.tally, by_two.tally);
        assert_eq!(
            (by_one.tally.allowed, by_one.tally.denied["consent_denied"]),
            (8, 4)
        );
        assert_eq!(by_one.released_digest(), by_two.released_digest());
    }

    #[tokio::test]
    async fn allowed_members_cross_hashed_and_pseudonymised() {
        let mut filter = filter().await;
        let crossed = cross_one(
            &mut filter,
            member("p1", "FR"),
            consent_pb::ConsentState::Granted,
        )
        .expect("decided")
        .expect("allowed");
        assert!(crossed.profile_id.is_empty() && crossed.identifiers.is_empty());
        assert!(crossed.merged_profile_ids.is_empty());
        assert_eq!(crossed.region, "FR");
        assert_eq!(crossed.pseudonymous_id.len(), 64);
        assert_ne!(crossed.pseudonymous_id, "p1");
        // Published vectors (shared/testdata/signals.json, from the UID2
        // documentation's normalization-and-encoding page).
        assert_eq!(
            crossed.hashed_identifiers,
            vec![
                segments_pb::HashedIdentifier {
                    kind: "email".into(),
                    sha256: "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"
                        .into(),
                    form: "sha256".into(),
                },
                segments_pb::HashedIdentifier {
                    kind: "phone".into(),
                    sha256: "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee"
                        .into(),
                    form: "sha256".into(),
                },
            ]
        );
        assert_eq!(
            filter.tally.identifiers_stripped, 1,
            "customer_id may not cross"
        );
    }

    #[tokio::test]
    async fn a_member_crossing_after_another_carries_nothing_of_it() {
        let mut filter = filter().await;
        let granted = consent_pb::ConsentState::Granted;
        let first = cross_one(&mut filter, member("p1", "FR"), granted).expect("decided");
        assert_eq!(first.expect("allowed").hashed_identifiers.len(), 2);
        let mut fewer = member("p2", "DE");
        fewer.identifiers.truncate(1);
        let second = cross_one(&mut filter, fewer, granted)
            .expect("decided")
            .expect("allowed");
        assert_eq!(second.hashed_identifiers.len(), 1);
        assert_eq!(second.region, "DE");
        assert_eq!(
            second.pseudonymous_id,
            filter.pseudonymiser.pseudonym("dest-1", "p2")
        );
    }

    #[tokio::test]
    async fn denied_members_are_dropped_and_counted_by_reason() {
        let mut filter = filter().await;
        let cases = [
            ("FR", consent_pb::ConsentState::Denied, false),
            ("FR", consent_pb::ConsentState::Unset, false),
            ("US-CA", consent_pb::ConsentState::Unset, true),
            ("US-CA", consent_pb::ConsentState::Denied, false),
            ("", consent_pb::ConsentState::Unset, false),
            ("US-CA", consent_pb::ConsentState::Unspecified, false),
        ];
        for (i, (region, state, allowed)) in cases.into_iter().enumerate() {
            let out =
                cross_one(&mut filter, member(&format!("p{i}"), region), state).expect("decided");
            assert_eq!(out.is_some(), allowed, "{region} {state:?}");
        }
        assert_eq!(filter.tally.allowed, 1);
        assert_eq!(filter.tally.denied["consent_denied"], 2);
        assert_eq!(filter.tally.denied["consent_unset"], 2);
        assert_eq!(
            filter.tally.denied["consent_unknown"], 1,
            "an unknown state never crosses"
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_destination_and_unlinkable_across() {
        let p = Pseudonymiser::new(&[1; 32]).expect("key");
        assert_eq!(p.pseudonym("d1", "p1"), p.pseudonym("d1", "p1"));
        assert_ne!(p.pseudonym("d1", "p1"), p.pseudonym("d2", "p1"));
        assert_ne!(p.pseudonym("ab", "c"), p.pseudonym("a", "bc"));
        let other = Pseudonymiser::new(&[2; 32]).expect("key");
        assert_ne!(p.pseudonym("d1", "p1"), other.pseudonym("d1", "p1"));
        assert!(
            Pseudonymiser::new(&[1; 16]).is_none(),
            "short keys are refused"
        );
    }

    #[test]
    fn sha256_matches_the_published_vector() {
        use madtech_common::hashing::sha256_hex;
        // FIPS 180-2 appendix B.1: SHA-256("abc").
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
