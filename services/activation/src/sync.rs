//! Sync runs: fetch the audience through the gateway, compare it with what the
//! destination already holds, deliver only the adds and removes, and record
//! the new state only once the destination has them. A run killed at any
//! point is safe to run again: nothing is recorded as sent that was not.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use madtech_proto::segments::v1 as segments_pb;
use segments_pb::segment_service_client::SegmentServiceClient;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::ActivationConfig;
use crate::destination::{self, Change, HashedIdentifier, Target};
use crate::error::ActivationError;
use crate::store::{Activation, ActivationStore, Destination, Held, Phase, SyncRun};

/// The audience as the gateway released it: pseudonymous id → hashes.
pub type Audience = HashMap<String, Vec<HashedIdentifier>>;

/// What a sync must send.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub adds: Vec<(String, Vec<HashedIdentifier>)>,
    pub removes: Vec<String>,
    pub unchanged: u64,
}

/// Adds are members the destination does not surely hold as they are now
/// (not held, held with other identifiers, or an add never confirmed);
/// removes are members it holds or may hold that are no longer released.
/// Both come out sorted, so a file's content depends only on the change.
pub fn diff(held: &Held, audience: Audience) -> Diff {
    let mut result = Diff::default();
    for (id, identifiers) in audience.iter() {
        match held.get(id) {
            Some(sent) if sent.confirmed && &sent.identifiers == identifiers => {
                result.unchanged += 1
            }
            _ => result.adds.push((id.clone(), identifiers.clone())),
        }
    }
    result.removes = held
        .keys()
        .filter(|id| !audience.contains_key(*id))
        .cloned()
        .collect();
    result.adds.sort();
    result.removes.sort();
    result
}

/// Runs syncs, at most one at a time per activation.
pub struct Syncer {
    store: Arc<ActivationStore>,
    gateway: Channel,
    config: ActivationConfig,
    running: Mutex<HashSet<String>>,
}

/// Releases an activation's slot when its run ends, however it ends.
struct RunningGuard<'a> {
    running: &'a Mutex<HashSet<String>>,
    activation_id: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.activation_id);
        }
    }
}

impl Syncer {
    pub fn new(store: Arc<ActivationStore>, gateway: Channel, config: ActivationConfig) -> Self {
        Syncer {
            store,
            gateway,
            config,
            running: Mutex::new(HashSet::new()),
        }
    }

    fn claim(&self, activation_id: &str) -> Result<RunningGuard<'_>, ActivationError> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| ActivationError::Corrupt("sync registry lock poisoned".into()))?;
        if !running.insert(activation_id.to_string()) {
            return Err(ActivationError::SyncRunning);
        }
        Ok(RunningGuard {
            running: &self.running,
            activation_id: activation_id.to_string(),
        })
    }

    /// Runs one sync, reporting progress on `progress` (lossy while running;
    /// the final state is always delivered while the receiver lives).
    pub async fn run(
        &self,
        activation_id: &str,
        progress: mpsc::Sender<SyncRun>,
    ) -> Result<SyncRun, ActivationError> {
        let _slot = self.claim(activation_id)?;
        let activation = self.store.activation(activation_id).await?;
        let destination = self.store.destination(&activation.destination_id).await?;
        let mut run = SyncRun::start(activation_id);
        self.store.save_run(&run).await?;
        let _ = progress.try_send(run.clone());

        let outcome = self
            .deliver(&mut run, &activation, &destination, &progress)
            .await;
        run.finished_at_micros = Some(Utc::now().timestamp_micros());
        match &outcome {
            Ok(()) => run.phase = Phase::Succeeded,
            Err(err) => {
                run.phase = Phase::Failed;
                tracing::warn!(activation = %activation_id, run = %run.id, error = %err, "sync failed");
                // What callers see is what the status mapping lets out, so
                // internal detail stays in the log.
                run.error = err.to_status().message().to_string();
            }
        }
        self.store.save_run(&run).await?;
        let _ = progress.send(run.clone()).await;
        outcome.map(|()| run)
    }

    async fn deliver(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        progress: &mpsc::Sender<SyncRun>,
    ) -> Result<(), ActivationError> {
        let audience = self.fetch(run, activation, destination, progress).await?;
        let held = self.store.held(&run.activation_id).await?;
        let diff = diff(&held, audience);
        run.phase = Phase::Sending;
        run.unchanged = diff.unchanged;
        let _ = progress.try_send(run.clone());

        if !diff.adds.is_empty() || !diff.removes.is_empty() {
            self.store.prepare(&run.activation_id, &diff.adds).await?;
            let changes: Vec<Change> = diff
                .adds
                .iter()
                .map(|(id, identifiers)| Change::Add {
                    id: id.clone(),
                    identifiers: identifiers.clone(),
                })
                .chain(
                    diff.removes
                        .iter()
                        .map(|id| Change::Remove { id: id.clone() }),
                )
                .collect();
            let name = format!("{}-{}.jsonl", run.activation_id, run.id);
            run.output = self.send(destination, name, changes).await?;
        }
        // The destination has the changes; only now is the state recorded.
        self.store
            .acknowledge(&run.activation_id, &diff.adds, &diff.removes)
            .await?;
        run.added = diff.adds.len() as u64;
        run.removed = diff.removes.len() as u64;
        Ok(())
    }

    /// Delivers `changes` to the destination; returns where they went.
    async fn send(
        &self,
        destination: &Destination,
        name: String,
        changes: Vec<Change>,
    ) -> Result<String, ActivationError> {
        let Target::File { directory } = &destination.target;
        let directory: PathBuf = self.config.file_root.join(directory);
        let written = tokio::task::spawn_blocking(move || {
            destination::write_jsonl(&directory, &name, &changes)
        })
        .await
        .map_err(|err| ActivationError::Corrupt(format!("file writer stopped: {err}")))??;
        Ok(written.display().to_string())
    }

    /// Removes everyone held whose identifiers include one of these hashes
    /// from every destination that holds them, then forgets them: the
    /// removals are delivered before the state is dropped, so a crash in
    /// between repeats the removal rather than losing it. Returns the
    /// removals delivered and where they went.
    pub async fn forget(
        &self,
        identifier_sha256s: &[String],
    ) -> Result<(u64, Vec<String>), ActivationError> {
        let holders = self.store.holders_of(identifier_sha256s).await?;
        let mut by_activation: std::collections::BTreeMap<String, Vec<String>> =
            std::collections::BTreeMap::new();
        for (activation_id, pseudonymous_id, _, _) in holders {
            by_activation
                .entry(activation_id)
                .or_default()
                .push(pseudonymous_id);
        }
        let mut removed = 0;
        let mut outputs = Vec::new();
        for (activation_id, ids) in by_activation {
            let _slot = self.claim(&activation_id)?;
            let activation = self.store.activation(&activation_id).await?;
            let destination = self.store.destination(&activation.destination_id).await?;
            let changes = ids
                .iter()
                .map(|id| Change::Remove { id: id.clone() })
                .collect();
            let name = format!("{activation_id}-erasure-{}.jsonl", uuid::Uuid::now_v7());
            outputs.push(self.send(&destination, name, changes).await?);
            self.store.acknowledge(&activation_id, &[], &ids).await?;
            removed += ids.len() as u64;
        }
        Ok((removed, outputs))
    }

    async fn fetch(
        &self,
        run: &mut SyncRun,
        activation: &Activation,
        destination: &Destination,
        progress: &mpsc::Sender<SyncRun>,
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
            let _ = progress.try_send(run.clone());
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
            vec![
                ("b".to_string(), ids("changed")),
                ("d".to_string(), ids("4")),
                ("e".to_string(), ids("5")),
            ],
            "an add never confirmed is sent again"
        );
        assert_eq!(diff.removes, vec!["c".to_string()]);
    }

    #[test]
    fn an_empty_audience_removes_everyone_held_or_maybe_held() {
        let diff = diff(
            &held(&[("a", "1", true), ("b", "1", false)]),
            Audience::new(),
        );
        assert_eq!(diff.removes, vec!["a".to_string(), "b".to_string()]);
        assert!(diff.adds.is_empty());
    }
}
