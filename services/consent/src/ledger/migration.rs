use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, big_pk_auto, boolean, integer_null, string, string_null, text,
    text_null,
};

/// The consent service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateLedger),
            Box::new(CurrentByCollectionTime),
            Box::new(EffectiveEntries),
            Box::new(ProvableEntries),
            Box::new(MergesAndFollowing),
            Box::new(CreatePrivacyRequests),
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
    LegalBasis,
    SignalKind,
    RawSignal,
    CmpId,
    CmpVersion,
    DerivedFrom,
    Conflict,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum ConsentCurrent {
    Table,
    ProfileId,
    Purpose,
    State,
    Seq,
    CollectedAt,
    ExpiresAt,
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

/// What an entry needs to prove itself: the legal basis, the signal it came
/// from (verbatim), the CMP, what decided it, what it overrode, and when it
/// stops counting. Earlier entries were explicit choices under consent.
struct ProvableEntries;

impl MigrationName for ProvableEntries {
    fn name(&self) -> &str {
        "m20261130_000004_provable_entries"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ProvableEntries {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one column at a time.
        let entries = [
            string(ConsentEntries::LegalBasis)
                .default("consent")
                .to_owned(),
            string_null(ConsentEntries::SignalKind),
            text_null(ConsentEntries::RawSignal),
            integer_null(ConsentEntries::CmpId),
            integer_null(ConsentEntries::CmpVersion),
            string(ConsentEntries::DerivedFrom)
                .default("explicit choice")
                .to_owned(),
            text_null(ConsentEntries::Conflict),
            big_integer_null(ConsentEntries::ExpiresAt),
        ];
        for mut column in entries {
            let column: &mut ColumnDef = &mut column;
            manager
                .alter_table(
                    Table::alter()
                        .table(ConsentEntries::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(ConsentCurrent::Table)
                    .add_column(big_integer_null(ConsentCurrent::ExpiresAt))
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ConsentMerges {
    Table,
    AbsorbedId,
    SurvivorId,
    MergedAt,
}

#[derive(DeriveIden)]
enum ConsentFollow {
    Table,
    Stream,
    Cursor,
}

/// Profile merges as the consent service learned them from the profiles
/// change stream, and how far that stream has been applied.
struct MergesAndFollowing;

impl MigrationName for MergesAndFollowing {
    fn name(&self) -> &str {
        "m20261130_000005_merges_and_following"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MergesAndFollowing {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ConsentMerges::Table)
                    .if_not_exists()
                    .col(string(ConsentMerges::AbsorbedId).primary_key())
                    .col(string(ConsentMerges::SurvivorId))
                    .col(big_integer(ConsentMerges::MergedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("consent_merges_by_survivor")
                    .table(ConsentMerges::Table)
                    .col(ConsentMerges::SurvivorId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ConsentFollow::Table)
                    .if_not_exists()
                    .col(string(ConsentFollow::Stream).primary_key())
                    .col(big_integer(ConsentFollow::Cursor))
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum PrivacyRequests {
    Table,
    RequestId,
    Kind,
    Status,
    SubjectKind,
    SubjectValue,
    SubjectDigest,
    Region,
    Regime,
    SubmittedAt,
    DeadlineAt,
    CompletedAt,
    NextAttemptAt,
    Steps,
    Found,
    Export,
    Remaining,
}

#[derive(DeriveIden)]
enum Suppressions {
    Table,
    IdentifierDigest,
    Kind,
    RequestId,
    CreatedAt,
}

/// Data-subject requests with their steps, and the hashed identifiers of
/// erased people.
struct CreatePrivacyRequests;

impl MigrationName for CreatePrivacyRequests {
    fn name(&self) -> &str {
        "m20261130_000006_privacy_requests"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreatePrivacyRequests {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PrivacyRequests::Table)
                    .if_not_exists()
                    .col(string(PrivacyRequests::RequestId).primary_key())
                    .col(string(PrivacyRequests::Kind))
                    .col(string(PrivacyRequests::Status))
                    .col(string(PrivacyRequests::SubjectKind))
                    .col(string_null(PrivacyRequests::SubjectValue))
                    .col(string(PrivacyRequests::SubjectDigest))
                    .col(string(PrivacyRequests::Region))
                    .col(string(PrivacyRequests::Regime))
                    .col(big_integer(PrivacyRequests::SubmittedAt))
                    .col(big_integer(PrivacyRequests::DeadlineAt))
                    .col(big_integer_null(PrivacyRequests::CompletedAt))
                    .col(big_integer(PrivacyRequests::NextAttemptAt))
                    .col(text(PrivacyRequests::Steps))
                    .col(text_null(PrivacyRequests::Found))
                    .col(text(PrivacyRequests::Export))
                    .col(text(PrivacyRequests::Remaining))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("privacy_requests_due")
                    .table(PrivacyRequests::Table)
                    .col(PrivacyRequests::Status)
                    .col(PrivacyRequests::NextAttemptAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Suppressions::Table)
                    .if_not_exists()
                    .col(string(Suppressions::IdentifierDigest).primary_key())
                    .col(string(Suppressions::Kind))
                    .col(string(Suppressions::RequestId))
                    .col(big_integer(Suppressions::CreatedAt))
                    .to_owned(),
            )
            .await
    }
}
