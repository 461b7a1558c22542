//! The activation service's tables. Times are Unix microseconds. Nothing
//! here holds a raw identifier: only pseudonymous ids and hashes.

pub mod destination {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "destinations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(unique)]
        pub name: String,
        /// The target as JSON (see `destination::Target`); never credentials.
        #[sea_orm(column_type = "Text")]
        pub target: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod activation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "activations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub segment_id: String,
        pub destination_id: String,
        pub purpose: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sync_state {
    use sea_orm::entity::prelude::*;

    /// What a destination holds for an activation, as of the last
    /// acknowledged sync.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_state")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub activation_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub pseudonymous_id: String,
        /// Hashed identifiers sent, as JSON.
        #[sea_orm(column_type = "Text")]
        pub identifiers: String,
        pub synced_at: i64,
        /// False while the add is being delivered.
        pub confirmed: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sync_run {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_runs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub activation_id: String,
        pub phase: String,
        pub members_received: i64,
        pub added: i64,
        pub removed: i64,
        pub unchanged: i64,
        pub output: String,
        pub error: String,
        pub started_at: i64,
        pub finished_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
