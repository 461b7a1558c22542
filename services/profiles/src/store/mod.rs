//! Persistence of profiles, the identity graph, events and the change log.
//!
//! Every write runs in one transaction that also appends to the change log
//! ([`changes`]); writes are serialised (a mutex in the process, an advisory
//! lock across PostgreSQL replicas), which keeps merges simple and cursors in
//! commit order. SQLite syncs each commit to disk (see `madtech_common::db`),
//! so a write that returned OK survives a crash.

pub mod changes;
mod entities;
mod events;
mod graph;
mod migration;
mod privacy;
mod suppression;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard, watch};

pub use changes::{Change, ChangeKind, Page};
pub use events::{Ingested, NewEvent, Who};
pub use migration::Migrator;
pub use privacy::Erased;

use madtech_common::db::WriteThread;
use madtech_common::error::json_error;
use madtech_common::sql::{self, JsonFunctions, Sql};

use crate::error::ProfileError;
use crate::identity::Identifier;
use crate::resolution::{IdentityRules, KeptApart};
use crate::traits::{self, TraitOperation, TraitValue, Traits};
use changes::ChangeRecord;
use entities::{event, identifier, profile};

/// A profile as the domain sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub identifiers: BTreeSet<Identifier>,
    pub traits: Traits,
    /// ISO 3166 code; empty when unknown.
    pub region: String,
    /// Profiles merged into this one (directly or through earlier merges).
    pub merged_ids: Vec<String>,
    pub created_at_micros: i64,
    pub updated_at_micros: i64,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub profile_id: String,
    pub message_id: String,
    pub name: String,
    pub occurred_at_micros: i64,
    pub properties: BTreeMap<String, TraitValue>,
    pub source: String,
}

/// What an upsert asks for, already validated and normalised.
#[derive(Debug, Clone)]
pub struct Upsert {
    pub identifiers: BTreeSet<Identifier>,
    /// Applied in order.
    pub operations: Vec<TraitOperation>,
    /// Empty keeps the current region.
    pub region: String,
    pub source: String,
    /// When the values were observed; now when `None`.
    pub observed_at: Option<DateTime<Utc>>,
}

/// What an upsert did.
#[derive(Debug, Clone)]
pub struct Upserted {
    pub profile: Profile,
    pub created: bool,
    pub merged: Vec<String>,
    pub kept_apart: Vec<KeptApart>,
}

/// How a request names a person.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    ProfileId(String),
    Identifier(Identifier),
}

/// How many times a write that lost a race (another replica) is tried.
const WRITE_ATTEMPTS: usize = 3;

/// Runs `$attempt` (an async expression using the transaction `$txn`) in a
/// write of `$writer`, committing on success and retrying a lost race.
macro_rules! write_retrying {
    ($writer:expr, |$txn:ident| $attempt:expr) => {{
        for _ in 0..WRITE_ATTEMPTS {
            let write = $writer.begin_write().await?;
            let result = {
                let $txn = &write.txn;
                $attempt.await
            };
            if let Some(done) = $writer.finish(write, result).await? {
                return Ok(done);
            }
        }
        Err(ProfileError::Conflict)
    }};
}

/// The longest chain of merged-away ids followed on a read.
const MAX_MERGE_HOPS: usize = 32;

pub struct ProfileStore {
    db: DatabaseConnection,
    writer: Arc<Writer>,
    /// Where every write runs (see [`WriteThread`]).
    write_thread: WriteThread,
}

/// What writes need: the connection they go through, the identity rules,
/// and the process's writer slot.
struct Writer {
    /// See [`madtech_common::db::writer_for`].
    db: DatabaseConnection,
    rules: IdentityRules,
    slot: Mutex<()>,
    /// The newest cursor this process appended, for watchers to wake on.
    appended: watch::Sender<u64>,
}

/// A write in progress: the process's writer slot and a transaction holding
/// the append lock.
struct Write<'a> {
    _slot: MutexGuard<'a, ()>,
    txn: DatabaseTransaction,
}

impl ProfileStore {
    /// A store reading from `db` and writing through `writer_db`, on a
    /// thread of its own.
    pub fn new(
        db: DatabaseConnection,
        writer_db: DatabaseConnection,
        rules: IdentityRules,
    ) -> Result<Self, ProfileError> {
        Ok(ProfileStore {
            db,
            writer: Arc::new(Writer {
                db: writer_db,
                rules,
                slot: Mutex::new(()),
                appended: watch::Sender::new(0),
            }),
            write_thread: WriteThread::start("profiles-writer")
                .map_err(ProfileError::WriteThread)?,
        })
    }

    /// Runs `write` on the write thread.
    async fn write<T, F, Fut>(&self, write: F) -> Result<T, ProfileError>
    where
        F: FnOnce(Arc<Writer>) -> Fut,
        Fut: Future<Output = Result<T, ProfileError>> + Send + 'static,
        T: Send + 'static,
    {
        self.write_thread.run(write(self.writer.clone())).await?
    }

    /// Creates the profile the identifiers describe, or updates the one they
    /// point at; several matching profiles merge unless the identity rules
    /// keep them apart.
    pub async fn upsert(&self, request: Upsert) -> Result<Upserted, ProfileError> {
        self.write(|writer| async move {
            write_retrying!(writer, |txn| writer.try_upsert(txn, &request))
        })
        .await
    }

    /// Applies `requests` in order in one transaction: all or none.
    pub async fn upsert_many(&self, requests: Vec<Upsert>) -> Result<Vec<Upserted>, ProfileError> {
        self.write(|writer| async move {
            write_retrying!(writer, |txn| writer.try_upsert_many(txn, &requests))
        })
        .await
    }

    /// Detaches `id` from the person it points at.
    pub async fn remove_identifier(&self, id: &Identifier) -> Result<Profile, ProfileError> {
        let id = id.clone();
        self.write(|writer| async move {
            write_retrying!(writer, |txn| Writer::try_remove_identifier(txn, &id))
        })
        .await
    }

    /// Records events; see [`events`].
    pub async fn ingest(&self, batch: Vec<NewEvent>) -> Result<Ingested, ProfileError> {
        // Looked up before the writer slot, on a reader; a retry looks up
        // under it.
        let early = events::look_up(&self.db, &batch).await?;
        self.ingest_looked_up(batch, early).await
    }

    /// Records `batch` with lookups made before the writer slot.
    async fn ingest_looked_up(
        &self,
        batch: Vec<NewEvent>,
        early: events::Lookups,
    ) -> Result<Ingested, ProfileError> {
        self.write(|writer| async move {
            let mut early = Some(early);
            write_retrying!(writer, |txn| events::ingest(
                txn,
                &writer.rules,
                &batch,
                early.take()
            ))
        })
        .await
    }

    /// Hard-deletes a person; see [`privacy`].
    /// With `suppress`, the person's identifiers are kept as digests and
    /// refused from then on, until the suppression is lifted.
    pub async fn erase(&self, lookup: &Lookup, suppress: bool) -> Result<Erased, ProfileError> {
        let lookup = lookup.clone();
        self.write(|writer| async move {
            write_retrying!(writer, |txn| Writer::try_erase(txn, &lookup, suppress))
        })
        .await
    }

    /// The person an already stored event was recorded for.
    pub async fn event_owner(&self, message_id: &str) -> Result<String, ProfileError> {
        let row = event::Entity::find()
            .filter(event::Column::MessageId.eq(message_id))
            .one(&self.db)
            .await?
            .ok_or(ProfileError::NotFound)?;
        Ok(live_row(&self.db, &row.profile_id).await?.id)
    }

    /// Lets an erased person's identifier be used again (they came back
    /// with new consent); whether it was suppressed.
    pub async fn lift_suppression(&self, identifier: &Identifier) -> Result<bool, ProfileError> {
        // One statement, outside the slot: it moves no owner and logs no
        // change, but it is a write, so it goes where writes go.
        let identifier = identifier.clone();
        self.write(|writer| async move { suppression::lift(&writer.db, &identifier).await })
            .await
    }

    /// Lifts the suppression of every identifier `request` names and
    /// upserts it, in one write: a person back with new consent is never
    /// left with an identifier unsuppressed and nobody behind it. Answers
    /// whether any was suppressed, and what the upsert did.
    pub async fn lift_and_upsert(&self, request: Upsert) -> Result<(bool, Upserted), ProfileError> {
        self.write(|writer| async move {
            write_retrying!(writer, |txn| async {
                let mut lifted = false;
                for identifier in &request.identifiers {
                    lifted |= suppression::lift(txn, identifier).await?;
                }
                let upserted = writer.try_upsert(txn, &request).await?;
                Ok::<_, ProfileError>((lifted, upserted))
            })
        })
        .await
    }

    /// Everything held about a person, as JSON.
    pub async fn export(&self, lookup: &Lookup) -> Result<serde_json::Value, ProfileError> {
        let id = resolve_lookup(&self.db, lookup).await?;
        privacy::export(&self.db, &id).await
    }

    /// Up to `limit` rows of the change log after `cursor`.
    pub async fn changes_after(&self, cursor: u64, limit: u64) -> Result<Page, ProfileError> {
        changes::after(&self.db, cursor, limit).await
    }

    /// The newest cursor (0 before the first change).
    pub async fn head(&self) -> Result<u64, ProfileError> {
        changes::head(&self.db).await
    }

    /// Wakes when this process appends to the change log. Other replicas'
    /// appends are found by polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.writer.appended.subscribe()
    }

    /// The live profile behind a lookup.
    pub async fn find(&self, lookup: &Lookup) -> Result<Profile, ProfileError> {
        match lookup {
            Lookup::ProfileId(id) => self.get(id).await,
            Lookup::Identifier(id) => self.find_by_identifier(id).await,
        }
    }

    /// The live profile behind `id`, following merges.
    pub async fn get(&self, id: &str) -> Result<Profile, ProfileError> {
        read_live(&self.db, &Lookup::ProfileId(id.to_string())).await
    }

    /// The live profile an identifier points at.
    pub async fn find_by_identifier(&self, id: &Identifier) -> Result<Profile, ProfileError> {
        read_live(&self.db, &Lookup::Identifier(id.clone())).await
    }

    /// Up to `limit` live profiles with ids after `after`, in id order.
    pub async fn list_page(&self, after: &str, limit: u64) -> Result<Vec<Profile>, ProfileError> {
        let rows = profile::Entity::find()
            .filter(profile::Column::MergedInto.is_null())
            .filter(profile::Column::Id.gt(after))
            .order_by_asc(profile::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        let ids: Vec<String> = rows.iter().map(|row| row.id.clone()).collect();
        let mut identifiers = identifier::Entity::find()
            .filter(identifier::Column::ProfileId.is_in(ids.clone()))
            .all(&self.db)
            .await?;
        identifiers.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
        let merged = merged_into(&self.db, &ids).await?;
        rows.into_iter()
            .map(|row| {
                let start = identifiers.partition_point(|i| i.profile_id < row.id);
                let end = identifiers.partition_point(|i| i.profile_id <= row.id);
                let m_start = merged.partition_point(|(_, into)| *into < row.id);
                let m_end = merged.partition_point(|(_, into)| *into <= row.id);
                assemble(row, &identifiers[start..end], &merged[m_start..m_end])
            })
            .collect()
    }
}

impl Writer {
    async fn begin_write(&self) -> Result<Write<'_>, ProfileError> {
        let slot = self.slot.lock().await;
        let txn = self.db.begin().await?;
        changes::lock(&txn).await?;
        Ok(Write { _slot: slot, txn })
    }

    async fn commit(&self, write: Write<'_>) -> Result<(), ProfileError> {
        let head = changes::head(&write.txn).await?;
        write.txn.commit().await?;
        self.appended.send_replace(head);
        Ok(())
    }

    /// Commits a write that succeeded; `None` when it lost a race with
    /// another replica on the same identifier (PostgreSQL's unique index
    /// catches it) and should be retried.
    async fn finish<T>(
        &self,
        write: Write<'_>,
        result: Result<T, ProfileError>,
    ) -> Result<Option<T>, ProfileError> {
        match result {
            Ok(value) => {
                self.commit(write).await?;
                Ok(Some(value))
            }
            Err(err) => {
                // Rolled back before answering (see `db::settle`).
                madtech_common::db::roll_back(write.txn).await;
                match err {
                    ProfileError::Database(err)
                        if madtech_common::db::is_unique_violation(&err) =>
                    {
                        Ok(None)
                    }
                    err => Err(err),
                }
            }
        }
    }

    async fn try_upsert_many(
        &self,
        txn: &DatabaseTransaction,
        requests: &[Upsert],
    ) -> Result<Vec<Upserted>, ProfileError> {
        let mut done = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            done.push(
                self.try_upsert(txn, request)
                    .await
                    .map_err(|err| match err {
                        ProfileError::Precondition(reason) => {
                            ProfileError::Precondition(format!("upserts[{i}]: {reason}"))
                        }
                        other => other,
                    })?,
            );
        }
        Ok(done)
    }

    async fn try_upsert(
        &self,
        txn: &DatabaseTransaction,
        request: &Upsert,
    ) -> Result<Upserted, ProfileError> {
        let now = Utc::now();
        let resolved = graph::resolve(txn, &self.rules, &request.identifiers, now).await?;
        let mut profile = resolved.person;
        traits::apply(
            &mut profile.traits,
            &request.operations,
            &request.source,
            request.observed_at.unwrap_or(now),
        )
        .map_err(|err| ProfileError::Precondition(err.to_string()))?;
        if !request.region.is_empty() {
            profile.region.clone_from(&request.region);
        }
        graph::save(txn, &profile).await?;
        publish_upsert(txn, &profile, resolved.created, now.timestamp_micros()).await?;
        Ok(Upserted {
            profile,
            created: resolved.created,
            merged: resolved.merged,
            kept_apart: resolved.kept_apart,
        })
    }

    async fn try_remove_identifier(
        txn: &DatabaseTransaction,
        id: &Identifier,
    ) -> Result<Profile, ProfileError> {
        let row = identifier::Entity::find_by_id(id.key())
            .one(txn)
            .await?
            .ok_or(ProfileError::NotFound)?;
        identifier::Entity::delete_by_id(id.key()).exec(txn).await?;
        let now = Utc::now().timestamp_micros();
        profile::Entity::update(profile::ActiveModel {
            id: Set(row.profile_id.clone()),
            updated_at: Set(now),
            ..Default::default()
        })
        .exec(txn)
        .await?;
        let profile = load_live(txn, &row.profile_id).await?;
        publish_upsert(txn, &profile, false, now).await?;
        Ok(profile)
    }

    /// Resolves the person inside the write, so a merge committed just before
    /// cannot leave part of them behind.
    async fn try_erase(
        txn: &DatabaseTransaction,
        lookup: &Lookup,
        suppress: bool,
    ) -> Result<Erased, ProfileError> {
        let id = resolve_lookup(txn, lookup).await?;
        privacy::erase(txn, &id, suppress).await
    }
}

/// The live profile id behind a lookup.
async fn resolve_lookup<C: ConnectionTrait>(
    db: &C,
    lookup: &Lookup,
) -> Result<String, ProfileError> {
    match lookup {
        Lookup::ProfileId(id) => Ok(live_row(db, id).await?.id),
        Lookup::Identifier(id) => owner_of(db, id).await,
    }
}

async fn owner_of<C: ConnectionTrait>(db: &C, id: &Identifier) -> Result<String, ProfileError> {
    identifier::Entity::find_by_id(id.key())
        .one(db)
        .await?
        .map(|row| row.profile_id)
        .ok_or(ProfileError::NotFound)
}

async fn live_row<C: ConnectionTrait>(db: &C, id: &str) -> Result<profile::Model, ProfileError> {
    let mut current = id.to_string();
    for _ in 0..MAX_MERGE_HOPS {
        let row = profile::Entity::find_by_id(current.clone())
            .one(db)
            .await?
            .ok_or(ProfileError::NotFound)?;
        match row.merged_into {
            Some(next) => current = next,
            None => return Ok(row),
        }
    }
    Err(ProfileError::Corrupt(format!(
        "merge chain from {id} is too long"
    )))
}

/// Appends the profile as it now is to the change log.
async fn publish_upsert(
    txn: &DatabaseTransaction,
    profile: &Profile,
    created: bool,
    at: i64,
) -> Result<(), ProfileError> {
    let record = ChangeRecord::Upserted {
        profile: Box::new(profile.clone()),
        created,
    };
    changes::append(txn, &profile.id, &record, at).await?;
    Ok(())
}

async fn load_live<C: ConnectionTrait>(db: &C, id: &str) -> Result<Profile, ProfileError> {
    let row = profile::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(ProfileError::NotFound)?;
    to_profile(db, row).await
}

/// A profile as [`read_live`]'s statement answers it: id, region, traits
/// JSON, created, updated, merged into, `[[kind, value]…]`, `[merged id…]`.
/// Empty aggregates are `null` on PostgreSQL.
#[derive(Deserialize)]
struct ProfileEntry(
    String,
    String,
    String,
    i64,
    i64,
    Option<String>,
    Option<Vec<(String, String)>>,
    Option<Vec<String>>,
);

/// The live profile behind a lookup in one statement (a lookup by
/// identifier is the service's hottest read): the identifier or id, the
/// one merge hop to the survivor, the row, its identifiers and the ids
/// merged into it. Merges re-point earlier merges, so one hop reaches the
/// survivor; should a row say otherwise, the hops are followed one by one.
async fn read_live<C: ConnectionTrait>(db: &C, lookup: &Lookup) -> Result<Profile, ProfileError> {
    let json = JsonFunctions::of(db.get_database_backend());
    let (group, array, embed) = (json.group, json.array, json.embed);
    let mut query = Sql::new("WITH target AS (SELECT COALESCE(o.merged_into, o.id) AS id FROM ");
    match lookup {
        Lookup::ProfileId(id) => query.push("profiles o WHERE o.id = ").bind(id.clone()),
        Lookup::Identifier(id) => query
            .push("identifiers i JOIN profiles o ON o.id = i.profile_id WHERE i.\"key\" = ")
            .bind(id.key()),
    };
    query.push(&format!(
        ") SELECT {group}({array}(p.id, p.region, p.traits, p.created_at, p.updated_at, p.merged_into, \
         {embed}((SELECT {group}({array}(i.kind, i.value)) FROM identifiers i WHERE i.profile_id = p.id)), \
         {embed}((SELECT {group}(m.id) FROM profiles m WHERE m.merged_into = p.id)))){} AS page \
         FROM profiles p JOIN target ON p.id = target.id",
        json.as_text
    ));
    let entry: Option<ProfileEntry> = sql::json_page(db, &query).await?.into_iter().next();
    let ProfileEntry(id, region, traits, created, updated, merged_into, identifiers, merged) =
        entry.ok_or(ProfileError::NotFound)?;
    if let Some(next) = merged_into {
        return load_live(db, &live_row(db, &next).await?.id).await;
    }
    let mut merged_ids = merged.unwrap_or_default();
    merged_ids.sort_unstable();
    Ok(Profile {
        traits: decode_traits(&traits)?,
        id,
        identifiers: identifiers
            .unwrap_or_default()
            .into_iter()
            .map(|(kind, value)| stored_identifier(&kind, value))
            .collect(),
        region,
        merged_ids,
        created_at_micros: created,
        updated_at_micros: updated,
    })
}

async fn to_profile<C: ConnectionTrait>(
    db: &C,
    row: profile::Model,
) -> Result<Profile, ProfileError> {
    let identifiers = identifier::Entity::find()
        .filter(identifier::Column::ProfileId.eq(row.id.clone()))
        .all(db)
        .await?;
    let merged = merged_into(db, std::slice::from_ref(&row.id)).await?;
    assemble(row, &identifiers, &merged)
}

/// `(merged id, survivor id)` for every profile merged into one of `ids`,
/// sorted by survivor.
async fn merged_into<C: ConnectionTrait>(
    db: &C,
    ids: &[String],
) -> Result<Vec<(String, String)>, ProfileError> {
    let mut merged: Vec<(String, String)> = profile::Entity::find()
        .filter(profile::Column::MergedInto.is_in(ids.iter().cloned()))
        .all(db)
        .await?
        .into_iter()
        .filter_map(|row| Some((row.id, row.merged_into?)))
        .collect();
    merged.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(merged)
}

fn assemble(
    row: profile::Model,
    identifiers: &[identifier::Model],
    merged: &[(String, String)],
) -> Result<Profile, ProfileError> {
    Ok(Profile {
        traits: decode_traits(&row.traits)?,
        id: row.id,
        identifiers: identifiers.iter().map(identifier_from_row).collect(),
        region: row.region,
        merged_ids: merged.iter().map(|(id, _)| id.clone()).collect(),
        created_at_micros: row.created_at,
        updated_at_micros: row.updated_at,
    })
}

fn identifier_from_row(row: &identifier::Model) -> Identifier {
    stored_identifier(&row.kind, row.value.clone())
}

/// An identifier as stored: its kind's name and its normalised value.
fn stored_identifier(kind: &str, value: String) -> Identifier {
    Identifier {
        kind: crate::identity::IdentifierKind::from_name(kind),
        value,
    }
}

fn decode_traits(json: &str) -> Result<Traits, ProfileError> {
    serde_json::from_str(json)
        .map_err(|err| ProfileError::Corrupt(format!("traits: {}", json_error(&err))))
}

fn decode_properties(
    message_id: &str,
    json: &str,
) -> Result<BTreeMap<String, TraitValue>, ProfileError> {
    serde_json::from_str(json)
        .map_err(|err| ProfileError::Corrupt(format!("event {message_id}: {}", json_error(&err))))
}

fn encode_traits(traits: &Traits) -> Result<String, ProfileError> {
    serde_json::to_string(traits).map_err(|err| ProfileError::Corrupt(format!("traits: {err}")))
}

fn decode_event(row: event::Model) -> Result<StoredEvent, ProfileError> {
    let properties = decode_properties(&row.message_id, &row.properties)?;
    Ok(StoredEvent {
        profile_id: row.profile_id,
        message_id: row.message_id,
        name: row.name,
        occurred_at_micros: row.occurred_at,
        properties,
        source: row.source,
    })
}

#[cfg(test)]
mod tests;
