//! Keeping memberships true: a full computation of one segment (on request,
//! and on a schedule for rules whose windows move with time), and the
//! re-evaluation of the people a page of profile changes touched against
//! every segment. All of it runs the rules as SQL over the projection, the
//! evaluator the property test checks against the in-memory one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use madtech_common::CancellationToken;
use tokio::sync::watch;

use crate::error::SegmentError;
use crate::rules::Rule;
use crate::store::membership::Memberships;
use crate::store::projection::Projection;
use crate::store::sql::Compiler;
use crate::store::{Segment, SegmentStore};

/// People evaluated per step of a computation (one transaction each).
const PAGE: u64 = 1_000;

/// How far a computation has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub processed: u64,
    pub total: u64,
    pub entered: u64,
    pub exited: u64,
    /// Set on the last step.
    pub members: u64,
    pub cursor: u64,
    pub done: bool,
}

#[derive(Clone)]
pub struct Evaluator {
    store: Arc<SegmentStore>,
    projection: Arc<Projection>,
    memberships: Arc<Memberships>,
    /// The profile change cursor up to which real-time re-evaluation has
    /// run (in this process): memberships reflect every change up to it.
    evaluated: Arc<watch::Sender<u64>>,
    /// One computation of a segment at a time; an export of its current
    /// membership waits for the one in progress.
    computing: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Evaluator {
    pub fn new(
        store: Arc<SegmentStore>,
        projection: Arc<Projection>,
        memberships: Arc<Memberships>,
    ) -> Self {
        Evaluator {
            store,
            projection,
            memberships,
            evaluated: Arc::new(watch::Sender::new(0)),
            computing: Arc::default(),
        }
    }

    pub fn memberships(&self) -> Arc<Memberships> {
        Arc::clone(&self.memberships)
    }

    /// Records that memberships reflect every profile change up to `cursor`.
    pub fn evaluated_through(&self, cursor: u64) {
        self.evaluated.send_if_modified(|evaluated| {
            let newer = cursor > *evaluated;
            if newer {
                *evaluated = cursor;
            }
            newer
        });
    }

    /// The profile change cursor memberships reflect everything up to.
    pub fn evaluated(&self) -> u64 {
        *self.evaluated.borrow()
    }

    fn computation_lock(&self, segment_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut computing = self
            .computing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(computing.entry(segment_id.to_string()).or_default())
    }

    /// Waits until no computation of `segment_id` is in progress.
    pub async fn computed(&self, segment_id: &str) {
        drop(self.computation_lock(segment_id).lock().await);
    }

    /// Evaluates `segment` over everyone, page by page, recording who
    /// entered and who left; yields progress after each page.
    pub fn compute(
        &self,
        segment: Segment,
    ) -> impl Stream<Item = Result<Progress, SegmentError>> + Send + use<> {
        let this = self.clone();
        // Claimed at once when free, so an export of the current membership
        // asked for right after this call waits for the computation even
        // before it is polled; otherwise queued behind the one in progress.
        let lock = self.computation_lock(&segment.id);
        let claimed = Arc::clone(&lock).try_lock_owned().ok();
        async_stream::try_stream! {
            let _computing = match claimed {
                Some(claimed) => claimed,
                None => lock.lock_owned().await,
            };
            let rules = this.store.rules().await?;
            let now_micros = chrono::Utc::now().timestamp_micros();
            let compiler = Compiler {
                backend: this.projection.backend(),
                now_micros,
                segments: &rules,
            };
            let mut progress = Progress {
                total: this.projection.people().await?,
                ..Progress::default()
            };
            yield progress;
            let mut after = String::new();
            loop {
                let page = this
                    .projection
                    .evaluate_page(&segment.rule, &compiler, &after, PAGE)
                    .await?;
                let Some((last, _)) = page.last() else { break };
                after = last.clone();
                let (entered, exited) = this.memberships.reconcile(&segment.id, &page, now_micros).await?;
                progress.processed += page.len() as u64;
                // People added while computing can push it past the first count.
                progress.total = progress.total.max(progress.processed);
                progress.entered += entered;
                progress.exited += exited;
                yield progress;
            }
            progress.members = this.memberships.count(&segment.id).await?;
            progress.cursor = this.memberships.head().await?;
            progress.done = true;
            yield progress;
        }
    }

    /// Re-evaluates `profile_ids` (just changed) against every segment.
    pub async fn reevaluate(&self, profile_ids: &[String]) -> Result<(), SegmentError> {
        if profile_ids.is_empty() {
            return Ok(());
        }
        let rules = self.store.rules().await?;
        let now_micros = chrono::Utc::now().timestamp_micros();
        let compiler = Compiler {
            backend: self.projection.backend(),
            now_micros,
            segments: &rules,
        };
        for chunk in profile_ids.chunks(PAGE as usize) {
            for (segment_id, rule) in &rules {
                let evaluated = self.projection.evaluate_ids(rule, &compiler, chunk).await?;
                self.memberships
                    .reconcile(segment_id, &evaluated, now_micros)
                    .await?;
            }
        }
        Ok(())
    }

    /// Recomputes, every `interval`, the segments whose rules look back over
    /// a time window, so people leave "last 30 days" segments as their
    /// events age out.
    pub async fn run_schedule(self, interval: Duration, shutdown: CancellationToken) {
        use futures::StreamExt;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let rules: BTreeMap<String, Rule> = match self.store.rules().await {
                Ok(rules) => rules,
                Err(err) => {
                    tracing::warn!(error = %err, "scheduled re-evaluation could not list segments");
                    continue;
                }
            };
            for id in rules
                .iter()
                .filter(|(_, rule)| rule.depends_on_time())
                .map(|(id, _)| id.clone())
            {
                let Ok(segment) = self.store.get(&id).await else {
                    continue;
                };
                let mut steps = Box::pin(self.compute(segment));
                while let Some(step) = steps.next().await {
                    if let Err(err) = step {
                        tracing::warn!(error = %err, segment = %id, "scheduled re-evaluation failed");
                        break;
                    }
                }
            }
        }
    }
}
