//! Profiles benchmarks: event ingestion through the gateway vs direct,
//! identify calls with merges, lookups by identifier at scale, and storage
//! per million events, on SQLite (on disk, synced per commit) and on
//! PostgreSQL (over its Unix socket and over TCP).
//!
//! `cargo bench --bench profiles`; `MADTECH_BENCH_PROFILES` sets how many
//! people the lookup measurement loads (default 100,000) and
//! `MADTECH_BENCH_BACKENDS` which backends run (`sqlite,pg-socket,pg-tcp`);
//! `MADTECH_BENCH_SEGMENTS_FOLLOW=0` keeps the segments service from
//! following the change stream (and writing its own copy of every event)
//! on the same two cores; `MADTECH_BENCH_SUSTAINED_SLICES` sets how many
//! slices of 100,000 events the sustained ingestion sends (default 10).
//! Results and the machine are in docs/BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

use madtech::generate::{self, Plan};
use madtech::suite::InProcess;
use madtech_common::db::DatabaseConfig;
use madtech_proto::profiles::v1 as pb;
use pb::profile_service_client::ProfileServiceClient;
use rand::{Rng, SeedableRng};
use tonic::client::GrpcService;
use tonic::service::interceptor::InterceptedService;

use common::{bearer, channel, median, percentile};

const ROUNDS: usize = 5;
/// Events per IngestEvents call, as the issue measures.
const BATCH: usize = 1_000;
/// Calls per round and side.
const BATCHES_PER_ROUND: usize = 40;
/// Calls in flight.
const CONCURRENCY: usize = 4;
/// People the events are about.
const PEOPLE: u64 = 10_000;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let lookups = common::env_u64("MADTECH_BENCH_PROFILES", 100_000);
    println!("# MadTech profiles benchmarks ({ROUNDS} rounds each, medians)\n");
    for (backend, db, database) in common::backends("sqlite,pg-socket,pg-tcp", "profiles")? {
        println!("## {backend}\n");
        measure(&backend, database, lookups).await?;
        drop(db);
        println!();
    }
    Ok(())
}

async fn measure(backend: &str, database: DatabaseConfig, lookups: u64) -> anyhow::Result<()> {
    let segments_follow = common::env_u64("MADTECH_BENCH_SEGMENTS_FOLLOW", 1) != 0;
    let data = tempfile::tempdir()?;
    let profiles_db = database.clone();
    let suite = InProcess::start(|config| {
        config.data_dir = data.path().to_path_buf();
        config.gateway.policy_dir = "policies".into();
        config.profiles.database = profiles_db;
        // Ingest batches are large; the default limits are for interactive
        // calls.
        config.gateway.max_request_message_bytes = 64 << 20;
        if !segments_follow {
            // Nothing listens there: the segments service keeps retrying
            // with backoff and never follows the change stream, as if it
            // ran on nodes of its own.
            config.segments.profiles_url = "http://127.0.0.1:9".into();
        }
    })
    .await?;
    let direct = ProfileServiceClient::new(channel(suite.config.profiles.listen)?)
        .max_decoding_message_size(64 << 20);
    let gateway = ProfileServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(&suite, "ingest")?,
    ))
    .max_decoding_message_size(64 << 20);

    // People first, then events about them.
    let started = Instant::now();
    generate::run(direct.clone(), &Plan::new(PEOPLE, 0), |_| {}).await?;
    let created = PEOPLE as f64 / started.elapsed().as_secs_f64();
    println!("bulk identify (BatchUpsertProfiles of 500, new people): {created:.0} people/s");

    let mut via_gateway = Vec::new();
    let mut via_direct = Vec::new();
    let mut next_message = 0u64;
    for _ in 0..ROUNDS {
        via_direct.push(ingest_round(direct.clone(), &mut next_message, BATCHES_PER_ROUND).await?);
        via_gateway
            .push(ingest_round(gateway.clone(), &mut next_message, BATCHES_PER_ROUND).await?);
    }
    let (g, d) = (median(via_gateway), median(via_direct));
    println!(
        "events ingested (batches of {BATCH}, {CONCURRENCY} in flight): direct {d:.0}/s, through the gateway {g:.0}/s, gateway/direct {:.2} (gateway cost {:.1}%)",
        g / d,
        (1.0 - g / d) * 100.0
    );

    let merges = identify_with_merges(gateway.clone()).await?;
    println!(
        "identify through the gateway (UpsertProfile, {CONCURRENCY} in flight, 1 in 4 merges two people): {:.0} calls/s",
        merges
    );

    // Sustained: the rounds above last about a second each; this keeps the
    // gateway path busy for slices of 100,000 events, through WAL
    // checkpoints and a growing table. After the identify calls, which
    // would otherwise share the cores with the segments service still
    // catching up with a million events.
    let sustained_slices = common::env_u64("MADTECH_BENCH_SUSTAINED_SLICES", 10) as usize;
    let mut slices = Vec::new();
    for _ in 0..sustained_slices {
        slices.push(ingest_round(gateway.clone(), &mut next_message, 100).await?);
    }
    if !slices.is_empty() {
        let overall = slices.len() as f64 / slices.iter().map(|rate| 1.0 / rate).sum::<f64>();
        let slowest = slices.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "sustained through the gateway ({sustained_slices} slices of 100,000 events): {overall:.0} events/s overall, slices: median {:.0}/s, slowest {slowest:.0}/s",
            median(slices.clone())
        );
    }
    let events = next_message;

    match backend {
        "sqlite" => {
            let path = database
                .url
                .trim_start_matches("sqlite://")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string();
            // What the WAL holds is copied back first: it is the same data
            // and would otherwise count twice (the WAL grows to ~40 MiB
            // between checkpoints).
            let conn = sea_orm::Database::connect(database.url.as_str()).await?;
            sea_orm::ConnectionTrait::execute_unprepared(&conn, "PRAGMA wal_checkpoint(TRUNCATE)")
                .await?;
            conn.close().await?;
            let size = ["", "-wal"]
                .iter()
                .filter_map(|suffix| std::fs::metadata(format!("{path}{suffix}")).ok())
                .map(|m| m.len())
                .sum::<u64>();
            println!(
                "database size: {:.0} MiB for {events} events and {PEOPLE} people, {:.0} MiB per million events",
                size as f64 / (1 << 20) as f64,
                size as f64 / (1 << 20) as f64 / events as f64 * 1e6
            );
        }
        _ => {
            let size = postgres_events_size(&database).await?;
            println!(
                "events table with its indexes: {:.0} MiB for {events} events, {:.0} MiB per million events",
                size as f64 / (1 << 20) as f64,
                size as f64 / (1 << 20) as f64 / events as f64 * 1e6
            );
        }
    }

    if lookups > PEOPLE {
        let started = Instant::now();
        let mut plan = Plan::new(lookups, 0);
        plan.seed = 7;
        let mut last_report = Instant::now();
        generate::run(direct.clone(), &plan, |p| {
            if last_report.elapsed() > Duration::from_secs(30) {
                eprintln!("  loading people: {}/{lookups}", p.profiles);
                last_report = Instant::now();
            }
        })
        .await?;
        println!(
            "loaded {lookups} more people in {:.0} s ({:.0} people/s)",
            started.elapsed().as_secs_f64(),
            lookups as f64 / started.elapsed().as_secs_f64()
        );
        let (rate, p50, p99) = lookup_load(direct.clone(), lookups).await?;
        println!(
            "GetProfile by email among {lookups} people, direct, 16 in flight: {rate:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        let (rate, p50, p99) = lookup_load(gateway.clone(), lookups).await?;
        println!(
            "GetProfile by email among {lookups} people, through the gateway: {rate:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    suite.stop().await
}

/// `batches` IngestEvents calls, `CONCURRENCY` in flight; events per
/// second.
async fn ingest_round<T>(
    client: ProfileServiceClient<T>,
    next_message: &mut u64,
    batches: usize,
) -> anyhow::Result<f64>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let plan = Plan::new(PEOPLE, 0);
    let first = *next_message;
    let expected = (batches * BATCH) as u64;
    *next_message += expected;
    // Built before the clock starts: the round measures the service.
    let batches: Vec<pb::IngestEventsRequest> = (0..batches)
        .map(|b| pb::IngestEventsRequest {
            events: (0..BATCH)
                .map(|e| {
                    let n = first + (b * BATCH + e) as u64;
                    let mut event = generate::event(&plan, n % PEOPLE, (n / PEOPLE) as u32);
                    event.message_id = format!("bench-{n}");
                    event
                })
                .collect(),
        })
        .collect();
    let started = Instant::now();
    let mut calls = futures::stream::iter(batches.into_iter().map(|batch| {
        let mut client = client.clone();
        async move { client.ingest_events(batch).await }
    }))
    .buffer_unordered(CONCURRENCY);
    let mut accepted = 0;
    while let Some(done) = futures::StreamExt::next(&mut calls).await {
        accepted += done?.into_inner().accepted;
    }
    anyhow::ensure!(accepted == expected, "accepted {accepted}");
    Ok(accepted as f64 / started.elapsed().as_secs_f64())
}

use futures::StreamExt as _;

/// UpsertProfile calls/s where every fourth call links two existing people.
async fn identify_with_merges<T>(client: ProfileServiceClient<T>) -> anyhow::Result<f64>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    const CALLS: usize = 2_000;
    let id = |kind: &str, value: String| pb::Identifier {
        kind: kind.into(),
        value,
    };
    let requests: Vec<pb::UpsertProfileRequest> = (0..CALLS)
        .map(|i| {
            let identifiers = if i % 4 == 3 {
                // Links the cookie-only person of call i-1 to the customer
                // of call i-2: a merge.
                vec![
                    id("customer_id", format!("merge-{}", i - 2)),
                    id("cookie_id", format!("merge-ck-{}", i - 1)),
                ]
            } else if i % 4 == 2 {
                vec![id("cookie_id", format!("merge-ck-{i}"))]
            } else {
                vec![
                    id("customer_id", format!("merge-{i}")),
                    id("email", format!("merge{i}@example.com")),
                ]
            };
            pb::UpsertProfileRequest {
                identifiers,
                region: "FR".into(),
                ..Default::default()
            }
        })
        .collect();
    let started = Instant::now();
    let mut calls = futures::stream::iter(requests.into_iter().map(|request| {
        let mut client = client.clone();
        async move { client.upsert_profile(request).await }
    }))
    .buffered(CONCURRENCY);
    while let Some(done) = calls.next().await {
        done?;
    }
    Ok(CALLS as f64 / started.elapsed().as_secs_f64())
}

/// GetProfile by a random generated person's email for 10 s, 16 in flight.
async fn lookup_load<T>(
    client: ProfileServiceClient<T>,
    people: u64,
) -> anyhow::Result<(f64, Duration, Duration)>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Future: Send,
{
    let now = chrono::Utc::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let i = rng.random_range(0..people);
                let email = generate::person(7, i, now)
                    .identifiers
                    .into_iter()
                    .find(|id| id.kind == "email")
                    .expect("every generated person has an email");
                let sent = Instant::now();
                client
                    .get_profile(pb::GetProfileRequest {
                        lookup: Some(pb::get_profile_request::Lookup::Identifier(email)),
                    })
                    .await?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    Ok((
        rate,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    ))
}

async fn postgres_events_size(database: &DatabaseConfig) -> anyhow::Result<u64> {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(database.url.as_str()).await?;
    let schema = database.schema.clone().unwrap_or_else(|| "public".into());
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT pg_total_relation_size('\"{schema}\".events')::bigint AS size"),
        ))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no size"))?;
    let size: i64 = row.try_get("", "size")?;
    Ok(size as u64)
}
