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

/// `madtech serve profiles` as its own process, on `database`.
async fn start(
    database: &DatabaseConfig,
    addr: SocketAddr,
) -> (Child, ProfileServiceClient<Channel>) {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/identity.toml");
    let mut command = Command::new(env!("CARGO_BIN_EXE_madtech"));
    command
        .args(["serve", "profiles", "--listen", &addr.to_string()])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("MADTECH_PROFILES__DATABASE__URL", &database.url)
        .env("MADTECH_PROFILES__IDENTITY_RULES", &rules)
        .env("MADTECH_TELEMETRY__LOG_FORMAT", "json")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(schema) = &database.schema {
        command.env("MADTECH_PROFILES__DATABASE__SCHEMA", schema);
    }
    let child = command.spawn().expect("madtech starts");
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(channel) = Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        {
            return (child, ProfileServiceClient::new(channel));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the profiles service did not start on {addr}");
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
