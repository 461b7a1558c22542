//! Identifiers of people erased at their request (GDPR Art. 17) with
//! suppression asked for: kept only as digests, so that the next import
//! cannot bring the person back. A suppressed identifier is refused
//! wherever it would be attached to a person, until it is lifted because
//! the person came back with new consent.

use std::collections::BTreeSet;

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};

use super::entities::suppressed;
use crate::error::ProfileError;
use crate::identity::Identifier;

fn digest(kind: &str, value: &str) -> String {
    madtech_common::digest::identifier(kind, value)
}

/// Suppresses these `(kind, normalised value)` identifiers.
pub(super) async fn add<'a, C: ConnectionTrait>(
    db: &C,
    identifiers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), ProfileError> {
    let now = Utc::now().timestamp_micros();
    let rows: Vec<suppressed::ActiveModel> = identifiers
        .map(|(kind, value)| suppressed::ActiveModel {
            digest: Set(digest(kind, value)),
            kind: Set(kind.to_string()),
            created_at: Set(now),
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    suppressed::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(suppressed::Column::Digest)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Refuses identifiers that are suppressed, naming the kind (never the
/// value) of the first.
pub(super) async fn refuse_suppressed<'a, C: ConnectionTrait>(
    db: &C,
    identifiers: impl Iterator<Item = &'a Identifier>,
) -> Result<(), ProfileError> {
    let digests: BTreeSet<(String, &str)> = identifiers
        .map(|id| (digest(id.kind.as_str(), &id.value), id.kind.as_str()))
        .collect();
    if digests.is_empty() {
        return Ok(());
    }
    let found = suppressed::Entity::find()
        .filter(suppressed::Column::Digest.is_in(digests.iter().map(|(d, _)| d.clone())))
        .one(db)
        .await?;
    match found {
        None => Ok(()),
        Some(row) => Err(ProfileError::Precondition(format!(
            "an identifier of kind {} belongs to a person erased at their request; it stays suppressed until they give new consent",
            row.kind
        ))),
    }
}

/// Lifts the suppression of one identifier; whether there was one.
pub(super) async fn lift<C: ConnectionTrait>(
    db: &C,
    identifier: &Identifier,
) -> Result<bool, ProfileError> {
    let deleted = suppressed::Entity::delete_many()
        .filter(suppressed::Column::Digest.eq(digest(identifier.kind.as_str(), &identifier.value)))
        .exec(db)
        .await?
        .rows_affected;
    Ok(deleted > 0)
}
