//! The consent ledger. Every choice is a new entry; nothing is updated or
//! deleted in place. A `consent_current` row per (person, purpose) points at
//! the latest entry so reads for many people stay index seeks, and it is
//! written in the same transaction as the entry it points at.

mod entities;
mod merges;
mod migration;

use madtech_common::db::settle;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    EntityTrait, NotSet, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    TransactionTrait,
};
use tokio::sync::{Mutex, watch};

pub use migration::Migrator;

use crate::error::ConsentError;
use entities::{current, entry};

/// A recorded choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Choice {
    Granted,
    Denied,
}

/// A purpose's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Unset,
    Granted,
    Denied,
}

impl From<Choice> for State {
    fn from(choice: Choice) -> Self {
        match choice {
            Choice::Granted => State::Granted,
            Choice::Denied => State::Denied,
        }
    }
}

/// How a choice reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cmp,
    Form,
    Api,
    Gpc,
    Import,
    PrivacyRequest,
    /// Written by the service when profiles merged, so consent never widens.
    Merge,
}

/// Why processing is lawful for a choice (GDPR Art. 6(1)), or, under US
/// opt-out laws, that the person was told and could opt out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegalBasis {
    Consent,
    OptOut,
    LegitimateInterest,
    Contract,
}

macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = ConsentError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(ConsentError::Corrupt(format!(
                        concat!("unknown ", stringify!($ty), " {:?}"), other
                    ))),
                }
            }
        }
    };
}

string_enum!(Choice { Granted => "granted", Denied => "denied" });
string_enum!(State { Unset => "unset", Granted => "granted", Denied => "denied" });
string_enum!(Source {
    Cmp => "cmp",
    Form => "form",
    Api => "api",
    Gpc => "gpc",
    Import => "import",
    PrivacyRequest => "privacy_request",
    Merge => "merge",
});
string_enum!(LegalBasis {
    Consent => "consent",
    OptOut => "opt_out",
    LegitimateInterest => "legitimate_interest",
    Contract => "contract",
});

/// The signal an entry was derived from, kept verbatim as evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalEvidence {
    /// `tcf`, `gpp`, `usp` or `gpc`.
    pub kind: String,
    pub raw: String,
}

/// One ledger entry: everything needed to prove the choice later
/// (GDPR Art. 7(1)).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub cursor: u64,
    pub profile_id: String,
    pub purpose: String,
    pub state: State,
    pub legal_basis: LegalBasis,
    pub source: Source,
    pub region: String,
    pub notice_version: String,
    pub signal: Option<SignalEvidence>,
    /// The consent management platform (CMP id, CMP version).
    pub cmp: Option<(u16, u16)>,
    /// Which fields or choice decided the state.
    pub derived_from: String,
    /// Choices for the purpose that this one overrode (e.g. a grant
    /// overridden by GPC).
    pub conflict: Option<String>,
    pub collected_at_micros: i64,
    pub recorded_at_micros: i64,
    /// After this the state counts as unset.
    pub expires_at_micros: Option<i64>,
    /// Whether this entry became the person's current state for the purpose
    /// when it was appended; a late import of an older choice does not.
    pub effective: bool,
}

/// One purpose's choice within a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedChoice {
    pub purpose: String,
    pub state: State,
    pub legal_basis: LegalBasis,
    pub signal: Option<SignalEvidence>,
    pub derived_from: String,
    pub conflict: Option<String>,
    /// How long after collection the choice lasts, when the policy limits it.
    pub lifetime_micros: Option<i64>,
    /// Re-ask rules that refuse this choice while a denial is this recent.
    pub holds: Vec<ReaskHold>,
}

/// A re-ask rule as it applies to one choice: refuse it while the current
/// state is a denial collected less than `wait_micros` ago.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaskHold {
    pub rule: String,
    pub wait_micros: i64,
}

/// A request to record choices for one person, validated.
#[derive(Debug, Clone)]
pub struct Record {
    pub profile_id: String,
    pub choices: Vec<RecordedChoice>,
    pub source: Source,
    pub region: String,
    pub notice_version: String,
    pub cmp: Option<(u16, u16)>,
    /// When the person chose; `None` means now.
    pub collected_at_micros: Option<i64>,
}

/// A purpose's current state and the entry behind it (0 when unset).
/// An expired choice answers `Unset` with the expired entry's cursor and
/// expiry, so a reader that remembers states by cursor replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurposeState {
    pub purpose: String,
    pub state: State,
    pub cursor: u64,
    pub expires_at_micros: Option<i64>,
}

/// Key of the PostgreSQL advisory lock that serialises appends.
const APPEND_LOCK: i64 = 0x6d61_6474_6563_6802;

pub struct Ledger {
    db: DatabaseConnection,
    /// Appends one at a time so cursors are handed out in commit order and a
    /// watcher never sees a later cursor before an earlier one.
    writer: Mutex<()>,
    latest: watch::Sender<u64>,
}

impl Ledger {
    pub fn new(db: DatabaseConnection) -> Self {
        let (latest, _) = watch::channel(0);
        Ledger {
            db,
            writer: Mutex::new(()),
            latest,
        }
    }

    /// Appends one entry per choice, atomically, and wakes watchers. A
    /// choice held back by a re-ask rule refuses the whole record.
    ///
    /// Choices are the person's: recorded for a merged-away id they go to
    /// the surviving profile, and every id merged into it gets a copy, so
    /// the most restrictive reading over all their ids is the new choice.
    pub async fn record(&self, record: Record) -> Result<Vec<Entry>, ConsentError> {
        let _writer = self.writer.lock().await;
        let now = Utc::now().timestamp_micros();
        let collected_at = record.collected_at_micros.unwrap_or(now);
        let txn = self.db.begin().await?;
        let result = async {
            lock_appends(&txn).await?;
            let subject = merges::survivor_of(&txn, &record.profile_id).await?;
            let copies = merges::absorbed_by(&txn, &subject).await?;
            let mut written = Vec::with_capacity(record.choices.len() * (1 + copies.len()));
            for choice in &record.choices {
                let known = current_row(&txn, &subject, &choice.purpose).await?;
                if let Some(known) = &known {
                    refuse_if_held(known, choice, now)?;
                }
                let entry = Entry {
                    cursor: 0,
                    profile_id: subject.clone(),
                    purpose: choice.purpose.clone(),
                    state: choice.state,
                    legal_basis: choice.legal_basis,
                    source: record.source,
                    region: record.region.clone(),
                    notice_version: record.notice_version.clone(),
                    signal: choice.signal.clone(),
                    cmp: record.cmp,
                    derived_from: choice.derived_from.clone(),
                    conflict: choice.conflict.clone(),
                    collected_at_micros: collected_at,
                    recorded_at_micros: now,
                    expires_at_micros: choice
                        .lifetime_micros
                        .map(|life| collected_at.saturating_add(life)),
                    effective: known.is_none_or(|known| known.collected_at <= collected_at),
                };
                for copy_for in &copies {
                    let known = current_row(&txn, copy_for, &choice.purpose).await?;
                    let mut copy = Entry {
                        profile_id: copy_for.clone(),
                        derived_from: format!(
                            "{} (the choice of {subject}, which {copy_for} was merged into)",
                            entry.derived_from
                        ),
                        effective: known.is_none_or(|known| known.collected_at <= collected_at),
                        ..entry.clone()
                    };
                    copy.cursor = append(&txn, &copy).await?;
                    written.push(copy);
                }
                let mut entry = entry;
                entry.cursor = append(&txn, &entry).await?;
                written.push(entry);
            }
            Ok::<_, ConsentError>(written)
        }
        .await;
        let written = settle(txn, result).await?;
        self.appended(&written);
        Ok(written)
    }

    /// Wakes watchers for entries just committed.
    fn appended(&self, written: &[Entry]) {
        if let Some(last) = written.iter().map(|e| e.cursor).max() {
            self.latest.send_replace(last);
        }
    }

    /// The current state of each person's purposes. With `purposes` empty,
    /// every purpose that has a choice; otherwise exactly those purposes,
    /// UNSET where there is no choice. Answers in `profile_ids` order.
    pub async fn current(
        &self,
        profile_ids: &[String],
        purposes: &[String],
    ) -> Result<Vec<(String, Vec<PurposeState>)>, ConsentError> {
        let now = Utc::now().timestamp_micros();
        let mut query = current::Entity::find()
            .filter(current::Column::ProfileId.is_in(profile_ids.iter().cloned()));
        if !purposes.is_empty() {
            query = query.filter(current::Column::Purpose.is_in(purposes.iter().cloned()));
        }
        let mut by_person: HashMap<String, Vec<PurposeState>> = HashMap::new();
        for row in query.all(&self.db).await? {
            let state = state_at(&row, now)?;
            by_person
                .entry(row.profile_id)
                .or_default()
                .push(PurposeState {
                    purpose: row.purpose,
                    state,
                    cursor: cursor_of(row.seq)?,
                    expires_at_micros: row.expires_at,
                });
        }
        Ok(profile_ids
            .iter()
            .map(|id| {
                let mut known = by_person.get(id).cloned().unwrap_or_default();
                for purpose in purposes {
                    if !known.iter().any(|s| &s.purpose == purpose) {
                        known.push(PurposeState {
                            purpose: purpose.clone(),
                            state: State::Unset,
                            cursor: 0,
                            expires_at_micros: None,
                        });
                    }
                }
                known.sort_by(|a, b| a.purpose.cmp(&b.purpose));
                (id.clone(), known)
            })
            .collect())
    }

    /// One person's ledger (the proof of their choices), oldest first:
    /// up to `limit` entries after `cursor`.
    pub async fn history(
        &self,
        profile_id: &str,
        cursor: u64,
        limit: u64,
    ) -> Result<Vec<Entry>, ConsentError> {
        let after = i64::try_from(cursor).unwrap_or(i64::MAX);
        entry::Entity::find()
            .filter(entry::Column::ProfileId.eq(profile_id))
            .filter(entry::Column::Seq.gt(after))
            .order_by_asc(entry::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(entry_from_row)
            .collect()
    }

    /// Erasure (GDPR Art. 17): deletes every entry, current state and merge
    /// record of these profile ids, the only deletion the ledger allows.
    /// Returns the entries deleted.
    pub async fn erase(&self, profile_ids: &[String]) -> Result<u64, ConsentError> {
        if profile_ids.is_empty() {
            return Ok(0);
        }
        let _writer = self.writer.lock().await;
        let txn = self.db.begin().await?;
        let result = async {
            lock_appends(&txn).await?;
            let ids = || profile_ids.iter().cloned();
            let deleted = entry::Entity::delete_many()
                .filter(entry::Column::ProfileId.is_in(ids()))
                .exec(&txn)
                .await?
                .rows_affected;
            current::Entity::delete_many()
                .filter(current::Column::ProfileId.is_in(ids()))
                .exec(&txn)
                .await?;
            entities::merge::Entity::delete_many()
                .filter(merges_naming(profile_ids))
                .exec(&txn)
                .await?;
            Ok::<_, ConsentError>(deleted)
        }
        .await;
        let deleted = settle(txn, result).await?;
        Ok(deleted)
    }

    /// How many entries, current states and merge records name these
    /// profile ids (an erasure's completeness check).
    pub async fn rows_about(&self, profile_ids: &[String]) -> Result<u64, ConsentError> {
        if profile_ids.is_empty() {
            return Ok(0);
        }
        let ids = || profile_ids.iter().cloned();
        let entries = entry::Entity::find()
            .filter(entry::Column::ProfileId.is_in(ids()))
            .count(&self.db)
            .await?;
        let current = current::Entity::find()
            .filter(current::Column::ProfileId.is_in(ids()))
            .count(&self.db)
            .await?;
        let merges = entities::merge::Entity::find()
            .filter(merges_naming(profile_ids))
            .count(&self.db)
            .await?;
        Ok(entries + current + merges)
    }

    /// Up to `limit` entries after `cursor`, in ledger order.
    pub async fn entries_after(&self, cursor: u64, limit: u64) -> Result<Vec<Entry>, ConsentError> {
        let after = i64::try_from(cursor).unwrap_or(i64::MAX);
        entry::Entity::find()
            .filter(entry::Column::Seq.gt(after))
            .order_by_asc(entry::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(entry_from_row)
            .collect()
    }

    /// The cursor of the latest committed entry (0 for an empty ledger): a
    /// watcher that has seen it has seen everything recorded so far.
    pub async fn head(&self) -> Result<u64, ConsentError> {
        let latest: Option<Option<i64>> = entry::Entity::find()
            .select_only()
            .column_as(entry::Column::Seq.max(), "head")
            .into_tuple()
            .one(&self.db)
            .await?;
        cursor_of(latest.flatten().unwrap_or(0))
    }

    /// Changes whenever this process appends; watchers wait on it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

fn cursor_of(seq: i64) -> Result<u64, ConsentError> {
    u64::try_from(seq).map_err(|_| ConsentError::Corrupt(format!("negative ledger sequence {seq}")))
}

/// Merge records in which any of these profile ids took part.
fn merges_naming(profile_ids: &[String]) -> Condition {
    let ids = || profile_ids.iter().cloned();
    Condition::any()
        .add(entities::merge::Column::AbsorbedId.is_in(ids()))
        .add(entities::merge::Column::SurvivorId.is_in(ids()))
}

/// Takes the append lock on PostgreSQL: replicas append one at a time too.
/// The lock is taken before the sequence hands out a cursor and held until
/// commit, so cursors become visible in order and no watcher skips one.
async fn lock_appends(txn: &DatabaseTransaction) -> Result<(), ConsentError> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({APPEND_LOCK})"))
            .await?;
    }
    Ok(())
}

/// A current row's state at `now`: an expired choice counts as unset.
fn state_at(row: &current::Model, now: i64) -> Result<State, ConsentError> {
    if row.expires_at.is_some_and(|at| at <= now) {
        Ok(State::Unset)
    } else {
        row.state.parse()
    }
}

async fn current_row(
    txn: &DatabaseTransaction,
    profile_id: &str,
    purpose: &str,
) -> Result<Option<current::Model>, ConsentError> {
    Ok(
        current::Entity::find_by_id((profile_id.to_string(), purpose.to_string()))
            .one(txn)
            .await?,
    )
}

/// Writes `entry` and, when it is effective, makes it the current state.
/// Returns its cursor.
async fn append(txn: &DatabaseTransaction, entry: &Entry) -> Result<u64, ConsentError> {
    let row = entry::ActiveModel {
        seq: NotSet,
        profile_id: Set(entry.profile_id.clone()),
        purpose: Set(entry.purpose.clone()),
        state: Set(entry.state.as_str().to_string()),
        legal_basis: Set(entry.legal_basis.as_str().to_string()),
        source: Set(entry.source.as_str().to_string()),
        region: Set(entry.region.clone()),
        notice_version: Set(entry.notice_version.clone()),
        signal_kind: Set(entry.signal.as_ref().map(|s| s.kind.clone())),
        raw_signal: Set(entry.signal.as_ref().map(|s| s.raw.clone())),
        cmp_id: Set(entry.cmp.map(|(id, _)| i32::from(id))),
        cmp_version: Set(entry.cmp.map(|(_, version)| i32::from(version))),
        derived_from: Set(entry.derived_from.clone()),
        conflict: Set(entry.conflict.clone()),
        collected_at: Set(entry.collected_at_micros),
        recorded_at: Set(entry.recorded_at_micros),
        expires_at: Set(entry.expires_at_micros),
        effective: Set(entry.effective),
    };
    let seq = entry::Entity::insert(row).exec(txn).await?.last_insert_id;
    // An older choice arriving late (an import) is kept as evidence but does
    // not replace the newer one.
    if entry.effective {
        current::Entity::insert(current::ActiveModel {
            profile_id: Set(entry.profile_id.clone()),
            purpose: Set(entry.purpose.clone()),
            state: Set(entry.state.as_str().to_string()),
            seq: Set(seq),
            collected_at: Set(entry.collected_at_micros),
            expires_at: Set(entry.expires_at_micros),
        })
        .on_conflict(
            OnConflict::columns([current::Column::ProfileId, current::Column::Purpose])
                .update_columns([
                    current::Column::State,
                    current::Column::Seq,
                    current::Column::CollectedAt,
                    current::Column::ExpiresAt,
                ])
                .to_owned(),
        )
        .exec(txn)
        .await?;
    }
    cursor_of(seq)
}

/// Refuses a grant that a re-ask rule holds back: the person said no, and
/// not long enough ago.
fn refuse_if_held(
    known: &current::Model,
    choice: &RecordedChoice,
    now: i64,
) -> Result<(), ConsentError> {
    if choice.state != State::Granted || known.state != State::Denied.as_str() {
        return Ok(());
    }
    for hold in &choice.holds {
        let until = known.collected_at.saturating_add(hold.wait_micros);
        if now < until {
            return Err(ConsentError::ReaskTooSoon {
                purpose: choice.purpose.clone(),
                rule: hold.rule.clone(),
                until_micros: until,
            });
        }
    }
    Ok(())
}

fn entry_from_row(row: entry::Model) -> Result<Entry, ConsentError> {
    let cmp = match (row.cmp_id, row.cmp_version) {
        (Some(id), Some(version)) => Some((
            u16::try_from(id).map_err(|_| ConsentError::Corrupt(format!("cmp id {id}")))?,
            u16::try_from(version)
                .map_err(|_| ConsentError::Corrupt(format!("cmp version {version}")))?,
        )),
        _ => None,
    };
    Ok(Entry {
        cursor: cursor_of(row.seq)?,
        state: row.state.parse()?,
        legal_basis: row.legal_basis.parse()?,
        source: row.source.parse()?,
        signal: row
            .signal_kind
            .zip(row.raw_signal)
            .map(|(kind, raw)| SignalEvidence { kind, raw }),
        cmp,
        profile_id: row.profile_id,
        purpose: row.purpose,
        region: row.region,
        notice_version: row.notice_version,
        derived_from: row.derived_from,
        conflict: row.conflict,
        collected_at_micros: row.collected_at,
        recorded_at_micros: row.recorded_at,
        expires_at_micros: row.expires_at,
        effective: row.effective,
    })
}

#[cfg(test)]
mod tests;
