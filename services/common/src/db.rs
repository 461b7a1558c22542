//! Database connection and migration. Every service owns its own database:
//! a SQLite file by default (embedded, nothing to install) or PostgreSQL in
//! production, chosen by URL. The same entities and migrations run on both.

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use sea_orm_migration::MigratorTrait;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Where a service keeps its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH?mode=rwc` or `postgres://USER@HOST:PORT/DB`.
    pub url: String,
    /// PostgreSQL only: keep this service's tables in this schema (created
    /// when missing), so several services can share one database.
    pub schema: Option<String>,
    /// Connections in the pool.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: String::new(),
            schema: None,
            max_connections: 8,
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

    pub fn validate(&self, component: &str) -> Result<(), ConfigError> {
        let supported = ["sqlite:", "postgres:", "postgresql:"];
        if !supported.iter().any(|scheme| self.url.starts_with(scheme)) {
            return Err(ConfigError::Invalid(format!(
                "{component}.database.url must start with sqlite:, postgres: or postgresql:"
            )));
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
        Ok(())
    }
}

/// Connects to the database and brings its schema up to date with `M`.
pub async fn connect_and_migrate<M: MigratorTrait>(
    config: &DatabaseConfig,
) -> Result<DatabaseConnection, DbErr> {
    if let Some(schema) = &config.schema {
        create_schema(config, schema).await?;
    }
    let db = Database::connect(connect_options(config)).await?;
    M::up(&db, None).await?;
    Ok(db)
}

fn connect_options(config: &DatabaseConfig) -> ConnectOptions {
    let mut options = ConnectOptions::new(config.url.clone());
    options
        .max_connections(config.max_connections)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false)
        // WAL lets readers run beside the writer; FULL syncs the WAL on every
        // commit, so a write that returned OK survives a crash.
        .map_sqlx_sqlite_opts(|opts| {
            opts.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    if let Some(schema) = &config.schema {
        options.set_schema_search_path(schema.clone());
    }
    options
}

async fn create_schema(config: &DatabaseConfig, schema: &str) -> Result<(), DbErr> {
    let mut options = connect_options(config);
    options.max_connections(1);
    let db = Database::connect(options).await?;
    if db.get_database_backend() != DbBackend::Postgres {
        return Err(DbErr::Custom(
            "database.schema is only supported on PostgreSQL".into(),
        ));
    }
    // The name was validated to [a-z0-9_], so quoting it is enough.
    db.execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .await?;
    db.close().await
}

/// True when `err` is a unique-constraint violation, on either backend.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}
