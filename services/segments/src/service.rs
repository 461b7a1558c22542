//! The gRPC edge of the segments service: rule trees from and to protobuf,
//! and the audience export stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use madtech_common::error::FieldError;
use madtech_common::validate::{self, require};
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as pb;
use madtech_proto::time::{from_micros, to_micros};
use pb::segment_service_server::{SegmentService, SegmentServiceServer};
use profiles_pb::profile_service_client::ProfileServiceClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::SegmentsConfig;
use crate::convert::{rule_from_request, rule_to_pb};
use crate::error::SegmentError;
use crate::rules::eval::{Context, Person, Stored};
use crate::rules::{Value, text};
use crate::store::{Segment, SegmentStore};

/// Longest segment name accepted.
const MAX_NAME_LEN: usize = 200;

#[derive(Clone)]
pub struct SegmentApi {
    store: Arc<SegmentStore>,
    profiles: ProfileServiceClient<Channel>,
    config: SegmentsConfig,
}

impl SegmentApi {
    pub fn new(
        store: SegmentStore,
        profiles: ProfileServiceClient<Channel>,
        config: SegmentsConfig,
    ) -> Self {
        SegmentApi {
            store: Arc::new(store),
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

/// What a rule sees of a profile from the profiles service: traits,
/// identifier kinds and region (no events: rules about events need the
/// projection).
fn person(profile: &profiles_pb::Profile) -> Person {
    Person {
        region: profile.region.clone(),
        traits: profile
            .traits
            .iter()
            .map(|(name, value)| (name.clone(), stored_from_pb(value)))
            .collect(),
        identifier_kinds: profile
            .identifiers
            .iter()
            .map(|id| id.kind.clone())
            .collect(),
        events: Vec::new(),
    }
}

fn stored_from_pb(value: &profiles_pb::TraitValue) -> Stored {
    use profiles_pb::trait_value::Value as V;
    match &value.value {
        Some(V::StringValue(s)) => Stored::Value(Value::String(s.clone())),
        Some(V::NumberValue(n)) => Stored::Value(Value::Number(*n)),
        Some(V::BoolValue(b)) => Stored::Value(Value::Bool(*b)),
        Some(V::TimestampValue(ts)) => {
            to_micros(ts).map_or(Stored::Other, |t| Stored::Value(Value::Timestamp(t)))
        }
        Some(V::ListValue(_)) | None => Stored::Other,
    }
}

fn member(profile: profiles_pb::Profile) -> pb::AudienceMember {
    pb::AudienceMember {
        profile_id: profile.profile_id,
        identifiers: profile.identifiers,
        region: profile.region,
        pseudonymous_id: String::new(),
        hashed_identifiers: Vec::new(),
        merged_profile_ids: profile.merged_profile_ids,
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportAudienceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SegmentService for SegmentApi {
    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        let request = request.into_inner();
        let name = validate::text("name", &request.name, MAX_NAME_LEN)?.to_string();
        let rule = rule_from_request(request.rule.as_ref(), &request.rule_text)?;
        for id in rule.segments() {
            self.store.get(id).await.map_err(|err| match err {
                SegmentError::NotFound => Status::from(FieldError::new(
                    "rule",
                    format!("in_segment({id:?}): no such segment"),
                )),
                other => other.into(),
            })?;
        }
        let segment = self.store.create(name, rule).await?;
        Ok(Response::new(pb::CreateSegmentResponse {
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

    async fn export_audience(
        &self,
        request: Request<pb::ExportAudienceRequest>,
    ) -> Result<Response<Self::ExportAudienceStream>, Status> {
        let request = request.into_inner();
        let segment_id = require("segment_id", &request.segment_id)?;
        require("destination_id", &request.destination_id)?;
        require("destination_kind", &request.destination_kind)?;
        validate::policy_name("purpose", &request.purpose)?;
        let segment = self.store.get(segment_id).await?;

        let page_size = self.config.export_chunk_size;
        let mut profiles = self.profiles.clone();
        let pages = profiles
            .list_profiles(profiles_pb::ListProfilesRequest {
                page_size,
                after_profile_id: String::new(),
            })
            .await
            .map_err(SegmentError::Profiles)?
            .into_inner();
        // Pulling one page of profiles per message the caller pulls keeps the
        // export's memory flat whatever the audience size.
        let rule = segment.rule;
        if rule.depends_on_time() || !rule.segments().is_empty() {
            return Err(Status::failed_precondition(
                "this export reads profiles without their events or memberships; rules with event or segment conditions need the segments projection, which is not built yet",
            ));
        }
        let now = chrono::Utc::now().timestamp_micros();
        let stream = pages.filter_map(move |page| {
            let answer = match page {
                Err(status) => Some(Err(Status::from(SegmentError::Profiles(status)))),
                Ok(page) => {
                    let members: Vec<pb::AudienceMember> = page
                        .profiles
                        .into_iter()
                        .filter(|p| {
                            let no_memberships = |_: &str| false;
                            let context = Context {
                                now_micros: now,
                                member_of: &no_memberships,
                            };
                            rule.matches(&person(p), &context)
                        })
                        .map(member)
                        .collect();
                    (!members.is_empty()).then_some(Ok(pb::ExportAudienceResponse { members }))
                }
            };
            std::future::ready(answer)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
