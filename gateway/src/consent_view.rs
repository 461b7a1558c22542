//! The gateway's view of consent: the current state per (person, purpose),
//! kept fresh by the consent service's change stream and filled on demand by
//! batch lookups, so a crossing rarely waits on the consent service.
//!
//! Three rules keep the view from ever being staler than the ledger was when
//! a crossing started:
//! - Every crossing first asks for the ledger head and waits until the change
//!   stream has delivered it; if it does not arrive in time, the crossing
//!   asks the consent service for every member instead of trusting the view.
//! - Only entries that became the current state (`effective`) change the
//!   view, and current states change in cursor order, so the entry with the
//!   higher cursor is always the newer state, whichever path brought it.
//! - When the view is full it is emptied and its generation bumped; a batch
//!   answer that was in flight across that is used once, not remembered.
//!
//! Fail closed: an unreachable consent service stops the crossing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use consent_pb::consent_service_client::ConsentServiceClient;
use madtech_common::upstream::Upstream;
use madtech_proto::consent::v1 as consent_pb;
use madtech_proto::segments::v1 as segments_pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;

use crate::crossing::with_deadline;
use crate::policy::now_micros;

/// The consent service answers at most this many people per batch.
const MAX_BATCH: usize = 10_000;

/// Whose consent a member's crossing depends on: the member and every
/// profile merged into them.
pub trait Subject {
    fn profile_id(&self) -> &str;
    fn merged_profile_ids(&self) -> impl Iterator<Item = &str>;
}

impl<S: Subject> Subject for &S {
    fn profile_id(&self) -> &str {
        (*self).profile_id()
    }

    fn merged_profile_ids(&self) -> impl Iterator<Item = &str> {
        (*self).merged_profile_ids()
    }
}

impl Subject for segments_pb::AudienceMember {
    fn profile_id(&self) -> &str {
        &self.profile_id
    }

    fn merged_profile_ids(&self) -> impl Iterator<Item = &str> {
        self.merged_profile_ids.iter().map(String::as_str)
    }
}

impl Subject for crate::page::MemberView<'_> {
    fn profile_id(&self) -> &str {
        self.profile_id
    }

    fn merged_profile_ids(&self) -> impl Iterator<Item = &str> {
        self.merged_profile_ids.iter().copied()
    }
}

/// How the gateway keeps its view of consent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsentViewConfig {
    /// (person, purpose) states remembered; past this the view starts over.
    /// About 80 bytes each.
    pub capacity: usize,
    /// How long a crossing waits for the change stream to catch up with the
    /// ledger before it asks the consent service about every member instead.
    #[serde(with = "humantime_serde")]
    pub freshness_timeout: Duration,
}

impl Default for ConsentViewConfig {
    fn default() -> Self {
        ConsentViewConfig {
            capacity: 1_000_000,
            freshness_timeout: Duration::from_secs(2),
        }
    }
}

/// A known current state and the ledger entry behind it (0 for unset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    state: consent_pb::ConsentState,
    cursor: u64,
    /// When the choice stops counting (Unix microseconds): the ledger sends
    /// nothing when a choice expires, so the view checks at each read.
    expires_at_micros: Option<i64>,
}

impl Known {
    fn state_at(&self, now_micros: i64) -> consent_pb::ConsentState {
        match self.expires_at_micros {
            Some(expiry) if expiry <= now_micros => consent_pb::ConsentState::Unset,
            _ => self.state,
        }
    }
}

fn expiry_micros(at: Option<&prost_types::Timestamp>) -> Option<i64> {
    // An expiry that does not convert is treated as already passed: fail
    // closed rather than keep a grant forever.
    at.map(|at| madtech_proto::time::to_micros(at).unwrap_or(i64::MIN))
}

/// The view's entries for one purpose, by person.
///
/// A crossing looks every member up here, one page after another in
/// ascending profile id. In a hash table those lookups land anywhere: at
/// 100k people the probe alone, not the hashing, was an eighth of the
/// export's CPU, keyed by strings or by 128-bit ids alike. Profile ids as the profiles service mints them (UUIDs,
/// lower-case and hyphenated) are therefore kept as 128-bit keys in a
/// B-tree, whose order is the ids' own: consecutive members fall in the
/// same or the next leaf, and the nodes above stay in cache. Any other
/// spelling of an id is kept as it is, in a hash table, so no two spellings
/// ever share an entry.
#[derive(Default)]
struct People {
    minted: BTreeMap<u128, Known>,
    others: HashMap<Box<str>, Known>,
}

/// `person` as a 128-bit key when it is a UUID in its one canonical
/// spelling (36 characters, lower-case hex and hyphens), so that the key
/// maps back to exactly that string and orders as it does.
fn minted_key(person: &str) -> Option<u128> {
    if person.len() != 36 || person.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    uuid::Uuid::try_parse(person).ok().map(|id| id.as_u128())
}

impl People {
    fn get(&self, person: &str) -> Option<&Known> {
        match minted_key(person) {
            Some(key) => self.minted.get(&key),
            None => self.others.get(person),
        }
    }

    fn get_mut(&mut self, person: &str) -> Option<&mut Known> {
        match minted_key(person) {
            Some(key) => self.minted.get_mut(&key),
            None => self.others.get_mut(person),
        }
    }

    fn insert(&mut self, person: &str, known: Known) {
        match minted_key(person) {
            Some(key) => self.minted.insert(key, known),
            None => self.others.insert(person.into(), known),
        };
    }

    fn remove(&mut self, person: &str) -> Option<Known> {
        match minted_key(person) {
            Some(key) => self.minted.remove(&key),
            None => self.others.remove(person),
        }
    }
}

#[derive(Default)]
struct Cache {
    /// By purpose, then person: a chunk looks its purpose up once.
    by_purpose: HashMap<Box<str>, People>,
    len: usize,
    /// Bumped whenever the cache is emptied.
    generation: u64,
}

impl Cache {
    /// Remembers `known` unless a newer state is known already.
    fn learn(&mut self, capacity: usize, purpose: &str, person: &str, known: Known) {
        if let Some(current) = self
            .by_purpose
            .get_mut(purpose)
            .and_then(|people| people.get_mut(person))
        {
            if known.cursor >= current.cursor {
                *current = known;
            }
            return;
        }
        if self.len >= capacity {
            self.by_purpose.clear();
            self.len = 0;
            self.generation += 1;
        }
        self.by_purpose
            .entry(purpose.into())
            .or_default()
            .insert(person, known);
        self.len += 1;
    }

    /// Remembers the consent service's answers to a lookup made while the
    /// cache was in `generation`, for as long as it still is. A clear
    /// throws away what the change stream delivered since the lookup, which
    /// may be newer than these answers; the `learn` of one of them can be
    /// what clears it, and then the rest are not remembered.
    fn learn_answers<'a>(
        &mut self,
        capacity: usize,
        purpose: &str,
        generation: u64,
        answers: impl IntoIterator<Item = (&'a str, Known)>,
    ) {
        for (person, answer) in answers {
            if self.generation != generation {
                return;
            }
            if answer.state != consent_pb::ConsentState::Unspecified {
                self.learn(capacity, purpose, person, answer);
            }
        }
    }
}

/// The view, shared by every crossing and fed by one watcher task.
pub struct ConsentView {
    cache: Mutex<Cache>,
    capacity: usize,
    freshness_timeout: Duration,
    /// The last ledger cursor the change stream delivered.
    seen: watch::Sender<u64>,
    client: ConsentServiceClient<Upstream>,
}

/// How one crossing reads consent, decided when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The view has seen the ledger as it was when the crossing started.
    Current,
    /// The view lags: every member is asked for.
    Lagging,
}

impl ConsentView {
    pub fn new(config: &ConsentViewConfig, consent: Upstream) -> Arc<Self> {
        Arc::new(ConsentView {
            cache: Mutex::new(Cache::default()),
            capacity: config.capacity.max(1),
            freshness_timeout: config.freshness_timeout,
            seen: watch::channel(0).0,
            client: ConsentServiceClient::new(consent),
        })
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves at worst a half-learned
        // state, which the next newer entry overwrites; keep serving.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows the change stream until `shutdown`, from the ledger head at
    /// start, resuming from the last cursor after any disconnect.
    pub async fn follow(self: Arc<Self>, shutdown: madtech_common::CancellationToken) {
        let backoff = madtech_common::changelog::Backoff::default();
        let mut position = None;
        loop {
            let run = async {
                let after = match position {
                    Some(cursor) => cursor,
                    None => {
                        let head = self.head(None).await?;
                        position = Some(head);
                        self.seen.send_replace(head);
                        head
                    }
                };
                let request = consent_pb::WatchConsentChangesRequest {
                    after_cursor: after,
                };
                let mut stream = self
                    .client
                    .clone()
                    .watch_consent_changes(request)
                    .await?
                    .into_inner();
                while let Some(change) = stream.message().await? {
                    backoff.reset();
                    if let Some(entry) = change.entry {
                        self.apply(&entry);
                        position = Some(entry.cursor);
                    }
                }
                Ok::<(), Status>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = run => {
                    match ended {
                        Ok(()) => tracing::warn!("the consent change stream ended; resuming"),
                        Err(status) => tracing::warn!(code = ?status.code(), "the consent change stream failed; resuming"),
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }

    /// What the view holds for a person and purpose, if anything.
    pub fn remembered(&self, purpose: &str, person: &str) -> Option<consent_pb::ConsentState> {
        let cache = self.cache();
        cache
            .by_purpose
            .get(purpose)
            .and_then(|people| people.get(person))
            .map(|known| known.state_at(now_micros()))
    }

    /// Takes one ledger entry from the change stream into the view.
    fn apply(&self, entry: &consent_pb::ConsentEntry) {
        if entry.effective {
            let state = consent_pb::ConsentState::try_from(entry.state)
                .unwrap_or(consent_pb::ConsentState::Unspecified);
            let mut cache = self.cache();
            if state == consent_pb::ConsentState::Unspecified {
                // Nothing is remembered that could not be decided on; the
                // person is asked for afresh next time.
                if let Some(people) = cache.by_purpose.get_mut(entry.purpose.as_str())
                    && people.remove(entry.profile_id.as_str()).is_some()
                {
                    cache.len -= 1;
                }
            } else {
                cache.learn(
                    self.capacity,
                    &entry.purpose,
                    &entry.profile_id,
                    Known {
                        state,
                        cursor: entry.cursor,
                        expires_at_micros: expiry_micros(entry.expires_at.as_ref()),
                    },
                );
            }
            metrics::gauge!("madtech_gateway_consent_view_entries").set(cache.len as f64);
        }
        self.seen.send_replace(entry.cursor);
        metrics::gauge!("madtech_gateway_consent_view_cursor").set(entry.cursor as f64);
    }

    async fn head(&self, deadline: Option<Instant>) -> Result<u64, Status> {
        Ok(self
            .client
            .clone()
            .get_ledger_head(with_deadline(
                consent_pb::GetLedgerHeadRequest {},
                deadline,
            )?)
            .await?
            .into_inner()
            .cursor)
    }

    /// Called when a crossing starts: may it read from the view?
    pub async fn freshness(&self, deadline: Option<Instant>) -> Result<Freshness, Status> {
        let head = self.head(deadline).await.map_err(unavailable)?;
        let mut seen = self.seen.subscribe();
        let mut wait_until = Instant::now() + self.freshness_timeout;
        if let Some(deadline) = deadline {
            wait_until = wait_until.min(deadline);
        }
        let caught_up =
            tokio::time::timeout_at(wait_until, seen.wait_for(|cursor| *cursor >= head));
        match caught_up.await {
            Ok(Ok(_)) => Ok(Freshness::Current),
            _ => {
                tracing::warn!(
                    head,
                    seen = *self.seen.borrow(),
                    "the consent view lags the ledger; this crossing asks for every member"
                );
                metrics::counter!("madtech_gateway_consent_view_lagging_total").increment(1);
                Ok(Freshness::Lagging)
            }
        }
    }

    /// Each member's consent for `purpose`, in member order: the most
    /// restrictive state among the member and every profile merged into it,
    /// so a merge never widens consent.
    pub async fn states<M: Subject>(
        &self,
        members: &[M],
        purpose: &str,
        freshness: Freshness,
        deadline: Option<Instant>,
    ) -> Result<Vec<consent_pb::ConsentState>, Status> {
        // One slot per person, in member order: each member, then the ids
        // merged into them.
        let people: Vec<&str> = members
            .iter()
            .flat_map(|m| std::iter::once(m.profile_id()).chain(m.merged_profile_ids()))
            .collect();
        let (mut known, generation) = {
            let cache = self.cache();
            let cached = match freshness {
                Freshness::Current => cache.by_purpose.get(purpose),
                Freshness::Lagging => None,
            };
            let known: Vec<Option<Known>> = people
                .iter()
                .map(|person| cached.and_then(|by_person| by_person.get(person)).copied())
                .collect();
            (known, cache.generation)
        };
        // A person listed twice is asked once.
        let mut missing: Vec<&str> = people
            .iter()
            .zip(&known)
            .filter(|(_, known)| known.is_none())
            .map(|(person, _)| *person)
            .collect();
        missing.sort_unstable();
        missing.dedup();
        metrics::counter!("madtech_gateway_consent_view_lookups_total", "result" => "hit")
            .increment(known.iter().filter(|known| known.is_some()).count() as u64);
        metrics::counter!("madtech_gateway_consent_view_lookups_total", "result" => "miss")
            .increment(missing.len() as u64);

        if !missing.is_empty() {
            let mut answered: HashMap<&str, Known> = HashMap::with_capacity(missing.len());
            for batch in missing.chunks(MAX_BATCH) {
                let answers = self.lookup(batch, purpose, deadline).await?;
                if freshness == Freshness::Current {
                    self.cache().learn_answers(
                        self.capacity,
                        purpose,
                        generation,
                        batch.iter().copied().zip(answers.iter().copied()),
                    );
                }
                answered.extend(batch.iter().copied().zip(answers));
            }
            for (slot, person) in known.iter_mut().zip(&people) {
                if slot.is_none() {
                    *slot = answered.get(person).copied();
                }
            }
        }

        let now = now_micros();
        let mut slots = known.into_iter();
        Ok(members
            .iter()
            .map(|member| {
                (0..=member.merged_profile_ids().count())
                    .map(|_| {
                        slots
                            .next()
                            .flatten()
                            .map_or(UNKNOWN.state, |known| known.state_at(now))
                    })
                    .min_by_key(|state| restrictiveness(*state))
                    .unwrap_or(consent_pb::ConsentState::Unspecified)
            })
            .collect())
    }

    /// Asks the consent service, failing closed on anything but an answer
    /// exactly about these people and this purpose.
    async fn lookup(
        &self,
        people: &[&str],
        purpose: &str,
        deadline: Option<Instant>,
    ) -> Result<Vec<Known>, Status> {
        let request = consent_pb::BatchGetConsentRequest {
            profile_ids: people.iter().map(|p| p.to_string()).collect(),
            purposes: vec![purpose.to_string()],
        };
        let answer = self
            .client
            .clone()
            .batch_get_consent(with_deadline(request, deadline)?)
            .await
            .map_err(unavailable)?
            .into_inner();
        if answer.subjects.len() != people.len() {
            return Err(Status::internal(
                "consent answered for the wrong number of people",
            ));
        }
        people
            .iter()
            .zip(&answer.subjects)
            .map(|(person, subject)| {
                if subject.profile_id != *person {
                    return Err(Status::internal("consent answered for someone else"));
                }
                subject
                    .purposes
                    .iter()
                    .find(|p| p.purpose == purpose)
                    .map(|p| Known {
                        state: consent_pb::ConsentState::try_from(p.state)
                            .unwrap_or(consent_pb::ConsentState::Unspecified),
                        cursor: p.cursor,
                        expires_at_micros: expiry_micros(p.expires_at.as_ref()),
                    })
                    .ok_or_else(|| Status::internal("consent did not answer for the purpose"))
            })
            .collect()
    }
}

const UNKNOWN: Known = Known {
    state: consent_pb::ConsentState::Unspecified,
    cursor: 0,
    expires_at_micros: None,
};

/// What a crossing answers when consent could not be read: nothing
/// crosses. A caller whose own deadline ran out hears that, not that the
/// consent service is down.
fn unavailable(status: Status) -> Status {
    if status.code() == tonic::Code::DeadlineExceeded {
        return Status::deadline_exceeded("the deadline passed while consent was read");
    }
    tracing::warn!(code = ?status.code(), "consent lookup failed; nothing crosses");
    Status::unavailable("the consent service is unavailable; nothing may cross")
}

/// How restrictive a consent state is: the lower, the more restrictive.
fn restrictiveness(state: consent_pb::ConsentState) -> u8 {
    match state {
        consent_pb::ConsentState::Denied => 0,
        consent_pb::ConsentState::Unspecified => 1,
        consent_pb::ConsentState::Unset => 2,
        consent_pb::ConsentState::Granted => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consent_pb::ConsentState::{Denied, Granted, Unset};

    fn known(state: consent_pb::ConsentState, cursor: u64) -> Known {
        Known {
            state,
            cursor,
            expires_at_micros: None,
        }
    }

    #[test]
    fn an_expired_state_reads_as_unset() {
        let now = 1_700_000_000_000_000;
        let expiring = Known {
            expires_at_micros: Some(now),
            ..known(Granted, 3)
        };
        assert_eq!(expiring.state_at(now - 1), Granted);
        assert_eq!(expiring.state_at(now), Unset);
        assert_eq!(known(Granted, 3).state_at(i64::MAX), Granted);
        let garbled = prost_types::Timestamp {
            seconds: 1,
            nanos: -5,
        };
        assert_eq!(
            expiry_micros(Some(&garbled)),
            Some(i64::MIN),
            "an expiry that does not convert has passed"
        );
    }

    #[test]
    fn every_spelling_of_an_id_is_its_own_person() {
        let known = |cursor| Known {
            state: consent_pb::ConsentState::Granted,
            cursor,
            expires_at_micros: None,
        };
        let minted = "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b";
        let spellings = [
            minted.to_string(),
            minted.to_uppercase(),
            minted.replace('-', ""),
            format!("{{{minted}}}"),
            "p1".to_string(),
        ];
        assert_eq!(
            minted_key(minted).map(|key| uuid::Uuid::from_u128(key).to_string()),
            Some(minted.to_string()),
            "a minted id is keyed by the UUID it spells"
        );
        let mut people = People::default();
        for (cursor, person) in (1..).zip(&spellings) {
            people.insert(person, known(cursor));
        }
        for (cursor, person) in (1..).zip(&spellings) {
            assert_eq!(people.get(person), Some(&known(cursor)), "{person}");
        }
        assert_eq!(people.remove(minted), Some(known(1)));
        assert_eq!(people.get(minted), None);
        assert_eq!(people.get(&spellings[1]), Some(&known(2)));
        people.get_mut(&spellings[4]).expect("p1 is held").cursor = 9;
        assert_eq!(people.get("p1"), Some(&known(9)));
    }

    fn get(cache: &Cache, purpose: &str, person: &str) -> Option<Known> {
        cache.by_purpose.get(purpose)?.get(person).copied()
    }

    #[test]
    fn the_higher_cursor_wins_whichever_arrives_first() {
        let mut cache = Cache::default();
        // The change stream delivers a withdrawal before an older batch
        // answer lands: the withdrawal stands.
        cache.learn(10, "ads", "p1", known(Denied, 7));
        cache.learn(10, "ads", "p1", known(Granted, 3));
        assert_eq!(get(&cache, "ads", "p1"), Some(known(Denied, 7)));
        // An unset answer (cursor 0) never hides a recorded choice.
        cache.learn(10, "ads", "p1", known(Unset, 0));
        assert_eq!(get(&cache, "ads", "p1"), Some(known(Denied, 7)));
        // A newer choice replaces it.
        cache.learn(10, "ads", "p1", known(Granted, 9));
        assert_eq!(get(&cache, "ads", "p1"), Some(known(Granted, 9)));
        assert_eq!(get(&cache, "other", "p1"), None, "purposes are apart");
        assert_eq!(cache.len, 1);
    }

    #[test]
    fn a_full_cache_starts_over_in_a_new_generation() {
        let mut cache = Cache::default();
        cache.learn(2, "ads", "p1", known(Granted, 1));
        cache.learn(2, "ads", "p2", known(Granted, 2));
        assert_eq!(cache.generation, 0);
        cache.learn(2, "ads", "p3", known(Denied, 3));
        assert_eq!(cache.generation, 1);
        assert_eq!(cache.len, 1);
        assert_eq!(get(&cache, "ads", "p1"), None);
        assert_eq!(get(&cache, "ads", "p3"), Some(known(Denied, 3)));
    }

    #[test]
    fn answers_are_not_remembered_once_a_clear_may_have_dropped_newer_states() {
        let mut cache = Cache::default();
        cache.learn(2, "ads", "p0", known(Granted, 1));
        // A crossing reads the cache (generation 0) and asks for p1 and p2;
        // meanwhile the stream delivers p2's withdrawal, filling the cache.
        let generation = cache.generation;
        cache.learn(2, "ads", "p2", known(Denied, 7));
        // The answers, older than the withdrawal: remembering p1 clears the
        // full cache, withdrawal and all, so p2's answer must not stand in
        // for it.
        cache.learn_answers(
            2,
            "ads",
            generation,
            [("p1", known(Granted, 3)), ("p2", known(Granted, 3))],
        );
        assert_eq!(get(&cache, "ads", "p1"), Some(known(Granted, 3)));
        assert_eq!(get(&cache, "ads", "p2"), None, "asked afresh next time");
        // Answers to a lookup from an earlier generation are all dropped.
        cache.learn_answers(2, "ads", generation, [("p3", known(Granted, 4))]);
        assert_eq!(get(&cache, "ads", "p3"), None);
        // Unspecified answers are never remembered.
        let current = cache.generation;
        cache.learn_answers(2, "ads", current, [("p4", UNKNOWN)]);
        assert_eq!(get(&cache, "ads", "p4"), None);
    }

    #[test]
    fn a_deadline_that_ran_out_is_not_blamed_on_the_consent_service() {
        let late = unavailable(Status::deadline_exceeded("upstream"));
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded);
        let down = unavailable(Status::internal("connection refused"));
        assert_eq!(down.code(), tonic::Code::Unavailable);
        assert!(!down.message().contains("refused"));
    }

    #[test]
    fn merged_profiles_never_widen_consent() {
        let order = [
            Granted,
            Unset,
            consent_pb::ConsentState::Unspecified,
            Denied,
        ];
        for (i, a) in order.iter().enumerate() {
            for b in &order[i..] {
                assert!(restrictiveness(*b) <= restrictiveness(*a), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let backoff = madtech_common::changelog::Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(delays[9], Duration::from_secs(5));
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(100));
    }
}
