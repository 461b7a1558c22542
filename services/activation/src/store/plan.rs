//! A run's plan, kept in the database so that memory stays flat whatever
//! the audience size: the audience is staged as it arrives, the database
//! compares it with the sync state and marks each member `add`, `remove` or
//! unchanged, and numbers the batches, which the run then reads one at a
//! time. The numbering is fixed before anything is sent, so a batch sent
//! again after a crash is the same batch (same session, same sequence
//! number, same idempotency key).

use madtech_common::db::settle;
use madtech_common::sql::{Sql, execute};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait,
};

use super::entities::sync_plan;
use super::{ActivationStore, identifiers_from};
use crate::destination::{Member, Op};
use crate::error::ActivationError;

/// What a run has to do, by count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlanCounts {
    pub adds: u64,
    pub removes: u64,
    pub unchanged: u64,
    /// Members per batch the plan was numbered with.
    pub batch_limit: u64,
}

impl PlanCounts {
    pub fn batches(&self, op: Op) -> u32 {
        let members = match op {
            Op::Add => self.adds,
            Op::Remove => self.removes,
        };
        u32::try_from(members.div_ceil(self.batch_limit.max(1))).unwrap_or(u32::MAX)
    }

    pub fn members(&self, op: Op) -> u64 {
        match op {
            Op::Add => self.adds,
            Op::Remove => self.removes,
        }
    }
}

/// One membership change of an incremental run: the person, and whether
/// they are in the audience now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedChange {
    pub member: Member,
    pub in_audience: bool,
}

fn identifiers_json(member: &Member) -> Result<String, ActivationError> {
    serde_json::to_string(&member.identifiers)
        .map_err(|err| ActivationError::Corrupt(format!("identifiers: {err}")))
}

impl ActivationStore {
    /// Forgets the plans of an activation's earlier runs.
    pub async fn clear_plans(&self, activation_id: &str) -> Result<(), ActivationError> {
        sync_plan::Entity::delete_many()
            .filter(sync_plan::Column::ActivationId.eq(activation_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Adds fetched members to a run's plan, unmarked. `op` marks them at
    /// once (removal runs, whose members are known up front).
    pub async fn stage(
        &self,
        run_id: &str,
        activation_id: &str,
        members: &[Member],
        op: Option<Op>,
    ) -> Result<(), ActivationError> {
        let rows = members
            .iter()
            .map(|member| Ok((member.id.as_str(), identifiers_json(member)?, op)))
            .collect::<Result<Vec<_>, ActivationError>>()?;
        self.stage_rows(run_id, activation_id, &rows).await
    }

    /// Writes staged rows (pseudonymous id, identifiers, op) in one
    /// transaction; a row staged again replaces the earlier one.
    async fn stage_rows(
        &self,
        run_id: &str,
        activation_id: &str,
        rows: &[(&str, String, Option<Op>)],
    ) -> Result<(), ActivationError> {
        let txn = self.db.begin().await?;
        let result = async {
            for chunk in rows.chunks(1_000) {
                let models = chunk
                    .iter()
                    .map(|(id, identifiers, op)| sync_plan::ActiveModel {
                        run_id: Set(run_id.to_string()),
                        pseudonymous_id: Set(id.to_string()),
                        activation_id: Set(activation_id.to_string()),
                        identifiers: Set(identifiers.clone()),
                        op: Set(op.map(|op| op.as_str().to_string())),
                        seq: Set(None),
                    });
                sync_plan::Entity::insert_many(models)
                    .on_conflict(
                        OnConflict::columns([
                            sync_plan::Column::RunId,
                            sync_plan::Column::PseudonymousId,
                        ])
                        .update_columns([sync_plan::Column::Identifiers, sync_plan::Column::Op])
                        .to_owned(),
                    )
                    .exec(&txn)
                    .await?;
            }
            Ok::<_, ActivationError>(())
        }
        .await;
        settle(txn, result).await
    }

    /// Compares a sync run's staged audience with what the destination
    /// holds: members it does not surely hold as they are now are adds (not
    /// held, held with other identifiers, or an add never confirmed);
    /// members it holds or may hold that are no longer in the audience are
    /// removes. Then numbers each op's batches of `batch_limit` in id order.
    pub async fn plan_sync(
        &self,
        run_id: &str,
        activation_id: &str,
        batch_limit: u64,
    ) -> Result<PlanCounts, ActivationError> {
        let txn = self.db.begin().await?;
        let result = async {
            mark_adds(&txn, run_id, activation_id).await?;
            let mut removes = Sql::new(
                "INSERT INTO sync_plan (run_id, pseudonymous_id, activation_id, identifiers, op) \
                 SELECT ",
            );
            removes
                .bind(run_id.to_string())
                .push(
                    ", s.pseudonymous_id, s.activation_id, s.identifiers, 'remove' \
                     FROM sync_state s WHERE s.activation_id = ",
                )
                .bind(activation_id.to_string())
                .push(" AND NOT EXISTS (SELECT 1 FROM sync_plan p WHERE p.run_id = ")
                .bind(run_id.to_string())
                .push(" AND p.pseudonymous_id = s.pseudonymous_id)");
            execute(&txn, &removes).await?;
            numbered(&txn, run_id, batch_limit).await
        }
        .await;
        settle(txn, result).await
    }

    /// Adds a page of an audience's membership changes to an incremental
    /// run's plan. A person named twice ends as their last change left
    /// them; the people who left are staged as removes, to be given the
    /// hashes the destination holds for them when the run is planned.
    pub async fn stage_changes(
        &self,
        run_id: &str,
        activation_id: &str,
        changes: &[StagedChange],
    ) -> Result<(), ActivationError> {
        // PostgreSQL refuses a statement that updates one row twice: the
        // page keeps each person's last change only.
        let mut last: std::collections::HashMap<&str, &StagedChange> =
            std::collections::HashMap::with_capacity(changes.len());
        for change in changes {
            last.insert(change.member.id.as_str(), change);
        }
        let rows = last
            .into_values()
            .map(|change| {
                Ok(if change.in_audience {
                    (
                        change.member.id.as_str(),
                        identifiers_json(&change.member)?,
                        None,
                    )
                } else {
                    (
                        change.member.id.as_str(),
                        "[]".to_string(),
                        Some(Op::Remove),
                    )
                })
            })
            .collect::<Result<Vec<_>, ActivationError>>()?;
        self.stage_rows(run_id, activation_id, &rows).await
    }

    /// Plans an incremental run from its staged changes: people in the
    /// audience that the destination does not surely hold as they are now
    /// are adds; people who left are removes when the destination holds or
    /// may hold them (with the hashes it was given), and nothing otherwise.
    pub async fn plan_changes(
        &self,
        run_id: &str,
        activation_id: &str,
        batch_limit: u64,
    ) -> Result<PlanCounts, ActivationError> {
        let txn = self.db.begin().await?;
        let result = async {
            mark_adds(&txn, run_id, activation_id).await?;
            let mut not_held = Sql::new("DELETE FROM sync_plan WHERE run_id = ");
            not_held
                .bind(run_id.to_string())
                .push(" AND op = 'remove' AND NOT EXISTS (SELECT 1 FROM sync_state s WHERE s.activation_id = ")
                .bind(activation_id.to_string())
                .push(" AND s.pseudonymous_id = sync_plan.pseudonymous_id)");
            execute(&txn, &not_held).await?;
            let mut hashes = Sql::new(
                "UPDATE sync_plan SET identifiers = (SELECT s.identifiers FROM sync_state s \
                 WHERE s.activation_id = ",
            );
            hashes
                .bind(activation_id.to_string())
                .push(" AND s.pseudonymous_id = sync_plan.pseudonymous_id) WHERE run_id = ")
                .bind(run_id.to_string())
                .push(" AND op = 'remove'");
            execute(&txn, &hashes).await?;
            numbered(&txn, run_id, batch_limit).await
        }
        .await;
        settle(txn, result).await
    }

    /// Numbers a removal run's staged members into batches.
    pub async fn plan_removal(
        &self,
        run_id: &str,
        batch_limit: u64,
    ) -> Result<PlanCounts, ActivationError> {
        let txn = self.db.begin().await?;
        let result = numbered(&txn, run_id, batch_limit).await;
        settle(txn, result).await
    }

    /// The plan's counts for a run planned earlier.
    pub async fn plan_counts(
        &self,
        run_id: &str,
        batch_limit: u64,
    ) -> Result<PlanCounts, ActivationError> {
        counts(&self.db, run_id, batch_limit).await
    }

    /// Batch `seq` of `op` in a run's plan, in id order.
    pub async fn planned_batch(
        &self,
        run_id: &str,
        op: Op,
        seq: u32,
    ) -> Result<Vec<Member>, ActivationError> {
        // Sorted here, not by the database: asked to order by id, SQLite
        // walks the whole plan in id order instead of seeking the batch.
        let mut members = sync_plan::Entity::find()
            .filter(sync_plan::Column::RunId.eq(run_id))
            .filter(sync_plan::Column::Op.eq(op.as_str()))
            .filter(sync_plan::Column::Seq.eq(i64::from(seq)))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| {
                Ok(Member {
                    identifiers: identifiers_from(&row.identifiers)?,
                    id: row.pseudonymous_id,
                })
            })
            .collect::<Result<Vec<_>, ActivationError>>()?;
        members.sort_unstable();
        Ok(members)
    }
}

/// Marks the staged members the destination does not surely hold as they
/// are now (not held, held with other identifiers, or an add never
/// confirmed) as adds.
async fn mark_adds<C: ConnectionTrait>(
    db: &C,
    run_id: &str,
    activation_id: &str,
) -> Result<(), ActivationError> {
    let mut adds = Sql::new("UPDATE sync_plan SET op = 'add' WHERE run_id = ");
    adds.bind(run_id.to_string())
        .push(" AND op IS NULL AND NOT EXISTS (SELECT 1 FROM sync_state s WHERE s.activation_id = ")
        .bind(activation_id.to_string())
        .push(
            " AND s.pseudonymous_id = sync_plan.pseudonymous_id \
             AND s.confirmed = TRUE AND s.identifiers = sync_plan.identifiers)",
        );
    execute(db, &adds).await?;
    Ok(())
}

/// Numbers a planned run's batches; its counts.
async fn numbered(
    txn: &sea_orm::DatabaseTransaction,
    run_id: &str,
    batch_limit: u64,
) -> Result<PlanCounts, ActivationError> {
    number_batches(txn, run_id, batch_limit).await?;
    counts(txn, run_id, batch_limit).await
}

/// Gives each `add` and each `remove` its batch: the n-th member of an op in
/// id order is in batch `n / limit + 1`. One batch at a time: find the id
/// that ends it (an index walk of `limit` rows), then number the range, so
/// the cost stays linear in the plan's size.
async fn number_batches<C: ConnectionTrait>(
    db: &C,
    run_id: &str,
    batch_limit: u64,
) -> Result<(), ActivationError> {
    let limit = i64::try_from(batch_limit.max(1)).unwrap_or(i64::MAX);
    let in_op = |sql: &mut Sql, op: Op, after: &Option<String>| {
        sql.bind(run_id.to_string())
            .push(" AND op = ")
            .bind(op.as_str());
        if let Some(after) = after {
            sql.push(" AND pseudonymous_id > ").bind(after.clone());
        }
    };
    for op in [Op::Add, Op::Remove] {
        let mut after: Option<String> = None;
        for seq in 1i64.. {
            let mut last = Sql::new("SELECT pseudonymous_id FROM sync_plan WHERE run_id = ");
            in_op(&mut last, op, &after);
            last.push(" ORDER BY pseudonymous_id LIMIT 1 OFFSET ")
                .bind(limit - 1);
            let last: Option<String> = match db
                .query_one_raw(last.statement(db.get_database_backend()))
                .await?
            {
                Some(row) => Some(row.try_get("", "pseudonymous_id")?),
                None => None,
            };
            let mut number = Sql::new("UPDATE sync_plan SET seq = ");
            number.bind(seq).push(" WHERE run_id = ");
            in_op(&mut number, op, &after);
            if let Some(last) = &last {
                number.push(" AND pseudonymous_id <= ").bind(last.clone());
            }
            execute(db, &number).await?;
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
    }
    Ok(())
}

async fn counts<C: ConnectionTrait>(
    db: &C,
    run_id: &str,
    batch_limit: u64,
) -> Result<PlanCounts, ActivationError> {
    let mut sql = Sql::new("SELECT op, count(*) AS n FROM sync_plan WHERE run_id = ");
    sql.bind(run_id.to_string()).push(" GROUP BY op");
    let mut counts = PlanCounts {
        batch_limit,
        ..PlanCounts::default()
    };
    for row in db
        .query_all_raw(sql.statement(db.get_database_backend()))
        .await?
    {
        let op: Option<String> = row.try_get("", "op")?;
        let n: i64 = row.try_get("", "n")?;
        let n = u64::try_from(n).unwrap_or(0);
        match op.as_deref() {
            Some("add") => counts.adds = n,
            Some("remove") => counts.removes = n,
            _ => counts.unchanged = n,
        }
    }
    Ok(counts)
}
