//! The consent service's tables. Times are Unix microseconds.

pub mod entry {
    use sea_orm::entity::prelude::*;

    /// One append-only ledger entry; `seq` is the watch cursor.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "consent_entries")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        pub profile_id: String,
        pub purpose: String,
        pub state: String,
        pub legal_basis: String,
        pub source: String,
        pub region: String,
        pub notice_version: String,
        /// `tcf`, `gpp`, `usp` or `gpc` when derived from a signal.
        pub signal_kind: Option<String>,
        /// The signal as received (a TC string holds no personal data).
        pub raw_signal: Option<String>,
        pub cmp_id: Option<i32>,
        pub cmp_version: Option<i32>,
        pub derived_from: String,
        pub conflict: Option<String>,
        pub collected_at: i64,
        pub recorded_at: i64,
        pub expires_at: Option<i64>,
        /// Whether this entry became the current state when appended.
        pub effective: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod current {
    use sea_orm::entity::prelude::*;

    /// The latest entry per (person, purpose).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "consent_current")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub profile_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub purpose: String,
        pub state: String,
        pub seq: i64,
        /// When the choice behind `seq` was collected.
        pub collected_at: i64,
        /// When the choice behind `seq` stops counting.
        pub expires_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod merge {
    use sea_orm::entity::prelude::*;

    /// A profile id merged into another: choices recorded for either are
    /// the survivor's, and copied to every id merged into it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "consent_merges")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub absorbed_id: String,
        pub survivor_id: String,
        pub merged_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod follow {
    use sea_orm::entity::prelude::*;

    /// How far a stream this service follows has been applied.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "consent_follow")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub stream: String,
        pub cursor: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
