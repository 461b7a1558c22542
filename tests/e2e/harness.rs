//! Starts the suite for a test and hands out authenticated clients.

use std::path::PathBuf;

use madtech::MadtechConfig;
use madtech::suite::InProcess;
use madtech_common::testing::{Backend, TestDatabase};
use madtech_proto::activation::v1 as activation_pb;
use madtech_proto::activation::v1::activation_service_client::ActivationServiceClient;
use madtech_proto::consent::v1::consent_service_client::ConsentServiceClient;
use madtech_proto::consent::v1::privacy_request_service_client::PrivacyRequestServiceClient;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::profiles::v1::profile_service_client::ProfileServiceClient;
use madtech_proto::segments::v1 as segments_pb;
use madtech_proto::segments::v1::segment_service_client::SegmentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

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
    running: InProcess,
    /// Held so the test databases (SQLite directory, PostgreSQL schemas) and
    /// the data directory outlive the suite.
    kept: Kept,
    /// The file destination [`Suite::export`] crosses to, registered on
    /// first use.
    export_destination: tokio::sync::OnceCell<String>,
}

impl Suite {
    pub async fn start(backend: Backend) -> Suite {
        Suite::start_with(backend, |_| {}).await
    }

    /// Starts the suite after `adjust` has changed its configuration.
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut MadtechConfig)) -> Suite {
        let kept = Kept {
            db: TestDatabase::new(backend),
            data: tempfile::tempdir().expect("data dir"),
        };
        Suite::start_on(kept, adjust).await
    }

    /// Starts the suite again on what an earlier one kept (databases and
    /// data directory), as a restart would find them.
    pub async fn start_on(kept: Kept, adjust: impl FnOnce(&mut MadtechConfig)) -> Suite {
        let Kept { db, data } = kept;
        let running = InProcess::start(|config| {
            config.data_dir = data.path().to_path_buf();
            let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
            config.profiles.identity_rules = policies.join("identity.toml");
            config.consent.policy_dir = policies.clone();
            config.gateway.policy_dir = policies;
            config.profiles.database = db.sibling("profiles");
            config.consent.database = db.sibling("consent");
            config.segments.database = db.sibling("segments");
            config.activation.database = db.sibling("activation");
            config.gateway.audit_database = db.sibling("gateway_audit");
            adjust(config);
        })
        .await
        .expect("the suite starts");
        Suite {
            config: running.config.clone(),
            running,
            kept: Kept { db, data },
            export_destination: tokio::sync::OnceCell::new(),
        }
    }

    pub fn gateway_channel(&self) -> Channel {
        self.running.gateway_channel().expect("gateway address")
    }

    /// A token for `roles`, signed with the suite's development key.
    pub fn token(&self, roles: &[&str]) -> String {
        self.running.token(roles).expect("token")
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

    pub fn privacy(&self, bearer: Bearer) -> PrivacyRequestServiceClient<Authed> {
        PrivacyRequestServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    pub fn segments(&self, bearer: Bearer) -> SegmentServiceClient<Authed> {
        SegmentServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    pub fn activation(&self, bearer: Bearer) -> ActivationServiceClient<Authed> {
        ActivationServiceClient::with_interceptor(self.gateway_channel(), bearer)
    }

    /// Upserts, as `ingest`, the person known by `email` in `region` with
    /// `traits`; returns their profile id.
    pub async fn person(
        &self,
        email: &str,
        region: &str,
        traits: std::collections::HashMap<String, profiles_pb::TraitValue>,
    ) -> String {
        self.person_with(&[("email", email)], region, traits).await
    }

    /// Upserts, as `ingest`, the person with these `(kind, value)`
    /// identifiers; their profile id.
    pub async fn person_with(
        &self,
        identifiers: &[(&str, &str)],
        region: &str,
        traits: std::collections::HashMap<String, profiles_pb::TraitValue>,
    ) -> String {
        self.profiles(self.bearer(&["ingest"]))
            .upsert_profile(profiles_pb::UpsertProfileRequest {
                identifiers: identifiers
                    .iter()
                    .map(|(kind, value)| profiles_pb::Identifier {
                        kind: kind.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
                traits,
                region: region.into(),
                ..Default::default()
            })
            .await
            .expect("upsert through the gateway")
            .into_inner()
            .profile
            .expect("profile")
            .profile_id
    }

    /// Creates, as admin, a segment of everyone in `regions`.
    pub async fn region_segment(&self, name: &str, regions: &[&str]) -> segments_pb::Segment {
        self.segments(self.bearer(&["admin"]))
            .create_segment(segments_pb::CreateSegmentRequest {
                rule_text: String::new(),
                name: name.into(),
                rule: Some(segments_pb::Rule {
                    rule: Some(segments_pb::rule::Rule::RegionIn(segments_pb::RegionIn {
                        regions: regions.iter().map(|r| r.to_string()).collect(),
                    })),
                }),
            })
            .await
            .expect("create segment")
            .into_inner()
            .segment
            .expect("segment")
    }

    /// Creates, as a marketer, a JSONL file destination in `directory` and
    /// an activation of `segment_id` to it for `ad_targeting`.
    pub async fn file_activation(
        &self,
        segment_id: &str,
        directory: &str,
    ) -> (activation_pb::Destination, activation_pb::Activation) {
        let target = activation_pb::create_destination_request::Target::File(
            activation_pb::FileDestination {
                directory: directory.into(),
                format: activation_pb::FileFormat::Jsonl.into(),
            },
        );
        self.activate(segment_id, &format!("{directory} drop"), target)
            .await
    }

    /// Registers, as `marketer`, a destination named `name` delivering to
    /// `target`.
    pub async fn destination(
        &self,
        name: &str,
        target: activation_pb::create_destination_request::Target,
    ) -> activation_pb::Destination {
        self.activation(self.bearer(&["marketer"]))
            .create_destination(activation_pb::CreateDestinationRequest {
                name: name.into(),
                target: Some(target),
            })
            .await
            .expect("create destination")
            .into_inner()
            .destination
            .expect("destination")
    }

    /// Registers a destination of `kind` (as the policies name kinds) that
    /// is never synced to, for tests of what crosses to such a kind; returns
    /// its id.
    pub async fn destination_of_kind(&self, kind: &str) -> String {
        use activation_pb::create_destination_request::Target;
        let token = || activation_pb::SecretRef {
            source: Some(activation_pb::secret_ref::Source::Env("UNUSED".into())),
        };
        let target = match kind {
            "file" => Target::File(activation_pb::FileDestination {
                directory: "unused".into(),
                format: activation_pb::FileFormat::Jsonl.into(),
            }),
            "meta" => Target::Meta(activation_pb::MetaDestination {
                audience_id: "1".into(),
                access_token: Some(token()),
                base_url: String::new(),
            }),
            "google_ads" => Target::GoogleAds(activation_pb::GoogleAdsDestination {
                customer_id: "1".into(),
                user_list_id: "2".into(),
                login_customer_id: String::new(),
                access_token: Some(token()),
                developer_token: Some(token()),
                base_url: String::new(),
                oauth: None,
            }),
            "the_trade_desk" => Target::TheTradeDesk(activation_pb::TradeDeskDestination {
                advertiser_id: "a".into(),
                crm_data_id: "c".into(),
                auth_token: Some(token()),
                base_url: String::new(),
            }),
            other => panic!("no sample destination of kind {other}"),
        };
        // Names are unique per suite; a test may ask for a kind twice.
        let name = format!("{kind} sample {}", uuid::Uuid::now_v7());
        let destination = self.destination(&name, target).await;
        assert_eq!(destination.kind, kind);
        destination.destination_id
    }

    /// Creates, as `marketer`, a destination named `name` delivering to
    /// `target` and an activation of `segment_id` to it for `ad_targeting`.
    pub async fn activate(
        &self,
        segment_id: &str,
        name: &str,
        target: activation_pb::create_destination_request::Target,
    ) -> (activation_pb::Destination, activation_pb::Activation) {
        let destination = self.destination(name, target).await;
        let activated = self
            .activation(self.bearer(&["marketer"]))
            .create_activation(activation_pb::CreateActivationRequest {
                segment_id: segment_id.into(),
                destination_id: destination.destination_id.clone(),
                purpose: "ad_targeting".into(),
                sync_every: None,
            })
            .await
            .expect("create activation")
            .into_inner()
            .activation
            .expect("activation");
        (destination, activated)
    }

    /// Waits (up to 15 s) for the newest run of an activation with `trigger`
    /// (`consent_withdrawal`, `erasure`) to finish, and returns it.
    pub async fn finished_run(&self, activation_id: &str, trigger: &str) -> activation_pb::SyncRun {
        let mut compliance = self.activation(self.bearer(&["compliance"]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let runs = compliance
                .list_sync_runs(activation_pb::ListSyncRunsRequest {
                    activation_id: activation_id.into(),
                    page_size: 10,
                })
                .await
                .expect("compliance lists runs")
                .into_inner()
                .runs;
            let found = runs
                .into_iter()
                .find(|run| run.trigger == trigger && run.finished_at.is_some());
            if let Some(run) = found {
                return run;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no finished {trigger} run"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The gateway's whole audit trail, read as compliance.
    pub async fn audit_records(&self) -> Vec<madtech_proto::gateway::v1::AuditRecord> {
        madtech_proto::gateway::v1::audit_service_client::AuditServiceClient::with_interceptor(
            self.gateway_channel(),
            self.bearer(&["compliance"]),
        )
        .list_audit_records(madtech_proto::gateway::v1::ListAuditRecordsRequest {
            after_seq: 0,
            page_size: 0,
        })
        .await
        .expect("compliance reads the audit trail")
        .into_inner()
        .records
    }

    /// Exports `segment_id` for `ad_targeting` to a file destination as the
    /// activation service does, and returns every member that crossed.
    pub async fn export(&self, segment_id: &str) -> Vec<segments_pb::AudienceMember> {
        let destination_id = self
            .export_destination
            .get_or_init(|| self.destination_of_kind("file"))
            .await;
        let mut stream = self
            .segments(self.bearer(&["activation"]))
            .export_audience(segments_pb::ExportAudienceRequest {
                segment_id: segment_id.into(),
                destination_id: destination_id.clone(),
                destination_kind: String::new(),
                purpose: "ad_targeting".into(),
                snapshot_cursor: 0,
                current_membership: false,
            })
            .await
            .expect("export")
            .into_inner();
        let mut members = Vec::new();
        while let Some(chunk) = stream.message().await.expect("chunk") {
            members.extend(chunk.members);
        }
        members
    }

    /// A suite on SQLite whose gateway reads its own copy of the policies
    /// (returned, for the test to change) and looks for changes every
    /// 50 ms; `adjust` changes the rest of its configuration.
    pub async fn start_with_own_policies(
        adjust: impl FnOnce(&mut MadtechConfig),
    ) -> (Suite, tempfile::TempDir) {
        let policies = Suite::copy_of_policies();
        let dir = policies.path().to_path_buf();
        let suite = Suite::start_with(Backend::Sqlite, move |config| {
            config.gateway.policy_dir = dir;
            config.gateway.policy_reload_interval = std::time::Duration::from_millis(50);
            adjust(config);
        })
        .await;
        (suite, policies)
    }

    /// People who agreed to ad targeting, by email, in `region`; their
    /// profile ids.
    pub async fn consenting_people(&self, emails: &[&str], region: &str) -> Vec<String> {
        let mut consent = self.consent(self.bearer(&["admin"]));
        let mut ids = Vec::new();
        for email in emails {
            let id = self.person(email, region, Default::default()).await;
            crate::crossing::record(
                &mut consent,
                &id,
                madtech_proto::consent::v1::ConsentState::Granted,
                region,
            )
            .await;
            ids.push(id);
        }
        ids
    }

    /// A copy of the shipped policy files in a directory of its own, for
    /// tests that change policy while the suite runs.
    fn copy_of_policies() -> tempfile::TempDir {
        let policies = tempfile::tempdir().expect("policy dir");
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        for entry in std::fs::read_dir(&shipped).expect("policies") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "conf" || e == "csv") {
                std::fs::copy(&path, policies.path().join(path.file_name().expect("name")))
                    .expect("copy");
            }
        }
        policies
    }

    /// Stops the suite and waits for every component to drain.
    pub async fn stop(self) {
        self.running.stop().await.expect("suite ran cleanly");
    }

    /// Stops the suite and keeps its databases and data directory for
    /// [`Suite::start_on`].
    pub async fn stop_keeping_data(self) -> Kept {
        self.running.stop().await.expect("suite ran cleanly");
        self.kept
    }
}

/// What a stopped suite leaves behind for the next one.
pub struct Kept {
    pub db: TestDatabase,
    data: tempfile::TempDir,
}
