//! Following an append-only log from a cursor: the shape every `Watch*`
//! stream in the suite shares. Read a page after the cursor; when there is
//! none, wait until this process appends (a `watch` channel) or a poll
//! interval passes (appends by other replicas).

use std::future::Future;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};

    /// Rows of a fake log: a cursor, and an item unless the row yields none.
    type Rows = Arc<Mutex<Vec<(u64, Option<&'static str>)>>>;

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
