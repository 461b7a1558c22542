//! The gRPC edge of the segments service: rule trees from and to protobuf,
//! and the audience export stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use madtech_common::changelog::{Page, follow};
use madtech_common::error::FieldError;
use madtech_common::upstream::Upstream;
use madtech_common::validate::{self, require};
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as pb;
use madtech_proto::time::from_micros;
use pb::segment_service_server::{SegmentService, SegmentServiceServer};
use profiles_pb::profile_service_client::ProfileServiceClient;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::config::SegmentsConfig;
use crate::convert::{rule_from_request, rule_to_pb};
use crate::error::SegmentError;
use crate::evaluate::Evaluator;
use crate::rules::{Rule, text};
use crate::store::projection::{Projection, Selection};
use crate::store::sql::Compiler;
use crate::store::{Segment, SegmentStore};

/// Longest segment name accepted.
const MAX_NAME_LEN: usize = 200;
use madtech_proto::segments::MAX_PERSON_RECORD_KEYS as MAX_PERSON_IDS;

#[derive(Clone)]
pub struct SegmentApi {
    store: Arc<SegmentStore>,
    projection: Arc<Projection>,
    evaluator: Evaluator,
    profiles: ProfileServiceClient<Upstream>,
    config: SegmentsConfig,
}

impl SegmentApi {
    pub fn new(
        store: Arc<SegmentStore>,
        projection: Arc<Projection>,
        evaluator: Evaluator,
        profiles: ProfileServiceClient<Upstream>,
        config: SegmentsConfig,
    ) -> Self {
        SegmentApi {
            store,
            projection,
            evaluator,
            profiles,
            config,
        }
    }

    pub fn into_server(self) -> SegmentServiceServer<Self> {
        SegmentServiceServer::new(self)
    }
}

fn segment_to_pb(segment: &Segment) -> pb::Segment {
    pb::Segment {
        segment_id: segment.id.clone(),
        name: segment.name.clone(),
        rule: Some(rule_to_pb(&segment.rule)),
        created_at: Some(from_micros(segment.created_at_micros)),
        rule_text: text::print(&segment.rule),
    }
}

/// Sample size of a preview when the caller names none, and the most.
const DEFAULT_SAMPLE: u32 = 10;
const MAX_SAMPLE: u32 = 100;

impl SegmentApi {
    /// Memberships follow a new or changed rule without waiting for a
    /// request; an export of the current membership waits for it.
    fn compute_in_background(&self, segment: Segment) {
        let steps = self.evaluator.compute(segment);
        tokio::spawn(async move {
            let mut steps = Box::pin(steps);
            while let Some(step) = steps.next().await {
                if let Err(err) = step {
                    tracing::warn!(error = %err, "computing a new or changed segment failed");
                    break;
                }
            }
        });
    }

    /// Every stored segment's rule, for `in_segment`.
    async fn segment_rules(&self) -> Result<std::collections::BTreeMap<String, Rule>, Status> {
        Ok(self.store.rules().await?)
    }

    /// Waits until the projection (or, for `Fresh::Memberships`, the
    /// memberships evaluated from it) holds every profile change made
    /// before this call, so an export sees what callers wrote before asking.
    async fn catch_up(&self, fresh: Fresh) -> Result<(), Status> {
        let head = self
            .profiles
            .clone()
            .get_change_head(profiles_pb::GetChangeHeadRequest {})
            .await
            .map_err(SegmentError::Profiles)?
            .into_inner()
            .cursor;
        let deadline = tokio::time::Instant::now() + self.config.projection_freshness_timeout;
        loop {
            let reached = match fresh {
                Fresh::Projection => self.projection.cursor().await?,
                Fresh::Memberships => self.evaluator.evaluated(),
            };
            if reached >= head {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(
                    "the segments projection is behind the profiles service; retry",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// What a read must reflect every profile change made before it in.
#[derive(Clone, Copy)]
enum Fresh {
    /// The projection rules are evaluated over.
    Projection,
    /// The stored memberships.
    Memberships,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type ExportStream = BoxStream<pb::ExportAudienceResponse>;

/// Membership changes read per page while catching up a watcher.
const WATCH_PAGE: u64 = 500;

#[tonic::async_trait]
impl SegmentService for SegmentApi {
    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        let request = request.into_inner();
        let name = validate::text("name", &request.name, MAX_NAME_LEN)?.to_string();
        let rule = rule_from_request(request.rule.as_ref(), &request.rule_text)?;
        // A new segment cannot be referred to yet: only existence matters.
        rule.check_references("", &self.segment_rules().await?)
            .map_err(|reason| FieldError::new("rule", reason))?;
        let segment = self.store.create(name, rule).await?;
        self.compute_in_background(segment.clone());
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(segment_to_pb(&segment)),
        }))
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::UpdateSegmentResponse>, Status> {
        let request = request.into_inner();
        let segment_id = require("segment_id", &request.segment_id)?.to_string();
        let rule = rule_from_request(request.rule.as_ref(), &request.rule_text)?;
        self.store.get(&segment_id).await?;
        rule.check_references(&segment_id, &self.segment_rules().await?)
            .map_err(|reason| FieldError::new("rule", reason))?;
        let segment = self.store.update_rule(&segment_id, rule).await?;
        self.compute_in_background(segment.clone());
        Ok(Response::new(pb::UpdateSegmentResponse {
            segment: Some(segment_to_pb(&segment)),
        }))
    }

    async fn validate_rule(
        &self,
        request: Request<pb::ValidateRuleRequest>,
    ) -> Result<Response<pb::ValidateRuleResponse>, Status> {
        let request = request.into_inner();
        let rule = rule_from_request(request.rule.as_ref(), &request.rule_text)?;
        Ok(Response::new(pb::ValidateRuleResponse {
            rule: Some(rule_to_pb(&rule)),
            rule_text: text::print(&rule),
        }))
    }

    async fn preview_segment(
        &self,
        request: Request<pb::PreviewSegmentRequest>,
    ) -> Result<Response<pb::PreviewSegmentResponse>, Status> {
        let request = request.into_inner();
        let rule = rule_from_request(request.rule.as_ref(), &request.rule_text)?;
        let sample = match request.sample_size {
            0 => DEFAULT_SAMPLE,
            n if n <= MAX_SAMPLE => n,
            _ => {
                return Err(FieldError::new("sample_size", format!("at most {MAX_SAMPLE}")).into());
            }
        };
        self.catch_up(Fresh::Projection).await?;
        let rules = self.segment_rules().await?;
        let compiler = Compiler {
            backend: self.projection.backend(),
            now_micros: chrono::Utc::now().timestamp_micros(),
            segments: &rules,
        };
        let count = self.projection.count(&rule, &compiler).await?;
        let members = self
            .projection
            .members(Selection::Rule(&rule, &compiler), "", u64::from(sample))
            .await?;
        Ok(Response::new(pb::PreviewSegmentResponse {
            count,
            sample_profile_ids: members.into_iter().map(|m| m.profile_id).collect(),
            rule_text: text::print(&rule),
        }))
    }

    type ComputeSegmentStream = BoxStream<pb::ComputeSegmentResponse>;

    async fn compute_segment(
        &self,
        request: Request<pb::ComputeSegmentRequest>,
    ) -> Result<Response<Self::ComputeSegmentStream>, Status> {
        let segment_id = require("segment_id", &request.get_ref().segment_id)?.to_string();
        let segment = self.store.get(&segment_id).await?;
        self.catch_up(Fresh::Projection).await?;
        let stream = self.evaluator.compute(segment).map(|step| {
            step.map(|p| pb::ComputeSegmentResponse {
                processed: p.processed,
                total: p.total,
                entered: p.entered,
                exited: p.exited,
                members: p.members,
                done: p.done,
                cursor: p.cursor,
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchMembershipChangesStream = BoxStream<pb::WatchMembershipChangesResponse>;

    async fn watch_membership_changes(
        &self,
        request: Request<pb::WatchMembershipChangesRequest>,
    ) -> Result<Response<Self::WatchMembershipChangesStream>, Status> {
        let request = request.into_inner();
        let segment_id = require("segment_id", &request.segment_id)?.to_string();
        self.store.get(&segment_id).await?;
        let memberships = self.evaluator.memberships();
        let appended = memberships.subscribe();
        let stream = follow(
            request.after_cursor,
            appended,
            self.config.watch_poll_interval,
            move |cursor| {
                let memberships = Arc::clone(&memberships);
                let segment_id = segment_id.clone();
                async move {
                    let changes = memberships
                        .changes_after(&segment_id, cursor, WATCH_PAGE)
                        .await?;
                    Ok::<_, Status>(Page {
                        read_to: changes.last().map_or(cursor, |c| c.cursor),
                        items: changes
                            .into_iter()
                            .map(|c| pb::WatchMembershipChangesResponse {
                                change: Some(pb::MembershipChange {
                                    cursor: c.cursor,
                                    profile_id: c.profile_id,
                                    entered: c.entered,
                                    at: Some(from_micros(c.at_micros)),
                                }),
                            })
                            .collect(),
                    })
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        let id = require("segment_id", &request.get_ref().segment_id)?;
        let segment = self.store.get(id).await?;
        Ok(Response::new(pb::GetSegmentResponse {
            segment: Some(segment_to_pb(&segment)),
        }))
    }

    type ExportAudienceStream = ExportStream;

    async fn get_person_records(
        &self,
        request: Request<pb::GetPersonRecordsRequest>,
    ) -> Result<Response<pb::GetPersonRecordsResponse>, Status> {
        let request = request.into_inner();
        if request.profile_ids.is_empty() && request.identifiers.is_empty() {
            return Err(FieldError::new(
                "profile_ids",
                "at least one profile id or identifier is required",
            )
            .into());
        }
        if request.profile_ids.len() > MAX_PERSON_IDS {
            return Err(FieldError::new(
                "profile_ids",
                format!("at most {MAX_PERSON_IDS} profile ids"),
            )
            .into());
        }
        if request.identifiers.len() > MAX_PERSON_IDS {
            return Err(FieldError::new(
                "identifiers",
                format!("at most {MAX_PERSON_IDS} identifiers"),
            )
            .into());
        }
        let profile_ids = validate::each("profile_ids", &request.profile_ids, |field, id| {
            validate::text(field, id, MAX_NAME_LEN).map(str::to_string)
        })?;
        let identifiers = validate::each("identifiers", &request.identifiers, |field, id| {
            let kind = validate::text(&format!("{field}.kind"), &id.kind, MAX_NAME_LEN)?;
            let value = validate::text(&format!("{field}.value"), &id.value, MAX_NAME_LEN)?;
            Ok((kind.to_string(), value.to_string()))
        })?;
        let memberships = self.evaluator.memberships().of_people(&profile_ids).await?;
        let projection_rows = self
            .projection
            .rows_about(&profile_ids, &identifiers)
            .await?;
        Ok(Response::new(pb::GetPersonRecordsResponse {
            memberships: memberships
                .into_iter()
                .map(
                    |(segment_id, profile_id, entered_at)| pb::PersonMembership {
                        segment_id,
                        profile_id,
                        entered_at: Some(from_micros(entered_at)),
                    },
                )
                .collect(),
            projection_rows,
        }))
    }

    async fn export_audience(
        &self,
        request: Request<pb::ExportAudienceRequest>,
    ) -> Result<Response<Self::ExportAudienceStream>, Status> {
        let request = request.into_inner();
        let segment_id = audience_request(
            &request.segment_id,
            &request.destination_id,
            &request.purpose,
        )?;
        if request.current_membership && request.snapshot_cursor != 0 {
            return Err(FieldError::new(
                "snapshot_cursor",
                "a snapshot and the current membership exclude each other",
            )
            .into());
        }
        let segment = self.store.get(segment_id).await?;
        let segment_id = segment.id.clone();
        let snapshot = request.snapshot_cursor;
        let current_membership = request.current_membership;

        let membership_cursor = if current_membership {
            self.catch_up(Fresh::Memberships).await?;
            self.evaluator.computed(&segment_id).await;
            // Read before the pages: a change after it that a page already
            // shows comes again from ExportAudienceChanges, which a sync
            // applies idempotently.
            Some(self.evaluator.memberships().head().await?)
        } else {
            self.catch_up(Fresh::Projection).await?;
            (snapshot != 0).then_some(snapshot)
        };
        let rules = self.segment_rules().await?;
        let projection = Arc::clone(&self.projection);
        let chunk = u64::from(self.config.export_chunk_size);
        let now_micros = chrono::Utc::now().timestamp_micros();
        let rule = segment.rule;
        // One page of members per message the caller pulls keeps the export's
        // memory flat whatever the audience size.
        let stream = async_stream::try_stream! {
            let compiler = Compiler {
                backend: projection.backend(),
                now_micros,
                segments: &rules,
            };
            let mut after = String::new();
            loop {
                let selection = match snapshot {
                    _ if current_membership => Selection::Members { segment_id: &segment_id },
                    0 => Selection::Rule(&rule, &compiler),
                    cursor => Selection::Snapshot { segment_id: &segment_id, cursor },
                };
                let page = projection.export_page(selection, &after, chunk).await.map_err(Status::from)?;
                let Some(last) = page.last else { break };
                after = last;
                let full = page.members == chunk;
                // The documents are the page's encoding: sent as they are.
                yield pb::ExportAudienceResponse::encoded(page.documents.into());
                if !full { break; }
            }
        };
        let mut response = Response::new(Box::pin(stream) as ExportStream);
        if let Some(cursor) = membership_cursor {
            response.metadata_mut().insert(
                madtech_proto::segments::MEMBERSHIP_CURSOR_HEADER,
                tonic::metadata::MetadataValue::from(cursor),
            );
        }
        Ok(response)
    }

    type ExportAudienceChangesStream = BoxStream<pb::ExportAudienceChangesResponse>;

    async fn export_audience_changes(
        &self,
        request: Request<pb::ExportAudienceChangesRequest>,
    ) -> Result<Response<Self::ExportAudienceChangesStream>, Status> {
        let request = request.into_inner();
        let segment_id = audience_request(
            &request.segment_id,
            &request.destination_id,
            &request.purpose,
        )?;
        let segment_id = self.store.get(segment_id).await?.id;
        let changes = AudienceChanges {
            memberships: self.evaluator.memberships(),
            projection: Arc::clone(&self.projection),
            segment_id,
        };
        if !request.until_head {
            let appended = changes.memberships.subscribe();
            let stream = follow(
                request.after_cursor,
                appended,
                self.config.watch_poll_interval,
                move |cursor| {
                    let changes = changes.clone();
                    async move {
                        let (read_to, page) = changes.after(cursor, u64::MAX).await?;
                        Ok::<_, Status>(Page {
                            read_to,
                            items: page.into_iter().collect(),
                        })
                    }
                },
            );
            return Ok(Response::new(Box::pin(stream)));
        }
        // Everything recorded before the call, then the end.
        self.catch_up(Fresh::Memberships).await?;
        let head = changes.memberships.head().await?;
        let stream = async_stream::try_stream! {
            let mut cursor = request.after_cursor;
            while cursor < head {
                let (read_to, page) = changes.after(cursor, head).await?;
                let Some(page) = page else { break };
                cursor = read_to;
                yield page;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Checks what both audience exports name (the segment, the destination,
/// the purpose); the segment id.
fn audience_request<'r>(
    segment_id: &'r str,
    destination_id: &str,
    purpose: &str,
) -> Result<&'r str, FieldError> {
    let segment_id = require("segment_id", segment_id)?;
    require("destination_id", destination_id)?;
    validate::policy_name("purpose", purpose)?;
    Ok(segment_id)
}

/// A segment's membership changes with the members as an export sends them.
#[derive(Clone)]
struct AudienceChanges {
    memberships: Arc<crate::store::membership::Memberships>,
    projection: Arc<Projection>,
    segment_id: String,
}

impl AudienceChanges {
    /// The page of changes after `cursor` up to `head`: how far it read,
    /// and the page (`None` when there was nothing).
    async fn after(
        &self,
        cursor: u64,
        head: u64,
    ) -> Result<(u64, Option<pb::ExportAudienceChangesResponse>), SegmentError> {
        let mut changes = self
            .memberships
            .changes_after(&self.segment_id, cursor, WATCH_PAGE)
            .await?;
        changes.retain(|change| change.cursor <= head);
        let Some(read_to) = changes.last().map(|change| change.cursor) else {
            return Ok((cursor, None));
        };
        let entered: Vec<String> = changes
            .iter()
            .filter(|change| change.entered)
            .map(|change| change.profile_id.clone())
            .collect();
        // The stored documents are the members' wire form: decoded as the
        // message they are, not through the projection's own types.
        let members: std::collections::HashMap<String, pb::AudienceMember> = if entered.is_empty() {
            Default::default()
        } else {
            let page = self
                .projection
                .export_page(Selection::People(&entered), "", entered.len() as u64)
                .await?;
            pb::ExportAudienceResponse::decode(page.documents.as_slice())
                .map_err(|err| SegmentError::Corrupt(format!("an export page: {err}")))?
                .members
                .into_iter()
                .map(|member| (member.profile_id.clone(), member))
                .collect()
        };
        let changes = changes
            .into_iter()
            .map(|change| {
                // A person erased since entering is no longer anyone's
                // member. One who entered twice in the page is sent twice.
                let member = change
                    .entered
                    .then(|| members.get(&change.profile_id).cloned())
                    .flatten();
                pb::AudienceChange {
                    cursor: change.cursor,
                    in_audience: member.is_some(),
                    at: Some(from_micros(change.at_micros)),
                    member: Some(member.unwrap_or_else(|| pb::AudienceMember {
                        profile_id: change.profile_id,
                        ..Default::default()
                    })),
                }
            })
            .collect();
        Ok((read_to, Some(pb::ExportAudienceChangesResponse { changes })))
    }
}
