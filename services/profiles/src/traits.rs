//! Typed trait values, as the domain and the database see them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One trait value. Stored as externally tagged JSON so the type survives a
/// round trip (`{"number": 3.0}` stays a number, `{"string": "3"}` a string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraitValue {
    String(String),
    Number(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    List(Vec<TraitValue>),
}

/// A profile's traits by name, in name order.
pub type Traits = BTreeMap<String, TraitValue>;

/// Longest trait name accepted.
pub const MAX_TRAIT_NAME_LEN: usize = 128;
