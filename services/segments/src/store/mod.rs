//! Persistence of segment definitions.

mod entities;
pub mod membership;
mod migration;
pub mod projection;
pub mod sql;
mod statistics;

use std::collections::BTreeMap;

use chrono::Utc;
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};

pub use migration::Migrator;

/// Serialises this process's writes to the projection and the memberships:
/// a SQLite transaction that read before writing cannot commit after
/// another writer did, and PostgreSQL replicas add an advisory lock.
pub type WriteLock = std::sync::Arc<tokio::sync::Mutex<()>>;

use crate::error::SegmentError;
use crate::rules::Rule;
use entities::segment;

/// A stored segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub id: String,
    pub name: String,
    pub rule: Rule,
    pub created_at_micros: i64,
}

pub struct SegmentStore {
    db: DatabaseConnection,
}

impl SegmentStore {
    pub fn new(db: DatabaseConnection) -> Self {
        SegmentStore { db }
    }

    pub async fn create(&self, name: String, rule: Rule) -> Result<Segment, SegmentError> {
        let segment = Segment {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            rule,
            created_at_micros: Utc::now().timestamp_micros(),
        };
        let rule_json = serde_json::to_string(&segment.rule)
            .map_err(|err| SegmentError::Corrupt(format!("rule: {err}")))?;
        let row = segment::ActiveModel {
            id: Set(segment.id.clone()),
            name: Set(segment.name.clone()),
            rule: Set(rule_json),
            created_at: Set(segment.created_at_micros),
        };
        match segment::Entity::insert(row).exec(&self.db).await {
            Ok(_) => Ok(segment),
            Err(err) if madtech_common::db::is_unique_violation(&err) => {
                Err(SegmentError::NameTaken(segment.name))
            }
            Err(err) => Err(err.into()),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Segment, SegmentError> {
        let row = segment::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?
            .ok_or(SegmentError::NotFound)?;
        segment_from_row(row)
    }

    /// Replaces a segment's rule.
    pub async fn update_rule(&self, id: &str, rule: Rule) -> Result<Segment, SegmentError> {
        let rule_json = serde_json::to_string(&rule)
            .map_err(|err| SegmentError::Corrupt(format!("rule: {err}")))?;
        let updated = segment::Entity::update_many()
            .col_expr(
                segment::Column::Rule,
                sea_orm::sea_query::Expr::value(rule_json),
            )
            .filter(segment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        if updated.rows_affected == 0 {
            return Err(SegmentError::NotFound);
        }
        self.get(id).await
    }

    /// Every segment's rule by id, for rules that refer to other segments.
    pub async fn rules(&self) -> Result<BTreeMap<String, Rule>, SegmentError> {
        segment::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| segment_from_row(row).map(|s| (s.id, s.rule)))
            .collect()
    }
}

fn segment_from_row(row: segment::Model) -> Result<Segment, SegmentError> {
    Ok(Segment {
        rule: serde_json::from_str(&row.rule)
            .map_err(|err| SegmentError::Corrupt(format!("rule of {}: {err}", row.id)))?,
        id: row.id,
        name: row.name,
        created_at_micros: row.created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use madtech_common::db::connect_and_migrate;
    use madtech_common::testing::TestDatabase;

    madtech_common::backend_tests!(
        segments_are_stored_with_unique_names,
        |db: TestDatabase| async move {
            let store = SegmentStore::new(
                connect_and_migrate::<Migrator>(&db.config)
                    .await
                    .expect("connect"),
            );
            let rule = Rule::RegionIn(["FR".to_string()].into());
            let created = store
                .create("france".into(), rule.clone())
                .await
                .expect("create");
            assert_eq!(store.get(&created.id).await.expect("get"), created);
            assert!(matches!(
                store.create("france".into(), rule).await,
                Err(SegmentError::NameTaken(_))
            ));
            assert!(matches!(
                store.get("missing").await,
                Err(SegmentError::NotFound)
            ));
        }
    );

    madtech_common::backend_tests!(
        membership_statistics_are_refreshed_as_the_memberships_grow,
        |db: TestDatabase| async move {
            let conn = connect_and_migrate::<Migrator>(&db.config)
                .await
                .expect("connect");
            let postgres = conn.get_database_backend() == sea_orm::DbBackend::Postgres;
            let memberships = membership::Memberships::new(conn.clone(), WriteLock::default());
            let evaluated: Vec<(String, bool)> = (0..3).map(|i| (format!("p{i}"), true)).collect();
            assert_eq!(
                memberships
                    .reconcile("s1", &evaluated, 1)
                    .await
                    .expect("reconcile"),
                (3, 0)
            );
            // Three entries and their three log rows count towards 10,000.
            let statistics = &memberships.statistics;
            assert!(!statistics.wrote(&conn, 9_993).await);
            assert_eq!(statistics.wrote(&conn, 1).await, postgres);
        }
    );
}
