//! Privacy requests and suppressions, in the consent service's database.
//! A request's steps, what it found and what it exported are JSON columns:
//! they are read and written whole, one request at a time.

use std::collections::BTreeMap;

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::{Found, Kind, PrivacyRequest, Status, Step};
use crate::error::ConsentError;
use madtech_common::error::json_error;

pub mod request {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "privacy_requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub kind: String,
        pub status: String,
        pub subject_kind: String,
        /// The raw identifier, until the request completes.
        pub subject_value: Option<String>,
        pub subject_digest: String,
        pub region: String,
        pub regime: String,
        pub submitted_at: i64,
        pub deadline_at: i64,
        pub completed_at: Option<i64>,
        pub next_attempt_at: i64,
        #[sea_orm(column_type = "Text")]
        pub steps: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub found: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub export: String,
        #[sea_orm(column_type = "Text")]
        pub remaining: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod suppression {
    use sea_orm::entity::prelude::*;

    /// An erased person's identifier, hashed: an import that would bring
    /// them back can be recognised without keeping who they were.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "suppressions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub identifier_digest: String,
        pub kind: String,
        pub request_id: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub struct RequestStore {
    db: DatabaseConnection,
}

fn status_str(status: Status) -> &'static str {
    match status {
        Status::Open => "open",
        Status::Completed => "completed",
    }
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> ConsentError {
    ConsentError::Corrupt(format!("privacy request {what}: {err}"))
}

fn to_json<T: serde::Serialize>(what: &str, value: &T) -> Result<String, ConsentError> {
    serde_json::to_string(value).map_err(|err| corrupt(what, err))
}

fn from_row(row: request::Model) -> Result<PrivacyRequest, ConsentError> {
    let steps: Vec<Step> =
        serde_json::from_str(&row.steps).map_err(|err| corrupt("steps", json_error(&err)))?;
    let found: Option<Found> = row
        .found
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|err| corrupt("found", json_error(&err)))?;
    let remaining: BTreeMap<String, u64> = serde_json::from_str(&row.remaining)
        .map_err(|err| corrupt("remaining", json_error(&err)))?;
    let export =
        serde_json::from_str(&row.export).map_err(|err| corrupt("export", json_error(&err)))?;
    Ok(PrivacyRequest {
        kind: Kind::parse(&row.kind).ok_or_else(|| corrupt("kind", &row.kind))?,
        status: match row.status.as_str() {
            "open" => Status::Open,
            "completed" => Status::Completed,
            other => return Err(corrupt("status", other)),
        },
        id: row.request_id,
        subject_kind: row.subject_kind,
        subject_value: row.subject_value,
        subject_digest: row.subject_digest,
        region: row.region,
        regime: row.regime,
        submitted_at_micros: row.submitted_at,
        deadline_micros: row.deadline_at,
        completed_at_micros: row.completed_at,
        next_attempt_micros: row.next_attempt_at,
        steps,
        found,
        export,
        remaining,
    })
}

fn to_row(request: &PrivacyRequest) -> Result<request::ActiveModel, ConsentError> {
    Ok(request::ActiveModel {
        request_id: Set(request.id.clone()),
        kind: Set(request.kind.as_str().to_string()),
        status: Set(status_str(request.status).to_string()),
        subject_kind: Set(request.subject_kind.clone()),
        subject_value: Set(request.subject_value.clone()),
        subject_digest: Set(request.subject_digest.clone()),
        region: Set(request.region.clone()),
        regime: Set(request.regime.clone()),
        submitted_at: Set(request.submitted_at_micros),
        deadline_at: Set(request.deadline_micros),
        completed_at: Set(request.completed_at_micros),
        next_attempt_at: Set(request.next_attempt_micros),
        steps: Set(to_json("steps", &request.steps)?),
        found: Set(request
            .found
            .as_ref()
            .map(|found| to_json("found", found))
            .transpose()?),
        export: Set(to_json("export", &request.export)?),
        remaining: Set(to_json("remaining", &request.remaining)?),
    })
}

impl RequestStore {
    pub fn new(db: DatabaseConnection) -> Self {
        RequestStore { db }
    }

    /// Stores `request` unless its id is taken; returns the stored request
    /// and whether it is the new one.
    pub async fn insert(
        &self,
        request: &PrivacyRequest,
    ) -> Result<(PrivacyRequest, bool), ConsentError> {
        let inserted = request::Entity::insert(to_row(request)?)
            .on_conflict(
                OnConflict::column(request::Column::RequestId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        let stored = self
            .get(&request.id)
            .await?
            .ok_or_else(|| corrupt("insert", "vanished"))?;
        Ok((stored, inserted == 1))
    }

    /// Saves a request the caller still holds: it is open and its next
    /// attempt is still `held`, the lease the caller claimed or last saved.
    /// False, and nothing written, when it is not: another replica claimed
    /// it after the lease ran out, or it completed, and an older copy must
    /// not overwrite that (nor write back a completed request's subject).
    pub async fn save(&self, request: &PrivacyRequest, held: i64) -> Result<bool, ConsentError> {
        let saved = request::Entity::update_many()
            .set(to_row(request)?)
            .filter(request::Column::RequestId.eq(request.id.clone()))
            .filter(request::Column::Status.eq(status_str(Status::Open)))
            .filter(request::Column::NextAttemptAt.eq(held))
            .exec(&self.db)
            .await?
            .rows_affected;
        Ok(saved == 1)
    }

    pub async fn get(&self, id: &str) -> Result<Option<PrivacyRequest>, ConsentError> {
        request::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await?
            .map(from_row)
            .transpose()
    }

    /// Requests in id order after `after`, optionally in one status.
    pub async fn list(
        &self,
        after: &str,
        status: Option<Status>,
        limit: u64,
    ) -> Result<Vec<PrivacyRequest>, ConsentError> {
        let mut query = request::Entity::find()
            .filter(request::Column::RequestId.gt(after))
            .order_by_asc(request::Column::RequestId)
            .limit(limit);
        if let Some(status) = status {
            query = query.filter(request::Column::Status.eq(status_str(status)));
        }
        query
            .all(&self.db)
            .await?
            .into_iter()
            .map(from_row)
            .collect()
    }

    /// Open requests whose next attempt is due, oldest first.
    pub async fn due(&self, now: i64, limit: u64) -> Result<Vec<PrivacyRequest>, ConsentError> {
        request::Entity::find()
            .filter(request::Column::Status.eq(status_str(Status::Open)))
            .filter(request::Column::NextAttemptAt.lte(now))
            .order_by_asc(request::Column::SubmittedAt)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(from_row)
            .collect()
    }

    /// Claims a due request for `lease_micros`, so that of several consent
    /// replicas only one works on it at a time; false when another replica
    /// claimed it first (or it is not due).
    pub async fn claim(
        &self,
        request: &PrivacyRequest,
        now: i64,
        lease_micros: i64,
    ) -> Result<bool, ConsentError> {
        let claimed = request::Entity::update_many()
            .col_expr(
                request::Column::NextAttemptAt,
                sea_orm::sea_query::Expr::value(now.saturating_add(lease_micros)),
            )
            .filter(request::Column::RequestId.eq(request.id.clone()))
            .filter(request::Column::Status.eq(status_str(Status::Open)))
            .filter(request::Column::NextAttemptAt.eq(request.next_attempt_micros))
            .exec(&self.db)
            .await?
            .rows_affected;
        Ok(claimed == 1)
    }

    /// Records the erased person's identifiers, hashed like a request's
    /// subject.
    pub async fn suppress(
        &self,
        request_id: &str,
        identifiers: &[(String, String)],
        now: i64,
    ) -> Result<(), ConsentError> {
        for (kind, value) in identifiers {
            suppression::Entity::insert(suppression::ActiveModel {
                identifier_digest: Set(madtech_common::digest::identifier(kind, value)),
                kind: Set(kind.clone()),
                request_id: Set(request_id.to_string()),
                created_at: Set(now),
            })
            .on_conflict(
                OnConflict::column(suppression::Column::IdentifierDigest)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await?;
        }
        Ok(())
    }

    /// Whether this identifier belongs to someone erased.
    pub async fn is_suppressed(&self, kind: &str, value: &str) -> Result<bool, ConsentError> {
        Ok(
            suppression::Entity::find_by_id(madtech_common::digest::identifier(kind, value))
                .one(&self.db)
                .await?
                .is_some(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Migrator;
    use madtech_common::db::connect_and_migrate;
    use madtech_common::testing::TestDatabase;

    async fn store(db: &TestDatabase) -> RequestStore {
        RequestStore::new(
            connect_and_migrate::<Migrator>(&db.config)
                .await
                .expect("connect"),
        )
    }

    fn request(id: &str, now: i64) -> PrivacyRequest {
        PrivacyRequest::new(
            id.into(),
            Kind::Erasure,
            ("email".into(), "ann@example.com".into()),
            "FR".into(),
            ("GDPR".into(), now + 1_000),
            now,
        )
    }

    madtech_common::backend_tests!(
        requests_are_stored_once_and_come_due_until_completed,
        |db: TestDatabase| async move {
            let store = store(&db).await;
            let (first, created) = store.insert(&request("r1", 10)).await.expect("insert");
            assert!(created);
            let (again, created) = store.insert(&request("r1", 99)).await.expect("again");
            assert!(!created, "an id is stored once");
            assert_eq!(again, first, "the first submission stands");

            assert_eq!(store.due(10, 10).await.expect("due").len(), 1);
            let mut progressed = first.clone();
            progressed.next_attempt_micros = 50;
            progressed.steps[0].done = true;
            progressed.found = Some(Found {
                profile_ids: vec!["p1".into()],
                identifiers: vec![("email".into(), "ann@example.com".into())],
            });
            progressed
                .export
                .insert("profile".into(), serde_json::json!({"a": 1}));
            assert!(
                store
                    .save(&progressed, first.next_attempt_micros)
                    .await
                    .expect("save")
            );
            assert!(
                store.due(49, 10).await.expect("due").is_empty(),
                "backing off"
            );
            assert_eq!(
                store.get("r1").await.expect("get"),
                Some(progressed.clone())
            );

            for step in &mut progressed.steps {
                step.done = true;
            }
            progressed.complete_if_done(60);
            assert!(store.save(&progressed, 50).await.expect("save"));
            assert!(store.due(i64::MAX, 10).await.expect("due").is_empty());
            let completed = store
                .list("", Some(Status::Completed), 10)
                .await
                .expect("list");
            assert_eq!(completed.len(), 1);
            assert_eq!(completed[0].subject_value, None, "the raw subject is gone");
            assert!(store.get("nope").await.expect("get").is_none());
        }
    );

    madtech_common::backend_tests!(
        only_one_replica_claims_a_due_request,
        |db: TestDatabase| async move {
            let store = store(&db).await;
            let (stored, _) = store.insert(&request("r1", 10)).await.expect("insert");
            // Two replicas read the same due request; one wins the claim.
            assert!(store.claim(&stored, 20, 1_000).await.expect("claim"));
            assert!(!store.claim(&stored, 20, 1_000).await.expect("claim"));
            assert!(store.due(500, 10).await.expect("due").is_empty(), "leased");
            assert_eq!(
                store.due(1_020, 10).await.expect("due").len(),
                1,
                "lease over"
            );
            // The first replica was slow: its lease ran out and a second
            // replica claimed the request. While the second one works on
            // it, the first one's copy is stale and is not saved.
            let mut slow = stored.clone();
            slow.next_attempt_micros = 1_020;
            assert!(store.claim(&slow, 1_030, 1_000).await.expect("claim"));
            let mut stale = stored.clone();
            stale.steps[0].done = true;
            assert!(
                !store.save(&stale, 1_020).await.expect("save"),
                "a lease that ran out saves nothing"
            );
            let held = store.get("r1").await.expect("get").expect("request");
            assert!(!held.steps[0].done, "the second replica's copy stands");
            assert_eq!(held.next_attempt_micros, 2_030);
            // The second one completes it; a stale copy saved after that
            // writes nothing back either.
            let mut finished = held.clone();
            for step in &mut finished.steps {
                step.done = true;
            }
            finished.complete_if_done(1_040);
            assert!(store.save(&finished, 2_030).await.expect("save"));
            assert!(!store.save(&stale, 2_030).await.expect("save"));
            let kept = store.get("r1").await.expect("get").expect("request");
            assert_eq!(kept.status, Status::Completed);
            assert_eq!(kept.subject_value, None, "the subject stays gone");
        }
    );

    madtech_common::backend_tests!(
        suppressions_keep_only_hashes,
        |db: TestDatabase| async move {
            let store = store(&db).await;
            let ids = [("email".to_string(), "ann@example.com".to_string())];
            store.suppress("r1", &ids, 5).await.expect("suppress");
            store.suppress("r2", &ids, 6).await.expect("twice is fine");
            assert!(
                store
                    .is_suppressed("email", "ann@example.com")
                    .await
                    .expect("check")
            );
            assert!(
                !store
                    .is_suppressed("email", "bob@example.com")
                    .await
                    .expect("check")
            );
        }
    );
}
