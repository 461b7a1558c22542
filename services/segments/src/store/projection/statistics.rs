//! Table statistics for PostgreSQL, kept fresh by the projection itself.
//!
//! PostgreSQL plans the projection's keyed writes (`DELETE … WHERE
//! profile_id IN (…)` for a page of people) from its table statistics. A
//! projection filled faster than autovacuum analyzes it — or on a server
//! with autovacuum off — has none, and the planner's default estimates
//! turn every page into sequential scans of whole tables: a million-person
//! load slowed to under a thousand people per second, each page reading
//! every trait and identifier row (see docs/BENCHMARKS.md). So the
//! projection refreshes the statistics itself each time what it has
//! written has doubled since the last refresh: a handful of `ANALYZE`s over
//! any load, each a sample, never a table scan.

use std::sync::atomic::{AtomicU64, Ordering};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};

/// The projection's tables whose statistics its writes depend on.
const TABLES: &str = "people, person_traits, person_identifiers, person_merged, person_events, \
                      event_properties, memberships, membership_changes";

/// Rows written (people and events) before the first refresh.
const FIRST_REFRESH: u64 = 10_000;

pub(super) struct Statistics {
    written: AtomicU64,
    next_refresh: AtomicU64,
}

impl Default for Statistics {
    fn default() -> Self {
        Statistics {
            written: AtomicU64::new(0),
            next_refresh: AtomicU64::new(FIRST_REFRESH),
        }
    }
}

impl Statistics {
    /// Counts `rows` written and refreshes PostgreSQL's statistics when
    /// the total has reached the next threshold. Answers whether it did. A
    /// refresh that fails is logged, not returned: what was written stays
    /// written, and only the plans of later writes may suffer.
    pub(super) async fn wrote(&self, db: &DatabaseConnection, rows: u64) -> bool {
        if db.get_database_backend() != DbBackend::Postgres {
            return false;
        }
        let written = self.written.fetch_add(rows, Ordering::Relaxed) + rows;
        let next = self.next_refresh.load(Ordering::Relaxed);
        // Whoever moves the threshold refreshes; nobody else waits for it.
        if written < next
            || self
                .next_refresh
                .compare_exchange(
                    next,
                    written.saturating_mul(2),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return false;
        }
        let started = std::time::Instant::now();
        match db.execute_unprepared(&format!("ANALYZE {TABLES}")).await {
            Ok(_) => {
                tracing::info!(
                    rows_written = written,
                    took_ms = started.elapsed().as_millis() as u64,
                    "refreshed the projection's table statistics"
                );
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not refresh the projection's table statistics");
                false
            }
        }
    }
}
