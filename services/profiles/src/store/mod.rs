//! Persistence of profiles and the identity graph. One writer at a time per
//! process (SQLite allows no more, and it keeps merges simple); on
//! PostgreSQL the unique index on identifiers catches races between replicas.

mod entities;
mod migration;

use std::collections::BTreeSet;

use chrono::Utc;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, TransactionTrait,
};
use tokio::sync::Mutex;

pub use migration::Migrator;

use crate::error::ProfileError;
use crate::identity::{Identifier, IdentifierKind};
use crate::traits::Traits;
use entities::{identifier, profile};

/// A profile as the domain sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub id: String,
    pub identifiers: BTreeSet<Identifier>,
    pub traits: Traits,
    /// ISO 3166 code; empty when unknown.
    pub region: String,
    /// Profiles merged into this one (directly or through earlier merges).
    pub merged_ids: Vec<String>,
    pub created_at_micros: i64,
    pub updated_at_micros: i64,
}

/// What an upsert asks for, already validated and normalised.
#[derive(Debug, Clone)]
pub struct Upsert {
    pub identifiers: BTreeSet<Identifier>,
    pub traits: Traits,
    /// Empty keeps the current region.
    pub region: String,
}

/// What an upsert did.
#[derive(Debug, Clone)]
pub struct Upserted {
    pub profile: Profile,
    pub created: bool,
    pub merged: Vec<String>,
}

/// How many times an upsert that lost a race is retried.
const UPSERT_ATTEMPTS: usize = 3;

/// The longest chain of merged-away ids followed on a read.
const MAX_MERGE_HOPS: usize = 32;

pub struct ProfileStore {
    db: DatabaseConnection,
    writer: Mutex<()>,
}

impl ProfileStore {
    pub fn new(db: DatabaseConnection) -> Self {
        ProfileStore {
            db,
            writer: Mutex::new(()),
        }
    }

    /// Creates the profile the identifiers describe, or updates the one they
    /// point at; several matching profiles merge into the oldest.
    pub async fn upsert(&self, request: Upsert) -> Result<Upserted, ProfileError> {
        let _writer = self.writer.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_upsert(&request).await {
                Err(ProfileError::Database(err))
                    if madtech_common::db::is_unique_violation(&err) =>
                {
                    if attempt >= UPSERT_ATTEMPTS {
                        return Err(ProfileError::Conflict);
                    }
                }
                result => return result,
            }
        }
    }

    async fn try_upsert(&self, request: &Upsert) -> Result<Upserted, ProfileError> {
        let txn = self.db.begin().await?;
        let now = Utc::now().timestamp_micros();

        let keys: Vec<String> = request.identifiers.iter().map(identifier_key).collect();
        let owners: BTreeSet<String> = identifier::Entity::find()
            .filter(identifier::Column::Key.is_in(keys))
            .all(&txn)
            .await?
            .into_iter()
            .map(|row| row.profile_id)
            .collect();

        let mut matched = profile::Entity::find()
            .filter(profile::Column::Id.is_in(owners))
            .order_by_asc(profile::Column::CreatedAt)
            .order_by_asc(profile::Column::Id)
            .all(&txn)
            .await?;

        let created = matched.is_empty();
        let (survivor, absorbed) = if created {
            let row = profile::Model {
                id: uuid::Uuid::now_v7().to_string(),
                region: String::new(),
                traits: "{}".into(),
                merged_into: None,
                created_at: now,
                updated_at: now,
            };
            profile::Entity::insert(profile::ActiveModel::from(row.clone()))
                .exec(&txn)
                .await?;
            (row, Vec::new())
        } else {
            let survivor = matched.remove(0);
            (survivor, matched)
        };

        // Merge: the survivor keeps its own values where both have one.
        let mut traits = decode_traits(&survivor.traits)?;
        let mut region = survivor.region.clone();
        let mut merged = Vec::with_capacity(absorbed.len());
        for other in &absorbed {
            for (name, value) in decode_traits(&other.traits)? {
                traits.entry(name).or_insert(value);
            }
            if region.is_empty() {
                region.clone_from(&other.region);
            }
            identifier::Entity::update_many()
                .col_expr(
                    identifier::Column::ProfileId,
                    Expr::value(survivor.id.clone()),
                )
                .filter(identifier::Column::ProfileId.eq(other.id.clone()))
                .exec(&txn)
                .await?;
            // Everything merged into `other` earlier now points at the
            // survivor directly: chains stay one hop long.
            profile::Entity::update_many()
                .col_expr(
                    profile::Column::MergedInto,
                    Expr::value(survivor.id.clone()),
                )
                .filter(profile::Column::MergedInto.eq(other.id.clone()))
                .exec(&txn)
                .await?;
            profile::Entity::update_many()
                .col_expr(
                    profile::Column::MergedInto,
                    Expr::value(survivor.id.clone()),
                )
                .col_expr(profile::Column::Traits, Expr::value("{}"))
                .col_expr(profile::Column::UpdatedAt, Expr::value(now))
                .filter(profile::Column::Id.eq(other.id.clone()))
                .exec(&txn)
                .await?;
            merged.push(other.id.clone());
        }

        let known: BTreeSet<String> = identifier::Entity::find()
            .filter(identifier::Column::ProfileId.eq(survivor.id.clone()))
            .all(&txn)
            .await?
            .into_iter()
            .map(|row| row.key)
            .collect();
        let new_rows: Vec<identifier::ActiveModel> = request
            .identifiers
            .iter()
            .filter(|id| !known.contains(&identifier_key(id)))
            .map(|id| {
                identifier::ActiveModel::from(identifier::Model {
                    key: identifier_key(id),
                    kind: id.kind.as_str().to_string(),
                    value: id.value.clone(),
                    profile_id: survivor.id.clone(),
                    created_at: now,
                })
            })
            .collect();
        if !new_rows.is_empty() {
            identifier::Entity::insert_many(new_rows).exec(&txn).await?;
        }

        traits.extend(request.traits.clone());
        if !request.region.is_empty() {
            region.clone_from(&request.region);
        }
        profile::Entity::update(profile::ActiveModel {
            id: Set(survivor.id.clone()),
            region: Set(region),
            traits: Set(encode_traits(&traits)?),
            updated_at: Set(now),
            ..Default::default()
        })
        .exec(&txn)
        .await?;

        let profile = load_live(&txn, &survivor.id).await?;
        txn.commit().await?;
        Ok(Upserted {
            profile,
            created,
            merged,
        })
    }

    /// The live profile behind `id`, following merges.
    pub async fn get(&self, id: &str) -> Result<Profile, ProfileError> {
        let mut current = id.to_string();
        for _ in 0..MAX_MERGE_HOPS {
            let row = profile::Entity::find_by_id(current.clone())
                .one(&self.db)
                .await?
                .ok_or(ProfileError::NotFound)?;
            match row.merged_into {
                Some(next) => current = next,
                None => return to_profile(&self.db, row).await,
            }
        }
        Err(ProfileError::Corrupt(format!(
            "merge chain from {id} is too long"
        )))
    }

    /// The live profile an identifier points at.
    pub async fn find_by_identifier(&self, id: &Identifier) -> Result<Profile, ProfileError> {
        let row = identifier::Entity::find_by_id(identifier_key(id))
            .one(&self.db)
            .await?
            .ok_or(ProfileError::NotFound)?;
        self.get(&row.profile_id).await
    }

    /// Up to `limit` live profiles with ids after `after`, in id order.
    pub async fn list_page(&self, after: &str, limit: u64) -> Result<Vec<Profile>, ProfileError> {
        let rows = profile::Entity::find()
            .filter(profile::Column::MergedInto.is_null())
            .filter(profile::Column::Id.gt(after))
            .order_by_asc(profile::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        let ids: Vec<String> = rows.iter().map(|row| row.id.clone()).collect();
        let mut identifiers = identifier::Entity::find()
            .filter(identifier::Column::ProfileId.is_in(ids.clone()))
            .all(&self.db)
            .await?;
        identifiers.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
        let merged = merged_into(&self.db, &ids).await?;
        rows.into_iter()
            .map(|row| {
                let start = identifiers.partition_point(|i| i.profile_id < row.id);
                let end = identifiers.partition_point(|i| i.profile_id <= row.id);
                let m_start = merged.partition_point(|(_, into)| *into < row.id);
                let m_end = merged.partition_point(|(_, into)| *into <= row.id);
                assemble(row, &identifiers[start..end], &merged[m_start..m_end])
            })
            .collect()
    }
}

/// The primary key of an identifier: kind and value are unique together.
fn identifier_key(id: &Identifier) -> String {
    format!("{}:{}", id.kind.as_str(), id.value)
}

async fn load_live<C: ConnectionTrait>(db: &C, id: &str) -> Result<Profile, ProfileError> {
    let row = profile::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(ProfileError::NotFound)?;
    to_profile(db, row).await
}

async fn to_profile<C: ConnectionTrait>(
    db: &C,
    row: profile::Model,
) -> Result<Profile, ProfileError> {
    let identifiers = identifier::Entity::find()
        .filter(identifier::Column::ProfileId.eq(row.id.clone()))
        .all(db)
        .await?;
    let merged = merged_into(db, std::slice::from_ref(&row.id)).await?;
    assemble(row, &identifiers, &merged)
}

/// `(merged id, survivor id)` for every profile merged into one of `ids`,
/// sorted by survivor.
async fn merged_into<C: ConnectionTrait>(
    db: &C,
    ids: &[String],
) -> Result<Vec<(String, String)>, ProfileError> {
    let mut merged: Vec<(String, String)> = profile::Entity::find()
        .filter(profile::Column::MergedInto.is_in(ids.iter().cloned()))
        .all(db)
        .await?
        .into_iter()
        .filter_map(|row| Some((row.id, row.merged_into?)))
        .collect();
    merged.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(merged)
}

fn assemble(
    row: profile::Model,
    identifiers: &[identifier::Model],
    merged: &[(String, String)],
) -> Result<Profile, ProfileError> {
    let identifiers = identifiers
        .iter()
        .map(|i| {
            let kind: IdentifierKind = i.kind.parse().map_err(|()| {
                ProfileError::Corrupt(format!("unknown identifier kind {}", i.kind))
            })?;
            Ok(Identifier {
                kind,
                value: i.value.clone(),
            })
        })
        .collect::<Result<_, ProfileError>>()?;
    Ok(Profile {
        traits: decode_traits(&row.traits)?,
        id: row.id,
        identifiers,
        region: row.region,
        merged_ids: merged.iter().map(|(id, _)| id.clone()).collect(),
        created_at_micros: row.created_at,
        updated_at_micros: row.updated_at,
    })
}

fn decode_traits(json: &str) -> Result<Traits, ProfileError> {
    serde_json::from_str(json).map_err(|err| ProfileError::Corrupt(format!("traits: {err}")))
}

fn encode_traits(traits: &Traits) -> Result<String, ProfileError> {
    serde_json::to_string(traits).map_err(|err| ProfileError::Corrupt(format!("traits: {err}")))
}

#[cfg(test)]
mod tests;
