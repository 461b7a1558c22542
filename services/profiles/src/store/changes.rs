//! The change log behind `WatchProfileChanges`. Every write appends to it in
//! the same transaction, under the append lock, so cursors follow commit
//! order; rows are only deleted by erasure.

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde::{Deserialize, Serialize};

use super::entities::change;
use super::{Profile, StoredEvent, decode_properties, events};
use crate::error::ProfileError;
use madtech_common::error::json_error;
use madtech_common::sql::{JsonFunctions, Sql, json_page};

/// Key of the PostgreSQL advisory lock that serialises appends across
/// replicas, so a cursor is never committed after a higher one.
const APPEND_LOCK: i64 = 0x6d61_6474_6563_6803;

/// A change as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangeRecord {
    Upserted {
        profile: Box<Profile>,
        created: bool,
    },
    Merged {
        survivor: String,
        merged: Vec<String>,
    },
    Erased {
        profile_ids: Vec<String>,
    },
    /// The events with ids in `(after_id, last_id]`: appends hold the
    /// append lock, so no other writer's events fall in between.
    EventsAppended {
        after_id: i64,
        last_id: i64,
    },
}

/// A change as watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub cursor: u64,
    pub at_micros: i64,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    Upserted {
        profile: Box<Profile>,
        created: bool,
    },
    Merged {
        survivor: String,
        merged: Vec<String>,
    },
    Erased {
        profile_ids: Vec<String>,
    },
    EventsAppended(Vec<StoredEvent>),
}

/// Takes the append lock for this transaction (PostgreSQL; SQLite has one
/// writer anyway).
pub(super) async fn lock(txn: &DatabaseTransaction) -> Result<(), ProfileError> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({APPEND_LOCK})"))
            .await?;
    }
    Ok(())
}

/// Whether every change after `cursor` is an append of events, which are
/// logged without a person (see [`super::events::ingest`]).
pub(super) async fn only_events_since(
    txn: &DatabaseTransaction,
    cursor: u64,
) -> Result<bool, ProfileError> {
    let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
    let other = change::Entity::find()
        .select_only()
        .column(change::Column::Seq)
        .filter(change::Column::Seq.gt(cursor))
        .filter(change::Column::ProfileId.ne(""))
        .limit(1)
        .into_tuple::<i64>()
        .one(txn)
        .await?;
    Ok(other.is_none())
}

/// Appends a change and returns its sequence number.
pub(super) async fn append(
    txn: &DatabaseTransaction,
    profile_id: &str,
    record: &ChangeRecord,
    at: i64,
) -> Result<i64, ProfileError> {
    let payload = serde_json::to_string(record)
        .map_err(|err| ProfileError::Corrupt(format!("change: {err}")))?;
    let row = change::ActiveModel {
        seq: sea_orm::NotSet,
        profile_id: sea_orm::Set(profile_id.to_string()),
        payload: sea_orm::Set(payload),
        at: sea_orm::Set(at),
    };
    Ok(change::Entity::insert(row).exec(txn).await?.last_insert_id)
}

/// A page of the change log.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub changes: Vec<Change>,
    /// The last cursor read: resume after it even when `changes` is empty
    /// (event batches whose events were all erased are left out).
    pub read_to: u64,
}

/// Up to `limit` rows of the change log after `cursor`, in order, events
/// included.
pub(super) async fn after<C: ConnectionTrait>(
    db: &C,
    cursor: u64,
    limit: u64,
) -> Result<Page, ProfileError> {
    let start = cursor;
    let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
    let rows = change::Entity::find()
        .filter(change::Column::Seq.gt(cursor))
        .order_by_asc(change::Column::Seq)
        .limit(limit)
        .all(db)
        .await?;
    let records = rows
        .into_iter()
        .map(|row| {
            let record: ChangeRecord = serde_json::from_str(&row.payload).map_err(|err| {
                ProfileError::Corrupt(format!("change {}: {}", row.seq, json_error(&err)))
            })?;
            Ok((row, record))
        })
        .collect::<Result<Vec<_>, ProfileError>>()?;

    // The page's event batches cover consecutive id ranges (batches are
    // appended under the append lock), so one range query reads them all.
    let ranges: Vec<(i64, i64, i64)> = records
        .iter()
        .filter_map(|(row, record)| match record {
            ChangeRecord::EventsAppended { after_id, last_id } => {
                Some((*after_id, *last_id, row.seq))
            }
            _ => None,
        })
        .collect();
    let mut events: BTreeMap<i64, Vec<StoredEvent>> = BTreeMap::new();
    if let (Some((first, _, _)), Some((_, last, _))) = (ranges.first(), ranges.last()) {
        for (id, event) in events_between(db, *first, *last).await? {
            // Ranges follow the log's order, so their ends increase.
            let at = ranges.partition_point(|(_, last, _)| *last < id);
            if let Some((_, _, seq)) = ranges.get(at).filter(|(after, _, _)| *after < id) {
                events.entry(*seq).or_default().push(event);
            }
        }
    }

    // Events stay filed under the id they were recorded for; a watcher
    // sees them under the person they belong to now.
    let recorded_for: BTreeSet<&str> = events
        .values()
        .flatten()
        .map(|event| event.profile_id.as_str())
        .collect();
    let live = events::live_profiles(db, &recorded_for.into_iter().collect::<Vec<_>>()).await?;
    for event in events.values_mut().flatten() {
        if let Some(live_id) = live.get(&event.profile_id) {
            event.profile_id.clone_from(live_id);
        }
    }

    let read_to = records
        .last()
        .map_or(start, |(row, _)| u64::try_from(row.seq).unwrap_or(start));
    let mut changes = Vec::with_capacity(records.len());
    for (row, record) in records {
        let kind = match record {
            ChangeRecord::Upserted { profile, created } => {
                ChangeKind::Upserted { profile, created }
            }
            ChangeRecord::Merged { survivor, merged } => ChangeKind::Merged { survivor, merged },
            ChangeRecord::Erased { profile_ids } => ChangeKind::Erased { profile_ids },
            ChangeRecord::EventsAppended { .. } => match events.remove(&row.seq) {
                Some(events) => ChangeKind::EventsAppended(events),
                None => continue,
            },
        };
        changes.push(Change {
            cursor: u64::try_from(row.seq)
                .map_err(|_| ProfileError::Corrupt(format!("negative cursor {}", row.seq)))?,
            at_micros: row.at,
            kind,
        });
    }
    Ok(Page { changes, read_to })
}

/// An event row as [`events_between`] reads it: id, message id, profile
/// id, name, time, properties (JSON text), source.
type EventEntry = (i64, String, String, String, i64, String, String);

/// The events with ids in `(after_id, last_id]`, in id order. The rows
/// come back as one JSON array: a page of the log holds thousands of
/// events, and sqlx hands SQLite rows over one at a time.
async fn events_between<C: ConnectionTrait>(
    db: &C,
    after_id: i64,
    last_id: i64,
) -> Result<Vec<(i64, StoredEvent)>, ProfileError> {
    let JsonFunctions {
        group,
        array,
        as_text,
        ..
    } = JsonFunctions::of(db.get_database_backend());
    let mut query = Sql::new(&format!(
        "SELECT {group}({array}(e.id, e.message_id, e.profile_id, e.name, e.occurred_at, e.properties, e.source)){as_text} AS page \
         FROM events e WHERE e.id > "
    ));
    query.bind(after_id).push(" AND e.id <= ").bind(last_id);
    let rows: Vec<EventEntry> = json_page(db, &query).await?;
    let mut events = rows
        .into_iter()
        .map(
            |(id, message_id, profile_id, name, occurred_at_micros, properties, source)| {
                let properties = decode_properties(&message_id, &properties)?;
                let event = StoredEvent {
                    profile_id,
                    message_id,
                    name,
                    occurred_at_micros,
                    properties,
                    source,
                };
                Ok((id, event))
            },
        )
        .collect::<Result<Vec<_>, ProfileError>>()?;
    // Aggregates do not promise an order.
    events.sort_unstable_by_key(|(id, _)| *id);
    Ok(events)
}

/// The newest cursor, 0 when nothing was ever written.
pub(super) async fn head<C: ConnectionTrait>(db: &C) -> Result<u64, ProfileError> {
    // The sequence alone: every write reads it, and a change's payload can
    // be a whole profile.
    let last: Option<i64> = change::Entity::find()
        .select_only()
        .column(change::Column::Seq)
        .order_by_desc(change::Column::Seq)
        .into_tuple()
        .one(db)
        .await?;
    Ok(last.map_or(0, |seq| u64::try_from(seq).unwrap_or(0)))
}
