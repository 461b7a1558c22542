//! Following an append-only log from a cursor: the shape every `Watch*`
//! stream in the suite shares. Read a page after the cursor; when there is
//! none, wait until this process appends (a `watch` channel) or a poll
//! interval passes (appends by other replicas).

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A page read from a log: the items, and the cursor to resume after (which
/// may move past rows that yield no item).
pub struct Page<T> {
    pub items: Vec<T>,
    pub read_to: u64,
}

/// Streams every item after `cursor`, then new ones as they are appended.
/// Ends when the appender is dropped; an error ends it after being yielded.
pub fn follow<T, E, F, Fut>(
    mut cursor: u64,
    mut appended: watch::Receiver<u64>,
    poll: Duration,
    mut read: F,
) -> impl Stream<Item = Result<T, E>>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Page<T>, E>>,
{
    async_stream::try_stream! {
        loop {
            // Mark the current append as seen before reading, so an append
            // that lands after the read wakes the wait below.
            appended.borrow_and_update();
            let page = read(cursor).await?;
            if page.read_to <= cursor {
                tokio::select! {
                    changed = appended.changed() => {
                        if changed.is_err() { break; }
                    }
                    _ = tokio::time::sleep(poll) => {}
                }
                continue;
            }
            cursor = page.read_to;
            for item in page.items {
                yield item;
            }
        }
    }
}

/// `first` doubled `doublings` times, at most `longest`: the wait of every
/// retry in the suite that backs off.
pub fn doubling(first: Duration, doublings: u32, longest: Duration) -> Duration {
    first
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(longest)
}

/// Exponential backoff between reconnects of a follower: 100 ms doubling
/// to 5 s, back to the start whenever the follower makes progress. Shared,
/// so the attempt in flight can reset it.
#[derive(Debug, Default)]
pub struct Backoff {
    attempts: AtomicU32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const LONGEST: Duration = Duration::from_secs(5);

    /// The wait before the next attempt.
    pub fn next(&self) -> Duration {
        let attempts = self.attempts.fetch_add(1, Ordering::Relaxed);
        doubling(Self::FIRST, attempts, Self::LONGEST)
    }

    /// Progress was made: the next failure waits the shortest time again.
    pub fn reset(&self) {
        self.attempts.store(0, Ordering::Relaxed);
    }
}

/// Runs a follower until `shutdown`: `attempt` follows a stream from where
/// it left off; when it ends or fails it is started again after a backoff,
/// which it resets whenever it makes progress.
pub async fn keep_following<F, Fut, E>(what: &str, shutdown: CancellationToken, mut attempt: F)
where
    F: FnMut(Arc<Backoff>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let backoff = Arc::new(Backoff::default());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = attempt(Arc::clone(&backoff)) => match outcome {
                Ok(()) => tracing::warn!(stream = what, "the stream ended; resuming"),
                Err(err) => tracing::warn!(stream = what, error = %err, "following failed; resuming"),
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};

    /// Rows of a fake log: a cursor, and an item unless the row yields none.
    type Rows = Arc<Mutex<Vec<(u64, Option<&'static str>)>>>;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let backoff = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| backoff.next()).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[1], Duration::from_millis(200));
        assert_eq!(waits[7], Duration::from_secs(5));
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn keep_following_restarts_after_failures_until_shutdown() {
        let attempts = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let counted = Arc::clone(&attempts);
        let stop = shutdown.clone();
        keep_following("test", shutdown, move |backoff| {
            let counted = Arc::clone(&counted);
            let stop = stop.clone();
            async move {
                backoff.reset();
                if counted.fetch_add(1, Ordering::Relaxed) == 2 {
                    stop.cancel();
                    std::future::pending::<()>().await;
                }
                Err::<(), _>("disconnected")
            }
        })
        .await;
        assert_eq!(attempts.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn follows_appends_and_skips_rows_without_items() {
        let log: Rows = Arc::new(Mutex::new(vec![(1, Some("a")), (2, None)]));
        let (tx, rx) = watch::channel(2);
        let reader = Arc::clone(&log);
        let stream = follow(0, rx, Duration::from_secs(60), move |cursor| {
            let rows: Vec<_> = reader
                .lock()
                .expect("lock")
                .iter()
                .filter(|(seq, _)| *seq > cursor)
                .copied()
                .collect();
            async move {
                Ok::<_, ()>(Page {
                    read_to: rows.last().map_or(cursor, |(seq, _)| *seq),
                    items: rows.into_iter().filter_map(|(_, item)| item).collect(),
                })
            }
        });
        let mut stream = Box::pin(stream);
        assert_eq!(stream.next().await, Some(Ok("a")));
        log.lock().expect("lock").push((3, Some("b")));
        tx.send_replace(3);
        assert_eq!(stream.next().await, Some(Ok("b")));
        drop(tx);
        assert_eq!(stream.next().await, None, "ends with the appender");
    }
}
