//! Data-subject requests end to end, through the gateway: an access request
//! gathers everything held about a person (profile, consent ledger, segment
//! memberships, what was sent where); an erasure removes the person from
//! every service and every destination and then proves, by scanning each
//! service, that nothing is left; an opt-out of sale and sharing stops the
//! next sync from sending the person.

use std::time::Duration;

use madtech_common::testing::Backend;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as segments_pb;
use serde_json::Value;

use crate::crossing::{lines, sha256_hex, sync};
use crate::harness::{Authed, Suite};

type PrivacyClient =
    madtech_proto::consent::v1::privacy_request_service_client::PrivacyRequestServiceClient<Authed>;

fn email(value: &str) -> profiles_pb::Identifier {
    profiles_pb::Identifier {
        kind: "email".into(),
        value: value.into(),
    }
}

fn submit(
    id: &str,
    kind: consent_pb::PrivacyRequestKind,
    subject: &str,
) -> consent_pb::SubmitRequestRequest {
    consent_pb::SubmitRequestRequest {
        request_id: id.into(),
        kind: kind.into(),
        subject: Some(consent_pb::PrivacySubject {
            kind: "email".into(),
            value: subject.into(),
        }),
        region: "US-CA".into(),
    }
}

/// Polls until the request completes; fails with its steps when it does not.
async fn completed(privacy: &mut PrivacyClient, id: &str) -> consent_pb::PrivacyRequest {
    let mut last = None;
    for _ in 0..300 {
        let request = privacy
            .get_request(consent_pb::GetRequestRequest {
                request_id: id.into(),
            })
            .await
            .expect("get request")
            .into_inner()
            .request
            .expect("request");
        if request.status() == consent_pb::PrivacyRequestStatus::Completed {
            return request;
        }
        last = Some(request);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "request {id} did not complete: {:#?}",
        last.map(|r| r.steps)
    );
}

#[tokio::test]
async fn sqlite_access_erasure_and_opt_out_requests_reach_every_service() {
    access_erasure_and_opt_out(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_access_erasure_and_opt_out_requests_reach_every_service() {
    access_erasure_and_opt_out(Backend::Postgres).await;
}

async fn access_erasure_and_opt_out(backend: Backend) {
    let suite = Suite::start(backend).await;
    let admin = suite.bearer(&["admin"]);
    let mut profiles = suite.profiles(admin.clone());
    let mut consent = suite.consent(admin.clone());
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let mut privacy = suite.privacy(suite.bearer(&["compliance"]));

    // Two Californians, sent to a file destination.
    let mut ids = Vec::new();
    for address in ["ann@example.com", "bob@example.com"] {
        let answer = profiles
            .upsert_profile(profiles_pb::UpsertProfileRequest {
                identifiers: vec![email(address)],
                region: "US-CA".into(),
                ..Default::default()
            })
            .await
            .expect("upsert")
            .into_inner();
        ids.push(answer.profile.expect("profile").profile_id);
    }
    consent
        .record_consent(consent_pb::RecordConsentRequest {
            profile_id: ids[0].clone(),
            choices: vec![consent_pb::PurposeChoice {
                purpose: "analytics".into(),
                state: consent_pb::ConsentState::Granted.into(),
            }],
            source: consent_pb::ConsentSource::Form.into(),
            region: "US-CA".into(),
            ..Default::default()
        })
        .await
        .expect("consent");
    let segment = suite.region_segment("california", &["US-CA"]).await;
    let mut computing = suite
        .segments(admin.clone())
        .compute_segment(segments_pb::ComputeSegmentRequest {
            segment_id: segment.segment_id.clone(),
        })
        .await
        .expect("compute")
        .into_inner();
    while computing.message().await.expect("progress").is_some() {}
    let (destination, activated) = suite.file_activation(&segment.segment_id, "drop").await;
    let first = sync(&mut activation, &activated.activation_id).await;
    assert_eq!(first.added, 2);

    // Access: everything about Ann, from every service.
    let submitted = privacy
        .submit_request(submit(
            "dsar-1",
            consent_pb::PrivacyRequestKind::Access,
            "Ann@Example.com ",
        ))
        .await
        .expect("submit access")
        .into_inner();
    assert!(submitted.created);
    let request = submitted.request.expect("request");
    assert_eq!(request.regime, "CCPA");
    let days = |r: &consent_pb::PrivacyRequest| {
        (r.deadline.as_ref().expect("deadline").seconds
            - r.submitted_at.as_ref().expect("submitted").seconds)
            / 86_400
    };
    assert_eq!(days(&request), 45, "CCPA's deadline, from the policy");
    let access = completed(&mut privacy, "dsar-1").await;
    let export: Value = serde_json::from_slice(&access.export_json).expect("export is JSON");
    assert_eq!(
        export["profile"]["identifiers"][0]["value"],
        "ann@example.com"
    );
    assert_eq!(export["consent_ledger"][0]["purpose"], "analytics");
    assert_eq!(
        export["segment_memberships"][0]["segment_id"],
        Value::String(segment.segment_id.clone())
    );
    let sent = export["sent_to_destinations"]
        .as_array()
        .expect("deliveries");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0]["destination_id"],
        Value::String(destination.destination_id.clone())
    );
    // The activation service's consent-release stream to the same
    // destination is audited too, before or after the sync as it happens.
    let crossings = export["crossings"].as_array().expect("crossings");
    let audited_sync = crossings
        .iter()
        .find(|c| c["method"] == "/madtech.segments.v1.SegmentService/ExportAudience")
        .expect("the gateway's audit of the sync that sent her");
    assert_eq!(
        audited_sync["destination_id"],
        Value::String(destination.destination_id.clone())
    );
    let ann_pseudonym = sent[0]["pseudonymous_id"]
        .as_str()
        .expect("pseudonym")
        .to_string();

    // Submitting again is idempotent; the same id for something else is not.
    let again = privacy
        .submit_request(submit(
            "dsar-1",
            consent_pb::PrivacyRequestKind::Access,
            "Ann@Example.com",
        ))
        .await
        .expect("resubmit")
        .into_inner();
    assert!(!again.created);
    let clash = privacy
        .submit_request(submit(
            "dsar-1",
            consent_pb::PrivacyRequestKind::Erasure,
            "ann@example.com",
        ))
        .await
        .expect_err("another request under the same id");
    assert_eq!(clash.code(), tonic::Code::AlreadyExists);

    // Erasure: gone everywhere, removed from the destination, and proven.
    privacy
        .submit_request(submit(
            "dsar-2",
            consent_pb::PrivacyRequestKind::Erasure,
            "ann@example.com",
        ))
        .await
        .expect("submit erasure");
    let erasure = completed(&mut privacy, "dsar-2").await;
    assert!(
        erasure
            .steps
            .iter()
            .all(|s| s.status() == consent_pb::PrivacyStepStatus::Done)
    );
    let mut checked: Vec<&String> = erasure.remaining.keys().collect();
    checked.sort();
    assert_eq!(checked, ["activation", "consent", "profiles", "segments"]);
    assert!(
        erasure.remaining.values().all(|hits| *hits == 0),
        "{:?}",
        erasure.remaining
    );
    assert_eq!(
        erasure.subject_digest.len(),
        64,
        "only the hashed subject is kept"
    );
    let gone = profiles
        .get_profile(profiles_pb::GetProfileRequest {
            lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(email(
                "ann@example.com",
            ))),
        })
        .await
        .expect_err("erased");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let removal = std::fs::read_dir(suite.config.activation.file_root.join("drop"))
        .expect("destination directory")
        .map(|entry| entry.expect("entry").path())
        .find(|path| path.to_string_lossy().contains("-erasure-"))
        .expect("a removal file");
    assert_eq!(
        lines(&removal.to_string_lossy()),
        vec![serde_json::json!({
            "op": "remove",
            "id": ann_pseudonym,
            "identifiers": [{"kind": "email", "sha256": sha256_hex("ann@example.com")}],
        })],
        "a removal names what the destination was given"
    );
    let history = consent
        .consent_history(consent_pb::ConsentHistoryRequest {
            profile_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert!(history.entries.is_empty(), "the ledger forgot Ann");
    let next = sync(&mut activation, &activated.activation_id).await;
    assert_eq!((next.added, next.removed), (0, 0), "Ann is not sent again");

    // Opt-out of sale and sharing: Bob leaves the destination at the next sync.
    privacy
        .submit_request(submit(
            "dsar-3",
            consent_pb::PrivacyRequestKind::OptOutOfSaleSharing,
            "bob@example.com",
        ))
        .await
        .expect("submit opt-out");
    completed(&mut privacy, "dsar-3").await;
    let bob = consent
        .get_consent(consent_pb::GetConsentRequest {
            profile_id: ids[1].clone(),
        })
        .await
        .expect("consent")
        .into_inner();
    let denied: Vec<&str> = bob
        .purposes
        .iter()
        .filter(|p| p.state() == consent_pb::ConsentState::Denied)
        .map(|p| p.purpose.as_str())
        .collect();
    assert_eq!(denied, ["ad_targeting", "data_sale"]);
    // The opt-out denies ad targeting, which removes Bob from the
    // destination at once, without waiting for a sync.
    let removal = suite
        .finished_run(&activated.activation_id, "consent_withdrawal")
        .await;
    assert_eq!(removal.removed, 1, "Bob opted out");
    let after = sync(&mut activation, &activated.activation_id).await;
    assert_eq!((after.added, after.removed), (0, 0), "Bob stays out");

    // The erased person stays out of imports until they come back with new
    // consent, which the consent service takes by identifier.
    let refused = profiles
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![email("ann@example.com")],
            region: "US-CA".into(),
            ..Default::default()
        })
        .await
        .expect_err("suppressed");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(!refused.message().contains("ann@"), "{}", refused.message());
    let by_identifier = |state: consent_pb::ConsentState| consent_pb::RecordConsentRequest {
        identifier: Some(email("Ann@Example.com")),
        choices: vec![consent_pb::PurposeChoice {
            purpose: "analytics".into(),
            state: state.into(),
        }],
        source: consent_pb::ConsentSource::Form.into(),
        region: "US-CA".into(),
        ..Default::default()
    };
    let denial_only = consent
        .record_consent(by_identifier(consent_pb::ConsentState::Denied))
        .await
        .expect_err("nobody to record a denial for");
    assert_eq!(denial_only.code(), tonic::Code::FailedPrecondition);
    // Not having opted out is not new consent: an opt-out-basis "grant"
    // (a default US Privacy string says as much) brings nobody back.
    let not_opted_out = consent
        .record_consent(consent_pb::RecordConsentRequest {
            legal_basis: consent_pb::LegalBasis::OptOut.into(),
            ..by_identifier(consent_pb::ConsentState::Granted)
        })
        .await
        .expect_err("no consent to come back with");
    assert_eq!(not_opted_out.code(), tonic::Code::FailedPrecondition);
    let back = consent
        .record_consent(by_identifier(consent_pb::ConsentState::Granted))
        .await
        .expect("she comes back with new consent")
        .into_inner();
    let new_ann = back.entries[0].profile_id.clone();
    assert_ne!(new_ann, ids[0], "a new person, nothing of the old one");
    let again = profiles
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![email("ann@example.com")],
            region: "US-CA".into(),
            ..Default::default()
        })
        .await
        .expect("imports reach her again")
        .into_inner();
    assert_eq!(again.profile.expect("profile").profile_id, new_ann);

    // Bad requests change nothing and say why; only compliance sees requests.
    let bad = privacy
        .submit_request(consent_pb::SubmitRequestRequest {
            request_id: "dsar-4".into(),
            kind: 0,
            subject: Some(consent_pb::PrivacySubject {
                kind: "email".into(),
                value: "x@example.com".into(),
            }),
            region: "FR".into(),
        })
        .await
        .expect_err("no kind");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("kind"), "{}", bad.message());
    let listed = privacy
        .list_requests(consent_pb::ListRequestsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.requests.len(), 3);
    let mut marketer = suite.privacy(suite.bearer(&["marketer"]));
    let refused = marketer
        .get_request(consent_pb::GetRequestRequest {
            request_id: "dsar-1".into(),
        })
        .await
        .expect_err("not a marketer's business");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    suite.stop().await;
}

/// Which form of an identifier a destination was given is policy: Meta gets
/// phones as digits without the `+`. An erasure asked for by phone finds and
/// removes the person there too, and proves nothing is left.
#[tokio::test]
async fn an_erasure_reaches_a_destination_given_another_form_of_the_identifier() {
    use crate::activation::{AUDIENCE, TOKEN, synced_to_meta};
    let suite = Suite::start(Backend::Sqlite).await;
    let mock = madtech_activation::mock::MockPlatform::meta(AUDIENCE, TOKEN).await;
    let secrets = tempfile::tempdir().expect("secrets");
    let phone = "+14155552671";
    suite
        .person_with(&[("phone", phone)], "US-CA", Default::default())
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let (_, first) =
        synced_to_meta(&suite, &segment.segment_id, "meta", &mock, secrets.path()).await;
    assert_eq!(first.added, 1);
    assert_eq!(
        mock.platform().audience.len(),
        1,
        "Meta holds the person's phone, hashed as digits"
    );

    let mut privacy = suite.privacy(suite.bearer(&["compliance"]));
    privacy
        .submit_request(consent_pb::SubmitRequestRequest {
            request_id: "dsar-phone".into(),
            kind: consent_pb::PrivacyRequestKind::Erasure.into(),
            subject: Some(consent_pb::PrivacySubject {
                kind: "phone".into(),
                value: phone.into(),
            }),
            region: "US-CA".into(),
        })
        .await
        .expect("submit erasure");
    let erasure = completed(&mut privacy, "dsar-phone").await;
    assert_eq!(erasure.remaining.get("activation"), Some(&0));
    {
        let meta = mock.platform();
        assert!(meta.violations.is_empty(), "{:?}", meta.violations);
        assert!(
            meta.audience.is_empty(),
            "removed from Meta: {:?}",
            meta.audience
        );
    }
    suite.stop().await;
}

/// A person may hold more identifiers than one activation lookup takes (100
/// hashes): the request asks in several calls and completes.
#[tokio::test]
async fn a_person_with_more_identifiers_than_one_lookup_takes_is_served() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut profiles = suite.profiles(suite.bearer(&["ingest"]));
    for batch in 0..3 {
        let mut identifiers = vec![email("many@example.com")];
        identifiers.extend((0..50).map(|i| profiles_pb::Identifier {
            kind: "cookie_id".into(),
            value: format!("cookie-{batch}-{i}"),
        }));
        profiles
            .upsert_profile(profiles_pb::UpsertProfileRequest {
                identifiers,
                region: "US-CA".into(),
                ..Default::default()
            })
            .await
            .expect("upsert");
    }
    let mut privacy = suite.privacy(suite.bearer(&["compliance"]));
    privacy
        .submit_request(submit(
            "dsar-many",
            consent_pb::PrivacyRequestKind::Access,
            "many@example.com",
        ))
        .await
        .expect("submit access");
    let access = completed(&mut privacy, "dsar-many").await;
    let export: Value = serde_json::from_slice(&access.export_json).expect("export is JSON");
    assert_eq!(
        export["profile"]["identifiers"]
            .as_array()
            .expect("identifiers")
            .len(),
        151
    );
    suite.stop().await;
}

/// `LiftSuppression` with `then_upsert` checks the upsert as `UpsertProfile`
/// would, naming fields under `then_upsert`, and changes nothing when it
/// refuses.
#[tokio::test]
async fn a_lift_with_an_upsert_is_validated_as_a_whole() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut profiles = suite.profiles(suite.bearer(&["compliance"]));
    let lift = |then: Vec<profiles_pb::Identifier>| profiles_pb::LiftSuppressionRequest {
        identifier: Some(email("back@example.com")),
        then_upsert: Some(profiles_pb::UpsertProfileRequest {
            identifiers: then,
            region: "FR".into(),
            ..Default::default()
        }),
    };
    let elsewhere = profiles
        .lift_suppression(lift(vec![email("other@example.com")]))
        .await
        .expect_err("the upsert must name the lifted identifier");
    assert_eq!(elsewhere.code(), tonic::Code::InvalidArgument);
    assert!(
        elsewhere.message().contains("then_upsert.identifiers"),
        "{}",
        elsewhere.message()
    );
    let malformed = profiles
        .lift_suppression(lift(vec![email("back@example.com"), email("not an email")]))
        .await
        .expect_err("a malformed identifier");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    assert!(
        malformed.message().contains("then_upsert.identifiers[1]"),
        "{}",
        malformed.message()
    );
    let nobody = profiles
        .get_profile(profiles_pb::GetProfileRequest {
            lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(email(
                "back@example.com",
            ))),
        })
        .await
        .expect_err("nothing was written");
    assert_eq!(nobody.code(), tonic::Code::NotFound);
    let answer = profiles
        .lift_suppression(lift(vec![email("back@example.com")]))
        .await
        .expect("lift and upsert")
        .into_inner();
    assert!(!answer.lifted, "it was never suppressed");
    let upserted = answer.upserted.expect("what the upsert did");
    assert!(upserted.created);
    suite.stop().await;
}
