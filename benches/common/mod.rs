//! Helpers every benchmark shares: medians, percentiles, memory, scratch
//! directories and authenticated channels to the in-process suite.

#![allow(dead_code)]

use std::time::Duration;

/// The allocator the `madtech` binary uses, so benchmarks measure what runs,
/// counting the bytes Rust code holds: the heap alone, apart from SQLite's
/// page caches (C allocations) and mapped files, which the resident set
/// also counts.
#[global_allocator]
static ALLOCATOR: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

/// Bytes Rust code holds on the heap now, in MiB.
pub fn heap_mib() -> f64 {
    ALLOCATOR.allocated() as f64 / (1024.0 * 1024.0)
}

use madtech::suite::InProcess;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// Runs a benchmark on the multi-threaded runtime the binary uses.
pub fn block_on(run: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// A number from the environment variable `name`, or `default` when it is
/// unset or not a number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn peak_rss_mib() -> f64 {
    status_kib("self", "VmHWM:") / 1024.0
}

/// SQLite files on tmpfs when there is one, so fsync latency does not swamp
/// what is measured (the gateway, not the disk).
pub fn tmpfs_dir() -> anyhow::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    Ok(if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    })
}

/// The backends `MADTECH_BENCH_BACKENDS` names (or `default`), each with a
/// fresh database for `component`: `sqlite` (a file on disk, synced per
/// commit), `pg-socket` and `pg-tcp` (PostgreSQL over its Unix socket or
/// over TCP). Keep the `TestDatabase` alive while the backend is measured.
pub fn backends(
    default: &str,
    component: &str,
) -> anyhow::Result<
    Vec<(
        String,
        madtech_common::testing::TestDatabase,
        madtech_common::db::DatabaseConfig,
    )>,
> {
    use madtech_common::testing::{Backend, TestDatabase};
    let names = std::env::var("MADTECH_BENCH_BACKENDS").unwrap_or_else(|_| default.into());
    names
        .split(',')
        .map(|name| {
            let (db, config) = match name {
                "sqlite" => {
                    let db = TestDatabase::new(Backend::Sqlite);
                    let config = db.sibling(component);
                    (db, config)
                }
                "pg-socket" | "pg-tcp" => {
                    let db = TestDatabase::new(Backend::Postgres);
                    let mut config = db.sibling(component);
                    config.prefer_unix_socket = name == "pg-socket";
                    (db, config)
                }
                other => anyhow::bail!("unknown backend {other}"),
            };
            Ok((name.to_string(), db, config))
        })
        .collect()
}

/// Adds a bearer token to every call.
#[derive(Clone)]
pub struct Bearer(pub MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub fn bearer(suite: &InProcess, role: &str) -> anyhow::Result<Bearer> {
    Ok(Bearer(format!("Bearer {}", suite.token(&[role])?).parse()?))
}

pub fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy())
}

/// The process's resident set now, in MiB.
pub fn rss_mib() -> f64 {
    status_kib("self", "VmRSS:") / 1024.0
}

/// Another process's resident set now, in MiB (0 once it is gone).
pub fn process_rss_mib(pid: u32) -> f64 {
    status_kib(&pid.to_string(), "VmRSS:") / 1024.0
}

fn status_kib(process: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// How far memory rose above where it was when a piece of work started
/// (MiB): the resident set, the Rust heap within it, and the resident set
/// of another process doing the work, when there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Growth {
    pub rss: f64,
    pub heap: f64,
    pub other_rss: f64,
}

/// Runs `work` while sampling the resident set and the heap every 5 ms;
/// returns its output and how far each rose above where it started. Unlike
/// the peak (VmHWM), this isolates one piece of work in a process that did
/// bigger things before it.
pub async fn growth_during<T>(work: impl std::future::Future<Output = T>) -> (T, Growth) {
    growth_of_during(None, work).await
}

/// [`growth_during`], also sampling process `other` (e.g. a service run as
/// its own process).
pub async fn growth_of_during<T>(
    other: Option<u32>,
    work: impl std::future::Future<Output = T>,
) -> (T, Growth) {
    let sample = move || Growth {
        rss: rss_mib(),
        heap: heap_mib(),
        other_rss: other.map_or(0.0, process_rss_mib),
    };
    let start = sample();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = std::sync::Arc::clone(&done);
        tokio::spawn(async move {
            let mut highest = start;
            loop {
                let now = sample();
                highest.rss = highest.rss.max(now.rss);
                highest.heap = highest.heap.max(now.heap);
                highest.other_rss = highest.other_rss.max(now.other_rss);
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break highest;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    let output = work.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let highest = sampler.await.unwrap_or(start);
    (
        output,
        Growth {
            rss: highest.rss - start.rss,
            heap: highest.heap - start.heap,
            other_rss: highest.other_rss - start.other_rss,
        },
    )
}

/// Reads an `ExportAudience` to the end; fails unless exactly `expected`
/// members arrive. Returns members per second.
pub async fn export_rate<S>(
    mut client: madtech_proto::segments::v1::segment_service_client::SegmentServiceClient<S>,
    request: madtech_proto::segments::v1::ExportAudienceRequest,
    expected: u64,
) -> anyhow::Result<f64>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let start = std::time::Instant::now();
    let mut stream = client.export_audience(request).await?.into_inner();
    let mut members = 0u64;
    while let Some(chunk) = stream.message().await? {
        members += chunk.members.len() as u64;
    }
    anyhow::ensure!(
        members == expected,
        "expected {expected} members, got {members}"
    );
    Ok(members as f64 / start.elapsed().as_secs_f64())
}

/// CPU time every thread of this process has used so far, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// An export read to the end: members per second, and the CPU time the
/// whole process (server, gateway and reader alike) spent per member.
pub struct ExportCost {
    pub rate: f64,
    pub cpu_us_per_member: f64,
}

/// An export (`export_rate` of `expected` members) with the process's CPU
/// time per member.
pub async fn export_cost(
    expected: u64,
    export: impl std::future::Future<Output = anyhow::Result<f64>>,
) -> anyhow::Result<ExportCost> {
    let cpu = process_cpu_seconds();
    let rate = export.await?;
    let cpu_us_per_member = (process_cpu_seconds() - cpu) * 1e6 / expected.max(1) as f64;
    Ok(ExportCost {
        rate,
        cpu_us_per_member,
    })
}

/// People per BatchUpsertProfiles call while loading.
pub const LOAD_BATCH: u64 = 500;
/// Calls in flight while loading.
pub const LOAD_CONCURRENCY: usize = 4;

/// Upserts people `member{i}@example.com` for every `i` in `people`, in
/// `region`, straight to the profiles service.
pub async fn load_people(
    suite: &InProcess,
    people: std::ops::Range<u64>,
    region: &'static str,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = madtech_proto::profiles::v1::profile_service_client::ProfileServiceClient::new(
        channel(suite.config.profiles.listen)?,
    )
    .max_decoding_message_size(64 << 20);
    let end = people.end;
    let batches = people.step_by(LOAD_BATCH as usize).map(|first| {
        let mut client = client.clone();
        async move {
            let upserts = (first..(first + LOAD_BATCH).min(end))
                .map(|i| madtech_proto::profiles::v1::UpsertProfileRequest {
                    identifiers: vec![madtech_proto::profiles::v1::Identifier {
                        kind: "email".into(),
                        value: format!("member{i}@example.com"),
                    }],
                    region: region.into(),
                    ..Default::default()
                })
                .collect();
            client
                .batch_upsert_profiles(madtech_proto::profiles::v1::BatchUpsertProfilesRequest {
                    upserts,
                })
                .await
        }
    });
    let mut calls = futures::stream::iter(batches).buffer_unordered(LOAD_CONCURRENCY);
    while let Some(done) = calls.next().await {
        done?;
    }
    Ok(())
}

/// Creates a segment of everyone in `region` through `segments`; its id.
pub async fn region_segment<S>(
    segments: &mut madtech_proto::segments::v1::segment_service_client::SegmentServiceClient<S>,
    name: &str,
    region: &str,
) -> anyhow::Result<String>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    Ok(segments
        .create_segment(madtech_proto::segments::v1::CreateSegmentRequest {
            rule_text: format!(r#"region in ["{region}"]"#),
            name: name.into(),
            rule: None,
        })
        .await?
        .into_inner()
        .segment
        .map(|s| s.segment_id)
        .unwrap_or_default())
}

/// Registers a file destination as `admin` through the gateway, which only
/// lets audiences cross to registered destinations; its id.
pub async fn file_destination(suite: &InProcess, name: &str) -> anyhow::Result<String> {
    use madtech_proto::activation::v1 as pb;
    let mut activation = pb::activation_service_client::ActivationServiceClient::new(
        tonic::service::interceptor::InterceptedService::new(
            suite.gateway_channel()?,
            bearer(suite, "admin")?,
        ),
    );
    let destination = activation
        .create_destination(pb::CreateDestinationRequest {
            name: name.into(),
            target: Some(pb::create_destination_request::Target::File(
                pb::FileDestination {
                    directory: name.into(),
                    format: pb::FileFormat::Jsonl.into(),
                },
            )),
        })
        .await?
        .into_inner()
        .destination
        .ok_or_else(|| anyhow::anyhow!("CreateDestination answered no destination"))?;
    Ok(destination.destination_id)
}
