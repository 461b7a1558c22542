//! Protobuf to domain and back. Every request is validated here, whole,
//! before anything is written: a bad field is INVALID_ARGUMENT naming it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use madtech_common::error::FieldError;
use madtech_common::validate;
use madtech_proto::profiles::v1 as pb;
use madtech_proto::time::{from_micros, to_micros};

use crate::identity::{Identifier, Normaliser};
use crate::resolution::KeptApart;
use crate::store::{Change, ChangeKind, Lookup, NewEvent, Profile, StoredEvent, Upsert, Who};
use crate::traits::{MAX_TRAIT_NAME_LEN, TraitOperation, TraitValue};

/// Identifiers accepted in one call or event.
const MAX_IDENTIFIERS: usize = 100;
/// Traits (or trait operations, or event properties) in one call or event.
const MAX_TRAITS: usize = 200;
/// Longest string trait value.
const MAX_STRING_LEN: usize = 4096;
/// Upserts in one `BatchUpsertProfiles` call.
pub const MAX_UPSERTS: usize = 1_000;
/// Events in one `IngestEvents` call (or one streamed batch).
pub const MAX_EVENTS: usize = 10_000;
const MAX_MESSAGE_ID_LEN: usize = 128;
const MAX_EVENT_NAME_LEN: usize = 128;
const MAX_SOURCE_LEN: usize = 64;
/// What `source` means when it is empty.
const DEFAULT_SOURCE: &str = "api";

fn identifiers(
    normaliser: &Normaliser,
    field: &str,
    ids: &[pb::Identifier],
) -> Result<BTreeSet<Identifier>, FieldError> {
    if ids.is_empty() {
        return Err(FieldError::new(
            field,
            "at least one identifier is required",
        ));
    }
    if ids.len() > MAX_IDENTIFIERS {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_IDENTIFIERS} identifiers"),
        ));
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| normaliser.normalise(&format!("{field}[{i}]"), &id.kind, &id.value))
        .collect()
}

fn source(field: &str, value: &str) -> Result<String, FieldError> {
    let value = validate::optional_text(field, value, MAX_SOURCE_LEN)?;
    Ok(if value.is_empty() {
        DEFAULT_SOURCE.to_string()
    } else {
        value.to_string()
    })
}

fn timestamp(
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, FieldError> {
    value
        .map(|ts| {
            to_micros(ts)
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(|| FieldError::new(field, "timestamp out of range"))
        })
        .transpose()
}

fn trait_name(field: &str, name: &str) -> Result<String, FieldError> {
    if name.is_empty() || name.len() > MAX_TRAIT_NAME_LEN || name.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("names are 1 to {MAX_TRAIT_NAME_LEN} printable bytes"),
        ));
    }
    Ok(name.to_string())
}

/// Trait values or event properties by name.
fn value_map(
    field: &str,
    values: BTreeMap<String, pb::TraitValue>,
) -> Result<BTreeMap<String, TraitValue>, FieldError> {
    if values.len() > MAX_TRAITS {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_TRAITS} entries"),
        ));
    }
    values
        .into_iter()
        .map(|(name, value)| {
            let field = format!("{field}[{name:?}]");
            Ok((trait_name(&field, &name)?, trait_value_from(&field, value)?))
        })
        .collect()
}

/// Converts a protobuf trait value, rejecting empty and non-finite values.
pub fn trait_value_from(field: &str, value: pb::TraitValue) -> Result<TraitValue, FieldError> {
    use pb::trait_value::Value;
    match value.value {
        None => Err(FieldError::new(field, "a value must have a type")),
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

fn operation(field: &str, op: pb::TraitOperation) -> Result<TraitOperation, FieldError> {
    use pb::TraitOperationKind as Kind;
    let name = trait_name(&format!("{field}.name"), &op.name)?;
    let value_field = format!("{field}.value");
    let value = op
        .value
        .map(|v| trait_value_from(&value_field, v))
        .transpose()?;
    let kind = Kind::try_from(op.kind).unwrap_or(Kind::Unspecified);
    match (kind, value) {
        (Kind::Unset, None) => Ok(TraitOperation::Unset(name)),
        (Kind::Unset, Some(_)) => Err(FieldError::new(value_field, "UNSET takes no value")),
        (Kind::Increment, Some(TraitValue::Number(n))) => Ok(TraitOperation::Increment(name, n)),
        (Kind::Increment, _) => Err(FieldError::new(value_field, "INCREMENT takes a number")),
        (Kind::Set, Some(v)) => Ok(TraitOperation::Set(name, v)),
        (Kind::SetOnce, Some(v)) => Ok(TraitOperation::SetOnce(name, v)),
        (Kind::Set | Kind::SetOnce, None) => Err(FieldError::required(value_field)),
        (Kind::Unspecified, _) => Err(FieldError::new(
            format!("{field}.kind"),
            "set SET, SET_ONCE, INCREMENT or UNSET",
        )),
    }
}

pub fn upserts_from(
    normaliser: &Normaliser,
    requests: Vec<pb::UpsertProfileRequest>,
) -> Result<Vec<Upsert>, FieldError> {
    if requests.is_empty() || requests.len() > MAX_UPSERTS {
        return Err(FieldError::new(
            "upserts",
            format!("1 to {MAX_UPSERTS} upserts per batch"),
        ));
    }
    requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            upsert_from(normaliser, request).map_err(|err| err.within(&format!("upserts[{i}]")))
        })
        .collect()
}

pub fn upsert_from(
    normaliser: &Normaliser,
    request: pb::UpsertProfileRequest,
) -> Result<Upsert, FieldError> {
    let identifiers = identifiers(normaliser, "identifiers", &request.identifiers)?;
    if request.operations.len() > MAX_TRAITS {
        return Err(FieldError::new(
            "operations",
            format!("at most {MAX_TRAITS} operations"),
        ));
    }
    let mut operations: Vec<TraitOperation> =
        value_map("traits", request.traits.into_iter().collect())?
            .into_iter()
            .map(|(name, value)| TraitOperation::Set(name, value))
            .collect();
    for (i, op) in request.operations.into_iter().enumerate() {
        operations.push(operation(&format!("operations[{i}]"), op)?);
    }
    Ok(Upsert {
        identifiers,
        operations,
        region: validate::region("region", &request.region)?,
        source: source("source", &request.source)?,
        observed_at: timestamp("observed_at", request.observed_at.as_ref())?,
    })
}

/// The `lookup` oneof that several requests share: a profile id or an
/// identifier.
pub trait LookupOneof {
    fn into_parts(self) -> (Option<String>, Option<pb::Identifier>);
}

macro_rules! lookup_oneof {
    ($($oneof:path),+) => {$(
        impl LookupOneof for Option<$oneof> {
            fn into_parts(self) -> (Option<String>, Option<pb::Identifier>) {
                use $oneof as L;
                match self {
                    Some(L::ProfileId(id)) => (Some(id), None),
                    Some(L::Identifier(id)) => (None, Some(id)),
                    None => (None, None),
                }
            }
        }
    )+};
}

lookup_oneof!(
    pb::get_profile_request::Lookup,
    pb::export_profile_request::Lookup,
    pb::erase_profile_request::Lookup
);

pub fn lookup(normaliser: &Normaliser, oneof: impl LookupOneof) -> Result<Lookup, FieldError> {
    match oneof.into_parts() {
        (Some(id), _) => Ok(Lookup::ProfileId(
            validate::text("profile_id", &id, 64)?.to_string(),
        )),
        (None, Some(id)) => Ok(Lookup::Identifier(normaliser.normalise(
            "identifier",
            &id.kind,
            &id.value,
        )?)),
        (None, None) => Err(FieldError::new("lookup", "set profile_id or identifier")),
    }
}

pub fn event_from(
    normaliser: &Normaliser,
    field: &str,
    event: pb::Event,
) -> Result<NewEvent, FieldError> {
    let message_id = validate::text(
        &format!("{field}.message_id"),
        &event.message_id,
        MAX_MESSAGE_ID_LEN,
    )?;
    let name = validate::text(&format!("{field}.name"), &event.name, MAX_EVENT_NAME_LEN)?;
    let who = match (
        event.profile_id.trim().is_empty(),
        event.identifiers.is_empty(),
    ) {
        (false, true) => Who::ProfileId(
            validate::text(&format!("{field}.profile_id"), &event.profile_id, 64)?.to_string(),
        ),
        (true, false) => Who::Identifiers(identifiers(
            normaliser,
            &format!("{field}.identifiers"),
            &event.identifiers,
        )?),
        (false, false) => {
            return Err(FieldError::new(
                format!("{field}.profile_id"),
                "set profile_id or identifiers, not both",
            ));
        }
        (true, true) => {
            return Err(FieldError::new(
                format!("{field}.identifiers"),
                "set profile_id or identifiers",
            ));
        }
    };
    Ok(NewEvent {
        message_id: message_id.to_string(),
        name: name.to_string(),
        occurred_at: timestamp(&format!("{field}.timestamp"), event.timestamp.as_ref())?
            .unwrap_or_else(Utc::now),
        properties: value_map(
            &format!("{field}.properties"),
            event.properties.into_iter().collect(),
        )?,
        source: source(&format!("{field}.source"), &event.source)?,
        who,
    })
}

pub fn events_from(
    normaliser: &Normaliser,
    events: Vec<pb::Event>,
) -> Result<Vec<NewEvent>, FieldError> {
    if events.is_empty() || events.len() > MAX_EVENTS {
        return Err(FieldError::new(
            "events",
            format!("1 to {MAX_EVENTS} events per batch"),
        ));
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| event_from(normaliser, &format!("events[{i}]"), e))
        .collect()
}

pub fn profile_to_pb(profile: &Profile) -> pb::Profile {
    pb::Profile {
        profile_id: profile.id.clone(),
        identifiers: profile.identifiers.iter().map(identifier_to_pb).collect(),
        traits: profile
            .traits
            .iter()
            .map(|(name, entry)| (name.clone(), trait_value_to_pb(&entry.value)))
            .collect(),
        trait_origins: profile
            .traits
            .iter()
            .map(|(name, entry)| {
                let origin = pb::TraitOrigin {
                    source: entry.source.clone(),
                    observed_at: Some(from_micros(entry.observed_at.timestamp_micros())),
                };
                (name.clone(), origin)
            })
            .collect(),
        region: profile.region.clone(),
        created_at: Some(from_micros(profile.created_at_micros)),
        updated_at: Some(from_micros(profile.updated_at_micros)),
        merged_profile_ids: profile.merged_ids.clone(),
    }
}

fn identifier_to_pb(id: &Identifier) -> pb::Identifier {
    pb::Identifier {
        kind: id.kind.as_str().to_string(),
        value: id.value.clone(),
    }
}

pub fn conflict_to_pb(kept: &KeptApart) -> pb::IdentityConflict {
    pb::IdentityConflict {
        identifier: Some(identifier_to_pb(&kept.identifier)),
        rule: kept.rule.clone(),
        owner_profile_id: kept.owner.clone().unwrap_or_default(),
    }
}

fn event_to_pb(event: &StoredEvent) -> pb::StoredEvent {
    pb::StoredEvent {
        profile_id: event.profile_id.clone(),
        message_id: event.message_id.clone(),
        name: event.name.clone(),
        timestamp: Some(from_micros(event.occurred_at_micros)),
        properties: event
            .properties
            .iter()
            .map(|(name, value)| (name.clone(), trait_value_to_pb(value)))
            .collect(),
        source: event.source.clone(),
    }
}

pub fn change_to_pb(change: &Change) -> pb::ProfileChange {
    use pb::profile_change::Change as C;
    let inner = match &change.kind {
        ChangeKind::Upserted { profile, created } => C::Upserted(pb::ProfileUpserted {
            profile: Some(profile_to_pb(profile)),
            created: *created,
        }),
        ChangeKind::Merged { survivor, merged } => C::Merged(pb::ProfileMerged {
            survivor_profile_id: survivor.clone(),
            merged_profile_ids: merged.clone(),
        }),
        ChangeKind::Erased { profile_ids } => C::Erased(pb::ProfileErased {
            profile_ids: profile_ids.clone(),
        }),
        ChangeKind::EventsAppended(events) => C::EventsAppended(pb::EventsAppended {
            events: events.iter().map(event_to_pb).collect(),
        }),
    };
    pb::ProfileChange {
        cursor: change.cursor,
        at: Some(from_micros(change.at_micros)),
        change: Some(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normaliser() -> Normaliser {
        Normaliser::new("FR").expect("region")
    }

    fn event() -> pb::Event {
        pb::Event {
            message_id: "m1".into(),
            name: "purchase".into(),
            identifiers: vec![pb::Identifier {
                kind: "email".into(),
                value: "A@x.io".into(),
            }],
            ..Default::default()
        }
    }

    fn field_of(events: Vec<pb::Event>) -> String {
        events_from(&normaliser(), events)
            .expect_err("invalid")
            .field
    }

    #[test]
    fn events_are_validated_whole_naming_the_field() {
        let good = events_from(&normaliser(), vec![event()]).expect("valid");
        assert_eq!(good[0].source, "api");
        assert_eq!(field_of(vec![]), "events");
        let mut no_id = event();
        no_id.message_id = " ".into();
        assert_eq!(field_of(vec![event(), no_id]), "events[1].message_id");
        let mut both = event();
        both.profile_id = "p".into();
        assert_eq!(field_of(vec![both]), "events[0].profile_id");
        let mut nobody = event();
        nobody.identifiers.clear();
        assert_eq!(field_of(vec![nobody]), "events[0].identifiers");
        let mut bad_email = event();
        bad_email.identifiers[0].value = "nope".into();
        assert_eq!(field_of(vec![bad_email]), "events[0].identifiers[0].value");
        let mut nan = event();
        nan.properties.insert(
            "amount".into(),
            pb::TraitValue {
                value: Some(pb::trait_value::Value::NumberValue(f64::NAN)),
            },
        );
        assert_eq!(field_of(vec![nan]), "events[0].properties[\"amount\"]");
        let mut far = event();
        far.timestamp = Some(prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        });
        assert_eq!(field_of(vec![far]), "events[0].timestamp");
        assert_eq!(field_of(vec![event(); MAX_EVENTS + 1]), "events");
    }

    #[test]
    fn operations_need_the_right_value() {
        use pb::TraitOperationKind as K;
        let op = |kind: K, value: Option<pb::trait_value::Value>| pb::UpsertProfileRequest {
            identifiers: event().identifiers,
            operations: vec![pb::TraitOperation {
                kind: kind.into(),
                name: "visits".into(),
                value: value.map(|v| pb::TraitValue { value: Some(v) }),
            }],
            ..Default::default()
        };
        let field = |request| {
            upsert_from(&normaliser(), request)
                .expect_err("invalid")
                .field
        };
        use pb::trait_value::Value as V;
        assert_eq!(
            field(op(K::Increment, Some(V::StringValue("1".into())))),
            "operations[0].value"
        );
        assert_eq!(field(op(K::Set, None)), "operations[0].value");
        assert_eq!(
            field(op(K::Unset, Some(V::BoolValue(true)))),
            "operations[0].value"
        );
        assert_eq!(field(op(K::Unspecified, None)), "operations[0].kind");
        let ok =
            upsert_from(&normaliser(), op(K::Increment, Some(V::NumberValue(2.0)))).expect("valid");
        assert_eq!(
            ok.operations,
            vec![TraitOperation::Increment("visits".into(), 2.0)]
        );
        assert_eq!(ok.source, "api");
    }

    #[test]
    fn lookups_need_one_key() {
        use pb::get_profile_request::Lookup as L;
        assert_eq!(
            lookup(&normaliser(), None::<L>).expect_err("empty").field,
            "lookup"
        );
        assert_eq!(
            lookup(&normaliser(), Some(L::ProfileId(" ".into())))
                .expect_err("blank")
                .field,
            "profile_id"
        );
    }
}
