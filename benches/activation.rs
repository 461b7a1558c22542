//! Activation at scale, end to end through the gateway: a first sync of a
//! large audience to a Meta-shaped mock (fetch through the crossing, plan in
//! the database, batches of 10,000), then a 1 %-churn incremental sync and
//! the same churn (moved back) synced in full, for the ratio; the
//! memory growth during a sync of a tenth of the audience and of the whole
//! (the timed syncs run in an activation replica of its own process, whose
//! resident set is sampled); how much of the sync hashing accounts for (the
//! crossing's SHA-256 of each email and HMAC-SHA256 pseudonym, timed alone
//! on this machine); and the delay from `RecordConsent(denied)` to the
//! removal reaching the platform, one withdrawal at a time.
//!
//! `cargo bench --bench activation`; `MADTECH_BENCH_AUDIENCE` sets the size
//! (default 1,000,000), `MADTECH_BENCH_WITHDRAWALS` the delay samples
//! (default 100), `MADTECH_BENCH_ACTIVATION_CONNECTIONS` the activation
//! database's pool (default 8), `MADTECH_BENCH_SEGMENTS_CONNECTIONS` the
//! segments database's (default: the service's),
//! `MADTECH_BENCH_SQLITE_CACHE_KIB` every SQLite database's page cache per
//! connection (default 32 MiB), `MADTECH_BENCH_CONSENT_VIEW_CAPACITY` the
//! gateway's consent view (default: room for everyone loaded). SQLite files
//! on tmpfs; the mock platform runs in the benchmark's process and keeps no
//! audience. Results and the machine are in docs/BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

use activation_pb::activation_service_client::ActivationServiceClient;
use madtech::suite::InProcess;
use madtech_activation::mock::MockPlatform;
use madtech_proto::activation::v1 as activation_pb;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as segments_pb;
use tonic::service::interceptor::InterceptedService;

use common::{Bearer, bearer, channel, growth_of_during, load_people, percentile, tmpfs_dir};

const AUDIENCE_ID: &str = "23847000000001";
const TOKEN: &str = "bench-token";

type Activations = ActivationServiceClient<InterceptedService<tonic::transport::Channel, Bearer>>;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

/// A finished sync: its final state, how long it took, and how long until
/// it started sending (fetch and plan).
struct Timed {
    run: activation_pb::SyncRun,
    elapsed: Duration,
    until_sending: Duration,
}

async fn sync(activations: &mut Activations, activation_id: &str) -> anyhow::Result<Timed> {
    sync_as(activations, activation_id, false).await
}

/// A sync; `full` makes it export and compare the whole audience even when
/// the changes since the last sync would do.
async fn sync_as(
    activations: &mut Activations,
    activation_id: &str,
    full: bool,
) -> anyhow::Result<Timed> {
    let started = Instant::now();
    let mut stream = activations
        .run_sync(activation_pb::RunSyncRequest {
            activation_id: activation_id.into(),
            full,
        })
        .await?
        .into_inner();
    let (mut last, mut until_sending) = (None, None);
    while let Some(message) = stream.message().await? {
        let run = message.run.unwrap_or_default();
        if run.phase() != activation_pb::SyncPhase::Fetching && until_sending.is_none() {
            until_sending = Some(started.elapsed());
        }
        last = Some(run);
    }
    let run = last.ok_or_else(|| anyhow::anyhow!("no final state"))?;
    anyhow::ensure!(
        run.phase() == activation_pb::SyncPhase::Succeeded,
        "sync failed: {}",
        run.error
    );
    let elapsed = started.elapsed();
    Ok(Timed {
        run,
        elapsed,
        until_sending: until_sending.unwrap_or(elapsed),
    })
}

/// A second activation replica: `madtech serve activation` as its own
/// process on the suite's activation database, reaching audiences through
/// the suite's gateway with the suite's activation token (as replicas share
/// one database in production). Killed when dropped.
async fn spawn_replica(suite: &InProcess) -> anyhow::Result<(tokio::process::Child, Activations)> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = &suite.config.activation;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_madtech"));
    command
        .args(["serve", "activation", "--listen", &addr.to_string()])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("MADTECH_ACTIVATION__DATABASE__URL", &config.database.url)
        .env(
            "MADTECH_ACTIVATION__DATABASE__MAX_CONNECTIONS",
            config.database.max_connections.to_string(),
        )
        .env(
            "MADTECH_ACTIVATION__DATABASE__SQLITE_CACHE_KIB",
            config.database.sqlite_cache_kib.to_string(),
        )
        .env("MADTECH_ACTIVATION__GATEWAY_URL", &config.gateway_url)
        .env(
            "MADTECH_ACTIVATION__GATEWAY_TOKEN_FILE",
            &config.gateway_token_file,
        )
        .env("MADTECH_ACTIVATION__FILE_ROOT", &config.file_root)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    // The benchmark's own knobs share the configuration's prefix, which
    // refuses unknown keys.
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("MADTECH_BENCH_")) {
        command.env_remove(name);
    }
    let child = command.spawn()?;
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await
        {
            let client = ActivationServiceClient::new(InterceptedService::new(
                channel,
                bearer(suite, "marketer")?,
            ));
            return Ok((child, client));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the activation replica did not start on {addr}")
}

async fn run() -> anyhow::Result<()> {
    let audience = common::env_u64("MADTECH_BENCH_AUDIENCE", 1_000_000);
    let withdrawals = common::env_u64("MADTECH_BENCH_WITHDRAWALS", 100) as usize;
    let small = (audience / 10).max(1);
    let data = tmpfs_dir()?;
    let suite = InProcess::start(|config| {
        config.data_dir = data.path().to_path_buf();
        config.gateway.policy_dir = "policies".into();
        config.consent.policy_dir = "policies".into();
        config.segments.projection_freshness_timeout = Duration::from_secs(600);
        config.activation.database.max_connections =
            common::env_u64("MADTECH_BENCH_ACTIVATION_CONNECTIONS", 8) as u32;
        let cache_kib = common::env_u64(
            "MADTECH_BENCH_SQLITE_CACHE_KIB",
            u64::from(config.activation.database.sqlite_cache_kib),
        ) as u32;
        for database in [
            &mut config.profiles.database,
            &mut config.consent.database,
            &mut config.segments.database,
            &mut config.activation.database,
            &mut config.gateway.audit_database,
        ] {
            database.sqlite_cache_kib = cache_kib;
        }
        config.segments.database.max_connections = common::env_u64(
            "MADTECH_BENCH_SEGMENTS_CONNECTIONS",
            u64::from(config.segments.database.max_connections),
        ) as u32;
        // Room for everyone, so the view never starts over during a timed
        // sync: its refill would be measured as the sync's memory.
        config.gateway.consent_view.capacity = common::env_u64(
            "MADTECH_BENCH_CONSENT_VIEW_CAPACITY",
            (2 * (audience + small)).max(config.gateway.consent_view.capacity as u64),
        ) as usize;
    })
    .await?;
    println!("# MadTech activation benchmark: {audience} members to a Meta-shaped mock\n");

    let started = Instant::now();
    load_people(&suite, 0..audience, "US-CA").await?;
    // Virginians: opt-out of targeted advertising, so without a choice
    // recorded they cross, as Californians do.
    load_people(&suite, audience..audience + small, "US-VA").await?;
    println!(
        "loaded {} people in {:.0} s",
        audience + small,
        started.elapsed().as_secs_f64()
    );

    let meta = MockPlatform::meta(AUDIENCE_ID, TOKEN).await;
    meta.forget_audience();
    let token_file = data.path().join("meta-token");
    std::fs::write(&token_file, TOKEN)?;
    let mut segments = segments_pb::segment_service_client::SegmentServiceClient::new(
        InterceptedService::new(suite.gateway_channel()?, bearer(&suite, "admin")?),
    );
    let mut activations = ActivationServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(&suite, "marketer")?,
    ));
    let mut setup = activations.clone();
    let mut activate = async |name: &str, region: &str| -> anyhow::Result<String> {
        let segment_id = common::region_segment(&mut segments, name, region).await?;
        let destination_id = setup
            .create_destination(activation_pb::CreateDestinationRequest {
                name: name.into(),
                target: Some(activation_pb::create_destination_request::Target::Meta(
                    activation_pb::MetaDestination {
                        audience_id: AUDIENCE_ID.into(),
                        access_token: Some(activation_pb::SecretRef {
                            source: Some(activation_pb::secret_ref::Source::File(
                                token_file.display().to_string(),
                            )),
                        }),
                        base_url: format!("{}/v21.0", meta.base_url()),
                    },
                )),
            })
            .await?
            .into_inner()
            .destination
            .map(|d| d.destination_id)
            .unwrap_or_default();
        Ok(setup
            .create_activation(activation_pb::CreateActivationRequest {
                segment_id,
                destination_id,
                purpose: "ad_targeting".into(),
                sync_every: None,
            })
            .await?
            .into_inner()
            .activation
            .map(|a| a.activation_id)
            .unwrap_or_default())
    };
    // Untimed warm-up syncs: the first waits for the projection to apply
    // every upsert, and the first crossing of each person fills the
    // gateway's consent view. What is timed after them is activation's own
    // work on warm services, each a first sync of a fresh activation.
    let warm_small = activate("virginians-warm-up", "US-VA").await?;
    let warm_large = activate("californians-warm-up", "US-CA").await?;
    // The timed syncs run in a second activation replica, its own process
    // on the suite's activation database, so its resident set is
    // activation's alone; its warm-up is the small warm-up sync.
    let (replica_process, mut replica) = spawn_replica(&suite).await?;
    let replica_pid = replica_process
        .id()
        .ok_or_else(|| anyhow::anyhow!("the replica exited"))?;
    sync(&mut replica, &warm_small).await?;
    let cold = sync(&mut activations, &warm_large).await?;
    let virginians = activate("virginians", "US-VA").await?;
    let californians = activate("californians", "US-CA").await?;
    let (small_sync, small_growth) =
        growth_of_during(Some(replica_pid), sync(&mut replica, &virginians)).await;
    let small_sync = small_sync?;
    anyhow::ensure!(
        small_sync.run.added == small,
        "added {}",
        small_sync.run.added
    );
    let (first, large_growth) =
        growth_of_during(Some(replica_pid), sync(&mut replica, &californians)).await;
    let first = first?;
    anyhow::ensure!(first.run.added == audience, "added {}", first.run.added);

    // 1 % churn: half a percent leave for Virginia, half a percent arrive.
    let moved = (audience / 200).max(1);
    let started = Instant::now();
    load_people(&suite, 0..moved, "US-VA").await?;
    load_people(&suite, audience + small..audience + small + moved, "US-CA").await?;
    let churn_load = started.elapsed();
    let second = sync(&mut activations, &californians).await?;
    anyhow::ensure!(
        (second.run.added, second.run.removed, second.run.full) == (moved, moved, false),
        "churn sync sent {} adds and {} removes (full: {})",
        second.run.added,
        second.run.removed,
        second.run.full
    );
    // The same churn again, compared in full: the incremental sync's
    // alternative, measured in the same run.
    load_people(&suite, 0..moved, "US-CA").await?;
    load_people(&suite, audience + small..audience + small + moved, "US-VA").await?;
    let full_churn = sync_as(&mut activations, &californians, true).await?;
    anyhow::ensure!(
        (
            full_churn.run.added,
            full_churn.run.removed,
            full_churn.run.full
        ) == (moved, moved, true),
        "full churn sync sent {} adds and {} removes",
        full_churn.run.added,
        full_churn.run.removed
    );

    // Hashing alone: what the crossing computes per member (a SHA-256 of the
    // email and an HMAC-SHA256 pseudonym), timed on this machine.
    let hashing = hashing_per_member(200_000);
    let hashed = audience as f64 * hashing.as_secs_f64();

    let delays = withdrawal_delays(&suite, &meta, withdrawals).await?;

    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "\n| sync | members | sent (adds + removes) | batches | time | fetch + plan | members/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, members, timed) in [
        (
            "first, whole audience, consent view cold (warm-up)",
            audience,
            &cold,
        ),
        ("first, a tenth of the audience", small, &small_sync),
        ("first, whole audience", audience, &first),
        ("after 1 % churn, incremental", audience, &second),
        ("after 1 % churn, full", audience, &full_churn),
    ] {
        println!(
            "| {name} | {members} | {} | {} | {:.1} s | {:.1} s | {:.0} |",
            timed.run.added + timed.run.removed,
            timed.run.batches_sent,
            timed.elapsed.as_secs_f64(),
            timed.until_sending.as_secs_f64(),
            rate(members, timed.elapsed)
        );
    }
    println!(
        "\nchurn loaded in {:.1} s (not part of the sync); incremental / full sync after 1 % churn: {:.3}",
        churn_load.as_secs_f64(),
        second.elapsed.as_secs_f64() / full_churn.elapsed.as_secs_f64()
    );
    println!(
        "growth during a first sync: the activation replica's own resident set {:.1} MiB for {small} members, {:.1} MiB for {audience}; the benchmark process's (every other service) {:.1} MiB and {:.1} MiB, Rust heap in it {:.1} MiB and {:.1} MiB",
        small_growth.other_rss,
        large_growth.other_rss,
        small_growth.rss,
        large_growth.rss,
        small_growth.heap,
        large_growth.heap
    );
    drop(replica_process);
    println!(
        "hashing: {:.2} µs per member alone (SHA-256 of the email + HMAC-SHA256 pseudonym), {:.2} s for the whole audience = {:.1} % of the first sync",
        hashing.as_secs_f64() * 1e6,
        hashed,
        100.0 * hashed / first.elapsed.as_secs_f64()
    );
    println!(
        "withdrawal to removal at the platform ({} withdrawals, one at a time): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        delays.len(),
        percentile(&delays, 0.5).as_secs_f64() * 1e3,
        percentile(&delays, 0.99).as_secs_f64() * 1e3,
        delays.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    suite.stop().await
}

/// The crossing's per-member hashing, with the gateway's own functions.
fn hashing_per_member(samples: u32) -> Duration {
    use madtech_common::hashing::Form;
    use madtech_gateway::crossing::Pseudonymiser;
    let pseudonymiser = Pseudonymiser::new(&[7; 32]).expect("a 32-byte key");
    let emails: Vec<String> = (0..samples)
        .map(|i| format!("member{i}@example.com"))
        .collect();
    let started = Instant::now();
    let mut sink = 0usize;
    for (i, email) in emails.iter().enumerate() {
        sink += Form::Sha256.hash("email", email).len();
        sink += pseudonymiser.pseudonym("destination", &i.to_string()).len();
    }
    let elapsed = started.elapsed();
    assert!(sink > 0);
    elapsed / samples
}

/// Withdraws consent for one synced Californian at a time and waits for
/// the removal to reach the platform; the delays, sorted.
async fn withdrawal_delays(
    suite: &InProcess,
    meta: &MockPlatform,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut profiles = profiles_pb::profile_service_client::ProfileServiceClient::new(channel(
        suite.config.profiles.listen,
    )?);
    let mut consent = consent_pb::consent_service_client::ConsentServiceClient::new(
        InterceptedService::new(suite.gateway_channel()?, bearer(suite, "admin")?),
    );
    let mut delays = Vec::with_capacity(samples);
    // People past the churned ones are still in the audience.
    let first = common::env_u64("MADTECH_BENCH_AUDIENCE", 1_000_000) / 100;
    for i in first..first + samples as u64 {
        let profile_id = profiles
            .get_profile(profiles_pb::GetProfileRequest {
                lookup: Some(profiles_pb::get_profile_request::Lookup::Identifier(
                    profiles_pb::Identifier {
                        kind: "email".into(),
                        value: format!("member{i}@example.com"),
                    },
                )),
            })
            .await?
            .into_inner()
            .profile
            .map(|p| p.profile_id)
            .unwrap_or_default();
        let removals_before = removals(meta);
        let withdrawn = Instant::now();
        consent
            .record_consent(consent_pb::RecordConsentRequest {
                profile_id,
                choices: vec![consent_pb::PurposeChoice {
                    purpose: "ad_targeting".into(),
                    state: consent_pb::ConsentState::Denied.into(),
                }],
                source: consent_pb::ConsentSource::Cmp.into(),
                region: "US-CA".into(),
                notice_version: "2026-11".into(),
                ..Default::default()
            })
            .await?;
        let deadline = withdrawn + Duration::from_secs(30);
        let arrived = loop {
            if let Some(at) = removal_after(meta, removals_before) {
                break at;
            }
            anyhow::ensure!(Instant::now() < deadline, "no removal reached the platform");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        delays.push(arrived - withdrawn);
    }
    delays.sort();
    Ok(delays)
}

fn removals(meta: &MockPlatform) -> usize {
    meta.platform()
        .received
        .iter()
        .filter(|r| r.op == "remove")
        .count()
}

/// When the first removal after the first `seen` arrived, if one has.
fn removal_after(meta: &MockPlatform, seen: usize) -> Option<Instant> {
    meta.platform()
        .received
        .iter()
        .filter(|r| r.op == "remove")
        .nth(seen)
        .map(|r| r.at)
}
