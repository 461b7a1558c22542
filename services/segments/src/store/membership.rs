//! Who is in which segment, and the ordered log of who entered and left
//! (the stream activation syncs differences from). A computation reconciles
//! one page of evaluated people at a time; the projection makes people who
//! were erased or merged away leave every segment.

use madtech_common::db::settle;
use std::collections::BTreeSet;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, TransactionTrait,
};
use tokio::sync::watch;

use super::WriteLock;
use super::sql::{MAX_BINDS, Sql, execute, insert_rows, number};
use super::statistics::Statistics;
use crate::error::SegmentError;

/// Key of the PostgreSQL advisory lock that keeps membership change cursors
/// in commit order across replicas.
const APPEND_LOCK: i64 = 0x6d61_6474_6563_6804;

/// One entry of the membership log.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipChange {
    pub cursor: u64,
    pub profile_id: String,
    pub entered: bool,
    pub at_micros: i64,
}

pub struct Memberships {
    db: DatabaseConnection,
    writes: WriteLock,
    appended: watch::Sender<u64>,
    pub(super) statistics: Statistics,
}

pub(super) async fn lock(txn: &DatabaseTransaction) -> Result<(), SegmentError> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({APPEND_LOCK})"))
            .await?;
    }
    Ok(())
}

async fn log(
    txn: &DatabaseTransaction,
    segment_id: &str,
    profile_id: &str,
    entered: bool,
    at: i64,
) -> Result<(), SegmentError> {
    let mut sql =
        Sql::new("INSERT INTO membership_changes (segment_id, profile_id, entered, at) VALUES (");
    sql.bind(segment_id.to_string())
        .push(", ")
        .bind(profile_id.to_string())
        .push(", ")
        .bind(i64::from(entered))
        .push(", ")
        .bind(at)
        .push(")");
    execute(txn, &sql).await?;
    Ok(())
}

/// Makes `profile_ids` leave every segment they are in (erased or merged
/// away), inside the projection's transaction.
pub(super) async fn leave_everything(
    txn: &DatabaseTransaction,
    profile_ids: &[String],
    at: i64,
) -> Result<(), SegmentError> {
    if profile_ids.is_empty() {
        return Ok(());
    }
    lock(txn).await?;
    let mut sql = Sql::new("SELECT segment_id, profile_id FROM memberships WHERE profile_id IN (");
    for (i, id) in profile_ids.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.bind(id.clone());
    }
    sql.push(") ORDER BY segment_id, profile_id");
    let rows = txn
        .query_all_raw(sql.statement(txn.get_database_backend()))
        .await?;
    for row in rows {
        let segment: String = row.try_get("", "segment_id")?;
        let profile: String = row.try_get("", "profile_id")?;
        let mut delete = Sql::new("DELETE FROM memberships WHERE segment_id = ");
        delete
            .bind(segment.clone())
            .push(" AND profile_id = ")
            .bind(profile.clone());
        execute(txn, &delete).await?;
        log(txn, &segment, &profile, false, at).await?;
    }
    Ok(())
}

impl Memberships {
    pub fn new(db: DatabaseConnection, writes: WriteLock) -> Self {
        Memberships {
            db,
            writes,
            appended: watch::Sender::new(0),
            statistics: Statistics::of("memberships, membership_changes"),
        }
    }

    /// Records who of `evaluated` (profile id, matches) is in the segment
    /// now; answers how many entered and how many left.
    pub async fn reconcile(
        &self,
        segment_id: &str,
        evaluated: &[(String, bool)],
        at: i64,
    ) -> Result<(u64, u64), SegmentError> {
        if evaluated.is_empty() {
            return Ok((0, 0));
        }
        let _writing = self.writes.lock().await;
        let txn = self.db.begin().await?;
        let result = async {
            lock(&txn).await?;
            let ids: Vec<String> = evaluated.iter().map(|(id, _)| id.clone()).collect();
            let mut current = BTreeSet::new();
            for chunk in ids.chunks(MAX_BINDS) {
                let mut sql = Sql::new("SELECT profile_id FROM memberships WHERE segment_id = ");
                sql.bind(segment_id.to_string())
                    .push(" AND profile_id IN ")
                    .bind_list(chunk);
                for row in txn
                    .query_all_raw(sql.statement(txn.get_database_backend()))
                    .await?
                {
                    current.insert(row.try_get::<String>("", "profile_id")?);
                }
            }
            let entering: Vec<&String> = evaluated
                .iter()
                .filter(|(id, matches)| *matches && !current.contains(id))
                .map(|(id, _)| id)
                .collect();
            let leaving: Vec<&String> = evaluated
                .iter()
                .filter(|(id, matches)| !*matches && current.contains(id))
                .map(|(id, _)| id)
                .collect();
            // A page's changes in a few statements, not a few per person: the
            // log in the order evaluated, entries before exits.
            let segment = || sea_orm::Value::from(segment_id.to_string());
            insert_rows(
                &txn,
                "memberships (segment_id, profile_id, entered_at)",
                "",
                entering
                    .iter()
                    .map(|id| vec![segment(), (*id).clone().into(), at.into()])
                    .collect(),
            )
            .await?;
            for chunk in leaving.chunks(MAX_BINDS) {
                let mut delete = Sql::new("DELETE FROM memberships WHERE segment_id = ");
                delete
                    .bind(segment_id.to_string())
                    .push(" AND profile_id IN ")
                    .bind_list(chunk.iter().copied());
                execute(&txn, &delete).await?;
            }
            insert_rows(
                &txn,
                "membership_changes (segment_id, profile_id, entered, at)",
                "",
                entering
                    .iter()
                    .map(|id| (id, true))
                    .chain(leaving.iter().map(|id| (id, false)))
                    .map(|(id, entered)| {
                        vec![
                            segment(),
                            (*id).clone().into(),
                            i64::from(entered).into(),
                            at.into(),
                        ]
                    })
                    .collect(),
            )
            .await?;
            let (entered, exited) = (entering.len() as u64, leaving.len() as u64);
            Ok::<_, SegmentError>((entered, exited))
        }
        .await;
        let (entered, exited) = settle(txn, result).await?;
        if entered + exited > 0 {
            self.statistics
                .wrote(&self.db, 2 * (entered + exited))
                .await;
            self.appended.send_replace(self.head().await?);
        }
        Ok((entered, exited))
    }

    pub async fn count(&self, segment_id: &str) -> Result<u64, SegmentError> {
        let mut sql = Sql::new("SELECT count(*) AS n FROM memberships WHERE segment_id = ");
        sql.bind(segment_id.to_string());
        number(&self.db, &sql).await.map_err(Into::into)
    }

    /// The segments these people are members of now, with when they
    /// entered: `(segment id, profile id, entered at)`.
    pub async fn of_people(
        &self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String, i64)>, SegmentError> {
        if profile_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new(
            "SELECT segment_id, profile_id, entered_at FROM memberships WHERE profile_id IN ",
        );
        sql.bind_list(profile_ids)
            .push(" ORDER BY segment_id, profile_id");
        let rows = self
            .db
            .query_all_raw(sql.statement(self.db.get_database_backend()))
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("", "segment_id")?,
                    row.try_get("", "profile_id")?,
                    row.try_get("", "entered_at")?,
                ))
            })
            .collect()
    }

    /// The newest membership change cursor (0 before the first).
    pub async fn head(&self) -> Result<u64, SegmentError> {
        number(
            &self.db,
            &Sql::new("SELECT max(seq) AS n FROM membership_changes"),
        )
        .await
        .map_err(Into::into)
    }

    /// Up to `limit` changes of one segment after `cursor`, in order.
    pub async fn changes_after(
        &self,
        segment_id: &str,
        cursor: u64,
        limit: u64,
    ) -> Result<Vec<MembershipChange>, SegmentError> {
        let mut sql = Sql::new(
            "SELECT seq, profile_id, entered, at FROM membership_changes WHERE segment_id = ",
        );
        sql.bind(segment_id.to_string())
            .push(" AND seq > ")
            .bind(i64::try_from(cursor).unwrap_or(i64::MAX))
            .push(" ORDER BY seq LIMIT ")
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        self.db
            .query_all_raw(sql.statement(self.db.get_database_backend()))
            .await?
            .into_iter()
            .map(|row| {
                Ok(MembershipChange {
                    cursor: u64::try_from(row.try_get::<i64>("", "seq")?).unwrap_or(0),
                    profile_id: row.try_get("", "profile_id")?,
                    entered: row.try_get::<i64>("", "entered")? != 0,
                    at_micros: row.try_get("", "at")?,
                })
            })
            .collect()
    }

    /// Wakes when this process records membership changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}
