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
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::ActivationConfig;
use crate::destination::{Target, file_directory};
use crate::store::{Activation, ActivationStore, Destination, Phase, SyncRun};
use crate::sync::Syncer;

/// Progress messages buffered per RunSync stream before updates are dropped.
const PROGRESS_BUFFER: usize = 16;
/// Identifier hashes per data-subject lookup.
const MAX_HASHES: usize = 100;

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

#[derive(Clone)]
pub struct ActivationApi {
    store: Arc<ActivationStore>,
    syncer: Arc<Syncer>,
}

impl ActivationApi {
    pub fn new(store: ActivationStore, gateway: Channel, config: ActivationConfig) -> Self {
        let store = Arc::new(store);
        ActivationApi {
            syncer: Arc::new(Syncer::new(Arc::clone(&store), gateway, config)),
            store,
        }
    }

    pub fn into_server(self) -> ActivationServiceServer<Self> {
        ActivationServiceServer::new(self)
    }
}

fn target_from_pb(
    target: Option<pb::create_destination_request::Target>,
) -> Result<Target, FieldError> {
    use pb::create_destination_request::Target as T;
    match target {
        None => Err(FieldError::new(
            "target",
            "name where the destination delivers (file)",
        )),
        Some(T::File(file)) => {
            match pb::FileFormat::try_from(file.format) {
                Ok(pb::FileFormat::Jsonl) => {}
                _ => return Err(FieldError::new("file.format", "must be JSONL")),
            }
            Ok(Target::File {
                directory: file_directory("file.directory", &file.directory)?,
            })
        }
    }
}

fn destination_to_pb(destination: &Destination) -> pb::Destination {
    let Target::File { directory } = &destination.target;
    pb::Destination {
        destination_id: destination.id.clone(),
        name: destination.name.clone(),
        target: Some(pb::destination::Target::File(pb::FileDestination {
            directory: directory.display().to_string(),
            format: pb::FileFormat::Jsonl.into(),
        })),
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
    }
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

    async fn create_activation(
        &self,
        request: Request<pb::CreateActivationRequest>,
    ) -> Result<Response<pb::CreateActivationResponse>, Status> {
        let request = request.into_inner();
        let segment_id = require("segment_id", &request.segment_id)?.to_string();
        let destination_id = require("destination_id", &request.destination_id)?.to_string();
        let purpose = validate::policy_name("purpose", &request.purpose)?;
        let activation = self
            .store
            .create_activation(segment_id, destination_id, purpose)
            .await?;
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
        // Check before starting so a bad id answers NOT_FOUND, not a stream.
        self.store.activation(&activation_id).await?;
        let (progress, updates) = mpsc::channel(PROGRESS_BUFFER);
        let (answers, stream) = mpsc::channel(PROGRESS_BUFFER);
        let syncer = Arc::clone(&self.syncer);
        // The run continues if the caller goes away: a sync is never left
        // half-recorded because a client disconnected.
        tokio::spawn(async move {
            let forward = forward_progress(updates, answers.clone());
            let (outcome, ()) = tokio::join!(syncer.run(&activation_id, progress), forward);
            if let Err(err) = outcome {
                let _ = answers.send(Err(Status::from(err))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
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
        for (activation_id, pseudonymous_id, synced_at, confirmed) in
            self.store.holders_of(&hashes).await?
        {
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
                pseudonymous_id,
                synced_at: Some(from_micros(synced_at)),
                confirmed,
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
