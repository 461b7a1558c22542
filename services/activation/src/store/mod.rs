//! Persistence of destinations, activations, sync state and sync runs.

mod baseline;
mod entities;
mod migration;
mod plan;

use madtech_common::db::settle;
use madtech_common::error::json_error;
use std::collections::HashMap;

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait,
};

pub use baseline::Baseline;
pub use migration::Migrator;
pub use plan::{PlanCounts, StagedChange};

use crate::destination::{HashedIdentifier, Member, Op, Target};
use crate::error::ActivationError;
use entities::{
    activation, destination, followed_cursor, owed_removal, sync_batch, sync_run, sync_state,
};

#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub id: String,
    pub name: String,
    pub target: Target,
    pub created_at_micros: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub id: String,
    pub segment_id: String,
    pub destination_id: String,
    pub purpose: String,
    pub created_at_micros: i64,
    /// How often it syncs on its own; `None`: only on demand.
    pub sync_every: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Fetching,
    Sending,
    Succeeded,
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Fetching => "fetching",
            Phase::Sending => "sending",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<Self, ActivationError> {
        Ok(match text {
            "fetching" => Phase::Fetching,
            "sending" => Phase::Sending,
            "succeeded" => Phase::Succeeded,
            "failed" => Phase::Failed,
            other => return Err(ActivationError::Corrupt(format!("run phase {other:?}"))),
        })
    }
}

/// Why a run happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A sync of the audience asked for with RunSync.
    Sync,
    /// A sync of the audience on the activation's schedule.
    Scheduled,
    /// Removals because consent for the activation's purpose was withdrawn.
    ConsentWithdrawal,
    /// Removals for an erasure request.
    Erasure,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Sync => "sync",
            Trigger::Scheduled => "scheduled",
            Trigger::ConsentWithdrawal => "consent_withdrawal",
            Trigger::Erasure => "erasure",
        }
    }

    fn parse(text: &str) -> Result<Self, ActivationError> {
        Ok(match text {
            "sync" => Trigger::Sync,
            "scheduled" => Trigger::Scheduled,
            "consent_withdrawal" => Trigger::ConsentWithdrawal,
            "erasure" => Trigger::Erasure,
            other => return Err(ActivationError::Corrupt(format!("run trigger {other:?}"))),
        })
    }
}

/// A sync run's progress and outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncRun {
    pub id: String,
    pub activation_id: String,
    pub trigger: Trigger,
    pub phase: Phase,
    pub members_received: u64,
    pub added: u64,
    pub removed: u64,
    pub unchanged: u64,
    pub output: String,
    /// Why the run failed; never contains personal data.
    pub error: String,
    pub started_at_micros: i64,
    pub finished_at_micros: Option<i64>,
    /// Adds and removes to deliver, once known.
    pub to_send: u64,
    pub batches_sent: u64,
    pub batches_rejected: u64,
    pub retries: u64,
    /// The gateway's policy version the audience was released under.
    pub policy_version: String,
    /// The whole audience compared (true), or only its changes since the
    /// last sync.
    pub full: bool,
}

impl SyncRun {
    pub fn start(activation_id: &str, trigger: Trigger) -> Self {
        SyncRun {
            id: uuid::Uuid::now_v7().to_string(),
            activation_id: activation_id.to_string(),
            trigger,
            phase: Phase::Fetching,
            members_received: 0,
            added: 0,
            removed: 0,
            unchanged: 0,
            output: String::new(),
            error: String::new(),
            started_at_micros: Utc::now().timestamp_micros(),
            finished_at_micros: None,
            to_send: 0,
            batches_sent: 0,
            batches_rejected: 0,
            retries: 0,
            policy_version: String::new(),
            full: true,
        }
    }

    fn from_row(row: sync_run::Model) -> Result<Self, ActivationError> {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(SyncRun {
            phase: Phase::parse(&row.phase)?,
            trigger: Trigger::parse(&row.trigger)?,
            id: row.id,
            activation_id: row.activation_id,
            members_received: count(row.members_received),
            added: count(row.added),
            removed: count(row.removed),
            unchanged: count(row.unchanged),
            output: row.output,
            error: row.error,
            started_at_micros: row.started_at,
            finished_at_micros: row.finished_at,
            to_send: count(row.to_send),
            batches_sent: count(row.batches_sent),
            batches_rejected: count(row.batches_rejected),
            retries: count(row.retries),
            policy_version: row.policy_version,
            full: row.full,
        })
    }
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub run_id: String,
    pub activation_id: String,
    pub op: Op,
    pub seq: u32,
    pub members: u64,
    /// `sent`, `refused` or `failed`.
    pub outcome: &'static str,
    pub http_status: Option<u16>,
    /// SHA-256 over the batch's pseudonymous ids and hashes, in order.
    pub digest: String,
    pub error: String,
}

/// A member held by an activation, found by one of its identifier hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub activation_id: String,
    pub member: Member,
    pub synced_at_micros: i64,
    pub confirmed: bool,
}

/// One member a destination holds (or may hold) for an activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldMember {
    pub identifiers: Vec<HashedIdentifier>,
    /// False while an add is being delivered: the destination may or may not
    /// have it, so the next sync sends it again or removes it, never forgets it.
    pub confirmed: bool,
}

/// What a destination holds for an activation, by pseudonymous id.
pub type Held = HashMap<String, HeldMember>;

/// Removals owed to one activation's destination (see `follow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedRemovals {
    pub activation_id: String,
    pub pseudonymous_ids: Vec<String>,
    /// The most failed attempts any of them has had.
    pub attempts: i64,
}

pub struct ActivationStore {
    db: DatabaseConnection,
}

fn now() -> i64 {
    Utc::now().timestamp_micros()
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl ActivationStore {
    pub fn new(db: DatabaseConnection) -> Self {
        ActivationStore { db }
    }

    pub async fn create_destination(
        &self,
        name: String,
        target: Target,
    ) -> Result<Destination, ActivationError> {
        let destination = Destination {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            target,
            created_at_micros: now(),
        };
        let target = serde_json::to_string(&destination.target)
            .map_err(|err| ActivationError::Corrupt(format!("target: {err}")))?;
        let row = destination::ActiveModel {
            id: Set(destination.id.clone()),
            name: Set(destination.name.clone()),
            target: Set(target),
            created_at: Set(destination.created_at_micros),
        };
        match destination::Entity::insert(row).exec(&self.db).await {
            Ok(_) => Ok(destination),
            Err(err) if madtech_common::db::is_unique_violation(&err) => {
                Err(ActivationError::NameTaken(destination.name))
            }
            Err(err) => Err(err.into()),
        }
    }

    pub async fn destination(&self, id: &str) -> Result<Destination, ActivationError> {
        let row = destination::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?
            .ok_or(ActivationError::NotFound("destination"))?;
        Ok(Destination {
            target: serde_json::from_str(&row.target)
                .map_err(|err| ActivationError::Corrupt(format!("target of {}: {err}", row.id)))?,
            id: row.id,
            name: row.name,
            created_at_micros: row.created_at,
        })
    }

    pub async fn create_activation(
        &self,
        segment_id: String,
        destination_id: String,
        purpose: String,
        sync_every: Option<std::time::Duration>,
    ) -> Result<Activation, ActivationError> {
        self.destination(&destination_id).await?;
        let activation = Activation {
            id: uuid::Uuid::now_v7().to_string(),
            segment_id,
            destination_id,
            purpose,
            created_at_micros: now(),
            sync_every,
        };
        activation::Entity::insert(activation::ActiveModel {
            id: Set(activation.id.clone()),
            segment_id: Set(activation.segment_id.clone()),
            destination_id: Set(activation.destination_id.clone()),
            purpose: Set(activation.purpose.clone()),
            created_at: Set(activation.created_at_micros),
            sync_every_secs: Set(sync_every.map(|every| count(every.as_secs()))),
        })
        .exec(&self.db)
        .await?;
        Ok(activation)
    }

    /// Activations on a schedule.
    pub async fn scheduled_activations(&self) -> Result<Vec<Activation>, ActivationError> {
        Ok(activation::Entity::find()
            .filter(activation::Column::SyncEverySecs.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(activation_from)
            .collect())
    }

    /// When the activation's last sync (on demand or scheduled) started.
    pub async fn last_sync_started(
        &self,
        activation_id: &str,
    ) -> Result<Option<i64>, ActivationError> {
        use sea_orm::{QueryOrder, QuerySelect};
        Ok(sync_run::Entity::find()
            .filter(sync_run::Column::ActivationId.eq(activation_id))
            .filter(
                sync_run::Column::Trigger
                    .is_in([Trigger::Sync.as_str(), Trigger::Scheduled.as_str()]),
            )
            .order_by_desc(sync_run::Column::StartedAt)
            .limit(1)
            .one(&self.db)
            .await?
            .map(|row| row.started_at))
    }

    pub async fn activation(&self, id: &str) -> Result<Activation, ActivationError> {
        let row = activation::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?
            .ok_or(ActivationError::NotFound("activation"))?;
        Ok(activation_from(row))
    }

    /// Which of `ids` the destination holds, or may hold, for
    /// `activation_id`.
    pub async fn held(&self, activation_id: &str, ids: &[String]) -> Result<Held, ActivationError> {
        let mut held = Held::new();
        for chunk in ids.chunks(500) {
            let rows = sync_state::Entity::find()
                .filter(sync_state::Column::ActivationId.eq(activation_id))
                .filter(sync_state::Column::PseudonymousId.is_in(chunk.iter().cloned()))
                .all(&self.db)
                .await?;
            for row in rows {
                let member = HeldMember {
                    identifiers: identifiers_from(&row.identifiers)?,
                    confirmed: row.confirmed,
                };
                held.insert(row.pseudonymous_id, member);
            }
        }
        Ok(held)
    }

    /// Runs of an activation that never finished: the process running them
    /// stopped (a run in progress holds the activation's lock, so callers
    /// holding it see only dead runs).
    pub async fn unfinished_runs(
        &self,
        activation_id: &str,
    ) -> Result<Vec<SyncRun>, ActivationError> {
        sync_run::Entity::find()
            .filter(sync_run::Column::ActivationId.eq(activation_id))
            .filter(sync_run::Column::FinishedAt.is_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(SyncRun::from_row)
            .collect()
    }

    /// Activations with a run that never finished.
    pub async fn interrupted_activations(&self) -> Result<Vec<String>, ActivationError> {
        let mut ids: Vec<String> = sync_run::Entity::find()
            .filter(sync_run::Column::FinishedAt.is_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| row.activation_id)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Every member held anywhere whose identifiers include one of these
    /// hashes. A scan of the stored identifiers; data-subject requests are
    /// rare.
    pub async fn holders_of(
        &self,
        identifier_sha256s: &[String],
    ) -> Result<Vec<Holding>, ActivationError> {
        let mut found = std::collections::BTreeMap::new();
        for hash in identifier_sha256s {
            let rows = sync_state::Entity::find()
                .filter(sync_state::Column::Identifiers.contains(format!("\"{hash}\"")))
                .all(&self.db)
                .await?;
            for row in rows {
                found.insert(
                    (row.activation_id.clone(), row.pseudonymous_id.clone()),
                    row,
                );
            }
        }
        found
            .into_values()
            .map(|row| {
                Ok(Holding {
                    member: Member {
                        identifiers: identifiers_from(&row.identifiers)?,
                        id: row.pseudonymous_id,
                    },
                    activation_id: row.activation_id,
                    synced_at_micros: row.synced_at,
                    confirmed: row.confirmed,
                })
            })
            .collect()
    }

    /// Activations delivering to `destination_id` for `purpose`.
    pub async fn activations_on(
        &self,
        destination_id: &str,
        purpose: &str,
    ) -> Result<Vec<Activation>, ActivationError> {
        Ok(activation::Entity::find()
            .filter(activation::Column::DestinationId.eq(destination_id))
            .filter(activation::Column::Purpose.eq(purpose))
            .all(&self.db)
            .await?
            .into_iter()
            .map(activation_from)
            .collect())
    }

    /// Destinations some activation delivers to.
    pub async fn activated_destinations(&self) -> Result<Vec<String>, ActivationError> {
        let mut ids: Vec<String> = activation::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| row.destination_id)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Where `stream` was followed up to (0: from the start).
    pub async fn cursor(&self, stream: &str) -> Result<u64, ActivationError> {
        Ok(followed_cursor::Entity::find_by_id(stream.to_string())
            .one(&self.db)
            .await?
            .map_or(0, |row| u64::try_from(row.cursor).unwrap_or(0)))
    }

    /// Records removals from `activation_id` that did not go through, to
    /// be tried again from `now` (see `follow`). Owed again, a removal
    /// starts over: due at once, its attempts counted afresh.
    pub async fn owe_removals(
        &self,
        activation_id: &str,
        pseudonymous_ids: &[String],
        now: i64,
    ) -> Result<(), ActivationError> {
        for chunk in pseudonymous_ids.chunks(500) {
            owed_removal::Entity::insert_many(chunk.iter().map(|id| owed_removal::ActiveModel {
                activation_id: Set(activation_id.to_string()),
                pseudonymous_id: Set(id.clone()),
                owed_at: Set(now),
                attempts: Set(0),
                next_attempt_at: Set(now),
            }))
            .on_conflict(
                OnConflict::columns([
                    owed_removal::Column::ActivationId,
                    owed_removal::Column::PseudonymousId,
                ])
                .update_columns([
                    owed_removal::Column::OwedAt,
                    owed_removal::Column::Attempts,
                    owed_removal::Column::NextAttemptAt,
                ])
                .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        }
        Ok(())
    }

    /// The removals due by `now`, by activation, with the most attempts
    /// any of them has had; at most `limit` rows.
    pub async fn owed_removals(
        &self,
        now: i64,
        limit: u64,
    ) -> Result<Vec<OwedRemovals>, ActivationError> {
        use sea_orm::{QueryOrder, QuerySelect};
        let rows = owed_removal::Entity::find()
            .filter(owed_removal::Column::NextAttemptAt.lte(now))
            .order_by_asc(owed_removal::Column::ActivationId)
            .order_by_asc(owed_removal::Column::PseudonymousId)
            .limit(limit)
            .all(&self.db)
            .await?;
        let mut owed: Vec<OwedRemovals> = Vec::new();
        for row in rows {
            match owed.last_mut() {
                Some(last) if last.activation_id == row.activation_id => {
                    last.pseudonymous_ids.push(row.pseudonymous_id);
                    last.attempts = last.attempts.max(row.attempts);
                }
                _ => owed.push(OwedRemovals {
                    activation_id: row.activation_id,
                    pseudonymous_ids: vec![row.pseudonymous_id],
                    attempts: row.attempts,
                }),
            }
        }
        Ok(owed)
    }

    /// Forgets owed removals that were owed by `owed_by` (a removal owed
    /// again since is kept): delivered, or nobody held, or the activation
    /// gone.
    pub async fn settle_removals(
        &self,
        activation_id: &str,
        pseudonymous_ids: &[String],
        owed_by: i64,
    ) -> Result<(), ActivationError> {
        for chunk in pseudonymous_ids.chunks(500) {
            owed_removal::Entity::delete_many()
                .filter(owed_removal::Column::ActivationId.eq(activation_id))
                .filter(owed_removal::Column::PseudonymousId.is_in(chunk.iter().cloned()))
                .filter(owed_removal::Column::OwedAt.lte(owed_by))
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }

    /// Counts one more failed attempt at these owed removals, as owed by
    /// `owed_by` (one owed again since stays due at once), and puts the
    /// next off until `next_attempt_at`.
    pub async fn defer_removals(
        &self,
        activation_id: &str,
        pseudonymous_ids: &[String],
        owed_by: i64,
        next_attempt_at: i64,
    ) -> Result<(), ActivationError> {
        use sea_orm::sea_query::{Expr, ExprTrait};
        for chunk in pseudonymous_ids.chunks(500) {
            owed_removal::Entity::update_many()
                .col_expr(
                    owed_removal::Column::Attempts,
                    Expr::col(owed_removal::Column::Attempts).add(1),
                )
                .col_expr(
                    owed_removal::Column::NextAttemptAt,
                    Expr::value(next_attempt_at),
                )
                .filter(owed_removal::Column::ActivationId.eq(activation_id))
                .filter(owed_removal::Column::PseudonymousId.is_in(chunk.iter().cloned()))
                .filter(owed_removal::Column::OwedAt.lte(owed_by))
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }

    pub async fn save_cursor(&self, stream: &str, cursor: u64) -> Result<(), ActivationError> {
        followed_cursor::Entity::insert(followed_cursor::ActiveModel {
            stream: Set(stream.to_string()),
            cursor: Set(count(cursor)),
        })
        .on_conflict(
            OnConflict::column(followed_cursor::Column::Stream)
                .update_column(followed_cursor::Column::Cursor)
                .to_owned(),
        )
        .exec(&self.db)
        .await?;
        Ok(())
    }

    pub async fn record_batch(&self, batch: &BatchRecord) -> Result<(), ActivationError> {
        insert_batch(&self.db, batch).await
    }

    /// The batches of a run, in the order they were sent.
    pub async fn batches(&self, run_id: &str) -> Result<Vec<BatchRecord>, ActivationError> {
        use sea_orm::QueryOrder;
        sync_batch::Entity::find()
            .filter(sync_batch::Column::RunId.eq(run_id))
            .order_by_asc(sync_batch::Column::At)
            .order_by_asc(sync_batch::Column::Seq)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| {
                Ok(BatchRecord {
                    op: match row.op.as_str() {
                        "add" => Op::Add,
                        "remove" => Op::Remove,
                        other => {
                            return Err(ActivationError::Corrupt(format!("batch op {other:?}")));
                        }
                    },
                    outcome: match row.outcome.as_str() {
                        "sent" => "sent",
                        "refused" => "refused",
                        _ => "failed",
                    },
                    run_id: row.run_id,
                    activation_id: row.activation_id,
                    seq: u32::try_from(row.seq).unwrap_or(0),
                    members: u64::try_from(row.members).unwrap_or(0),
                    http_status: row.http_status.and_then(|s| u16::try_from(s).ok()),
                    digest: row.digest,
                    error: row.error,
                })
            })
            .collect()
    }

    pub async fn run(&self, run_id: &str) -> Result<SyncRun, ActivationError> {
        let row = sync_run::Entity::find_by_id(run_id.to_string())
            .one(&self.db)
            .await?
            .ok_or(ActivationError::NotFound("sync run"))?;
        SyncRun::from_row(row)
    }

    /// An activation's runs, newest first, at most `limit`.
    pub async fn runs(
        &self,
        activation_id: &str,
        limit: u64,
    ) -> Result<Vec<SyncRun>, ActivationError> {
        use sea_orm::{QueryOrder, QuerySelect};
        sync_run::Entity::find()
            .filter(sync_run::Column::ActivationId.eq(activation_id))
            .order_by_desc(sync_run::Column::StartedAt)
            .order_by_desc(sync_run::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(SyncRun::from_row)
            .collect()
    }

    /// Records adds as pending before they are delivered, so a crash while
    /// delivering cannot leave a member at the destination that no later sync
    /// knows to remove.
    pub async fn prepare(
        &self,
        activation_id: &str,
        added: &[Member],
    ) -> Result<(), ActivationError> {
        let txn = self.db.begin().await?;
        let result = async {
            upsert_members(&txn, activation_id, added, false).await?;
            Ok::<_, ActivationError>(())
        }
        .await;
        settle(txn, result).await
    }

    /// Records what the destination acknowledged, in one transaction with
    /// the batch's record when there is one: adds become confirmed, removes
    /// are forgotten. Call only after the destination has the changes.
    pub async fn acknowledge(
        &self,
        activation_id: &str,
        added: &[Member],
        removed: &[Member],
        batch: Option<&BatchRecord>,
    ) -> Result<(), ActivationError> {
        let txn = self.db.begin().await?;
        let result = async {
            if let Some(batch) = batch {
                insert_batch(&txn, batch).await?;
            }
            for chunk in removed.chunks(500) {
                sync_state::Entity::delete_many()
                    .filter(sync_state::Column::ActivationId.eq(activation_id))
                    .filter(
                        sync_state::Column::PseudonymousId
                            .is_in(chunk.iter().map(|member| member.id.clone())),
                    )
                    .exec(&txn)
                    .await?;
            }
            upsert_members(&txn, activation_id, added, true).await?;
            Ok::<_, ActivationError>(())
        }
        .await;
        settle(txn, result).await
    }

    /// Inserts or replaces a sync run's row.
    pub async fn save_run(&self, run: &SyncRun) -> Result<(), ActivationError> {
        let row = sync_run::ActiveModel {
            id: Set(run.id.clone()),
            activation_id: Set(run.activation_id.clone()),
            phase: Set(run.phase.as_str().to_string()),
            members_received: Set(count(run.members_received)),
            added: Set(count(run.added)),
            removed: Set(count(run.removed)),
            unchanged: Set(count(run.unchanged)),
            output: Set(run.output.clone()),
            error: Set(run.error.clone()),
            started_at: Set(run.started_at_micros),
            finished_at: Set(run.finished_at_micros),
            trigger: Set(run.trigger.as_str().to_string()),
            to_send: Set(count(run.to_send)),
            batches_sent: Set(count(run.batches_sent)),
            batches_rejected: Set(count(run.batches_rejected)),
            retries: Set(count(run.retries)),
            policy_version: Set(run.policy_version.clone()),
            full: Set(run.full),
        };
        sync_run::Entity::insert(row)
            .on_conflict(
                OnConflict::column(sync_run::Column::Id)
                    .update_columns([
                        sync_run::Column::Phase,
                        sync_run::Column::MembersReceived,
                        sync_run::Column::Added,
                        sync_run::Column::Removed,
                        sync_run::Column::Unchanged,
                        sync_run::Column::Output,
                        sync_run::Column::Error,
                        sync_run::Column::FinishedAt,
                        sync_run::Column::ToSend,
                        sync_run::Column::BatchesSent,
                        sync_run::Column::BatchesRejected,
                        sync_run::Column::Retries,
                        sync_run::Column::PolicyVersion,
                        sync_run::Column::Full,
                    ])
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

fn activation_from(row: activation::Model) -> Activation {
    Activation {
        id: row.id,
        segment_id: row.segment_id,
        destination_id: row.destination_id,
        purpose: row.purpose,
        created_at_micros: row.created_at,
        sync_every: row
            .sync_every_secs
            .and_then(|secs| u64::try_from(secs).ok())
            .map(std::time::Duration::from_secs),
    }
}

fn identifiers_from(json: &str) -> Result<Vec<HashedIdentifier>, ActivationError> {
    serde_json::from_str(json).map_err(|err| {
        ActivationError::Corrupt(format!("sync state identifiers: {}", json_error(&err)))
    })
}

/// Records a batch's outcome (again, for a batch sent again).
async fn insert_batch<C: sea_orm::ConnectionTrait>(
    db: &C,
    batch: &BatchRecord,
) -> Result<(), ActivationError> {
    let row = sync_batch::ActiveModel {
        run_id: Set(batch.run_id.clone()),
        op: Set(batch.op.as_str().to_string()),
        seq: Set(i64::from(batch.seq)),
        activation_id: Set(batch.activation_id.clone()),
        members: Set(count(batch.members)),
        outcome: Set(batch.outcome.to_string()),
        http_status: Set(batch.http_status.map(i64::from)),
        digest: Set(batch.digest.clone()),
        error: Set(batch.error.clone()),
        at: Set(now()),
    };
    sync_batch::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                sync_batch::Column::RunId,
                sync_batch::Column::Op,
                sync_batch::Column::Seq,
            ])
            .update_columns([
                sync_batch::Column::Members,
                sync_batch::Column::Digest,
                sync_batch::Column::Outcome,
                sync_batch::Column::HttpStatus,
                sync_batch::Column::Error,
                sync_batch::Column::At,
            ])
            .to_owned(),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// Writes members into the sync state, pending or confirmed.
async fn upsert_members<C: sea_orm::ConnectionTrait>(
    db: &C,
    activation_id: &str,
    members: &[Member],
    confirmed: bool,
) -> Result<(), ActivationError> {
    let synced_at = now();
    for chunk in members.chunks(500) {
        let rows = chunk
            .iter()
            .map(|member| {
                let identifiers = serde_json::to_string(&member.identifiers)
                    .map_err(|err| ActivationError::Corrupt(format!("identifiers: {err}")))?;
                Ok(sync_state::ActiveModel {
                    activation_id: Set(activation_id.to_string()),
                    pseudonymous_id: Set(member.id.clone()),
                    identifiers: Set(identifiers),
                    synced_at: Set(synced_at),
                    confirmed: Set(confirmed),
                })
            })
            .collect::<Result<Vec<_>, ActivationError>>()?;
        sync_state::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([
                    sync_state::Column::ActivationId,
                    sync_state::Column::PseudonymousId,
                ])
                .update_columns([
                    sync_state::Column::Identifiers,
                    sync_state::Column::SyncedAt,
                    sync_state::Column::Confirmed,
                ])
                .to_owned(),
            )
            .exec(db)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use madtech_common::db::connect_and_migrate;
    use madtech_common::testing::TestDatabase;

    fn hashed(sha: &str) -> Vec<HashedIdentifier> {
        vec![HashedIdentifier {
            kind: "email".into(),
            sha256: sha.into(),
        }]
    }

    fn member(id: &str, sha: &str) -> Member {
        Member {
            id: id.into(),
            identifiers: hashed(sha),
        }
    }

    /// A store on `db` with one activation to a file destination.
    async fn store_with_activation(db: &TestDatabase) -> (ActivationStore, Activation) {
        let store = ActivationStore::new(
            connect_and_migrate::<Migrator>(&db.config)
                .await
                .expect("connect"),
        );
        let target = Target::File {
            directory: "out".into(),
            format: Default::default(),
        };
        let destination = store
            .create_destination("files".into(), target)
            .await
            .expect("destination");
        let activation = store
            .create_activation("s".into(), destination.id, "ad_targeting".into(), None)
            .await
            .expect("activation");
        (store, activation)
    }

    madtech_common::backend_tests!(
        sync_state_follows_acknowledgements,
        |db: TestDatabase| async move {
            let store = ActivationStore::new(
                connect_and_migrate::<Migrator>(&db.config)
                    .await
                    .expect("connect"),
            );
            let destination = store
                .create_destination(
                    "files".into(),
                    Target::File {
                        directory: "out".into(),
                        format: Default::default(),
                    },
                )
                .await
                .expect("destination");
            assert!(matches!(
                store
                    .create_destination(
                        "files".into(),
                        Target::File {
                            directory: "x".into(),
                            format: Default::default(),
                        }
                    )
                    .await,
                Err(ActivationError::NameTaken(_))
            ));
            assert!(matches!(
                store
                    .create_activation("s".into(), "missing".into(), "ad_targeting".into(), None)
                    .await,
                Err(ActivationError::NotFound("destination"))
            ));
            let activation = store
                .create_activation(
                    "s".into(),
                    destination.id.clone(),
                    "ad_targeting".into(),
                    None,
                )
                .await
                .expect("activation");
            assert_eq!(
                store.activation(&activation.id).await.expect("get"),
                activation
            );

            store
                .acknowledge(
                    &activation.id,
                    &[member("a", "1"), member("b", "2")],
                    &[],
                    None,
                )
                .await
                .expect("first");
            store
                .acknowledge(
                    &activation.id,
                    &[member("b", "3")],
                    &[member("a", "1")],
                    None,
                )
                .await
                .expect("second");
            let held = store
                .held(&activation.id, &["a".into(), "b".into(), "c".into()])
                .await
                .expect("held");
            assert_eq!(held.len(), 1);
            assert_eq!(held["b"].identifiers, hashed("3"));
            assert!(held["b"].confirmed);
            store
                .prepare(&activation.id, &[member("c", "4")])
                .await
                .expect("prepare");
            let held = store
                .held(&activation.id, &["a".into(), "b".into(), "c".into()])
                .await
                .expect("held");
            assert!(!held["c"].confirmed, "pending until acknowledged");

            let holders = store
                .holders_of(&["4".into(), "3".into(), "nobody".into()])
                .await
                .expect("holders");
            let found: Vec<(&str, bool)> = holders
                .iter()
                .map(|h| (h.member.id.as_str(), h.confirmed))
                .collect();
            assert_eq!(found, vec![("b", true), ("c", false)]);
            assert_eq!(
                store
                    .held(&activation.id, &["c".into(), "zz".into()])
                    .await
                    .expect("held")
                    .keys()
                    .collect::<Vec<_>>(),
                vec!["c"]
            );
            assert_eq!(
                store
                    .activations_on(&destination.id, "ad_targeting")
                    .await
                    .expect("on"),
                vec![activation.clone()]
            );
            assert!(
                store
                    .activations_on(&destination.id, "analytics")
                    .await
                    .expect("on")
                    .is_empty()
            );
            assert_eq!(
                store.activated_destinations().await.expect("destinations"),
                vec![destination.id.clone()]
            );

            let mut run = SyncRun::start(&activation.id, Trigger::Sync);
            store.save_run(&run).await.expect("insert run");
            run.phase = Phase::Succeeded;
            run.added = 2;
            run.batches_sent = 1;
            run.retries = 3;
            store.save_run(&run).await.expect("update run");
            assert_eq!(store.run(&run.id).await.expect("run"), run);
            let record = BatchRecord {
                run_id: run.id.clone(),
                activation_id: activation.id.clone(),
                op: Op::Add,
                seq: 1,
                members: 2,
                outcome: "sent",
                http_status: Some(200),
                digest: "d".into(),
                error: String::new(),
            };
            store.record_batch(&record).await.expect("batch");
            store
                .record_batch(&record)
                .await
                .expect("the same batch again");
            assert_eq!(store.batches(&run.id).await.expect("batches"), vec![record]);
            let erasure = SyncRun::start(&activation.id, Trigger::Erasure);
            store.save_run(&erasure).await.expect("erasure run");
            let runs = store.runs(&activation.id, 10).await.expect("runs");
            assert_eq!(runs.len(), 2);
            assert_eq!(runs[0].trigger, Trigger::Erasure, "newest first");

            assert_eq!(store.cursor("consent").await.expect("cursor"), 0);
            store.save_cursor("consent", 41).await.expect("save");
            store.save_cursor("consent", 42).await.expect("save");
            assert_eq!(store.cursor("consent").await.expect("cursor"), 42);
        }
    );

    madtech_common::backend_tests!(
        plans_send_only_changes_in_numbered_batches,
        |db: TestDatabase| async move {
            let (store, activation) = store_with_activation(&db).await;
            let id = activation.id.as_str();
            // Held: a and b confirmed, c changed since, e pending.
            store
                .acknowledge(
                    id,
                    &[member("a", "1"), member("b", "2"), member("c", "3")],
                    &[],
                    None,
                )
                .await
                .expect("held");
            store
                .prepare(id, &[member("e", "5")])
                .await
                .expect("pending");

            let run = SyncRun::start(id, Trigger::Sync);
            let audience = [
                member("a", "1"),
                member("c", "changed"),
                member("d", "4"),
                member("e", "5"),
                member("f", "6"),
                member("g", "7"),
            ];
            store
                .stage(&run.id, id, &audience[..3], None)
                .await
                .expect("first page");
            store
                .stage(&run.id, id, &audience[3..], None)
                .await
                .expect("second page");
            let plan = store.plan_sync(&run.id, id, 2).await.expect("plan");
            assert_eq!(
                (plan.adds, plan.removes, plan.unchanged),
                (5, 1, 1),
                "a is unchanged; c changed, e never confirmed, d f g new; b is gone"
            );
            assert_eq!((plan.batches(Op::Add), plan.batches(Op::Remove)), (3, 1));
            let batch = |op, seq| {
                let store = &store;
                let run_id = run.id.clone();
                async move {
                    store
                        .planned_batch(&run_id, op, seq)
                        .await
                        .expect("batch")
                        .into_iter()
                        .map(|m| m.id)
                        .collect::<Vec<_>>()
                }
            };
            assert_eq!(batch(Op::Add, 1).await, ["c", "d"]);
            assert_eq!(batch(Op::Add, 2).await, ["e", "f"]);
            assert_eq!(batch(Op::Add, 3).await, ["g"]);
            assert_eq!(batch(Op::Remove, 1).await, ["b"]);
            let removed = store
                .planned_batch(&run.id, Op::Remove, 1)
                .await
                .expect("remove batch");
            assert_eq!(
                removed,
                vec![member("b", "2")],
                "a removal carries what was sent"
            );
            assert_eq!(
                store.plan_counts(&run.id, 2).await.expect("counts"),
                plan,
                "the plan stays as it was numbered"
            );

            // A removal run: members known up front, numbered at once.
            let removal = SyncRun::start(id, Trigger::ConsentWithdrawal);
            store
                .stage(&removal.id, id, &[member("a", "1")], Some(Op::Remove))
                .await
                .expect("stage removal");
            let plan = store.plan_removal(&removal.id, 10).await.expect("plan");
            assert_eq!((plan.adds, plan.removes), (0, 1));
            store.clear_plans(id).await.expect("clear");
            assert!(batch(Op::Add, 1).await.is_empty());
        }
    );

    madtech_common::backend_tests!(
        owed_removals_are_kept_once_by_activation_until_settled,
        |db: TestDatabase| async move {
            let (store, activation) = store_with_activation(&db).await;
            let a = activation.id.as_str();
            let ids =
                |names: &[&str]| -> Vec<String> { names.iter().map(|n| n.to_string()).collect() };
            let owed = |activation_id: &str, names: &[&str], attempts| OwedRemovals {
                activation_id: activation_id.to_string(),
                pseudonymous_ids: ids(names),
                attempts,
            };
            assert!(
                store
                    .owed_removals(i64::MAX, 100)
                    .await
                    .expect("owed")
                    .is_empty()
            );
            store
                .owe_removals(a, &ids(&["p2", "p1"]), 5)
                .await
                .expect("owe");
            store
                .owe_removals(a, &ids(&["p1"]), 6)
                .await
                .expect("owed twice is owed once");
            store
                .owe_removals("other", &ids(&["p1"]), 7)
                .await
                .expect("owe");
            store.owe_removals("other", &[], 8).await.expect("nothing");
            assert_eq!(
                store.owed_removals(7, 100).await.expect("owed"),
                [owed(a, &["p1", "p2"], 0), owed("other", &["p1"], 0)]
            );
            assert_eq!(
                store.owed_removals(5, 100).await.expect("owed"),
                [owed(a, &["p2"], 0)],
                "p1 was owed again at 6"
            );
            // A failed attempt puts them off; the next is due later.
            store
                .defer_removals(a, &ids(&["p1", "p2"]), 7, 100)
                .await
                .expect("defer");
            assert_eq!(
                store.owed_removals(99, 100).await.expect("owed"),
                [owed("other", &["p1"], 0)]
            );
            assert_eq!(
                store.owed_removals(100, 100).await.expect("owed"),
                [owed(a, &["p1", "p2"], 1), owed("other", &["p1"], 0)]
            );
            // A pass that read them at 100 settles what was owed by then,
            // not p1, owed again at 150 while the pass was removing.
            store
                .owe_removals(a, &ids(&["p1"]), 150)
                .await
                .expect("owed again");
            store
                .settle_removals(a, &ids(&["p1", "p2"]), 100)
                .await
                .expect("settle");
            assert_eq!(
                store.owed_removals(i64::MAX, 100).await.expect("owed"),
                [owed(a, &["p1"], 0), owed("other", &["p1"], 0)]
            );
            assert_eq!(
                store.owed_removals(i64::MAX, 1).await.expect("owed").len(),
                1
            );
        }
    );

    madtech_common::backend_tests!(
        incremental_plans_apply_membership_changes,
        |db: TestDatabase| async move {
            let (store, activation) = store_with_activation(&db).await;
            let id = activation.id.as_str();
            assert_eq!(store.baseline(id).await.expect("baseline"), None);
            let baseline = Baseline {
                membership_cursor: 41,
                policy_version: "v1".into(),
                full_sync_at_micros: 7,
            };
            store.save_baseline(id, &baseline).await.expect("save");
            let moved = Baseline {
                membership_cursor: 42,
                ..baseline
            };
            store.save_baseline(id, &moved).await.expect("move");
            assert_eq!(store.baseline(id).await.expect("baseline"), Some(moved));

            // Held: a and b confirmed, c pending.
            store
                .acknowledge(id, &[member("a", "1"), member("b", "2")], &[], None)
                .await
                .expect("held");
            store
                .prepare(id, &[member("c", "3")])
                .await
                .expect("pending");
            let change = |id: &str, sha: &str, in_audience: bool| StagedChange {
                member: Member {
                    id: id.into(),
                    identifiers: if in_audience { hashed(sha) } else { Vec::new() },
                },
                in_audience,
            };
            let run = SyncRun::start(id, Trigger::Sync);
            store
                .stage_changes(
                    &run.id,
                    id,
                    &[
                        change("a", "", false),
                        change("b", "2", true),
                        change("d", "4", true),
                        change("e", "5", true),
                        change("c", "", false),
                    ],
                )
                .await
                .expect("first page");
            store
                .stage_changes(
                    &run.id,
                    id,
                    &[
                        change("e", "", false),
                        change("x", "", false),
                        change("f", "6", true),
                        change("f", "", false),
                        change("f", "7", true),
                    ],
                )
                .await
                .expect("second page");
            let plan = store.plan_changes(&run.id, id, 10).await.expect("plan");
            assert_eq!(
                (plan.adds, plan.removes, plan.unchanged),
                (2, 2, 1),
                "d and f (last seen entering) are added; a and the pending c are removed; \
                 b is held as it is; e (never sent) and x (never held) need nothing"
            );
            let batch = |op| {
                let store = &store;
                let run_id = run.id.clone();
                async move { store.planned_batch(&run_id, op, 1).await.expect("batch") }
            };
            assert_eq!(
                batch(Op::Add).await,
                vec![member("d", "4"), member("f", "7")]
            );
            assert_eq!(
                batch(Op::Remove).await,
                vec![member("a", "1"), member("c", "3")],
                "removals carry the hashes the destination was given"
            );
        }
    );
}
