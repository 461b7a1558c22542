//! Removals the moment consent ends: follows the consent changes the gateway
//! releases to the adtech zone (`ConsentReleaseService/WatchConsentReleases`,
//! under each destination's pseudonymous ids) and removes a person from every
//! activation for that purpose on that destination as soon as their consent
//! is denied, without waiting for the next sync. The cursor is kept in the
//! activation database after each page is handled, so a restart resumes
//! where it stopped and a removal is never skipped (at worst repeated, which
//! finds nobody held).

use std::collections::BTreeMap;
use std::sync::Arc;

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
        keep_following("consent releases", shutdown, |backoff| {
            let follower = Arc::clone(&follower);
            async move { follower.follow_once(&backoff).await }
        })
        .await;
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
    /// denied, per activation in one removal run.
    async fn handle(
        &self,
        releases: Vec<gateway_pb::ConsentRelease>,
    ) -> Result<(), ActivationError> {
        let mut denied: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for release in releases {
            if release.state() == ConsentState::Denied {
                denied
                    .entry((release.destination_id, release.purpose))
                    .or_default()
                    .push(release.pseudonymous_id);
            }
        }
        for ((destination_id, purpose), ids) in denied {
            for activation in self.store.activations_on(&destination_id, &purpose).await? {
                let removed = self
                    .syncer
                    .remove(&activation.id, &ids, Trigger::ConsentWithdrawal)
                    .await?;
                if let Some(run) = removed {
                    tracing::info!(activation = %activation.id, run = %run.id, removed = run.removed, "removed after consent was withdrawn");
                }
            }
        }
        Ok(())
    }
}
