//! Typed trait values and the operations that change them, as the domain and
//! the database see them.

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

impl TraitValue {
    fn type_name(&self) -> &'static str {
        match self {
            TraitValue::String(_) => "a string",
            TraitValue::Number(_) => "a number",
            TraitValue::Bool(_) => "a bool",
            TraitValue::Timestamp(_) => "a timestamp",
            TraitValue::List(_) => "a list",
        }
    }
}

/// A trait's value with where it came from and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitEntry {
    pub value: TraitValue,
    pub source: String,
    pub observed_at: DateTime<Utc>,
}

/// A profile's traits by name, in name order.
pub type Traits = BTreeMap<String, TraitEntry>;

/// Longest trait name accepted.
pub const MAX_TRAIT_NAME_LEN: usize = 128;

/// A change to one trait.
#[derive(Debug, Clone, PartialEq)]
pub enum TraitOperation {
    Set(String, TraitValue),
    SetOnce(String, TraitValue),
    Increment(String, f64),
    Unset(String),
}

impl TraitOperation {
    pub fn name(&self) -> &str {
        match self {
            TraitOperation::Set(name, _)
            | TraitOperation::SetOnce(name, _)
            | TraitOperation::Increment(name, _)
            | TraitOperation::Unset(name) => name,
        }
    }
}

/// An operation the stored value does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("trait {name:?} is {found}, so it cannot be incremented")]
pub struct NotANumber {
    pub name: String,
    pub found: &'static str,
}

/// Applies `operations` in order. On error `traits` may be partly changed;
/// callers apply to a copy inside the transaction they abort.
pub fn apply(
    traits: &mut Traits,
    operations: &[TraitOperation],
    source: &str,
    observed_at: DateTime<Utc>,
) -> Result<(), NotANumber> {
    let entry = |value| TraitEntry {
        value,
        source: source.to_string(),
        observed_at,
    };
    for op in operations {
        match op {
            TraitOperation::Set(name, value) => {
                traits.insert(name.clone(), entry(value.clone()));
            }
            TraitOperation::SetOnce(name, value) => {
                traits
                    .entry(name.clone())
                    .or_insert_with(|| entry(value.clone()));
            }
            TraitOperation::Increment(name, by) => {
                let current = match traits.get(name).map(|e| &e.value) {
                    None => 0.0,
                    Some(TraitValue::Number(n)) => *n,
                    Some(other) => {
                        return Err(NotANumber {
                            name: name.clone(),
                            found: other.type_name(),
                        });
                    }
                };
                traits.insert(name.clone(), entry(TraitValue::Number(current + by)));
            }
            TraitOperation::Unset(name) => {
                traits.remove(name);
            }
        }
    }
    Ok(())
}

/// Merges `other` into `survivor`: for each trait the value observed last
/// wins, so a merge keeps the freshest knowledge of the person.
pub fn merge(survivor: &mut Traits, other: Traits) {
    for (name, theirs) in other {
        match survivor.get(&name) {
            Some(ours) if ours.observed_at >= theirs.observed_at => {}
            _ => {
                survivor.insert(name, theirs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).expect("valid time")
    }

    fn value(traits: &Traits, name: &str) -> Option<TraitValue> {
        traits.get(name).map(|e| e.value.clone())
    }

    #[test]
    fn operations_follow_their_semantics() {
        let mut traits = Traits::new();
        let s = |v: &str| TraitValue::String(v.into());
        apply(
            &mut traits,
            &[
                TraitOperation::Set("plan".into(), s("free")),
                TraitOperation::SetOnce("first_seen".into(), s("web")),
                TraitOperation::SetOnce("first_seen".into(), s("app")),
                TraitOperation::Increment("visits".into(), 1.0),
                TraitOperation::Increment("visits".into(), 2.5),
                TraitOperation::Set("plan".into(), s("pro")),
                TraitOperation::Set("temp".into(), TraitValue::Bool(true)),
                TraitOperation::Unset("temp".into()),
                TraitOperation::Unset("never_set".into()),
            ],
            "crm",
            at(100),
        )
        .expect("valid");
        assert_eq!(value(&traits, "plan"), Some(s("pro")));
        assert_eq!(value(&traits, "first_seen"), Some(s("web")));
        assert_eq!(value(&traits, "visits"), Some(TraitValue::Number(3.5)));
        assert_eq!(value(&traits, "temp"), None);
        assert_eq!(traits["plan"].source, "crm");
        assert_eq!(traits["plan"].observed_at, at(100));
    }

    #[test]
    fn incrementing_a_non_number_is_refused() {
        let mut traits = Traits::new();
        apply(
            &mut traits,
            &[TraitOperation::Set(
                "plan".into(),
                TraitValue::String("x".into()),
            )],
            "api",
            at(1),
        )
        .expect("set");
        let err = apply(
            &mut traits,
            &[TraitOperation::Increment("plan".into(), 1.0)],
            "api",
            at(2),
        )
        .expect_err("a string");
        assert_eq!(err.found, "a string");
    }

    #[test]
    fn merges_keep_the_value_observed_last() {
        let entry = |v: f64, t| TraitEntry {
            value: TraitValue::Number(v),
            source: "api".into(),
            observed_at: at(t),
        };
        let mut survivor =
            Traits::from([("a".into(), entry(1.0, 10)), ("b".into(), entry(1.0, 10))]);
        merge(
            &mut survivor,
            Traits::from([
                ("a".into(), entry(2.0, 5)),
                ("b".into(), entry(2.0, 20)),
                ("c".into(), entry(2.0, 1)),
            ]),
        );
        assert_eq!(value(&survivor, "a"), Some(TraitValue::Number(1.0)));
        assert_eq!(value(&survivor, "b"), Some(TraitValue::Number(2.0)));
        assert_eq!(value(&survivor, "c"), Some(TraitValue::Number(2.0)));
    }

    #[test]
    fn stored_entries_round_trip_through_json() {
        let traits = Traits::from([(
            "when".into(),
            TraitEntry {
                value: TraitValue::List(vec![
                    TraitValue::Timestamp(at(5)),
                    TraitValue::Number(3.0),
                ]),
                source: "web".into(),
                observed_at: at(6),
            },
        )]);
        let json = serde_json::to_string(&traits).expect("encode");
        let back: Traits = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, traits);
    }
}
