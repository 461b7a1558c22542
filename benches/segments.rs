//! Segments benchmarks over generated people and events:
//!
//! - a three-condition rule (trait + region + event count in a window)
//!   counted by the SQL the rule compiles to (`PreviewSegment`) vs the same
//!   question written by hand in SQL and run by the same database;
//! - the batch computation of that segment (memberships written);
//! - real-time re-evaluation: from a profile change to the membership
//!   change on the watch stream, p50/p99.
//!
//! `cargo bench --bench segments`; `MADTECH_BENCH_PEOPLE` (default 100,000),
//! `MADTECH_BENCH_EVENTS_PER_PERSON` (default 10) and
//! `MADTECH_BENCH_BACKENDS` (`sqlite,pg-socket`) for the segments database;
//! the profiles database is SQLite on tmpfs (on disk with
//! `MADTECH_BENCH_ON_DISK=1`). Results and the machine are in
//! docs/BENCHMARKS.md.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use madtech::generate::{self, Plan};
use madtech::suite::InProcess;
use madtech_common::db::DatabaseConfig;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as pb;
use madtech_segments::store::projection::Projection;
use madtech_segments::store::sql::Compiler;
use pb::segment_service_client::SegmentServiceClient;
use profiles_pb::profile_service_client::ProfileServiceClient;
use sea_orm::{ConnectionTrait, Statement};

use common::{channel, median, percentile, tmpfs_dir};

const ROUNDS: usize = 5;
/// Profile changes timed to their membership change.
const LATENCY_SAMPLES: usize = 100;
const RULE: &str =
    r#"trait.plan == "pro" and region in ["FR", "DE"] and count(event "purchase", last 30d) >= 1"#;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let people = common::env_u64("MADTECH_BENCH_PEOPLE", 100_000);
    let events = u32::try_from(common::env_u64("MADTECH_BENCH_EVENTS_PER_PERSON", 10))?;
    println!(
        "# MadTech segments benchmarks: {people} people, {} events ({ROUNDS} rounds, medians)\n",
        people * u64::from(events)
    );
    println!("Rule: `{RULE}`\n");
    for (backend, db, database) in common::backends("sqlite,pg-socket", "segments")? {
        println!("## {backend}\n");
        measure(database, people, events).await?;
        drop(db);
        println!();
    }
    Ok(())
}

async fn measure(database: DatabaseConfig, people: u64, events: u32) -> anyhow::Result<()> {
    // Tens of millions of events do not fit tmpfs: `MADTECH_BENCH_ON_DISK=1`.
    let data = if std::env::var_os("MADTECH_BENCH_ON_DISK").is_some() {
        tempfile::tempdir()?
    } else {
        tmpfs_dir()?
    };
    let segments_db = database.clone();
    let suite = InProcess::start(|config| {
        config.data_dir = data.path().to_path_buf();
        config.gateway.policy_dir = "policies".into();
        config.consent.policy_dir = "policies".into();
        config.segments.database = segments_db;
        config.segments.projection_freshness_timeout = Duration::from_secs(3600);
    })
    .await?;
    let profiles = ProfileServiceClient::new(channel(suite.config.profiles.listen)?)
        .max_decoding_message_size(64 << 20);
    let segments = SegmentServiceClient::new(channel(suite.config.segments.listen)?)
        .max_decoding_message_size(64 << 20);

    let started = Instant::now();
    let plan = Plan::new(people, events);
    generate::run(profiles.clone(), &plan, |_| {}).await?;
    println!(
        "generated through profiles in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let segment = segments
        .clone()
        .create_segment(pb::CreateSegmentRequest {
            name: "bench".into(),
            rule: None,
            rule_text: RULE.into(),
        })
        .await?
        .into_inner()
        .segment
        .ok_or_else(|| anyhow::anyhow!("no segment"))?;
    // An export waits until the projection has applied everything.
    let started = Instant::now();
    let members = drain_export(segments.clone(), &segment.segment_id).await?;
    println!(
        "projection caught up {:.0} s after the load; {members} members",
        started.elapsed().as_secs_f64()
    );

    // The SQL the rule compiles to vs the hand-written query: same process,
    // same connection, counts only.
    let db =
        madtech_common::db::connect_and_migrate::<madtech_segments::store::Migrator>(&database)
            .await?;
    let projection = Projection::new(db.clone(), Default::default());
    let rule =
        madtech_segments::rules::text::parse(RULE).map_err(|err| anyhow::anyhow!("{err:?}"))?;
    let no_other_segments = BTreeMap::new();
    let (mut compiled, mut by_hand, mut preview) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        // One "now" for both, so an event ageing out between the two
        // queries cannot make them disagree.
        let now_micros = chrono::Utc::now().timestamp_micros();
        let compiler = Compiler {
            backend: db.get_database_backend(),
            now_micros,
            segments: &no_other_segments,
        };
        let start = Instant::now();
        let count = projection.count(&rule, &compiler).await?;
        compiled.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let hand = hand_written_count(&db, now_micros).await?;
        by_hand.push(start.elapsed().as_secs_f64());
        anyhow::ensure!(count == hand, "compiled {count} vs by hand {hand}");
        // The export ran earlier: people may have aged out since.
        anyhow::ensure!(count <= members, "count {count} vs export {members}");
        let start = Instant::now();
        segments
            .clone()
            .preview_segment(pb::PreviewSegmentRequest {
                rule: None,
                rule_text: RULE.into(),
                sample_size: 10,
            })
            .await?;
        preview.push(start.elapsed().as_secs_f64());
    }
    let (c, h, p) = (median(compiled), median(by_hand), median(preview));
    println!(
        "count of the rule: compiled SQL {:.0} ms, hand-written SQL {:.0} ms, compiled/hand {:.2}; PreviewSegment over gRPC (count and a sample of 10) {:.0} ms",
        c * 1e3,
        h * 1e3,
        c / h,
        p * 1e3
    );

    let start = Instant::now();
    let mut computing = segments
        .clone()
        .compute_segment(pb::ComputeSegmentRequest {
            segment_id: segment.segment_id.clone(),
        })
        .await?
        .into_inner();
    let mut last = pb::ComputeSegmentResponse::default();
    while let Some(progress) = computing.message().await? {
        last = progress;
    }
    println!(
        "ComputeSegment (memberships written): {:.1} s, {:.0} people/s evaluated",
        start.elapsed().as_secs_f64(),
        last.total as f64 / start.elapsed().as_secs_f64()
    );

    let latencies = real_time(&suite, segments.clone(), &segment.segment_id, last.cursor).await?;
    println!(
        "real time, profile change → membership change on the watch stream ({} changes): p50 {:.0} ms, p99 {:.0} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    suite.stop().await
}

async fn drain_export(
    mut segments: SegmentServiceClient<tonic::transport::Channel>,
    segment_id: &str,
) -> anyhow::Result<u64> {
    let mut stream = segments
        .export_audience(pb::ExportAudienceRequest {
            segment_id: segment_id.into(),
            destination_id: "bench".into(),
            destination_kind: "file".into(),
            purpose: "ad_targeting".into(),
            snapshot_cursor: 0,
            current_membership: false,
        })
        .await?
        .into_inner();
    let mut members = 0;
    while let Some(chunk) = stream.message().await? {
        members += chunk.members.len() as u64;
    }
    Ok(members)
}

/// The rule's question as a person would write it against the projection.
async fn hand_written_count(
    db: &sea_orm::DatabaseConnection,
    now_micros: i64,
) -> anyhow::Result<u64> {
    let window_start = now_micros - 30 * 24 * 3600 * 1_000_000;
    let sql = format!(
        "SELECT count(*) AS n FROM people p \
         WHERE p.region IN ('FR', 'DE') \
         AND EXISTS (SELECT 1 FROM person_traits t WHERE t.profile_id = p.profile_id \
                     AND t.name = 'plan' AND t.kind = 'string' AND t.string_value = 'pro') \
         AND EXISTS (SELECT 1 FROM person_events e WHERE e.profile_id = p.profile_id \
                     AND e.name = 'purchase' AND e.occurred_at >= {window_start})"
    );
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    let n: i64 = row.try_get("", "n")?;
    Ok(u64::try_from(n)?)
}

/// Moves members out of the segment and back (region US-CA, then FR) and
/// times each change until the watch stream shows it.
async fn real_time(
    suite: &InProcess,
    segments: SegmentServiceClient<tonic::transport::Channel>,
    segment_id: &str,
    after_cursor: u64,
) -> anyhow::Result<Vec<Duration>> {
    let mut profiles = ProfileServiceClient::new(channel(suite.config.profiles.listen)?);
    let sample = segments
        .clone()
        .preview_segment(pb::PreviewSegmentRequest {
            rule: None,
            rule_text: RULE.into(),
            sample_size: (LATENCY_SAMPLES / 2) as u32,
        })
        .await?
        .into_inner()
        .sample_profile_ids;
    let mut changes = segments
        .clone()
        .watch_membership_changes(pb::WatchMembershipChangesRequest {
            segment_id: segment_id.into(),
            after_cursor,
        })
        .await?
        .into_inner();
    let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
    for profile_id in sample {
        let person = profiles
            .get_profile(profiles_pb::GetProfileRequest {
                lookup: Some(profiles_pb::get_profile_request::Lookup::ProfileId(
                    profile_id.clone(),
                )),
            })
            .await?
            .into_inner()
            .profile
            .ok_or_else(|| anyhow::anyhow!("no profile"))?;
        let region = person.region.clone();
        for (to, entered) in [("US-CA", false), (region.as_str(), true)] {
            let start = Instant::now();
            profiles
                .upsert_profile(profiles_pb::UpsertProfileRequest {
                    identifiers: person.identifiers[..1].to_vec(),
                    region: to.into(),
                    ..Default::default()
                })
                .await?;
            loop {
                let change = changes
                    .message()
                    .await?
                    .and_then(|m| m.change)
                    .ok_or_else(|| anyhow::anyhow!("the watch stream ended"))?;
                if change.profile_id == profile_id && change.entered == entered {
                    break;
                }
            }
            latencies.push(start.elapsed());
        }
    }
    latencies.sort();
    Ok(latencies)
}
