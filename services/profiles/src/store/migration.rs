use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, big_pk_auto, string, string_null, text};

/// The profiles service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateProfiles),
            Box::new(CreateEventsAndChanges),
            Box::new(CreateSuppressions),
            Box::new(IndexEventsByBlock),
        ]
    }
}

#[derive(DeriveIden)]
enum Profiles {
    Table,
    Id,
    Region,
    Traits,
    MergedInto,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Identifiers {
    Table,
    Key,
    Kind,
    Value,
    ProfileId,
    CreatedAt,
}

struct CreateProfiles;

impl MigrationName for CreateProfiles {
    fn name(&self) -> &str {
        "m20261122_000001_create_profiles"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateProfiles {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Profiles::Table)
                    .if_not_exists()
                    .col(string(Profiles::Id).primary_key())
                    .col(string(Profiles::Region))
                    .col(text(Profiles::Traits))
                    .col(string_null(Profiles::MergedInto))
                    .col(big_integer(Profiles::CreatedAt))
                    .col(big_integer(Profiles::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Identifiers::Table)
                    .if_not_exists()
                    .col(string(Identifiers::Key).primary_key())
                    .col(string(Identifiers::Kind))
                    .col(string(Identifiers::Value))
                    .col(string(Identifiers::ProfileId))
                    .col(big_integer(Identifiers::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("identifiers_by_profile")
                    .table(Identifiers::Table)
                    .col(Identifiers::ProfileId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Events {
    Table,
    Id,
    MessageId,
    ProfileId,
    Name,
    OccurredAt,
    ReceivedAt,
    Properties,
    Source,
    Block,
}

/// The profiles table as the second migration indexes it.
#[derive(DeriveIden, Clone, Copy)]
enum MergedProfiles {
    #[sea_orm(iden = "profiles")]
    Table,
    MergedInto,
}

#[derive(DeriveIden, Clone, Copy)]
enum Merges {
    Table,
    Id,
    SurvivorId,
    MergedId,
    LinkedBy,
    MergedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum IdentityConflicts {
    Table,
    Id,
    ProfileId,
    Identifier,
    OwnerId,
    Rule,
    At,
}

#[derive(DeriveIden, Clone, Copy)]
enum ProfileChanges {
    Table,
    Seq,
    ProfileId,
    Payload,
    At,
}

/// Events, the merge and conflict records, the change log, and the index
/// that finds the profiles merged into a person.
struct CreateEventsAndChanges;

impl MigrationName for CreateEventsAndChanges {
    fn name(&self) -> &str {
        "m20261122_000002_create_events_and_changes"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateEventsAndChanges {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Events::Id))
                    .col(string(Events::MessageId).unique_key())
                    .col(string(Events::ProfileId))
                    .col(string(Events::Name))
                    .col(big_integer(Events::OccurredAt))
                    .col(big_integer(Events::ReceivedAt))
                    .col(text(Events::Properties))
                    .col(string(Events::Source))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "events_by_profile",
            Events::Table,
            &[Events::ProfileId, Events::OccurredAt],
        )
        .await?;
        index(
            manager,
            "profiles_by_merged_into",
            MergedProfiles::Table,
            &[MergedProfiles::MergedInto],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(Merges::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Merges::Id))
                    .col(string(Merges::SurvivorId))
                    .col(string(Merges::MergedId))
                    .col(string(Merges::LinkedBy))
                    .col(big_integer(Merges::MergedAt))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "merges_by_survivor",
            Merges::Table,
            &[Merges::SurvivorId],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(IdentityConflicts::Table)
                    .if_not_exists()
                    .col(big_pk_auto(IdentityConflicts::Id))
                    .col(string(IdentityConflicts::ProfileId))
                    .col(string(IdentityConflicts::Identifier))
                    .col(string_null(IdentityConflicts::OwnerId))
                    .col(string(IdentityConflicts::Rule))
                    .col(big_integer(IdentityConflicts::At))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "conflicts_by_profile",
            IdentityConflicts::Table,
            &[IdentityConflicts::ProfileId],
        )
        .await?;
        index(
            manager,
            "conflicts_by_owner",
            IdentityConflicts::Table,
            &[IdentityConflicts::OwnerId],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(ProfileChanges::Table)
                    .if_not_exists()
                    .col(big_pk_auto(ProfileChanges::Seq))
                    .col(string(ProfileChanges::ProfileId))
                    .col(text(ProfileChanges::Payload))
                    .col(big_integer(ProfileChanges::At))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "changes_by_profile",
            ProfileChanges::Table,
            &[ProfileChanges::ProfileId],
        )
        .await
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum SuppressedIdentifiers {
    Table,
    Digest,
    Kind,
    CreatedAt,
}

/// Identifiers of people erased at their request, hashed, that may not
/// come back until the person gives new consent.
struct CreateSuppressions;

impl MigrationName for CreateSuppressions {
    fn name(&self) -> &str {
        "m20261130_000003_create_suppressions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateSuppressions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SuppressedIdentifiers::Table)
                    .if_not_exists()
                    .col(string(SuppressedIdentifiers::Digest).primary_key())
                    .col(string(SuppressedIdentifiers::Kind))
                    .col(big_integer(SuppressedIdentifiers::CreatedAt))
                    .to_owned(),
            )
            .await
    }
}

/// Events indexed by person within blocks of consecutive ids (see
/// `store::events::EVENTS_PER_BLOCK`) instead of by person alone: a batch's
/// index entries land in the newest block's few pages rather than one
/// random page per person, which is what ingestion spent most of its time
/// writing. Events stored before have block 0, which every lookup reads.
struct IndexEventsByBlock;

impl MigrationName for IndexEventsByBlock {
    fn name(&self) -> &str {
        "m20261130_000004_index_events_by_block"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for IndexEventsByBlock {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .add_column(big_integer(Events::Block).default(0))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "events_by_block_and_profile",
            Events::Table,
            &[Events::Block, Events::ProfileId],
        )
        .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("events_by_profile")
                    .table(Events::Table)
                    .to_owned(),
            )
            .await
    }
}

async fn index<T: IntoIden + Copy + 'static, C: IntoIden + Copy + 'static>(
    manager: &SchemaManager<'_>,
    name: &str,
    table: T,
    columns: &[C],
) -> Result<(), DbErr> {
    let mut index = Index::create();
    index.name(name).table(table).if_not_exists();
    for column in columns {
        index.col(*column);
    }
    manager.create_index(index.to_owned()).await
}
