//! The consent change stream through the gateway: ordered, resumable from a
//! cursor, and live.

use std::time::Duration;

use madtech_common::testing::Backend;
use madtech_proto::consent::v1 as consent_pb;

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
