//! A large audience end to end: `ExportAudience` of a million members,
//! direct from the segments service (raw members from its projection) and
//! through the gateway (consent view, casbin decisions, hashing,
//! pseudonyms, audit), with the process's peak memory before and after.
//!
//! `cargo bench --bench audience`; `MADTECH_BENCH_AUDIENCE` sets the size
//! (default 1,000,000), `MADTECH_BENCH_BACKENDS` the segments database's
//! backends (`sqlite`, the default, and `pg-socket`; the other services stay
//! on SQLite), `MADTECH_BENCH_ROUNDS` the rounds per path (default 3; a
//! 100k-member export is over in a tenth of a second, so small audiences
//! want more), `MADTECH_BENCH_CROSSING_WORKERS` the pages the gateway
//! filters at once (`gateway.crossing_workers`; default 0, one per core).
//! SQLite files on tmpfs. Results and the machine are in docs/BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

use madtech::suite::InProcess;
use madtech_proto::segments::v1 as segments_pb;
use segments_pb::segment_service_client::SegmentServiceClient;
use tonic::service::interceptor::InterceptedService;

use common::{
    LOAD_BATCH, LOAD_CONCURRENCY, bearer, channel, export_cost, export_rate, growth_during,
    load_people, median, peak_rss_mib, tmpfs_dir,
};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let audience = common::env_u64("MADTECH_BENCH_AUDIENCE", 1_000_000);
    let rounds = usize::try_from(common::env_u64("MADTECH_BENCH_ROUNDS", 3))?;
    println!("# MadTech audience benchmark: ExportAudience of {audience} members\n");
    for (backend, db, database) in common::backends("sqlite", "segments")? {
        println!("## segments on {backend}\n");
        // SQLite stays in the suite's data directory, on tmpfs.
        measure(audience, rounds, (backend != "sqlite").then_some(database)).await?;
        drop(db);
        println!();
    }
    Ok(())
}

async fn measure(
    audience: u64,
    rounds: usize,
    segments_db: Option<madtech_common::db::DatabaseConfig>,
) -> anyhow::Result<()> {
    let data = tmpfs_dir()?;
    let crossing_workers = usize::try_from(common::env_u64("MADTECH_BENCH_CROSSING_WORKERS", 0))?;
    let suite = InProcess::start(|config| {
        config.gateway.crossing_workers = crossing_workers;
        config.data_dir = data.path().to_path_buf();
        if let Some(database) = segments_db {
            config.segments.database = database;
        }
        config.gateway.policy_dir = "policies".into();
        config.consent.policy_dir = "policies".into();
        config.gateway.max_request_message_bytes = 64 << 20;
        // The projection must catch up with a million upserts before the
        // first export.
        config.segments.projection_freshness_timeout = Duration::from_secs(600);
    })
    .await?;

    // A tenth as many Nevadans: a smaller audience in the same database, to
    // show an export's memory does not grow with the audience.
    let small = (audience / 10).max(1);
    let started = Instant::now();
    load_people(&suite, 0..audience, "US-CA").await?;
    load_people(&suite, audience..audience + small, "US-NV").await?;
    println!(
        "loaded {} people (BatchUpsertProfiles of {LOAD_BATCH}, {LOAD_CONCURRENCY} in flight) in {:.0} s",
        audience + small,
        started.elapsed().as_secs_f64()
    );

    let mut segments = SegmentServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(&suite, "admin")?,
    ));
    let destination_id = common::file_destination(&suite, "bench").await?;
    let mut export_of = async |name: &str, region: &str| -> anyhow::Result<_> {
        let segment_id = common::region_segment(&mut segments, name, region).await?;
        Ok(segments_pb::ExportAudienceRequest {
            segment_id,
            destination_id: destination_id.clone(),
            destination_kind: String::new(),
            purpose: "ad_targeting".into(),
            snapshot_cursor: 0,
            current_membership: false,
        })
    };
    let request = export_of("californians", "US-CA").await?;
    let small_request = export_of("nevadans", "US-NV").await?;
    let direct = SegmentServiceClient::new(channel(suite.config.segments.listen)?)
        .max_decoding_message_size(64 << 20);
    let gateway = SegmentServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(&suite, "activation")?,
    ))
    .max_decoding_message_size(64 << 20);

    // The first export also waits for the projection to apply every upsert.
    let started = Instant::now();
    export_rate(direct.clone(), request.clone(), audience).await?;
    println!(
        "projection caught up and first direct export done in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // Memory of a direct export alone, before any crossing fills the
    // gateway's consent view: how far the resident set rises during it.
    let (mut small_growth, mut large_growth) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (rate, grew) =
            growth_during(export_rate(direct.clone(), small_request.clone(), small)).await;
        rate?;
        small_growth.push(grew);
        let (rate, grew) =
            growth_during(export_rate(direct.clone(), request.clone(), audience)).await;
        rate?;
        large_growth.push(grew);
    }
    let rss = |growth: &[common::Growth]| median(growth.iter().map(|g| g.rss).collect());
    let heap = |growth: &[common::Growth]| median(growth.iter().map(|g| g.heap).collect());
    println!(
        "growth during one direct export (median of {rounds}): resident set {:.1} MiB for {small} members, {:.1} MiB for {audience}; Rust heap {:.1} MiB and {:.1} MiB",
        rss(&small_growth),
        rss(&large_growth),
        heap(&small_growth),
        heap(&large_growth)
    );

    let before = peak_rss_mib();
    let cold = export_rate(gateway.clone(), request.clone(), audience).await?;
    let (mut d_rate, mut g_rate, mut d_cpu, mut g_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let direct = export_cost(
            audience,
            export_rate(direct.clone(), request.clone(), audience),
        )
        .await?;
        d_rate.push(direct.rate);
        d_cpu.push(direct.cpu_us_per_member);
        let crossed = export_cost(
            audience,
            export_rate(gateway.clone(), request.clone(), audience),
        )
        .await?;
        g_rate.push(crossed.rate);
        g_cpu.push(crossed.cpu_us_per_member);
    }
    let after = peak_rss_mib();
    let (d_rate, g_rate) = (median(d_rate), median(g_rate));
    let (d_cpu, g_cpu) = (median(d_cpu), median(g_cpu));
    // CPU per member times members per second: how many of the machine's
    // cores the export kept busy.
    let busy = |cpu_us: f64, rate: f64| cpu_us * rate / 1e6;
    println!("\n| path | members/s | CPU per member (whole process) | cores busy |");
    println!("|---|---|---|---|");
    println!(
        "| direct from segments (projection, unfiltered) | {d_rate:.0} | {d_cpu:.2} µs | {:.2} |",
        busy(d_cpu, d_rate)
    );
    println!("| through the gateway, consent view cold (every member looked up) | {cold:.0} | | |");
    println!(
        "| through the gateway, consent view warm | {g_rate:.0} | {g_cpu:.2} µs | {:.2} |",
        busy(g_cpu, g_rate)
    );
    println!(
        "\ngateway / direct: {:.2} warm, {:.2} cold",
        g_rate / d_rate,
        cold / d_rate
    );
    println!(
        "peak RSS of the whole suite: {before:.0} MiB after loading and one export, {after:.0} MiB after {} more exports",
        1 + 2 * rounds
    );
    suite.stop().await
}
