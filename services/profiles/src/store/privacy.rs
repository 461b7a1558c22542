//! Data-subject support: export everything held about a person, and erase
//! it. The person is the live profile and every profile merged into it.

use sea_orm::sea_query::Condition;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
};
use serde_json::{Value, json};

use super::changes::{self, ChangeRecord};
use super::entities::{change, conflict, event, identifier, merge, profile};
use super::{decode_event, events, load_live, suppression};
use crate::error::ProfileError;
use madtech_common::sql::{self, Sql};

/// What an erasure deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct Erased {
    /// The person's id and every id merged into it.
    pub profile_ids: Vec<String>,
    pub identifiers: u64,
    pub events: u64,
}

/// The live id and every id merged into it.
async fn person_ids<C: ConnectionTrait>(
    db: &C,
    live_id: &str,
) -> Result<Vec<String>, ProfileError> {
    let mut ids = vec![live_id.to_string()];
    ids.extend(
        profile::Entity::find()
            .filter(profile::Column::MergedInto.eq(live_id))
            .order_by_asc(profile::Column::Id)
            .all(db)
            .await?
            .into_iter()
            .map(|row| row.id),
    );
    Ok(ids)
}

pub(super) async fn erase(
    txn: &DatabaseTransaction,
    live_id: &str,
    suppress: bool,
) -> Result<Erased, ProfileError> {
    let ids = person_ids(txn, live_id).await?;
    if suppress {
        let held = identifier::Entity::find()
            .filter(identifier::Column::ProfileId.is_in(ids.clone()))
            .all(txn)
            .await?;
        suppression::add(
            txn,
            held.iter()
                .map(|row| (row.kind.as_str(), row.value.as_str())),
        )
        .await?;
    }
    let identifiers = identifier::Entity::delete_many()
        .filter(identifier::Column::ProfileId.is_in(ids.clone()))
        .exec(txn)
        .await?
        .rows_affected;
    let mut delete = Sql::new("DELETE FROM events WHERE ");
    delete.append(&events::recorded_for(txn.get_database_backend(), &ids));
    let events = sql::execute(txn, &delete).await?;
    merge::Entity::delete_many()
        .filter(
            Condition::any()
                .add(merge::Column::SurvivorId.is_in(ids.clone()))
                .add(merge::Column::MergedId.is_in(ids.clone())),
        )
        .exec(txn)
        .await?;
    // Conflicts name the person's identifiers, whichever side they were on.
    conflict::Entity::delete_many()
        .filter(
            Condition::any()
                .add(conflict::Column::ProfileId.is_in(ids.clone()))
                .add(conflict::Column::OwnerId.is_in(ids.clone())),
        )
        .exec(txn)
        .await?;
    // Past changes carry the person's data; the erasure itself is published.
    change::Entity::delete_many()
        .filter(change::Column::ProfileId.is_in(ids.clone()))
        .exec(txn)
        .await?;
    profile::Entity::delete_many()
        .filter(profile::Column::Id.is_in(ids.clone()))
        .exec(txn)
        .await?;
    let record = ChangeRecord::Erased {
        profile_ids: ids.clone(),
    };
    changes::append(txn, live_id, &record, chrono::Utc::now().timestamp_micros()).await?;
    Ok(Erased {
        profile_ids: ids,
        identifiers,
        events,
    })
}

fn time(micros: i64) -> Value {
    chrono::DateTime::from_timestamp_micros(micros)
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

pub(super) async fn export<C: ConnectionTrait>(
    db: &C,
    live_id: &str,
) -> Result<Value, ProfileError> {
    let profile = load_live(db, live_id).await?;
    let ids = person_ids(db, live_id).await?;
    let identifiers: Vec<Value> = identifier::Entity::find()
        .filter(identifier::Column::ProfileId.eq(live_id))
        .order_by_asc(identifier::Column::Key)
        .all(db)
        .await?
        .into_iter()
        .map(|row| json!({"kind": row.kind, "value": row.value, "added_at": time(row.created_at)}))
        .collect();
    let traits: serde_json::Map<String, Value> = profile
        .traits
        .iter()
        .map(|(name, entry)| {
            let value = serde_json::to_value(&entry.value).unwrap_or(Value::Null);
            (
                name.clone(),
                json!({"value": value, "source": entry.source, "observed_at": entry.observed_at.to_rfc3339()}),
            )
        })
        .collect();
    let mut select = Sql::new("SELECT * FROM events WHERE ");
    select
        .append(&events::recorded_for(db.get_database_backend(), &ids))
        .push(" ORDER BY events.occurred_at, events.id");
    let events = event::Entity::find()
        .from_raw_sql(select.statement(db.get_database_backend()))
        .all(db)
        .await?
        .into_iter()
        .map(|row| {
            let received_at = row.received_at;
            let event = decode_event(row)?;
            Ok(json!({
                "message_id": event.message_id,
                "name": event.name,
                "timestamp": time(event.occurred_at_micros),
                "received_at": time(received_at),
                "source": event.source,
                "properties": serde_json::to_value(&event.properties).unwrap_or(Value::Null),
            }))
        })
        .collect::<Result<Vec<_>, ProfileError>>()?;
    let merges: Vec<Value> = merge::Entity::find()
        .filter(
            Condition::any()
                .add(merge::Column::SurvivorId.is_in(ids.clone()))
                .add(merge::Column::MergedId.is_in(ids.clone())),
        )
        .order_by_asc(merge::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(|row| {
            json!({
                "survivor_profile_id": row.survivor_id,
                "merged_profile_id": row.merged_id,
                "linked_by": row.linked_by,
                "merged_at": time(row.merged_at),
            })
        })
        .collect();
    let conflicts: Vec<Value> = conflict::Entity::find()
        .filter(
            Condition::any()
                .add(conflict::Column::ProfileId.is_in(ids.clone()))
                .add(conflict::Column::OwnerId.is_in(ids.clone())),
        )
        .order_by_asc(conflict::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(|row| {
            json!({
                "profile_id": row.profile_id,
                "identifier": row.identifier,
                "owner_profile_id": row.owner_id,
                "rule": row.rule,
                "at": time(row.at),
            })
        })
        .collect();
    Ok(json!({
        "profile_id": profile.id,
        "merged_profile_ids": profile.merged_ids,
        "region": profile.region,
        "created_at": time(profile.created_at_micros),
        "updated_at": time(profile.updated_at_micros),
        "identifiers": identifiers,
        "traits": traits,
        "events": events,
        "merges": merges,
        "identity_conflicts": conflicts,
    }))
}
