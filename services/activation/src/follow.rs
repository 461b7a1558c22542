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
//! the stream goes on, and owed removals are tried again every
//! `schedule_tick` until they go through, or until the person's consent
//! returns or the activation is gone.

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
            if let Err(err) = self.settle_owed().await {
                tracing::warn!(error = %err, "could not try owed removals again");
            }
        }
    }

    /// One pass over the owed removals.
    pub async fn settle_owed(&self) -> Result<(), ActivationError> {
        for (activation_id, ids) in self.store.owed_removals().await? {
            match self
                .syncer
                .remove(&activation_id, &ids, Trigger::ConsentWithdrawal)
                .await
            {
                // Removed, or nobody is held any more (a full sync removed
                // them), or the activation is gone.
                Ok(_) | Err(ActivationError::NotFound(_)) => {
                    self.store.settle_removals(&activation_id, &ids).await?;
                    tracing::info!(activation = %activation_id, people = ids.len(), "owed removals went through");
                }
                Err(err @ ActivationError::Database(_)) => return Err(err),
                Err(err) => {
                    tracing::warn!(activation = %activation_id, error = %err, "owed removals still not taken");
                }
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
    /// does not take is owed (see the module's comment). A person whose
    /// consent returned is owed nothing any more.
    async fn handle(
        &self,
        releases: Vec<gateway_pb::ConsentRelease>,
    ) -> Result<(), ActivationError> {
        // By (destination, purpose): each person's latest state in the page.
        let mut latest: BTreeMap<(String, String), BTreeMap<String, ConsentState>> =
            BTreeMap::new();
        for release in releases {
            let state = release.state();
            latest
                .entry((release.destination_id, release.purpose))
                .or_default()
                .insert(release.pseudonymous_id, state);
        }
        for ((destination_id, purpose), people) in latest {
            let with = |wanted: ConsentState| -> Vec<String> {
                people
                    .iter()
                    .filter(|(_, state)| **state == wanted)
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            let denied = with(ConsentState::Denied);
            // Only a grant ends what is owed: under opt-in law an unset
            // choice does not let anyone stay.
            let returned = with(ConsentState::Granted);
            for activation in self.store.activations_on(&destination_id, &purpose).await? {
                self.store
                    .settle_removals(&activation.id, &returned)
                    .await?;
                if denied.is_empty() {
                    continue;
                }
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
