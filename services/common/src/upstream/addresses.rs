//! Where an upstream's calls go: every address its name resolves to, kept
//! fresh, and for each call the less busy of two of them.
//!
//! Why resolve here rather than connect to the Service's one virtual IP:
//! kube-proxy balances connections, not HTTP/2 streams, so one connection
//! per upstream sent all of a caller's calls to a single pod. A headless
//! Service's name resolves to every ready pod instead; the caller keeps a
//! connection to each and re-resolves as pods come and go.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;

use super::connection::Endpoint;
use super::{UpstreamError, now_millis};

/// Turns a host name into addresses. Injectable, so tests can move an
/// upstream between addresses.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// The system's resolver (in Kubernetes, the cluster DNS).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let name = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
    }
}

/// How long a name that never resolved answers its last failure before it
/// is looked up again.
const NEGATIVE_ANSWER: Duration = Duration::from_secs(1);

/// `now` (see [`now_millis`]) plus `interval`.
fn after(now: u64, interval: Duration) -> u64 {
    now.saturating_add(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX))
}

/// The endpoints calls may go to.
pub(super) type Endpoints = Arc<Vec<Arc<Endpoint>>>;

/// An upstream's addresses: fixed for an IP address, resolved from its
/// name again every `interval` otherwise.
pub(super) struct Addresses {
    host: String,
    port: u16,
    /// `None` for an IP address, which never changes.
    resolver: Option<Arc<dyn Resolve>>,
    interval: Duration,
    /// The longest a lookup may take.
    timeout: Duration,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// When the next resolution is due (see [`now_millis`]); while there
    /// are no endpoints, until when the last failure is answered without
    /// looking again.
    due: AtomicU64,
    /// Resolutions so far, and (held while resolving) the last one's
    /// failure, shared by the calls that waited on it as with connecting.
    resolutions: AtomicU64,
    resolving: tokio::sync::Mutex<Option<String>>,
}

impl Addresses {
    pub(super) fn new(
        host: &str,
        port: u16,
        resolver: Arc<dyn Resolve>,
        interval: Duration,
        timeout: Duration,
    ) -> Addresses {
        let fixed = host.parse::<IpAddr>().ok();
        let endpoints = fixed.map_or_else(Vec::new, |ip| vec![Endpoint::new((ip, port).into())]);
        record_count(host, port, endpoints.len());
        Addresses {
            host: host.to_string(),
            port,
            resolver: fixed.is_none().then_some(resolver),
            interval,
            timeout,
            endpoints: ArcSwap::from_pointee(endpoints),
            due: AtomicU64::new(0),
            resolutions: AtomicU64::new(0),
            resolving: tokio::sync::Mutex::new(None),
        }
    }

    /// The endpoints as last resolved; the first call resolves them, and a
    /// call after `interval` has passed starts resolving them again without
    /// waiting for it.
    pub(super) async fn current(self: &Arc<Self>) -> Result<Endpoints, UpstreamError> {
        let endpoints = self.endpoints.load_full();
        if self.resolver.is_none() {
            return Ok(endpoints);
        }
        let due = self.due.load(Ordering::Relaxed);
        let now = now_millis();
        if !endpoints.is_empty() {
            // One call claims a due resolution; the others go on.
            if now >= due
                && self
                    .due
                    .compare_exchange(
                        due,
                        after(now, self.interval),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                let addresses = Arc::clone(self);
                tokio::spawn(async move {
                    let _ = addresses.resolve().await;
                });
            }
            return Ok(endpoints);
        }
        // A name that just failed to resolve answers its failure for a
        // while rather than being looked up for every call.
        if now < due
            && let Ok(last_failure) = self.resolving.try_lock()
            && let Some(failure) = last_failure.as_ref()
        {
            return Err(self.failure(failure.clone()));
        }
        // On a task of its own: the calls waiting share it, and a call
        // that gives up (its deadline) does not leave it to start again.
        let addresses = Arc::clone(self);
        tokio::spawn(async move { addresses.resolve().await })
            .await
            .unwrap_or_else(|_| Err(self.failure("the resolution stopped".into())))
    }

    /// Has the next call resolve again soon, as when an address could not
    /// be reached (its pod may be gone), yet not more than once a second.
    pub(super) fn resolve_soon(&self) {
        self.due.fetch_min(now_millis() + 1000, Ordering::Relaxed);
    }

    /// Resolves the name and keeps the endpoints of the addresses that
    /// remain (and their connections); a resolution that fails or finds
    /// nothing keeps the endpoints there were.
    async fn resolve(&self) -> Result<Endpoints, UpstreamError> {
        let Some(resolver) = &self.resolver else {
            return Ok(self.endpoints.load_full());
        };
        let resolutions_seen = self.resolutions.load(Ordering::Acquire);
        let mut last_failure = self.resolving.lock().await;
        let endpoints = self.endpoints.load_full();
        if self.resolutions.load(Ordering::Acquire) != resolutions_seen {
            return match last_failure.as_ref() {
                Some(failure) if endpoints.is_empty() => Err(self.failure(failure.clone())),
                _ => Ok(endpoints),
            };
        }
        // Due again after the interval, unless an unreachable address
        // asks for sooner while this lookup runs.
        self.due
            .store(after(now_millis(), self.interval), Ordering::Relaxed);
        let resolved = tokio::time::timeout(self.timeout, resolver.resolve(&self.host, self.port))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ))
            });
        self.resolutions.fetch_add(1, Ordering::Release);
        let mut addresses = match resolved {
            Ok(addresses) if !addresses.is_empty() => addresses,
            failed => {
                let failure = match failed {
                    Err(err) => err.to_string(),
                    Ok(_) => "no addresses".to_string(),
                };
                if !endpoints.is_empty() {
                    tracing::warn!(host = %self.host, %failure, "resolving an upstream failed; keeping its addresses");
                }
                *last_failure = Some(failure.clone());
                return if endpoints.is_empty() {
                    self.due
                        .store(after(now_millis(), NEGATIVE_ANSWER), Ordering::Relaxed);
                    Err(self.failure(failure))
                } else {
                    Ok(endpoints)
                };
            }
        };
        *last_failure = None;
        addresses.sort_unstable();
        addresses.dedup();
        let unchanged = addresses.len() == endpoints.len()
            && addresses
                .iter()
                .zip(endpoints.iter())
                .all(|(address, endpoint)| *address == endpoint.address);
        if unchanged {
            return Ok(endpoints);
        }
        let renewed: Endpoints = Arc::new(
            addresses
                .iter()
                .map(|address| {
                    endpoints
                        .iter()
                        .find(|endpoint| endpoint.address == *address)
                        .map_or_else(|| Endpoint::new(*address), Arc::clone)
                })
                .collect(),
        );
        tracing::info!(host = %self.host, addresses = ?addresses, "upstream addresses");
        record_count(&self.host, self.port, renewed.len());
        self.endpoints.store(Arc::clone(&renewed));
        Ok(renewed)
    }

    /// Each endpoint's load, in address order.
    #[cfg(test)]
    pub(super) fn loads(&self) -> Vec<(bool, usize)> {
        self.per_endpoint(Endpoint::load)
    }

    /// `read` of each endpoint, in address order.
    #[cfg(test)]
    pub(super) fn per_endpoint<T>(&self, read: impl Fn(&Endpoint) -> T) -> Vec<T> {
        self.endpoints.load().iter().map(|e| read(e)).collect()
    }

    fn failure(&self, reason: String) -> UpstreamError {
        UpstreamError::Resolve {
            host: self.host.clone(),
            reason,
        }
    }
}

/// `madtech_upstream_addresses{upstream="host:port"}`: how many addresses
/// (pods) each upstream's calls are spread over.
fn record_count(host: &str, port: u16, count: usize) {
    metrics::gauge!("madtech_upstream_addresses", "upstream" => format!("{host}:{port}"))
        .set(count as f64);
}

/// The endpoint for a call: of two chosen at random, the less busy
/// ("the power of two choices", as linkerd and tower balance), so no
/// endpoint needs a lock or a scan of the others.
pub(super) fn choose(endpoints: &[Arc<Endpoint>]) -> Option<&Arc<Endpoint>> {
    match endpoints {
        [] => None,
        [only] => Some(only),
        _ => {
            let first = fastrand::usize(..endpoints.len());
            let second = (first + 1 + fastrand::usize(..endpoints.len() - 1)) % endpoints.len();
            let (a, b) = (&endpoints[first], &endpoints[second]);
            Some(if b.load() < a.load() { b } else { a })
        }
    }
}

/// Where a call goes when connecting to `failed` did not work: the least
/// busy of the others, if there is one. Connecting failed before the call
/// was sent, so it can go elsewhere unchanged.
pub(super) fn instead_of<'a>(
    endpoints: &'a [Arc<Endpoint>],
    failed: &Endpoint,
) -> Option<&'a Arc<Endpoint>> {
    endpoints
        .iter()
        .filter(|endpoint| endpoint.address != failed.address)
        .min_by_key(|endpoint| endpoint.load())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::upstream::connection::Load;

    fn endpoints(count: u16) -> Vec<Arc<Endpoint>> {
        (0..count)
            .map(|port| Endpoint::new(SocketAddr::from(([10, 0, 0, 1], port))))
            .collect()
    }

    #[test]
    fn of_two_endpoints_the_less_busy_is_chosen() {
        let endpoints = endpoints(2);
        let _busy = Load::new(&endpoints[0]);
        for _ in 0..20 {
            let chosen = choose(&endpoints).expect("one");
            assert_eq!(chosen.address, endpoints[1].address);
        }
        assert!(choose(&[]).is_none());
    }

    #[test]
    fn calls_spread_over_many_endpoints() {
        fastrand::seed(7);
        let endpoints = endpoints(5);
        let mut held = Vec::new();
        for _ in 0..50 {
            held.push(Load::new(choose(&endpoints).expect("one")));
        }
        // Two choices keep the busiest within a few calls of the mean.
        let loads: Vec<usize> = endpoints.iter().map(|e| e.load().1).collect();
        assert_eq!(loads.iter().sum::<usize>(), 50);
        assert!(
            loads.iter().all(|load| (6..=14).contains(load)),
            "{loads:?}"
        );
    }

    #[test]
    fn an_endpoint_failing_to_connect_is_passed_over_until_it_connects() {
        let endpoints = endpoints(2);
        let _busy = Load::new(&endpoints[1]);
        endpoints[0].set_failing(true);
        let chosen = choose(&endpoints).expect("one");
        assert_eq!(chosen.address, endpoints[1].address, "busy beats failing");
        endpoints[0].set_failing(false);
        let chosen = choose(&endpoints).expect("one");
        assert_eq!(chosen.address, endpoints[0].address, "and then it is back");
    }

    #[test]
    fn a_failed_endpoint_is_passed_over_for_the_least_busy_other() {
        let endpoints = endpoints(3);
        let _busy = Load::new(&endpoints[1]);
        let other = instead_of(&endpoints, &endpoints[0]).expect("another");
        assert_eq!(other.address, endpoints[2].address);
        assert!(instead_of(&endpoints[..1], &endpoints[0]).is_none());
    }

    /// A resolver the test points elsewhere.
    struct Moving(Mutex<std::io::Result<Vec<SocketAddr>>>);

    impl Resolve for Moving {
        fn resolve(&self, _: &str, _: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
            let answer = match &*self.0.lock().expect("lock") {
                Ok(addresses) => Ok(addresses.clone()),
                Err(err) => Err(std::io::Error::new(err.kind(), err.to_string())),
            };
            Box::pin(async move { answer })
        }
    }

    /// Addresses of `host`, resolved again each minute.
    fn named(host: &str, resolver: Arc<dyn Resolve>, timeout: Duration) -> Arc<Addresses> {
        Arc::new(Addresses::new(
            host,
            50052,
            resolver,
            Duration::from_secs(60),
            timeout,
        ))
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 50052))
    }

    #[tokio::test]
    async fn resolving_keeps_the_endpoints_that_remain_and_the_last_good_set() {
        let resolver = Arc::new(Moving(Mutex::new(Ok(vec![addr(2), addr(1), addr(1)]))));
        let addresses = named("profiles", resolver.clone(), Duration::from_secs(5));
        let first = addresses.current().await.expect("resolved");
        let found: Vec<_> = first.iter().map(|e| e.address).collect();
        assert_eq!(found, [addr(1), addr(2)], "sorted, without repeats");

        *resolver.0.lock().expect("lock") = Ok(vec![addr(2), addr(3)]);
        let second = addresses.resolve().await.expect("resolved");
        let found: Vec<_> = second.iter().map(|e| e.address).collect();
        assert_eq!(found, [addr(2), addr(3)]);
        assert!(
            Arc::ptr_eq(&first[1], &second[0]),
            "the remaining address keeps its endpoint and connection"
        );

        *resolver.0.lock().expect("lock") = Err(std::io::ErrorKind::NotFound.into());
        let kept = addresses.resolve().await.expect("the last good set");
        assert!(Arc::ptr_eq(&kept, &second));
        *resolver.0.lock().expect("lock") = Ok(Vec::new());
        let kept = addresses.resolve().await.expect("the last good set");
        assert!(Arc::ptr_eq(&kept, &second));
    }

    #[tokio::test]
    async fn a_name_that_never_resolved_fails_the_call() {
        let resolver = Arc::new(Moving(Mutex::new(Err(std::io::ErrorKind::NotFound.into()))));
        let addresses = named("nowhere", resolver, Duration::from_secs(5));
        let Err(err) = addresses.current().await else {
            panic!("resolved nothing, yet answered endpoints");
        };
        assert!(matches!(err, UpstreamError::Resolve { .. }), "{err:?}");
        assert_eq!(err.status("s").code(), tonic::Code::Unavailable);
    }

    /// A resolver that never answers, counting the lookups begun.
    struct Silent(AtomicU64);

    impl Resolve for Silent {
        fn resolve(&self, _: &str, _: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_lookup_that_never_answers_fails_in_time_and_is_not_repeated_per_call() {
        let resolver = Arc::new(Silent(AtomicU64::new(0)));
        let addresses = named("profiles", resolver.clone(), Duration::from_millis(100));
        let calls = (0..5).map(|_| addresses.current());
        for answer in futures::future::join_all(calls).await {
            let Err(err) = answer else {
                panic!("nothing resolved, yet endpoints");
            };
            assert!(err.to_string().contains("timed out"), "{err}");
        }
        // Calls right after the failure hear it without a new lookup.
        assert!(addresses.current().await.is_err());
        assert_eq!(
            resolver.0.load(Ordering::Relaxed),
            1,
            "one lookup for them all"
        );
    }

    #[tokio::test]
    async fn an_ip_address_is_never_resolved() {
        let resolver = Arc::new(Moving(Mutex::new(Ok(vec![addr(9)]))));
        let addresses = Arc::new(Addresses::new(
            "::1",
            50052,
            resolver,
            Duration::ZERO,
            Duration::ZERO,
        ));
        let endpoints = addresses.current().await.expect("fixed");
        let found: Vec<_> = endpoints.iter().map(|e| e.address).collect();
        assert_eq!(found, ["[::1]:50052".parse::<SocketAddr>().expect("addr")]);
    }

    #[tokio::test]
    async fn the_system_resolver_finds_localhost() {
        let found = SystemResolver
            .resolve("localhost", 50052)
            .await
            .expect("resolved");
        assert!(!found.is_empty());
        assert!(
            found
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 50052)
        );
    }
}
