//! The identity graph inside a write: find who the identifiers point at,
//! plan with the identity rules, then merge, attach and record conflicts.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use madtech_common::sql;

use super::changes::{self, ChangeRecord};
use super::entities::{conflict, identifier, merge, profile};
use super::{Profile, decode_traits, encode_traits, identifier_from_row};
use crate::error::ProfileError;
use crate::identity::Identifier;
use crate::resolution::{IdentityRules, KeptApart};
use crate::traits;

/// Who a call's identifiers resolved to: the person as they now are (merged
/// traits and region not yet written; the caller writes the row once).
#[derive(Debug, Clone)]
pub(super) struct Resolved {
    pub person: Profile,
    pub created: bool,
    /// Profiles merged into the person by this call.
    pub merged: Vec<String>,
    pub kept_apart: Vec<KeptApart>,
}

impl Resolved {
    pub fn profile_id(&self) -> &str {
        &self.person.id
    }
}

/// The profile each of `keys` points at: one statement whatever the
/// number of keys.
pub(super) async fn owners<C: ConnectionTrait>(
    db: &C,
    keys: impl IntoIterator<Item = String>,
) -> Result<BTreeMap<String, String>, ProfileError> {
    let keys: Vec<String> = keys.into_iter().collect();
    let owners: Vec<(String, String)> = sql::rows_where_in(
        db,
        &["\"key\"", "profile_id"],
        "identifiers",
        "\"key\"",
        &keys,
    )
    .await?;
    Ok(owners.into_iter().collect())
}

/// Resolves `identifiers` to one person, creating or merging as the rules
/// allow. Publishes merges and creations on the change log; the caller
/// publishes the person's final state.
pub(super) async fn resolve(
    txn: &DatabaseTransaction,
    rules: &IdentityRules,
    identifiers: &BTreeSet<Identifier>,
    now: DateTime<Utc>,
) -> Result<Resolved, ProfileError> {
    let now_micros = now.timestamp_micros();
    let by_key = owners(txn, identifiers.iter().map(Identifier::key)).await?;
    let owners: BTreeMap<Identifier, String> = identifiers
        .iter()
        .filter_map(|id| Some((id.clone(), by_key.get(&id.key())?.clone())))
        .collect();
    let owner_ids: BTreeSet<String> = owners.values().cloned().collect();
    let mut held: BTreeMap<String, Vec<Identifier>> = BTreeMap::new();
    for row in identifier::Entity::find()
        .filter(identifier::Column::ProfileId.is_in(owner_ids))
        .all(txn)
        .await?
    {
        held.entry(row.profile_id.clone())
            .or_default()
            .push(identifier_from_row(&row));
    }

    let plan = rules.plan(identifiers, &owners, &held);
    if plan.profiles.is_empty() && plan.attach.is_empty() {
        return Err(ProfileError::Precondition(
            "every identifier is blocked by the identity rules".into(),
        ));
    }

    let mut matched = profile::Entity::find()
        .filter(profile::Column::Id.is_in(plan.profiles.iter().cloned()))
        .order_by_asc(profile::Column::CreatedAt)
        .order_by_asc(profile::Column::Id)
        .all(txn)
        .await?;
    let created = matched.is_empty();
    let survivor = if created {
        let row = profile::Model {
            id: uuid::Uuid::now_v7().to_string(),
            region: String::new(),
            traits: "{}".into(),
            merged_into: None,
            created_at: now_micros,
            updated_at: now_micros,
        };
        profile::Entity::insert(profile::ActiveModel::from(row.clone()))
            .exec(txn)
            .await?;
        row
    } else {
        matched.remove(0)
    };

    let mut traits = decode_traits(&survivor.traits)?;
    let mut region = survivor.region.clone();
    let mut merged = Vec::with_capacity(matched.len());
    for other in &matched {
        traits::merge(&mut traits, decode_traits(&other.traits)?);
        if region.is_empty() {
            region.clone_from(&other.region);
        }
        absorb(txn, &survivor.id, other, &plan.linked_by, now_micros).await?;
        merged.push(other.id.clone());
    }
    if !merged.is_empty() {
        let record = ChangeRecord::Merged {
            survivor: survivor.id.clone(),
            merged: merged.clone(),
        };
        changes::append(txn, &survivor.id, &record, now_micros).await?;
    }

    if !plan.attach.is_empty() {
        super::suppression::refuse_suppressed(txn, plan.attach.iter()).await?;
        let rows = plan.attach.iter().map(|id| {
            identifier::ActiveModel::from(identifier::Model {
                key: id.key(),
                kind: id.kind.as_str().to_string(),
                value: id.value.clone(),
                profile_id: survivor.id.clone(),
                created_at: now_micros,
            })
        });
        identifier::Entity::insert_many(rows).exec(txn).await?;
    }

    if !plan.kept_apart.is_empty() {
        let rows = plan.kept_apart.iter().map(|kept| conflict::ActiveModel {
            id: sea_orm::NotSet,
            profile_id: Set(survivor.id.clone()),
            identifier: Set(kept.identifier.key()),
            owner_id: Set(kept.owner.clone()),
            rule: Set(kept.rule.clone()),
            at: Set(now_micros),
        });
        conflict::Entity::insert_many(rows).exec(txn).await?;
    }

    // Everyone merged into the person, before and now; the merged-away ids
    // themselves were re-pointed by `absorb`.
    let merged_ids = if created {
        Vec::new()
    } else {
        profile::Entity::find()
            .select_only()
            .column(profile::Column::Id)
            .filter(profile::Column::MergedInto.eq(survivor.id.clone()))
            .order_by_asc(profile::Column::Id)
            .into_tuple()
            .all(txn)
            .await?
    };
    let identifiers = plan
        .profiles
        .iter()
        .filter_map(|id| held.get(id))
        .flatten()
        .cloned()
        .chain(plan.attach.iter().cloned())
        .collect();
    Ok(Resolved {
        person: Profile {
            id: survivor.id,
            identifiers,
            traits,
            region,
            merged_ids,
            created_at_micros: survivor.created_at,
            updated_at_micros: now_micros,
        },
        created,
        merged,
        kept_apart: plan.kept_apart,
    })
}

/// Writes the person's traits, region and update time.
pub(super) async fn save(txn: &DatabaseTransaction, person: &Profile) -> Result<(), ProfileError> {
    profile::Entity::update(profile::ActiveModel {
        id: Set(person.id.clone()),
        region: Set(person.region.clone()),
        traits: Set(encode_traits(&person.traits)?),
        updated_at: Set(person.updated_at_micros),
        ..Default::default()
    })
    .exec(txn)
    .await?;
    Ok(())
}

/// Moves `other`'s identifiers to `survivor` and records the merge.
/// Events stay filed under the id they were recorded for (rewriting them
/// would cost a seek per index block, see `events::EVENTS_PER_BLOCK`);
/// whoever reads them resolves merged ids to the survivor.
async fn absorb(
    txn: &DatabaseTransaction,
    survivor: &str,
    other: &profile::Model,
    linked_by: &BTreeMap<String, Identifier>,
    now: i64,
) -> Result<(), ProfileError> {
    identifier::Entity::update_many()
        .col_expr(identifier::Column::ProfileId, Expr::value(survivor))
        .filter(identifier::Column::ProfileId.eq(other.id.clone()))
        .exec(txn)
        .await?;
    // Everything merged into `other` earlier now points at the survivor
    // directly: chains stay one hop long.
    profile::Entity::update_many()
        .col_expr(profile::Column::MergedInto, Expr::value(survivor))
        .filter(profile::Column::MergedInto.eq(other.id.clone()))
        .exec(txn)
        .await?;
    profile::Entity::update_many()
        .col_expr(profile::Column::MergedInto, Expr::value(survivor))
        .col_expr(profile::Column::Traits, Expr::value("{}"))
        .col_expr(profile::Column::UpdatedAt, Expr::value(now))
        .filter(profile::Column::Id.eq(other.id.clone()))
        .exec(txn)
        .await?;
    let linked_by = linked_by
        .get(&other.id)
        .map(Identifier::key)
        .unwrap_or_default();
    merge::Entity::insert(merge::ActiveModel {
        id: sea_orm::NotSet,
        survivor_id: Set(survivor.to_string()),
        merged_id: Set(other.id.clone()),
        linked_by: Set(linked_by),
        merged_at: Set(now),
    })
    .exec(txn)
    .await?;
    Ok(())
}
