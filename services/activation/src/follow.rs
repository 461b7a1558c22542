//! Removals the moment consent ends: follows the consent changes the gateway
//! releases to the adtech zone (`ConsentReleaseService/WatchConsentReleases`,
//! under each destination's pseudonymous ids) and removes a person from every
//! activation for that purpose on that destination as soon as their consent
//! is denied, without waiting for the next sync. The cursor is kept in the
//! activation database after each page is handled, so a restart resumes
//! where it stopped and a removal is never skipped (at worst repeated, which
//! finds nobody held).
//!
//! A destination that does not take a removal (down, refusing, its
//! credentials missing) holds up no other: the removal is recorded as owed,
//! the stream goes on, and owed removals are tried again, first at the next
//! `schedule_tick`, then less often after each failure (up to hourly),
//! until they go through, nobody is held under the id any more, or the
//! activation is gone. A grant that follows does not cancel an owed removal:
//! that grant may not be enough for the destination (its TCF vendor may
//! still be refused), and at worst the person is removed until the next
//! full sync adds them back.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;

use gateway_pb::consent_release_service_client::ConsentReleaseServiceClient;
use madtech_common::CancellationToken;
use madtech_common::changelog::{Backoff, keep_following};
use madtech_common::upstream::Upstream;
use madtech_proto::consent::v1::ConsentState;
use madtech_proto::gateway::v1 as gateway_pb;
use tokio::sync::Notify;

use crate::config::ActivationConfig;
use crate::error::ActivationError;
use crate::store::{ActivationStore, Trigger};
use crate::sync::Syncer;

/// The followed stream's name in the cursor table.
pub const CONSENT_RELEASES: &str = "consent_releases";
/// Owed removals tried in one pass at most.
const OWED_PER_PASS: u64 = 10_000;
/// The longest wait between attempts at an owed removal.
const OWED_LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Microseconds until the next attempt at removals that failed `attempts`
/// times before this one: the tick, doubled per failure, up to an hour.
fn owed_backoff(tick: std::time::Duration, attempts: i64) -> i64 {
    let doublings = u32::try_from(attempts.max(0)).unwrap_or(u32::MAX);
    let wait = madtech_common::changelog::doubling(tick, doublings, OWED_LONGEST_WAIT);
    i64::try_from(wait.as_micros()).unwrap_or(i64::MAX)
}

pub struct ConsentFollower {
    pub store: Arc<ActivationStore>,
    pub syncer: Arc<Syncer>,
    pub gateway: Upstream,
    pub config: ActivationConfig,
    /// Woken when an activation is created: its destination is followed too.
    pub activations_changed: Arc<Notify>,
}

impl ConsentFollower {
    /// Finishes runs a stopped process left, then follows releases until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Err(err) = self.syncer.recover_all().await {
            // The next run of each activation tries again.
            tracing::warn!(error = %err, "could not finish interrupted runs at start");
        }
        let follower = Arc::new(self);
        let retrying = tokio::spawn(Arc::clone(&follower).retry_owed(shutdown.clone()));
        keep_following("consent releases", shutdown, |backoff| {
            let follower = Arc::clone(&follower);
            async move { follower.follow_once(&backoff).await }
        })
        .await;
        let _ = retrying.await;
    }

    /// Tries owed removals again every tick until `shutdown`.
    async fn retry_owed(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.schedule_tick) => {}
            }
            // A pass may wait on a destination's retries: shutdown does
            // not wait for it (an interrupted removal run is finished at
            // the next start).
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.settle_owed(Utc::now().timestamp_micros()) => {
                    if let Err(err) = result {
                        tracing::warn!(error = %err, "could not read owed removals");
                    }
                }
            }
        }
    }

    /// One pass over the removals due by `now`. One activation's failure,
    /// even its database writes, does not stop the others'.
    pub async fn settle_owed(&self, now: i64) -> Result<(), ActivationError> {
        for owed in self.store.owed_removals(now, OWED_PER_PASS).await? {
            let ids = &owed.pseudonymous_ids;
            let outcome = match self
                .syncer
                .remove(&owed.activation_id, ids, Trigger::ConsentWithdrawal)
                .await
            {
                // Removed, or nobody is held any more (a full sync removed
                // them), or the activation is gone.
                Ok(_) | Err(ActivationError::NotFound(_)) => {
                    tracing::info!(activation = %owed.activation_id, people = ids.len(), "owed removals went through");
                    self.store
                        .settle_removals(&owed.activation_id, ids, now)
                        .await
                }
                Err(err) => {
                    tracing::warn!(activation = %owed.activation_id, attempts = owed.attempts + 1, error = %err, "owed removals still not taken");
                    let wait = owed_backoff(self.config.schedule_tick, owed.attempts);
                    self.store
                        .defer_removals(&owed.activation_id, ids, now, now.saturating_add(wait))
                        .await
                }
            };
            if let Err(err) = outcome {
                tracing::warn!(activation = %owed.activation_id, error = %err, "could not record how owed removals went");
            }
        }
        Ok(())
    }

    async fn follow_once(&self, backoff: &Backoff) -> Result<(), ActivationError> {
        let destination_ids = self.store.activated_destinations().await?;
        if destination_ids.is_empty() {
            // Nothing delivered anywhere yet: nothing to remove.
            self.activations_changed.notified().await;
            return Ok(());
        }
        let after_cursor = self.store.cursor(CONSENT_RELEASES).await?;
        let mut client = ConsentReleaseServiceClient::with_interceptor(
            self.gateway.clone(),
            crate::bearer_interceptor(&self.config).await?,
        );
        let mut stream = client
            .watch_consent_releases(gateway_pb::WatchConsentReleasesRequest {
                destination_ids,
                after_cursor,
            })
            .await
            .map_err(ActivationError::gateway)?
            .into_inner();
        loop {
            let page = tokio::select! {
                page = stream.message() => page.map_err(ActivationError::gateway)?,
                // A new activation may name a destination not yet followed:
                // start again with the new list, from the same cursor.
                () = self.activations_changed.notified() => return Ok(()),
            };
            let Some(page) = page else { return Ok(()) };
            self.handle(page.releases).await?;
            self.store
                .save_cursor(CONSENT_RELEASES, page.cursor)
                .await?;
            backoff.reset();
        }
    }

    /// Removes everyone whose consent for an activation's purpose was
    /// denied, per activation in one removal run; a removal a destination
    /// does not take is owed (see the module's comment).
    async fn handle(
        &self,
        releases: Vec<gateway_pb::ConsentRelease>,
    ) -> Result<(), ActivationError> {
        // By (destination, purpose): whom the page leaves denied, by each
        // person's latest state in it.
        let mut latest: BTreeMap<(String, String), BTreeMap<String, bool>> = BTreeMap::new();
        for release in releases {
            let denied = release.state() == ConsentState::Denied;
            latest
                .entry((release.destination_id, release.purpose))
                .or_default()
                .insert(release.pseudonymous_id, denied);
        }
        for ((destination_id, purpose), people) in latest {
            let denied: Vec<String> = people
                .into_iter()
                .filter_map(|(id, denied)| denied.then_some(id))
                .collect();
            if denied.is_empty() {
                continue;
            }
            for activation in self.store.activations_on(&destination_id, &purpose).await? {
                match self
                    .syncer
                    .remove(&activation.id, &denied, Trigger::ConsentWithdrawal)
                    .await
                {
                    Ok(Some(run)) => {
                        tracing::info!(activation = %activation.id, run = %run.id, removed = run.removed, "removed after consent was withdrawn");
                    }
                    Ok(None) => {}
                    // The store itself failing holds up every destination:
                    // the page is handled again.
                    Err(err @ ActivationError::Database(_)) => return Err(err),
                    Err(err) => {
                        tracing::warn!(activation = %activation.id, error = %err, "a removal after consent was withdrawn did not go through; owed");
                        self.store
                            .owe_removals(&activation.id, &denied, Utc::now().timestamp_micros())
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn owed_removals_are_tried_less_often_after_each_failure_up_to_hourly() {
        let tick = Duration::from_secs(10);
        let waits: Vec<i64> = (0..12)
            .map(|attempts| owed_backoff(tick, attempts))
            .collect();
        assert_eq!(waits[0], 10_000_000);
        assert_eq!(waits[1], 20_000_000);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(waits[11], 3_600_000_000);
        assert_eq!(owed_backoff(tick, -1), 10_000_000);
        assert_eq!(owed_backoff(tick, i64::MAX), 3_600_000_000);
    }
}
