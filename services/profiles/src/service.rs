//! The gRPC edge: protobuf in, validated domain types to the store, protobuf
//! out. No business rules live here.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use chrono::DateTime;
use futures::Stream;
use madtech_common::error::FieldError;
use madtech_proto::profiles::v1 as pb;
use madtech_proto::time::{from_micros, to_micros};
use pb::profile_service_server::{ProfileService, ProfileServiceServer};
use tonic::{Request, Response, Status};

use crate::identity::{Identifier, Normaliser};
use crate::store::{Profile, ProfileStore, Upsert};
use crate::traits::{MAX_TRAIT_NAME_LEN, TraitValue, Traits};

/// Identifiers accepted in one upsert.
const MAX_IDENTIFIERS: usize = 100;
const DEFAULT_PAGE_SIZE: u32 = 500;
/// Traits accepted in one upsert.
const MAX_TRAITS: usize = 200;
/// Longest string trait value.
const MAX_STRING_LEN: usize = 4096;
const MAX_PAGE_SIZE: u32 = 10_000;

/// The profiles service's gRPC implementation.
#[derive(Clone)]
pub struct ProfileApi {
    store: Arc<ProfileStore>,
    normaliser: Normaliser,
}

impl ProfileApi {
    pub fn new(store: ProfileStore, normaliser: Normaliser) -> Self {
        ProfileApi {
            store: Arc::new(store),
            normaliser,
        }
    }

    pub fn into_server(self) -> ProfileServiceServer<Self> {
        ProfileServiceServer::new(self)
    }

    fn identifier(&self, field: &str, id: &pb::Identifier) -> Result<Identifier, FieldError> {
        self.normaliser.normalise(field, &id.kind, &id.value)
    }

    fn upsert_from(&self, request: pb::UpsertProfileRequest) -> Result<Upsert, FieldError> {
        if request.identifiers.is_empty() {
            return Err(FieldError::new(
                "identifiers",
                "at least one identifier is required",
            ));
        }
        if request.identifiers.len() > MAX_IDENTIFIERS {
            return Err(FieldError::new(
                "identifiers",
                format!("at most {MAX_IDENTIFIERS} identifiers per call"),
            ));
        }
        let identifiers = request
            .identifiers
            .iter()
            .enumerate()
            .map(|(i, id)| self.identifier(&format!("identifiers[{i}]"), id))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if request.traits.len() > MAX_TRAITS {
            return Err(FieldError::new(
                "traits",
                format!("at most {MAX_TRAITS} traits per call"),
            ));
        }
        let traits = request
            .traits
            .into_iter()
            .map(|(name, value)| {
                let field = format!("traits[{name:?}]");
                if name.is_empty()
                    || name.len() > MAX_TRAIT_NAME_LEN
                    || name.chars().any(char::is_control)
                {
                    return Err(FieldError::new(
                        field,
                        format!("trait names are 1 to {MAX_TRAIT_NAME_LEN} printable bytes"),
                    ));
                }
                Ok((name, trait_value_from(&field, value)?))
            })
            .collect::<Result<Traits, _>>()?;
        Ok(Upsert {
            identifiers,
            traits,
            region: madtech_common::validate::region("region", &request.region)?,
        })
    }
}

/// Converts a protobuf trait value, rejecting empty and non-finite values.
pub fn trait_value_from(field: &str, value: pb::TraitValue) -> Result<TraitValue, FieldError> {
    use pb::trait_value::Value;
    match value.value {
        None => Err(FieldError::new(field, "a trait value must have a type")),
        Some(Value::StringValue(s)) if s.len() <= MAX_STRING_LEN && !s.contains('\0') => {
            Ok(TraitValue::String(s))
        }
        Some(Value::StringValue(_)) => Err(FieldError::new(
            field,
            format!("strings are at most {MAX_STRING_LEN} bytes, without NUL"),
        )),
        Some(Value::NumberValue(n)) if n.is_finite() => Ok(TraitValue::Number(n)),
        Some(Value::NumberValue(_)) => Err(FieldError::new(field, "numbers must be finite")),
        Some(Value::BoolValue(b)) => Ok(TraitValue::Bool(b)),
        Some(Value::TimestampValue(ts)) => to_micros(&ts)
            .and_then(DateTime::from_timestamp_micros)
            .map(TraitValue::Timestamp)
            .ok_or_else(|| FieldError::new(field, "timestamp out of range")),
        Some(Value::ListValue(list)) => list
            .values
            .into_iter()
            .enumerate()
            .map(|(i, v)| trait_value_from(&format!("{field}[{i}]"), v))
            .collect::<Result<Vec<_>, _>>()
            .map(TraitValue::List),
    }
}

/// Converts a domain trait value to protobuf.
pub fn trait_value_to_pb(value: &TraitValue) -> pb::TraitValue {
    use pb::trait_value::Value;
    let value = match value {
        TraitValue::String(s) => Value::StringValue(s.clone()),
        TraitValue::Number(n) => Value::NumberValue(*n),
        TraitValue::Bool(b) => Value::BoolValue(*b),
        TraitValue::Timestamp(t) => Value::TimestampValue(from_micros(t.timestamp_micros())),
        TraitValue::List(values) => Value::ListValue(pb::TraitList {
            values: values.iter().map(trait_value_to_pb).collect(),
        }),
    };
    pb::TraitValue { value: Some(value) }
}

fn profile_to_pb(profile: &Profile) -> pb::Profile {
    pb::Profile {
        profile_id: profile.id.clone(),
        identifiers: profile
            .identifiers
            .iter()
            .map(|id| pb::Identifier {
                kind: id.kind.as_str().to_string(),
                value: id.value.clone(),
            })
            .collect(),
        traits: profile
            .traits
            .iter()
            .map(|(name, value)| (name.clone(), trait_value_to_pb(value)))
            .collect(),
        region: profile.region.clone(),
        created_at: Some(from_micros(profile.created_at_micros)),
        updated_at: Some(from_micros(profile.updated_at_micros)),
        merged_profile_ids: profile.merged_ids.clone(),
    }
}

type ProfileStream = Pin<Box<dyn Stream<Item = Result<pb::ListProfilesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProfileService for ProfileApi {
    async fn upsert_profile(
        &self,
        request: Request<pb::UpsertProfileRequest>,
    ) -> Result<Response<pb::UpsertProfileResponse>, Status> {
        let upsert = self.upsert_from(request.into_inner())?;
        let done = self.store.upsert(upsert).await?;
        Ok(Response::new(pb::UpsertProfileResponse {
            profile: Some(profile_to_pb(&done.profile)),
            created: done.created,
            merged_profile_ids: done.merged,
        }))
    }

    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        use pb::get_profile_request::Lookup;
        let profile = match request.into_inner().lookup {
            Some(Lookup::ProfileId(id)) if !id.trim().is_empty() => {
                self.store.get(id.trim()).await?
            }
            Some(Lookup::ProfileId(_)) => return Err(FieldError::required("profile_id").into()),
            Some(Lookup::Identifier(id)) => {
                let id = self.identifier("identifier", &id)?;
                self.store.find_by_identifier(&id).await?
            }
            None => {
                return Err(FieldError::new("lookup", "set profile_id or identifier").into());
            }
        };
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(profile_to_pb(&profile)),
        }))
    }

    type ListProfilesStream = ProfileStream;

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
}
