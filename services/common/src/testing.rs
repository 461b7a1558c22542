//! Test databases on both backends. Storage tests run every scenario against a
//! fresh SQLite file and against a fresh schema in the PostgreSQL named by
//! `MADTECH_TEST_POSTGRES_URL` (default: the local server's `test` database).
//! A PostgreSQL that cannot be reached fails the test: CI must never skip it.

use std::sync::Arc;

use tempfile::TempDir;

use crate::db::DatabaseConfig;

/// The PostgreSQL the tests use unless `MADTECH_TEST_POSTGRES_URL` says
/// otherwise.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Prefix of every schema the tests create, so CI can drop leftovers.
pub const TEST_SCHEMA_PREFIX: &str = "madtech_t_";

/// A database for one test; the SQLite file goes away with it.
pub struct TestDatabase {
    pub config: DatabaseConfig,
    dir: Option<Arc<TempDir>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl TestDatabase {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self::sqlite(),
            Backend::Postgres => Self::postgres(),
        }
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for SQLite");
        let config = DatabaseConfig::sqlite(&dir.path().join("test.db"));
        TestDatabase {
            config,
            dir: Some(Arc::new(dir)),
        }
    }

    pub fn postgres() -> Self {
        let url = std::env::var("MADTECH_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string());
        let schema = format!("{TEST_SCHEMA_PREFIX}{}", uuid::Uuid::new_v4().simple());
        TestDatabase {
            config: DatabaseConfig {
                url,
                schema: Some(schema),
                ..DatabaseConfig::default()
            },
            dir: None,
        }
    }

    /// Keeps the SQLite directory alive while held, even when a scenario
    /// moves only `config` out of the database.
    pub fn keep_alive(&self) -> Option<Arc<TempDir>> {
        self.dir.clone()
    }

    /// Another database on the same backend, for the next service of a suite.
    pub fn sibling(&self, name: &str) -> DatabaseConfig {
        match &self.config.schema {
            Some(schema) => DatabaseConfig {
                schema: Some(format!("{schema}_{name}")),
                ..self.config.clone()
            },
            None => {
                let dir = self
                    .dir
                    .as_ref()
                    .expect("a SQLite test database has a directory");
                DatabaseConfig::sqlite(&dir.path().join(format!("{name}.db")))
            }
        }
    }
}

/// Runs an async storage scenario against SQLite and against PostgreSQL, as
/// two tests named `sqlite` and `postgres` in a module named after it:
///
/// ```ignore
/// madtech_common::backend_tests!(records_survive_reconnect, |db| async move { ... });
/// ```
#[macro_export]
macro_rules! backend_tests {
    ($name:ident, $scenario:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let db = $crate::testing::TestDatabase::new($crate::testing::Backend::Sqlite);
                let _dir = db.keep_alive();
                ($scenario)(db).await;
            }

            #[tokio::test]
            async fn postgres() {
                let db = $crate::testing::TestDatabase::new($crate::testing::Backend::Postgres);
                ($scenario)(db).await;
            }
        }
    };
}
