//! Scheduled syncs: an activation with `sync_every` syncs on its own once
//! that long has passed since its last sync started (on demand or
//! scheduled). Each due activation syncs in its own task, so a long sync
//! holds up no other; a sync already running is left alone.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use madtech_common::CancellationToken;
use tokio::sync::mpsc;

use crate::error::ActivationError;
use crate::store::{ActivationStore, Trigger};
use crate::sync::Syncer;

pub struct Scheduler {
    pub store: Arc<ActivationStore>,
    pub syncer: Arc<Syncer>,
    /// How often schedules are checked.
    pub tick: Duration,
}

impl Scheduler {
    /// Checks schedules every tick until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.tick) => {}
            }
            if let Err(err) = self.start_due().await {
                tracing::warn!(error = %err, "could not check sync schedules");
            }
        }
    }

    async fn start_due(&self) -> Result<(), ActivationError> {
        let now = Utc::now().timestamp_micros();
        for activation in self.store.scheduled_activations().await? {
            let Some(every) = activation.sync_every else {
                continue;
            };
            let every = i64::try_from(every.as_micros()).unwrap_or(i64::MAX);
            let due = match self.store.last_sync_started(&activation.id).await? {
                None => true,
                Some(started) => now.saturating_sub(started) >= every,
            };
            if !due {
                continue;
            }
            let syncer = Arc::clone(&self.syncer);
            tokio::spawn(async move {
                // Nobody watches a scheduled sync's progress; its run record
                // says how it went.
                let (progress, _) = mpsc::channel(1);
                match syncer
                    .run(&activation.id, Trigger::Scheduled, false, progress)
                    .await
                {
                    Ok(run) => {
                        tracing::info!(activation = %activation.id, run = %run.id, added = run.added, removed = run.removed, "scheduled sync done")
                    }
                    Err(ActivationError::SyncRunning) => {}
                    Err(err) => {
                        tracing::warn!(activation = %activation.id, error = %err, "scheduled sync failed")
                    }
                }
            });
        }
        Ok(())
    }
}
