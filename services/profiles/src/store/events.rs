//! Event ingestion: a batch is one transaction. Message ids already stored
//! are skipped (retries are idempotent); events whose identifiers all point
//! at one known person take the fast path (one lookup for the whole batch),
//! the rest resolve identities one by one as an upsert would.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use madtech_common::sql::{self, Sql};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryOrder, QuerySelect,
};

use super::changes::{self, ChangeRecord};
use super::entities::event;
use super::graph;
use super::publish_upsert;
use crate::error::ProfileError;
use crate::identity::Identifier;
use crate::resolution::{IdentityRules, KeptApart};
use crate::traits::TraitValue;

/// Who an event is about.
#[derive(Debug, Clone, PartialEq)]
pub enum Who {
    ProfileId(String),
    /// Linked to one another as an upsert links them.
    Identifiers(BTreeSet<Identifier>),
}

/// An event to record, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub message_id: String,
    pub name: String,
    pub occurred_at: DateTime<Utc>,
    pub properties: BTreeMap<String, TraitValue>,
    pub source: String,
    pub who: Who,
}

/// What an ingestion did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ingested {
    pub accepted: u64,
    pub duplicates: u64,
    /// The person each accepted event was recorded for, in batch order
    /// (`None` for duplicates).
    pub profile_ids: Vec<Option<String>>,
    pub kept_apart: Vec<KeptApart>,
}

/// Events per change-log entry, which bounds a watcher's message size.
const EVENTS_PER_CHANGE: usize = 1_000;

/// Where an ingested event's values go, in order.
const EVENT_COLUMNS: &str =
    "events (message_id, profile_id, name, occurred_at, received_at, properties, source, block)";

/// Events per block of ids. The per-person index is keyed by (block,
/// person): a batch's rows fall in one or two blocks, so their index entries
/// go to a few adjacent pages, where an index by person alone takes one
/// random page per person per batch (measured: most of a batch's insert and
/// commit time on SQLite). Reading one person's events then seeks once per
/// block, a few milliseconds per million events stored, which only
/// data-subject requests do: merges leave events where they are.
pub(super) const EVENTS_PER_BLOCK: i64 = 4_096;

/// The condition (on `events`) that selects the events recorded for any
/// of `profile_ids`, one index seek per block; `profile_ids` must not be
/// empty.
pub(super) fn recorded_for(backend: DbBackend, profile_ids: &[String]) -> Sql {
    let mut sql = Sql::new(match backend {
        DbBackend::Postgres => {
            "events.block = ANY(ARRAY(SELECT generate_series(0, (SELECT max(block) FROM events))))"
        }
        _ => {
            "events.block IN (WITH RECURSIVE blocks(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM blocks WHERE n < (SELECT max(block) FROM events)) SELECT n FROM blocks)"
        }
    });
    sql.push(" AND events.profile_id IN ")
        .bind_list(profile_ids);
    sql
}

/// What a batch's reads found: which of its message ids are stored, the
/// live person behind each profile id it names, the owner of each
/// identifier it carries; and the change-log head they were read after.
#[derive(Debug)]
pub(super) struct Lookups {
    head: u64,
    fresh: Vec<bool>,
    live: BTreeMap<String, String>,
    owners: BTreeMap<String, String>,
}

/// The batch's reads, on `db`. Run on a reader before the writer slot is
/// taken, they keep the slot (which ingestion throughput is bound by) for
/// the writing; [`ingest`] checks under the slot that they still hold.
pub(super) async fn look_up<C: ConnectionTrait>(
    db: &C,
    batch: &[NewEvent],
) -> Result<Lookups, ProfileError> {
    // Read first: whatever committed up to it is visible to the reads below.
    let head = changes::head(db).await?;
    let stored = stored_message_ids(db, batch).await?;
    let mut seen = HashSet::with_capacity(batch.len());
    let fresh: Vec<bool> = batch
        .iter()
        .map(|e| !stored.contains(&e.message_id) && seen.insert(e.message_id.as_str()))
        .collect();
    let live = live_ids(db, batch, &fresh).await?;
    let owners = graph::owners(
        db,
        batch
            .iter()
            .zip(&fresh)
            .filter(|(_, fresh)| **fresh)
            .filter_map(|(e, _)| match &e.who {
                Who::Identifiers(ids) => Some(ids.iter().map(Identifier::key)),
                Who::ProfileId(_) => None,
            })
            .flatten()
            .collect::<BTreeSet<_>>(),
    )
    .await?;
    Ok(Lookups {
        head,
        fresh,
        live,
        owners,
    })
}

/// Records `batch` for the people it names, using `early` lookups when
/// nothing but event appends has been committed since they were made.
///
/// Appends of events change no owner and no person, so the lookups still
/// hold then, except that a message id may have been stored since (a
/// concurrent retry of the same batch): the unique index refuses the insert
/// and the write is retried with fresh lookups. Every other change (people
/// created, merged, erased, identifiers removed) is logged with its person,
/// and sends the batch to lookups under the slot. An identifier attached by
/// another batch's event since is merely missing from `early` and resolved
/// here.
pub(super) async fn ingest(
    txn: &DatabaseTransaction,
    rules: &IdentityRules,
    batch: &[NewEvent],
    early: Option<Lookups>,
) -> Result<Ingested, ProfileError> {
    let now = Utc::now();
    let lookups = match early {
        Some(early) if changes::only_events_since(txn, early.head).await? => early,
        _ => look_up(txn, batch).await?,
    };
    let Lookups {
        fresh,
        mut live,
        mut owners,
        ..
    } = lookups;

    let mut result = Ingested::default();
    let mut rows = Vec::new();
    for (i, (new, fresh)) in batch.iter().zip(&fresh).enumerate() {
        if !fresh {
            result.duplicates += 1;
            continue;
        }
        let profile_id = match &new.who {
            Who::ProfileId(id) => live
                .get(id)
                .cloned()
                .ok_or_else(|| ProfileError::UnknownReference(format!("events[{i}].profile_id")))?,
            Who::Identifiers(ids) => match single_owner(&owners, ids) {
                Some(owner) => owner,
                None => {
                    let resolved = graph::resolve(txn, rules, ids, now).await?;
                    // Later events in the batch see what this one linked.
                    let survivor = resolved.profile_id().to_string();
                    for merged in &resolved.merged {
                        for target in live.values_mut().chain(owners.values_mut()) {
                            if target == merged {
                                target.clone_from(&survivor);
                            }
                        }
                        live.insert(merged.clone(), survivor.clone());
                    }
                    for id in ids {
                        if !resolved.kept_apart.iter().any(|k| &k.identifier == id) {
                            owners.insert(id.key(), survivor.clone());
                        }
                    }
                    if resolved.created || !resolved.merged.is_empty() {
                        graph::save(txn, &resolved.person).await?;
                        let at = now.timestamp_micros();
                        publish_upsert(txn, &resolved.person, resolved.created, at).await?;
                    }
                    result.kept_apart.extend(resolved.kept_apart);
                    survivor
                }
            },
        };
        rows.push((new, profile_id));
    }
    // An event placed before a later event in the batch merged its person
    // away belongs to the survivor.
    for (_, profile_id) in &mut rows {
        if let Some(survivor) = live.get(profile_id) {
            profile_id.clone_from(survivor);
        }
    }
    let mut accepted = rows.iter().map(|(_, id)| id.clone());
    result.profile_ids = fresh
        .iter()
        .map(|fresh| if *fresh { accepted.next() } else { None })
        .collect();

    let mut after_id = last_event_id(txn).await?;
    // The ids the rows will get, for their blocks: one writer at a time
    // (the append lock); should the sequence have moved past the highest
    // stored id (erased events), a row is filed a block early, which
    // lookups, reading every block, do not mind.
    let mut next_id = after_id;
    for chunk in rows.chunks(EVENTS_PER_CHANGE) {
        let stored = chunk
            .iter()
            .map(|(new, profile_id)| {
                next_id += 1;
                let properties = serde_json::to_string(&new.properties)
                    .map_err(|err| ProfileError::Corrupt(format!("properties: {err}")))?;
                Ok(vec![
                    new.message_id.as_str().into(),
                    profile_id.as_str().into(),
                    new.name.as_str().into(),
                    new.occurred_at.timestamp_micros().into(),
                    now.timestamp_micros().into(),
                    properties.into(),
                    new.source.as_str().into(),
                    (next_id / EVENTS_PER_BLOCK).into(),
                ])
            })
            .collect::<Result<Vec<_>, ProfileError>>()?;
        sql::insert_rows(txn, EVENT_COLUMNS, "", stored).await?;
        // One writer at a time (the append lock), so the batch holds the
        // ids after `after_id` up to the highest.
        let last_id = last_event_id(txn).await?;
        let record = ChangeRecord::EventsAppended { after_id, last_id };
        changes::append(txn, "", &record, now.timestamp_micros()).await?;
        after_id = last_id;
        result.accepted += chunk.len() as u64;
    }
    Ok(result)
}

/// The highest event id so far (0 when there are none).
async fn last_event_id(txn: &DatabaseTransaction) -> Result<i64, ProfileError> {
    let last: Option<i64> = event::Entity::find()
        .select_only()
        .column(event::Column::Id)
        .order_by_desc(event::Column::Id)
        .into_tuple()
        .one(txn)
        .await?;
    Ok(last.unwrap_or(0))
}

/// The one person every identifier already points at, if there is one.
fn single_owner(owners: &BTreeMap<String, String>, ids: &BTreeSet<Identifier>) -> Option<String> {
    let mut found: Option<&String> = None;
    for id in ids {
        let owner = owners.get(&id.key())?;
        match found {
            Some(previous) if previous != owner => return None,
            _ => found = Some(owner),
        }
    }
    found.cloned()
}

/// The message ids of `batch` already stored.
async fn stored_message_ids<C: ConnectionTrait>(
    db: &C,
    batch: &[NewEvent],
) -> Result<HashSet<String>, ProfileError> {
    let ids: Vec<&str> = batch.iter().map(|e| e.message_id.as_str()).collect();
    let stored: Vec<String> =
        sql::rows_where_in(db, &["message_id"], "events", "message_id", &ids).await?;
    Ok(stored.into_iter().collect())
}

/// The live profile behind each profile id the fresh events name.
async fn live_ids<C: ConnectionTrait>(
    db: &C,
    batch: &[NewEvent],
    fresh: &[bool],
) -> Result<BTreeMap<String, String>, ProfileError> {
    let named: Vec<&str> = batch
        .iter()
        .zip(fresh)
        .filter(|(_, fresh)| **fresh)
        .filter_map(|(e, _)| match &e.who {
            Who::ProfileId(id) => Some(id.as_str()),
            Who::Identifiers(_) => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    live_profiles(db, &named).await
}

/// The live profile behind each of `ids` that exists: itself, or the
/// profile it was merged into.
pub(super) async fn live_profiles<C: ConnectionTrait>(
    db: &C,
    ids: &[&str],
) -> Result<BTreeMap<String, String>, ProfileError> {
    let rows: Vec<(String, Option<String>)> =
        sql::rows_where_in(db, &["id", "merged_into"], "profiles", "id", ids).await?;
    // Merge chains are one hop long, so `merged_into` is the live id.
    Ok(rows
        .into_iter()
        .map(|(id, into)| {
            let target = into.unwrap_or_else(|| id.clone());
            (id, target)
        })
        .collect())
}
