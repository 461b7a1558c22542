//! The consent change stream through the gateway: ordered, resumable from a
//! cursor, and live.

use std::time::Duration;

use madtech_common::testing::Backend;
use madtech_proto::consent::v1 as consent_pb;

use madtech_gateway::consent_view::{ConsentView, ConsentViewConfig, Freshness};
use madtech_proto::segments::v1 as segments_pb;

use crate::harness::Suite;

fn choice(state: consent_pb::ConsentState) -> consent_pb::RecordConsentRequest {
    consent_pb::RecordConsentRequest {
        profile_id: "p-1".into(),
        choices: vec![consent_pb::PurposeChoice {
            purpose: "analytics".into(),
            state: state.into(),
        }],
        source: consent_pb::ConsentSource::Form.into(),
        region: "DE".into(),
        notice_version: "v3".into(),
        collected_at: None,
        ..Default::default()
    }
}

async fn next_entry(
    stream: &mut tonic::Streaming<consent_pb::WatchConsentChangesResponse>,
) -> consent_pb::ConsentEntry {
    let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an entry arrives")
        .expect("stream healthy")
        .expect("stream open");
    message.entry.expect("entry")
}

#[tokio::test]
async fn the_change_stream_resumes_from_a_cursor_and_follows_new_entries() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut consent = suite.consent(suite.bearer(&["admin"]));
    consent
        .record_consent(choice(consent_pb::ConsentState::Granted))
        .await
        .expect("first");
    consent
        .record_consent(choice(consent_pb::ConsentState::Denied))
        .await
        .expect("second");

    let mut from_start = consent
        .watch_consent_changes(consent_pb::WatchConsentChangesRequest { after_cursor: 0 })
        .await
        .expect("watch")
        .into_inner();
    let first = next_entry(&mut from_start).await;
    let second = next_entry(&mut from_start).await;
    assert!(first.cursor < second.cursor);
    assert_eq!(first.state(), consent_pb::ConsentState::Granted);
    assert_eq!(second.state(), consent_pb::ConsentState::Denied);
    assert_eq!(second.notice_version, "v3");
    drop(from_start);

    // Resuming after the first entry starts exactly at the second.
    let mut resumed = consent
        .watch_consent_changes(consent_pb::WatchConsentChangesRequest {
            after_cursor: first.cursor,
        })
        .await
        .expect("watch")
        .into_inner();
    let again = next_entry(&mut resumed).await;
    assert_eq!(again.cursor, second.cursor);

    // A new entry arrives on the open stream.
    let written = consent
        .record_consent(choice(consent_pb::ConsentState::Granted))
        .await
        .expect("third")
        .into_inner();
    let live = next_entry(&mut resumed).await;
    assert_eq!(live.cursor, written.entries[0].cursor);

    drop(resumed);

    let current = consent
        .get_consent(consent_pb::GetConsentRequest {
            profile_id: "p-1".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(current.purposes.len(), 1);
    assert_eq!(
        current.purposes[0].state(),
        consent_pb::ConsentState::Granted
    );
    suite.stop().await;
}

fn member(id: &str, merged: &[&str]) -> segments_pb::AudienceMember {
    segments_pb::AudienceMember {
        profile_id: id.into(),
        merged_profile_ids: merged.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    }
}

/// The gateway's consent view against the real consent service: misses are
/// asked for and remembered, the change stream keeps what it remembers
/// current, a late import of an older choice changes nothing, and merged
/// profiles never widen consent.
#[tokio::test]
async fn the_gateway_consent_view_follows_the_ledger() {
    use consent_pb::ConsentState::{Denied, Granted, Unset};
    let suite = Suite::start(Backend::Sqlite).await;
    let mut consent = suite.consent(suite.bearer(&["admin"]));
    consent
        .record_consent(choice(Granted))
        .await
        .expect("grant before the view starts");

    let upstream = madtech_common::upstream::Upstream::new(
        &Default::default(),
        &suite.config.gateway.upstreams.consent,
    )
    .expect("consent url");
    let view = ConsentView::new(&ConsentViewConfig::default(), upstream);
    let shutdown = madtech_common::CancellationToken::new();
    let following = tokio::spawn(std::sync::Arc::clone(&view).follow(shutdown.clone()));

    let fresh = view.freshness(None).await.expect("consent reachable");
    assert_eq!(fresh, Freshness::Current);
    assert_eq!(
        view.remembered("analytics", "p-1"),
        None,
        "nothing asked yet"
    );
    let states = view
        .states(
            &[member("p-1", &[]), member("p-new", &[])],
            "analytics",
            fresh,
            None,
        )
        .await
        .expect("states");
    assert_eq!(states, vec![Granted, Unset]);
    assert_eq!(view.remembered("analytics", "p-1"), Some(Granted));
    assert_eq!(view.remembered("analytics", "p-new"), Some(Unset));

    // A withdrawal reaches the view through the change stream: the next
    // crossing sees it without asking.
    consent
        .record_consent(choice(Denied))
        .await
        .expect("withdraw");
    assert_eq!(
        view.freshness(None).await.expect("fresh"),
        Freshness::Current
    );
    assert_eq!(view.remembered("analytics", "p-1"), Some(Denied));

    // Last year's grant, imported late, is evidence but not the state.
    let mut late = choice(Granted);
    late.source = consent_pb::ConsentSource::Import.into();
    late.collected_at = Some(prost_types::Timestamp {
        seconds: 1_600_000_000,
        nanos: 0,
    });
    let written = consent
        .record_consent(late)
        .await
        .expect("late import")
        .into_inner();
    assert!(!written.entries[0].effective);
    assert_eq!(
        view.freshness(None).await.expect("fresh"),
        Freshness::Current
    );
    assert_eq!(view.remembered("analytics", "p-1"), Some(Denied));

    // Someone who granted, merged with someone who withdrew, is denied.
    let mut other = choice(Granted);
    other.profile_id = "p-2".into();
    consent.record_consent(other).await.expect("p-2 grants");
    let fresh = view.freshness(None).await.expect("fresh");
    let states = view
        .states(
            &[member("p-2", &["p-1"]), member("p-2", &[])],
            "analytics",
            fresh,
            None,
        )
        .await
        .expect("states");
    assert_eq!(states, vec![Denied, Granted]);

    shutdown.cancel();
    following.await.expect("the follower stops");
    suite.stop().await;
}

/// The adtech zone follows consent changes under the pseudonymous ids the
/// crossing gave each destination, never profile ids; other roles may not.
#[tokio::test]
async fn activation_follows_consent_releases_under_pseudonyms() {
    use madtech_proto::gateway::v1 as gateway_pb;
    use madtech_proto::gateway::v1::consent_release_service_client::ConsentReleaseServiceClient;
    let suite = Suite::start(Backend::Sqlite).await;
    let key = madtech_gateway::crossing::Pseudonymiser::from_hex_file(
        &suite.config.gateway.pseudonym_key_file,
    )
    .expect("the suite's pseudonym key");
    let meta = suite.destination_of_kind("meta").await;
    let file = suite.destination_of_kind("file").await;
    let request = gateway_pb::WatchConsentReleasesRequest {
        destination_ids: vec![meta.clone(), file.clone()],
        after_cursor: 0,
    };
    let follow = |request: gateway_pb::WatchConsentReleasesRequest| {
        let mut client = ConsentReleaseServiceClient::with_interceptor(
            suite.gateway_channel(),
            suite.bearer(&["activation"]),
        );
        async move { client.watch_consent_releases(request).await }
    };
    let mut made_up = request.clone();
    made_up.destination_ids.push("made-up".into());
    let status = follow(made_up)
        .await
        .expect_err("releases go to registered destinations only");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let mut releases = follow(request.clone())
        .await
        .expect("activation may follow releases")
        .into_inner();

    let written = suite
        .consent(suite.bearer(&["admin"]))
        .record_consent(choice(consent_pb::ConsentState::Denied))
        .await
        .expect("withdraw")
        .into_inner();
    let released = tokio::time::timeout(Duration::from_secs(10), releases.message())
        .await
        .expect("a release arrives")
        .expect("stream healthy")
        .expect("stream open");
    assert_eq!(released.cursor, written.entries[0].cursor);
    let got: Vec<(String, String, String, consent_pb::ConsentState)> = released
        .releases
        .iter()
        .map(|r| {
            (
                r.destination_id.clone(),
                r.pseudonymous_id.clone(),
                r.purpose.clone(),
                r.state(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                meta.clone(),
                key.pseudonym(&meta, "p-1"),
                "analytics".into(),
                consent_pb::ConsentState::Denied
            ),
            (
                file.clone(),
                key.pseudonym(&file, "p-1"),
                "analytics".into(),
                consent_pb::ConsentState::Denied
            ),
        ]
    );
    assert!(!format!("{released:?}").contains("p-1"));

    // Released only after it was audited, per destination.
    let records = suite.audit_records().await;
    let mut audited: Vec<(&str, &str, &str, u64)> = records
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.destination_kind.as_str(),
                r.destination_id.as_str(),
                r.allowed,
            )
        })
        .collect();
    audited.sort();
    let method = "/madtech.gateway.v1.ConsentReleaseService/WatchConsentReleases";
    assert_eq!(
        audited,
        vec![(method, "file", &*file, 1), (method, "meta", &*meta, 1)]
    );
    assert!(
        records
            .iter()
            .all(|r| r.caller == "in-process" && r.released_digest.len() == 64)
    );
    assert!(
        !format!("{records:?}").contains("p-1"),
        "no profile id in the audit"
    );

    let status = ConsentReleaseServiceClient::with_interceptor(
        suite.gateway_channel(),
        suite.bearer(&["marketer"]),
    )
    .watch_consent_releases(request)
    .await
    .expect_err("marketers may not");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    suite.stop().await;
}

fn signal(signal: consent_pb::consent_signal::Signal) -> consent_pb::ConsentSignal {
    consent_pb::ConsentSignal {
        signal: Some(signal),
    }
}

fn purpose_state(entries: &[consent_pb::ConsentEntry], purpose: &str) -> consent_pb::ConsentEntry {
    entries
        .iter()
        .find(|e| e.purpose == purpose)
        .unwrap_or_else(|| panic!("an entry for {purpose}"))
        .clone()
}

#[tokio::test]
async fn signals_are_recorded_with_their_evidence_and_gpc_wins_where_binding() {
    use consent_pb::consent_signal::Signal;
    let suite = Suite::start(Backend::Sqlite).await;
    let mut ingest = suite.consent(suite.bearer(&["ingest"]));

    // A Californian's CMP sends a US Privacy string that did not opt out, the
    // browser sends GPC, and the form says yes to targeting.
    let request = consent_pb::RecordConsentRequest {
        profile_id: "p-ca".into(),
        choices: vec![consent_pb::PurposeChoice {
            purpose: "ad_targeting".into(),
            state: consent_pb::ConsentState::Granted.into(),
        }],
        signals: vec![
            signal(Signal::UsPrivacy("1YNN".into())),
            signal(Signal::Gpc(true)),
        ],
        source: consent_pb::ConsentSource::Cmp.into(),
        region: "US-CA".into(),
        cmp_id: 28,
        cmp_version: 3,
        ..Default::default()
    };
    let written = ingest
        .record_consent(request)
        .await
        .expect("recorded")
        .into_inner();
    let targeting = purpose_state(&written.entries, "ad_targeting");
    assert_eq!(targeting.state(), consent_pb::ConsentState::Denied);
    assert_eq!(targeting.signal_kind, "gpc");
    assert_eq!(targeting.legal_basis(), consent_pb::LegalBasis::OptOut);
    assert!(
        targeting.conflict.contains("explicit choice") && targeting.conflict.contains("usp"),
        "both overridden choices are recorded: {}",
        targeting.conflict
    );
    assert_eq!((targeting.cmp_id, targeting.cmp_version), (28, 3));
    let sale = purpose_state(&written.entries, "data_sale");
    assert_eq!(sale.state(), consent_pb::ConsentState::Denied);

    // The business may not ask again for a year; the person may come back.
    let ask_again = |person_initiated| consent_pb::RecordConsentRequest {
        profile_id: "p-ca".into(),
        choices: vec![consent_pb::PurposeChoice {
            purpose: "data_sale".into(),
            state: consent_pb::ConsentState::Granted.into(),
        }],
        source: consent_pb::ConsentSource::Form.into(),
        region: "US-CA".into(),
        person_initiated,
        ..Default::default()
    };
    let refused = ingest
        .record_consent(ask_again(false))
        .await
        .expect_err("too soon to ask");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("ccpa_twelve_months"),
        "{}",
        refused.message()
    );
    ingest
        .record_consent(ask_again(true))
        .await
        .expect("the person opts back in themselves");

    // GPC in France changes nothing and says so.
    let french = ingest
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: "p-fr".into(),
            signals: vec![signal(Signal::Gpc(true))],
            source: consent_pb::ConsentSource::Cmp.into(),
            region: "FR".into(),
            ..Default::default()
        })
        .await
        .expect("recorded")
        .into_inner();
    assert!(french.entries.is_empty());
    assert!(french.notes[0].contains("not a binding opt-out"));

    // A string made before TCF 2.2 is refused, naming the field.
    let old = ingest
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: "p-fr".into(),
            signals: vec![signal(Signal::TcString(
                "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA".into(),
            ))],
            source: consent_pb::ConsentSource::Cmp.into(),
            region: "FR".into(),
            ..Default::default()
        })
        .await
        .expect_err("pre-2.2 string");
    assert_eq!(old.code(), tonic::Code::InvalidArgument);
    assert!(
        old.message().contains("signals[0].tc_string"),
        "{}",
        old.message()
    );

    // Compliance reads the proof, page by page; the source may not.
    let history_of = |after_cursor| consent_pb::ConsentHistoryRequest {
        profile_id: "p-ca".into(),
        after_cursor,
        page_size: 2,
    };
    let denied = ingest
        .consent_history(history_of(0))
        .await
        .expect_err("not the source's to read");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut compliance = suite.consent(suite.bearer(&["compliance"]));
    let first = compliance
        .consent_history(history_of(0))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    assert_ne!(first.next_cursor, 0);
    let rest = compliance
        .consent_history(history_of(first.next_cursor))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(rest.next_cursor, 0);
    let all: Vec<_> = first.entries.iter().chain(&rest.entries).collect();
    assert_eq!(all.len(), 3, "two from the signals, one opt-back-in");
    assert!(all.iter().any(|e| e.raw_signal == "Sec-GPC: 1"));
    assert!(all.iter().all(|e| e.profile_id == "p-ca"));

    let state = compliance
        .get_consent(consent_pb::GetConsentRequest {
            profile_id: "p-ca".into(),
        })
        .await
        .expect("state")
        .into_inner();
    let of = |purpose: &str| {
        state
            .purposes
            .iter()
            .find(|p| p.purpose == purpose)
            .map(|p| p.state())
    };
    assert_eq!(of("ad_targeting"), Some(consent_pb::ConsentState::Denied));
    assert_eq!(of("data_sale"), Some(consent_pb::ConsentState::Granted));
    suite.stop().await;
}

// The signals crate's test encoder, to write TC strings from models.
#[path = "../../signals/tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod tc_encoder;

#[tokio::test]
async fn a_tc_string_that_refuses_a_platform_s_vendor_keeps_people_from_that_platform() {
    use consent_pb::consent_signal::Signal;
    let suite = Suite::start(Backend::Sqlite).await;
    let person = suite
        .person("tcf@example.com", "FR", Default::default())
        .await;
    // Targeting purposes 1, 3 and 4, and vendor 21 (The Trade Desk) but not
    // 755 (Google).
    let mut model = tc_encoder::TcModel::minimal();
    model.purpose_consents = [1, 3, 4].into_iter().collect();
    model.purpose_legitimate_interests = Default::default();
    model.vendor_consents.ids = [21].into_iter().collect();
    suite
        .consent(suite.bearer(&["ingest"]))
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: person,
            signals: vec![signal(Signal::TcString(model.encode()))],
            source: consent_pb::ConsentSource::Cmp.into(),
            region: "FR".into(),
            ..Default::default()
        })
        .await
        .expect("record the TC string");

    let segment = suite.region_segment("france", &["FR"]).await;
    let crossed = |kind: &'static str| {
        let segment_id = segment.segment_id.clone();
        let mut segments = suite.segments(suite.bearer(&["activation"]));
        let suite = &suite;
        async move {
            let mut stream = segments
                .export_audience(segments_pb::ExportAudienceRequest {
                    segment_id,
                    // The gateway reads the kind from the registry.
                    destination_id: suite.destination_of_kind(kind).await,
                    destination_kind: String::new(),
                    purpose: "ad_targeting".into(),
                    snapshot_cursor: 0,
                    current_membership: false,
                })
                .await
                .expect("export")
                .into_inner();
            let mut members = 0;
            while let Some(chunk) = stream.message().await.expect("chunk") {
                members += chunk.members.len();
            }
            members
        }
    };
    assert_eq!(crossed("the_trade_desk").await, 1, "its vendor has consent");
    assert_eq!(crossed("google_ads").await, 0, "its vendor was refused");
    assert_eq!(
        crossed("file").await,
        1,
        "not a TCF vendor: the purposes decide"
    );
    suite.stop().await;
}
