//! Where an activation's last successful sync left its audience, so the
//! next sync can apply only what changed since.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, EntityTrait};

use super::entities::sync_baseline;
use super::{ActivationStore, count};
use crate::error::ActivationError;

/// The audience as the destination was last brought up to date with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    /// The segment's membership cursor every change up to which is applied.
    pub membership_cursor: u64,
    /// The policy version of the last full sync: the crossing's decisions
    /// on people whose membership did not change were made under it.
    pub policy_version: String,
    pub full_sync_at_micros: i64,
}

impl ActivationStore {
    pub async fn baseline(&self, activation_id: &str) -> Result<Option<Baseline>, ActivationError> {
        Ok(sync_baseline::Entity::find_by_id(activation_id.to_string())
            .one(&self.db)
            .await?
            .map(|row| Baseline {
                membership_cursor: u64::try_from(row.membership_cursor).unwrap_or(0),
                policy_version: row.policy_version,
                full_sync_at_micros: row.full_sync_at,
            }))
    }

    pub async fn save_baseline(
        &self,
        activation_id: &str,
        baseline: &Baseline,
    ) -> Result<(), ActivationError> {
        let row = sync_baseline::ActiveModel {
            activation_id: Set(activation_id.to_string()),
            membership_cursor: Set(count(baseline.membership_cursor)),
            policy_version: Set(baseline.policy_version.clone()),
            full_sync_at: Set(baseline.full_sync_at_micros),
        };
        sync_baseline::Entity::insert(row)
            .on_conflict(
                OnConflict::column(sync_baseline::Column::ActivationId)
                    .update_columns([
                        sync_baseline::Column::MembershipCursor,
                        sync_baseline::Column::PolicyVersion,
                        sync_baseline::Column::FullSyncAt,
                    ])
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }
}
