//! Sync runs: fetch the audience through the gateway into the run's plan,
//! let the database compare it with what the destination already holds, and
//! deliver only the adds and removes, in the destination's batch sizes,
//! recording each batch in the sync state only once the destination
//! acknowledged it. Memory holds one batch at a time, whatever the audience
//! size.
//!
//! A run killed at any point is safe: adds are recorded as pending before
//! they are sent, so nothing can be at the destination that no later run
//! knows to remove; and the next run of the activation first delivers the
//! interrupted run's batch in flight again as the same batch (same session,
//! sequence number and idempotency key, to the members still pending), so
//! the destination can tell it is a repeat, before planning afresh.
//!
//! Removals outside a sync (consent withdrawn, erasure) go the same way:
//! [`Syncer::remove`] plans and delivers them as a run of their own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use madtech_common::upstream::Upstream;
use madtech_proto::segments::v1 as segments_pb;
use segments_pb::segment_service_client::SegmentServiceClient;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::service::{Interceptor, interceptor::InterceptedService};

use crate::config::ActivationConfig;
use crate::destination::{Batch, Delivery, DeliveryError, HashedIdentifier, Member, Op};
use crate::error::ActivationError;
use crate::store::{
    Activation, ActivationStore, Baseline, BatchRecord, Destination, Phase, PlanCounts,
    StagedChange, SyncRun, Trigger,
};

/// Members staged per transaction while the audience arrives.
const STAGE_PAGE: usize = 5_000;
/// Removals before adds: a destination never holds more than it should.
const SEND_ORDER: [Op; 2] = [Op::Remove, Op::Add];

/// SHA-256 over a batch's pseudonymous ids and hashes, for its record: what
/// was sent can be checked later without keeping it.
fn digest(members: &[Member]) -> String {
    let mut hash = Sha256::new();
    for member in members {
        hash.update(member.id.as_bytes());
        for identifier in &member.identifiers {
            hash.update(b"\x1f");
            hash.update(identifier.kind.as_bytes());
            hash.update(b"=");
            hash.update(identifier.sha256.as_bytes());
        }
        hash.update(b"\n");
    }
    hex::encode(hash.finalize())
}

/// Runs syncs and removals, one at a time per activation.
pub struct Syncer {
    store: Arc<ActivationStore>,
    gateway: Upstream,
    config: ActivationConfig,
    delivery: Delivery,
    /// One holder at a time per activation: a sync, a removal or a recovery.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Activations with a sync asked for or running: a second is refused,
    /// while removals and recovery are waited for.
    syncing: Mutex<HashSet<String>>,
}

/// Releases an activation's sync claim however the sync ends.
struct SyncClaim<'a> {
    syncing: &'a Mutex<HashSet<String>>,
    activation_id: String,
}

impl Drop for SyncClaim<'_> {
    fn drop(&mut self) {
        if let Ok(mut syncing) = self.syncing.lock() {
            syncing.remove(&self.activation_id);
        }
    }
}

/// Reports a run's progress without ever waiting for the reader.
struct Progress<'a>(Option<&'a mpsc::Sender<SyncRun>>);

impl Progress<'_> {
    fn report(&self, run: &SyncRun) {
        if let Some(sender) = self.0 {
            let _ = sender.try_send(run.clone());
        }
    }
}

impl Syncer {
    pub fn new(
        store: Arc<ActivationStore>,
        gateway: Upstream,
        config: ActivationConfig,
    ) -> Result<Self, ActivationError> {
        let delivery = Delivery::new(config.retry.clone(), config.file_root.clone())?;
        Ok(Syncer {
            store,
            gateway,
            config,
            delivery,
            locks: Mutex::new(HashMap::new()),
            syncing: Mutex::new(HashSet::new()),
        })
    }

    fn claim_sync(&self, activation_id: &str) -> Result<SyncClaim<'_>, ActivationError> {
        let mut syncing = self
            .syncing
            .lock()
            .map_err(|_| ActivationError::Corrupt("sync claims poisoned".into()))?;
        if !syncing.insert(activation_id.to_string()) {
            return Err(ActivationError::SyncRunning);
        }
        Ok(SyncClaim {
            syncing: &self.syncing,
            activation_id: activation_id.to_string(),
        })
    }

    fn lock_of(&self, activation_id: &str) -> Result<Arc<tokio::sync::Mutex<()>>, ActivationError> {
        let mut locks = self
            .locks
            .lock()
            .map_err(|_| ActivationError::Corrupt("sync lock table poisoned".into()))?;
        Ok(Arc::clone(
            locks.entry(activation_id.to_string()).or_default(),
        ))
    }

    /// Runs one sync, reporting progress on `progress` (lossy while running;
    /// the final state is always delivered while the receiver lives). A
    /// second sync of the same activation is refused while one runs; a
    /// removal or recovery in progress is waited for.
    ///
    /// A sync applies only the audience's membership changes since the last
    /// one when it can (see [`Syncer::sync`]); `full` makes it export and
    /// compare the whole audience.
    pub async fn run(
        &self,
        activation_id: &str,
        trigger: Trigger,
        full: bool,
        progress: mpsc::Sender<SyncRun>,
    ) -> Result<SyncRun, ActivationError> {
        let _claim = self.claim_sync(activation_id)?;
        let lock = self.lock_of(activation_id)?;
        let _running = lock.lock().await;
        let activation = self.store.activation(activation_id).await?;
        let destination = self.store.destination(&activation.destination_id).await?;
        self.recover(&activation, &destination).await?;
        let mut run = SyncRun::start(activation_id, trigger);
        self.store.save_run(&run).await?;
        let reporter = Progress(Some(&progress));
        reporter.report(&run);
        let outcome = self
            .sync(&mut run, &activation, &destination, full, &reporter)
            .await;
        let (outcome, baseline) = match outcome {
            Ok(baseline) => (Ok(()), baseline),
            Err(err) => (Err(err), None),
        };
        let outcome = self.finish(&mut run, outcome).await;
        // Only a sync that delivered everything moves the baseline: after
        // any failure the next sync applies the same changes again, which
        // is harmless (the plan skips what the destination already has).
        if let (Ok(()), Some(baseline)) = (&outcome, baseline)
            && let Err(err) = self.store.save_baseline(activation_id, &baseline).await
        {
            tracing::warn!(activation = %activation_id, error = %err, "the sync's baseline was not saved; the next sync repeats its changes");
        }
        let _ = progress.send(run.clone()).await;
        outcome.map(|()| run)
    }

    /// Ends a run: its outcome on record, its plan dropped.
    async fn finish(
        &self,
        run: &mut SyncRun,
        outcome: Result<(), ActivationError>,
    ) -> Result<(), ActivationError> {
        let outcome = outcome.and_then(|()| match run.batches_rejected {
            0 => Ok(()),
            refused => Err(ActivationError::BatchesRefused {
                refused,
                batches: run.batches_sent + refused,
                first: std::mem::take(&mut run.error),
            }),
        });
        run.finished_at_micros = Some(Utc::now().timestamp_micros());
        match &outcome {
            Ok(()) => run.phase = Phase::Succeeded,
            Err(err) => {
                run.phase = Phase::Failed;
                tracing::warn!(activation = %run.activation_id, run = %run.id, error = %err, "run failed");
                // What callers see is what the status mapping lets out, so
                // internal detail stays in the log.
                run.error = err.to_status().message().to_string();
            }
        }
        self.store.save_run(run).await?;
        self.store.clear_plans(&run.activation_id).await?;
        outcome
    }

    /// Brings the destination up to date with the audience. Incremental
    /// when the last sync left a baseline, no full sync was asked for, the
    /// last full one is younger than `full_sync_every` and the policy is
    /// still the version it ran under: only the membership changes since
    /// the baseline are fetched and applied. Otherwise the whole audience
    /// (the segment's current membership) is fetched and compared with
    /// what the destination holds. Answers the baseline to keep when the
    /// run succeeds.
    async fn sync(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        full: bool,
        progress: &Progress<'_>,
    ) -> Result<Option<Baseline>, ActivationError> {
        self.store.clear_plans(&activation.id).await?;
        let baseline = if full {
            None
        } else {
            self.store.baseline(&activation.id).await?
        }
        .filter(|baseline| {
            !full_sync_lapsed(baseline, run.started_at_micros, self.config.full_sync_every)
        });
        let next = match baseline {
            Some(baseline) => {
                self.fetch_changes(run, activation, destination, &baseline, progress)
                    .await?
            }
            None => None,
        };
        let limit = destination.target.batch_limit() as u64;
        let (plan, next) = match next {
            Some(next) => {
                run.full = false;
                let plan = self
                    .store
                    .plan_changes(&run.id, &activation.id, limit)
                    .await?;
                (plan, Some(next))
            }
            None => {
                run.full = true;
                let next = self.fetch(run, activation, destination, progress).await?;
                (
                    self.store.plan_sync(&run.id, &activation.id, limit).await?,
                    next,
                )
            }
        };
        run.phase = Phase::Sending;
        run.unchanged = plan.unchanged;
        run.to_send = plan.adds + plan.removes;
        self.store.save_run(run).await?;
        progress.report(run);
        self.deliver_plan(run, activation, destination, &plan, progress)
            .await?;
        Ok(next)
    }

    /// Delivers every batch of a run's plan, removes first.
    async fn deliver_plan(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        plan: &PlanCounts,
        progress: &Progress<'_>,
    ) -> Result<(), ActivationError> {
        for op in SEND_ORDER {
            for seq in 1..=plan.batches(op) {
                let mut members = self.store.planned_batch(&run.id, op, seq).await?;
                if op == Op::Add {
                    members = self
                        .retire_replaced(run, activation, destination, seq, members, progress)
                        .await?;
                    // Everyone in it kept their state for the next sync.
                    if members.is_empty() {
                        continue;
                    }
                }
                let batch = Batch {
                    op,
                    session: &run.id.clone(),
                    seq,
                    last: seq == plan.batches(op),
                    total: plan.members(op),
                    purpose: &activation.purpose,
                    members: &members,
                };
                self.deliver_batch(run, destination, batch, progress)
                    .await?;
            }
        }
        Ok(())
    }

    /// Members of an add batch held with identifiers the destination is
    /// no longer to get (an identifier gone from the profile, a form the
    /// policy no longer sends there) first have what they are held with
    /// removed, then are added as they are now: an add deletes nothing the
    /// destination holds, so the old hashes would stay matchable there,
    /// and a later removal, which carries what is held now, would never
    /// reach them. The removal is a batch of its own (session
    /// `<run>-retired-<seq>`). Answers the members to add: all of them,
    /// or, when the destination refused that removal, only those it did
    /// not concern (the others keep their state; the next sync tries again).
    async fn retire_replaced(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        seq: u32,
        members: Vec<Member>,
        progress: &Progress<'_>,
    ) -> Result<Vec<Member>, ActivationError> {
        let ids: Vec<String> = members.iter().map(|member| member.id.clone()).collect();
        let held = self.store.held(&run.activation_id, &ids).await?;
        let retired: Vec<Member> = members
            .iter()
            .filter_map(|member| {
                let held = held.get(&member.id)?;
                held.identifiers
                    .iter()
                    .any(|old| !member.identifiers.contains(old))
                    .then(|| Member {
                        id: member.id.clone(),
                        identifiers: held.identifiers.clone(),
                    })
            })
            .collect();
        if retired.is_empty() {
            return Ok(members);
        }
        let session = format!("{}-retired-{seq}", run.id);
        let refused_before = run.batches_rejected;
        let removal = Batch {
            op: Op::Remove,
            session: &session,
            seq: 1,
            last: true,
            total: retired.len() as u64,
            purpose: &activation.purpose,
            members: &retired,
        };
        self.deliver_batch(run, destination, removal, progress)
            .await?;
        if run.batches_rejected == refused_before {
            return Ok(members);
        }
        let kept_back: std::collections::HashSet<&str> =
            retired.iter().map(|member| member.id.as_str()).collect();
        Ok(members
            .into_iter()
            .filter(|member| !kept_back.contains(member.id.as_str()))
            .collect())
    }

    /// Delivers one batch and records what became of it. A refused batch is
    /// recorded and its members left as they were (held, or pending), so the
    /// next run tries them again; a destination that stays unavailable ends
    /// the run.
    async fn deliver_batch(
        &self,
        run: &mut SyncRun,
        destination: &Destination,
        batch: Batch<'_>,
        progress: &Progress<'_>,
    ) -> Result<(), ActivationError> {
        let (op, members) = (batch.op, batch.members);
        if op == Op::Add {
            self.store.prepare(&run.activation_id, members).await?;
        }
        // Files say why they were written: `<activation>-<run>` for a sync,
        // `<activation>-erasure-<run>` for a removal of another kind.
        let name = match run.trigger {
            Trigger::Sync | Trigger::Scheduled => {
                format!("{}-{}", run.activation_id, batch.session)
            }
            other => format!("{}-{}-{}", run.activation_id, other.as_str(), batch.session),
        };
        let outcome = self
            .delivery
            .send(&destination.target, &name, batch, &mut run.retries)
            .await;
        let mut record = BatchRecord {
            run_id: batch.session.to_string(),
            activation_id: run.activation_id.clone(),
            op,
            seq: batch.seq,
            members: members.len() as u64,
            outcome: "sent",
            http_status: None,
            digest: digest(members),
            error: String::new(),
        };
        match outcome {
            Ok(receipt) => {
                let (added, removed) = match op {
                    Op::Add => (members, &[][..]),
                    Op::Remove => (&[][..], members),
                };
                // The destination has the batch; only now is it recorded,
                // the state and the batch's record together.
                self.store
                    .acknowledge(&run.activation_id, added, removed, Some(&record))
                    .await?;
                run.batches_sent += 1;
                match op {
                    Op::Add => run.added += members.len() as u64,
                    Op::Remove => run.removed += members.len() as u64,
                }
                if let Some(output) = receipt.output {
                    run.output = output;
                }
            }
            Err(DeliveryError::Refused { status, reason }) => {
                record.outcome = "refused";
                record.http_status = Some(status);
                record.error = reason.clone();
                self.store.record_batch(&record).await?;
                tracing::warn!(run = %run.id, op = op.as_str(), seq = batch.seq, status, "the destination refused a batch");
                run.batches_rejected += 1;
                if run.error.is_empty() {
                    run.error = format!("HTTP {status}: {reason}");
                }
            }
            Err(err) => {
                record.outcome = "failed";
                record.error = err.to_string();
                self.store.record_batch(&record).await?;
                return Err(err.into());
            }
        }
        self.store.save_run(run).await?;
        progress.report(run);
        Ok(())
    }

    /// Finishes what a stopped process left of an activation's runs. The
    /// first batch of an interrupted run's plan without an outcome may have
    /// reached the destination or not: it is delivered again as the same
    /// batch, to its members whose state is still what that batch would
    /// change (adds still pending, removes still held), so a withdrawal
    /// handled meanwhile is not undone. The rest of the plan is dropped:
    /// the next run plans afresh from the audience as it is then.
    async fn recover(
        &self,
        activation: &Activation,
        destination: &Destination,
    ) -> Result<(), ActivationError> {
        let activation_id = activation.id.as_str();
        for mut stale in self.store.unfinished_runs(activation_id).await? {
            if stale.phase == Phase::Sending {
                let limit = destination.target.batch_limit() as u64;
                let plan = self.store.plan_counts(&stale.id, limit).await?;
                let recorded = self.store.batches(&stale.id).await?;
                let in_flight = SEND_ORDER
                    .into_iter()
                    .flat_map(|op| (1..=plan.batches(op)).map(move |seq| (op, seq)))
                    .find(|(op, seq)| !recorded.iter().any(|b| b.op == *op && b.seq == *seq));
                if let Some((op, seq)) = in_flight {
                    let planned = self.store.planned_batch(&stale.id, op, seq).await?;
                    let ids: Vec<String> = planned.iter().map(|m| m.id.clone()).collect();
                    let held = self.store.held(activation_id, &ids).await?;
                    let members: Vec<Member> = planned
                        .into_iter()
                        .filter(|member| match (op, held.get(&member.id)) {
                            (Op::Add, Some(h)) => {
                                !h.confirmed && h.identifiers == member.identifiers
                            }
                            (Op::Remove, Some(_)) => true,
                            (_, None) => false,
                        })
                        .collect();
                    if !members.is_empty() {
                        let session = stale.id.clone();
                        let batch = Batch {
                            op,
                            session: &session,
                            seq,
                            last: seq == plan.batches(op),
                            total: plan.members(op),
                            purpose: &activation.purpose,
                            members: &members,
                        };
                        self.deliver_batch(&mut stale, destination, batch, &Progress(None))
                            .await?;
                    }
                }
            }
            // The batch records (read again: the batch in flight may have
            // just been added) are what happened; the run's counters may
            // lag them by the batch the process died after.
            let batches = self.store.batches(&stale.id).await?;
            let sent = |op: Op| -> u64 {
                batches
                    .iter()
                    .filter(|b| b.op == op && b.outcome == "sent")
                    .map(|b| b.members)
                    .sum()
            };
            stale.added = sent(Op::Add);
            stale.removed = sent(Op::Remove);
            stale.batches_sent = batches.iter().filter(|b| b.outcome == "sent").count() as u64;
            stale.batches_rejected = batches.iter().filter(|b| b.outcome != "sent").count() as u64;
            tracing::warn!(activation = %activation_id, run = %stale.id, "finished a run its process left unfinished");
            stale.phase = Phase::Failed;
            stale.error =
                "interrupted: the batch in flight was delivered again; the next run does the rest"
                    .into();
            stale.finished_at_micros = Some(Utc::now().timestamp_micros());
            self.store.save_run(&stale).await?;
        }
        self.store.clear_plans(activation_id).await
    }

    /// Finishes every run a stopped process left unfinished (at start).
    pub async fn recover_all(&self) -> Result<(), ActivationError> {
        for activation_id in self.store.interrupted_activations().await? {
            let lock = self.lock_of(&activation_id)?;
            let _running = lock.lock().await;
            let activation = self.store.activation(&activation_id).await?;
            let destination = self.store.destination(&activation.destination_id).await?;
            self.recover(&activation, &destination).await?;
        }
        Ok(())
    }

    /// Removes the members of `ids` an activation's destination holds (or
    /// may hold) now, as a run of its own (waiting for a sync in progress to
    /// end first), and forgets them once the destination acknowledged.
    /// `None` when it holds none of them.
    pub async fn remove(
        &self,
        activation_id: &str,
        ids: &[String],
        trigger: Trigger,
    ) -> Result<Option<SyncRun>, ActivationError> {
        let lock = self.lock_of(activation_id)?;
        let _running = lock.lock().await;
        let activation = self.store.activation(activation_id).await?;
        let destination = self.store.destination(&activation.destination_id).await?;
        self.recover(&activation, &destination).await?;
        // Read under the lock: a sync that just ended may have changed it.
        let members: Vec<Member> = self
            .store
            .held(activation_id, ids)
            .await?
            .into_iter()
            .map(|(id, held)| Member {
                id,
                identifiers: held.identifiers,
            })
            .collect();
        if members.is_empty() {
            return Ok(None);
        }
        let mut run = SyncRun::start(activation_id, trigger);
        run.phase = Phase::Sending;
        self.store.save_run(&run).await?;
        let outcome = self
            .plan_and_deliver_removal(&mut run, &activation, &destination, &members)
            .await;
        self.finish(&mut run, outcome).await.map(|()| Some(run))
    }

    async fn plan_and_deliver_removal(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        members: &[Member],
    ) -> Result<(), ActivationError> {
        self.store
            .stage(&run.id, &run.activation_id, members, Some(Op::Remove))
            .await?;
        let limit = destination.target.batch_limit() as u64;
        let plan = self.store.plan_removal(&run.id, limit).await?;
        run.to_send = plan.removes;
        self.store.save_run(run).await?;
        self.deliver_plan(run, activation, destination, &plan, &Progress(None))
            .await
    }

    /// Removes everyone held whose identifiers include one of these hashes
    /// from every destination that holds them, then forgets them. Returns
    /// the removals delivered and where they went.
    pub async fn forget(
        &self,
        identifier_sha256s: &[String],
    ) -> Result<(u64, Vec<String>), ActivationError> {
        let mut by_activation: std::collections::BTreeMap<String, Vec<String>> =
            std::collections::BTreeMap::new();
        for holding in self.store.holders_of(identifier_sha256s).await? {
            by_activation
                .entry(holding.activation_id)
                .or_default()
                .push(holding.member.id);
        }
        let mut removed = 0;
        let mut outputs = Vec::new();
        for (activation_id, ids) in by_activation {
            if let Some(run) = self.remove(&activation_id, &ids, Trigger::Erasure).await? {
                removed += run.removed;
                if !run.output.is_empty() {
                    outputs.push(run.output);
                }
            }
        }
        Ok((removed, outputs))
    }

    /// The segments API through the gateway, with the service's token.
    async fn segments_client(
        &self,
    ) -> Result<SegmentServiceClient<InterceptedService<Upstream, impl Interceptor>>, ActivationError>
    {
        Ok(SegmentServiceClient::with_interceptor(
            self.gateway.clone(),
            crate::bearer_interceptor(&self.config).await?,
        ))
    }

    /// Fetches the whole audience (the segment's current membership) into
    /// the run's plan. Answers the baseline it leaves: the membership
    /// cursor the export named (none: the next sync is full again).
    async fn fetch(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        progress: &Progress<'_>,
    ) -> Result<Option<Baseline>, ActivationError> {
        let mut client = self.segments_client().await?;
        let request = segments_pb::ExportAudienceRequest {
            segment_id: activation.segment_id.clone(),
            destination_id: destination.id.clone(),
            destination_kind: destination.target.kind().to_string(),
            purpose: activation.purpose.clone(),
            snapshot_cursor: 0,
            current_membership: true,
        };
        let response = client
            .export_audience(request)
            .await
            .map_err(ActivationError::gateway)?;
        run.policy_version = header(&response, madtech_proto::segments::POLICY_VERSION_HEADER)
            .unwrap_or_default()
            .to_string();
        let baseline = header(&response, madtech_proto::segments::MEMBERSHIP_CURSOR_HEADER)
            .and_then(|cursor| cursor.parse().ok())
            .map(|membership_cursor| Baseline {
                membership_cursor,
                policy_version: run.policy_version.clone(),
                full_sync_at_micros: run.started_at_micros,
            });
        let mut stream = response.into_inner();
        let mut page: Vec<Member> = Vec::with_capacity(STAGE_PAGE);
        while let Some(chunk) = stream.message().await.map_err(ActivationError::gateway)? {
            for member in chunk.members {
                page.push(crossed(member)?);
            }
            if page.len() >= STAGE_PAGE {
                self.stage(run, &mut page).await?;
                progress.report(run);
            }
        }
        self.stage(run, &mut page).await?;
        progress.report(run);
        Ok(baseline)
    }

    /// Fetches the audience's membership changes since `baseline` into the
    /// run's plan. Answers the baseline they lead to, or `None` when the
    /// policy version is no longer the one the last full sync ran under
    /// (people whose membership did not change may be decided otherwise
    /// now: a full sync is due).
    async fn fetch_changes(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        baseline: &Baseline,
        progress: &Progress<'_>,
    ) -> Result<Option<Baseline>, ActivationError> {
        let mut client = self.segments_client().await?;
        let request = segments_pb::ExportAudienceChangesRequest {
            segment_id: activation.segment_id.clone(),
            destination_id: destination.id.clone(),
            destination_kind: destination.target.kind().to_string(),
            purpose: activation.purpose.clone(),
            after_cursor: baseline.membership_cursor,
            until_head: true,
        };
        let response = client
            .export_audience_changes(request)
            .await
            .map_err(ActivationError::gateway)?;
        let policy_version =
            header(&response, madtech_proto::segments::POLICY_VERSION_HEADER).unwrap_or_default();
        if policy_version != baseline.policy_version {
            tracing::info!(activation = %activation.id, "the policy changed since the last full sync; syncing in full");
            return Ok(None);
        }
        run.policy_version = policy_version.to_string();
        let mut stream = response.into_inner();
        let mut cursor = baseline.membership_cursor;
        let mut page: Vec<StagedChange> = Vec::with_capacity(STAGE_PAGE);
        while let Some(chunk) = stream.message().await.map_err(ActivationError::gateway)? {
            for change in chunk.changes {
                cursor = cursor.max(change.cursor);
                page.push(StagedChange {
                    member: crossed(change.member.unwrap_or_default())?,
                    in_audience: change.in_audience,
                });
            }
            if page.len() >= STAGE_PAGE {
                self.stage_changes(run, &mut page).await?;
                progress.report(run);
            }
        }
        self.stage_changes(run, &mut page).await?;
        progress.report(run);
        Ok(Some(Baseline {
            membership_cursor: cursor,
            ..baseline.clone()
        }))
    }

    async fn stage_changes(
        &self,
        run: &mut SyncRun,
        page: &mut Vec<StagedChange>,
    ) -> Result<(), ActivationError> {
        if page.is_empty() {
            return Ok(());
        }
        self.store
            .stage_changes(&run.id, &run.activation_id, page)
            .await?;
        run.members_received += page.len() as u64;
        page.clear();
        Ok(())
    }

    async fn stage(
        &self,
        run: &mut SyncRun,
        page: &mut Vec<Member>,
    ) -> Result<(), ActivationError> {
        if page.is_empty() {
            return Ok(());
        }
        self.store
            .stage(&run.id, &run.activation_id, page, None)
            .await?;
        run.members_received += page.len() as u64;
        page.clear();
        Ok(())
    }
}

/// Whether a full sync is due because `every` has passed since the last.
fn full_sync_lapsed(baseline: &Baseline, now_micros: i64, every: std::time::Duration) -> bool {
    let every = i64::try_from(every.as_micros()).unwrap_or(i64::MAX);
    now_micros.saturating_sub(baseline.full_sync_at_micros) >= every
}

/// A response header's value, when it is text.
fn header<'r, T>(response: &'r tonic::Response<T>, name: &str) -> Option<&'r str> {
    response
        .metadata()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// A member as the crossing released it, in the form the sync state keeps.
fn crossed(member: segments_pb::AudienceMember) -> Result<Member, ActivationError> {
    if member.pseudonymous_id.is_empty() {
        // Fail closed: only what the gateway pseudonymised may be sent.
        return Err(ActivationError::Gateway {
            code: tonic::Code::Internal,
            message: "a member arrived without a pseudonymous id".into(),
        });
    }
    let mut identifiers: Vec<HashedIdentifier> = member
        .hashed_identifiers
        .into_iter()
        .map(|h| HashedIdentifier {
            kind: h.kind,
            sha256: h.sha256,
        })
        .collect();
    // Sorted, so the same identifiers always compare equal to what the
    // sync state holds.
    identifiers.sort();
    Ok(Member {
        id: member.pseudonymous_id,
        identifiers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, sha: &str) -> Member {
        Member {
            id: id.into(),
            identifiers: vec![HashedIdentifier {
                kind: "email".into(),
                sha256: sha.into(),
            }],
        }
    }

    #[test]
    fn a_full_sync_is_due_once_its_interval_has_passed() {
        let baseline = Baseline {
            membership_cursor: 1,
            policy_version: "v".into(),
            full_sync_at_micros: 1_000_000,
        };
        let hour = std::time::Duration::from_secs(3600);
        assert!(!full_sync_lapsed(&baseline, 1_000_000, hour));
        assert!(!full_sync_lapsed(&baseline, 3_600_999_999, hour));
        assert!(full_sync_lapsed(&baseline, 3_601_000_000, hour));
        assert!(
            !full_sync_lapsed(&baseline, 0, hour),
            "a clock that went back"
        );
        assert!(!full_sync_lapsed(
            &baseline,
            i64::MAX,
            std::time::Duration::MAX
        ));
    }

    #[test]
    fn crossed_members_need_a_pseudonym_and_keep_sorted_hashes() {
        let hashed = |kind: &str, sha: &str| segments_pb::HashedIdentifier {
            kind: kind.into(),
            sha256: sha.into(),
            form: "sha256".into(),
        };
        let member = crossed(segments_pb::AudienceMember {
            pseudonymous_id: "p".into(),
            hashed_identifiers: vec![hashed("phone", "2"), hashed("email", "1")],
            ..Default::default()
        })
        .expect("crossed");
        let kinds: Vec<&str> = member.identifiers.iter().map(|h| h.kind.as_str()).collect();
        assert_eq!(kinds, ["email", "phone"]);
        let unnamed = crossed(segments_pb::AudienceMember::default()).expect_err("no pseudonym");
        assert!(matches!(
            unnamed,
            ActivationError::Gateway {
                code: tonic::Code::Internal,
                ..
            }
        ));
    }

    #[test]
    fn batch_digests_depend_on_every_id_and_hash() {
        let one = digest(&[member("a", "1")]);
        assert_ne!(one, digest(&[member("a", "2")]));
        assert_ne!(one, digest(&[member("b", "1")]));
        assert_eq!(one, digest(&[member("a", "1")]));
    }
}
