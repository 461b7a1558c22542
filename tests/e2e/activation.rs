//! Activation end to end, through the gateway, against local mock platforms
//! that check what each platform documents: first and incremental syncs to
//! Meta Custom Audiences, retries and refusals, multi-batch webhooks, and
//! removal the moment consent is withdrawn, without a sync.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use activation_pb::create_destination_request::Target;
use madtech_activation::mock::{Forced, MockPlatform};
use madtech_common::testing::Backend;
use madtech_proto::activation::v1 as activation_pb;
use madtech_proto::consent::v1 as consent_pb;

use crate::crossing::{record, sha256_hex, sync, sync_full, try_sync};
use crate::harness::Suite;

pub(crate) const AUDIENCE: &str = "23847000000001";
pub(crate) const TOKEN: &str = "meta-test-token";

/// A suite whose retries wait milliseconds, not seconds.
async fn suite(backend: Backend) -> Suite {
    Suite::start_with(backend, |config| {
        config.activation.retry.initial_backoff = Duration::from_millis(5);
        config.activation.retry.max_backoff = Duration::from_millis(50);
        config.activation.retry.max_attempts = 4;
    })
    .await
}

/// A Meta destination for the mock, its token in a file as a Secret would be.
fn meta_target(mock: &MockPlatform, token_file: &std::path::Path) -> Target {
    std::fs::write(token_file, format!("{TOKEN}\n")).expect("token file");
    Target::Meta(activation_pb::MetaDestination {
        audience_id: AUDIENCE.into(),
        access_token: Some(activation_pb::SecretRef {
            source: Some(activation_pb::secret_ref::Source::File(
                token_file.display().to_string(),
            )),
        }),
        base_url: format!("{}/v21.0", mock.base_url()),
    })
}

/// Activates `segment_id` to a Meta destination named `name` on `mock` (its
/// token in a file of that name under `secrets`) and syncs it once: the
/// activation's id and that first run.
pub(crate) async fn synced_to_meta(
    suite: &Suite,
    segment_id: &str,
    name: &str,
    mock: &MockPlatform,
    secrets: &std::path::Path,
) -> (String, activation_pb::SyncRun) {
    let (_, activated) = suite
        .activate(segment_id, name, meta_target(mock, &secrets.join(name)))
        .await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let first = sync(&mut activation, &activated.activation_id).await;
    (activated.activation_id, first)
}

/// Meta's row for a person known by email only: `sha256(email)|`.
fn meta_row(email: &str) -> String {
    format!("{}|", sha256_hex(email))
}

fn rows(emails: &[&str]) -> BTreeSet<String> {
    emails.iter().map(|email| meta_row(email)).collect()
}

async fn meta_syncs_send_only_changes_with_retries(backend: Backend) {
    let suite = suite(backend).await;
    let mock = MockPlatform::meta(AUDIENCE, TOKEN).await;
    let secrets = tempfile::tempdir().expect("secrets");
    for email in ["a@example.com", "b@example.com", "c@example.com"] {
        suite.person(email, "US-CA", Default::default()).await;
    }
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let (destination, activated) = suite
        .activate(
            &segment.segment_id,
            "meta",
            meta_target(&mock, &secrets.path().join("token")),
        )
        .await;
    assert_eq!(destination.kind, "meta");
    let mut activation = suite.activation(suite.bearer(&["marketer"]));

    let first = sync(&mut activation, &activated.activation_id).await;
    assert_eq!((first.added, first.removed, first.to_send), (3, 0, 3));
    assert_eq!((first.batches_sent, first.batches_rejected), (1, 0));
    {
        let meta = mock.platform();
        assert!(meta.violations.is_empty(), "{:?}", meta.violations);
        assert_eq!(
            meta.audience,
            rows(&["a@example.com", "b@example.com", "c@example.com"])
        );
        let request = &meta.received[0];
        assert_eq!(
            (
                request.op,
                request.batch_seq,
                request.last_batch,
                request.rows
            ),
            ("add", 1, true, 3)
        );
    }

    // Churn: one person leaves the segment, one joins; the platform throttles
    // once and fails once on the way.
    suite
        .person("a@example.com", "US-NV", Default::default())
        .await;
    suite
        .person("d@example.com", "US-CA", Default::default())
        .await;
    mock.force(&[
        Forced::TooManyRequests {
            retry_after_secs: 0,
        },
        Forced::ServerError,
    ]);
    let second = sync(&mut activation, &activated.activation_id).await;
    assert!(
        !second.full,
        "the second sync applies the audience's changes"
    );
    assert_eq!(
        (second.members_received, second.added, second.removed),
        (2, 1, 1),
        "only the change is fetched and sent"
    );
    assert_eq!(second.retries, 2, "a 429 and a 500 are retried");
    {
        let meta = mock.platform();
        assert!(meta.violations.is_empty(), "{:?}", meta.violations);
        assert_eq!(
            meta.audience,
            rows(&["b@example.com", "c@example.com", "d@example.com"])
        );
        let ops: Vec<&str> = meta.received.iter().map(|r| r.op).collect();
        assert_eq!(ops, ["add", "remove", "add"], "removes go first");
    }

    // Each batch is on record, as a digest, for compliance.
    let mut compliance = suite.activation(suite.bearer(&["compliance"]));
    let runs = compliance
        .list_sync_runs(activation_pb::ListSyncRunsRequest {
            activation_id: activated.activation_id.clone(),
            page_size: 0,
        })
        .await
        .expect("list runs")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].run_id, second.run_id, "newest first");
    assert_eq!(runs[0].trigger, "sync");
    let audit = suite.audit_records().await;
    let exported = audit
        .iter()
        .rev()
        .find(|r| r.method.ends_with("/ExportAudience"))
        .expect("the crossing's audit record");
    assert_eq!(
        runs[0].policy_version, exported.policy_version,
        "a run names the policy version its audience crossed under"
    );
    let detail = compliance
        .get_sync_run(activation_pb::GetSyncRunRequest {
            run_id: second.run_id.clone(),
        })
        .await
        .expect("get run")
        .into_inner();
    let batches: Vec<(String, u32, u64, String)> = detail
        .batches
        .iter()
        .map(|b| (b.op.clone(), b.seq, b.members, b.outcome.clone()))
        .collect();
    assert_eq!(
        batches,
        [
            ("remove".to_string(), 1, 1, "sent".to_string()),
            ("add".to_string(), 1, 1, "sent".to_string()),
        ],
        "in the order they were sent"
    );
    assert!(detail.batches.iter().all(|b| b.digest.len() == 64));
    let text = format!("{detail:?}");
    assert!(!text.contains("@example.com") && !text.contains(TOKEN));
    suite.stop().await;
}

#[tokio::test]
async fn meta_syncs_send_only_changes_with_retries_sqlite() {
    meta_syncs_send_only_changes_with_retries(Backend::Sqlite).await;
}

#[tokio::test]
async fn meta_syncs_send_only_changes_with_retries_postgres() {
    meta_syncs_send_only_changes_with_retries(Backend::Postgres).await;
}

/// A refused batch (4xx) is not retried, is recorded, fails the run with a
/// reason the caller can act on, and its members are sent by the next sync.
#[tokio::test]
async fn refused_batches_are_recorded_and_sent_again_later() {
    let suite = suite(Backend::Sqlite).await;
    let mock = MockPlatform::meta(AUDIENCE, TOKEN).await;
    let secrets = tempfile::tempdir().expect("secrets");
    suite
        .person("a@example.com", "US-CA", Default::default())
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let token_file = secrets.path().join("token");
    let (_, activated) = suite
        .activate(&segment.segment_id, "meta", meta_target(&mock, &token_file))
        .await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));

    mock.force(&[Forced::BadRequest]);
    let (refused, status) = try_sync(&mut activation, &activated.activation_id).await;
    assert_eq!(refused.phase(), activation_pb::SyncPhase::Failed);
    assert_eq!((refused.batches_rejected, refused.added), (1, 0));
    assert_eq!(refused.retries, 0, "a 400 is final");
    let status = status.expect("the run ends with a status");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("HTTP 400"),
        "{}",
        status.message()
    );
    assert_eq!(mock.platform().requests, 1);

    let again = sync(&mut activation, &activated.activation_id).await;
    assert_eq!(again.added, 1, "the refused add is sent again");
    assert_eq!(mock.platform().audience, rows(&["a@example.com"]));

    // A credential that cannot be read fails the run, naming where it was
    // looked for and nothing else.
    std::fs::remove_file(&token_file).expect("remove token");
    suite
        .person("b@example.com", "US-CA", Default::default())
        .await;
    let (failed, status) = try_sync(&mut activation, &activated.activation_id).await;
    assert_eq!(failed.phase(), activation_pb::SyncPhase::Failed);
    let status = status.expect("status");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("token"), "{}", status.message());

    // A platform that keeps failing makes the run UNAVAILABLE after the
    // configured attempts.
    std::fs::write(&token_file, TOKEN).expect("token back");
    mock.force(&[Forced::ServerError; 4]);
    let (_, status) = try_sync(&mut activation, &activated.activation_id).await;
    assert_eq!(status.expect("status").code(), tonic::Code::Unavailable);
    suite.stop().await;
}

/// Webhooks get signed JSON in the batch size they asked for, numbered, the
/// last one flagged.
#[tokio::test]
async fn webhooks_receive_signed_batches() {
    let suite = suite(Backend::Sqlite).await;
    let mock = MockPlatform::webhook("hook-secret").await;
    let secrets = tempfile::tempdir().expect("secrets");
    let secret_file = secrets.path().join("hook");
    std::fs::write(&secret_file, "hook-secret").expect("secret");
    for i in 0..5 {
        suite
            .person(&format!("p{i}@example.com"), "US-CA", Default::default())
            .await;
    }
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let target = Target::Webhook(activation_pb::WebhookDestination {
        url: format!("{}/hook", mock.base_url()),
        signing_secret: Some(activation_pb::SecretRef {
            source: Some(activation_pb::secret_ref::Source::File(
                secret_file.display().to_string(),
            )),
        }),
        batch_size: 2,
    });
    let (_, activated) = suite.activate(&segment.segment_id, "hook", target).await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let run = sync(&mut activation, &activated.activation_id).await;
    assert_eq!((run.added, run.batches_sent), (5, 3));
    {
        let hook = mock.platform();
        assert!(hook.violations.is_empty(), "{:?}", hook.violations);
        let batches: Vec<(u64, bool, usize)> = hook
            .received
            .iter()
            .map(|r| (r.batch_seq, r.last_batch, r.rows))
            .collect();
        assert_eq!(batches, [(1, false, 2), (2, false, 2), (3, true, 1)]);
        assert_eq!(hook.audience.len(), 5);
    }
    suite.stop().await;
}

/// Destinations are checked when created: every field error names its field.
#[tokio::test]
async fn destinations_are_validated() {
    let suite = Suite::start(Backend::Sqlite).await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let env = |name: &str| {
        Some(activation_pb::SecretRef {
            source: Some(activation_pb::secret_ref::Source::Env(name.into())),
        })
    };
    let cases = [
        (
            Target::Meta(activation_pb::MetaDestination {
                audience_id: "not-digits".into(),
                access_token: env("META_TOKEN"),
                base_url: String::new(),
            }),
            "meta.audience_id",
        ),
        (
            Target::Meta(activation_pb::MetaDestination {
                audience_id: "1".into(),
                access_token: None,
                base_url: String::new(),
            }),
            "meta.access_token",
        ),
        (
            Target::Meta(activation_pb::MetaDestination {
                audience_id: "1".into(),
                access_token: env("lower-case"),
                base_url: String::new(),
            }),
            "meta.access_token.env",
        ),
        (
            Target::Meta(activation_pb::MetaDestination {
                audience_id: "1".into(),
                access_token: env("T"),
                base_url: "http://graph.example.com".into(),
            }),
            "meta.base_url",
        ),
        (
            Target::Webhook(activation_pb::WebhookDestination {
                url: "https://hooks.example/x?token=1".into(),
                signing_secret: env("HOOK"),
                batch_size: 0,
            }),
            "webhook.url",
        ),
        (
            Target::Webhook(activation_pb::WebhookDestination {
                url: "https://hooks.example/x".into(),
                signing_secret: env("HOOK"),
                batch_size: 10_001,
            }),
            "webhook.batch_size",
        ),
    ];
    for (target, field) in cases {
        let status = activation
            .create_destination(activation_pb::CreateDestinationRequest {
                name: "bad".into(),
                target: Some(target),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }

    // A registered destination reads back, credentials as references only;
    // compliance may read it, and an unknown id is NOT_FOUND.
    let id = suite.destination_of_kind("meta").await;
    let mut compliance = suite.activation(suite.bearer(&["compliance"]));
    let read = compliance
        .get_destination(activation_pb::GetDestinationRequest {
            destination_id: id.clone(),
        })
        .await
        .expect("compliance reads destinations")
        .into_inner()
        .destination
        .expect("destination");
    assert_eq!(
        (read.destination_id.as_str(), read.kind.as_str()),
        (id.as_str(), "meta")
    );
    let Some(activation_pb::destination::Target::Meta(meta)) = read.target else {
        panic!("a Meta destination: {read:?}");
    };
    assert_eq!(meta.access_token, env("UNUSED"));
    for (id, code) in [
        ("", tonic::Code::InvalidArgument),
        ("nope", tonic::Code::NotFound),
    ] {
        let status = compliance
            .get_destination(activation_pb::GetDestinationRequest {
                destination_id: id.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{id:?}: {status:?}");
    }
    suite.stop().await;
}

async fn withdrawal_removes_from_meta_without_a_sync(backend: Backend) {
    let suite = suite(backend).await;
    let mock = MockPlatform::meta(AUDIENCE, TOKEN).await;
    let secrets = tempfile::tempdir().expect("secrets");
    let mut consent = suite.consent(suite.bearer(&["admin"]));
    let ids = suite
        .consenting_people(&["x@example.com", "y@example.com"], "FR")
        .await;
    let segment = suite.region_segment("french", &["FR"]).await;
    let (activation_id, _) =
        synced_to_meta(&suite, &segment.segment_id, "meta", &mock, secrets.path()).await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    assert_eq!(
        mock.platform().audience,
        rows(&["x@example.com", "y@example.com"])
    );

    let withdrawn = Instant::now();
    record(
        &mut consent,
        &ids[0],
        consent_pb::ConsentState::Denied,
        "FR",
    )
    .await;
    let deadline = withdrawn + Duration::from_secs(15);
    loop {
        if mock.platform().received.iter().any(|r| r.op == "remove") {
            break;
        }
        assert!(Instant::now() < deadline, "no removal reached Meta");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let meta = mock.platform();
        let removal = meta
            .received
            .iter()
            .find(|r| r.op == "remove")
            .expect("removal");
        eprintln!(
            "withdrawal to removal at the platform: {:?}",
            removal.at - withdrawn
        );
        assert_eq!(meta.audience, rows(&["y@example.com"]));
        assert!(meta.violations.is_empty(), "{:?}", meta.violations);
    }

    // The removal is a run of its own, finished once Meta acknowledged it.
    let removal_run = suite
        .finished_run(&activation_id, "consent_withdrawal")
        .await;
    assert_eq!(removal_run.trigger, "consent_withdrawal");
    assert_eq!(removal_run.removed, 1);
    assert_eq!(removal_run.phase(), activation_pb::SyncPhase::Succeeded);

    // A full sync agrees: nothing left to remove or add.
    let next = sync_full(&mut activation, &activation_id).await;
    assert_eq!((next.added, next.removed, next.unchanged), (0, 0, 1));
    suite.stop().await;
}

#[tokio::test]
async fn withdrawal_removes_from_meta_without_a_sync_sqlite() {
    withdrawal_removes_from_meta_without_a_sync(Backend::Sqlite).await;
}

#[tokio::test]
async fn withdrawal_removes_from_meta_without_a_sync_postgres() {
    withdrawal_removes_from_meta_without_a_sync(Backend::Postgres).await;
}

fn secret_file(dir: &std::path::Path, name: &str, value: &str) -> Option<activation_pb::SecretRef> {
    let path = dir.join(name);
    std::fs::write(&path, value).expect("secret file");
    Some(activation_pb::SecretRef {
        source: Some(activation_pb::secret_ref::Source::File(
            path.display().to_string(),
        )),
    })
}

/// Google, The Trade Desk and LinkedIn each get the hashes they match on —
/// UID2-normalised for The Trade Desk — in their own API's shape, and a
/// person who leaves the segment is removed from all three.
async fn every_platform_gets_its_own_hashes(backend: Backend) {
    let suite = suite(backend).await;
    let secrets = tempfile::tempdir().expect("secrets");
    let google = MockPlatform::google_ads("1234567890", "555", "g-token", "g-dev").await;
    let ttd = MockPlatform::the_trade_desk("adv1", "crm9", "t-token").await;
    let linkedin = MockPlatform::linkedin("10804", "l-token").await;
    suite
        .person("Jane.Saoirse@gmail.com", "US-CA", Default::default())
        .await;
    suite
        .person("bob@example.com", "US-CA", Default::default())
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let dir = secrets.path();
    let targets = [
        Target::GoogleAds(activation_pb::GoogleAdsDestination {
            customer_id: "1234567890".into(),
            user_list_id: "555".into(),
            login_customer_id: String::new(),
            access_token: secret_file(dir, "g", "g-token"),
            developer_token: secret_file(dir, "gd", "g-dev"),
            base_url: format!("{}/v21", google.base_url()),
            oauth: None,
        }),
        Target::TheTradeDesk(activation_pb::TradeDeskDestination {
            advertiser_id: "adv1".into(),
            crm_data_id: "crm9".into(),
            auth_token: secret_file(dir, "t", "t-token"),
            base_url: format!("{}/v3", ttd.base_url()),
        }),
        Target::Linkedin(activation_pb::LinkedInDestination {
            segment_id: "10804".into(),
            access_token: secret_file(dir, "l", "l-token"),
            base_url: format!("{}/rest", linkedin.base_url()),
        }),
    ];
    let mut activations = Vec::new();
    for (i, target) in targets.into_iter().enumerate() {
        let (destination, activated) = suite
            .activate(&segment.segment_id, &format!("platform-{i}"), target)
            .await;
        activations.push((destination.kind, activated.activation_id));
    }
    let kinds: Vec<&str> = activations.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(kinds, ["google_ads", "the_trade_desk", "linkedin"]);
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    for (_, id) in &activations {
        let run = sync(&mut activation, id).await;
        assert_eq!(run.added, 2);
    }
    let jane = sha256_hex("jane.saoirse@gmail.com");
    let bob = sha256_hex("bob@example.com");
    // UID2's published vector for this address (testdata `uid2_email_gmail`).
    let jane_uid2 = "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f".to_string();
    let expected = |hashes: &[&String]| {
        hashes
            .iter()
            .map(|h| h.to_string())
            .collect::<BTreeSet<_>>()
    };
    for (mock, want) in [
        (&google, expected(&[&jane, &bob])),
        (&ttd, expected(&[&jane_uid2, &bob])),
        (&linkedin, expected(&[&jane, &bob])),
    ] {
        let platform = mock.platform();
        assert!(platform.violations.is_empty(), "{:?}", platform.violations);
        assert_eq!(platform.audience, want);
    }

    suite
        .person("bob@example.com", "US-NV", Default::default())
        .await;
    for (_, id) in &activations {
        let run = sync(&mut activation, id).await;
        assert_eq!((run.added, run.removed), (0, 1));
    }
    for (mock, want) in [
        (&google, expected(&[&jane])),
        (&ttd, expected(&[&jane_uid2])),
        (&linkedin, expected(&[&jane])),
    ] {
        let platform = mock.platform();
        assert!(platform.violations.is_empty(), "{:?}", platform.violations);
        assert_eq!(platform.audience, want);
        assert_eq!(platform.received.last().map(|r| r.op), Some("remove"));
    }
    suite.stop().await;
}

/// Google's access tokens expire within the hour: a destination may give an
/// OAuth client and refresh token instead, and the service mints access
/// tokens from them, reuses one until shortly before it expires, and stops
/// the sync when the refresh token is refused.
#[tokio::test]
async fn google_access_tokens_are_minted_from_a_refresh_token() {
    use madtech_activation::mock::OAuthClient;
    let suite = suite(Backend::Sqlite).await;
    let secrets = tempfile::tempdir().expect("secrets");
    let dir = secrets.path();
    // Renewed a minute early, a 61 s token is reused for one second.
    let client = OAuthClient {
        client_id: "client-7.apps.googleusercontent.com".into(),
        client_secret: "client-secret".into(),
        refresh_token: "1//refresh".into(),
        expires_in: Duration::from_secs(61),
    };
    let google = MockPlatform::google_ads_oauth("1234567890", "555", client.clone(), "g-dev").await;
    suite
        .person("ann@example.com", "US-CA", Default::default())
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let target = |refresh_token: &str, access_token| {
        Target::GoogleAds(activation_pb::GoogleAdsDestination {
            customer_id: "1234567890".into(),
            user_list_id: "555".into(),
            login_customer_id: String::new(),
            access_token,
            developer_token: secret_file(dir, "gd", "g-dev"),
            base_url: format!("{}/v21", google.base_url()),
            oauth: Some(activation_pb::OAuthRefresh {
                client_id: client.client_id.clone(),
                client_secret: secret_file(dir, "cs", &client.client_secret),
                refresh_token: secret_file(dir, &refresh_token.replace('/', "_"), refresh_token),
                token_url: format!("{}/token", google.base_url()),
            }),
        })
    };

    let status = suite
        .activation(suite.bearer(&["marketer"]))
        .create_destination(activation_pb::CreateDestinationRequest {
            name: "both".into(),
            target: Some(target("1//refresh", secret_file(dir, "g", "g-token"))),
        })
        .await
        .expect_err("a fixed token and an OAuth client");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("google_ads.access_token"));

    let (destination, activated) = suite
        .activate(&segment.segment_id, "google", target("1//refresh", None))
        .await;
    let Some(activation_pb::destination::Target::GoogleAds(stored)) = destination.target else {
        panic!("a Google Ads destination");
    };
    assert!(stored.access_token.is_none() && stored.oauth.is_some());
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    assert_eq!(
        sync(&mut activation, &activated.activation_id).await.added,
        1
    );
    assert_eq!(
        google.platform().tokens_issued,
        1,
        "one token for the job's three calls"
    );
    assert_eq!(google.platform().audience.len(), 1);

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    suite
        .person("ben@example.com", "US-CA", Default::default())
        .await;
    assert_eq!(
        sync(&mut activation, &activated.activation_id).await.added,
        1
    );
    assert_eq!(google.platform().tokens_issued, 2, "renewed before expiry");
    assert!(
        google.platform().violations.is_empty(),
        "{:?}",
        google.platform().violations
    );

    // A refused refresh token stops the sync, saying so without secrets.
    let (_, revoked) = suite
        .activate(&segment.segment_id, "revoked", target("1//revoked", None))
        .await;
    let (run, status) = try_sync(&mut activation, &revoked.activation_id).await;
    assert_eq!(run.phase(), activation_pb::SyncPhase::Failed);
    assert!(
        run.error.contains("refused the refresh token"),
        "{}",
        run.error
    );
    assert!(!run.error.contains("1//revoked") && !run.error.contains("client-secret"));
    assert!(status.is_some());
    suite.stop().await;
}

#[tokio::test]
async fn every_platform_gets_its_own_hashes_sqlite() {
    every_platform_gets_its_own_hashes(Backend::Sqlite).await;
}

#[tokio::test]
async fn every_platform_gets_its_own_hashes_postgres() {
    every_platform_gets_its_own_hashes(Backend::Postgres).await;
}

/// An activation with a schedule syncs on its own, and again once the
/// schedule comes round; a schedule that is not whole seconds from 1 s to a
/// year is refused.
#[tokio::test]
async fn scheduled_activations_sync_on_their_own() {
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.activation.schedule_tick = Duration::from_millis(50);
    })
    .await;
    suite
        .person("s1@example.com", "US-CA", Default::default())
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let (destination, _) = suite
        .file_activation(&segment.segment_id, "scheduled")
        .await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let request = |seconds: i64, nanos: i32| activation_pb::CreateActivationRequest {
        segment_id: segment.segment_id.clone(),
        destination_id: destination.destination_id.clone(),
        purpose: "ad_targeting".into(),
        sync_every: Some(prost_types::Duration { seconds, nanos }),
    };
    for (seconds, nanos) in [(0, 0), (1, 5), (-1, 0), (400 * 24 * 3600, 0)] {
        let status = activation
            .create_activation(request(seconds, nanos))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("sync_every"),
            "{}",
            status.message()
        );
    }
    let scheduled = activation
        .create_activation(request(1, 0))
        .await
        .expect("a scheduled activation")
        .into_inner()
        .activation
        .expect("activation");
    assert_eq!(scheduled.sync_every.map(|d| d.seconds), Some(1));
    let first = suite
        .finished_run(&scheduled.activation_id, "scheduled")
        .await;
    assert_eq!(
        (first.phase(), first.added),
        (activation_pb::SyncPhase::Succeeded, 1)
    );

    suite
        .person("s2@example.com", "US-CA", Default::default())
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let runs = activation
            .list_sync_runs(activation_pb::ListSyncRunsRequest {
                activation_id: scheduled.activation_id.clone(),
                page_size: 10,
            })
            .await
            .expect("runs")
            .into_inner()
            .runs;
        let added: u64 = runs
            .iter()
            .filter(|r| r.trigger == "scheduled")
            .map(|r| r.added)
            .sum();
        if added == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the schedule did not come round: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    suite.stop().await;
}

/// `madtech activation sync` runs a sync through the gateway with a
/// progress bar and prints the finished run; `runs` lists them.
#[tokio::test]
async fn the_cli_syncs_and_lists_runs() {
    let suite = Suite::start(Backend::Sqlite).await;
    suite
        .person("cli@example.com", "US-CA", Default::default())
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let (_, activated) = suite.file_activation(&segment.segment_id, "cli").await;
    let gateway = suite.config.activation.gateway_url.clone();
    let token = suite.token(&["marketer"]);
    let cli = |args: Vec<String>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_madtech"));
        command
            .arg("activation")
            .args(["--gateway", &gateway])
            .args(args)
            .env("MADTECH_TOKEN", &token);
        async move {
            tokio::task::spawn_blocking(move || command.output().expect("madtech runs"))
                .await
                .expect("joined")
        }
    };
    let id = activated.activation_id.clone();
    let synced = cli(vec!["sync".into(), id.clone()]).await;
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let stdout = String::from_utf8_lossy(&synced.stdout);
    let run: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a line")).expect("json");
    assert_eq!(run["phase"], "SYNC_PHASE_SUCCEEDED");
    assert_eq!(run["added"], 1);
    let listed = cli(vec!["runs".into(), id]).await;
    assert!(listed.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["run_id"], run["run_id"]);
    let missing = cli(vec!["sync".into(), "no-such-activation".into()]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("activation not found"));
    suite.stop().await;
}

/// A sync is incremental while the policy it last ran under in full is in
/// force; after a policy change, or when asked, it compares the whole
/// audience again, and a removal by consent withdrawal does not confuse
/// the changes that follow.
#[tokio::test]
async fn syncs_are_incremental_until_the_policy_changes() {
    let (suite, policies) = Suite::start_with_own_policies(|_| {}).await;
    for email in ["a@example.com", "b@example.com"] {
        suite.person(email, "US-CA", Default::default()).await;
    }
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let (_, activated) = suite
        .file_activation(&segment.segment_id, "incremental")
        .await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let id = activated.activation_id.as_str();

    let first = sync(&mut activation, id).await;
    assert!(first.full, "a first sync is full");
    assert_eq!(first.added, 2);
    suite
        .person("c@example.com", "US-CA", Default::default())
        .await;
    let second = sync(&mut activation, id).await;
    assert!(!second.full);
    assert_eq!((second.members_received, second.added), (1, 1));
    assert_eq!(second.policy_version, first.policy_version);

    // A policy change (any change to the files is a new version).
    let rbac = policies.path().join("rbac_policy.csv");
    let mut text = std::fs::read_to_string(&rbac).expect("read");
    text.push_str("# reviewed\n");
    std::fs::write(&rbac, text).expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    let third = loop {
        let run = sync(&mut activation, id).await;
        if run.policy_version != first.policy_version {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "the new policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(third.full, "a new policy version makes the sync full");
    assert_eq!(
        (
            third.members_received,
            third.added,
            third.removed,
            third.unchanged
        ),
        (3, 0, 0, 3)
    );
    suite
        .person("a@example.com", "US-NV", Default::default())
        .await;
    let fourth = sync(&mut activation, id).await;
    assert!(!fourth.full, "incremental again under the new version");
    assert_eq!((fourth.members_received, fourth.removed), (1, 1));
    let asked = sync_full(&mut activation, id).await;
    assert_eq!((asked.added, asked.removed, asked.unchanged), (0, 0, 2));
    suite.stop().await;
}

/// A destination that does not take removals holds up no other: the
/// removal it refused is owed, the consent stream goes on to the next
/// withdrawal, and the owed removal goes through once the destination
/// takes it again.
#[tokio::test]
async fn a_destination_refusing_removals_holds_up_no_other_and_is_owed_them() {
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.activation.retry.initial_backoff = Duration::from_millis(5);
        config.activation.retry.max_backoff = Duration::from_millis(50);
        config.activation.schedule_tick = Duration::from_millis(100);
    })
    .await;
    let refusing = MockPlatform::meta(AUDIENCE, TOKEN).await;
    let healthy = MockPlatform::meta(AUDIENCE, TOKEN).await;
    let secrets = tempfile::tempdir().expect("secrets");
    let mut consent = suite.consent(suite.bearer(&["admin"]));
    let ids = suite
        .consenting_people(&["x@example.com", "y@example.com"], "FR")
        .await;
    let segment = suite.region_segment("french", &["FR"]).await;
    for (name, mock) in [("refusing", &refusing), ("healthy", &healthy)] {
        synced_to_meta(&suite, &segment.segment_id, name, mock, secrets.path()).await;
        assert_eq!(
            mock.platform().audience,
            rows(&["x@example.com", "y@example.com"])
        );
    }

    refusing.force(&[Forced::BadRequest; 10_000]);
    for (i, left) in [(0, vec!["y@example.com"]), (1, vec![])] {
        record(
            &mut consent,
            &ids[i],
            consent_pb::ConsentState::Denied,
            "FR",
        )
        .await;
        audience_becomes(&healthy, &left, "the healthy destination").await;
    }
    assert_eq!(
        refusing.platform().audience,
        rows(&["x@example.com", "y@example.com"]),
        "the refusing destination still holds both"
    );

    refusing.stop_forcing();
    audience_becomes(&refusing, &[], "the owed removals").await;
    suite.stop().await;
}

/// Waits, up to 15 s, for the mock's audience to be these people's rows.
async fn audience_becomes(mock: &MockPlatform, emails: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let wanted = rows(emails);
    loop {
        let audience = mock.platform().audience.clone();
        if audience == wanted {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {audience:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When what a destination is to get of a person changes (here the policy
/// stops sending phones to Meta), the next sync removes what it held before
/// adding them as they are now: an add deletes nothing, so the phone's hash
/// would otherwise stay matchable there, and no later removal would carry it.
#[tokio::test]
async fn a_hash_the_destination_is_no_longer_to_get_is_removed_there() {
    let (suite, policies) = Suite::start_with_own_policies(|config| {
        config.activation.retry.initial_backoff = Duration::from_millis(5);
    })
    .await;
    let mock = MockPlatform::meta(AUDIENCE, TOKEN).await;
    let secrets = tempfile::tempdir().expect("secrets");
    let (email, phone) = ("p@example.com", "+14155552671");
    suite
        .person_with(
            &[("email", email), ("phone", phone)],
            "US-CA",
            Default::default(),
        )
        .await;
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let (activation_id, _) =
        synced_to_meta(&suite, &segment.segment_id, "meta", &mock, secrets.path()).await;
    let mut activation = suite.activation(suite.bearer(&["marketer"]));
    let with_phone = format!("{}|{}", sha256_hex(email), sha256_hex(&phone[1..]));
    assert_eq!(mock.platform().audience, BTreeSet::from([with_phone]));

    // Compliance stops sending phones to Meta.
    let identifiers = policies.path().join("identifiers_policy.csv");
    let text = std::fs::read_to_string(&identifiers).expect("read");
    let without_phones: String = text
        .lines()
        .filter(|line| !line.starts_with("p, meta_hashing, phone"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(text, without_phones);
    std::fs::write(&identifiers, without_phones).expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let next = sync(&mut activation, &activation_id).await;
        if next.added > 0 {
            assert!(next.full, "a new policy version syncs in full");
            break;
        }
        assert!(Instant::now() < deadline, "the new policy never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let meta = mock.platform();
        assert!(meta.violations.is_empty(), "{:?}", meta.violations);
        assert_eq!(
            meta.audience,
            rows(&[email]),
            "the row with the phone went before the row without it came"
        );
        let ops: Vec<&str> = meta.received.iter().map(|r| r.op).collect();
        assert_eq!(ops, ["add", "remove", "add"]);
    }
    suite.stop().await;
}
