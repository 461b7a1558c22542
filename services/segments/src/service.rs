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
use crate::error::SegmentError;
use crate::rules::{Candidate, MAX_DEPTH, Rule, Value};
use crate::store::{Segment, SegmentStore};

/// Longest segment or trait name accepted.
const MAX_NAME_LEN: usize = 200;
/// Longest string a rule compares with.
const MAX_STRING_VALUE_LEN: usize = 4096;

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

/// Converts and validates a protobuf rule tree; `field` is its path.
pub fn rule_from_pb(field: &str, rule: &pb::Rule, depth: usize) -> Result<Rule, FieldError> {
    use pb::rule::Rule as Kind;
    if depth > MAX_DEPTH {
        return Err(FieldError::new(
            field,
            format!("rules nest at most {MAX_DEPTH} deep"),
        ));
    }
    let list = |name: &str, list: &pb::RuleList| -> Result<Vec<Rule>, FieldError> {
        list.rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule_from_pb(&format!("{field}.{name}.rules[{i}]"), r, depth + 1))
            .collect()
    };
    match &rule.rule {
        None => Err(FieldError::new(field, "a rule must say what it checks")),
        Some(Kind::TraitEquals(eq)) => {
            let name = validate::text(
                &format!("{field}.trait_equals.trait"),
                &eq.r#trait,
                MAX_NAME_LEN,
            )?;
            let value_field = format!("{field}.trait_equals.value");
            let value = eq
                .value
                .as_ref()
                .ok_or_else(|| FieldError::required(&value_field))?;
            Ok(Rule::TraitEquals {
                name: name.to_string(),
                value: value_from_pb(&value_field, value)?,
            })
        }
        Some(Kind::RegionIn(set)) => {
            let regions = set
                .regions
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let path = format!("{field}.region_in.regions[{i}]");
                    let region = validate::region(&path, r)?;
                    if region.is_empty() {
                        return Err(FieldError::required(path));
                    }
                    Ok(region)
                })
                .collect::<Result<_, _>>()?;
            Ok(Rule::RegionIn(regions))
        }
        Some(Kind::All(rules)) => Ok(Rule::All(list("all", rules)?)),
        Some(Kind::Any(rules)) => Ok(Rule::Any(list("any", rules)?)),
    }
}

fn value_from_pb(field: &str, value: &profiles_pb::TraitValue) -> Result<Value, FieldError> {
    use profiles_pb::trait_value::Value as V;
    match &value.value {
        None => Err(FieldError::new(field, "a value must have a type")),
        Some(V::StringValue(s)) if s.len() <= MAX_STRING_VALUE_LEN => Ok(Value::String(s.clone())),
        Some(V::StringValue(_)) => Err(FieldError::new(
            field,
            format!("strings are at most {MAX_STRING_VALUE_LEN} bytes"),
        )),
        Some(V::NumberValue(n)) if n.is_finite() => Ok(Value::Number(*n)),
        Some(V::NumberValue(_)) => Err(FieldError::new(field, "numbers must be finite")),
        Some(V::BoolValue(b)) => Ok(Value::Bool(*b)),
        Some(V::TimestampValue(ts)) => to_micros(ts)
            .map(Value::Timestamp)
            .ok_or_else(|| FieldError::new(field, "timestamp out of range")),
        Some(V::ListValue(list)) => list
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| value_from_pb(&format!("{field}[{i}]"), v))
            .collect::<Result<_, _>>()
            .map(Value::List),
    }
}

fn value_to_pb(value: &Value) -> profiles_pb::TraitValue {
    use profiles_pb::trait_value::Value as V;
    let value = match value {
        Value::String(s) => V::StringValue(s.clone()),
        Value::Number(n) => V::NumberValue(*n),
        Value::Bool(b) => V::BoolValue(*b),
        Value::Timestamp(micros) => V::TimestampValue(from_micros(*micros)),
        Value::List(values) => V::ListValue(profiles_pb::TraitList {
            values: values.iter().map(value_to_pb).collect(),
        }),
    };
    profiles_pb::TraitValue { value: Some(value) }
}

pub fn rule_to_pb(rule: &Rule) -> pb::Rule {
    use pb::rule::Rule as Kind;
    let list = |rules: &[Rule]| pb::RuleList {
        rules: rules.iter().map(rule_to_pb).collect(),
    };
    let kind = match rule {
        Rule::TraitEquals { name, value } => Kind::TraitEquals(pb::TraitEquals {
            r#trait: name.clone(),
            value: Some(value_to_pb(value)),
        }),
        Rule::RegionIn(regions) => Kind::RegionIn(pb::RegionIn {
            regions: regions.iter().cloned().collect(),
        }),
        Rule::All(rules) => Kind::All(list(rules)),
        Rule::Any(rules) => Kind::Any(list(rules)),
    };
    pb::Rule { rule: Some(kind) }
}

fn segment_to_pb(segment: &Segment) -> pb::Segment {
    pb::Segment {
        segment_id: segment.id.clone(),
        name: segment.name.clone(),
        rule: Some(rule_to_pb(&segment.rule)),
        created_at: Some(from_micros(segment.created_at_micros)),
    }
}

/// What a rule sees of a profile; traits with values it cannot compare are
/// left out (they match no rule).
fn candidate(profile: &profiles_pb::Profile) -> Candidate {
    Candidate {
        region: profile.region.clone(),
        traits: profile
            .traits
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), value_from_pb(name, value).ok()?)))
            .collect(),
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
        let rule = request
            .rule
            .as_ref()
            .ok_or_else(|| FieldError::required("rule"))?;
        let rule = rule_from_pb("rule", rule, 1)?;
        let segment = self.store.create(name, rule).await?;
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(segment_to_pb(&segment)),
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
        let stream = pages.filter_map(move |page| {
            let answer = match page {
                Err(status) => Some(Err(Status::from(SegmentError::Profiles(status)))),
                Ok(page) => {
                    let members: Vec<pb::AudienceMember> = page
                        .profiles
                        .into_iter()
                        .filter(|p| rule.matches(&candidate(p)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn region_rule(regions: &[&str]) -> pb::Rule {
        pb::Rule {
            rule: Some(pb::rule::Rule::RegionIn(pb::RegionIn {
                regions: regions.iter().map(|r| r.to_string()).collect(),
            })),
        }
    }

    #[test]
    fn rules_convert_both_ways() {
        let rule = pb::Rule {
            rule: Some(pb::rule::Rule::All(pb::RuleList {
                rules: vec![
                    region_rule(&["FR", "US-CA"]),
                    pb::Rule {
                        rule: Some(pb::rule::Rule::TraitEquals(pb::TraitEquals {
                            r#trait: "tier".into(),
                            value: Some(value_to_pb(&Value::String("gold".into()))),
                        })),
                    },
                ],
            })),
        };
        let domain = rule_from_pb("rule", &rule, 1).expect("valid");
        assert_eq!(rule_to_pb(&domain), rule);
    }

    #[test]
    fn invalid_rules_name_the_path() {
        let nested = pb::Rule {
            rule: Some(pb::rule::Rule::Any(pb::RuleList {
                rules: vec![region_rule(&["FR"]), region_rule(&["Paris"])],
            })),
        };
        let err = rule_from_pb("rule", &nested, 1).expect_err("bad region");
        assert_eq!(err.field, "rule.any.rules[1].region_in.regions[0]");

        let empty = pb::Rule { rule: None };
        assert_eq!(
            rule_from_pb("rule", &empty, 1).expect_err("empty").field,
            "rule"
        );

        let mut deep = region_rule(&["FR"]);
        for _ in 0..MAX_DEPTH {
            deep = pb::Rule {
                rule: Some(pb::rule::Rule::All(pb::RuleList { rules: vec![deep] })),
            };
        }
        assert!(
            rule_from_pb("rule", &deep, 1)
                .expect_err("too deep")
                .reason
                .contains("nest")
        );
    }
}
