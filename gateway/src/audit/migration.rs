use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, big_pk_auto, string, text};

/// The gateway's audit schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateAudit)]
    }
}

#[derive(DeriveIden)]
enum AuditRecords {
    Table,
    Seq,
    RecordedAt,
    Caller,
    Method,
    SegmentId,
    DestinationId,
    DestinationKind,
    Purpose,
    PolicyVersion,
    Outcome,
    Allowed,
    Denied,
    IdentifiersStripped,
    ReleasedDigest,
    PreviousHash,
    Hash,
}

struct CreateAudit;

impl MigrationName for CreateAudit {
    fn name(&self) -> &str {
        "m20261122_000001_create_audit"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateAudit {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuditRecords::Table)
                    .if_not_exists()
                    .col(big_pk_auto(AuditRecords::Seq))
                    .col(big_integer(AuditRecords::RecordedAt))
                    .col(string(AuditRecords::Caller))
                    .col(string(AuditRecords::Method))
                    .col(string(AuditRecords::SegmentId))
                    .col(string(AuditRecords::DestinationId))
                    .col(string(AuditRecords::DestinationKind))
                    .col(string(AuditRecords::Purpose))
                    .col(string(AuditRecords::PolicyVersion))
                    .col(string(AuditRecords::Outcome))
                    .col(big_integer(AuditRecords::Allowed))
                    .col(text(AuditRecords::Denied))
                    .col(big_integer(AuditRecords::IdentifiersStripped))
                    .col(string(AuditRecords::ReleasedDigest))
                    .col(string(AuditRecords::PreviousHash))
                    .col(string(AuditRecords::Hash))
                    .to_owned(),
            )
            .await
    }
}
