//! The gRPC edge of the activation service.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use madtech_common::error::FieldError;
use madtech_common::validate::{self, require};
use madtech_proto::activation::v1 as pb;
use madtech_proto::time::from_micros;
use pb::activation_service_server::{ActivationService, ActivationServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::destination::{
    FileFormat, GOOGLE_TOKEN_URL, OAuthRefresh, SecretRef, Target, WEBHOOK_DEFAULT_BATCH,
    WEBHOOK_MAX_BATCH, endpoint_url, file_directory,
};
use crate::store::{
    Activation, ActivationStore, BatchRecord, Destination, Phase, SyncRun, Trigger,
};
use crate::sync::Syncer;

/// Progress messages buffered per RunSync stream before updates are dropped.
const PROGRESS_BUFFER: usize = 16;
use madtech_proto::activation::MAX_IDENTIFIER_HASHES as MAX_HASHES;

/// 1 to 100 lower-case hex SHA-256 hashes.
fn identifier_hashes(hashes: &[String]) -> Result<Vec<String>, FieldError> {
    if hashes.is_empty() || hashes.len() > MAX_HASHES {
        return Err(FieldError::new(
            "identifier_sha256s",
            format!("1 to {MAX_HASHES} hashes"),
        ));
    }
    validate::each("identifier_sha256s", hashes, |field, hash| {
        let hex = hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex {
            Ok(hash.clone())
        } else {
            Err(FieldError::new(field, "must be a lower-case hex SHA-256"))
        }
    })
}

/// Where each platform's API is unless a destination names a base URL.
const META_GRAPH_API: &str = "https://graph.facebook.com/v21.0";
const GOOGLE_ADS_API: &str = "https://googleads.googleapis.com/v21";
const TRADE_DESK_API: &str = "https://api.thetradedesk.com/v3";
const LINKEDIN_API: &str = "https://api.linkedin.com/rest";

/// `value` when it is 1 to 64 ASCII digits.
fn digits<'a>(field: &str, value: &'a str) -> Result<&'a str, FieldError> {
    let value = require(field, value)?;
    if value.len() > 64 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldError::new(field, "must be digits only"));
    }
    Ok(value)
}

/// `value` when it is 1 to 64 ASCII letters and digits.
fn alphanumeric<'a>(field: &str, value: &'a str) -> Result<&'a str, FieldError> {
    let value = require(field, value)?;
    if value.len() > 64 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(FieldError::new(field, "must be letters and digits only"));
    }
    Ok(value)
}

/// The destination's base URL, or the platform's when none is given.
fn base_url(field: &str, url: &str, default: &str) -> Result<String, FieldError> {
    if url.trim().is_empty() {
        Ok(default.to_string())
    } else {
        endpoint_url(field, url)
    }
}

/// Runs listed when the caller names no page size, and the most.
const RUNS_PAGE: u32 = 100;
const RUNS_PAGE_MAX: u32 = 1_000;

#[derive(Clone)]
pub struct ActivationApi {
    store: Arc<ActivationStore>,
    syncer: Arc<Syncer>,
    /// Woken when an activation is created, so the consent follower starts
    /// following its destination.
    activations_changed: Arc<tokio::sync::Notify>,
}

impl ActivationApi {
    pub fn new(
        store: Arc<ActivationStore>,
        syncer: Arc<Syncer>,
        activations_changed: Arc<tokio::sync::Notify>,
    ) -> Self {
        ActivationApi {
            store,
            syncer,
            activations_changed,
        }
    }

    pub fn into_server(self) -> ActivationServiceServer<Self> {
        ActivationServiceServer::new(self)
    }
}

fn secret_from_pb(field: &str, secret: Option<pb::SecretRef>) -> Result<SecretRef, FieldError> {
    use pb::secret_ref::Source;
    match secret.and_then(|secret| secret.source) {
        Some(Source::Env(name)) => SecretRef::env(&format!("{field}.env"), &name),
        Some(Source::File(path)) => SecretRef::file(&format!("{field}.file"), &path),
        None => Err(FieldError::new(
            field,
            "name an environment variable or a file holding it",
        )),
    }
}

fn secret_to_pb(secret: &SecretRef) -> pb::SecretRef {
    use pb::secret_ref::Source;
    pb::SecretRef {
        source: Some(match secret {
            SecretRef::Env(name) => Source::Env(name.clone()),
            SecretRef::File(path) => Source::File(path.display().to_string()),
        }),
    }
}

fn oauth_from_pb(oauth: pb::OAuthRefresh) -> Result<OAuthRefresh, FieldError> {
    Ok(OAuthRefresh {
        token_url: base_url(
            "google_ads.oauth.token_url",
            &oauth.token_url,
            GOOGLE_TOKEN_URL,
        )?,
        client_id: validate::text("google_ads.oauth.client_id", &oauth.client_id, 512)?.to_string(),
        client_secret: secret_from_pb("google_ads.oauth.client_secret", oauth.client_secret)?,
        refresh_token: secret_from_pb("google_ads.oauth.refresh_token", oauth.refresh_token)?,
    })
}

fn target_from_pb(
    target: Option<pb::create_destination_request::Target>,
) -> Result<Target, FieldError> {
    use pb::create_destination_request::Target as T;
    match target {
        None => Err(FieldError::new(
            "target",
            "name where the destination delivers (file, meta, webhook, google_ads, the_trade_desk, linkedin)",
        )),
        Some(T::File(file)) => Ok(Target::File {
            directory: file_directory("file.directory", &file.directory)?,
            format: match pb::FileFormat::try_from(file.format) {
                Ok(pb::FileFormat::Jsonl) => FileFormat::Jsonl,
                Ok(pb::FileFormat::Csv) => FileFormat::Csv,
                _ => return Err(FieldError::new("file.format", "must be JSONL or CSV")),
            },
        }),
        Some(T::Meta(meta)) => Ok(Target::Meta {
            audience_id: digits("meta.audience_id", &meta.audience_id)?.to_string(),
            access_token: secret_from_pb("meta.access_token", meta.access_token)?,
            base_url: base_url("meta.base_url", &meta.base_url, META_GRAPH_API)?,
        }),
        Some(T::GoogleAds(google)) => Ok(Target::GoogleAds {
            customer_id: digits("google_ads.customer_id", &google.customer_id)?.to_string(),
            user_list_id: digits("google_ads.user_list_id", &google.user_list_id)?.to_string(),
            login_customer_id: if google.login_customer_id.is_empty() {
                String::new()
            } else {
                digits("google_ads.login_customer_id", &google.login_customer_id)?.to_string()
            },
            access_token: match (google.access_token, &google.oauth) {
                (Some(token), None) => {
                    Some(secret_from_pb("google_ads.access_token", Some(token))?)
                }
                (None, Some(_)) => None,
                _ => {
                    return Err(FieldError::new(
                        "google_ads.access_token",
                        "set exactly one of access_token and oauth",
                    ));
                }
            },
            developer_token: secret_from_pb("google_ads.developer_token", google.developer_token)?,
            base_url: base_url("google_ads.base_url", &google.base_url, GOOGLE_ADS_API)?,
            oauth: google.oauth.map(oauth_from_pb).transpose()?,
        }),
        Some(T::TheTradeDesk(ttd)) => Ok(Target::TheTradeDesk {
            advertiser_id: alphanumeric("the_trade_desk.advertiser_id", &ttd.advertiser_id)?
                .to_string(),
            crm_data_id: alphanumeric("the_trade_desk.crm_data_id", &ttd.crm_data_id)?.to_string(),
            auth_token: secret_from_pb("the_trade_desk.auth_token", ttd.auth_token)?,
            base_url: base_url("the_trade_desk.base_url", &ttd.base_url, TRADE_DESK_API)?,
        }),
        Some(T::Linkedin(linkedin)) => Ok(Target::Linkedin {
            segment_id: digits("linkedin.segment_id", &linkedin.segment_id)?.to_string(),
            access_token: secret_from_pb("linkedin.access_token", linkedin.access_token)?,
            base_url: base_url("linkedin.base_url", &linkedin.base_url, LINKEDIN_API)?,
        }),
        Some(T::Webhook(webhook)) => {
            let batch_size = match webhook.batch_size as usize {
                0 => WEBHOOK_DEFAULT_BATCH,
                n if n <= WEBHOOK_MAX_BATCH => n,
                _ => {
                    return Err(FieldError::new(
                        "webhook.batch_size",
                        format!("at most {WEBHOOK_MAX_BATCH}"),
                    ));
                }
            };
            Ok(Target::Webhook {
                url: endpoint_url("webhook.url", &webhook.url)?,
                signing_secret: secret_from_pb("webhook.signing_secret", webhook.signing_secret)?,
                batch_size,
            })
        }
    }
}

fn destination_to_pb(destination: &Destination) -> pb::Destination {
    use pb::destination::Target as T;
    let target = match &destination.target {
        Target::File { directory, format } => T::File(pb::FileDestination {
            directory: directory.display().to_string(),
            format: match format {
                FileFormat::Jsonl => pb::FileFormat::Jsonl,
                FileFormat::Csv => pb::FileFormat::Csv,
            }
            .into(),
        }),
        Target::Meta {
            audience_id,
            access_token,
            base_url,
        } => T::Meta(pb::MetaDestination {
            audience_id: audience_id.clone(),
            access_token: Some(secret_to_pb(access_token)),
            base_url: base_url.clone(),
        }),
        Target::Webhook {
            url,
            signing_secret,
            batch_size,
        } => T::Webhook(pb::WebhookDestination {
            url: url.clone(),
            signing_secret: Some(secret_to_pb(signing_secret)),
            batch_size: u32::try_from(*batch_size).unwrap_or(u32::MAX),
        }),
        Target::GoogleAds {
            customer_id,
            user_list_id,
            login_customer_id,
            access_token,
            developer_token,
            base_url,
            oauth,
        } => T::GoogleAds(pb::GoogleAdsDestination {
            customer_id: customer_id.clone(),
            user_list_id: user_list_id.clone(),
            login_customer_id: login_customer_id.clone(),
            access_token: access_token.as_ref().map(secret_to_pb),
            developer_token: Some(secret_to_pb(developer_token)),
            base_url: base_url.clone(),
            oauth: oauth.as_ref().map(|oauth| pb::OAuthRefresh {
                client_id: oauth.client_id.clone(),
                client_secret: Some(secret_to_pb(&oauth.client_secret)),
                refresh_token: Some(secret_to_pb(&oauth.refresh_token)),
                token_url: oauth.token_url.clone(),
            }),
        }),
        Target::TheTradeDesk {
            advertiser_id,
            crm_data_id,
            auth_token,
            base_url,
        } => T::TheTradeDesk(pb::TradeDeskDestination {
            advertiser_id: advertiser_id.clone(),
            crm_data_id: crm_data_id.clone(),
            auth_token: Some(secret_to_pb(auth_token)),
            base_url: base_url.clone(),
        }),
        Target::Linkedin {
            segment_id,
            access_token,
            base_url,
        } => T::Linkedin(pb::LinkedInDestination {
            segment_id: segment_id.clone(),
            access_token: Some(secret_to_pb(access_token)),
            base_url: base_url.clone(),
        }),
    };
    pb::Destination {
        destination_id: destination.id.clone(),
        name: destination.name.clone(),
        kind: destination.target.kind().to_string(),
        target: Some(target),
        created_at: Some(from_micros(destination.created_at_micros)),
    }
}

fn activation_to_pb(activation: &Activation) -> pb::Activation {
    pb::Activation {
        activation_id: activation.id.clone(),
        segment_id: activation.segment_id.clone(),
        destination_id: activation.destination_id.clone(),
        purpose: activation.purpose.clone(),
        created_at: Some(from_micros(activation.created_at_micros)),
        sync_every: activation.sync_every.map(|every| prost_types::Duration {
            seconds: i64::try_from(every.as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        }),
    }
}

/// The longest schedule: a year.
const MAX_SYNC_EVERY_SECS: i64 = 366 * 24 * 3600;

/// A schedule of whole seconds, from one second to a year.
fn sync_every(
    every: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, FieldError> {
    let Some(every) = every else {
        return Ok(None);
    };
    if every.nanos != 0 || !(1..=MAX_SYNC_EVERY_SECS).contains(&every.seconds) {
        return Err(FieldError::new(
            "sync_every",
            "whole seconds, from 1 s to a year",
        ));
    }
    Ok(Some(std::time::Duration::from_secs(
        every.seconds.unsigned_abs(),
    )))
}

fn run_to_pb(run: &SyncRun) -> pb::SyncRun {
    pb::SyncRun {
        run_id: run.id.clone(),
        activation_id: run.activation_id.clone(),
        phase: match run.phase {
            Phase::Fetching => pb::SyncPhase::Fetching,
            Phase::Sending => pb::SyncPhase::Sending,
            Phase::Succeeded => pb::SyncPhase::Succeeded,
            Phase::Failed => pb::SyncPhase::Failed,
        }
        .into(),
        members_received: run.members_received,
        added: run.added,
        removed: run.removed,
        unchanged: run.unchanged,
        output: run.output.clone(),
        error: run.error.clone(),
        started_at: Some(from_micros(run.started_at_micros)),
        finished_at: run.finished_at_micros.map(from_micros),
        batches_sent: run.batches_sent,
        batches_rejected: run.batches_rejected,
        retries: run.retries,
        to_send: run.to_send,
        trigger: run.trigger.as_str().to_string(),
        policy_version: run.policy_version.clone(),
        full: run.full,
    }
}

fn batch_to_pb(batch: BatchRecord) -> pb::SyncBatch {
    pb::SyncBatch {
        op: batch.op.as_str().to_string(),
        seq: batch.seq,
        members: batch.members,
        outcome: batch.outcome.to_string(),
        http_status: batch.http_status.map_or(0, u32::from),
        digest: batch.digest,
        error: batch.error,
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::RunSyncResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ActivationService for ActivationApi {
    async fn create_destination(
        &self,
        request: Request<pb::CreateDestinationRequest>,
    ) -> Result<Response<pb::CreateDestinationResponse>, Status> {
        let request = request.into_inner();
        let name = validate::text("name", &request.name, 200)?.to_string();
        let target = target_from_pb(request.target)?;
        let destination = self.store.create_destination(name, target).await?;
        Ok(Response::new(pb::CreateDestinationResponse {
            destination: Some(destination_to_pb(&destination)),
        }))
    }

    async fn get_destination(
        &self,
        request: Request<pb::GetDestinationRequest>,
    ) -> Result<Response<pb::GetDestinationResponse>, Status> {
        let destination_id = require("destination_id", &request.get_ref().destination_id)?;
        let destination = self.store.destination(destination_id).await?;
        Ok(Response::new(pb::GetDestinationResponse {
            destination: Some(destination_to_pb(&destination)),
        }))
    }

    async fn create_activation(
        &self,
        request: Request<pb::CreateActivationRequest>,
    ) -> Result<Response<pb::CreateActivationResponse>, Status> {
        let request = request.into_inner();
        let segment_id = require("segment_id", &request.segment_id)?.to_string();
        let destination_id = require("destination_id", &request.destination_id)?.to_string();
        let purpose = validate::policy_name("purpose", &request.purpose)?;
        let sync_every = sync_every(request.sync_every)?;
        let activation = self
            .store
            .create_activation(segment_id, destination_id, purpose, sync_every)
            .await?;
        self.activations_changed.notify_one();
        Ok(Response::new(pb::CreateActivationResponse {
            activation: Some(activation_to_pb(&activation)),
        }))
    }

    type RunSyncStream = SyncStream;

    async fn run_sync(
        &self,
        request: Request<pb::RunSyncRequest>,
    ) -> Result<Response<Self::RunSyncStream>, Status> {
        let activation_id = require("activation_id", &request.get_ref().activation_id)?.to_string();
        let full = request.get_ref().full;
        // Check before starting so a bad id answers NOT_FOUND, not a stream.
        self.store.activation(&activation_id).await?;
        let (progress, updates) = mpsc::channel(PROGRESS_BUFFER);
        let (answers, stream) = mpsc::channel(PROGRESS_BUFFER);
        let syncer = Arc::clone(&self.syncer);
        // The run continues if the caller goes away: a sync is never left
        // half-recorded because a client disconnected.
        tokio::spawn(async move {
            let forward = forward_progress(updates, answers.clone());
            let (outcome, ()) = tokio::join!(
                syncer.run(&activation_id, Trigger::Sync, full, progress),
                forward
            );
            if let Err(err) = outcome {
                let _ = answers.send(Err(Status::from(err))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn get_sync_run(
        &self,
        request: Request<pb::GetSyncRunRequest>,
    ) -> Result<Response<pb::GetSyncRunResponse>, Status> {
        let run_id = require("run_id", &request.get_ref().run_id)?;
        let run = self.store.run(run_id).await?;
        let batches = self.store.batches(run_id).await?;
        Ok(Response::new(pb::GetSyncRunResponse {
            run: Some(run_to_pb(&run)),
            batches: batches.into_iter().map(batch_to_pb).collect(),
        }))
    }

    async fn list_sync_runs(
        &self,
        request: Request<pb::ListSyncRunsRequest>,
    ) -> Result<Response<pb::ListSyncRunsResponse>, Status> {
        let request = request.into_inner();
        let activation_id = require("activation_id", &request.activation_id)?;
        let page_size = match request.page_size {
            0 => RUNS_PAGE,
            n if n <= RUNS_PAGE_MAX => n,
            _ => {
                return Err(
                    FieldError::new("page_size", format!("at most {RUNS_PAGE_MAX}")).into(),
                );
            }
        };
        self.store.activation(activation_id).await?;
        let runs = self.store.runs(activation_id, u64::from(page_size)).await?;
        Ok(Response::new(pb::ListSyncRunsResponse {
            runs: runs.iter().map(run_to_pb).collect(),
        }))
    }

    async fn find_deliveries(
        &self,
        request: Request<pb::FindDeliveriesRequest>,
    ) -> Result<Response<pb::FindDeliveriesResponse>, Status> {
        let hashes = identifier_hashes(&request.get_ref().identifier_sha256s)?;
        let mut deliveries = Vec::new();
        // Each activation's destination looked up once, however many people
        // it holds.
        let mut destinations = std::collections::BTreeMap::new();
        for holding in self.store.holders_of(&hashes).await? {
            let activation_id = holding.activation_id;
            let destination_id = match destinations.get(&activation_id) {
                Some(id) => String::clone(id),
                None => {
                    let id = self.store.activation(&activation_id).await?.destination_id;
                    destinations.insert(activation_id.clone(), id.clone());
                    id
                }
            };
            deliveries.push(pb::Delivery {
                activation_id,
                destination_id,
                pseudonymous_id: holding.member.id,
                synced_at: Some(from_micros(holding.synced_at_micros)),
                confirmed: holding.confirmed,
            });
        }
        Ok(Response::new(pb::FindDeliveriesResponse { deliveries }))
    }

    async fn forget_people(
        &self,
        request: Request<pb::ForgetPeopleRequest>,
    ) -> Result<Response<pb::ForgetPeopleResponse>, Status> {
        let hashes = identifier_hashes(&request.get_ref().identifier_sha256s)?;
        let (removed, outputs) = self.syncer.forget(&hashes).await?;
        Ok(Response::new(pb::ForgetPeopleResponse { removed, outputs }))
    }
}

async fn forward_progress(
    mut updates: mpsc::Receiver<SyncRun>,
    answers: mpsc::Sender<Result<pb::RunSyncResponse, Status>>,
) {
    while let Some(run) = updates.recv().await {
        let message = pb::RunSyncResponse {
            run: Some(run_to_pb(&run)),
        };
        if answers.send(Ok(message)).await.is_err() {
            // The caller left; keep draining so the run is never blocked.
            while updates.recv().await.is_some() {}
            return;
        }
    }
}
