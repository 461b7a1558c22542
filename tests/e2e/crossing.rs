//! The crossing end to end: consent recorded, profiles upserted, a segment
//! activated to a file destination and synced, all through the gateway; only
//! the people whose consent allows it reach the file, hashed, and a withdrawal
//! becomes a removal. Nothing the run logs carries a raw email or phone.

use std::path::Path;
use std::sync::{Arc, Mutex};

use madtech_common::testing::Backend;
use madtech_proto::activation::v1 as activation_pb;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::gateway::v1 as gateway_pb;
use madtech_proto::gateway::v1::audit_service_client::AuditServiceClient;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as segments_pb;
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::harness::{Authed, Suite};

struct Person {
    email: &'static str,
    region: &'static str,
    /// `None`: no choice recorded.
    ad_targeting: Option<consent_pb::ConsentState>,
}

const PEOPLE: [Person; 5] = [
    Person {
        email: " Fr.Granted@Example.com",
        region: "FR",
        ad_targeting: Some(consent_pb::ConsentState::Granted),
    },
    Person {
        email: "fr.denied@example.com",
        region: "FR",
        ad_targeting: Some(consent_pb::ConsentState::Denied),
    },
    Person {
        email: "fr.none@example.com",
        region: "FR",
        ad_targeting: None,
    },
    Person {
        email: "CA.None@example.com ",
        region: "US-CA",
        ad_targeting: None,
    },
    Person {
        email: "ca.denied@example.com",
        region: "us-ca",
        ad_targeting: Some(consent_pb::ConsentState::Denied),
    },
];

pub(crate) fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

fn normalised(email: &str) -> String {
    email.trim().to_lowercase()
}

pub(crate) async fn record(
    consent: &mut madtech_proto::consent::v1::consent_service_client::ConsentServiceClient<Authed>,
    profile_id: &str,
    state: consent_pb::ConsentState,
    region: &str,
) {
    consent
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: profile_id.into(),
            choices: vec![consent_pb::PurposeChoice {
                purpose: "ad_targeting".into(),
                state: state.into(),
            }],
            source: consent_pb::ConsentSource::Cmp.into(),
            region: region.into(),
            notice_version: "2026-11".into(),
            collected_at: None,
            ..Default::default()
        })
        .await
        .expect("record consent through the gateway");
}

/// Runs a sync to the end and returns its final state.
pub(crate) async fn sync(
    activation: &mut madtech_proto::activation::v1::activation_service_client::ActivationServiceClient<Authed>,
    activation_id: &str,
) -> activation_pb::SyncRun {
    sync_as(activation, activation_id, false).await
}

/// Runs a sync that exports and compares the whole audience.
pub(crate) async fn sync_full(
    activation: &mut madtech_proto::activation::v1::activation_service_client::ActivationServiceClient<Authed>,
    activation_id: &str,
) -> activation_pb::SyncRun {
    let run = sync_as(activation, activation_id, true).await;
    assert!(run.full);
    run
}

async fn sync_as(
    activation: &mut madtech_proto::activation::v1::activation_service_client::ActivationServiceClient<Authed>,
    activation_id: &str,
    full: bool,
) -> activation_pb::SyncRun {
    let (run, status) = try_sync_as(activation, activation_id, full).await;
    assert_eq!(
        run.phase(),
        activation_pb::SyncPhase::Succeeded,
        "{}",
        run.error
    );
    assert!(status.is_none(), "{status:?}");
    run
}

/// Runs a sync to the end: its final state, and the status the stream ended
/// with when the run failed.
pub(crate) async fn try_sync(
    activation: &mut madtech_proto::activation::v1::activation_service_client::ActivationServiceClient<Authed>,
    activation_id: &str,
) -> (activation_pb::SyncRun, Option<tonic::Status>) {
    try_sync_as(activation, activation_id, false).await
}

async fn try_sync_as(
    activation: &mut madtech_proto::activation::v1::activation_service_client::ActivationServiceClient<Authed>,
    activation_id: &str,
    full: bool,
) -> (activation_pb::SyncRun, Option<tonic::Status>) {
    let mut stream = activation
        .run_sync(activation_pb::RunSyncRequest {
            activation_id: activation_id.into(),
            full,
        })
        .await
        .expect("run sync")
        .into_inner();
    let mut last = None;
    let mut seen_progress = false;
    let status = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let run = message.run.expect("run");
                seen_progress |= run.phase() == activation_pb::SyncPhase::Fetching;
                last = Some(run);
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert!(seen_progress, "a sync reports progress before it ends");
    (last.expect("a final state"), status)
}

pub(crate) fn lines(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("output file")
        .lines()
        .map(|line| serde_json::from_str(line).expect("jsonl"))
        .collect()
}

/// Every text the activation database holds, on either backend.
async fn activation_database_text(suite: &Suite) -> String {
    let config = &suite.config.activation.database;
    if config.url.starts_with("sqlite:") {
        let path = config
            .url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .expect("path")
            .to_string();
        let mut bytes = Vec::new();
        for suffix in ["", "-wal"] {
            if let Ok(content) = std::fs::read(format!("{path}{suffix}")) {
                bytes.extend(content);
            }
        }
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    let db = Database::connect(config.url.as_str())
        .await
        .expect("connect");
    let schema = config.schema.clone().expect("schema");
    let mut text = String::new();
    for table in ["destinations", "activations", "sync_state", "sync_runs"] {
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                format!("SELECT row_to_json(t)::text AS row FROM \"{schema}\".\"{table}\" t"),
            ))
            .await
            .expect("scan table");
        for row in rows {
            text.push_str(&row.try_get::<String>("", "row").expect("row text"));
            text.push('\n');
        }
    }
    text
}

/// Everything the suite logs on the test's thread (where a current-thread
/// runtime runs every component's tasks), at the level production runs at
/// and at debug for MadTech's own crates.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let filter = tracing_subscriber::EnvFilter::new(
            "info,madtech=debug,madtech_common=debug,madtech_profiles=debug,madtech_consent=debug,\
             madtech_segments=debug,madtech_activation=debug,madtech_gateway=debug,\
             madtech_signals=debug",
        );
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

/// A raw phone number, in the form a caller sent and the form profiles
/// keeps it in.
const PHONE: (&str, &str) = ("+44 20 7031 3000", "+442070313000");

async fn only_consenting_people_cross_and_withdrawal_removes(backend: Backend) {
    let logs = CapturedLogs::default();
    let _logging = logs.install();
    let suite = Suite::start(backend).await;
    let admin = suite.bearer(&["admin"]);
    let mut consent = suite.consent(admin.clone());
    let mut activation = suite.activation(suite.bearer(&["marketer"]));

    let mut ids = Vec::new();
    for person in &PEOPLE {
        let id = suite
            .person(person.email, person.region, Default::default())
            .await;
        if let Some(state) = person.ad_targeting {
            record(&mut consent, &id, state, person.region).await;
        }
        ids.push(id);
    }
    // Someone with a phone number, outside the audience, and a phone number
    // refused: neither may reach a log line.
    let mut profiles = suite.profiles(suite.bearer(&["ingest"]));
    let identifier = |kind: &str, value: &str| profiles_pb::Identifier {
        kind: kind.into(),
        value: value.into(),
    };
    profiles
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![
                identifier("email", "de.phone@example.com"),
                identifier("phone", PHONE.0),
            ],
            region: "DE".into(),
            ..Default::default()
        })
        .await
        .expect("a person with a phone");
    let refused = profiles
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![identifier("phone", "+44 999 refused 12")],
            region: "DE".into(),
            ..Default::default()
        })
        .await
        .expect_err("not a phone number");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let segment = suite.region_segment("everyone", &["FR", "US-CA"]).await;
    let (_, activated) = suite
        .file_activation(&segment.segment_id, "clean-room")
        .await;

    // First sync: FR with consent, and US-CA without an opt-out.
    let first = sync(&mut activation, &activated.activation_id).await;
    assert_eq!(
        (first.members_received, first.added, first.removed),
        (2, 2, 0)
    );
    let added = lines(&first.output);
    assert_eq!(added.len(), 2);
    let mut hashes: Vec<String> = added
        .iter()
        .map(|line| {
            assert_eq!(line["op"], "add");
            assert_eq!(line["identifiers"][0]["kind"], "email");
            line["identifiers"][0]["sha256"]
                .as_str()
                .expect("hash")
                .to_string()
        })
        .collect();
    hashes.sort();
    let mut expected = vec![
        sha256_hex(&normalised(PEOPLE[0].email)),
        sha256_hex(&normalised(PEOPLE[3].email)),
    ];
    expected.sort();
    assert_eq!(
        hashes, expected,
        "exactly FR-granted and US-CA-unset cross, hashed"
    );
    let pseudonym_of_fr_granted = added
        .iter()
        .find(|line| line["identifiers"][0]["sha256"] == sha256_hex(&normalised(PEOPLE[0].email)))
        .and_then(|line| line["id"].as_str())
        .expect("pseudonym")
        .to_string();
    assert!(
        !ids.contains(&pseudonym_of_fr_granted),
        "profile ids never cross"
    );

    let file_text = std::fs::read_to_string(&first.output).expect("file");
    let database_text = activation_database_text(&suite).await;
    for person in &PEOPLE {
        let email = normalised(person.email);
        assert!(!file_text.contains(&email), "raw email in the file");
        assert!(
            !database_text.contains(&email),
            "raw email in the activation database"
        );
    }
    for id in &ids {
        assert!(
            !file_text.contains(id.as_str()) && !database_text.contains(id.as_str()),
            "profile id crossed"
        );
    }
    assert!(!file_text.contains('@'));

    // A sync with nothing new sends nothing: it only asks for the
    // audience's changes since the first, and there are none.
    let quiet = sync(&mut activation, &activated.activation_id).await;
    assert!(!quiet.full, "the second sync applies changes only");
    assert_eq!(
        (quiet.members_received, quiet.added, quiet.removed),
        (0, 0, 0)
    );
    assert!(quiet.output.is_empty());

    // Withdrawal: the person is removed at once, by the same pseudonym,
    // without waiting for a sync; the next sync has nothing left to do.
    record(
        &mut consent,
        &ids[0],
        consent_pb::ConsentState::Denied,
        "FR",
    )
    .await;
    let removal = suite
        .finished_run(&activated.activation_id, "consent_withdrawal")
        .await;
    assert_eq!(removal.removed, 1);
    let removed = lines(&removal.output);
    assert_eq!(
        removed,
        vec![serde_json::json!({
            "op": "remove",
            "id": pseudonym_of_fr_granted,
            "identifiers": [{"kind": "email", "sha256": sha256_hex(&normalised(PEOPLE[0].email))}],
        })]
    );
    assert!(
        Path::new(&removal.output)
            .starts_with(suite.config.activation.file_root.join("clean-room"))
    );
    let after = sync_full(&mut activation, &activated.activation_id).await;
    assert_eq!(
        (
            after.members_received,
            after.added,
            after.removed,
            after.unchanged
        ),
        (1, 0, 0, 1),
        "a full sync agrees with the removal"
    );

    // Every crossing left a durable, chained audit record without PII.
    let mut audit = AuditServiceClient::with_interceptor(
        suite.gateway_channel(),
        suite.bearer(&["compliance"]),
    );
    let records = suite.audit_records().await;
    let exports: Vec<&gateway_pb::AuditRecord> = records
        .iter()
        .filter(|r| r.method.ends_with("/ExportAudience"))
        .collect();
    assert_eq!(exports.len(), 2, "one record per full sync");
    let changes: Vec<&gateway_pb::AuditRecord> = records
        .iter()
        .filter(|r| r.method.ends_with("/ExportAudienceChanges"))
        .collect();
    assert_eq!(
        changes.len(),
        1,
        "the incremental sync is on record, though it released nothing"
    );
    assert_eq!(
        (changes[0].allowed, changes[0].outcome.as_str()),
        (0, "complete")
    );
    assert!(
        records
            .iter()
            .any(|r| r.method.ends_with("/WatchConsentReleases") && r.allowed > 0),
        "the consent releases activation followed are on record too"
    );
    let first_record = exports[0];
    assert_eq!(first_record.caller, "activation");
    assert_eq!(first_record.outcome, "complete");
    assert_eq!(first_record.segment_id, segment.segment_id);
    assert_eq!(first_record.purpose, "ad_targeting");
    assert_eq!(first_record.allowed, 2);
    assert_eq!(first_record.denied.get("consent_denied"), Some(&2));
    assert_eq!(first_record.denied.get("consent_unset"), Some(&1));
    assert_eq!(first_record.policy_version.len(), 64);
    for pair in records.windows(2) {
        assert_eq!(pair[1].previous_hash, pair[0].hash, "chained");
    }
    let audit_text = format!("{records:?}");
    for person in &PEOPLE {
        assert!(
            !audit_text.contains(&normalised(person.email)),
            "raw email in the audit trail"
        );
    }
    for id in &ids {
        assert!(
            !audit_text.contains(id.as_str()),
            "profile id in the audit trail"
        );
    }
    let last = records.last().expect("records");
    let verified = audit
        .verify_audit_chain(gateway_pb::VerifyAuditChainRequest {
            anchor_seq: last.seq,
            anchor_hash: last.hash.clone(),
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.intact && verified.anchor_matched);
    assert_eq!(verified.records_checked, records.len() as u64);
    assert_eq!(
        (verified.last_seq, &verified.last_hash),
        (last.seq, &last.hash)
    );
    let wrong_anchor = audit
        .verify_audit_chain(gateway_pb::VerifyAuditChainRequest {
            anchor_seq: last.seq + 1,
            anchor_hash: last.hash.clone(),
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(
        !wrong_anchor.intact,
        "a record the anchor names but the chain lacks"
    );

    // The same from the command line, as compliance runs it.
    // Run off the test's runtime thread: the suite answering the CLI lives
    // on it.
    let gateway_url = suite.config.activation.gateway_url.clone();
    let token = suite.token(&["compliance"]);
    let cli = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_madtech"));
        command
            .arg("audit")
            .args(["--gateway", &gateway_url])
            .args(args)
            .env("MADTECH_TOKEN", &token);
        async move {
            tokio::task::spawn_blocking(move || command.output().expect("madtech audit runs"))
                .await
                .expect("joined")
        }
    };
    let listed = cli(&["list"]).await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record per line"))
        .collect();
    assert_eq!(lines.len(), records.len());
    assert_eq!(lines[lines.len() - 1]["hash"], last.hash.as_str());
    let seq = last.seq.to_string();
    let verified = cli(&["verify", "--anchor-seq", &seq, "--anchor-hash", &last.hash]).await;
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(String::from_utf8_lossy(&verified.stdout).contains("intact"));
    let other = (last.seq + 7).to_string();
    let unanchored = cli(&[
        "verify",
        "--anchor-seq",
        &other,
        "--anchor-hash",
        &last.hash,
    ])
    .await;
    assert!(
        !unanchored.status.success(),
        "a missing anchor fails the check"
    );
    let status =
        AuditServiceClient::with_interceptor(suite.gateway_channel(), suite.bearer(&["marketer"]))
            .verify_audit_chain(gateway_pb::VerifyAuditChainRequest::default())
            .await
            .expect_err("marketers do not read the audit trail");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    suite.stop().await;
    let logged = logs.text();
    assert!(
        logged
            .lines()
            .any(|line| line.contains("madtech::audit") && line.contains("request_id=")),
        "the crossings' audit lines are logged, naming their calls: {logged}"
    );
    let mut personal: Vec<String> = PEOPLE
        .iter()
        .flat_map(|p| [p.email.trim().to_string(), normalised(p.email)])
        .collect();
    personal.extend(
        [
            "de.phone@example.com",
            PHONE.0,
            PHONE.1,
            "442070313000",
            "+44 999 refused 12",
        ]
        .map(String::from),
    );
    for value in &personal {
        assert!(!logged.contains(value.as_str()), "{value:?} in a log line");
    }
}

#[tokio::test]
async fn sqlite_only_consenting_people_cross_and_withdrawal_removes() {
    only_consenting_people_cross_and_withdrawal_removes(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_only_consenting_people_cross_and_withdrawal_removes() {
    only_consenting_people_cross_and_withdrawal_removes(Backend::Postgres).await;
}

/// A long export's pages are filtered by several workers at once and still
/// reach the caller in the segment's order, and the audit record's digest
/// is what the caller can compute from the pages it received.
#[tokio::test]
async fn pages_filtered_by_several_workers_cross_in_order_and_as_audited() {
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.gateway.crossing_workers = 3;
        config.segments.export_chunk_size = 2;
    })
    .await;
    let mut consent = suite.consent(suite.bearer(&["admin"]));
    let mut crossing = Vec::new();
    for n in 0..13 {
        let id = suite
            .person(&format!("p{n}@example.com"), "US-CA", Default::default())
            .await;
        // Every third person opts out of sale: some pages lose members,
        // some are left with nobody and are not sent at all.
        if n % 3 == 0 {
            record(&mut consent, &id, consent_pb::ConsentState::Denied, "US-CA").await;
        } else {
            crossing.push(id);
        }
    }
    crossing.sort();
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let destination_id = suite.destination_of_kind("file").await;

    let mut stream = suite
        .segments(suite.bearer(&["activation"]))
        .export_audience(segments_pb::ExportAudienceRequest {
            segment_id: segment.segment_id.clone(),
            destination_id: destination_id.clone(),
            purpose: "ad_targeting".into(),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let (mut pages, mut received) = (0, Vec::new());
    let mut released = Sha256::new();
    while let Some(page) = stream.message().await.expect("page") {
        pages += 1;
        let mut digest = Sha256::new();
        for member in &page.members {
            digest.update(member.pseudonymous_id.as_bytes());
            for identifier in &member.hashed_identifiers {
                digest.update(format!("\x1f{}={}", identifier.kind, identifier.sha256));
            }
            digest.update(b"\n");
        }
        released.update(digest.finalize());
        received.extend(page.members);
    }

    let key = madtech_gateway::crossing::Pseudonymiser::from_hex_file(
        &suite.config.gateway.pseudonym_key_file,
    )
    .expect("the suite's pseudonym key");
    let expected: Vec<String> = crossing
        .iter()
        .map(|id| key.pseudonym(&destination_id, id))
        .collect();
    let got: Vec<String> = received.into_iter().map(|m| m.pseudonymous_id).collect();
    assert_eq!(
        got, expected,
        "every consenting person, in profile-id order"
    );
    assert!(pages > 3, "the export spans many pages ({pages})");

    let audit = suite.audit_records().await;
    let record = audit
        .iter()
        .rev()
        .find(|r| r.method.ends_with("/ExportAudience"))
        .expect("the export is on record");
    assert_eq!(
        (record.allowed, record.denied.get("consent_denied")),
        (crossing.len() as u64, Some(&5))
    );
    assert_eq!(
        record.released_digest,
        hex::encode(released.finalize()),
        "the digest covers exactly the pages received, in order"
    );
    suite.stop().await;
}

#[tokio::test]
async fn a_merge_never_widens_consent() {
    let suite = Suite::start(Backend::Sqlite).await;
    let admin = suite.bearer(&["admin"]);
    let mut profiles = suite.profiles(admin.clone());
    let mut consent = suite.consent(admin.clone());
    let email = |value: &str| profiles_pb::Identifier {
        kind: "email".into(),
        value: value.into(),
    };
    let customer = profiles_pb::Identifier {
        kind: "customer_id".into(),
        value: "C-7".into(),
    };
    let upsert = |identifiers: Vec<profiles_pb::Identifier>| profiles_pb::UpsertProfileRequest {
        identifiers,
        traits: Default::default(),
        region: "US-CA".into(),
        ..Default::default()
    };
    // Two records of one Californian: the newer one opted out.
    let older = profiles
        .upsert_profile(upsert(vec![email("pat@example.com")]))
        .await
        .expect("a")
        .into_inner();
    let newer = profiles
        .upsert_profile(upsert(vec![customer.clone()]))
        .await
        .expect("b")
        .into_inner();
    let newer_id = newer.profile.expect("profile").profile_id;
    record(
        &mut consent,
        &newer_id,
        consent_pb::ConsentState::Denied,
        "US-CA",
    )
    .await;
    let merged = profiles
        .upsert_profile(upsert(vec![email("pat@example.com"), customer]))
        .await
        .expect("merge")
        .into_inner();
    assert_eq!(merged.merged_profile_ids, vec![newer_id.clone()]);
    let survivor = older.profile.expect("profile").profile_id;
    assert_eq!(merged.profile.expect("profile").profile_id, survivor);

    let segment = suite.region_segment("california", &["US-CA"]).await;
    let crossed = suite.export(&segment.segment_id).await.len();
    assert_eq!(crossed, 0, "the merged-away opt-out still counts");

    // Consent learns of the merge from the profiles change stream and
    // writes the survivor's new state, with the reason, into the ledger.
    let merge_entry = wait_for_merge_entry(&mut consent, &survivor).await;
    assert_eq!(merge_entry.state(), consent_pb::ConsentState::Denied);
    assert_eq!(merge_entry.purpose, "ad_targeting");
    assert!(
        merge_entry.derived_from.contains(&newer_id),
        "{}",
        merge_entry.derived_from
    );

    // Until they choose again: the person opts back in themselves (the
    // business may not ask for a year), and now they cross.
    consent
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: survivor.clone(),
            choices: vec![consent_pb::PurposeChoice {
                purpose: "ad_targeting".into(),
                state: consent_pb::ConsentState::Granted.into(),
            }],
            source: consent_pb::ConsentSource::Form.into(),
            region: "US-CA".into(),
            person_initiated: true,
            ..Default::default()
        })
        .await
        .expect("the person chooses again");
    let crossed = suite.export(&segment.segment_id).await.len();
    assert_eq!(
        crossed, 1,
        "the new choice stands for every id of the person"
    );
    suite.stop().await;
}

async fn wait_for_merge_entry(
    consent: &mut madtech_proto::consent::v1::consent_service_client::ConsentServiceClient<Authed>,
    profile_id: &str,
) -> consent_pb::ConsentEntry {
    for _ in 0..200 {
        let history = consent
            .consent_history(consent_pb::ConsentHistoryRequest {
                profile_id: profile_id.into(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        if let Some(entry) = history
            .entries
            .into_iter()
            .find(|e| e.source() == consent_pb::ConsentSource::Merge)
        {
            return entry;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no merge entry for {profile_id} within 10 s");
}

#[tokio::test]
async fn minors_cross_only_as_the_policy_allows_their_age() {
    use chrono::Months;
    let suite = Suite::start(Backend::Sqlite).await;
    let admin = suite.bearer(&["admin"]);
    let mut consent = suite.consent(admin.clone());
    let today = chrono::Utc::now().date_naive();
    let born_years_ago = |years: u32| {
        today
            .checked_sub_months(Months::new(12 * years))
            .expect("a date")
            .to_string()
    };
    // (email, region, age in years, consent for ad_targeting, crosses)
    let people = [
        ("ca15@example.com", "US-CA", Some(15), None, false),
        (
            "ca15-opted-in@example.com",
            "US-CA",
            Some(15),
            Some(consent_pb::ConsentState::Granted),
            true,
        ),
        ("ca16@example.com", "US-CA", Some(16), None, true),
        ("ca-unknown@example.com", "US-CA", None, None, true),
        (
            "fr17@example.com",
            "FR",
            Some(17),
            Some(consent_pb::ConsentState::Granted),
            false,
        ),
        (
            "fr40@example.com",
            "FR",
            Some(40),
            Some(consent_pb::ConsentState::Granted),
            true,
        ),
    ];
    let mut expected = Vec::new();
    for (email, region, age, choice, crosses) in people {
        let traits = age
            .map(|years| {
                (
                    "birthdate".to_string(),
                    profiles_pb::TraitValue {
                        value: Some(profiles_pb::trait_value::Value::StringValue(
                            born_years_ago(years),
                        )),
                    },
                )
            })
            .into_iter()
            .collect();
        let id = suite.person(email, region, traits).await;
        if let Some(state) = choice {
            record(&mut consent, &id, state, region).await;
        }
        if crosses {
            expected.push(sha256_hex(email));
        }
    }
    let segment = suite.region_segment("everyone", &["FR", "US-CA"]).await;
    let mut crossed: Vec<String> = suite
        .export(&segment.segment_id)
        .await
        .iter()
        .map(|m| m.hashed_identifiers[0].sha256.clone())
        .collect();
    crossed.sort();
    expected.sort();
    assert_eq!(
        crossed, expected,
        "under-16s in California only with an opt-in, no minor in France, unknown age as adult"
    );
    suite.stop().await;
}

/// `ExportAudienceChanges` crosses like `ExportAudience`: after an export of
/// the current membership (which names its membership cursor), the changes
/// since arrive pseudonymised and hashed, a person the policy does not let
/// cross arrives as someone not in the audience, each page is audited, and
/// only the activation role (or admin) may ask.
async fn audience_changes_cross_like_exports(backend: Backend) {
    let suite = Suite::start(backend).await;
    let granted = |email: &'static str| {
        let suite = &suite;
        async move {
            let id = suite.person(email, "FR", Default::default()).await;
            let mut consent = suite.consent(suite.bearer(&["admin"]));
            record(&mut consent, &id, consent_pb::ConsentState::Granted, "FR").await;
            id
        }
    };
    let leaver = granted("leaver@example.com").await;
    let segment = suite.region_segment("french", &["FR"]).await;
    let destination_id = suite.destination_of_kind("file").await;
    let mut segments = suite.segments(suite.bearer(&["activation"]));

    let export = segments
        .export_audience(segments_pb::ExportAudienceRequest {
            segment_id: segment.segment_id.clone(),
            destination_id: destination_id.clone(),
            purpose: "ad_targeting".into(),
            current_membership: true,
            ..Default::default()
        })
        .await
        .expect("export of the current membership");
    let cursor: u64 = export
        .metadata()
        .get(madtech_proto::segments::MEMBERSHIP_CURSOR_HEADER)
        .expect("the export names its membership cursor")
        .to_str()
        .expect("text")
        .parse()
        .expect("a cursor");
    let mut stream = export.into_inner();
    let mut exported = Vec::new();
    while let Some(chunk) = stream.message().await.expect("page") {
        exported.extend(chunk.members);
    }
    assert_eq!(exported.len(), 1, "the segment was computed when created");
    let leaver_pseudonym = exported[0].pseudonymous_id.clone();

    // After the export: one person with consent joins, one without joins,
    // and the first leaves.
    granted("joiner@example.com").await;
    let unconsented = suite
        .person("no.choice@example.com", "FR", Default::default())
        .await;
    suite
        .person("leaver@example.com", "DE", Default::default())
        .await;
    let changes_request = || segments_pb::ExportAudienceChangesRequest {
        segment_id: segment.segment_id.clone(),
        destination_id: destination_id.clone(),
        purpose: "ad_targeting".into(),
        after_cursor: cursor,
        until_head: true,
        ..Default::default()
    };
    let mut stream = segments
        .export_audience_changes(changes_request())
        .await
        .expect("changes")
        .into_inner();
    let mut changes = Vec::new();
    while let Some(page) = stream.message().await.expect("page") {
        changes.extend(page.changes);
    }
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(changes.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let members: Vec<&segments_pb::AudienceMember> = changes
        .iter()
        .map(|c| c.member.as_ref().expect("member"))
        .collect();
    for member in &members {
        assert!(!member.pseudonymous_id.is_empty());
        assert!(member.profile_id.is_empty() && member.identifiers.is_empty());
        assert!(member.merged_profile_ids.is_empty() && member.birth_date.is_empty());
    }
    assert!(changes[0].in_audience, "the joiner with consent crosses");
    assert_eq!(
        members[0].hashed_identifiers[0].sha256,
        sha256_hex("joiner@example.com")
    );
    assert!(
        !changes[1].in_audience && members[1].hashed_identifiers.is_empty(),
        "the joiner without consent arrives as someone not in the audience"
    );
    assert!(!changes[2].in_audience);
    assert_eq!(
        members[2].pseudonymous_id, leaver_pseudonym,
        "the leaver is named as the export named them"
    );
    let text = format!("{changes:?}");
    assert!(!text.contains(&leaver) && !text.contains(&unconsented) && !text.contains('@'));

    let audit = suite.audit_records().await;
    let page_record = audit
        .iter()
        .rev()
        .find(|r| r.method.ends_with("/ExportAudienceChanges"))
        .expect("the page is on record");
    assert_eq!(
        (page_record.allowed, page_record.outcome.as_str()),
        (1, "released")
    );
    assert_eq!(page_record.denied.get("consent_unset"), Some(&1));
    assert_eq!(page_record.segment_id, segment.segment_id);
    assert_eq!(page_record.released_digest.len(), 64);

    // Without `until_head` the stream follows: what happened, then what
    // happens next.
    let mut following = segments
        .export_audience_changes(segments_pb::ExportAudienceChangesRequest {
            until_head: false,
            ..changes_request()
        })
        .await
        .expect("follow")
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < changes.len() {
        let page = following.message().await.expect("page").expect("open");
        seen.extend(page.changes);
    }
    assert_eq!(seen, changes, "the same changes, crossed alike");
    // Consent first, then into the segment, so the change crosses allowed
    // whenever the follower reads it.
    let latecomer = suite
        .person("latecomer@example.com", "DE", Default::default())
        .await;
    record(
        &mut suite.consent(suite.bearer(&["admin"])),
        &latecomer,
        consent_pb::ConsentState::Granted,
        "FR",
    )
    .await;
    suite
        .person("latecomer@example.com", "FR", Default::default())
        .await;
    let late = tokio::time::timeout(std::time::Duration::from_secs(15), following.message())
        .await
        .expect("a new change arrives")
        .expect("page")
        .expect("open");
    assert_eq!(late.changes.len(), 1);
    assert!(late.changes[0].in_audience);
    assert!(late.changes[0].cursor > changes[2].cursor);
    drop(following);

    // The latecomer leaves and comes back: a page holding both their
    // entries sends each as in the audience.
    suite
        .person("latecomer@example.com", "DE", Default::default())
        .await;
    suite
        .person("latecomer@example.com", "FR", Default::default())
        .await;
    let mut again = segments
        .export_audience_changes(segments_pb::ExportAudienceChangesRequest {
            after_cursor: changes[2].cursor,
            ..changes_request()
        })
        .await
        .expect("changes again")
        .into_inner();
    let mut latecomer_changes = Vec::new();
    while let Some(page) = again.message().await.expect("page") {
        latecomer_changes.extend(page.changes.into_iter().map(|c| c.in_audience));
    }
    assert_eq!(latecomer_changes, [true, false, true]);

    // Only the crossing's callers may ask, and they must name a destination.
    let denied = suite
        .segments(suite.bearer(&["marketer"]))
        .export_audience_changes(changes_request())
        .await
        .expect_err("marketers do not take audiences across");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let invalid = segments
        .export_audience_changes(segments_pb::ExportAudienceChangesRequest {
            destination_id: String::new(),
            ..changes_request()
        })
        .await
        .expect_err("no destination");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(invalid.message().contains("destination_id"));
    let both = segments
        .export_audience(segments_pb::ExportAudienceRequest {
            segment_id: segment.segment_id.clone(),
            destination_id: destination_id.clone(),
            purpose: "ad_targeting".into(),
            current_membership: true,
            snapshot_cursor: cursor,
            ..Default::default()
        })
        .await
        .expect_err("a snapshot and the current membership");
    assert_eq!(both.code(), tonic::Code::InvalidArgument);
    assert!(both.message().contains("snapshot_cursor"));
    suite.stop().await;
}

#[tokio::test]
async fn audience_changes_cross_like_exports_sqlite() {
    audience_changes_cross_like_exports(Backend::Sqlite).await;
}

#[tokio::test]
async fn audience_changes_cross_like_exports_postgres() {
    audience_changes_cross_like_exports(Backend::Postgres).await;
}

/// A follower of `ExportAudienceChanges` may run for days: each page is
/// decided under the policy set in force when it crosses, and audited
/// under that set's version, not the one in force when the follower began.
#[tokio::test]
async fn a_following_changes_stream_decides_each_page_under_the_policy_in_force() {
    let (suite, policies) = Suite::start_with_own_policies(|_| {}).await;
    let segment = suite.region_segment("french", &["FR"]).await;
    let destination_id = suite.destination_of_kind("file").await;
    let mut segments = suite.segments(suite.bearer(&["activation"]));
    let mut policy = gateway_pb::policy_service_client::PolicyServiceClient::with_interceptor(
        suite.gateway_channel(),
        suite.bearer(&["compliance"]),
    );
    let version =
        |status: tonic::Response<gateway_pb::GetPolicyStatusResponse>| status.into_inner().version;
    let first_version = version(
        policy
            .get_policy_status(gateway_pb::GetPolicyStatusRequest {})
            .await
            .expect("status"),
    );
    let mut following = segments
        .export_audience_changes(segments_pb::ExportAudienceChangesRequest {
            segment_id: segment.segment_id.clone(),
            destination_id: destination_id.clone(),
            purpose: "ad_targeting".into(),
            until_head: false,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    // Someone who agreed joins: consent first, then into the segment.
    let joins = |email: &'static str| {
        let suite = &suite;
        async move {
            let id = suite.person(email, "DE", Default::default()).await;
            let mut consent = suite.consent(suite.bearer(&["admin"]));
            record(&mut consent, &id, consent_pb::ConsentState::Granted, "FR").await;
            suite.person(email, "FR", Default::default()).await;
        }
    };
    let latest_page_version = || async {
        suite
            .audit_records()
            .await
            .into_iter()
            .rev()
            .find(|r| r.method.ends_with("/ExportAudienceChanges"))
            .expect("the page is on record")
            .policy_version
    };
    joins("before@example.com").await;
    assert!(
        next_change(&mut following).await,
        "allowed under the first set"
    );
    assert_eq!(latest_page_version().await, first_version);

    // Compliance stops ad targeting under the GDPR while the stream runs.
    let consent_rules = policies.path().join("consent_policy.csv");
    let mut text = std::fs::read_to_string(&consent_rules).expect("read");
    text.push_str("p, all_destinations, ad_targeting, GDPR, *, *, deny\n");
    std::fs::write(&consent_rules, text).expect("write");
    let mut second_version = first_version.clone();
    for _ in 0..200 {
        second_version = version(
            policy
                .get_policy_status(gateway_pb::GetPolicyStatusRequest {})
                .await
                .expect("status"),
        );
        if second_version != first_version {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_ne!(second_version, first_version, "the new set is in force");

    joins("after@example.com").await;
    assert!(
        !next_change(&mut following).await,
        "the same stream now holds the newcomer back"
    );
    assert_eq!(latest_page_version().await, second_version);
    drop(following);
    suite.stop().await;
}

/// Whether the one change of a followed stream's next page is someone
/// entering the audience.
async fn next_change(
    following: &mut tonic::Streaming<segments_pb::ExportAudienceChangesResponse>,
) -> bool {
    let page = tokio::time::timeout(std::time::Duration::from_secs(15), following.message())
        .await
        .expect("a change arrives")
        .expect("page")
        .expect("open");
    assert_eq!(page.changes.len(), 1, "{page:?}");
    page.changes[0].in_audience
}
