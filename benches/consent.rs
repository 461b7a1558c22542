//! Consent benchmarks: signal decodes per second per kind; RecordConsent
//! writes per second, direct and through the gateway; BatchGetConsent
//! lookups per second over a ledger of a million subjects, direct and
//! through the gateway; on SQLite (on disk, synced per commit) and on
//! PostgreSQL (over its Unix socket).
//!
//! `cargo bench --bench consent`; `MADTECH_BENCH_SUBJECTS` sets how many
//! subjects the lookup measurement loads (default 1,000,000) and
//! `MADTECH_BENCH_BACKENDS` which backends run (`sqlite,pg-socket`).
//! Results and the machine are in docs/BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

use madtech::suite::InProcess;
use madtech_common::db::{DatabaseConfig, connect_and_migrate};
use madtech_consent::ledger::Migrator;
use madtech_proto::consent::v1 as pb;
use pb::consent_service_client::ConsentServiceClient;
use rand::{Rng, SeedableRng};
use sea_orm::{ConnectionTrait, TransactionTrait};
use tonic::client::GrpcService;
use tonic::service::interceptor::InterceptedService;

use common::{bearer, channel, median};

const ROUNDS: usize = 5;
/// RecordConsent calls per round and side.
const RECORDS_PER_ROUND: usize = 2_000;
/// Calls in flight.
const CONCURRENCY: usize = 8;
/// Subjects per BatchGetConsent call (the most the service takes).
const LOOKUP_BATCH: usize = 10_000;
/// BatchGetConsent calls per round and side.
const LOOKUPS_PER_ROUND: usize = 10;
/// Rows per INSERT while loading the ledger.
const LOAD_CHUNK: u64 = 500;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let subjects = common::env_u64("MADTECH_BENCH_SUBJECTS", 1_000_000);
    println!("# MadTech consent benchmarks ({ROUNDS} rounds each, medians)\n");
    decodes();
    for (backend, db, database) in common::backends("sqlite,pg-socket", "consent")? {
        println!("## {backend}\n");
        measure(database, subjects).await?;
        drop(db);
        println!();
    }
    Ok(())
}

/// Decodes per second of one string of each kind, from the published
/// vectors in `../shared/testdata/signals.json`.
fn decodes() {
    let vectors = [
        // iabtcf-java TCStringV2Test: core, disclosed and allowed vendors.
        (
            "tcf (3 segments, vendors)",
            madtech_signals::SignalKind::Tcf,
            "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA.IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA",
        ),
        // GPP spec example 2: a TCF and a US Privacy section.
        (
            "gpp (tcfeuv2 + uspv1)",
            madtech_signals::SignalKind::Gpp,
            "DBACNY~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA~1YNN",
        ),
        // iabgpp-java UsNatTest: a usnat section with GPC.
        (
            "gpp (usnat)",
            madtech_signals::SignalKind::Gpp,
            "DBABLA~BVVVkkkkkpFY.YA",
        ),
        ("usp", madtech_signals::SignalKind::Usp, "1YNN"),
    ];
    println!("## signal decodes (one thread)\n");
    for (name, kind, input) in vectors {
        let rates: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                let started = Instant::now();
                let mut decoded = 0u64;
                while started.elapsed() < Duration::from_millis(300) {
                    for _ in 0..1_000 {
                        let signal = madtech_signals::decode(input, Some(kind));
                        decoded += u64::from(std::hint::black_box(signal).is_ok());
                    }
                }
                decoded as f64 / started.elapsed().as_secs_f64()
            })
            .collect();
        println!("- {name}: {:.0} decodes/s", median(rates));
    }
    println!();
}

async fn measure(database: DatabaseConfig, subjects: u64) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let consent_db = database.clone();
    let suite = InProcess::start(|config| {
        config.data_dir = data.path().to_path_buf();
        config.gateway.policy_dir = "policies".into();
        config.consent.policy_dir = "policies".into();
        config.consent.database = consent_db;
    })
    .await?;
    let direct = ConsentServiceClient::new(channel(suite.config.consent.listen)?);
    let ingest = ConsentServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(&suite, "ingest")?,
    ));
    let compliance = ConsentServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(&suite, "compliance")?,
    ));

    let mut via_gateway = Vec::new();
    let mut via_direct = Vec::new();
    for round in 0..ROUNDS {
        via_direct.push(record_round(direct.clone(), round * 2).await?);
        via_gateway.push(record_round(ingest.clone(), round * 2 + 1).await?);
    }
    let (g, d) = (median(via_gateway), median(via_direct));
    println!(
        "RecordConsent (2 purposes per call, {CONCURRENCY} in flight): direct {d:.0} calls/s, through the gateway {g:.0} calls/s, gateway/direct {g_d:.2}",
        g_d = g / d
    );

    let started = Instant::now();
    load(&database, subjects).await?;
    println!(
        "loaded {subjects} subjects with a choice each in {:.1} s (bulk SQL, to set up the lookups)",
        started.elapsed().as_secs_f64()
    );
    let mut via_gateway = Vec::new();
    let mut via_direct = Vec::new();
    for round in 0..ROUNDS as u64 {
        via_direct.push(lookup_round(direct.clone(), subjects, round * 2).await?);
        via_gateway.push(lookup_round(compliance.clone(), subjects, round * 2 + 1).await?);
    }
    let (g, d) = (median(via_gateway), median(via_direct));
    println!(
        "BatchGetConsent over {subjects} subjects ({LOOKUP_BATCH} per call, one purpose, random subjects): direct {d:.0} lookups/s, through the gateway {g:.0} lookups/s, gateway/direct {g_d:.2}",
        g_d = g / d
    );
    suite.stop().await
}

/// RecordConsent calls per second for one round of new people.
async fn record_round<T>(client: ConsentServiceClient<T>, round: usize) -> anyhow::Result<f64>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let requests: Vec<pb::RecordConsentRequest> = (0..RECORDS_PER_ROUND)
        .map(|i| pb::RecordConsentRequest {
            profile_id: format!("bench-{round}-{i}"),
            choices: ["ad_targeting", "analytics"]
                .into_iter()
                .map(|purpose| pb::PurposeChoice {
                    purpose: purpose.into(),
                    state: pb::ConsentState::Granted.into(),
                })
                .collect(),
            source: pb::ConsentSource::Cmp.into(),
            region: "FR".into(),
            notice_version: "v1".into(),
            ..Default::default()
        })
        .collect();
    let started = Instant::now();
    let mut calls = futures::stream::iter(requests.into_iter().map(|request| {
        let mut client = client.clone();
        async move { client.record_consent(request).await }
    }))
    .buffer_unordered(CONCURRENCY);
    while let Some(done) = calls.next().await {
        done?;
    }
    Ok(RECORDS_PER_ROUND as f64 / started.elapsed().as_secs_f64())
}

use futures::StreamExt as _;

/// Writes `subjects` people with one `ad_targeting` choice each straight
/// into the ledger's tables, as the service would have.
async fn load(database: &DatabaseConfig, subjects: u64) -> anyhow::Result<()> {
    let db = connect_and_migrate::<Migrator>(database).await?;
    let txn = db.begin().await?;
    let mut next = 0;
    while next < subjects {
        let end = (next + LOAD_CHUNK).min(subjects);
        let mut entries = String::from(
            "INSERT INTO consent_entries (profile_id, purpose, state, legal_basis, source, region, notice_version, derived_from, collected_at, recorded_at, effective) VALUES ",
        );
        let mut current = String::from(
            "INSERT INTO consent_current (profile_id, purpose, state, seq, collected_at) VALUES ",
        );
        for n in next..end {
            let sep = if n > next { "," } else { "" };
            let state = if n % 3 == 0 { "denied" } else { "granted" };
            entries.push_str(&format!(
                "{sep}('subject-{n}', 'ad_targeting', '{state}', 'consent', 'import', 'FR', 'v1', 'explicit choice', 1700000000000000, 1700000000000000, true)"
            ));
            // The bench's own rows come after the RecordConsent rounds, so a
            // made-up sequence far above them keeps them apart.
            current.push_str(&format!(
                "{sep}('subject-{n}', 'ad_targeting', '{state}', {seq}, 1700000000000000)",
                seq = 1_000_000_000 + n
            ));
        }
        txn.execute_unprepared(&entries).await?;
        txn.execute_unprepared(&current).await?;
        next = end;
    }
    txn.commit().await?;
    Ok(())
}

/// Lookups per second for one round of random subjects.
async fn lookup_round<T>(
    client: ConsentServiceClient<T>,
    subjects: u64,
    seed: u64,
) -> anyhow::Result<f64>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let requests: Vec<pb::BatchGetConsentRequest> = (0..LOOKUPS_PER_ROUND)
        .map(|_| pb::BatchGetConsentRequest {
            profile_ids: (0..LOOKUP_BATCH)
                .map(|_| format!("subject-{}", rng.random_range(0..subjects)))
                .collect(),
            purposes: vec!["ad_targeting".into()],
        })
        .collect();
    let started = Instant::now();
    let mut calls = futures::stream::iter(requests.into_iter().map(|request| {
        let mut client = client.clone();
        async move { client.batch_get_consent(request).await }
    }))
    .buffer_unordered(2);
    let mut answered = 0;
    while let Some(done) = calls.next().await {
        let subjects = done?.into_inner().subjects;
        anyhow::ensure!(
            subjects
                .iter()
                .all(|s| s.purposes.len() == 1 && s.purposes[0].state() != pb::ConsentState::Unset),
            "every loaded subject has a choice"
        );
        answered += subjects.len();
    }
    Ok(answered as f64 / started.elapsed().as_secs_f64())
}
