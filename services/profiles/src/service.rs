//! The gRPC edge: protobuf in, validated domain types to the store, protobuf
//! out ([`crate::convert`] does the translating). No business rules live here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use madtech_common::changelog::{self, follow};
use madtech_common::error::FieldError;
use madtech_proto::profiles::v1 as pb;
use pb::profile_service_server::{ProfileService, ProfileServiceServer};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{self, change_to_pb, conflict_to_pb, profile_to_pb};
use crate::identity::{Identifier, Normaliser};
use crate::store::{Ingested, ProfileStore, Upserted};

const DEFAULT_PAGE_SIZE: u32 = 500;
const MAX_PAGE_SIZE: u32 = 10_000;
/// Change-log rows read per page while catching up a watcher.
const WATCH_PAGE: u64 = 64;

/// The profiles service's gRPC implementation.
#[derive(Clone)]
pub struct ProfileApi {
    store: Arc<ProfileStore>,
    normaliser: Normaliser,
    watch_poll_interval: Duration,
}

impl ProfileApi {
    /// The request's `identifier`, present and normalised.
    fn required_identifier(
        &self,
        identifier: Option<pb::Identifier>,
    ) -> Result<Identifier, FieldError> {
        let id = identifier.ok_or_else(|| FieldError::required("identifier"))?;
        self.normaliser.normalise("identifier", &id.kind, &id.value)
    }

    pub fn new(store: ProfileStore, normaliser: Normaliser, watch_poll_interval: Duration) -> Self {
        ProfileApi {
            store: Arc::new(store),
            normaliser,
            watch_poll_interval,
        }
    }

    pub fn into_server(self) -> ProfileServiceServer<Self> {
        ProfileServiceServer::new(self)
    }

    async fn ingest(&self, events: Vec<pb::Event>) -> Result<Ingested, Status> {
        let events = convert::events_from(&self.normaliser, events)?;
        Ok(self.store.ingest(events).await?)
    }
}

fn upserted_to_pb(done: Upserted) -> pb::UpsertProfileResponse {
    pb::UpsertProfileResponse {
        profile: Some(profile_to_pb(&done.profile)),
        created: done.created,
        merged_profile_ids: done.merged,
        conflicts: done.kept_apart.iter().map(conflict_to_pb).collect(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ProfileService for ProfileApi {
    async fn upsert_profile(
        &self,
        request: Request<pb::UpsertProfileRequest>,
    ) -> Result<Response<pb::UpsertProfileResponse>, Status> {
        let upsert = convert::upsert_from(&self.normaliser, request.into_inner())?;
        let done = self.store.upsert(upsert).await?;
        Ok(Response::new(upserted_to_pb(done)))
    }

    async fn batch_upsert_profiles(
        &self,
        request: Request<pb::BatchUpsertProfilesRequest>,
    ) -> Result<Response<pb::BatchUpsertProfilesResponse>, Status> {
        let upserts = convert::upserts_from(&self.normaliser, request.into_inner().upserts)?;
        let done = self.store.upsert_many(upserts).await?;
        Ok(Response::new(pb::BatchUpsertProfilesResponse {
            results: done.into_iter().map(upserted_to_pb).collect(),
        }))
    }

    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let lookup = convert::lookup(&self.normaliser, request.into_inner().lookup)?;
        let profile = self.store.find(&lookup).await?;
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(profile_to_pb(&profile)),
        }))
    }

    type ListProfilesStream = BoxStream<pb::ListProfilesResponse>;

    async fn list_profiles(
        &self,
        request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<Self::ListProfilesStream>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            _ => {
                return Err(
                    FieldError::new("page_size", format!("at most {MAX_PAGE_SIZE}")).into(),
                );
            }
        };
        let store = Arc::clone(&self.store);
        let mut after = request.after_profile_id;
        let stream = async_stream::try_stream! {
            loop {
                let page = store.list_page(&after, u64::from(page_size)).await.map_err(Status::from)?;
                let Some(last) = page.last() else { break };
                after = last.id.clone();
                let full = page.len() == page_size as usize;
                yield pb::ListProfilesResponse { profiles: page.iter().map(profile_to_pb).collect() };
                if !full { break; }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn remove_identifier(
        &self,
        request: Request<pb::RemoveIdentifierRequest>,
    ) -> Result<Response<pb::RemoveIdentifierResponse>, Status> {
        let id = self.required_identifier(request.into_inner().identifier)?;
        let profile = self.store.remove_identifier(&id).await?;
        Ok(Response::new(pb::RemoveIdentifierResponse {
            profile: Some(profile_to_pb(&profile)),
        }))
    }

    async fn track(
        &self,
        request: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        let event = request
            .into_inner()
            .event
            .ok_or_else(|| FieldError::required("event"))?;
        let event = convert::event_from(&self.normaliser, "event", event)?;
        let message_id = event.message_id.clone();
        let done = self.store.ingest(vec![event]).await?;
        let profile_id = match done.profile_ids.first() {
            Some(Some(id)) => id.clone(),
            // A duplicate: answer who it was recorded for the first time.
            _ => self.store.event_owner(&message_id).await?,
        };
        Ok(Response::new(pb::TrackResponse {
            profile_id,
            duplicate: done.duplicates > 0,
        }))
    }

    async fn ingest_events(
        &self,
        request: Request<pb::IngestEventsRequest>,
    ) -> Result<Response<pb::IngestEventsResponse>, Status> {
        let done = self.ingest(request.into_inner().events).await?;
        Ok(Response::new(pb::IngestEventsResponse {
            accepted: done.accepted,
            duplicates: done.duplicates,
            conflicts: done.kept_apart.iter().map(conflict_to_pb).collect(),
        }))
    }

    async fn ingest_event_stream(
        &self,
        request: Request<Streaming<pb::IngestEventStreamRequest>>,
    ) -> Result<Response<pb::IngestEventStreamResponse>, Status> {
        let mut batches = request.into_inner();
        let mut total = Ingested::default();
        let mut committed = 0u64;
        while let Some(batch) = batches.next().await {
            let done = match batch {
                Ok(batch) => self.ingest(batch.events).await,
                Err(status) => Err(status),
            };
            let done = done.map_err(|status| {
                Status::new(
                    status.code(),
                    format!(
                        "batch {}: {} ({committed} earlier batches were committed)",
                        committed,
                        status.message()
                    ),
                )
            })?;
            committed += 1;
            total.accepted += done.accepted;
            total.duplicates += done.duplicates;
            total.kept_apart.extend(done.kept_apart);
        }
        Ok(Response::new(pb::IngestEventStreamResponse {
            accepted: total.accepted,
            duplicates: total.duplicates,
            conflicts: total.kept_apart.iter().map(conflict_to_pb).collect(),
            batches: committed,
        }))
    }

    type WatchProfileChangesStream = BoxStream<pb::WatchProfileChangesResponse>;

    async fn watch_profile_changes(
        &self,
        request: Request<pb::WatchProfileChangesRequest>,
    ) -> Result<Response<Self::WatchProfileChangesStream>, Status> {
        let cursor = request.into_inner().after_cursor;
        let store = Arc::clone(&self.store);
        let appended = store.subscribe();
        let stream = follow(cursor, appended, self.watch_poll_interval, move |cursor| {
            let store = Arc::clone(&store);
            async move {
                let page = store.changes_after(cursor, WATCH_PAGE).await?;
                Ok::<_, Status>(changelog::Page {
                    items: page
                        .changes
                        .iter()
                        .map(|change| pb::WatchProfileChangesResponse {
                            change: Some(change_to_pb(change)),
                        })
                        .collect(),
                    read_to: page.read_to,
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_change_head(
        &self,
        _request: Request<pb::GetChangeHeadRequest>,
    ) -> Result<Response<pb::GetChangeHeadResponse>, Status> {
        Ok(Response::new(pb::GetChangeHeadResponse {
            cursor: self.store.head().await?,
        }))
    }

    async fn export_profile(
        &self,
        request: Request<pb::ExportProfileRequest>,
    ) -> Result<Response<pb::ExportProfileResponse>, Status> {
        let lookup = convert::lookup(&self.normaliser, request.into_inner().lookup)?;
        let export = self.store.export(&lookup).await?;
        let profile_id = export["profile_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let json = serde_json::to_vec_pretty(&export)
            .map_err(|err| madtech_common::error::internal("export encoding", &err))?;
        Ok(Response::new(pb::ExportProfileResponse {
            profile_id,
            json,
        }))
    }

    async fn erase_profile(
        &self,
        request: Request<pb::EraseProfileRequest>,
    ) -> Result<Response<pb::EraseProfileResponse>, Status> {
        let request = request.into_inner();
        let lookup = convert::lookup(&self.normaliser, request.lookup)?;
        let erased = self.store.erase(&lookup, request.suppress).await?;
        tracing::info!(
            suppressed = request.suppress,
            profiles = erased.profile_ids.len(),
            identifiers = erased.identifiers,
            events = erased.events,
            "erased a person"
        );
        Ok(Response::new(pb::EraseProfileResponse {
            profile_ids: erased.profile_ids,
            identifiers: erased.identifiers,
            events: erased.events,
        }))
    }

    async fn lift_suppression(
        &self,
        request: Request<pb::LiftSuppressionRequest>,
    ) -> Result<Response<pb::LiftSuppressionResponse>, Status> {
        let request = request.into_inner();
        let id = self.required_identifier(request.identifier)?;
        let Some(then_upsert) = request.then_upsert else {
            let lifted = self.store.lift_suppression(&id).await?;
            return Ok(Response::new(pb::LiftSuppressionResponse {
                lifted,
                upserted: None,
            }));
        };
        let upsert = convert::upsert_from(&self.normaliser, then_upsert)
            .map_err(|err| err.within("then_upsert"))?;
        if !upsert.identifiers.contains(&id) {
            return Err(FieldError::new(
                "then_upsert.identifiers",
                "must include the identifier whose suppression is lifted",
            )
            .into());
        }
        let (lifted, upserted) = self.store.lift_and_upsert(upsert).await?;
        Ok(Response::new(pb::LiftSuppressionResponse {
            lifted,
            upserted: Some(upserted_to_pb(upserted)),
        }))
    }
}
