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

    let channel =
        tonic::transport::Endpoint::from_shared(suite.config.gateway.upstreams.consent.clone())
            .expect("consent url")
            .connect_lazy();
    let view = ConsentView::new(&ConsentViewConfig::default(), channel);
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
    let request = gateway_pb::WatchConsentReleasesRequest {
        destination_ids: vec!["meta-1".into(), "file-1".into()],
        after_cursor: 0,
    };
    let mut releases = ConsentReleaseServiceClient::with_interceptor(
        suite.gateway_channel(),
        suite.bearer(&["activation"]),
    )
    .watch_consent_releases(request.clone())
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
                "meta-1".into(),
                key.pseudonym("meta-1", "p-1"),
                "analytics".into(),
                consent_pb::ConsentState::Denied
            ),
            (
                "file-1".into(),
                key.pseudonym("file-1", "p-1"),
                "analytics".into(),
                consent_pb::ConsentState::Denied
            ),
        ]
    );
    assert!(!format!("{released:?}").contains("p-1"));

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
