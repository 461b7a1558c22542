use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, string, string_null, text};

/// The profiles service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateProfiles)]
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
