use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, big_pk_auto, boolean, string};

/// The consent service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateLedger),
            Box::new(CurrentByCollectionTime),
            Box::new(EffectiveEntries),
        ]
    }
}

#[derive(DeriveIden)]
enum ConsentEntries {
    Table,
    Seq,
    ProfileId,
    Purpose,
    State,
    Source,
    Region,
    NoticeVersion,
    CollectedAt,
    RecordedAt,
    Effective,
}

#[derive(DeriveIden)]
enum ConsentCurrent {
    Table,
    ProfileId,
    Purpose,
    State,
    Seq,
    CollectedAt,
}

struct CreateLedger;

impl MigrationName for CreateLedger {
    fn name(&self) -> &str {
        "m20261122_000001_create_ledger"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateLedger {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ConsentEntries::Table)
                    .if_not_exists()
                    .col(big_pk_auto(ConsentEntries::Seq))
                    .col(string(ConsentEntries::ProfileId))
                    .col(string(ConsentEntries::Purpose))
                    .col(string(ConsentEntries::State))
                    .col(string(ConsentEntries::Source))
                    .col(string(ConsentEntries::Region))
                    .col(string(ConsentEntries::NoticeVersion))
                    .col(big_integer(ConsentEntries::CollectedAt))
                    .col(big_integer(ConsentEntries::RecordedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("consent_entries_by_subject")
                    .table(ConsentEntries::Table)
                    .col(ConsentEntries::ProfileId)
                    .col(ConsentEntries::Seq)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ConsentCurrent::Table)
                    .if_not_exists()
                    .col(string(ConsentCurrent::ProfileId))
                    .col(string(ConsentCurrent::Purpose))
                    .col(string(ConsentCurrent::State))
                    .col(big_integer(ConsentCurrent::Seq))
                    .primary_key(
                        Index::create()
                            .col(ConsentCurrent::ProfileId)
                            .col(ConsentCurrent::Purpose),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// The current state follows the most recently *collected* choice, so a
/// late import of an old choice cannot override a newer one.
struct CurrentByCollectionTime;

impl MigrationName for CurrentByCollectionTime {
    fn name(&self) -> &str {
        "m20261122_000002_current_by_collection_time"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CurrentByCollectionTime {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ConsentCurrent::Table)
                    .add_column(big_integer(ConsentCurrent::CollectedAt).default(0))
                    .to_owned(),
            )
            .await
    }
}

/// Whether an entry became the current state when it was appended, so a
/// watcher can keep current states without re-reading (a late import of an
/// older choice is evidence, not a change).
struct EffectiveEntries;

impl MigrationName for EffectiveEntries {
    fn name(&self) -> &str {
        "m20261122_000003_effective_entries"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for EffectiveEntries {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ConsentEntries::Table)
                    .add_column(boolean(ConsentEntries::Effective).default(true))
                    .to_owned(),
            )
            .await
    }
}
