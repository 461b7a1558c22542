use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, string, string_uniq, text};

/// The segments service's schema, one migration per change.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateSegments)]
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
