use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, boolean, string, string_null, string_uniq, text,
};

/// The activation service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateActivation),
            Box::new(PendingAdds),
            Box::new(Batches),
            Box::new(Plans),
            Box::new(Schedules),
            Box::new(RunPolicyVersion),
            Box::new(Baselines),
            Box::new(OwedRemovals),
        ]
    }
}

#[derive(DeriveIden)]
enum Destinations {
    Table,
    Id,
    Name,
    Target,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Activations {
    Table,
    Id,
    SegmentId,
    DestinationId,
    Purpose,
    CreatedAt,
    SyncEverySecs,
}

#[derive(DeriveIden)]
enum SyncState {
    Table,
    ActivationId,
    PseudonymousId,
    Identifiers,
    SyncedAt,
    Confirmed,
}

#[derive(DeriveIden)]
enum SyncRuns {
    Table,
    Id,
    ActivationId,
    Phase,
    MembersReceived,
    Added,
    Removed,
    Unchanged,
    Output,
    Error,
    StartedAt,
    FinishedAt,
    Trigger,
    ToSend,
    BatchesSent,
    BatchesRejected,
    Retries,
    PolicyVersion,
    Full,
}

#[derive(DeriveIden)]
enum SyncBatches {
    Table,
    RunId,
    Op,
    Seq,
    ActivationId,
    Members,
    Outcome,
    HttpStatus,
    Digest,
    Error,
    At,
}

#[derive(DeriveIden)]
enum SyncPlan {
    Table,
    RunId,
    PseudonymousId,
    ActivationId,
    Identifiers,
    Op,
    Seq,
}

#[derive(DeriveIden)]
enum FollowedCursors {
    Table,
    Stream,
    Cursor,
}

struct CreateActivation;

impl MigrationName for CreateActivation {
    fn name(&self) -> &str {
        "m20261122_000001_create_activation"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateActivation {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Destinations::Table)
                    .if_not_exists()
                    .col(string(Destinations::Id).primary_key())
                    .col(string_uniq(Destinations::Name))
                    .col(text(Destinations::Target))
                    .col(big_integer(Destinations::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Activations::Table)
                    .if_not_exists()
                    .col(string(Activations::Id).primary_key())
                    .col(string(Activations::SegmentId))
                    .col(string(Activations::DestinationId))
                    .col(string(Activations::Purpose))
                    .col(big_integer(Activations::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SyncState::Table)
                    .if_not_exists()
                    .col(string(SyncState::ActivationId))
                    .col(string(SyncState::PseudonymousId))
                    .col(text(SyncState::Identifiers))
                    .col(big_integer(SyncState::SyncedAt))
                    .primary_key(
                        Index::create()
                            .col(SyncState::ActivationId)
                            .col(SyncState::PseudonymousId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SyncRuns::Table)
                    .if_not_exists()
                    .col(string(SyncRuns::Id).primary_key())
                    .col(string(SyncRuns::ActivationId))
                    .col(string(SyncRuns::Phase))
                    .col(big_integer(SyncRuns::MembersReceived))
                    .col(big_integer(SyncRuns::Added))
                    .col(big_integer(SyncRuns::Removed))
                    .col(big_integer(SyncRuns::Unchanged))
                    .col(text(SyncRuns::Output))
                    .col(text(SyncRuns::Error))
                    .col(big_integer(SyncRuns::StartedAt))
                    .col(big_integer_null(SyncRuns::FinishedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("sync_runs_by_activation")
                    .table(SyncRuns::Table)
                    .col(SyncRuns::ActivationId)
                    .col(SyncRuns::StartedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }
}

/// Adds are recorded as pending before delivery and confirmed after.
struct PendingAdds;

impl MigrationName for PendingAdds {
    fn name(&self) -> &str {
        "m20261122_000002_pending_adds"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for PendingAdds {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SyncState::Table)
                    .add_column(boolean(SyncState::Confirmed).default(true))
                    .to_owned(),
            )
            .await
    }
}

/// Syncs deliver in batches: each batch is recorded, runs count batches,
/// retries and what they had to send, and the consent follower keeps its
/// cursor.
struct Batches;

impl MigrationName for Batches {
    fn name(&self) -> &str {
        "m20261130_000003_batches"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Batches {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(SyncRuns::Table)
                    .add_column(string(SyncRuns::Trigger).default("sync"))
                    .to_owned(),
            )
            .await?;
        for column in [
            SyncRuns::ToSend,
            SyncRuns::BatchesSent,
            SyncRuns::BatchesRejected,
            SyncRuns::Retries,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(SyncRuns::Table)
                        .add_column(big_integer(column).default(0))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(SyncBatches::Table)
                    .if_not_exists()
                    .col(string(SyncBatches::RunId))
                    .col(string(SyncBatches::Op))
                    .col(big_integer(SyncBatches::Seq))
                    .col(string(SyncBatches::ActivationId))
                    .col(big_integer(SyncBatches::Members))
                    .col(string(SyncBatches::Outcome))
                    .col(big_integer_null(SyncBatches::HttpStatus))
                    .col(string(SyncBatches::Digest))
                    .col(text(SyncBatches::Error))
                    .col(big_integer(SyncBatches::At))
                    .primary_key(
                        Index::create()
                            .col(SyncBatches::RunId)
                            .col(SyncBatches::Op)
                            .col(SyncBatches::Seq),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(FollowedCursors::Table)
                    .if_not_exists()
                    .col(string(FollowedCursors::Stream).primary_key())
                    .col(big_integer(FollowedCursors::Cursor))
                    .to_owned(),
            )
            .await
    }
}

/// A run's plan lives in the database, not in memory: the audience as
/// fetched, each member marked add, remove or unchanged and given its
/// batch, so memory stays flat in audience size and an interrupted run's
/// batch can be sent again as the same batch.
struct Plans;

impl MigrationName for Plans {
    fn name(&self) -> &str {
        "m20261130_000004_plans"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Plans {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SyncPlan::Table)
                    .if_not_exists()
                    .col(string(SyncPlan::RunId))
                    .col(string(SyncPlan::PseudonymousId))
                    .col(string(SyncPlan::ActivationId))
                    .col(text(SyncPlan::Identifiers))
                    .col(string_null(SyncPlan::Op))
                    .col(big_integer_null(SyncPlan::Seq))
                    .primary_key(
                        Index::create()
                            .col(SyncPlan::RunId)
                            .col(SyncPlan::PseudonymousId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("sync_plan_batches")
                    .table(SyncPlan::Table)
                    .col(SyncPlan::RunId)
                    .col(SyncPlan::Op)
                    .col(SyncPlan::Seq)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("sync_plan_by_activation")
                    .table(SyncPlan::Table)
                    .col(SyncPlan::ActivationId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }
}

/// Activations may sync on a schedule.
struct Schedules;

impl MigrationName for Schedules {
    fn name(&self) -> &str {
        "m20261130_000005_schedules"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Schedules {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Activations::Table)
                    .add_column(big_integer_null(Activations::SyncEverySecs))
                    .to_owned(),
            )
            .await
    }
}

/// A sync run remembers the policy version its audience was released under.
struct RunPolicyVersion;

impl MigrationName for RunPolicyVersion {
    fn name(&self) -> &str {
        "m20261130_000006_run_policy_version"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for RunPolicyVersion {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SyncRuns::Table)
                    .add_column(string(SyncRuns::PolicyVersion).default(""))
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum SyncBaselines {
    Table,
    ActivationId,
    MembershipCursor,
    PolicyVersion,
    FullSyncAt,
}

/// Incremental syncs: where each activation's audience was last synced up
/// to, and whether a run was full.
struct Baselines;

impl MigrationName for Baselines {
    fn name(&self) -> &str {
        "m20261201_000007_sync_baselines"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Baselines {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SyncBaselines::Table)
                    .if_not_exists()
                    .col(string(SyncBaselines::ActivationId).primary_key())
                    .col(big_integer(SyncBaselines::MembershipCursor))
                    .col(string(SyncBaselines::PolicyVersion))
                    .col(big_integer(SyncBaselines::FullSyncAt))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SyncRuns::Table)
                    .add_column(boolean(SyncRuns::Full).default(true))
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum OwedRemovalsTable {
    #[sea_orm(iden = "owed_removals")]
    Table,
    ActivationId,
    PseudonymousId,
    OwedAt,
    Attempts,
    NextAttemptAt,
}

/// Removals after a consent withdrawal that a destination did not take, kept
/// until they go through.
struct OwedRemovals;

impl MigrationName for OwedRemovals {
    fn name(&self) -> &str {
        "m20261203_000008_owed_removals"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OwedRemovals {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(OwedRemovalsTable::Table)
                    .if_not_exists()
                    .col(string(OwedRemovalsTable::ActivationId))
                    .col(string(OwedRemovalsTable::PseudonymousId))
                    .col(big_integer(OwedRemovalsTable::OwedAt))
                    .col(big_integer(OwedRemovalsTable::Attempts))
                    .col(big_integer(OwedRemovalsTable::NextAttemptAt))
                    .primary_key(
                        Index::create()
                            .col(OwedRemovalsTable::ActivationId)
                            .col(OwedRemovalsTable::PseudonymousId),
                    )
                    .to_owned(),
            )
            .await
    }
}
