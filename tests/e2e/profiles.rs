//! The profiles service through the gateway: events, idempotent retries,
//! identity rules, the change stream, access exports and erasure, with the
//! roles that may call each.

use futures::StreamExt;
use madtech_common::testing::Backend;
use madtech_proto::profiles::v1 as pb;
use tonic::Code;

use crate::harness::Suite;

fn email(value: &str) -> pb::Identifier {
    pb::Identifier {
        kind: "email".into(),
        value: value.into(),
    }
}

fn event(message_id: &str, name: &str, who: &str, amount: f64) -> pb::Event {
    pb::Event {
        message_id: message_id.into(),
        name: name.into(),
        identifiers: vec![email(who)],
        properties: [(
            "amount".to_string(),
            pb::TraitValue {
                value: Some(pb::trait_value::Value::NumberValue(amount)),
            },
        )]
        .into(),
        ..Default::default()
    }
}

async fn next_change(
    stream: &mut tonic::Streaming<pb::WatchProfileChangesResponse>,
) -> pb::profile_change::Change {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("a change within 10 s")
        .expect("stream open")
        .expect("change")
        .change
        .and_then(|c| c.change)
        .expect("set")
}

async fn events_ingested_idempotently_watched_exported_and_erased(backend: Backend) {
    let suite = Suite::start(backend).await;
    let mut ingest = suite.profiles(suite.bearer(&["ingest"]));
    let mut compliance = suite.profiles(suite.bearer(&["compliance"]));
    let mut admin = suite.profiles(suite.bearer(&["admin"]));
    let mut watch = admin
        .watch_profile_changes(pb::WatchProfileChangesRequest { after_cursor: 0 })
        .await
        .expect("watch as admin")
        .into_inner();

    // A batch with one bad event is refused whole, naming the field.
    let mut bad = vec![event("m1", "purchase", "ann@example.com", 60.0)];
    bad.push(event("m2", "purchase", "not-an-email", 10.0));
    let err = ingest
        .ingest_events(pb::IngestEventsRequest { events: bad })
        .await
        .expect_err("invalid email");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[1].identifiers[0].value"),
        "{}",
        err.message()
    );

    let batch = pb::IngestEventsRequest {
        events: vec![
            event("m1", "purchase", "Ann@Example.com", 60.0),
            event("m2", "purchase", "ann@example.com", 80.0),
            event("m3", "view", "bob@example.com", 0.0),
        ],
    };
    let first = ingest
        .ingest_events(batch.clone())
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!((first.accepted, first.duplicates), (3, 0));
    let retry = ingest
        .ingest_events(batch)
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        (retry.accepted, retry.duplicates),
        (0, 3),
        "a retry duplicates nothing"
    );

    // The refused batch left no trace: the first change is Ann's creation.
    let pb::profile_change::Change::Upserted(created) = next_change(&mut watch).await else {
        panic!("expected a profile creation first");
    };
    assert!(created.created);
    let ann_id = created.profile.expect("profile").profile_id;
    let _bob = next_change(&mut watch).await;
    let pb::profile_change::Change::EventsAppended(appended) = next_change(&mut watch).await else {
        panic!("expected the events");
    };
    assert_eq!(appended.events.len(), 3);
    assert_eq!(appended.events[0].profile_id, ann_id);

    // Bulk load over a client stream.
    let batches = (0..3).map(move |b| pb::IngestEventStreamRequest {
        events: (0..100)
            .map(|i| event(&format!("bulk-{b}-{i}"), "view", "ann@example.com", 1.0))
            .collect(),
    });
    let bulk = ingest
        .ingest_event_stream(futures::stream::iter(batches))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!((bulk.accepted, bulk.batches), (300, 3));

    let tracked = ingest
        .track(pb::TrackRequest {
            event: Some(event("t1", "signup", "ann@example.com", 0.0)),
        })
        .await
        .expect("track")
        .into_inner();
    assert_eq!(tracked.profile_id, ann_id);
    assert!(!tracked.duplicate);

    // Trait operations, and one the stored value refuses.
    let counted = ingest
        .upsert_profile(pb::UpsertProfileRequest {
            identifiers: vec![email("ann@example.com")],
            operations: vec![pb::TraitOperation {
                kind: pb::TraitOperationKind::Increment.into(),
                name: "orders".into(),
                value: Some(pb::TraitValue {
                    value: Some(pb::trait_value::Value::NumberValue(2.0)),
                }),
            }],
            source: "crm".into(),
            ..Default::default()
        })
        .await
        .expect("increment")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(counted.trait_origins["orders"].source, "crm");
    let blocked = ingest
        .upsert_profile(pb::UpsertProfileRequest {
            identifiers: vec![email("test@example.com")],
            ..Default::default()
        })
        .await
        .expect_err("blocked by the identity rules");
    assert_eq!(blocked.code(), Code::FailedPrecondition);

    // Access export: compliance may, marketers may not.
    let denied = suite
        .profiles(suite.bearer(&["marketer"]))
        .export_profile(pb::ExportProfileRequest {
            lookup: Some(pb::export_profile_request::Lookup::Identifier(email(
                "ann@example.com",
            ))),
        })
        .await
        .expect_err("marketers do not read exports");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let export = compliance
        .export_profile(pb::ExportProfileRequest {
            lookup: Some(pb::export_profile_request::Lookup::Identifier(email(
                "ANN@example.com",
            ))),
        })
        .await
        .expect("export")
        .into_inner();
    let json: serde_json::Value = serde_json::from_slice(&export.json).expect("JSON");
    assert_eq!(json["profile_id"], ann_id.as_str());
    assert_eq!(
        json["events"].as_array().expect("events").len(),
        2 + 300 + 1
    );
    assert_eq!(json["identifiers"][0]["value"], "ann@example.com");
    assert_eq!(json["traits"]["orders"]["source"], "crm");

    // Erasure: only compliance (and admin); afterwards nothing is found.
    let refused = ingest
        .erase_profile(pb::EraseProfileRequest {
            lookup: Some(pb::erase_profile_request::Lookup::ProfileId(ann_id.clone())),
            suppress: false,
        })
        .await
        .expect_err("sources never erase");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let erased = compliance
        .erase_profile(pb::EraseProfileRequest {
            lookup: Some(pb::erase_profile_request::Lookup::ProfileId(ann_id.clone())),
            suppress: false,
        })
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(erased.profile_ids, vec![ann_id.clone()]);
    assert_eq!(erased.events, 303);
    let gone = compliance
        .get_profile(pb::GetProfileRequest {
            lookup: Some(pb::get_profile_request::Lookup::Identifier(email(
                "ann@example.com",
            ))),
        })
        .await
        .expect_err("erased");
    assert_eq!(gone.code(), Code::NotFound);
    let again = compliance
        .erase_profile(pb::EraseProfileRequest {
            lookup: Some(pb::erase_profile_request::Lookup::ProfileId(ann_id.clone())),
            suppress: false,
        })
        .await
        .expect_err("already erased");
    assert_eq!(again.code(), Code::NotFound);

    // Watchers see the erasure; a new watcher from the start sees nothing of
    // Ann but the erasure itself.
    let mut fresh = admin
        .watch_profile_changes(pb::WatchProfileChangesRequest { after_cursor: 0 })
        .await
        .expect("watch")
        .into_inner();
    loop {
        match next_change(&mut fresh).await {
            pb::profile_change::Change::Erased(erased) => {
                assert_eq!(erased.profile_ids, vec![ann_id.clone()]);
                break;
            }
            pb::profile_change::Change::Upserted(u) => {
                assert_ne!(
                    u.profile.expect("profile").profile_id,
                    ann_id,
                    "Ann was erased"
                );
            }
            pb::profile_change::Change::EventsAppended(e) => {
                assert!(
                    e.events.iter().all(|e| e.profile_id != ann_id),
                    "Ann was erased"
                );
            }
            pb::profile_change::Change::Merged(_) => {}
        }
    }
}

#[tokio::test]
async fn sqlite_events_ingested_idempotently_watched_exported_and_erased() {
    events_ingested_idempotently_watched_exported_and_erased(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_events_ingested_idempotently_watched_exported_and_erased() {
    events_ingested_idempotently_watched_exported_and_erased(Backend::Postgres).await;
}
