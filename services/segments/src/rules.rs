//! Segment rules: a tree over a person's traits and region, and its
//! evaluation. Consent is deliberately absent: a segment says who the
//! marketer wants; the gateway's policy decides who may be reached.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A trait value as rules compare it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    String(String),
    Number(f64),
    Bool(bool),
    /// Unix microseconds.
    Timestamp(i64),
    List(Vec<Value>),
}

/// A rule tree. Stored as JSON in the segment's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The trait exists with exactly this type and value.
    TraitEquals { name: String, value: Value },
    /// The region is one of these ISO 3166 codes.
    RegionIn(BTreeSet<String>),
    /// Every rule holds; an empty list holds for everyone.
    All(Vec<Rule>),
    /// Some rule holds; an empty list holds for no one.
    Any(Vec<Rule>),
}

/// The deepest rule tree accepted, so evaluation cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

/// What a rule looks at for one person.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    pub region: String,
    pub traits: BTreeMap<String, Value>,
}

impl Rule {
    pub fn matches(&self, candidate: &Candidate) -> bool {
        match self {
            Rule::TraitEquals { name, value } => candidate.traits.get(name) == Some(value),
            Rule::RegionIn(regions) => regions.contains(&candidate.region),
            Rule::All(rules) => rules.iter().all(|rule| rule.matches(candidate)),
            Rule::Any(rules) => rules.iter().any(|rule| rule.matches(candidate)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(region: &str, traits: &[(&str, Value)]) -> Candidate {
        Candidate {
            region: region.into(),
            traits: traits
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    fn regions(codes: &[&str]) -> Rule {
        Rule::RegionIn(codes.iter().map(|c| c.to_string()).collect())
    }

    #[test]
    fn trait_equality_needs_the_same_type_and_value() {
        let rule = Rule::TraitEquals {
            name: "tier".into(),
            value: Value::String("gold".into()),
        };
        assert!(rule.matches(&person("", &[("tier", Value::String("gold".into()))])));
        assert!(!rule.matches(&person("", &[("tier", Value::String("Gold".into()))])));
        assert!(!rule.matches(&person("", &[("tier", Value::Number(1.0))])));
        assert!(
            !rule.matches(&person("", &[])),
            "a missing trait never matches"
        );
    }

    #[test]
    fn region_sets_and_combinators() {
        let fr = person("FR", &[]);
        let ca = person("US-CA", &[]);
        let unknown = person("", &[]);
        let eu = regions(&["FR", "DE"]);
        assert!(eu.matches(&fr));
        assert!(!eu.matches(&ca));
        assert!(!eu.matches(&unknown));
        let either = Rule::Any(vec![eu.clone(), regions(&["US-CA"])]);
        assert!(either.matches(&fr) && either.matches(&ca) && !either.matches(&unknown));
        assert!(Rule::All(vec![]).matches(&unknown), "empty all holds");
        assert!(
            !Rule::Any(vec![]).matches(&fr),
            "empty any holds for no one"
        );
        assert!(!Rule::All(vec![eu, regions(&["US-CA"])]).matches(&fr));
    }

    #[test]
    fn rules_round_trip_through_json() {
        let rule = Rule::All(vec![
            regions(&["FR"]),
            Rule::TraitEquals {
                name: "vip".into(),
                value: Value::Bool(true),
            },
        ]);
        let json = serde_json::to_string(&rule).expect("encode");
        assert_eq!(serde_json::from_str::<Rule>(&json).expect("decode"), rule);
    }
}
