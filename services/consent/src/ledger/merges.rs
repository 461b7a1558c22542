//! Profile merges as they reach consent: when two profiles turn out to be
//! one person, the survivor's state per purpose becomes the most
//! restrictive of the two (denied, then unset, then granted), written as a
//! `merge` entry, until the person chooses again. The profiles change
//! stream is followed from a stored cursor, and each merge is applied with
//! that cursor in one transaction, so a merge is applied exactly once.

use madtech_common::db::settle;
use std::collections::BTreeMap;

use chrono::Utc;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, Set, TransactionTrait};

use super::entities::{current, entry, follow, merge};
use super::{
    Entry, Ledger, LegalBasis, Source, State, append, cursor_of, entry_from_row, lock_appends,
    state_at,
};
use crate::error::ConsentError;

/// The name of the profiles change stream in `consent_follow`.
const PROFILE_CHANGES: &str = "profile_changes";

/// The profile a merged-away id now belongs to (itself when not merged).
pub(super) async fn survivor_of(
    txn: &DatabaseTransaction,
    profile_id: &str,
) -> Result<String, ConsentError> {
    Ok(merge::Entity::find_by_id(profile_id.to_string())
        .one(txn)
        .await?
        .map_or_else(|| profile_id.to_string(), |row| row.survivor_id))
}

/// Every id merged into `survivor`.
pub(super) async fn absorbed_by(
    txn: &DatabaseTransaction,
    survivor: &str,
) -> Result<Vec<String>, ConsentError> {
    Ok(merge::Entity::find()
        .filter(merge::Column::SurvivorId.eq(survivor))
        .all(txn)
        .await?
        .into_iter()
        .map(|row| row.absorbed_id)
        .collect())
}

/// Denied is the most restrictive, then unset, then granted.
fn restrictiveness(state: State) -> u8 {
    match state {
        State::Denied => 0,
        State::Unset => 1,
        State::Granted => 2,
    }
}

impl Ledger {
    /// How far the profiles change stream has been applied.
    pub async fn profile_cursor(&self) -> Result<u64, ConsentError> {
        let row = follow::Entity::find_by_id(PROFILE_CHANGES.to_string())
            .one(&self.db)
            .await?;
        row.map_or(Ok(0), |row| cursor_of(row.cursor))
    }

    /// Records that the profiles change stream was read up to `cursor`
    /// (changes that mean nothing to consent).
    pub async fn advance_profile_cursor(&self, cursor: u64) -> Result<(), ConsentError> {
        let _writer = self.writer.lock().await;
        let txn = self.db.begin().await?;
        let result = async {
            lock_appends(&txn).await?;
            store_cursor(&txn, cursor).await?;
            Ok::<_, ConsentError>(())
        }
        .await;
        settle(txn, result).await
    }

    /// Applies the merge of `absorbed` into `survivor` that the profiles
    /// change stream delivered at `cursor`; a cursor already applied
    /// changes nothing. Returns the entries written.
    pub async fn apply_merge(
        &self,
        cursor: u64,
        survivor: &str,
        absorbed: &[String],
    ) -> Result<Vec<Entry>, ConsentError> {
        let _writer = self.writer.lock().await;
        let txn = self.db.begin().await?;
        let result = async {
            lock_appends(&txn).await?;
            let applied = follow::Entity::find_by_id(PROFILE_CHANGES.to_string())
                .one(&txn)
                .await?
                .map_or(Ok(0), |row| cursor_of(row.cursor))?;
            if cursor <= applied {
                return Ok(Vec::new());
            }
            let now = Utc::now().timestamp_micros();
            let absorbed: Vec<String> = absorbed
                .iter()
                .filter(|id| id.as_str() != survivor)
                .cloned()
                .collect();

            // Ids merged into an absorbed profile earlier now belong to the
            // survivor too.
            merge::Entity::update_many()
                .col_expr(merge::Column::SurvivorId, Expr::value(survivor.to_string()))
                .filter(merge::Column::SurvivorId.is_in(absorbed.iter().cloned()))
                .exec(&txn)
                .await?;
            for id in &absorbed {
                merge::Entity::insert(merge::ActiveModel {
                    absorbed_id: Set(id.clone()),
                    survivor_id: Set(survivor.to_string()),
                    merged_at: Set(now),
                })
                .on_conflict(
                    OnConflict::column(merge::Column::AbsorbedId)
                        .update_columns([merge::Column::SurvivorId, merge::Column::MergedAt])
                        .to_owned(),
                )
                .exec(&txn)
                .await?;
            }

            let people: Vec<String> = std::iter::once(survivor.to_string())
                .chain(absorbed.iter().cloned())
                .collect();
            let rows = current::Entity::find()
                .filter(current::Column::ProfileId.is_in(people.iter().cloned()))
                .all(&txn)
                .await?;
            // purpose → person → (state now, the entry behind it, when
            // that choice was collected)
            let mut states: BTreeMap<String, BTreeMap<String, (State, i64, i64)>> = BTreeMap::new();
            for row in rows {
                let state = state_at(&row, now)?;
                states
                    .entry(row.purpose)
                    .or_default()
                    .insert(row.profile_id, (state, row.seq, row.collected_at));
            }

            let mut written = Vec::new();
            for (purpose, by_person) in states {
                let state_of =
                    |person: &str| by_person.get(person).map_or(State::Unset, |(s, _, _)| *s);
                let survivor_state = state_of(survivor);
                let decider = people
                    .iter()
                    .min_by_key(|person| restrictiveness(state_of(person)))
                    .map(String::as_str)
                    .unwrap_or(survivor);
                let combined = state_of(decider);
                if restrictiveness(combined) >= restrictiveness(survivor_state) {
                    continue;
                }
                let evidence = match by_person.get(decider) {
                    Some((_, seq, _)) => Some(entry_by_seq(&txn, *seq).await?),
                    None => None,
                };
                // The merge decides between choices already made, so it
                // stands as of the newest of them, not as of now: a choice
                // collected after that one but recorded late still takes
                // effect over it.
                let newest_choice = by_person
                    .values()
                    .map(|(_, _, collected_at)| *collected_at)
                    .max()
                    .unwrap_or(now);
                let others: Vec<String> = people
                    .iter()
                    .filter(|p| p.as_str() != survivor)
                    .map(|p| format!("{p} {}", state_of(p)))
                    .collect();
                let mut entry = Entry {
                    cursor: 0,
                    profile_id: survivor.to_string(),
                    purpose: purpose.clone(),
                    state: combined,
                    legal_basis: evidence
                        .as_ref()
                        .map_or(LegalBasis::Consent, |e| e.legal_basis),
                    source: Source::Merge,
                    region: evidence
                        .as_ref()
                        .map(|e| e.region.clone())
                        .unwrap_or_default(),
                    notice_version: evidence
                        .as_ref()
                        .map(|e| e.notice_version.clone())
                        .unwrap_or_default(),
                    signal: None,
                    cmp: None,
                    derived_from: format!(
                        "merge: the most restrictive of {survivor} {survivor_state} and {}",
                        others.join(", ")
                    ),
                    conflict: Some(format!(
                        "{survivor_state} ({survivor}) overridden by the merge"
                    )),
                    collected_at_micros: newest_choice,
                    recorded_at_micros: now,
                    expires_at_micros: evidence.as_ref().and_then(|e| e.expires_at_micros),
                    effective: true,
                };
                entry.cursor = append(&txn, &entry).await?;
                written.push(entry);
            }
            store_cursor(&txn, cursor).await?;
            Ok::<_, ConsentError>(written)
        }
        .await;
        let written = settle(txn, result).await?;
        self.appended(&written);
        Ok(written)
    }
}

async fn entry_by_seq(txn: &DatabaseTransaction, seq: i64) -> Result<Entry, ConsentError> {
    let row = entry::Entity::find_by_id(seq)
        .one(txn)
        .await?
        .ok_or_else(|| {
            ConsentError::Corrupt(format!("current state points at missing entry {seq}"))
        })?;
    entry_from_row(row)
}

/// Moves the stored cursor forward (never back: a second replica following
/// the same stream may be behind).
async fn store_cursor(txn: &DatabaseTransaction, cursor: u64) -> Result<(), ConsentError> {
    let cursor = i64::try_from(cursor)
        .map_err(|_| ConsentError::Corrupt(format!("profile cursor {cursor} out of range")))?;
    let stored = follow::Entity::find_by_id(PROFILE_CHANGES.to_string())
        .one(txn)
        .await?;
    if stored.is_some_and(|row| row.cursor >= cursor) {
        return Ok(());
    }
    follow::Entity::insert(follow::ActiveModel {
        stream: Set(PROFILE_CHANGES.to_string()),
        cursor: Set(cursor),
    })
    .on_conflict(
        OnConflict::column(follow::Column::Stream)
            .update_column(follow::Column::Cursor)
            .to_owned(),
    )
    .exec(txn)
    .await?;
    Ok(())
}
