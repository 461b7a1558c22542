//! Nothing acknowledged is lost: the profiles service is killed (SIGKILL)
//! in the middle of a bulk ingest; after a restart every acknowledged event
//! is there once, and resending everything duplicates nothing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use madtech_common::db::DatabaseConfig;
use madtech_common::testing::{Backend, TestDatabase};
use madtech_proto::profiles::v1 as pb;
use pb::profile_service_client::ProfileServiceClient;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

const PEOPLE: u64 = 20;
const BATCH: usize = 500;
const BATCHES: usize = 60;

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// `madtech serve <component>` as its own process, configured by `env`
/// (`MADTECH_<COMPONENT>__…` overrides) and reachable on `addr`.
async fn spawn(component: &str, addr: SocketAddr, env: &[(String, String)]) -> (Child, Channel) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_madtech"));
    command
        .args(["serve", component, "--listen", &addr.to_string()])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("MADTECH_TELEMETRY__LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = command.spawn().expect("madtech starts");
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(channel) = Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        {
            return (child, channel);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("madtech serve {component} did not start on {addr}");
}

/// The environment that points a component at `database`.
fn database_env(component: &str, database: &DatabaseConfig) -> Vec<(String, String)> {
    let prefix = format!("MADTECH_{}__DATABASE__", component.to_uppercase());
    let mut env = vec![(format!("{prefix}URL"), database.url.clone())];
    if let Some(schema) = &database.schema {
        env.push((format!("{prefix}SCHEMA"), schema.clone()));
    }
    env
}

/// `madtech serve profiles` as its own process, on `database`.
async fn start(
    database: &DatabaseConfig,
    addr: SocketAddr,
) -> (Child, ProfileServiceClient<Channel>) {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/identity.toml");
    let mut env = database_env("profiles", database);
    env.push((
        "MADTECH_PROFILES__IDENTITY_RULES".into(),
        rules.display().to_string(),
    ));
    let (child, channel) = spawn("profiles", addr, &env).await;
    (child, ProfileServiceClient::new(channel))
}

fn customer(i: u64) -> pb::Identifier {
    pb::Identifier {
        kind: "customer_id".into(),
        value: format!("crash-{i}"),
    }
}

fn batch(b: usize) -> pb::IngestEventsRequest {
    pb::IngestEventsRequest {
        events: (0..BATCH)
            .map(|e| pb::Event {
                message_id: format!("crash-{b}-{e}"),
                name: "page_view".into(),
                identifiers: vec![customer((b * BATCH + e) as u64 % PEOPLE)],
                ..Default::default()
            })
            .collect(),
    }
}

/// Every stored event's message id, read back through the access export.
async fn stored_ids(client: &mut ProfileServiceClient<Channel>) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..PEOPLE {
        let export = client
            .export_profile(pb::ExportProfileRequest {
                lookup: Some(pb::export_profile_request::Lookup::Identifier(customer(i))),
            })
            .await
            .expect("export")
            .into_inner();
        let json: serde_json::Value = serde_json::from_slice(&export.json).expect("json");
        for event in json["events"].as_array().expect("events") {
            ids.push(event["message_id"].as_str().expect("id").to_string());
        }
    }
    ids
}

async fn acknowledged_events_survive_sigkill(backend: Backend) {
    let db = TestDatabase::new(backend);
    let database = db.sibling("profiles");
    let addr = free_port();
    let (mut child, mut client) = start(&database, addr).await;
    client
        .batch_upsert_profiles(pb::BatchUpsertProfilesRequest {
            upserts: (0..PEOPLE)
                .map(|i| pb::UpsertProfileRequest {
                    identifiers: vec![customer(i)],
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("people");

    // Two writers keep batches in flight; the process dies under them.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..2 {
        let mut client = client.clone();
        let acked = std::sync::Arc::clone(&acked);
        writers.push(tokio::spawn(async move {
            for b in (w..BATCHES).step_by(2) {
                match client.ingest_events(batch(b)).await {
                    Ok(_) => {
                        acked.lock().expect("lock").insert(b);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    loop {
        let count = acked.lock().expect("lock").len();
        if count >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("dead");
    for writer in writers {
        writer.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() < BATCHES, "the kill landed mid-ingest");

    let (_child, mut client) = start(&database, addr).await;
    let stored = stored_ids(&mut client).await;
    let unique: BTreeSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "no event is stored twice");
    for b in &acked {
        for e in 0..BATCH {
            assert!(
                unique.contains(&format!("crash-{b}-{e}")),
                "acknowledged event crash-{b}-{e} was lost"
            );
        }
    }
    // Batches are atomic: whatever survived of an unacknowledged batch
    // survived whole.
    assert_eq!(stored.len() % BATCH, 0);

    // The sender retries everything; nothing doubles.
    let mut duplicates = 0;
    for b in 0..BATCHES {
        duplicates += client
            .ingest_events(batch(b))
            .await
            .expect("resend")
            .into_inner()
            .duplicates;
    }
    assert_eq!(duplicates as usize, stored.len());
    assert_eq!(stored_ids(&mut client).await.len(), BATCHES * BATCH);
}

#[tokio::test]
async fn sqlite_acknowledged_events_survive_sigkill() {
    acknowledged_events_survive_sigkill(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_acknowledged_events_survive_sigkill() {
    acknowledged_events_survive_sigkill(Backend::Postgres).await;
}

/// An activation replica killed (SIGKILL) in the middle of a sync, then
/// started again: the batch in flight is delivered again under the same
/// idempotency key, the rest by a new run, and every member reaches the
/// destination under exactly one key: nothing lost, nothing duplicated.
async fn a_sync_killed_midway_neither_loses_nor_duplicates(backend: Backend) {
    use activation_pb::activation_service_client::ActivationServiceClient;
    use madtech_activation::mock::MockPlatform;
    use madtech_proto::activation::v1 as activation_pb;

    const MEMBERS: usize = 12;
    let suite = crate::harness::Suite::start(backend).await;
    for i in 0..MEMBERS {
        suite
            .person(
                &format!("kill{i:02}@example.com"),
                "US-CA",
                Default::default(),
            )
            .await;
    }
    let segment = suite.region_segment("californians", &["US-CA"]).await;
    let hook = MockPlatform::webhook("kill-secret").await;
    hook.slow_down(Duration::from_millis(250));
    let files = tempfile::tempdir().expect("dir");
    let secret = files.path().join("hook-secret");
    std::fs::write(&secret, "kill-secret").expect("secret");

    // A second replica of the activation service, on the suite's activation
    // database (as replicas share one in production), reaching audiences
    // through the suite's gateway with the suite's activation token. The
    // gateway reads destinations from the suite's replica, which sees what
    // this one registers.
    let mut env = database_env("activation", &suite.config.activation.database);
    let config = &suite.config.activation;
    env.extend([
        (
            "MADTECH_ACTIVATION__GATEWAY_URL".into(),
            config.gateway_url.clone(),
        ),
        (
            "MADTECH_ACTIVATION__GATEWAY_TOKEN_FILE".into(),
            config.gateway_token_file.display().to_string(),
        ),
        (
            "MADTECH_ACTIVATION__FILE_ROOT".into(),
            files.path().display().to_string(),
        ),
    ]);
    let addr = free_port();
    let (mut child, channel) = spawn("activation", addr, &env).await;
    let mut activation = ActivationServiceClient::new(channel);
    let destination = activation
        .create_destination(activation_pb::CreateDestinationRequest {
            name: "hook".into(),
            target: Some(activation_pb::create_destination_request::Target::Webhook(
                activation_pb::WebhookDestination {
                    url: format!("{}/hook", hook.base_url()),
                    signing_secret: Some(activation_pb::SecretRef {
                        source: Some(activation_pb::secret_ref::Source::File(
                            secret.display().to_string(),
                        )),
                    }),
                    batch_size: 2,
                },
            )),
        })
        .await
        .expect("destination")
        .into_inner()
        .destination
        .expect("destination");
    let activated = activation
        .create_activation(activation_pb::CreateActivationRequest {
            segment_id: segment.segment_id.clone(),
            destination_id: destination.destination_id,
            purpose: "ad_targeting".into(),
            sync_every: None,
        })
        .await
        .expect("activation")
        .into_inner()
        .activation
        .expect("activation");
    let sync = activation_pb::RunSyncRequest {
        activation_id: activated.activation_id.clone(),
        full: false,
    };
    let mut first = activation
        .run_sync(sync.clone())
        .await
        .expect("sync")
        .into_inner();
    let progress = tokio::spawn(async move { while let Ok(Some(_)) = first.message().await {} });

    // Killed while the third batch waits at the destination: it is in
    // flight, and whether it arrived is unknown to the service.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while hook.platform().requests < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sync never got going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("dead");
    progress.await.expect("progress reader");
    let delivered_before = hook.platform().batches_by_key.len();
    assert!(
        delivered_before < MEMBERS / 2,
        "the kill landed mid-sync ({delivered_before} batches)"
    );

    let (_child, channel) = spawn("activation", addr, &env).await;
    let mut activation = ActivationServiceClient::new(channel);
    let mut second = activation.run_sync(sync).await.expect("sync").into_inner();
    let mut last = None;
    while let Some(message) = second.message().await.expect("progress") {
        last = message.run;
    }
    let second = last.expect("final state");
    assert_eq!(
        second.phase(),
        activation_pb::SyncPhase::Succeeded,
        "{}",
        second.error
    );

    {
        let platform = hook.platform();
        assert!(platform.violations.is_empty(), "{:?}", platform.violations);
        let mut sent: Vec<&String> = platform.batches_by_key.values().flatten().collect();
        sent.sort();
        let unique: BTreeSet<&&String> = sent.iter().collect();
        assert_eq!(
            unique.len(),
            sent.len(),
            "a member was added under two keys"
        );
        assert_eq!(sent.len(), MEMBERS, "every member reached the destination");
        assert_eq!(platform.audience.len(), MEMBERS);
    }
    let runs = activation
        .list_sync_runs(activation_pb::ListSyncRunsRequest {
            activation_id: activated.activation_id,
            page_size: 10,
        })
        .await
        .expect("runs")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].phase(), activation_pb::SyncPhase::Failed);
    assert!(
        runs[1].error.starts_with("interrupted"),
        "{}",
        runs[1].error
    );
    assert_eq!(runs[0].added + runs[1].added, MEMBERS as u64, "{runs:#?}");
    suite.stop().await;
}

#[tokio::test]
async fn sqlite_a_sync_killed_midway_neither_loses_nor_duplicates() {
    a_sync_killed_midway_neither_loses_nor_duplicates(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_a_sync_killed_midway_neither_loses_nor_duplicates() {
    a_sync_killed_midway_neither_loses_nor_duplicates(Backend::Postgres).await;
}
