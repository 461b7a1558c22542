use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, big_pk_auto, blob_null, double_null, string, string_null,
    string_uniq, text,
};

/// The segments service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateSegments),
            Box::new(CreateProjection),
            Box::new(CreateMemberships),
            Box::new(AddExportDocs),
        ]
    }
}

#[derive(DeriveIden)]
enum Segments {
    Table,
    Id,
    Name,
    Rule,
    CreatedAt,
}

struct CreateSegments;

impl MigrationName for CreateSegments {
    fn name(&self) -> &str {
        "m20261122_000001_create_segments"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateSegments {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Segments::Table)
                    .if_not_exists()
                    .col(string(Segments::Id).primary_key())
                    .col(string_uniq(Segments::Name))
                    .col(text(Segments::Rule))
                    .col(big_integer(Segments::CreatedAt))
                    .to_owned(),
            )
            .await
    }
}

/// The projection of the profiles change stream that rules are evaluated
/// over (see `store::projection`).
struct CreateProjection;

impl MigrationName for CreateProjection {
    fn name(&self) -> &str {
        "m20261122_000002_create_projection"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum People {
    Table,
    ProfileId,
    Region,
    ExportDoc,
}

#[derive(DeriveIden, Clone, Copy)]
enum PersonIdentifiers {
    Table,
    ProfileId,
    Kind,
    Value,
}

#[derive(DeriveIden, Clone, Copy)]
enum PersonMerged {
    Table,
    ProfileId,
    MergedId,
}

#[derive(DeriveIden, Clone, Copy)]
enum PersonTraits {
    Table,
    ProfileId,
    Name,
}

#[derive(DeriveIden, Clone, Copy)]
enum PersonEvents {
    Table,
    Id,
    ProfileId,
    Name,
    OccurredAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum EventProperties {
    Table,
    EventId,
    Name,
}

/// A typed value's columns: `kind` is `string`, `number`, `bool`,
/// `timestamp` or `other`; bools and timestamps live in `int_value`.
#[derive(DeriveIden, Clone, Copy)]
enum ValueColumns {
    Kind,
    StringValue,
    NumberValue,
    IntValue,
}

#[derive(DeriveIden, Clone, Copy)]
enum ProjectionState {
    Table,
    Id,
    Cursor,
    ExportDocs,
}

fn with_value_columns(table: &mut TableCreateStatement) -> &mut TableCreateStatement {
    table
        .col(string(ValueColumns::Kind))
        .col(string_null(ValueColumns::StringValue))
        .col(double_null(ValueColumns::NumberValue))
        .col(big_integer_null(ValueColumns::IntValue))
}

#[async_trait::async_trait]
impl MigrationTrait for CreateProjection {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(People::Table)
                    .if_not_exists()
                    .col(string(People::ProfileId).primary_key())
                    .col(string(People::Region))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PersonIdentifiers::Table)
                    .if_not_exists()
                    .col(string(PersonIdentifiers::ProfileId))
                    .col(string(PersonIdentifiers::Kind))
                    .col(string(PersonIdentifiers::Value))
                    .primary_key(
                        Index::create()
                            .col(PersonIdentifiers::ProfileId)
                            .col(PersonIdentifiers::Kind)
                            .col(PersonIdentifiers::Value),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PersonMerged::Table)
                    .if_not_exists()
                    .col(string(PersonMerged::ProfileId))
                    .col(string(PersonMerged::MergedId))
                    .primary_key(
                        Index::create()
                            .col(PersonMerged::ProfileId)
                            .col(PersonMerged::MergedId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                with_value_columns(
                    Table::create()
                        .table(PersonTraits::Table)
                        .if_not_exists()
                        .col(string(PersonTraits::ProfileId))
                        .col(string(PersonTraits::Name)),
                )
                .primary_key(
                    Index::create()
                        .col(PersonTraits::ProfileId)
                        .col(PersonTraits::Name),
                )
                .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PersonEvents::Table)
                    .if_not_exists()
                    .col(big_pk_auto(PersonEvents::Id))
                    .col(string(PersonEvents::ProfileId))
                    .col(string(PersonEvents::Name))
                    .col(big_integer(PersonEvents::OccurredAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("person_events_by_person")
                    .table(PersonEvents::Table)
                    .col(PersonEvents::ProfileId)
                    .col(PersonEvents::Name)
                    .col(PersonEvents::OccurredAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                with_value_columns(
                    Table::create()
                        .table(EventProperties::Table)
                        .if_not_exists()
                        .col(big_integer(EventProperties::EventId))
                        .col(string(EventProperties::Name)),
                )
                .primary_key(
                    Index::create()
                        .col(EventProperties::EventId)
                        .col(EventProperties::Name),
                )
                .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ProjectionState::Table)
                    .if_not_exists()
                    .col(big_integer(ProjectionState::Id).primary_key())
                    .col(big_integer(ProjectionState::Cursor))
                    .to_owned(),
            )
            .await
    }
}

/// Who is in which segment, and the ordered log of who entered and left.
struct CreateMemberships;

impl MigrationName for CreateMemberships {
    fn name(&self) -> &str {
        "m20261122_000003_create_memberships"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Memberships {
    Table,
    SegmentId,
    ProfileId,
    EnteredAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum MembershipChanges {
    Table,
    Seq,
    SegmentId,
    ProfileId,
    Entered,
    At,
}

#[async_trait::async_trait]
impl MigrationTrait for CreateMemberships {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Memberships::Table)
                    .if_not_exists()
                    .col(string(Memberships::SegmentId))
                    .col(string(Memberships::ProfileId))
                    .col(big_integer(Memberships::EnteredAt))
                    .primary_key(
                        Index::create()
                            .col(Memberships::SegmentId)
                            .col(Memberships::ProfileId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(MembershipChanges::Table)
                    .if_not_exists()
                    .col(big_pk_auto(MembershipChanges::Seq))
                    .col(string(MembershipChanges::SegmentId))
                    .col(string(MembershipChanges::ProfileId))
                    .col(big_integer(MembershipChanges::Entered))
                    .col(big_integer(MembershipChanges::At))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("membership_changes_by_segment")
                    .table(MembershipChanges::Table)
                    .col(MembershipChanges::SegmentId)
                    .col(MembershipChanges::Seq)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }
}

/// Each person's export document (`store::projection::export_doc`), and
/// the key it was built under. Existing people get theirs when the service
/// starts (`Projection::prepare_export_docs`).
struct AddExportDocs;

impl MigrationName for AddExportDocs {
    fn name(&self) -> &str {
        "m20261130_000004_add_export_docs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AddExportDocs {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(People::Table)
                    .add_column(blob_null(People::ExportDoc))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ProjectionState::Table)
                    .add_column(string_null(ProjectionState::ExportDocs))
                    .to_owned(),
            )
            .await
    }
}
