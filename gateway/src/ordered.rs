//! Work on a stream's items spread over several tasks, answered in the
//! stream's order.
//!
//! A crossing filters an export page by page, and filtering (hashing,
//! pseudonyms, decisions) is most of what the gateway adds to an export.
//! Done inline, one page at a time, it left part of the machine idle while
//! the page before was still being framed and sent; spread over workers,
//! pages are filtered while earlier ones go out. Each worker keeps its own
//! state (a crossing's filter and its decision caches), so nothing is shared
//! or locked per item. Item `n` goes to worker `n % workers` and the answers
//! are read back in the same rotation, which keeps their order without any
//! sequence numbers.
//!
//! Fail closed: a worker that stops without answering (a panic) ends the
//! stream with [`Stopped`], never with a clean end; dropping [`Ordered`]
//! aborts the reader and the workers.

use std::future::Future;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// What travels from the reader through a worker to the consumer.
enum Step<T> {
    Item(T),
    /// The input ended after everything sent before it.
    End,
}

/// A worker stopped before the input ended: its answers are lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a worker stopped before its work was done")]
pub struct Stopped;

/// The answers of [`Ordered::spawn`], in the input's order.
pub struct Ordered<U> {
    answers: Vec<mpsc::Receiver<Step<U>>>,
    next: usize,
    ended: bool,
    /// The reader and the workers; aborted when the answers are dropped.
    _tasks: JoinSet<()>,
}

impl<U: Send + 'static> Ordered<U> {
    /// Reads `input` on its own task and runs `work` over its items on one
    /// task per state in `states` (at least one), each worker holding its
    /// state between items. At most three items per worker are read ahead of
    /// the answers taken.
    pub fn spawn<T, S, F, Fut>(
        input: impl Stream<Item = T> + Send + 'static,
        states: Vec<S>,
        work: F,
    ) -> Self
    where
        T: Send + 'static,
        S: Send + 'static,
        F: Fn(S, T) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = (S, U)> + Send,
    {
        assert!(!states.is_empty(), "Ordered::spawn needs a worker");
        let mut tasks = JoinSet::new();
        let mut inputs = Vec::with_capacity(states.len());
        let mut answers = Vec::with_capacity(states.len());
        for mut state in states {
            let (items, mut received) = mpsc::channel::<Step<T>>(1);
            let (answer, answered) = mpsc::channel::<Step<U>>(1);
            inputs.push(items);
            answers.push(answered);
            let work = work.clone();
            tasks.spawn(async move {
                while let Some(step) = received.recv().await {
                    let step = match step {
                        Step::Item(item) => {
                            let (kept, done) = work(state, item).await;
                            state = kept;
                            Step::Item(done)
                        }
                        Step::End => Step::End,
                    };
                    if answer.send(step).await.is_err() {
                        return;
                    }
                }
            });
        }
        tasks.spawn(async move {
            let mut input = std::pin::pin!(input);
            let mut turn = 0;
            loop {
                let step = match input.next().await {
                    Some(item) => Step::Item(item),
                    None => Step::End,
                };
                let end = matches!(step, Step::End);
                if inputs[turn].send(step).await.is_err() || end {
                    return;
                }
                turn = (turn + 1) % inputs.len();
            }
        });
        Ordered {
            answers,
            next: 0,
            ended: false,
            _tasks: tasks,
        }
    }

    /// The next answer; `None` once the input has ended and every item
    /// before its end has been answered. Cancel-safe: the turn moves on
    /// only once its answer has been received.
    pub async fn next(&mut self) -> Option<Result<U, Stopped>> {
        if self.ended {
            return None;
        }
        let received = self.answers[self.next].recv().await;
        self.next = (self.next + 1) % self.answers.len();
        match received {
            Some(Step::Item(answer)) => Some(Ok(answer)),
            Some(Step::End) => {
                self.ended = true;
                None
            }
            None => {
                self.ended = true;
                Some(Err(Stopped))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    async fn collect<U: Send + 'static>(mut ordered: Ordered<U>) -> Vec<Result<U, Stopped>> {
        let mut answers = Vec::new();
        while let Some(answer) = ordered.next().await {
            answers.push(answer);
        }
        answers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_keep_the_input_order_whichever_worker_finishes_first() {
        // Early items take longest, so later ones finish first.
        let input = futures::stream::iter(0..40_u64);
        let ordered = Ordered::spawn(input, vec![(); 3], |(), n| async move {
            tokio::time::sleep(Duration::from_millis(40 - n)).await;
            ((), n * 10)
        });
        let answers = collect(ordered).await;
        let expected: Vec<_> = (0..40).map(|n| Ok(n * 10)).collect();
        assert_eq!(answers, expected);
    }

    #[tokio::test]
    async fn each_worker_keeps_its_own_state() {
        let ordered = Ordered::spawn(
            futures::stream::iter(0..6),
            vec![0, 100],
            |seen, _| async move { (seen + 1, seen) },
        );
        let answers: Vec<_> = collect(ordered).await.into_iter().flatten().collect();
        // Items alternate between the workers; each counts its own.
        assert_eq!(answers, vec![0, 100, 1, 101, 2, 102]);
    }

    #[tokio::test]
    async fn a_wait_given_up_on_loses_no_turn() {
        let (release, released) = tokio::sync::watch::channel(false);
        let mut ordered = Ordered::spawn(
            futures::stream::iter(0..4_u64),
            vec![(), ()],
            move |(), n| {
                let mut released = released.clone();
                async move {
                    // The first item waits until the test lets it go.
                    if n == 0 {
                        let _ = released.wait_for(|go| *go).await;
                    }
                    ((), n)
                }
            },
        );
        let waited = tokio::time::timeout(Duration::from_millis(50), ordered.next()).await;
        assert!(waited.is_err(), "the first answer is not ready yet");
        release.send_replace(true);
        let answers: Vec<_> = collect(ordered).await.into_iter().flatten().collect();
        assert_eq!(answers, vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn an_empty_input_ends_cleanly() {
        let ordered = Ordered::spawn(
            futures::stream::iter(Vec::<u8>::new()),
            vec![(), ()],
            |(), n| async move { ((), n) },
        );
        assert!(collect(ordered).await.is_empty());
    }

    #[tokio::test]
    async fn a_worker_that_panics_stops_the_answers_instead_of_ending_them() {
        let ordered = Ordered::spawn(
            futures::stream::iter(0..5),
            vec![(), ()],
            |(), n| async move {
                assert!(n != 3, "the fourth item fails");
                ((), n)
            },
        );
        let answers = collect(ordered).await;
        assert_eq!(answers, vec![Ok(0), Ok(1), Ok(2), Err(Stopped)]);
    }

    #[tokio::test]
    async fn dropping_the_answers_stops_the_reader_and_the_workers() {
        let read = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&read);
        let endless = futures::stream::iter(0..).map(move |n: u64| {
            counted.fetch_add(1, Ordering::SeqCst);
            n
        });
        let mut ordered = Ordered::spawn(endless, vec![(), ()], |(), n| async move { ((), n) });
        assert_eq!(ordered.next().await, Some(Ok(0)));
        drop(ordered);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after_drop = read.load(Ordering::SeqCst);
        // Bounded read-ahead: three per worker, the answer taken and the
        // reader's own.
        assert!(after_drop <= 8, "read {after_drop} items ahead");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(read.load(Ordering::SeqCst), after_drop, "nothing reads on");
    }
}
