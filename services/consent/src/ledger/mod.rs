//! The consent ledger. Every choice is a new entry; nothing is updated or
//! deleted in place. A `consent_current` row per (person, purpose) points at
//! the latest entry so reads for many people stay index seeks, and it is
//! written in the same transaction as the entry it points at.

mod entities;
mod migration;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
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
string_enum!(Source {
    Cmp => "cmp",
    Form => "form",
    Api => "api",
    Gpc => "gpc",
    Import => "import",
    PrivacyRequest => "privacy_request",
});

/// One ledger entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub cursor: u64,
    pub profile_id: String,
    pub purpose: String,
    pub choice: Choice,
    pub source: Source,
    pub region: String,
    pub notice_version: String,
    pub collected_at_micros: i64,
    pub recorded_at_micros: i64,
    /// Whether this entry became the person's current state for the purpose
    /// when it was appended; a late import of an older choice does not.
    pub effective: bool,
}

/// A request to record choices for one person, validated.
#[derive(Debug, Clone)]
pub struct Record {
    pub profile_id: String,
    pub choices: Vec<(String, Choice)>,
    pub source: Source,
    pub region: String,
    pub notice_version: String,
    /// When the person chose; `None` means now.
    pub collected_at_micros: Option<i64>,
}

/// A purpose's current state and the entry behind it (0 when unset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurposeState {
    pub purpose: String,
    pub state: State,
    pub cursor: u64,
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

    /// Appends one entry per choice, atomically, and wakes watchers.
    pub async fn record(&self, record: Record) -> Result<Vec<Entry>, ConsentError> {
        let _writer = self.writer.lock().await;
        let now = Utc::now().timestamp_micros();
        let txn = self.db.begin().await?;
        if txn.get_database_backend() == DbBackend::Postgres {
            // Replicas append one at a time too: the lock is taken before the
            // sequence hands out a cursor and held until commit, so cursors
            // become visible in order and no watcher skips one.
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({APPEND_LOCK})"))
                .await?;
        }
        let mut written = Vec::with_capacity(record.choices.len());
        for (purpose, choice) in &record.choices {
            let collected_at = record.collected_at_micros.unwrap_or(now);
            let newer_known =
                current::Entity::find_by_id((record.profile_id.clone(), purpose.clone()))
                    .one(&txn)
                    .await?
                    .is_some_and(|known| known.collected_at > collected_at);
            let row = entry::ActiveModel {
                seq: sea_orm::NotSet,
                profile_id: sea_orm::Set(record.profile_id.clone()),
                purpose: sea_orm::Set(purpose.clone()),
                state: sea_orm::Set(choice.as_str().to_string()),
                source: sea_orm::Set(record.source.as_str().to_string()),
                region: sea_orm::Set(record.region.clone()),
                notice_version: sea_orm::Set(record.notice_version.clone()),
                collected_at: sea_orm::Set(collected_at),
                recorded_at: sea_orm::Set(now),
                effective: sea_orm::Set(!newer_known),
            };
            let seq = entry::Entity::insert(row).exec(&txn).await?.last_insert_id;
            // An older choice arriving late (an import) is kept as evidence
            // but does not replace the newer one.
            if !newer_known {
                current::Entity::insert(current::ActiveModel {
                    profile_id: sea_orm::Set(record.profile_id.clone()),
                    purpose: sea_orm::Set(purpose.clone()),
                    state: sea_orm::Set(choice.as_str().to_string()),
                    seq: sea_orm::Set(seq),
                    collected_at: sea_orm::Set(collected_at),
                })
                .on_conflict(
                    OnConflict::columns([current::Column::ProfileId, current::Column::Purpose])
                        .update_columns([
                            current::Column::State,
                            current::Column::Seq,
                            current::Column::CollectedAt,
                        ])
                        .to_owned(),
                )
                .exec(&txn)
                .await?;
            }
            written.push(Entry {
                cursor: cursor_of(seq)?,
                profile_id: record.profile_id.clone(),
                purpose: purpose.clone(),
                choice: *choice,
                source: record.source,
                region: record.region.clone(),
                notice_version: record.notice_version.clone(),
                collected_at_micros: collected_at,
                recorded_at_micros: now,
                effective: !newer_known,
            });
        }
        txn.commit().await?;
        if let Some(last) = written.last() {
            self.latest.send_replace(last.cursor);
        }
        Ok(written)
    }

    /// The current state of each person's purposes. With `purposes` empty,
    /// every purpose that has a choice; otherwise exactly those purposes,
    /// UNSET where there is no choice. Answers in `profile_ids` order.
    pub async fn current(
        &self,
        profile_ids: &[String],
        purposes: &[String],
    ) -> Result<Vec<(String, Vec<PurposeState>)>, ConsentError> {
        let mut query = current::Entity::find()
            .filter(current::Column::ProfileId.is_in(profile_ids.iter().cloned()));
        if !purposes.is_empty() {
            query = query.filter(current::Column::Purpose.is_in(purposes.iter().cloned()));
        }
        let mut by_person: HashMap<String, Vec<PurposeState>> = HashMap::new();
        for row in query.all(&self.db).await? {
            let choice: Choice = row.state.parse()?;
            by_person
                .entry(row.profile_id)
                .or_default()
                .push(PurposeState {
                    purpose: row.purpose,
                    state: choice.into(),
                    cursor: cursor_of(row.seq)?,
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
                        });
                    }
                }
                known.sort_by(|a, b| a.purpose.cmp(&b.purpose));
                (id.clone(), known)
            })
            .collect())
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

fn entry_from_row(row: entry::Model) -> Result<Entry, ConsentError> {
    Ok(Entry {
        cursor: cursor_of(row.seq)?,
        choice: row.state.parse()?,
        source: row.source.parse()?,
        profile_id: row.profile_id,
        purpose: row.purpose,
        region: row.region,
        notice_version: row.notice_version,
        collected_at_micros: row.collected_at,
        recorded_at_micros: row.recorded_at,
        effective: row.effective,
    })
}

#[cfg(test)]
mod tests;
