//! Segment rules through the gateway: the text form, validation with
//! positions, and references to other segments.

use madtech_common::testing::Backend;
use madtech_proto::segments::v1 as pb;
use tonic::Code;

use crate::harness::Suite;

#[tokio::test]
async fn rules_are_written_as_text_validated_and_printed_back() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut marketer = suite.segments(suite.bearer(&["marketer"]));

    let checked = marketer
        .validate_rule(pb::ValidateRuleRequest {
            rule: None,
            rule_text: r#"region in ["FR","DE"] and count(event "purchase" where amount > 50, last 30d) >= 2"#.into(),
        })
        .await
        .expect("valid")
        .into_inner();
    assert_eq!(
        checked.rule_text,
        r#"region in ["DE", "FR"] and count(event "purchase" where amount > 50, last 30d) >= 2"#
    );
    assert!(checked.rule.is_some());

    let err = marketer
        .validate_rule(pb::ValidateRuleRequest {
            rule: None,
            rule_text: "has email and\n  trait.plan > \"pro\"".into(),
        })
        .await
        .expect_err("strings do not compare with >");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("rule_text") && err.message().contains("line 2, column 16"),
        "{}",
        err.message()
    );

    let vip = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "vip".into(),
            rule: None,
            rule_text: r#"trait.plan in ["pro", "enterprise"]"#.into(),
        })
        .await
        .expect("create from text")
        .into_inner()
        .segment
        .expect("segment");
    assert_eq!(vip.rule_text, r#"trait.plan in ["pro", "enterprise"]"#);

    let unknown = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "ghost".into(),
            rule: None,
            rule_text: r#"in_segment("nope")"#.into(),
        })
        .await
        .expect_err("unknown segment");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(
        unknown.message().contains("no such segment"),
        "{}",
        unknown.message()
    );

    let nested = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "vip in france".into(),
            rule: None,
            rule_text: format!(r#"in_segment("{}") and region in ["FR"]"#, vip.segment_id),
        })
        .await
        .expect("references an existing segment")
        .into_inner()
        .segment
        .expect("segment");
    // Updating vip to refer back to the segment that refers to it is a cycle.
    let cycle = marketer
        .update_segment(pb::UpdateSegmentRequest {
            segment_id: vip.segment_id.clone(),
            rule: None,
            rule_text: format!(r#"in_segment("{}")"#, nested.segment_id),
        })
        .await
        .expect_err("a cycle");
    assert_eq!(cycle.code(), Code::InvalidArgument);
    assert!(cycle.message().contains("cycle"), "{}", cycle.message());
    let updated = marketer
        .update_segment(pb::UpdateSegmentRequest {
            segment_id: vip.segment_id.clone(),
            rule: None,
            rule_text: r#"trait.plan == "enterprise""#.into(),
        })
        .await
        .expect("update")
        .into_inner()
        .segment
        .expect("segment");
    assert_eq!(updated.rule_text, r#"trait.plan == "enterprise""#);
    let missing = marketer
        .update_segment(pb::UpdateSegmentRequest {
            segment_id: "nope".into(),
            rule: None,
            rule_text: "true".into(),
        })
        .await
        .expect_err("no such segment");
    assert_eq!(missing.code(), Code::NotFound);

    let fetched = marketer
        .get_segment(pb::GetSegmentRequest {
            segment_id: nested.segment_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .segment
        .expect("segment");
    assert_eq!(fetched.rule_text, nested.rule_text);
}

fn purchase(message_id: &str, email: &str, amount: f64) -> madtech_proto::profiles::v1::Event {
    use madtech_proto::profiles::v1 as profiles_pb;
    profiles_pb::Event {
        message_id: message_id.into(),
        name: "purchase".into(),
        identifiers: vec![profiles_pb::Identifier {
            kind: "email".into(),
            value: email.into(),
        }],
        properties: [(
            "amount".to_string(),
            profiles_pb::TraitValue {
                value: Some(profiles_pb::trait_value::Value::NumberValue(amount)),
            },
        )]
        .into(),
        ..Default::default()
    }
}

async fn segments_over_events_follow_the_profiles_stream(backend: Backend) {
    use madtech_proto::consent::v1 as consent_pb;
    use madtech_proto::profiles::v1 as profiles_pb;
    let suite = Suite::start(backend).await;
    let mut ingest = suite.profiles(suite.bearer(&["ingest"]));
    let events = vec![
        purchase("e1", "big@example.com", 80.0),
        purchase("e2", "big@example.com", 60.0),
        purchase("e3", "small@example.com", 80.0),
        purchase("e4", "small@example.com", 10.0),
    ];
    ingest
        .ingest_events(profiles_pb::IngestEventsRequest { events })
        .await
        .expect("ingest");
    let big = ingest
        .get_profile(profiles_pb::GetProfileRequest {
            lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(
                profiles_pb::Identifier {
                    kind: "email".into(),
                    value: "big@example.com".into(),
                },
            )),
        })
        .await
        .expect("get")
        .into_inner()
        .profile
        .expect("profile");
    for (email, region) in [("big@example.com", "FR"), ("small@example.com", "FR")] {
        let id = suite.person(email, region, Default::default()).await;
        suite
            .consent(suite.bearer(&["ingest"]))
            .record_consent(consent_pb::RecordConsentRequest {
                profile_id: id,
                choices: vec![consent_pb::PurposeChoice {
                    purpose: "ad_targeting".into(),
                    state: consent_pb::ConsentState::Granted.into(),
                }],
                source: consent_pb::ConsentSource::Cmp.into(),
                region: region.into(),
                notice_version: "2026-11".into(),
                collected_at: None,
                ..Default::default()
            })
            .await
            .expect("consent");
    }

    let segment = suite
        .segments(suite.bearer(&["marketer"]))
        .create_segment(pb::CreateSegmentRequest {
            name: "big spenders".into(),
            rule: None,
            rule_text:
                r#"region in ["FR"] and count(event "purchase" where amount > 50, last 30d) >= 2"#
                    .into(),
        })
        .await
        .expect("create")
        .into_inner()
        .segment
        .expect("segment");
    let preview = suite
        .segments(suite.bearer(&["marketer"]))
        .preview_segment(pb::PreviewSegmentRequest {
            rule: None,
            rule_text: r#"count(event "purchase" where amount > 50, last 30d) >= 1"#.into(),
            sample_size: 1,
        })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.count, 2, "both bought something large");
    assert_eq!(preview.sample_profile_ids.len(), 1, "the sample is bounded");

    let members = suite.export(&segment.segment_id).await;
    assert_eq!(members.len(), 1, "only the person with two large purchases");
    assert!(!members[0].pseudonymous_id.is_empty());

    // Erasure reaches the projection: the person leaves the audience.
    suite
        .profiles(suite.bearer(&["compliance"]))
        .erase_profile(profiles_pb::EraseProfileRequest {
            lookup: Some(profiles_pb::erase_profile_request::Lookup::ProfileId(
                big.profile_id,
            )),
            suppress: false,
        })
        .await
        .expect("erase");
    assert!(suite.export(&segment.segment_id).await.is_empty());
}

#[tokio::test]
async fn sqlite_segments_over_events_follow_the_profiles_stream() {
    segments_over_events_follow_the_profiles_stream(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_segments_over_events_follow_the_profiles_stream() {
    segments_over_events_follow_the_profiles_stream(Backend::Postgres).await;
}

/// How many people `rule_text` matches, once the projection settles on
/// `expected` (previews do not wait for the projection to catch up).
async fn settled_count(suite: &Suite, rule_text: &str, expected: u64) -> u64 {
    let mut count = 0;
    for _ in 0..100 {
        count = suite
            .segments(suite.bearer(&["marketer"]))
            .preview_segment(pb::PreviewSegmentRequest {
                rule: None,
                rule_text: rule_text.into(),
                sample_size: 1,
            })
            .await
            .expect("preview")
            .into_inner()
            .count;
        if count == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    count
}

/// The segments service is down while profiles changes; restarted on its
/// own database, it resumes from its stored cursor: what changed meanwhile
/// arrives, and nothing it had applied is applied again.
async fn the_projection_resumes_after_a_restart_with_nothing_missed(backend: Backend) {
    use madtech_proto::profiles::v1 as profiles_pb;
    let bought = |times: u32| format!(r#"count(event "purchase", last 30d) >= {times}"#);
    let ingest = async |suite: &Suite, events| {
        suite
            .profiles(suite.bearer(&["ingest"]))
            .ingest_events(profiles_pb::IngestEventsRequest { events })
            .await
            .expect("ingest");
    };

    let suite = Suite::start(backend).await;
    ingest(
        &suite,
        vec![
            purchase("e1", "loyal@example.com", 20.0),
            purchase("e2", "loyal@example.com", 30.0),
        ],
    )
    .await;
    assert_eq!(settled_count(&suite, &bought(2), 1).await, 1);
    let kept = suite.stop_keeping_data().await;

    // Profiles changes while this segments database is not followed (the
    // suite runs its segments service on another one).
    let elsewhere = kept.db.sibling("segments_elsewhere");
    let suite = Suite::start_on(kept, |config| config.segments.database = elsewhere).await;
    ingest(
        &suite,
        vec![
            purchase("e3", "loyal@example.com", 40.0),
            purchase("e4", "new@example.com", 50.0),
        ],
    )
    .await;
    let kept = suite.stop_keeping_data().await;

    let suite = Suite::start_on(kept, |_| {}).await;
    assert_eq!(
        settled_count(&suite, &bought(1), 2).await,
        2,
        "the person who first bought while segments was down arrived"
    );
    assert_eq!(
        settled_count(&suite, &bought(3), 1).await,
        1,
        "the purchase made while segments was down counts"
    );
    assert_eq!(
        settled_count(&suite, &bought(4), 0).await,
        0,
        "nothing applied before the restart was applied again"
    );
    suite.stop().await;
}

#[tokio::test]
async fn sqlite_the_projection_resumes_after_a_restart_with_nothing_missed() {
    the_projection_resumes_after_a_restart_with_nothing_missed(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_the_projection_resumes_after_a_restart_with_nothing_missed() {
    the_projection_resumes_after_a_restart_with_nothing_missed(Backend::Postgres).await;
}

#[tokio::test]
async fn computing_a_segment_reports_progress_and_records_who_entered_and_left() {
    use futures::StreamExt;
    use madtech_proto::profiles::v1 as profiles_pb;
    let suite = Suite::start(Backend::Sqlite).await;
    let mut ingest = suite.profiles(suite.bearer(&["ingest"]));
    let person = |i: usize, plan: &str| profiles_pb::UpsertProfileRequest {
        identifiers: vec![profiles_pb::Identifier {
            kind: "customer_id".into(),
            value: format!("c{i}"),
        }],
        traits: [(
            "plan".to_string(),
            profiles_pb::TraitValue {
                value: Some(profiles_pb::trait_value::Value::StringValue(plan.into())),
            },
        )]
        .into(),
        ..Default::default()
    };
    for batch in [0..1_000, 1_000..1_500] {
        ingest
            .batch_upsert_profiles(profiles_pb::BatchUpsertProfilesRequest {
                upserts: batch
                    .map(|i| person(i, if i % 3 == 0 { "pro" } else { "free" }))
                    .collect(),
            })
            .await
            .expect("people");
    }
    let mut marketer = suite.segments(suite.bearer(&["marketer"]));
    let segment = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "pro".into(),
            rule: None,
            rule_text: r#"trait.plan == "pro""#.into(),
        })
        .await
        .expect("create")
        .into_inner()
        .segment
        .expect("segment");

    let compute = |marketer: &mut madtech_proto::segments::v1::segment_service_client::SegmentServiceClient<crate::harness::Authed>| {
        let request = pb::ComputeSegmentRequest {
            segment_id: segment.segment_id.clone(),
        };
        let mut marketer = marketer.clone();
        async move {
            let mut stream = marketer.compute_segment(request).await.expect("compute").into_inner();
            let mut steps = Vec::new();
            while let Some(step) = stream.next().await {
                steps.push(step.expect("progress"));
            }
            steps
        }
    };
    let steps = compute(&mut marketer).await;
    let last = steps.last().expect("a final message");
    assert!(last.done);
    assert_eq!((last.processed, last.total), (1_500, 1_500));
    // The follower may already have placed people the moment the segment
    // existed (real time); the computation records whoever is left.
    assert_eq!((last.exited, last.members), (0, 500));
    assert!(last.entered <= 500);
    assert!(steps.len() >= 3, "progress between pages: {}", steps.len());
    assert!(steps.windows(2).all(|w| w[0].processed <= w[1].processed));

    // Real time: changes move people in and out without a computation.
    let mut changes = marketer
        .watch_membership_changes(pb::WatchMembershipChangesRequest {
            segment_id: segment.segment_id.clone(),
            after_cursor: last.cursor,
        })
        .await
        .expect("watch")
        .into_inner();
    let downgraded = ingest
        .upsert_profile(person(0, "free"))
        .await
        .expect("downgrade")
        .into_inner()
        .profile
        .expect("profile")
        .profile_id;
    let left = next_membership_change(&mut changes).await;
    assert_eq!(
        (left.profile_id.as_str(), left.entered),
        (downgraded.as_str(), false)
    );
    let upgraded = ingest
        .upsert_profile(person(1, "pro"))
        .await
        .expect("upgrade")
        .into_inner()
        .profile
        .expect("profile")
        .profile_id;
    let joined = next_membership_change(&mut changes).await;
    assert_eq!(
        (joined.profile_id.as_str(), joined.entered),
        (upgraded.as_str(), true)
    );

    // A computation afterwards finds nothing left to change.
    let again = compute(&mut marketer).await;
    let last_again = again.last().expect("final");
    assert_eq!(
        (last_again.entered, last_again.exited, last_again.members),
        (0, 0, 500)
    );

    let denied = suite
        .segments(suite.bearer(&["activation"]))
        .watch_membership_changes(pb::WatchMembershipChangesRequest {
            segment_id: segment.segment_id.clone(),
            after_cursor: 0,
        })
        .await
        .expect_err("raw profile ids never reach the adtech role");
    assert_eq!(denied.code(), Code::PermissionDenied);
}

async fn next_membership_change(
    changes: &mut tonic::Streaming<pb::WatchMembershipChangesResponse>,
) -> pb::MembershipChange {
    use futures::StreamExt;
    tokio::time::timeout(std::time::Duration::from_secs(10), changes.next())
        .await
        .expect("a membership change within 10 s")
        .expect("open")
        .expect("change")
        .change
        .expect("set")
}

#[tokio::test]
async fn people_leave_windowed_segments_on_schedule_as_their_events_age_out() {
    use madtech_proto::profiles::v1 as profiles_pb;
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.segments.reevaluate_interval = std::time::Duration::from_millis(300);
    })
    .await;
    // A purchase that falls out of "last 30d" three seconds from now.
    let ages_out = chrono::Utc::now() - chrono::Duration::days(30) + chrono::Duration::seconds(3);
    let mut event = purchase("aging", "leaving@example.com", 80.0);
    event.timestamp = Some(madtech_proto::time::from_micros(
        ages_out.timestamp_micros(),
    ));
    let mut fresh = purchase("fresh", "staying@example.com", 80.0);
    fresh.timestamp = None;
    suite
        .profiles(suite.bearer(&["ingest"]))
        .ingest_events(profiles_pb::IngestEventsRequest {
            events: vec![event, fresh],
        })
        .await
        .expect("ingest");

    let mut marketer = suite.segments(suite.bearer(&["marketer"]));
    let segment = marketer
        .create_segment(pb::CreateSegmentRequest {
            name: "recent buyers".into(),
            rule: None,
            rule_text: r#"count(event "purchase", last 30d) >= 1"#.into(),
        })
        .await
        .expect("create")
        .into_inner()
        .segment
        .expect("segment");
    let mut computing = marketer
        .compute_segment(pb::ComputeSegmentRequest {
            segment_id: segment.segment_id.clone(),
        })
        .await
        .expect("compute")
        .into_inner();
    let mut members = 0;
    while let Some(progress) = computing.message().await.expect("progress") {
        members = progress.members;
    }
    assert_eq!(members, 2, "both bought in the last 30 days");

    // Nothing changes upstream: only time passes, and the schedule notices.
    let mut changes = marketer
        .watch_membership_changes(pb::WatchMembershipChangesRequest {
            segment_id: segment.segment_id.clone(),
            after_cursor: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut exits = Vec::new();
    while exits.is_empty() {
        let change = next_membership_change(&mut changes).await;
        if !change.entered {
            exits.push(change.profile_id);
        }
    }
    let leaving = suite
        .profiles(suite.bearer(&["admin"]))
        .get_profile(profiles_pb::GetProfileRequest {
            lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(
                profiles_pb::Identifier {
                    kind: "email".into(),
                    value: "leaving@example.com".into(),
                },
            )),
        })
        .await
        .expect("get")
        .into_inner()
        .profile
        .expect("profile")
        .profile_id;
    assert_eq!(exits, vec![leaving], "only the aged-out buyer leaves");
    suite.stop().await;
}
