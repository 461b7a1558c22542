//! Database connection and migration. Every service owns its own database:
//! a SQLite file by default (embedded, nothing to install) or PostgreSQL in
//! production, chosen by URL. The same entities and migrations run on both.

use std::path::PathBuf;
use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr,
};
use sea_orm_migration::MigratorTrait;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Where a service keeps its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH?mode=rwc` or `postgres://USER@HOST:PORT/DB`.
    pub url: String,
    /// A file holding the URL instead (a mounted Secret), so credentials stay
    /// out of the environment. Read when the service connects.
    pub url_file: Option<PathBuf>,
    /// PostgreSQL only: keep this service's tables in this schema (created
    /// when missing), so several services can share one database.
    pub schema: Option<String>,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Bring the schema up to date when the service starts. Kubernetes
    /// deployments turn this off and run `madtech migrate` once per rollout.
    pub migrate_on_start: bool,
    /// PostgreSQL on this machine (`localhost`, `127.0.0.1`, `::1`): connect
    /// through its Unix socket when one is found in `/var/run/postgresql`
    /// or `/tmp`. Besides skipping TCP, this avoids a ~40 ms stall per large
    /// statement in the sqlx version sea-orm uses, which leaves Nagle's
    /// algorithm on for TCP (sqlx issue #4335; see docs/BENCHMARKS.md).
    pub prefer_unix_socket: bool,
    /// SQLite only: page cache per pooled connection, in KiB. Index inserts
    /// land on random pages, and re-reading them dominated ingestion with
    /// SQLite's 2 MiB default, hence 32 MiB.
    pub sqlite_cache_kib: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: String::new(),
            url_file: None,
            schema: None,
            max_connections: 8,
            migrate_on_start: true,
            prefer_unix_socket: true,
            sqlite_cache_kib: 32 * 1024,
        }
    }
}

impl DatabaseConfig {
    /// A SQLite database in `path`, created on first use.
    pub fn sqlite(path: &std::path::Path) -> Self {
        DatabaseConfig {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            ..DatabaseConfig::default()
        }
    }

    /// True when neither a URL nor a URL file is set.
    pub fn is_unset(&self) -> bool {
        self.url.is_empty() && self.url_file.is_none()
    }

    /// The URL, read from `url_file` when that is set.
    pub fn resolved_url(&self) -> Result<String, DbErr> {
        match &self.url_file {
            None => Ok(self.url.clone()),
            Some(path) => std::fs::read_to_string(path)
                .map(|text| text.trim().to_string())
                .map_err(|err| DbErr::Custom(format!("cannot read {}: {err}", path.display()))),
        }
    }

    pub fn validate(&self, component: &str) -> Result<(), ConfigError> {
        match (&self.url_file, self.url.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::Invalid(format!(
                    "{component}.database: set url or url_file, not both"
                )));
            }
            (Some(path), true) if path.as_os_str().is_empty() => {
                return Err(ConfigError::Invalid(format!(
                    "{component}.database.url_file must not be empty"
                )));
            }
            (Some(_), true) => {}
            (None, _) => {
                let supported = ["sqlite:", "postgres:", "postgresql:"];
                if !supported.iter().any(|scheme| self.url.starts_with(scheme)) {
                    return Err(ConfigError::Invalid(format!(
                        "{component}.database.url must start with sqlite:, postgres: or postgresql:"
                    )));
                }
            }
        }
        if let Some(schema) = &self.schema {
            let valid = !schema.is_empty()
                && schema.len() <= 63
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "{component}.database.schema must be 1 to 63 characters of a-z, 0-9 and _"
                )));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(format!(
                "{component}.database.max_connections must be at least 1"
            )));
        }
        if self.sqlite_cache_kib < 64 {
            return Err(ConfigError::Invalid(format!(
                "{component}.database.sqlite_cache_kib must be at least 64"
            )));
        }
        Ok(())
    }
}

/// Connects to the database for a service whose schema is `M`: migrates it
/// first when `migrate_on_start` is set, and otherwise refuses to start on a
/// schema that is behind.
pub async fn connect_and_migrate<M: MigratorTrait>(
    config: &DatabaseConfig,
) -> Result<DatabaseConnection, DbErr> {
    if config.migrate_on_start {
        migrate::<M>(config).await?;
    }
    let db = Database::connect(connect_options(config)?).await?;
    let pending = M::get_pending_migrations_read_only(&db).await?;
    if !pending.is_empty() {
        return Err(DbErr::Custom(format!(
            "{} database migrations are pending; run `madtech migrate` first",
            pending.len()
        )));
    }
    Ok(db)
}

/// The connection a service's writes go through, which its write lock
/// serialises anyway: on SQLite, a pool of one connection of its own. A
/// SQLite connection drops its whole page cache when another connection has
/// committed since its last transaction, so writes handed round a pool start
/// cold every time and re-read every index page they touch; one connection
/// that does all the writing keeps its cache. PostgreSQL (whose cache is the
/// server's) and in-memory SQLite (one database per connection pool) share
/// `pool`.
pub async fn writer_for(
    config: &DatabaseConfig,
    pool: &DatabaseConnection,
) -> Result<DatabaseConnection, DbErr> {
    let url = config.resolved_url()?;
    if pool.get_database_backend() != DbBackend::Sqlite
        || url.contains(":memory:")
        || url.contains("mode=memory")
    {
        return Ok(pool.clone());
    }
    let mut options = connect_options(config)?;
    options.max_connections(1);
    Database::connect(options).await
}

/// Ends a write: commits `txn` when `result` is Ok, otherwise rolls it back
/// before handing the error on. A transaction left to its drop is rolled
/// back later, and on SQLite the next write (on another pooled connection)
/// can meet its lock in the meantime and fail with "database is locked".
pub async fn settle<T, E>(txn: DatabaseTransaction, result: Result<T, E>) -> Result<T, E>
where
    E: From<DbErr>,
{
    match result {
        Ok(value) => {
            txn.commit().await?;
            Ok(value)
        }
        Err(err) => {
            roll_back(txn).await;
            Err(err)
        }
    }
}

/// Rolls back a failed write now (see [`settle`]); a failure to roll back
/// is logged, the write's own error being the one to answer.
pub async fn roll_back(txn: DatabaseTransaction) {
    if let Err(err) = txn.rollback().await {
        tracing::warn!(error = %err, "rolling back a failed write failed");
    }
}

/// A thread of its own, with a single-threaded runtime, for a store's
/// writes.
///
/// A write holds the store's writer slot across a dozen round trips to the
/// database driver's thread; run on the shared runtime, each round trip's
/// wake-up waited behind whatever the busy workers were polling (decoding
/// and validating other calls' batches), and the slot stood idle while
/// every other write queued behind it. Here the writing task is alone on its
/// thread, so it is polled as soon as the driver answers.
pub struct WriteThread {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the thread's runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The write thread stopped before a write finished (the service is
/// shutting down); the write was not committed.
#[derive(Debug, thiserror::Error)]
#[error("the write thread stopped before the write finished")]
pub struct WriteThreadStopped;

impl WriteThread {
    /// Starts the thread, named `name`.
    pub fn start(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // Until the owner is dropped; then the runtime is dropped
                // here, off any async context, cancelling unfinished writes
                // (whose transactions roll back).
                let _ = runtime.block_on(stopped);
            })?;
        Ok(WriteThread {
            handle,
            _stop: stop,
        })
    }

    /// Runs `work` to completion on the write thread, even if the caller
    /// stops waiting for it.
    pub async fn run<T, F>(&self, work: F) -> Result<T, WriteThreadStopped>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        match self.handle.spawn(work).await {
            Ok(done) => Ok(done),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Err(WriteThreadStopped),
        }
    }
}

/// Key of the PostgreSQL advisory lock migrations hold, so replicas and
/// migration jobs starting together apply each migration once, in turn.
const MIGRATION_LOCK: i64 = 0x6d61_6474_6563_6801;

/// Serialises migrations inside one process, for SQLite, which has no
/// advisory locks (and is only used by a single process: `madtech up`).
static LOCAL_MIGRATIONS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Brings the schema up to date with `M`. On PostgreSQL the work happens on
/// one connection under an advisory lock, schema creation included.
pub async fn migrate<M: MigratorTrait>(config: &DatabaseConfig) -> Result<(), DbErr> {
    let mut options = connect_options(config)?;
    options.max_connections(1);
    let db = Database::connect(options).await?;
    if db.get_database_backend() != DbBackend::Postgres {
        if config.schema.is_some() {
            return Err(DbErr::Custom(
                "database.schema is only supported on PostgreSQL".into(),
            ));
        }
        let _local = LOCAL_MIGRATIONS.lock().await;
        M::up(&db, None).await?;
        return db.close().await;
    }
    db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .await?;
    let migrated = async {
        if let Some(schema) = &config.schema {
            // The name was validated to [a-z0-9_], so quoting it is enough.
            db.execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .await?;
        }
        M::up(&db, None).await
    }
    .await;
    db.execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .await?;
    migrated?;
    db.close().await
}

/// Directories where a local PostgreSQL server keeps its socket.
const SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];

/// `url` rewritten to reach a loopback PostgreSQL through its Unix socket in
/// one of `dirs`, when the URL names a loopback host, sets no `host`
/// parameter of its own, and the socket exists. Otherwise `None`.
pub fn local_socket_url(url: &str, dirs: &[&str]) -> Option<String> {
    let mut parsed = url::Url::parse(url).ok()?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return None;
    }
    // `postgres:` is not a special scheme to the URL standard, so an IPv4
    // host arrives as a name.
    let loopback = match parsed.host()? {
        url::Host::Domain(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    if !loopback || parsed.query_pairs().any(|(key, _)| key == "host") {
        return None;
    }
    let port = parsed.port().unwrap_or(5432);
    let dir = dirs.iter().find(|dir| {
        std::path::Path::new(dir)
            .join(format!(".s.PGSQL.{port}"))
            .exists()
    })?;
    parsed.query_pairs_mut().append_pair("host", dir);
    Some(parsed.to_string())
}

/// WAL pages after which a commit copies them back into the database file
/// (SQLite's default is 1,000, about 4 MiB). Writes that touch many pages
/// of random-keyed indexes (an ingested batch then touched one index page
/// per person in it) fill that at every commit, so every commit paid for a
/// checkpoint; at 10,000 a page rewritten by several commits is copied back
/// once. Measured with the profiles benchmark, one run each way: 33k → 38k
/// events/s direct, before events were indexed by block.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

fn connect_options(config: &DatabaseConfig) -> Result<ConnectOptions, DbErr> {
    let mut url = config.resolved_url()?;
    if config.prefer_unix_socket
        && let Some(local) = local_socket_url(&url, &SOCKET_DIRS)
    {
        tracing::debug!("connecting to PostgreSQL through its Unix socket");
        url = local;
    }
    let mut options = ConnectOptions::new(url);
    // A negative cache_size is in KiB rather than pages.
    let cache_size = format!("-{}", config.sqlite_cache_kib);
    options
        .max_connections(config.max_connections)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false)
        // WAL lets readers run beside the writer; FULL syncs the WAL on every
        // commit, so a write that returned OK survives a crash.
        .map_sqlx_sqlite_opts(move |opts| {
            opts.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .pragma("cache_size", cache_size.clone())
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
        });
    if let Some(schema) = &config.schema {
        options.set_schema_search_path(schema.clone());
    }
    Ok(options)
}

/// True when `err` is a unique-constraint violation, on either backend.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;
    use sea_orm_migration::prelude::*;

    struct Migrator;

    #[async_trait::async_trait]
    impl MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(CreateThings)]
        }
    }

    struct CreateThings;

    impl MigrationName for CreateThings {
        fn name(&self) -> &str {
            "m0001_create_things"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateThings {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table("things")
                        .col(ColumnDef::new("id").integer().primary_key())
                        .to_owned(),
                )
                .await
        }
    }

    crate::backend_tests!(
        a_service_refuses_a_schema_that_is_behind,
        |db: TestDatabase| async move {
            let mut config = db.config.clone();
            config.migrate_on_start = false;
            let err = connect_and_migrate::<Migrator>(&config)
                .await
                .expect_err("pending");
            assert!(err.to_string().contains("madtech migrate"), "{err}");

            // Two migrations at once (two replicas, or a job and a replica)
            // apply it once.
            let (a, b) = tokio::join!(migrate::<Migrator>(&config), migrate::<Migrator>(&config));
            a.expect("first");
            b.expect("second");
            connect_and_migrate::<Migrator>(&config)
                .await
                .expect("up to date");
        }
    );

    crate::backend_tests!(
        writes_through_the_writer_are_read_from_the_pool,
        |db: TestDatabase| async move {
            let pool = connect_and_migrate::<Migrator>(&db.config)
                .await
                .expect("connect");
            let writer = writer_for(&db.config, &pool).await.expect("writer");
            writer
                .execute_unprepared("INSERT INTO things (id) VALUES (1), (2)")
                .await
                .expect("write");
            let count = crate::sql::number(
                &pool,
                &crate::sql::Sql::new("SELECT count(*) AS n FROM things"),
            )
            .await
            .expect("read");
            assert_eq!(count, 2);
        }
    );

    #[tokio::test]
    async fn in_memory_sqlite_writes_through_its_one_pool() {
        let config = DatabaseConfig {
            url: "sqlite::memory:".into(),
            max_connections: 1,
            ..DatabaseConfig::default()
        };
        let pool = Database::connect(connect_options(&config).expect("options"))
            .await
            .expect("connect");
        pool.execute_unprepared("CREATE TABLE things (id INTEGER PRIMARY KEY)")
            .await
            .expect("table");
        let writer = writer_for(&config, &pool).await.expect("writer");
        // A second pool would be a second, empty database without `things`.
        writer
            .execute_unprepared("INSERT INTO things (id) VALUES (1)")
            .await
            .expect("the same database");
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    #[test]
    fn loopback_urls_use_a_socket_that_exists() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(".s.PGSQL.5433"), "").expect("fake socket");
        let dirs = [dir.path().to_str().expect("utf-8")];
        let local = local_socket_url("postgres://me@127.0.0.1:5433/db?sslmode=disable", &dirs)
            .expect("rewritten");
        assert!(local.contains("sslmode=disable"), "{local}");
        assert!(local.contains("host=%2F"), "{local}");
        assert!(local_socket_url("postgres://me@localhost:5433/db", &dirs).is_some());
        for unchanged in [
            "postgres://me@127.0.0.1:5432/db",
            "postgres://me@db.internal:5433/db",
            "postgres://me@127.0.0.1:5433/db?host=/elsewhere",
            "sqlite://x.db",
            "not a url",
        ] {
            assert_eq!(local_socket_url(unchanged, &dirs), None, "{unchanged}");
        }
    }
}

#[cfg(test)]
mod url_file_tests {
    use super::*;
    use crate::testing::TestDatabase;

    #[tokio::test]
    async fn the_url_can_come_from_a_mounted_file() {
        let db = TestDatabase::sqlite();
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("url");
        std::fs::write(&file, format!("{}\n", db.config.url)).expect("write");
        let config = DatabaseConfig {
            url: String::new(),
            url_file: Some(file),
            ..db.config.clone()
        };
        config.validate("profiles").expect("valid");
        let conn = Database::connect(connect_options(&config).expect("url read"))
            .await
            .expect("connects");
        conn.close().await.expect("close");

        let both = DatabaseConfig {
            url: db.config.url.clone(),
            ..config.clone()
        };
        assert!(
            both.validate("profiles").is_err(),
            "url and url_file together"
        );
        let tiny_cache = DatabaseConfig {
            sqlite_cache_kib: 63,
            ..config.clone()
        };
        let refused = tiny_cache.validate("profiles").expect_err("too small");
        assert!(
            refused
                .to_string()
                .contains("profiles.database.sqlite_cache_kib")
        );
        let missing = DatabaseConfig {
            url_file: Some(dir.path().join("absent")),
            ..config
        };
        assert!(connect_options(&missing).is_err());
    }

    #[tokio::test]
    async fn the_page_cache_follows_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let config = DatabaseConfig {
            sqlite_cache_kib: 4096,
            ..DatabaseConfig::sqlite(&dir.path().join("cache.db"))
        };
        let conn = Database::connect(connect_options(&config).expect("options"))
            .await
            .expect("connects");
        let row = conn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Sqlite,
                "PRAGMA cache_size",
            ))
            .await
            .expect("pragma")
            .expect("a row");
        let size: i64 = row.try_get_by_index(0).expect("an integer");
        assert_eq!(size, -4096, "negative: KiB");
        conn.close().await.expect("close");
    }
}
