//! A large audience end to end: `ExportAudience` of a million members,
//! direct from the segments service (raw members from its projection) and
//! through the gateway (consent view, casbin decisions, hashing,
//! pseudonyms, audit), with the process's peak memory before and after.
//!
//! `cargo bench --bench audience`; `MADTECH_BENCH_AUDIENCE` sets the size
//! (default 1,000,000). SQLite files on tmpfs. Results and the machine are
//! in docs/BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

use madtech::suite::InProcess;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as segments_pb;
use profiles_pb::profile_service_client::ProfileServiceClient;
use segments_pb::segment_service_client::SegmentServiceClient;
use tonic::service::interceptor::InterceptedService;

use common::{bearer, channel, export_rate, median, peak_rss_mib, tmpfs_dir};

const ROUNDS: usize = 3;
/// People per BatchUpsertProfiles call.
const BATCH: u64 = 500;
/// Calls in flight while loading.
const CONCURRENCY: usize = 4;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let audience: u64 = std::env::var("MADTECH_BENCH_AUDIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let data = tmpfs_dir()?;
    let suite = InProcess::start(|config| {
        config.data_dir = data.path().to_path_buf();
        config.gateway.policy_dir = "policies".into();
        config.consent.policy_dir = "policies".into();
        config.gateway.max_request_message_bytes = 64 << 20;
        // The projection must catch up with a million upserts before the
        // first export.
        config.segments.projection_freshness_timeout = Duration::from_secs(600);
    })
    .await?;
    println!("# MadTech audience benchmark: ExportAudience of {audience} members\n");

    let started = Instant::now();
    load(&suite, audience).await?;
    println!(
        "loaded {audience} people (BatchUpsertProfiles of {BATCH}, {CONCURRENCY} in flight) in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let admin = bearer(&suite, "admin")?;
    let segment_id =
        SegmentServiceClient::new(InterceptedService::new(suite.gateway_channel()?, admin))
            .create_segment(segments_pb::CreateSegmentRequest {
                rule_text: r#"region in ["US-CA"]"#.into(),
                name: "californians".into(),
                rule: None,
            })
            .await?
            .into_inner()
            .segment
            .map(|s| s.segment_id)
            .unwrap_or_default();
    let request = segments_pb::ExportAudienceRequest {
        segment_id,
        destination_id: "bench".into(),
        destination_kind: "file".into(),
        purpose: "ad_targeting".into(),
        snapshot_cursor: 0,
    };
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
    let before = peak_rss_mib();
    let cold = export_rate(gateway.clone(), request.clone(), audience).await?;
    let (mut d_rate, mut g_rate) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d_rate.push(export_rate(direct.clone(), request.clone(), audience).await?);
        g_rate.push(export_rate(gateway.clone(), request.clone(), audience).await?);
    }
    let after = peak_rss_mib();
    let (d_rate, g_rate) = (median(d_rate), median(g_rate));
    println!("\n| path | members/s |");
    println!("|---|---|");
    println!("| direct from segments (projection, unfiltered) | {d_rate:.0} |");
    println!("| through the gateway, consent view cold (every member looked up) | {cold:.0} |");
    println!("| through the gateway, consent view warm | {g_rate:.0} |");
    println!(
        "\ngateway / direct: {:.2} warm, {:.2} cold",
        g_rate / d_rate,
        cold / d_rate
    );
    println!(
        "peak RSS of the whole suite: {before:.0} MiB after loading and one export, {after:.0} MiB after {} more exports",
        1 + 2 * ROUNDS
    );
    suite.stop().await
}

async fn load(suite: &InProcess, audience: u64) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = ProfileServiceClient::new(channel(suite.config.profiles.listen)?)
        .max_decoding_message_size(64 << 20);
    let batches = (0..audience.div_ceil(BATCH)).map(|b| {
        let mut client = client.clone();
        async move {
            let upserts = (b * BATCH..((b + 1) * BATCH).min(audience))
                .map(|i| profiles_pb::UpsertProfileRequest {
                    identifiers: vec![profiles_pb::Identifier {
                        kind: "email".into(),
                        value: format!("member{i}@example.com"),
                    }],
                    region: "US-CA".into(),
                    ..Default::default()
                })
                .collect();
            client
                .batch_upsert_profiles(profiles_pb::BatchUpsertProfilesRequest { upserts })
                .await
        }
    });
    let mut calls = futures::stream::iter(batches).buffer_unordered(CONCURRENCY);
    while let Some(done) = calls.next().await {
        done?;
    }
    Ok(())
}
