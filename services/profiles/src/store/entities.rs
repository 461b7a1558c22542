//! The profiles service's tables. Times are Unix microseconds, which order
//! and compare the same on SQLite and PostgreSQL.

pub mod profile {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "profiles")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub region: String,
        /// Traits as tagged JSON (see `traits::TraitValue`).
        #[sea_orm(column_type = "Text")]
        pub traits: String,
        /// Set when this profile was merged into another; reads follow it.
        pub merged_into: Option<String>,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod identifier {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "identifiers")]
    pub struct Model {
        /// `kind:value`, unique: one identifier points at one person.
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub kind: String,
        pub value: String,
        pub profile_id: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The sender's id for the event; unique, so retries are recognised.
        #[sea_orm(unique)]
        pub message_id: String,
        pub profile_id: String,
        pub name: String,
        pub occurred_at: i64,
        pub received_at: i64,
        /// Properties as tagged JSON (see `traits::TraitValue`).
        #[sea_orm(column_type = "Text")]
        pub properties: String,
        pub source: String,
        /// The block of ids the event's row falls in, which its per-person
        /// index entry is filed under (see `store::events`).
        pub block: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod merge {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "merges")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub survivor_id: String,
        pub merged_id: String,
        /// The identifier (`kind:value`) whose sighting linked them.
        pub linked_by: String,
        pub merged_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod conflict {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "identity_conflicts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        /// The person the call resolved to.
        pub profile_id: String,
        /// The identifier (`kind:value`) kept apart.
        pub identifier: String,
        /// Who holds it, when someone does.
        pub owner_id: Option<String>,
        pub rule: String,
        pub at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod change {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "profile_changes")]
    pub struct Model {
        /// The cursor: assigned in commit order (appends are serialised).
        #[sea_orm(primary_key)]
        pub seq: i64,
        /// The person changed; empty for event batches (each event names
        /// its person).
        pub profile_id: String,
        /// The change as JSON (see `store::changes::ChangeRecord`).
        #[sea_orm(column_type = "Text")]
        pub payload: String,
        pub at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod suppressed {
    use sea_orm::entity::prelude::*;

    /// An erased person's identifier, as `madtech_common::digest::identifier`
    /// of its normalised value.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "suppressed_identifiers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub digest: String,
        pub kind: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
