//! Table statistics for PostgreSQL, kept fresh by the service itself.
//!
//! PostgreSQL plans the projection's and the memberships' keyed statements
//! (`DELETE … WHERE profile_id IN (…)` for a page of people, a page's
//! current members) from its table statistics. Tables filled faster than
//! autovacuum analyzes them — or on a server with autovacuum off — have
//! none or stale ones, and the planner's estimates turn every page into
//! scans of whole tables: a million-person load slowed to under a thousand
//! people per second, each page reading every trait and identifier row,
//! and a million-person computation looked each page's members up by
//! scanning the segment's (see docs/BENCHMARKS.md). So each writer
//! refreshes its tables' statistics each time what it has written has
//! doubled since the last refresh: a handful of `ANALYZE`s over any load,
//! each a sample, never a table scan.

use std::sync::atomic::{AtomicU64, Ordering};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};

/// Rows written (people and events) before the first refresh.
const FIRST_REFRESH: u64 = 10_000;

pub(super) struct Statistics {
    /// The tables one writer's statements depend on, comma-separated.
    tables: &'static str,
    written: AtomicU64,
    next_refresh: AtomicU64,
}

impl Statistics {
    pub(super) fn of(tables: &'static str) -> Self {
        Statistics {
            tables,
            written: AtomicU64::new(0),
            next_refresh: AtomicU64::new(FIRST_REFRESH),
        }
    }

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
        match db
            .execute_unprepared(&format!("ANALYZE {}", self.tables))
            .await
        {
            Ok(_) => {
                tracing::info!(
                    tables = self.tables,
                    rows_written = written,
                    took_ms = started.elapsed().as_millis() as u64,
                    "refreshed table statistics"
                );
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not refresh table statistics");
                false
            }
        }
    }
}
