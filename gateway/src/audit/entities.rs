pub mod record {
    use sea_orm::entity::prelude::*;

    /// One crossing. Times are Unix microseconds.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_records")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        pub recorded_at: i64,
        pub caller: String,
        pub method: String,
        pub segment_id: String,
        pub destination_id: String,
        pub destination_kind: String,
        pub purpose: String,
        pub policy_version: String,
        pub outcome: String,
        pub allowed: i64,
        /// Denied counts by reason, as JSON.
        #[sea_orm(column_type = "Text")]
        pub denied: String,
        pub identifiers_stripped: i64,
        pub released_digest: String,
        pub previous_hash: String,
        pub hash: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
