//! The whole suite in one process, as `madtech up` and the end-to-end tests
//! run it: every service and the gateway, each on its own listener, sharing
//! one shutdown signal.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use madtech_common::CancellationToken;
use madtech_common::server::bind;
use madtech_gateway::Gateway;
use madtech_gateway::crossing::Pseudonymiser;
use madtech_gateway::token::{Signer, ensure_dev_keys, write_private_file};
use tokio::net::TcpListener;

use crate::config::MadtechConfig;

/// How long the development tokens of the services that call the gateway
/// (activation, consent) live; `madtech up` mints new ones at every start.
pub const ACTIVATION_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// One listener per component, bound before anything starts so that every
/// component knows every other's address (also when the ports are chosen by
/// the system, as in tests).
pub struct Listeners {
    pub gateway: TcpListener,
    pub profiles: TcpListener,
    pub consent: TcpListener,
    pub segments: TcpListener,
    pub activation: TcpListener,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    pub async fn bind(config: &MadtechConfig) -> anyhow::Result<Self> {
        Ok(Listeners {
            gateway: bind(config.gateway.listen).await?,
            profiles: bind(config.profiles.listen).await?,
            consent: bind(config.consent.listen).await?,
            segments: bind(config.segments.listen).await?,
            activation: bind(config.activation.listen).await?,
        })
    }

    /// Binds five free loopback ports.
    pub async fn ephemeral() -> anyhow::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(Listeners {
            gateway: bind(any).await?,
            profiles: bind(any).await?,
            consent: bind(any).await?,
            segments: bind(any).await?,
            activation: bind(any).await?,
        })
    }

    /// Writes the bound addresses into `config`.
    pub fn record_in(&self, config: &mut MadtechConfig) -> anyhow::Result<()> {
        config.gateway.listen = self.gateway.local_addr()?;
        config.profiles.listen = self.profiles.local_addr()?;
        config.consent.listen = self.consent.local_addr()?;
        config.segments.listen = self.segments.local_addr()?;
        config.activation.listen = self.activation.local_addr()?;
        Ok(())
    }
}

/// Creates what the suite needs in its data directory on first start
/// (development signing keys, the pseudonymisation key) and mints the
/// activation and consent services' tokens.
pub fn prepare_data_dir(config: &MadtechConfig) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    ensure_dev_keys(dir)?;
    Pseudonymiser::ensure_key_file(&config.gateway.pseudonym_key_file)?;
    let signer = Signer::from_private_key_file(
        &config.dev_signing_key(),
        &config.gateway.auth.issuer,
        &config.gateway.auth.audience,
    )?;
    let token = signer.mint(
        "activation",
        &["activation".to_string()],
        ACTIVATION_TOKEN_TTL,
    )?;
    write_private_file(&config.activation.gateway_token_file, token.as_bytes())
        .with_context(|| format!("writing {}", config.activation.gateway_token_file.display()))?;
    // Consent carries out data-subject requests across the suite.
    let token = signer.mint("consent", &["compliance".to_string()], ACTIVATION_TOKEN_TTL)?;
    write_private_file(&config.consent.gateway_token_file, token.as_bytes())
        .with_context(|| format!("writing {}", config.consent.gateway_token_file.display()))?;
    Ok(())
}

/// Runs every component until `shutdown` is cancelled or one of them fails
/// (then the others are stopped too).
pub async fn run(
    config: &MadtechConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate_components()?;
    let profiles = madtech_profiles::grpc_server(&config.profiles)
        .await
        .context("starting profiles")?;
    let consent = madtech_consent::grpc_server(&config.consent)
        .await
        .context("starting consent")?;
    let segments = madtech_segments::grpc_server(&config.segments)
        .await
        .context("starting segments")?;
    let activation = madtech_activation::grpc_server(&config.activation)
        .await
        .context("starting activation")?;
    let gateway = Gateway::build(&config.gateway)
        .await
        .context("starting the gateway")?;

    let stop_all = shutdown.clone();
    let result = tokio::try_join!(
        async {
            profiles
                .serve(listeners.profiles, shutdown.clone())
                .await
                .context("profiles")
        },
        async {
            consent
                .serve(listeners.consent, shutdown.clone())
                .await
                .context("consent")
        },
        async {
            segments
                .serve(listeners.segments, shutdown.clone())
                .await
                .context("segments")
        },
        async {
            activation
                .serve(listeners.activation, shutdown.clone())
                .await
                .context("activation")
        },
        async {
            gateway
                .serve(listeners.gateway, shutdown.clone())
                .await
                .context("gateway")
        },
    );
    stop_all.cancel();
    result.map(|_| ())
}

/// The suite running in this process on loopback ports the system chose, as
/// the end-to-end tests and the benchmarks use it.
pub struct InProcess {
    pub config: MadtechConfig,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Binds five loopback ports, lets `adjust` finish the configuration
    /// (data directory, databases, policies), starts every component and
    /// returns once all five report SERVING.
    pub async fn start(adjust: impl FnOnce(&mut MadtechConfig)) -> anyhow::Result<InProcess> {
        let mut config = MadtechConfig {
            metrics_listen: None,
            ..MadtechConfig::default()
        };
        let listeners = Listeners::ephemeral().await?;
        listeners.record_in(&mut config)?;
        adjust(&mut config);
        let config = config.with_suite_defaults();
        prepare_data_dir(&config)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let config = config.clone();
            let shutdown = shutdown.clone();
            async move { run(&config, listeners, shutdown).await }
        });
        let mut suite = InProcess {
            config,
            shutdown,
            task: Some(task),
        };
        suite.wait_until_serving().await?;
        Ok(suite)
    }

    async fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let c = &self.config;
        // Each component as the suite itself reaches it: the services with
        // the gateway's upstream TLS settings, the gateway as activation does.
        let targets = [
            (c.activation.gateway_url.clone(), &c.activation.gateway_tls),
            (
                c.gateway.upstreams.profiles.clone(),
                &c.gateway.upstream_tls,
            ),
            (c.gateway.upstreams.consent.clone(), &c.gateway.upstream_tls),
            (
                c.gateway.upstreams.segments.clone(),
                &c.gateway.upstream_tls,
            ),
            (
                c.gateway.upstreams.activation.clone(),
                &c.gateway.upstream_tls,
            ),
        ];
        for (url, tls) in targets {
            let mut health = HealthClient::new(tls.endpoint(&url)?.connect_lazy());
            let mut attempts = 0;
            loop {
                let answer = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if matches!(&answer, Ok(r) if r.get_ref().status() == ServingStatus::Serving) {
                    break;
                }
                // A component that failed to start says why, at once.
                if let Some(task) = self.task.take_if(|task| task.is_finished()) {
                    task.await??;
                    anyhow::bail!("the suite stopped before it was serving");
                }
                attempts += 1;
                if attempts > 400 {
                    anyhow::bail!("{url} never became healthy: {answer:?}");
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// A channel to the gateway, as the activation service reaches it.
    pub fn gateway_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let c = &self.config;
        Ok(c.activation
            .gateway_tls
            .endpoint(&c.activation.gateway_url)?
            .connect_lazy())
    }

    /// A token for `roles`, signed with the suite's development key.
    pub fn token(&self, roles: &[&str]) -> anyhow::Result<String> {
        let signer = Signer::from_private_key_file(
            &self.config.dev_signing_key(),
            &self.config.gateway.auth.issuer,
            &self.config.gateway.auth.audience,
        )?;
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        Ok(signer.mint("in-process", &roles, Duration::from_secs(3600))?)
    }

    /// Stops every component and waits for them to drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
