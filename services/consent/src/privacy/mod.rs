//! Data-subject requests: access, erasure and opting out of sale and
//! sharing. A request is a list of steps, each idempotent, carried out in
//! order by the [`worker`] through the gateway (as the `compliance` role)
//! until every one is done; a step that fails keeps the request open with
//! the reason and is tried again later. A request is never reported done
//! while a step is not.

pub mod service;
pub mod store;
pub mod worker;

use std::collections::BTreeMap;

use madtech_common::hashing::Form;
use serde::{Deserialize, Serialize};

/// What the person asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Access,
    Erasure,
    OptOutOfSaleSharing,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Access => "access",
            Kind::Erasure => "erasure",
            Kind::OptOutOfSaleSharing => "opt_out_of_sale_sharing",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Kind::Access, Kind::Erasure, Kind::OptOutOfSaleSharing]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }

    /// The steps of a request of this kind, in the order they run.
    ///
    /// Erasure waits, after profiles has erased the person, for segments
    /// to apply the erasure from the profiles change stream, and only then
    /// removes them from the ad platforms: exports read segments, so no
    /// sync after the removal can send them again. Then consent drops its
    /// own records and every service is checked for what is left.
    pub fn steps(self) -> &'static [StepName] {
        use StepName::*;
        match self {
            Kind::Access => &[Resolve, Profiles, Consent, Segments, Activation],
            Kind::Erasure => &[Resolve, Profiles, Segments, Activation, Consent, Verify],
            Kind::OptOutOfSaleSharing => &[Resolve, Consent],
        }
    }
}

/// One step of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    /// Find the person's profile ids and identifiers.
    Resolve,
    Profiles,
    Consent,
    Segments,
    Activation,
    /// The completeness check after an erasure.
    Verify,
}

impl StepName {
    pub fn as_str(self) -> &'static str {
        match self {
            StepName::Resolve => "resolve",
            StepName::Profiles => "profiles",
            StepName::Consent => "consent",
            StepName::Segments => "segments",
            StepName::Activation => "activation",
            StepName::Verify => "verify",
        }
    }
}

/// A step's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: StepName,
    pub done: bool,
    pub attempts: u32,
    /// Why the last attempt did not finish; empty once done.
    pub last_error: String,
    pub done_at_micros: Option<i64>,
}

/// Who the request turned out to be about: the person's profile ids (the
/// survivor first, then the ids merged into it) and normalised identifiers.
/// Kept only while the request is open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    pub profile_ids: Vec<String>,
    pub identifiers: Vec<(String, String)>,
}

impl Found {
    /// Each identifier hashed in every form an identifier may cross in
    /// (plain SHA-256, UID2's normalisation, phone digits without `+`),
    /// once each: which form a destination was given is policy, so a
    /// lookup of what the adtech zone holds asks for all of them.
    pub fn identifier_hashes(&self) -> Vec<String> {
        let hashes: std::collections::BTreeSet<String> = self
            .identifiers
            .iter()
            .flat_map(|(kind, value)| Form::ALL.map(|form| form.hash(kind, value)))
            .collect();
        hashes.into_iter().collect()
    }
}

/// Whether every step is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Completed,
}

/// A request and everything known about its progress.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyRequest {
    pub id: String,
    pub kind: Kind,
    pub status: Status,
    pub subject_kind: String,
    /// The raw identifier, until the request completes.
    pub subject_value: Option<String>,
    pub subject_digest: String,
    pub region: String,
    pub regime: String,
    pub submitted_at_micros: i64,
    pub deadline_micros: i64,
    pub completed_at_micros: Option<i64>,
    pub next_attempt_micros: i64,
    pub steps: Vec<Step>,
    pub found: Option<Found>,
    /// Access: the export, built part by part.
    pub export: serde_json::Map<String, serde_json::Value>,
    /// Erasure: what the completeness check still found, by service.
    pub remaining: BTreeMap<String, u64>,
}

impl PrivacyRequest {
    /// A new request with every step of its kind pending.
    pub fn new(
        id: String,
        kind: Kind,
        subject: (String, String),
        region: String,
        (regime, deadline_micros): (String, i64),
        now: i64,
    ) -> Self {
        let (subject_kind, subject_value) = subject;
        PrivacyRequest {
            subject_digest: madtech_common::digest::identifier(&subject_kind, &subject_value),
            id,
            kind,
            status: Status::Open,
            subject_kind,
            subject_value: Some(subject_value),
            region,
            regime,
            submitted_at_micros: now,
            deadline_micros,
            completed_at_micros: None,
            next_attempt_micros: now,
            steps: kind
                .steps()
                .iter()
                .map(|&name| Step {
                    name,
                    done: false,
                    attempts: 0,
                    last_error: String::new(),
                    done_at_micros: None,
                })
                .collect(),
            found: None,
            export: serde_json::Map::new(),
            remaining: BTreeMap::new(),
        }
    }

    /// Marks the request completed once every step is, and drops what it
    /// held about the person: a completed request is the minimal, hashed
    /// proof that it happened.
    pub fn complete_if_done(&mut self, now: i64) {
        if self.status == Status::Open && self.steps.iter().all(|s| s.done) {
            self.status = Status::Completed;
            self.completed_at_micros = Some(now);
            self.subject_value = None;
            self.found = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: Kind) -> PrivacyRequest {
        PrivacyRequest::new(
            "r-1".into(),
            kind,
            ("email".into(), " Ann@Example.com ".into()),
            "FR".into(),
            ("GDPR".into(), 2_000),
            1_000,
        )
    }

    #[test]
    fn each_kind_has_its_steps_in_order() {
        let names = |kind| -> Vec<&str> {
            request(kind)
                .steps
                .iter()
                .map(|s| s.name.as_str())
                .collect()
        };
        assert_eq!(
            names(Kind::Erasure),
            [
                "resolve",
                "profiles",
                "segments",
                "activation",
                "consent",
                "verify"
            ]
        );
        assert_eq!(names(Kind::OptOutOfSaleSharing), ["resolve", "consent"]);
        assert_eq!(Kind::parse("erasure"), Some(Kind::Erasure));
        assert_eq!(Kind::parse("forget"), None);
    }

    #[test]
    fn completion_needs_every_step_and_leaves_only_the_hashed_proof() {
        let mut request = request(Kind::OptOutOfSaleSharing);
        request.found = Some(Found {
            profile_ids: vec!["p".into()],
            identifiers: vec![("email".into(), "ann@example.com".into())],
        });
        request.steps[0].done = true;
        request.complete_if_done(5_000);
        assert_eq!(request.status, Status::Open, "one step is not done");
        request.steps[1].done = true;
        request.complete_if_done(5_000);
        assert_eq!(request.status, Status::Completed);
        assert_eq!(request.subject_value, None);
        assert_eq!(request.found, None);
        assert_eq!(
            request.subject_digest,
            madtech_common::digest::identifier("email", "Ann@Example.com"),
            "the digest is of the trimmed value"
        );
        assert_eq!(request.subject_digest.len(), 64);
    }

    #[test]
    fn identifiers_hash_in_every_form_they_may_have_crossed_in() {
        let found = Found {
            profile_ids: vec![],
            identifiers: vec![
                ("email".into(), "test@example.com".into()),
                ("email".into(), "jane.saoirse@gmail.com".into()),
                ("phone".into(), "+12345678901".into()),
            ],
        };
        let hashes = found.identifier_hashes();
        let expected = [
            // SHA-256("test@example.com"): every form is the same.
            "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b",
            // As given (Google, files), and with UID2's gmail rule (The
            // Trade Desk; IABTechLab/uid2docs normalisation example).
            &madtech_common::hashing::sha256_hex("jane.saoirse@gmail.com"),
            "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
            // With the `+` (Google) and without it (Meta).
            &madtech_common::hashing::sha256_hex("+12345678901"),
            &madtech_common::hashing::sha256_hex("12345678901"),
        ];
        assert_eq!(hashes.len(), expected.len(), "{hashes:?}");
        for hash in expected {
            assert!(hashes.iter().any(|h| h == hash), "{hash} missing");
        }
    }
}
