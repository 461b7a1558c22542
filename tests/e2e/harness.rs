//! Starts the suite for a test and hands out authenticated clients.

use std::path::PathBuf;
use std::time::Duration;

use madtech::MadtechConfig;
use madtech::suite::{self, Listeners};
use madtech_common::CancellationToken;
use madtech_common::testing::{Backend, TestDatabase};
use madtech_gateway::token::Signer;
use madtech_proto::activation::v1::activation_service_client::ActivationServiceClient;
use madtech_proto::consent::v1::consent_service_client::ConsentServiceClient;
use madtech_proto::profiles::v1::profile_service_client::ProfileServiceClient;
use madtech_proto::segments::v1::segment_service_client::SegmentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Adds a bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

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

pub type Authed = InterceptedService<Channel, Bearer>;

pub struct Suite {
    pub config: MadtechConfig,
    /// Held so the test databases (SQLite directory, PostgreSQL schemas) outlive the suite.
    _db: TestDatabase,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _data: tempfile::TempDir,
}

impl Suite {
    pub async fn start(backend: Backend) -> Suite {
        Suite::start_with(backend, |_| {}).await
    }

    /// Starts the suite after `adjust` has changed its configuration.
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut MadtechConfig)) -> Suite {
        let data = tempfile::tempdir().expect("data dir");
        let db = TestDatabase::new(backend);
        let mut config = MadtechConfig {
            data_dir: data.path().to_path_buf(),
            metrics_listen: None,
            ..MadtechConfig::default()
        };
        config.gateway.policy_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
        config.profiles.database = db.sibling("profiles");
        config.consent.database = db.sibling("consent");
        config.segments.database = db.sibling("segments");
        config.activation.database = db.sibling("activation");
        config.gateway.audit_database = db.sibling("gateway_audit");
        let listeners = Listeners::ephemeral().await.expect("listeners");
        listeners.record_in(&mut config).expect("addresses");
        adjust(&mut config);
        let config = config.with_suite_defaults();
        suite::prepare_data_dir(&config).expect("data dir prepared");

        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let config = config.clone();
            let shutdown = shutdown.clone();
            async move { suite::run(&config, listeners, shutdown).await }
        });
        let suite = Suite {
            config,
            _db: db,
            shutdown,
            task: Some(task),
            _data: data,
        };
        suite.wait_until_serving().await;
        suite
    }

    /// Waits until every component's health service says SERVING.
    async fn wait_until_serving(&self) {
        let addrs = [
            self.config.gateway.listen,
            self.config.profiles.listen,
            self.config.consent.listen,
            self.config.segments.listen,
            self.config.activation.listen,
        ];
        for addr in addrs {
            let mut health = HealthClient::new(self.channel_to(&format!("http://{addr}")));
            let mut attempts = 0;
            loop {
                let answer = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if matches!(&answer, Ok(r) if r.get_ref().status() == ServingStatus::Serving) {
                    break;
                }
                attempts += 1;
                assert!(attempts < 200, "{addr} never became healthy: {answer:?}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    fn channel_to(&self, url: &str) -> Channel {
        tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("url")
            .connect_lazy()
    }

    pub fn gateway_channel(&self) -> Channel {
        self.channel_to(&format!("http://{}", self.config.gateway.listen))
    }

    /// A token for `roles`, signed with the suite's development key.
    pub fn token(&self, roles: &[&str]) -> String {
        let signer = Signer::from_private_key_file(
            &self.config.dev_signing_key(),
            &self.config.gateway.auth.issuer,
            &self.config.gateway.auth.audience,
        )
        .expect("signer");
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        signer
            .mint("e2e", &roles, Duration::from_secs(600))
            .expect("token")
    }

    pub fn bearer(&self, roles: &[&str]) -> Bearer {
        let value = format!("Bearer {}", self.token(roles))
            .parse()
            .expect("header");
        Bearer(Some(value))
    }

    pub fn anonymous() -> Bearer {
        Bearer(None)
    }

    pub fn raw_bearer(header: &str) -> Bearer {
        Bearer(Some(header.parse().expect("header")))
    }

    pub fn profiles(&self, bearer: Bearer) -> ProfileServiceClient<Authed> {
        ProfileServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    pub fn consent(&self, bearer: Bearer) -> ConsentServiceClient<Authed> {
        ConsentServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    pub fn segments(&self, bearer: Bearer) -> SegmentServiceClient<Authed> {
        SegmentServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    pub fn activation(&self, bearer: Bearer) -> ActivationServiceClient<Authed> {
        ActivationServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    /// Stops the suite and waits for every component to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("suite task").expect("suite ran cleanly");
        }
    }
}

impl Drop for Suite {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
