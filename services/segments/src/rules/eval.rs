//! Evaluating a rule for one person in memory: what real-time updates use,
//! and the reference the SQL compilation is checked against.

use std::collections::{BTreeMap, BTreeSet};

use super::{EventFilter, EventMeasure, Rule, Test, Value};

/// A trait or property value as the projection keeps it: a value rules can
/// compare, or one they can only see exists (a list).
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Value(Value),
    Other,
}

/// One event as the projection keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonEvent {
    pub name: String,
    pub occurred_at_micros: i64,
    pub properties: BTreeMap<String, Stored>,
}

/// Everything a rule can look at for one person.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Person {
    pub region: String,
    pub traits: BTreeMap<String, Stored>,
    pub identifier_kinds: BTreeSet<String>,
    pub events: Vec<PersonEvent>,
}

/// What evaluation needs besides the person.
pub struct Context<'a> {
    pub now_micros: i64,
    /// Whether the person is currently a member of a segment.
    pub member_of: &'a dyn Fn(&str) -> bool,
}

pub const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The start of a window of `days` days ending at `now_micros`.
pub fn window_start(now_micros: i64, days: u32) -> i64 {
    now_micros.saturating_sub(i64::from(days) * MICROS_PER_DAY)
}

impl Test {
    pub fn holds(&self, stored: Option<&Stored>) -> bool {
        let Some(stored) = stored else { return false };
        if matches!(self, Test::Exists) {
            return true;
        }
        let Stored::Value(value) = stored else {
            return false;
        };
        match self {
            Test::Exists => true,
            Test::Equals(expected) => value == expected,
            Test::In(set) => set.iter().any(|expected| value == expected),
            Test::Compare(cmp, expected) => match (value, expected) {
                (Value::Number(a), Value::Number(b)) => cmp.holds(a, b),
                (Value::Timestamp(a), Value::Timestamp(b)) => cmp.holds(a, b),
                _ => false,
            },
            Test::Prefix(prefix) => {
                matches!(value, Value::String(s) if s.starts_with(prefix.as_str()))
            }
            Test::Contains(needle) => {
                matches!(value, Value::String(s) if s.contains(needle.as_str()))
            }
        }
    }
}

impl EventFilter {
    pub fn matches(&self, event: &PersonEvent) -> bool {
        event.name == self.name
            && self
                .properties
                .iter()
                .all(|(name, test)| test.holds(event.properties.get(name)))
    }
}

impl Rule {
    pub fn matches(&self, person: &Person, context: &Context<'_>) -> bool {
        match self {
            Rule::All(rules) => rules.iter().all(|r| r.matches(person, context)),
            Rule::Any(rules) => rules.iter().any(|r| r.matches(person, context)),
            Rule::Not(rule) => !rule.matches(person, context),
            Rule::Trait { name, test } => test.holds(person.traits.get(name)),
            Rule::HasIdentifier(kind) => person.identifier_kinds.contains(kind),
            Rule::RegionIn(regions) => regions.contains(&person.region),
            Rule::Event { filter, measure } => {
                let matching = person.events.iter().filter(|e| filter.matches(e));
                match *measure {
                    EventMeasure::Count { days, cmp, count } => {
                        let start = window_start(context.now_micros, days);
                        let n = matching.filter(|e| e.occurred_at_micros >= start).count();
                        cmp.holds(n as u64, u64::from(count))
                    }
                    EventMeasure::LastBefore { days } => {
                        let start = window_start(context.now_micros, days);
                        let mut any = false;
                        for e in matching {
                            if e.occurred_at_micros >= start {
                                return false;
                            }
                            any = true;
                        }
                        any
                    }
                    EventMeasure::LastAfter { days } => {
                        let start = window_start(context.now_micros, days);
                        matching.into_iter().any(|e| e.occurred_at_micros >= start)
                    }
                }
            }
            Rule::InSegment(id) => (context.member_of)(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::text::parse;

    const NOW: i64 = 1_800_000_000_000_000;

    fn event(name: &str, days_ago: i64, amount: f64) -> PersonEvent {
        PersonEvent {
            name: name.into(),
            occurred_at_micros: NOW - days_ago * MICROS_PER_DAY,
            properties: BTreeMap::from([(
                "amount".to_string(),
                Stored::Value(Value::Number(amount)),
            )]),
        }
    }

    fn person() -> Person {
        Person {
            region: "FR".into(),
            traits: BTreeMap::from([
                ("plan".into(), Stored::Value(Value::String("pro".into()))),
                ("ltv".into(), Stored::Value(Value::Number(120.0))),
                ("tags".into(), Stored::Other),
            ]),
            identifier_kinds: BTreeSet::from(["email".to_string()]),
            events: vec![
                event("purchase", 3, 80.0),
                event("purchase", 10, 20.0),
                event("purchase", 40, 90.0),
                event("login", 60, 0.0),
            ],
        }
    }

    fn holds(text: &str) -> bool {
        let rule = parse(text).unwrap_or_else(|err| panic!("{text}: {err}"));
        let member_of = |id: &str| id == "vip";
        rule.matches(
            &person(),
            &Context {
                now_micros: NOW,
                member_of: &member_of,
            },
        )
    }

    #[test]
    fn traits_regions_and_identifiers() {
        assert!(holds(r#"trait.plan == "pro""#));
        assert!(!holds(r#"trait.plan == "Pro""#));
        assert!(holds(r#"trait.plan in ["free", "pro"]"#));
        assert!(holds("trait.ltv >= 100 and trait.ltv < 121"));
        assert!(!holds(r#"trait.ltv == "120""#), "types must match");
        assert!(holds(
            r#"trait.plan starts_with "p" and trait.plan contains "ro""#
        ));
        assert!(holds("trait.tags exists and not trait.tags == 1"));
        assert!(!holds("trait.missing exists"));
        assert!(holds(
            r#"region in ["FR", "DE"] and has email and not has phone"#
        ));
    }

    #[test]
    fn event_windows_counts_and_recency() {
        assert!(holds(
            r#"count(event "purchase" where amount > 50, last 30d) >= 1"#
        ));
        assert!(!holds(
            r#"count(event "purchase" where amount > 50, last 30d) >= 2"#
        ));
        assert!(holds(r#"count(event "purchase", last 30d) == 2"#));
        assert!(holds(r#"count(event "purchase", last 365d) == 3"#));
        assert!(holds(r#"last(event "login") before 30d"#));
        assert!(!holds(r#"last(event "purchase") before 30d"#));
        assert!(holds(
            r#"last(event "purchase" where amount > 50) after 7d"#
        ));
        assert!(
            !holds(r#"last(event "signup") before 1d"#),
            "never happened"
        );
        assert!(holds(r#"not last(event "signup") before 1d"#));
    }

    #[test]
    fn windows_include_their_first_instant_and_nothing_before() {
        let at = |micros| Person {
            events: vec![PersonEvent {
                name: "x".into(),
                occurred_at_micros: micros,
                properties: BTreeMap::new(),
            }],
            ..Person::default()
        };
        let rule = parse(r#"count(event "x", last 7d) >= 1"#).expect("parses");
        let context = Context {
            now_micros: NOW,
            member_of: &|_| false,
        };
        assert!(rule.matches(&at(NOW - 7 * MICROS_PER_DAY), &context));
        assert!(!rule.matches(&at(NOW - 7 * MICROS_PER_DAY - 1), &context));
        let before = parse(r#"last(event "x") before 7d"#).expect("parses");
        assert!(!before.matches(&at(NOW - 7 * MICROS_PER_DAY), &context));
        assert!(before.matches(&at(NOW - 7 * MICROS_PER_DAY - 1), &context));
    }

    #[test]
    fn segment_membership() {
        assert!(holds(r#"in_segment("vip")"#));
        assert!(!holds(r#"in_segment("churned")"#));
    }
}
