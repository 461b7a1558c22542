//! Gateway benchmarks. Run with `cargo bench --bench gateway`; the results
//! and the machine they were measured on are in docs/BENCHMARKS.md.
//!
//! Each measurement runs several rounds and reports the median; comparisons
//! (through the gateway vs direct) alternate rounds in one run, so a noisy
//! machine slows both sides alike and the ratio stays meaningful.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bearer, channel, export_rate, median, peak_rss_mib, percentile};
use madtech::suite::InProcess;
use madtech_common::hashing::sha256_hex;
use madtech_gateway::crossing::{Filter, Ledger, Pseudonymiser};
use madtech_gateway::page::read_page;
use madtech_gateway::policy::PolicySet;
use madtech_proto::consent::v1::ConsentState;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as segments_pb;
use profiles_pb::profile_service_client::ProfileServiceClient;
use prost::Message;
use segments_pb::segment_service_client::SegmentServiceClient;
use tonic::service::interceptor::InterceptedService;

const ROUNDS: usize = 5;
const FILTER_MEMBERS: usize = 1_000_000;
const UNARY_CALLS: usize = 4_000;
const UNARY_CONCURRENCY: usize = 32;
const AUDIENCE: usize = 10_000;

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    println!("# MadTech gateway benchmarks ({ROUNDS} rounds each, medians)\n");
    filter_throughput().await?;
    let scratch = common::tmpfs_dir()?;
    let suite = InProcess::start(|config| {
        config.data_dir = scratch.path().to_path_buf();
        config.gateway.policy_dir = "policies".into();
    })
    .await?;
    unary_pass_through(&suite).await?;
    admission_layers(&suite).await?;
    crossing_end_to_end(&suite).await?;
    println!(
        "\npeak RSS of the whole in-process suite: {:.0} MiB",
        peak_rss_mib()
    );
    suite.stop().await
}

fn synthetic_members(n: usize) -> Vec<(segments_pb::AudienceMember, ConsentState)> {
    let regions = ["FR", "DE", "US-CA", "US-VA", "GB", ""];
    let states = [
        ConsentState::Granted,
        ConsentState::Unset,
        ConsentState::Denied,
    ];
    (0..n)
        .map(|i| {
            let member = segments_pb::AudienceMember {
                profile_id: format!("019a0000-0000-7000-8000-{i:012}"),
                identifiers: vec![
                    profiles_pb::Identifier {
                        kind: "email".into(),
                        value: format!("user{i}@example.com"),
                    },
                    profiles_pb::Identifier {
                        kind: "customer_id".into(),
                        value: format!("C{i}"),
                    },
                ],
                region: regions[i % regions.len()].into(),
                ..Default::default()
            };
            (member, states[i % states.len()])
        })
        .collect()
}

async fn filter_throughput() -> anyhow::Result<()> {
    let policy = Arc::new(PolicySet::load(std::path::Path::new("policies")).await?);
    let pseudonymiser = Pseudonymiser::new(&[7; 32]).ok_or_else(|| anyhow::anyhow!("key"))?;
    let template = synthetic_members(FILTER_MEMBERS);
    // Pages of 1,000 encoded members with their consent states, as the
    // crossing receives them from the segments service.
    let pages: Vec<(Vec<u8>, Vec<ConsentState>)> = template
        .chunks(1_000)
        .map(|chunk| {
            let members = chunk.iter().map(|(member, _)| member.clone()).collect();
            let states = chunk.iter().map(|(_, state)| *state).collect();
            (
                segments_pb::ExportAudienceResponse::of(members).encode_to_vec(),
                states,
            )
        })
        .collect();
    let mut filtered = Vec::new();
    let mut allowed = 0;
    for _ in 0..ROUNDS {
        let mut filter = Filter::new(
            Arc::clone(&policy),
            pseudonymiser.clone(),
            "dest",
            "file",
            "ad_targeting",
        );
        let mut ledger = Ledger::default();
        let start = Instant::now();
        for (upstream, states) in &pages {
            let mut page = Vec::with_capacity(upstream.len() * 2);
            for (member, state) in read_page(upstream)?.iter().zip(states) {
                if filter.cross(member, *state, &mut page)? {
                    allowed += 1;
                }
            }
            ledger.record(filter.settle());
            std::hint::black_box(page);
        }
        std::hint::black_box(ledger.released_digest());
        filtered.push(FILTER_MEMBERS as f64 / start.elapsed().as_secs_f64());
    }
    // What the filter costs per member beyond hashing: the same members, only
    // the SHA-256 of the email and the HMAC pseudonym.
    let mut hashing = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for (member, _) in &template {
            std::hint::black_box(sha256_hex(&member.identifiers[0].value));
            std::hint::black_box(pseudonymiser.pseudonym("dest", &member.profile_id));
        }
        hashing.push(FILTER_MEMBERS as f64 / start.elapsed().as_secs_f64());
    }
    // The uncached decision alone, to show what the per-export cache saves.
    let mut uncached = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for (member, state) in template.iter().take(100_000) {
            let consent = madtech_gateway::crossing::consent_state_name(*state);
            std::hint::black_box(policy.allows_crossing(
                "file",
                "ad_targeting",
                &member.region,
                consent,
                "adult",
            )?);
        }
        uncached.push(100_000.0 / start.elapsed().as_secs_f64());
    }
    let filtered = median(filtered);
    let hashing = median(hashing);
    println!("## Crossing filter, in process ({FILTER_MEMBERS} members, 2 identifiers each)\n");
    println!("| measurement | members/s |");
    println!("|---|---|");
    println!(
        "| filter (read pages in place, decide, hash allowed identifiers, pseudonymise, write the crossed pages) | {filtered:.0} |"
    );
    println!(
        "| hashing alone (SHA-256 of the email + HMAC pseudonym, every member) | {hashing:.0} |"
    );
    println!(
        "| uncached casbin decision alone | {:.0} |",
        median(uncached)
    );
    println!(
        "\nallowed per round: {}; filter / hashing-alone ratio: {:.2}\n",
        allowed / ROUNDS,
        filtered / hashing
    );
    Ok(())
}

struct Load {
    calls_per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// `UNARY_CALLS` GetProfile calls from `UNARY_CONCURRENCY` tasks.
async fn unary_load<S>(client: ProfileServiceClient<S>, profile_id: &str) -> anyhow::Result<Load>
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..UNARY_CONCURRENCY {
        let mut client = client.clone();
        let id = profile_id.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(UNARY_CALLS / UNARY_CONCURRENCY);
            for _ in 0..UNARY_CALLS / UNARY_CONCURRENCY {
                let request = profiles_pb::GetProfileRequest {
                    lookup: Some(profiles_pb::get_profile_request::Lookup::ProfileId(
                        id.clone(),
                    )),
                };
                let sent = Instant::now();
                client.get_profile(request).await?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(UNARY_CALLS);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Ok(Load {
        calls_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

async fn unary_pass_through(suite: &InProcess) -> anyhow::Result<()> {
    let gateway = ProfileServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(suite, "admin")?,
    ));
    let direct = ProfileServiceClient::new(channel(suite.config.profiles.listen)?);
    let profile_id = gateway
        .clone()
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![profiles_pb::Identifier {
                kind: "email".into(),
                value: "bench@example.com".into(),
            }],
            traits: Default::default(),
            region: "FR".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .profile
        .map(|p| p.profile_id)
        .unwrap_or_default();
    // Warm both paths (connections, caches) before measuring.
    unary_load(direct.clone(), &profile_id).await?;
    unary_load(gateway.clone(), &profile_id).await?;
    let (mut d_rate, mut d_p50, mut d_p99) = (Vec::new(), Vec::new(), Vec::new());
    let (mut g_rate, mut g_p50, mut g_p99) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let d = unary_load(direct.clone(), &profile_id).await?;
        let g = unary_load(gateway.clone(), &profile_id).await?;
        d_rate.push(d.calls_per_second);
        d_p50.push(d.p50.as_secs_f64() * 1e6);
        d_p99.push(d.p99.as_secs_f64() * 1e6);
        g_rate.push(g.calls_per_second);
        g_p50.push(g.p50.as_secs_f64() * 1e6);
        g_p99.push(g.p99.as_secs_f64() * 1e6);
    }
    let (d_rate, d_p50, d_p99) = (median(d_rate), median(d_p50), median(d_p99));
    let (g_rate, g_p50, g_p99) = (median(g_rate), median(g_p50), median(g_p99));
    println!(
        "## Unary pass-through: GetProfile, {UNARY_CALLS} calls, {UNARY_CONCURRENCY} concurrent\n"
    );
    println!("| path | calls/s | p50 µs | p99 µs |");
    println!("|---|---|---|---|");
    println!("| direct to profiles | {d_rate:.0} | {d_p50:.0} | {d_p99:.0} |");
    println!(
        "| through the gateway (JWT + RBAC + route) | {g_rate:.0} | {g_p50:.0} | {g_p99:.0} |"
    );
    println!(
        "\ngateway / direct throughput: {:.2}; added latency p50 {:.0} µs, p99 {:.0} µs\n",
        g_rate / d_rate,
        g_p50 - d_p50,
        g_p99 - d_p99
    );
    Ok(())
}

/// Calls through the admission layers, in process with no sockets.
const ADMISSION_CALLS: usize = 200_000;

/// The price of authorization: the gateway's admission layers (JWT, rate
/// limit, RBAC) in front of a service that answers at once, with and without
/// the RBAC layer, and with a role the policy refuses. The gateway itself has
/// no switch to turn authorization off, deliberately; this measures the layer
/// alone so its share of a call can be read against the per-call cost above
/// and under h2load.
async fn admission_layers(suite: &InProcess) -> anyhow::Result<()> {
    use madtech_gateway::policy::Policies;
    use madtech_gateway::ratelimit::RateLimits;
    use madtech_gateway::token::Verifier;
    use tower::{Service, ServiceBuilder, ServiceExt};

    let auth = &suite.config.gateway.auth;
    let verifier = Arc::new(Verifier::from_public_key_file(
        &suite
            .config
            .data_dir
            .join(madtech_gateway::token::DEV_PUBLIC_KEY),
        &auth.issuer,
        &auth.audience,
        auth.leeway,
    )?);
    let policies = Policies::new(PolicySet::load(std::path::Path::new("policies")).await?);
    let limits = Arc::new(RateLimits::new(&Default::default()));
    let answer = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
    });
    let with_authz = ServiceBuilder::new()
        .layer(madtech_gateway::authn::layer(Arc::clone(&verifier)))
        .layer(madtech_gateway::ratelimit::layer(Arc::clone(&limits)))
        .layer(madtech_gateway::authz::layer(policies))
        .service(answer);
    let without_authz = ServiceBuilder::new()
        .layer(madtech_gateway::authn::layer(verifier))
        .layer(madtech_gateway::ratelimit::layer(limits))
        .service(answer);
    let admin = format!("Bearer {}", suite.token(&["admin"])?);
    let activation = format!("Bearer {}", suite.token(&["activation"])?);

    async fn calls_per_second<S>(mut service: S, token: &str) -> anyhow::Result<f64>
    where
        S: Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            >,
    {
        let start = Instant::now();
        for _ in 0..ADMISSION_CALLS {
            let request = http::Request::builder()
                .uri("/madtech.profiles.v1.ProfileService/GetProfile")
                .header(http::header::AUTHORIZATION, token)
                .body(tonic::body::Body::empty())?;
            let response = service.ready().await?.call(request).await?;
            std::hint::black_box(response);
        }
        Ok(ADMISSION_CALLS as f64 / start.elapsed().as_secs_f64())
    }

    let (mut on, mut off, mut denied) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        on.push(calls_per_second(with_authz.clone(), &admin).await?);
        off.push(calls_per_second(without_authz.clone(), &admin).await?);
        denied.push(calls_per_second(with_authz.clone(), &activation).await?);
    }
    let (on, off, denied) = (median(on), median(off), median(denied));
    println!("## Admission layers in process: authorization on vs off ({ADMISSION_CALLS} calls)\n");
    println!("| stack | calls/s | µs per call |");
    println!("|---|---|---|");
    for (name, rate) in [
        ("JWT + rate limit (authorization off)", off),
        ("JWT + rate limit + RBAC, allowed", on),
        ("JWT + rate limit + RBAC, denied", denied),
    ] {
        println!("| {name} | {rate:.0} | {:.2} |", 1e6 / rate);
    }
    println!(
        "\nRBAC adds {:.2} µs per call; denied / allowed throughput {:.2}\n",
        1e6 / on - 1e6 / off,
        denied / on
    );
    Ok(())
}

async fn crossing_end_to_end(suite: &InProcess) -> anyhow::Result<()> {
    let mut profiles = ProfileServiceClient::new(channel(suite.config.profiles.listen)?);
    for i in 0..AUDIENCE {
        profiles
            .upsert_profile(profiles_pb::UpsertProfileRequest {
                identifiers: vec![profiles_pb::Identifier {
                    kind: "email".into(),
                    value: format!("member{i}@example.com"),
                }],
                traits: Default::default(),
                region: "US-CA".into(),
                ..Default::default()
            })
            .await?;
    }
    let admin = bearer(suite, "admin")?;
    let segment =
        SegmentServiceClient::new(InterceptedService::new(suite.gateway_channel()?, admin))
            .create_segment(segments_pb::CreateSegmentRequest {
                rule_text: String::new(),
                name: "bench".into(),
                rule: Some(segments_pb::Rule {
                    rule: Some(segments_pb::rule::Rule::RegionIn(segments_pb::RegionIn {
                        regions: vec!["US-CA".into()],
                    })),
                }),
            })
            .await?
            .into_inner()
            .segment
            .map(|s| s.segment_id)
            .unwrap_or_default();
    let request = segments_pb::ExportAudienceRequest {
        segment_id: segment,
        destination_id: common::file_destination(suite, "bench").await?,
        destination_kind: String::new(),
        purpose: "ad_targeting".into(),
        snapshot_cursor: 0,
        current_membership: false,
    };
    let gateway = SegmentServiceClient::new(InterceptedService::new(
        suite.gateway_channel()?,
        bearer(suite, "activation")?,
    ));
    let direct = SegmentServiceClient::new(channel(suite.config.segments.listen)?);
    // The first crossing meets an empty consent view: every member is a
    // miss, asked for in batches. Later ones read the view the change
    // stream keeps current.
    let cold = export_rate(gateway.clone(), request.clone(), AUDIENCE as u64).await?;
    let (mut d_rate, mut g_rate) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d_rate.push(export_rate(direct.clone(), request.clone(), AUDIENCE as u64).await?);
        g_rate.push(export_rate(gateway.clone(), request.clone(), AUDIENCE as u64).await?);
    }
    let (d_rate, g_rate) = (median(d_rate), median(g_rate));
    println!("## Crossing end to end: ExportAudience of {AUDIENCE} members (all may cross)\n");
    println!("| path | members/s |");
    println!("|---|---|");
    println!("| direct from segments (raw, unfiltered) | {d_rate:.0} |");
    println!("| through the gateway, consent view cold (every member looked up) | {cold:.0} |");
    println!("| through the gateway, consent view warm (policy, hashing, audit) | {g_rate:.0} |");
    println!(
        "\ngateway / direct: {:.2} warm, {:.2} cold",
        g_rate / d_rate,
        cold / d_rate
    );
    Ok(())
}
