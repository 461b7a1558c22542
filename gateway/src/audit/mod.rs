//! The audit trail of crossings: one append-only record per
//! `ExportAudience`, durable before the export reports success, hash-chained
//! so that a changed or removed record shows. Records hold counts, reasons,
//! versions and digests, never a personal identifier.

mod entities;
mod migration;

use std::collections::BTreeMap;

use madtech_common::db::settle;
use sea_orm::ColumnTrait;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

pub use migration::Migrator;

use entities::record;

/// What the crossing reports about one export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Crossing {
    pub caller: String,
    pub method: String,
    pub segment_id: String,
    pub destination_id: String,
    pub destination_kind: String,
    pub purpose: String,
    pub policy_version: String,
    /// `complete`, `failed` or `aborted`.
    pub outcome: String,
    pub allowed: u64,
    pub denied: BTreeMap<String, u64>,
    pub identifiers_stripped: u64,
    pub released_digest: String,
}

/// A stored record: the crossing, its place in the chain and its hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub recorded_at_micros: i64,
    pub crossing: Crossing,
    pub previous_hash: String,
    pub hash: String,
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub checked: u64,
    /// The first record whose hash does not match its content and
    /// predecessor.
    pub first_broken: Option<u64>,
    /// The newest record's sequence number and hash.
    pub head: Option<(u64, String)>,
    /// Whether the anchor asked for is in the chain with its hash.
    pub anchor_matched: bool,
}

/// A record known from outside the database: its sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

/// Key of the PostgreSQL advisory lock that serialises appends across
/// gateway replicas, so each record chains onto the one before it.
const APPEND_LOCK: i64 = 0x6d61_6474_6563_6803;

pub struct AuditLog {
    db: DatabaseConnection,
    writer: Mutex<()>,
}

impl AuditLog {
    pub fn new(db: DatabaseConnection) -> Self {
        AuditLog {
            db,
            writer: Mutex::new(()),
        }
    }

    /// Appends a record and returns it once it is durable.
    pub async fn append(&self, crossing: Crossing) -> Result<Record, DbErr> {
        let mut records = self.append_all(vec![crossing]).await?;
        records
            .pop()
            .ok_or_else(|| DbErr::Custom("no record appended".into()))
    }

    /// Appends records in one transaction, each chained onto the one
    /// before, and returns them once they are durable: all of them or none.
    pub async fn append_all(&self, crossings: Vec<Crossing>) -> Result<Vec<Record>, DbErr> {
        if crossings.is_empty() {
            return Ok(Vec::new());
        }
        let _writer = self.writer.lock().await;
        let txn = self.db.begin().await?;
        let result = async {
            if txn.get_database_backend() == DbBackend::Postgres {
                txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({APPEND_LOCK})"))
                    .await?;
            }
            let mut previous_hash = record::Entity::find()
                .order_by_desc(record::Column::Seq)
                .one(&txn)
                .await?
                .map(|last| last.hash)
                .unwrap_or_default();
            let mut records = Vec::with_capacity(crossings.len());
            for crossing in crossings {
                let recorded_at_micros = crate::policy::now_micros();
                let hash = chain_hash(&previous_hash, recorded_at_micros, &crossing);
                let denied = serde_json::to_string(&crossing.denied)
                    .map_err(|err| DbErr::Custom(format!("denied counts: {err}")))?;
                let row = record::ActiveModel {
                    seq: NotSet,
                    recorded_at: Set(recorded_at_micros),
                    caller: Set(crossing.caller.clone()),
                    method: Set(crossing.method.clone()),
                    segment_id: Set(crossing.segment_id.clone()),
                    destination_id: Set(crossing.destination_id.clone()),
                    destination_kind: Set(crossing.destination_kind.clone()),
                    purpose: Set(crossing.purpose.clone()),
                    policy_version: Set(crossing.policy_version.clone()),
                    outcome: Set(crossing.outcome.clone()),
                    allowed: Set(count(crossing.allowed)),
                    denied: Set(denied),
                    identifiers_stripped: Set(count(crossing.identifiers_stripped)),
                    released_digest: Set(crossing.released_digest.clone()),
                    previous_hash: Set(previous_hash.clone()),
                    hash: Set(hash.clone()),
                };
                let seq = record::Entity::insert(row).exec(&txn).await?.last_insert_id;
                records.push(Record {
                    seq: u64::try_from(seq).unwrap_or_default(),
                    recorded_at_micros,
                    crossing,
                    previous_hash: std::mem::replace(&mut previous_hash, hash.clone()),
                    hash,
                });
            }
            Ok::<_, DbErr>(records)
        }
        .await;
        let records = settle(txn, result).await?;
        if let Some(head) = records.last() {
            // The chain's head in the logs, which are shipped elsewhere: an
            // anchor for `VerifyAuditChain` that the audit database cannot
            // rewrite.
            tracing::info!(target: "madtech::audit", seq = head.seq, hash = %head.hash, "audit chain head");
        }
        Ok(records)
    }

    /// Up to `limit` records after `after`, oldest first.
    pub async fn list(&self, after: u64, limit: u64) -> Result<Vec<Record>, DbErr> {
        record::Entity::find()
            .filter(record::Column::Seq.gt(i64::try_from(after).unwrap_or(i64::MAX)))
            .order_by_asc(record::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(from_row)
            .collect()
    }

    /// Walks the whole chain, page by page. A record that does not parse,
    /// holds a negative count or does not hash to what it says is broken.
    /// (Removing the newest records leaves a shorter chain that verifies:
    /// compare `checked` and the last hash with a copy kept elsewhere.)
    pub async fn verify(&self, anchor: Option<&Anchor>) -> Result<Verification, DbErr> {
        let mut previous = String::new();
        let mut after = 0_i64;
        let mut checked = 0;
        let mut anchor_matched = false;
        let mut head = None;
        loop {
            let page = record::Entity::find()
                .filter(record::Column::Seq.gt(after))
                .order_by_asc(record::Column::Seq)
                .limit(1000)
                .all(&self.db)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for row in page {
                checked += 1;
                let seq = u64::try_from(row.seq).unwrap_or_default();
                let intact = match from_row(row.clone()) {
                    Ok(record) => {
                        let expected =
                            chain_hash(&previous, record.recorded_at_micros, &record.crossing);
                        record.previous_hash == previous && record.hash == expected
                    }
                    Err(_) => false,
                };
                if !intact {
                    return Ok(Verification {
                        checked,
                        first_broken: Some(seq),
                        head: None,
                        anchor_matched: false,
                    });
                }
                if anchor.is_some_and(|a| a.seq == seq && a.hash == row.hash) {
                    anchor_matched = true;
                }
                head = Some((seq, row.hash.clone()));
                previous = row.hash;
            }
        }
        Ok(Verification {
            checked,
            first_broken: None,
            head,
            anchor_matched,
        })
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_row(row: record::Model) -> Result<Record, DbErr> {
    let corrupt = |what: &str| DbErr::Custom(format!("audit record {}: {what}", row.seq));
    let denied = serde_json::from_str(&row.denied).map_err(|err| corrupt(&err.to_string()))?;
    let unsigned = |n: i64| u64::try_from(n).map_err(|_| corrupt("negative count"));
    Ok(Record {
        seq: u64::try_from(row.seq).unwrap_or_default(),
        recorded_at_micros: row.recorded_at,
        crossing: Crossing {
            caller: row.caller,
            method: row.method,
            segment_id: row.segment_id,
            destination_id: row.destination_id,
            destination_kind: row.destination_kind,
            purpose: row.purpose,
            policy_version: row.policy_version,
            outcome: row.outcome,
            allowed: unsigned(row.allowed)?,
            denied,
            identifiers_stripped: unsigned(row.identifiers_stripped)?,
            released_digest: row.released_digest,
        },
        previous_hash: row.previous_hash,
        hash: row.hash,
    })
}

/// SHA-256 over the previous hash and every field, each length-prefixed so
/// no two different records serialise alike.
fn chain_hash(previous: &str, recorded_at_micros: i64, crossing: &Crossing) -> String {
    let mut hasher = Sha256::new();
    let mut field = |value: &str| {
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value.as_bytes());
    };
    field(previous);
    field(&recorded_at_micros.to_string());
    field(&crossing.caller);
    field(&crossing.method);
    field(&crossing.segment_id);
    field(&crossing.destination_id);
    field(&crossing.destination_kind);
    field(&crossing.purpose);
    field(&crossing.policy_version);
    field(&crossing.outcome);
    field(&crossing.allowed.to_string());
    for (reason, n) in &crossing.denied {
        field(reason);
        field(&n.to_string());
    }
    field(&crossing.identifiers_stripped.to_string());
    field(&crossing.released_digest);
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use madtech_common::db::connect_and_migrate;
    use madtech_common::testing::TestDatabase;
    use sea_orm::Statement;

    fn crossing(allowed: u64) -> Crossing {
        Crossing {
            caller: "activation".into(),
            method: "/madtech.segments.v1.SegmentService/ExportAudience".into(),
            segment_id: "s1".into(),
            destination_id: "d1".into(),
            destination_kind: "file".into(),
            purpose: "ad_targeting".into(),
            policy_version: "v".repeat(64),
            outcome: "complete".into(),
            allowed,
            denied: [("consent_denied".to_string(), 2)].into(),
            identifiers_stripped: 1,
            released_digest: "ab".repeat(32),
        }
    }

    madtech_common::backend_tests!(
        records_appended_together_chain_like_records_appended_alone,
        |db: TestDatabase| async move {
            let conn = connect_and_migrate::<Migrator>(&db.config)
                .await
                .expect("connect");
            let log = AuditLog::new(conn);
            let first = log.append(crossing(1)).await.expect("first");
            assert!(log.append_all(Vec::new()).await.expect("none").is_empty());
            let page = log
                .append_all(vec![crossing(2), crossing(3)])
                .await
                .expect("a page's records");
            assert_eq!(page.len(), 2);
            assert_eq!(page[0].previous_hash, first.hash);
            assert_eq!(page[1].previous_hash, page[0].hash);
            assert_eq!(page[1].seq, page[0].seq + 1);
            assert_eq!(log.list(first.seq, 10).await.expect("list"), page);
            let verification = log.verify(None).await.expect("verify");
            assert_eq!((verification.checked, verification.first_broken), (3, None));
        }
    );

    madtech_common::backend_tests!(
        the_chain_holds_and_shows_tampering,
        |db: TestDatabase| async move {
            let conn = connect_and_migrate::<Migrator>(&db.config)
                .await
                .expect("connect");
            let log = AuditLog::new(conn.clone());
            let first = log.append(crossing(1)).await.expect("first");
            let second = log.append(crossing(2)).await.expect("second");
            let third = log.append(crossing(3)).await.expect("third");
            assert_eq!(first.previous_hash, "");
            assert_eq!(second.previous_hash, first.hash);
            let listed = log.list(first.seq, 10).await.expect("list");
            assert_eq!(listed.len(), 2);
            assert_eq!(listed[0], second);
            let anchor = Anchor {
                seq: third.seq,
                hash: third.hash.clone(),
            };
            assert_eq!(
                log.verify(Some(&anchor)).await.expect("verify"),
                Verification {
                    checked: 3,
                    first_broken: None,
                    head: Some((third.seq, third.hash.clone())),
                    anchor_matched: true,
                }
            );

            // The newest record deleted: the rest still chains, but the
            // anchor kept outside shows the truncation.
            conn.execute_raw(Statement::from_string(
                conn.get_database_backend(),
                format!("DELETE FROM audit_records WHERE seq = {}", third.seq),
            ))
            .await
            .expect("truncate");
            let truncated = log.verify(Some(&anchor)).await.expect("verify");
            assert_eq!(truncated.first_broken, None);
            assert!(!truncated.anchor_matched);
            assert_eq!(truncated.head, Some((second.seq, second.hash.clone())));

            // Someone edits a count in place: the chain points at the record.
            conn.execute_raw(Statement::from_string(
                conn.get_database_backend(),
                format!(
                    "UPDATE audit_records SET allowed = 99 WHERE seq = {}",
                    second.seq
                ),
            ))
            .await
            .expect("tamper");
            let verification = log.verify(None).await.expect("verify");
            assert_eq!(verification.first_broken, Some(second.seq));
        }
    );
}
