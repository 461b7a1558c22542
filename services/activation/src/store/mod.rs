//! Persistence of destinations, activations, sync state and sync runs.

mod entities;
mod migration;

use std::collections::HashMap;

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait,
};

pub use migration::Migrator;

use crate::destination::{HashedIdentifier, Target};
use crate::error::ActivationError;
use entities::{activation, destination, sync_run, sync_state};

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
}

/// A sync run's progress and outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncRun {
    pub id: String,
    pub activation_id: String,
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
}

impl SyncRun {
    pub fn start(activation_id: &str) -> Self {
        SyncRun {
            id: uuid::Uuid::now_v7().to_string(),
            activation_id: activation_id.to_string(),
            phase: Phase::Fetching,
            members_received: 0,
            added: 0,
            removed: 0,
            unchanged: 0,
            output: String::new(),
            error: String::new(),
            started_at_micros: Utc::now().timestamp_micros(),
            finished_at_micros: None,
        }
    }
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
    ) -> Result<Activation, ActivationError> {
        self.destination(&destination_id).await?;
        let activation = Activation {
            id: uuid::Uuid::now_v7().to_string(),
            segment_id,
            destination_id,
            purpose,
            created_at_micros: now(),
        };
        activation::Entity::insert(activation::ActiveModel {
            id: Set(activation.id.clone()),
            segment_id: Set(activation.segment_id.clone()),
            destination_id: Set(activation.destination_id.clone()),
            purpose: Set(activation.purpose.clone()),
            created_at: Set(activation.created_at_micros),
        })
        .exec(&self.db)
        .await?;
        Ok(activation)
    }

    pub async fn activation(&self, id: &str) -> Result<Activation, ActivationError> {
        let row = activation::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?
            .ok_or(ActivationError::NotFound("activation"))?;
        Ok(Activation {
            id: row.id,
            segment_id: row.segment_id,
            destination_id: row.destination_id,
            purpose: row.purpose,
            created_at_micros: row.created_at,
        })
    }

    /// What the destination holds, or may hold, for `activation_id`.
    pub async fn held(&self, activation_id: &str) -> Result<Held, ActivationError> {
        sync_state::Entity::find()
            .filter(sync_state::Column::ActivationId.eq(activation_id))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| {
                let identifiers = serde_json::from_str(&row.identifiers).map_err(|err| {
                    ActivationError::Corrupt(format!("sync state identifiers: {err}"))
                })?;
                let member = HeldMember {
                    identifiers,
                    confirmed: row.confirmed,
                };
                Ok((row.pseudonymous_id, member))
            })
            .collect()
    }

    /// Every member held anywhere whose identifiers include one of these
    /// hashes: `(activation id, pseudonymous id, synced at, confirmed)`.
    /// A scan of the stored identifiers; data-subject requests are rare.
    pub async fn holders_of(
        &self,
        identifier_sha256s: &[String],
    ) -> Result<Vec<(String, String, i64, bool)>, ActivationError> {
        let mut found = std::collections::BTreeMap::new();
        for hash in identifier_sha256s {
            let rows = sync_state::Entity::find()
                .filter(sync_state::Column::Identifiers.contains(format!("\"{hash}\"")))
                .all(&self.db)
                .await?;
            for row in rows {
                found.insert(
                    (row.activation_id, row.pseudonymous_id),
                    (row.synced_at, row.confirmed),
                );
            }
        }
        Ok(found
            .into_iter()
            .map(|((activation, id), (at, confirmed))| (activation, id, at, confirmed))
            .collect())
    }

    /// Records adds as pending before they are delivered, so a crash while
    /// delivering cannot leave a member at the destination that no later sync
    /// knows to remove.
    pub async fn prepare(
        &self,
        activation_id: &str,
        added: &[(String, Vec<HashedIdentifier>)],
    ) -> Result<(), ActivationError> {
        let txn = self.db.begin().await?;
        upsert_members(&txn, activation_id, added, false).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Records what the destination acknowledged, in one transaction: adds
    /// become confirmed, removes are forgotten. Call only after the
    /// destination has the changes.
    pub async fn acknowledge(
        &self,
        activation_id: &str,
        added: &[(String, Vec<HashedIdentifier>)],
        removed: &[String],
    ) -> Result<(), ActivationError> {
        let txn = self.db.begin().await?;
        for chunk in removed.chunks(500) {
            sync_state::Entity::delete_many()
                .filter(sync_state::Column::ActivationId.eq(activation_id))
                .filter(sync_state::Column::PseudonymousId.is_in(chunk.iter().cloned()))
                .exec(&txn)
                .await?;
        }
        upsert_members(&txn, activation_id, added, true).await?;
        txn.commit().await?;
        Ok(())
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
                    ])
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

/// Writes members into the sync state, pending or confirmed.
async fn upsert_members<C: sea_orm::ConnectionTrait>(
    db: &C,
    activation_id: &str,
    members: &[(String, Vec<HashedIdentifier>)],
    confirmed: bool,
) -> Result<(), ActivationError> {
    let synced_at = now();
    for chunk in members.chunks(500) {
        let rows = chunk
            .iter()
            .map(|(id, identifiers)| {
                let identifiers = serde_json::to_string(identifiers)
                    .map_err(|err| ActivationError::Corrupt(format!("identifiers: {err}")))?;
                Ok(sync_state::ActiveModel {
                    activation_id: Set(activation_id.to_string()),
                    pseudonymous_id: Set(id.clone()),
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
                    },
                )
                .await
                .expect("destination");
            assert!(matches!(
                store
                    .create_destination(
                        "files".into(),
                        Target::File {
                            directory: "x".into()
                        }
                    )
                    .await,
                Err(ActivationError::NameTaken(_))
            ));
            assert!(matches!(
                store
                    .create_activation("s".into(), "missing".into(), "ad_targeting".into())
                    .await,
                Err(ActivationError::NotFound("destination"))
            ));
            let activation = store
                .create_activation("s".into(), destination.id.clone(), "ad_targeting".into())
                .await
                .expect("activation");
            assert_eq!(
                store.activation(&activation.id).await.expect("get"),
                activation
            );

            store
                .acknowledge(
                    &activation.id,
                    &[("a".into(), hashed("1")), ("b".into(), hashed("2"))],
                    &[],
                )
                .await
                .expect("first");
            store
                .acknowledge(&activation.id, &[("b".into(), hashed("3"))], &["a".into()])
                .await
                .expect("second");
            let held = store.held(&activation.id).await.expect("held");
            assert_eq!(held.len(), 1);
            assert_eq!(held["b"].identifiers, hashed("3"));
            assert!(held["b"].confirmed);
            store
                .prepare(&activation.id, &[("c".into(), hashed("4"))])
                .await
                .expect("prepare");
            let held = store.held(&activation.id).await.expect("held");
            assert!(!held["c"].confirmed, "pending until acknowledged");

            let mut run = SyncRun::start(&activation.id);
            store.save_run(&run).await.expect("insert run");
            run.phase = Phase::Succeeded;
            run.added = 2;
            store.save_run(&run).await.expect("update run");
        }
    );
}
