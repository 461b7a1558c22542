//! Sync runs: fetch the audience through the gateway, compare it with what the
//! destination already holds, deliver only the adds and removes in the
//! destination's batch sizes, and record each batch in the sync state only
//! once the destination acknowledged it. A run killed at any point is safe to
//! run again: nothing is recorded as sent that was not, and adds in flight
//! are recorded as pending first, so the next run sends or removes them.
//!
//! Removals outside a sync (consent withdrawn, erasure) go the same way:
//! [`Syncer::remove`] delivers them as a run of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use madtech_proto::segments::v1 as segments_pb;
use segments_pb::segment_service_client::SegmentServiceClient;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::ActivationConfig;
use crate::destination::{Batch, Delivery, DeliveryError, HashedIdentifier, Member, Op};
use crate::error::ActivationError;
use crate::store::{
    Activation, ActivationStore, BatchRecord, Destination, Held, Phase, SyncRun, Trigger,
};

/// The audience as the gateway released it: pseudonymous id → hashes.
pub type Audience = HashMap<String, Vec<HashedIdentifier>>;

/// What a sync must send.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub adds: Vec<Member>,
    /// With the identifiers the destination was given, which platforms
    /// match removals on.
    pub removes: Vec<Member>,
    pub unchanged: u64,
}

/// Adds are members the destination does not surely hold as they are now
/// (not held, held with other identifiers, or an add never confirmed);
/// removes are members it holds or may hold that are no longer released.
/// Both come out sorted, so what is sent depends only on the change.
pub fn diff(held: &Held, audience: Audience) -> Diff {
    let mut result = Diff::default();
    let removes: Vec<Member> = held
        .iter()
        .filter(|(id, _)| !audience.contains_key(*id))
        .map(|(id, sent)| Member {
            id: id.clone(),
            identifiers: sent.identifiers.clone(),
        })
        .collect();
    for (id, identifiers) in audience {
        match held.get(&id) {
            Some(sent) if sent.confirmed && sent.identifiers == identifiers => {
                result.unchanged += 1
            }
            _ => result.adds.push(Member { id, identifiers }),
        }
    }
    result.removes = removes;
    result.adds.sort();
    result.removes.sort();
    result
}

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
    gateway: Channel,
    config: ActivationConfig,
    delivery: Delivery,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
        gateway: Channel,
        config: ActivationConfig,
    ) -> Result<Self, ActivationError> {
        let delivery = Delivery::new(config.retry.clone(), config.file_root.clone())?;
        Ok(Syncer {
            store,
            gateway,
            config,
            delivery,
            locks: Mutex::new(HashMap::new()),
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
    /// second sync of the same activation is refused while one runs.
    pub async fn run(
        &self,
        activation_id: &str,
        progress: mpsc::Sender<SyncRun>,
    ) -> Result<SyncRun, ActivationError> {
        let lock = self.lock_of(activation_id)?;
        let _running = lock.try_lock().map_err(|_| ActivationError::SyncRunning)?;
        let activation = self.store.activation(activation_id).await?;
        let destination = self.store.destination(&activation.destination_id).await?;
        let mut run = SyncRun::start(activation_id, Trigger::Sync);
        self.store.save_run(&run).await?;
        let reporter = Progress(Some(&progress));
        reporter.report(&run);
        let outcome = self
            .sync(&mut run, &activation, &destination, &reporter)
            .await;
        let outcome = self.finish(&mut run, outcome).await;
        let _ = progress.send(run.clone()).await;
        outcome.map(|()| run)
    }

    async fn finish(
        &self,
        run: &mut SyncRun,
        outcome: Result<(), ActivationError>,
    ) -> Result<(), ActivationError> {
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
        outcome
    }

    async fn sync(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        progress: &Progress<'_>,
    ) -> Result<(), ActivationError> {
        let audience = self.fetch(run, activation, destination, progress).await?;
        let held = self.store.held(&run.activation_id).await?;
        let diff = diff(&held, audience);
        run.phase = Phase::Sending;
        run.unchanged = diff.unchanged;
        run.to_send = (diff.adds.len() + diff.removes.len()) as u64;
        self.store.save_run(run).await?;
        progress.report(run);
        // Removes first: a destination never holds more than it should.
        self.deliver(run, destination, Op::Remove, &diff.removes, progress)
            .await?;
        self.deliver(run, destination, Op::Add, &diff.adds, progress)
            .await?;
        if run.batches_rejected > 0 {
            return Err(ActivationError::BatchesRefused {
                refused: run.batches_rejected,
                batches: run.batches_sent + run.batches_rejected,
                first: std::mem::take(&mut run.error),
            });
        }
        Ok(())
    }

    /// Delivers `members` as batches of `op`, recording each. A refused
    /// batch is recorded and its members left as they were (held, or
    /// pending), so the next run tries them again; a destination that stays
    /// unavailable ends the run.
    async fn deliver(
        &self,
        run: &mut SyncRun,
        destination: &Destination,
        op: Op,
        members: &[Member],
        progress: &Progress<'_>,
    ) -> Result<(), ActivationError> {
        let limit = destination.target.batch_limit().max(1);
        let batches = members.len().div_ceil(limit);
        // Files say why they were written: `<activation>-<run>` for a sync,
        // `<activation>-erasure-<run>` for a removal of another kind.
        let name = match run.trigger {
            Trigger::Sync => format!("{}-{}", run.activation_id, run.id),
            other => format!("{}-{}-{}", run.activation_id, other.as_str(), run.id),
        };
        for (index, chunk) in members.chunks(limit).enumerate() {
            let batch = Batch {
                op,
                session: &run.id,
                seq: u32::try_from(index + 1).unwrap_or(u32::MAX),
                last: index + 1 == batches,
                total: members.len() as u64,
                members: chunk,
            };
            if op == Op::Add {
                self.store.prepare(&run.activation_id, chunk).await?;
            }
            let outcome = self
                .delivery
                .send(&destination.target, &name, batch, &mut run.retries)
                .await;
            let mut record = BatchRecord {
                run_id: run.id.clone(),
                activation_id: run.activation_id.clone(),
                op,
                seq: batch.seq,
                members: chunk.len() as u64,
                outcome: "sent",
                http_status: None,
                digest: digest(chunk),
                error: String::new(),
            };
            match outcome {
                Ok(receipt) => {
                    let (added, removed) = match op {
                        Op::Add => (chunk, &[][..]),
                        Op::Remove => (&[][..], chunk),
                    };
                    // The destination has the batch; only now is it recorded.
                    self.store
                        .acknowledge(&run.activation_id, added, removed)
                        .await?;
                    self.store.record_batch(&record).await?;
                    run.batches_sent += 1;
                    match op {
                        Op::Add => run.added += chunk.len() as u64,
                        Op::Remove => run.removed += chunk.len() as u64,
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
        }
        Ok(())
    }

    /// Removes `members` from an activation's destination now, as a run of
    /// its own (waiting for a sync in progress to end first), and forgets
    /// them once the destination acknowledged.
    pub async fn remove(
        &self,
        activation_id: &str,
        members: &[Member],
        trigger: Trigger,
    ) -> Result<SyncRun, ActivationError> {
        let lock = self.lock_of(activation_id)?;
        let _running = lock.lock().await;
        let activation = self.store.activation(activation_id).await?;
        let destination = self.store.destination(&activation.destination_id).await?;
        // Held again under the lock: a sync that just ended may have removed
        // some already.
        let ids: Vec<String> = members.iter().map(|member| member.id.clone()).collect();
        let members = self.store.held_members(activation_id, &ids).await?;
        let mut run = SyncRun::start(activation_id, trigger);
        run.phase = Phase::Sending;
        run.to_send = members.len() as u64;
        self.store.save_run(&run).await?;
        let mut outcome = self
            .deliver(
                &mut run,
                &destination,
                Op::Remove,
                &members,
                &Progress(None),
            )
            .await;
        if outcome.is_ok() && run.batches_rejected > 0 {
            outcome = Err(ActivationError::BatchesRefused {
                refused: run.batches_rejected,
                batches: run.batches_sent + run.batches_rejected,
                first: std::mem::take(&mut run.error),
            });
        }
        self.finish(&mut run, outcome).await.map(|()| run)
    }

    /// Removes everyone held whose identifiers include one of these hashes
    /// from every destination that holds them, then forgets them. Returns
    /// the removals delivered and where they went.
    pub async fn forget(
        &self,
        identifier_sha256s: &[String],
    ) -> Result<(u64, Vec<String>), ActivationError> {
        let mut by_activation: std::collections::BTreeMap<String, Vec<Member>> =
            std::collections::BTreeMap::new();
        for holding in self.store.holders_of(identifier_sha256s).await? {
            by_activation
                .entry(holding.activation_id)
                .or_default()
                .push(holding.member);
        }
        let mut removed = 0;
        let mut outputs = Vec::new();
        for (activation_id, members) in by_activation {
            let run = self
                .remove(&activation_id, &members, Trigger::Erasure)
                .await?;
            removed += run.removed;
            if !run.output.is_empty() {
                outputs.push(run.output);
            }
        }
        Ok((removed, outputs))
    }

    async fn fetch(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        progress: &Progress<'_>,
    ) -> Result<Audience, ActivationError> {
        let bearer = self.bearer().await?;
        let mut client = SegmentServiceClient::with_interceptor(
            self.gateway.clone(),
            move |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
                Ok(request)
            },
        );
        let request = segments_pb::ExportAudienceRequest {
            segment_id: activation.segment_id.clone(),
            destination_id: destination.id.clone(),
            destination_kind: destination.target.kind().to_string(),
            purpose: activation.purpose.clone(),
            snapshot_cursor: 0,
        };
        let gateway_error = |status: tonic::Status| ActivationError::Gateway {
            code: status.code(),
            message: status.message().to_string(),
        };
        let mut stream = client
            .export_audience(request)
            .await
            .map_err(gateway_error)?
            .into_inner();
        let mut audience = Audience::new();
        while let Some(chunk) = stream.message().await.map_err(gateway_error)? {
            for member in chunk.members {
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
                identifiers.sort();
                audience.insert(member.pseudonymous_id, identifiers);
            }
            run.members_received = audience.len() as u64;
            progress.report(run);
        }
        Ok(audience)
    }

    async fn bearer(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, ActivationError> {
        madtech_common::bearer::from_file(&self.config.gateway_token_file)
            .await
            .map_err(ActivationError::Token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HeldMember;

    fn ids(sha: &str) -> Vec<HashedIdentifier> {
        vec![HashedIdentifier {
            kind: "email".into(),
            sha256: sha.into(),
        }]
    }

    fn member(id: &str, sha: &str) -> Member {
        Member {
            id: id.into(),
            identifiers: ids(sha),
        }
    }

    fn held(members: &[(&str, &str, bool)]) -> Held {
        members
            .iter()
            .map(|(id, sha, confirmed)| {
                let member = HeldMember {
                    identifiers: ids(sha),
                    confirmed: *confirmed,
                };
                (id.to_string(), member)
            })
            .collect()
    }

    #[test]
    fn diff_sends_only_what_changed() {
        let held = held(&[
            ("a", "1", true),
            ("b", "2", true),
            ("c", "3", true),
            ("e", "5", false),
        ]);
        let audience: Audience = [("a", "1"), ("b", "changed"), ("d", "4"), ("e", "5")]
            .into_iter()
            .map(|(id, sha)| (id.to_string(), ids(sha)))
            .collect();
        let diff = diff(&held, audience);
        assert_eq!(diff.unchanged, 1);
        assert_eq!(
            diff.adds,
            vec![member("b", "changed"), member("d", "4"), member("e", "5")],
            "an add never confirmed is sent again"
        );
        assert_eq!(
            diff.removes,
            vec![member("c", "3")],
            "a removal carries what the destination was given"
        );
    }

    #[test]
    fn an_empty_audience_removes_everyone_held_or_maybe_held() {
        let diff = diff(
            &held(&[("a", "1", true), ("b", "1", false)]),
            Audience::new(),
        );
        assert_eq!(diff.removes, vec![member("a", "1"), member("b", "1")]);
        assert!(diff.adds.is_empty());
    }

    #[test]
    fn batch_digests_depend_on_every_id_and_hash() {
        let one = digest(&[member("a", "1")]);
        assert_ne!(one, digest(&[member("a", "2")]));
        assert_ne!(one, digest(&[member("b", "1")]));
        assert_eq!(one, digest(&[member("a", "1")]));
    }
}
