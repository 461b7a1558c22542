//! Segment rules: a typed tree over what the segments projection knows of a
//! person (traits, identifier kinds, region, events, other segments), its
//! readable text form ([`text`]), and its evaluation in memory ([`eval`]).
//! The same tree compiles to SQL over the projection (`crate::sql`); both
//! evaluators must agree, which a property test checks.
//!
//! Consent is deliberately absent: a segment says who the marketer wants;
//! the gateway's policy decides who may be reached.

pub mod eval;
pub mod text;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A literal a rule compares with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    String(String),
    Number(f64),
    Bool(bool),
    /// Unix microseconds.
    Timestamp(i64),
}

/// How a number (or timestamp) compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmp {
    Lt,
    Le,
    Eq,
    Ne,
    Ge,
    Gt,
}

impl Cmp {
    pub fn holds<T: PartialOrd>(self, left: T, right: T) -> bool {
        match self {
            Cmp::Lt => left < right,
            Cmp::Le => left <= right,
            Cmp::Eq => left == right,
            Cmp::Ne => left != right,
            Cmp::Ge => left >= right,
            Cmp::Gt => left > right,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Ge => ">=",
            Cmp::Gt => ">",
        }
    }
}

/// A test on one trait (or one event property).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// The value exists, whatever its type.
    Exists,
    /// Same type and value.
    Equals(Value),
    /// Same type and value as one of these.
    In(Vec<Value>),
    /// A number or timestamp compared with a literal of the same type.
    Compare(Cmp, Value),
    /// A string starting with this (case-sensitive).
    Prefix(String),
    /// A string containing this (case-sensitive).
    Contains(String),
}

/// How often, or how recently, an event happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventMeasure {
    /// The number of matching events in the last `days` days compares with
    /// `count`.
    Count { days: u32, cmp: Cmp, count: u32 },
    /// The latest matching event is older than `days` days (and exists).
    LastBefore { days: u32 },
    /// The latest matching event is within the last `days` days.
    LastAfter { days: u32 },
}

/// Which events a condition counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFilter {
    pub name: String,
    /// Every property test must hold.
    pub properties: Vec<(String, Test)>,
}

/// A rule tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Every rule holds; an empty list holds for everyone.
    All(Vec<Rule>),
    /// Some rule holds; an empty list holds for no one.
    Any(Vec<Rule>),
    Not(Box<Rule>),
    Trait {
        name: String,
        test: Test,
    },
    /// The person has at least one identifier of this kind.
    HasIdentifier(String),
    /// The region is one of these ISO 3166 codes.
    RegionIn(BTreeSet<String>),
    Event {
        filter: EventFilter,
        measure: EventMeasure,
    },
    /// The person is a member of that segment (by id).
    InSegment(String),
}

/// The deepest rule tree accepted, so evaluation cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;
/// The longest window an event condition may look back.
pub const MAX_DAYS: u32 = 3_650;

impl Rule {
    /// Every segment this rule refers to.
    pub fn segments(&self) -> BTreeSet<&str> {
        let mut found = BTreeSet::new();
        self.visit(&mut |rule| {
            if let Rule::InSegment(id) = rule {
                found.insert(id.as_str());
            }
        });
        found
    }

    /// True when the rule looks back over a time window, so its members
    /// change as time passes even when nobody does anything.
    pub fn depends_on_time(&self) -> bool {
        let mut timed = false;
        self.visit(&mut |rule| timed |= matches!(rule, Rule::Event { .. }));
        timed
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Rule)) {
        f(self);
        match self {
            Rule::All(rules) | Rule::Any(rules) => rules.iter().for_each(|r| r.visit(f)),
            Rule::Not(rule) => rule.visit(f),
            _ => {}
        }
    }

    /// Checks that every segment this rule (the rule of `segment_id`)
    /// refers to exists in `segments` and that none of them refers back to
    /// `segment_id`, directly or through others. The error says which.
    pub fn check_references(
        &self,
        segment_id: &str,
        segments: &std::collections::BTreeMap<String, Rule>,
    ) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let mut path: Vec<&str> = Vec::new();
        fn walk<'a>(
            rule: &'a Rule,
            target: &str,
            segments: &'a std::collections::BTreeMap<String, Rule>,
            seen: &mut BTreeSet<&'a str>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), String> {
            for id in rule.segments() {
                if id == target {
                    let mut cycle: Vec<&str> = path.clone();
                    cycle.push(id);
                    return Err(format!(
                        "in_segment({id:?}) makes a cycle: {target} → {}",
                        cycle.join(" → ")
                    ));
                }
                let Some(other) = segments.get(id) else {
                    return Err(format!("in_segment({id:?}): no such segment"));
                };
                if seen.insert(id) {
                    path.push(id);
                    walk(other, target, segments, seen, path)?;
                    path.pop();
                }
            }
            Ok(())
        }
        walk(self, segment_id, segments, &mut seen, &mut path)
    }

    pub fn depth(&self) -> usize {
        match self {
            Rule::All(rules) | Rule::Any(rules) => {
                1 + rules.iter().map(Rule::depth).max().unwrap_or(0)
            }
            Rule::Not(rule) => 1 + rule.depth(),
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn refers(ids: &[&str]) -> Rule {
        Rule::All(
            ids.iter()
                .map(|id| Rule::InSegment(id.to_string()))
                .collect(),
        )
    }

    #[test]
    fn references_must_exist_and_never_come_back() {
        let segments = BTreeMap::from([
            ("a".to_string(), refers(&["b"])),
            ("b".to_string(), refers(&["c"])),
            ("c".to_string(), refers(&[])),
        ]);
        assert!(
            refers(&["a", "c"])
                .check_references("new", &segments)
                .is_ok()
        );
        let missing = refers(&["zz"])
            .check_references("new", &segments)
            .expect_err("missing");
        assert!(missing.contains("no such segment"), "{missing}");
        // c → a → b → c
        let cycle = refers(&["a"])
            .check_references("c", &segments)
            .expect_err("cycle");
        assert!(
            cycle.contains("cycle") && cycle.contains("a → b → c"),
            "{cycle}"
        );
        let itself = refers(&["c"])
            .check_references("c", &segments)
            .expect_err("self");
        assert!(itself.contains("cycle"), "{itself}");
    }
}
