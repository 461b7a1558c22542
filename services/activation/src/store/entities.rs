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
        /// Seconds between scheduled syncs; none: on demand only.
        pub sync_every_secs: Option<i64>,
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
        /// `sync`, `consent_withdrawal` or `erasure`.
        pub trigger: String,
        pub to_send: i64,
        pub batches_sent: i64,
        pub batches_rejected: i64,
        pub retries: i64,
        pub policy_version: String,
        pub full: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sync_batch {
    use sea_orm::entity::prelude::*;

    /// One batch a run sent (or tried to): how many members, the outcome,
    /// and a digest of what was in it, never the hashes themselves.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_batches")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub run_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub op: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub activation_id: String,
        pub members: i64,
        /// `sent`, `refused` or `failed`.
        pub outcome: String,
        pub http_status: Option<i64>,
        pub digest: String,
        pub error: String,
        pub at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod followed_cursor {
    use sea_orm::entity::prelude::*;

    /// Where a followed stream was read up to.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "followed_cursors")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub stream: String,
        pub cursor: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sync_plan {
    use sea_orm::entity::prelude::*;

    /// One member of a run's plan: staged as fetched (`op` empty), then
    /// marked `add` or `remove` with its batch number, or left empty when
    /// the destination already holds it as it is.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_plan")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub run_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub pseudonymous_id: String,
        pub activation_id: String,
        #[sea_orm(column_type = "Text")]
        pub identifiers: String,
        pub op: Option<String>,
        pub seq: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sync_baseline {
    use sea_orm::entity::prelude::*;

    /// Where an activation's last successful sync left its audience: the
    /// membership cursor it applied everything up to, and the policy
    /// version and time of its last full sync.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sync_baselines")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub activation_id: String,
        pub membership_cursor: i64,
        pub policy_version: String,
        pub full_sync_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod owed_removal {
    use sea_orm::entity::prelude::*;

    /// A person to remove from an activation's destination after their
    /// consent was withdrawn, whose removal has not gone through yet.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "owed_removals")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub activation_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub pseudonymous_id: String,
        /// When it was last owed: a retry settles only what it read.
        pub owed_at: i64,
        /// Attempts since, and when the next is due.
        pub attempts: i64,
        pub next_attempt_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
