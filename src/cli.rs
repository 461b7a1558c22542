//! The command line: `up`, `serve`, `token`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use madtech_common::CancellationToken;
use madtech_common::config::{Sources, Validate, load};
use madtech_common::server::{bind, cancel_on_signal};
use madtech_common::telemetry::{init_logging, serve_metrics};
use madtech_gateway::token::Signer;
use serde_json::{Map, Value, json};

use crate::config::MadtechConfig;
use crate::suite::{self, Listeners};

#[derive(Parser)]
#[command(
    name = "madtech",
    version,
    about = "Martech and adtech joined, with privacy enforced at the gateway"
)]
struct Cli {
    /// A TOML configuration file (sections: gateway, profiles, consent,
    /// segments, activation, telemetry). MADTECH_* variables override it,
    /// e.g. MADTECH_GATEWAY__LISTEN=0.0.0.0:50051.
    #[arg(long, global = true, env = "MADTECH_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service and the gateway in this process, on SQLite, with
    /// development keys kept in the data directory.
    Up(UpArgs),
    /// Run one component, as a Kubernetes pod does.
    Serve(ServeArgs),
    /// Bring one component's database schema up to date, then exit (run
    /// once per rollout, e.g. as a Kubernetes init container).
    Migrate(MigrateArgs),
    /// Mint a development token signed with the data directory's key.
    Token(TokenArgs),
    /// Test, explain, lint and compare the casbin policies (for compliance).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Decode consent signals (TCF v2 TC strings, GPP strings, US Privacy
    /// strings).
    #[command(subcommand)]
    Signal(SignalCommand),
    /// Read and verify the gateway's audit trail of crossings (role
    /// `compliance`).
    Audit(AuditArgs),
    /// Work with segments through the gateway (role `marketer`).
    Segment(SegmentArgs),
    /// Run and inspect activation syncs through the gateway (role
    /// `marketer`; `compliance` may list runs).
    Activation(ActivationArgs),
    /// Load realistic synthetic people and events through the gateway (role
    /// `ingest`) or straight into a profiles service, with a progress bar.
    /// The same seed always gives the same data, so a rerun adds nothing.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct SegmentArgs {
    /// The gateway's URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// A bearer token with the `marketer` role.
    #[arg(long, env = "MADTECH_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: SegmentCommand,
}

#[derive(clap::Args)]
struct ActivationArgs {
    /// The gateway's URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// A bearer token with the `marketer` role.
    #[arg(long, env = "MADTECH_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: ActivationCommand,
}

#[derive(Subcommand)]
enum ActivationCommand {
    /// Sync an activation now, with a progress bar; prints the finished run
    /// as JSON. Applies only the audience's changes since the last sync
    /// when it can (`"full": false` in the run).
    Sync {
        activation_id: String,
        /// Export the whole audience and compare, even when the changes
        /// since the last sync would do.
        #[arg(long)]
        full: bool,
    },
    /// Print an activation's runs, newest first, one JSON object per line.
    Runs {
        activation_id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum SegmentCommand {
    /// Evaluate a segment over everyone and store who entered and left,
    /// with a progress bar; prints the counts as JSON.
    Compute { segment_id: String },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// People to create.
    #[arg(long, default_value_t = 10_000)]
    profiles: u64,
    /// Events per person, spread over the last 90 days.
    #[arg(long, default_value_t = 20)]
    events_per_profile: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to send: the gateway, or a profiles service's own address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// A bearer token with the `ingest` role (needed through the gateway).
    #[arg(long, env = "MADTECH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
}

#[derive(clap::Args)]
struct AuditArgs {
    /// The gateway's URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// A bearer token with the `compliance` role.
    #[arg(long, env = "MADTECH_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print audit records after a sequence number, one JSON object per line.
    List {
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Recompute the hash chain; fails unless it is intact and holds the
    /// anchor (a sequence number and hash kept from an earlier run).
    Verify {
        #[arg(long, requires = "anchor_hash")]
        anchor_seq: Option<u64>,
        #[arg(long, requires = "anchor_seq")]
        anchor_hash: Option<String>,
    },
}

#[derive(Subcommand)]
enum SignalCommand {
    /// Print a signal as JSON (snake_case IAB field names; TCF strings list
    /// what makes them invalid under TCF 2.2 in `problems`). A malformed
    /// string exits non-zero with the reason on stderr.
    Decode {
        signal: String,
        /// The signal's kind when it should not be detected: tcf, gpp or usp.
        #[arg(long)]
        kind: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run the test cases in DIR/tests/ and check that they exercise every
    /// policy line.
    Test {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Print a decision and the rule behind it.
    Explain {
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        question: QuestionArgs,
    },
    /// Report names no request can carry and rules no request can reach.
    Lint {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Show which test requests (of both sets) change decision from OLD to NEW.
    Diff { old: PathBuf, new: PathBuf },
}

#[derive(Subcommand)]
enum QuestionArgs {
    /// May ROLE call METHOD (a full gRPC path)?
    Rbac { role: String, method: String },
    /// May a person in REGION with CONSENT (granted, denied or unset) for
    /// PURPOSE, in AGE band (e.g. under_16, adult; unknown when not given),
    /// reach a destination of kind DESTINATION?
    Consent {
        destination: String,
        purpose: String,
        region: String,
        consent: String,
        #[arg(default_value = "unknown")]
        age: String,
    },
    /// May an identifier of KIND reach a destination of kind DESTINATION in
    /// FORM (e.g. sha256)?
    Identifier {
        destination: String,
        kind: String,
        form: String,
    },
}

#[derive(clap::Args)]
struct MigrateArgs {
    component: Component,
}

#[derive(clap::Args)]
struct UpArgs {
    /// Where SQLite files, keys and file destinations live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The policy directory (casbin files, identity.toml, consent.toml).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    #[arg(long)]
    gateway_addr: Option<SocketAddr>,
    #[arg(long)]
    profiles_addr: Option<SocketAddr>,
    #[arg(long)]
    consent_addr: Option<SocketAddr>,
    #[arg(long)]
    segments_addr: Option<SocketAddr>,
    #[arg(long)]
    activation_addr: Option<SocketAddr>,
    /// Prometheus /metrics address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Component {
    Gateway,
    Profiles,
    Consent,
    Segments,
    Activation,
}

impl Component {
    fn section(self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Profiles => "profiles",
            Component::Consent => "consent",
            Component::Segments => "segments",
            Component::Activation => "activation",
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    component: Component,
    /// The gRPC address (overrides the component's `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus /metrics address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// A role from policies/rbac_policy.csv; repeat for several.
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// Who the token is for.
    #[arg(long, default_value = "developer")]
    subject: String,
    /// How long the token is valid, e.g. 1h or 30m.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Checks that `args` (without the program name) is a command line
/// `madtech` accepts, as the Kubernetes manifests give it.
pub fn check_args(args: &[String]) -> Result<(), String> {
    let argv = std::iter::once("madtech".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv)
        .map(drop)
        .map_err(|err| err.to_string())
}

/// Runs the command line and turns any error into a message and exit code 1.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("madtech: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Map::new();
    if let Some(format) = cli.log_format {
        let format = match format {
            LogFormatArg::Text => "text",
            LogFormatArg::Json => "json",
        };
        overrides.insert("telemetry".into(), json!({ "log_format": format }));
    }
    match cli.command {
        Command::Up(args) => up(cli.config.as_deref(), overrides, args).await,
        Command::Serve(args) => serve(cli.config.as_deref(), overrides, args).await,
        Command::Migrate(args) => migrate(cli.config.as_deref(), overrides, args).await,
        Command::Token(args) => token(cli.config.as_deref(), overrides, args),
        Command::Policy(command) => policy(command).await,
        Command::Audit(args) => audit(args).await,
        Command::Generate(args) => generate(args).await,
        Command::Segment(args) => segment(args).await,
        Command::Activation(args) => activation(args).await,
        Command::Signal(SignalCommand::Decode { signal, kind }) => {
            println!("{}", decode_signal(&signal, kind.as_deref())?);
            Ok(())
        }
    }
}

fn load_config(
    file: Option<&Path>,
    overrides: Map<String, Value>,
) -> anyhow::Result<MadtechConfig> {
    let sources = Sources::from_process(file);
    let config: MadtechConfig = load(&sources, &Value::Object(overrides))?;
    config.validate()?;
    Ok(config)
}

fn set(overrides: &mut Map<String, Value>, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = overrides;
    for key in parents {
        node = match node
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(map) => map,
            _ => return,
        };
    }
    node.insert(last.to_string(), value);
}

fn start_telemetry(config: &MadtechConfig) -> anyhow::Result<()> {
    init_logging(&config.telemetry)?;
    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr)?;
    }
    Ok(())
}

async fn up(
    file: Option<&Path>,
    mut overrides: Map<String, Value>,
    args: UpArgs,
) -> anyhow::Result<()> {
    let addresses = [
        (&["gateway", "listen"][..], args.gateway_addr),
        (&["profiles", "listen"][..], args.profiles_addr),
        (&["consent", "listen"][..], args.consent_addr),
        (&["segments", "listen"][..], args.segments_addr),
        (&["activation", "listen"][..], args.activation_addr),
        (&["metrics_listen"][..], args.metrics_addr),
    ];
    for (path, addr) in addresses {
        if let Some(addr) = addr {
            set(&mut overrides, path, json!(addr.to_string()));
        }
    }
    if let Some(dir) = &args.data_dir {
        set(&mut overrides, &["data_dir"], json!(dir));
    }
    if let Some(dir) = &args.policy_dir {
        // One policy directory for every component that reads one.
        set(&mut overrides, &["gateway", "policy_dir"], json!(dir));
        set(&mut overrides, &["consent", "policy_dir"], json!(dir));
        set(
            &mut overrides,
            &["profiles", "identity_rules"],
            json!(dir.join("identity.toml")),
        );
    }
    let config = load_config(file, overrides)?.with_suite_defaults();
    start_telemetry(&config)?;
    suite::prepare_data_dir(&config)?;
    let listeners = Listeners::bind(&config).await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    print_banner(&config);
    suite::run(&config, listeners, shutdown).await
}

fn print_banner(config: &MadtechConfig) {
    println!("MadTech is up. Data in {}", config.data_dir.display());
    println!(
        "  gateway     {}   the only door for callers",
        config.gateway.listen
    );
    println!("  profiles    {}", config.profiles.listen);
    println!("  consent     {}", config.consent.listen);
    println!("  segments    {}", config.segments.listen);
    println!("  activation  {}", config.activation.listen);
    if let Some(metrics) = config.metrics_listen {
        println!("  metrics     http://{metrics}/metrics");
    }
    println!("Policies from {}", config.gateway.policy_dir.display());
    println!(
        "Get a token:  madtech token --role admin --data-dir {}",
        config.data_dir.display()
    );
    println!(
        "Call it:      grpcurl -plaintext -H \"authorization: Bearer $(madtech token --role admin --data-dir {})\" {} list",
        config.data_dir.display(),
        config.gateway.listen
    );
    println!("Stop with Ctrl-C.");
}

async fn serve(
    file: Option<&Path>,
    mut overrides: Map<String, Value>,
    args: ServeArgs,
) -> anyhow::Result<()> {
    let section = args.component.section();
    if let Some(addr) = args.listen {
        set(
            &mut overrides,
            &[section, "listen"],
            json!(addr.to_string()),
        );
    }
    if let Some(addr) = args.metrics_addr {
        set(&mut overrides, &["metrics_listen"], json!(addr.to_string()));
    }
    let config = load_config(file, overrides)?;
    start_telemetry(&config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(component = section, "starting");
    match args.component {
        Component::Gateway => {
            config.gateway.validate()?;
            let listener = bind(config.gateway.listen).await?;
            let gateway = madtech_gateway::Gateway::build(&config.gateway).await?;
            gateway.serve(listener, shutdown).await?;
        }
        Component::Profiles => {
            config.profiles.validate()?;
            let listener = bind(config.profiles.listen).await?;
            let server = madtech_profiles::grpc_server(&config.profiles).await?;
            server.serve(listener, shutdown).await?;
        }
        Component::Consent => {
            config.consent.validate()?;
            let listener = bind(config.consent.listen).await?;
            let server = madtech_consent::grpc_server(&config.consent).await?;
            server.serve(listener, shutdown).await?;
        }
        Component::Segments => {
            config.segments.validate()?;
            let listener = bind(config.segments.listen).await?;
            let server = madtech_segments::grpc_server(&config.segments).await?;
            server.serve(listener, shutdown).await?;
        }
        Component::Activation => {
            config.activation.validate()?;
            let listener = bind(config.activation.listen).await?;
            let server = madtech_activation::grpc_server(&config.activation).await?;
            server.serve(listener, shutdown).await?;
        }
    }
    Ok(())
}

async fn migrate(
    file: Option<&Path>,
    overrides: Map<String, Value>,
    args: MigrateArgs,
) -> anyhow::Result<()> {
    use madtech_common::db::migrate;
    let config = load_config(file, overrides)?;
    init_logging(&config.telemetry)?;
    let section = args.component.section();
    match args.component {
        Component::Gateway => {
            config
                .gateway
                .audit_database
                .validate("gateway.audit_database")?;
            migrate::<madtech_gateway::audit::Migrator>(&config.gateway.audit_database).await?;
        }
        Component::Profiles => {
            config.profiles.database.validate("profiles")?;
            migrate::<madtech_profiles::store::Migrator>(&config.profiles.database).await?;
        }
        Component::Consent => {
            config.consent.database.validate("consent")?;
            migrate::<madtech_consent::ledger::Migrator>(&config.consent.database).await?;
        }
        Component::Segments => {
            config.segments.database.validate("segments")?;
            migrate::<madtech_segments::store::Migrator>(&config.segments.database).await?;
        }
        Component::Activation => {
            config.activation.database.validate("activation")?;
            migrate::<madtech_activation::store::Migrator>(&config.activation.database).await?;
        }
    }
    tracing::info!(component = section, "database is up to date");
    Ok(())
}

fn token(
    file: Option<&Path>,
    mut overrides: Map<String, Value>,
    args: TokenArgs,
) -> anyhow::Result<()> {
    if let Some(dir) = &args.data_dir {
        set(&mut overrides, &["data_dir"], json!(dir));
    }
    let config = load_config(file, overrides)?;
    let key = config.dev_signing_key();
    if !key.is_file() {
        bail!(
            "no development signing key at {}; run `madtech up` first (it creates one)",
            key.display()
        );
    }
    for role in &args.roles {
        madtech_common::validate::policy_name("--role", role)?;
    }
    let signer = Signer::from_private_key_file(
        &key,
        &config.gateway.auth.issuer,
        &config.gateway.auth.audience,
    )
    .context("loading the development signing key")?;
    println!("{}", signer.mint(&args.subject, &args.roles, args.ttl)?);
    Ok(())
}

/// Adds the bearer token (when there is one) to every call.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to `url` (named by `flag` in errors) and the token to send.
async fn connect(
    url: &str,
    flag: &str,
    token: Option<&str>,
) -> anyhow::Result<(tonic::transport::Channel, Bearer)> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| flag.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let bearer = token
        .map(|token| format!("Bearer {token}").parse())
        .transpose()
        .context("--token")?;
    Ok((channel, Bearer(bearer)))
}

async fn segment(args: SegmentArgs) -> anyhow::Result<()> {
    use futures::StreamExt;
    use madtech_proto::segments::v1 as pb;
    use pb::segment_service_client::SegmentServiceClient;
    let (channel, bearer) = connect(&args.gateway, "--gateway", Some(&args.token)).await?;
    let mut client = SegmentServiceClient::with_interceptor(channel, bearer);
    match args.command {
        SegmentCommand::Compute { segment_id } => {
            let mut steps = client
                .compute_segment(pb::ComputeSegmentRequest { segment_id })
                .await
                .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?
                .into_inner();
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} people · {msg} · ETA {eta}",
                )
                .context("progress bar template")?,
            );
            while let Some(step) = steps.next().await {
                let step = step
                    .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?;
                bar.set_length(step.total);
                bar.set_position(step.processed);
                bar.set_message(format!("{} entered, {} left", step.entered, step.exited));
                if step.done {
                    bar.finish();
                    println!(
                        "{}",
                        json!({
                            "members": step.members,
                            "entered": step.entered,
                            "exited": step.exited,
                            "processed": step.processed,
                            "cursor": step.cursor,
                        })
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_json(run: &madtech_proto::activation::v1::SyncRun) -> serde_json::Value {
    json!({
        "run_id": run.run_id,
        "activation_id": run.activation_id,
        "trigger": run.trigger,
        "full": run.full,
        "phase": run.phase().as_str_name(),
        "members_received": run.members_received,
        "to_send": run.to_send,
        "added": run.added,
        "removed": run.removed,
        "unchanged": run.unchanged,
        "batches_sent": run.batches_sent,
        "batches_rejected": run.batches_rejected,
        "retries": run.retries,
        "error": run.error,
        "started_at": run.started_at.as_ref().map(ToString::to_string),
        "finished_at": run.finished_at.as_ref().map(ToString::to_string),
    })
}

async fn activation(args: ActivationArgs) -> anyhow::Result<()> {
    use madtech_proto::activation::v1 as pb;
    use pb::activation_service_client::ActivationServiceClient;
    let (channel, bearer) = connect(&args.gateway, "--gateway", Some(&args.token)).await?;
    let mut client = ActivationServiceClient::with_interceptor(channel, bearer);
    let failed = |status: tonic::Status| anyhow::anyhow!("{}: {}", status.code(), status.message());
    match args.command {
        ActivationCommand::Sync {
            activation_id,
            full,
        } => {
            let mut progress = client
                .run_sync(pb::RunSyncRequest {
                    activation_id,
                    full,
                })
                .await
                .map_err(failed)?
                .into_inner();
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} · {msg} · ETA {eta}")
                    .context("progress bar template")?,
            );
            let mut last = None;
            while let Some(message) = progress.message().await.map_err(failed)? {
                let run = message.run.unwrap_or_default();
                match run.phase() {
                    pb::SyncPhase::Fetching => {
                        let received = if run.full { "members" } else { "changes" };
                        bar.set_message(format!("{} {received} received", run.members_received));
                        bar.tick();
                    }
                    _ => {
                        bar.set_length(run.to_send);
                        bar.set_position(run.added + run.removed);
                        bar.set_message(format!(
                            "{} added, {} removed, {} batches",
                            run.added, run.removed, run.batches_sent
                        ));
                    }
                }
                last = Some(run);
            }
            bar.finish();
            let run = last.context("the sync ended without a final state")?;
            println!("{}", run_json(&run));
            anyhow::ensure!(
                run.phase() == pb::SyncPhase::Succeeded,
                "the sync failed: {}",
                run.error
            );
        }
        ActivationCommand::Runs {
            activation_id,
            limit,
        } => {
            let runs = client
                .list_sync_runs(pb::ListSyncRunsRequest {
                    activation_id,
                    page_size: limit,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .runs;
            for run in &runs {
                println!("{}", run_json(run));
            }
        }
    }
    Ok(())
}

async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    use madtech_proto::profiles::v1::profile_service_client::ProfileServiceClient;
    let (channel, bearer) = connect(&args.target, "--target", args.token.as_deref()).await?;
    let client =
        ProfileServiceClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20);
    let mut plan = crate::generate::Plan::new(args.profiles, args.events_per_profile);
    plan.seed = args.seed;
    plan.concurrency = args.concurrency;

    let bar = indicatif::ProgressBar::new(args.profiles);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} people · {msg} · {per_sec} · ETA {eta}",
        )
        .context("progress bar template")?,
    );
    let started = std::time::Instant::now();
    let done = crate::generate::run(client, &plan, |progress| {
        bar.set_position(progress.profiles);
        bar.set_message(format!("{} events", progress.events));
    })
    .await
    .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} people and {} events in {secs:.1} s ({:.0} events/s)",
        done.profiles,
        done.events,
        done.events as f64 / secs
    );
    Ok(())
}

async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    use madtech_proto::gateway::v1 as pb;
    use pb::audit_service_client::AuditServiceClient;
    let (channel, bearer) = connect(&args.gateway, "--gateway", Some(&args.token)).await?;
    let mut client = AuditServiceClient::with_interceptor(channel, bearer);
    match args.command {
        AuditCommand::List { after, limit } => {
            let records = client
                .list_audit_records(pb::ListAuditRecordsRequest {
                    after_seq: after,
                    page_size: limit,
                })
                .await?
                .into_inner()
                .records;
            for record in records {
                println!(
                    "{}",
                    json!({
                        "seq": record.seq,
                        "recorded_at": record.recorded_at.map(|t| t.to_string()),
                        "caller": record.caller,
                        "method": record.method,
                        "segment_id": record.segment_id,
                        "destination_id": record.destination_id,
                        "destination_kind": record.destination_kind,
                        "purpose": record.purpose,
                        "policy_version": record.policy_version,
                        "outcome": record.outcome,
                        "allowed": record.allowed,
                        "denied": record.denied,
                        "identifiers_stripped": record.identifiers_stripped,
                        "released_digest": record.released_digest,
                        "previous_hash": record.previous_hash,
                        "hash": record.hash,
                    })
                );
            }
        }
        AuditCommand::Verify {
            anchor_seq,
            anchor_hash,
        } => {
            let verified = client
                .verify_audit_chain(pb::VerifyAuditChainRequest {
                    anchor_seq: anchor_seq.unwrap_or(0),
                    anchor_hash: anchor_hash.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!(
                "{} records checked; head {} {}",
                verified.records_checked, verified.last_seq, verified.last_hash
            );
            if verified.first_broken_seq != 0 {
                bail!("the chain breaks at record {}", verified.first_broken_seq);
            }
            if anchor_seq.is_some() && !verified.anchor_matched {
                bail!("the anchor is not in the chain: records were removed or rewritten");
            }
            if !verified.intact {
                bail!("the audit chain is not intact");
            }
            println!("intact");
        }
    }
    Ok(())
}

/// A consent signal decoded to pretty JSON.
pub fn decode_signal(signal: &str, kind: Option<&str>) -> anyhow::Result<String> {
    let kind = kind
        .map(str::parse::<madtech_signals::SignalKind>)
        .transpose()?;
    let decoded = madtech_signals::decode(signal.trim(), kind)?;
    Ok(serde_json::to_string_pretty(&decoded)?)
}

async fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    use madtech_gateway::compliance::{self, Question};
    use madtech_gateway::policy::PolicySet;

    match command {
        PolicyCommand::Test { dir } => {
            let set = PolicySet::load(&dir).await?;
            let cases = compliance::load_cases(&dir)?;
            let report = compliance::run_cases(&set, &cases)?;
            for failure in &report.failed {
                println!("FAIL {failure}");
            }
            for line in &report.uncovered {
                println!("UNCOVERED {line}");
            }
            println!(
                "{} passed, {} failed, {} policy lines without a case (policy version {})",
                report.passed,
                report.failed.len(),
                report.uncovered.len(),
                set.version
            );
            if !report.ok() {
                bail!("the policy tests did not pass");
            }
        }
        PolicyCommand::Explain {
            dir,
            json,
            question,
        } => {
            let set = PolicySet::load(&dir).await?;
            let question = match question {
                QuestionArgs::Rbac { role, method } => Question::Rbac { role, method },
                QuestionArgs::Consent {
                    destination,
                    purpose,
                    region,
                    consent,
                    age,
                } => Question::Consent {
                    destination,
                    purpose,
                    region: region.trim().to_ascii_uppercase(),
                    consent,
                    age,
                },
                QuestionArgs::Identifier {
                    destination,
                    kind,
                    form,
                } => Question::Identifier {
                    destination,
                    kind,
                    form,
                },
            };
            let explanation = set.explain(&question)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
                return Ok(());
            }
            let verdict = if explanation.allowed { "ALLOW" } else { "DENY" };
            println!("{verdict} {:?}", explanation.question);
            if let Some(region) = &explanation.asked_region {
                println!("  asked under region {region}");
            }
            if explanation.matched.is_empty() {
                println!(
                    "  no rule in {} allows it: denied by default",
                    explanation.policy_file
                );
            }
            for row in &explanation.matched {
                println!("  matched {}: {}", explanation.policy_file, row.join(", "));
            }
            println!("  policy version {}", explanation.policy_version);
        }
        PolicyCommand::Lint { dir } => {
            let set = PolicySet::load(&dir).await?;
            let mut problems = compliance::lint(&set)?;
            // The consent service's own policy is checked as it loads it.
            if let Err(err) = madtech_consent::rules::ConsentRules::load(&dir).await {
                problems.push(err.to_string());
            }
            for problem in &problems {
                println!("{problem}");
            }
            if !problems.is_empty() {
                bail!("{} policy problems", problems.len());
            }
            println!("no problems (policy version {})", set.version);
        }
        PolicyCommand::Diff { old, new } => {
            let old_set = PolicySet::load(&old).await?;
            let new_set = PolicySet::load(&new).await?;
            let mut cases = compliance::load_cases(&old)?;
            cases.extend(compliance::load_cases(&new)?);
            let changed = compliance::diff(&old_set, &new_set, &cases)?;
            for (question, before, after) in &changed {
                let word = |allowed: &bool| if *allowed { "allow" } else { "deny" };
                println!("{} -> {}  {question:?}", word(before), word(after));
            }
            println!("{} test requests change decision", changed.len());
        }
    }
    Ok(())
}
