//! Rule trees between protobuf and the domain, validated on the way in:
//! a bad node is INVALID_ARGUMENT naming its path (`rule.all.rules[1].trait`).

use madtech_common::error::FieldError;
use madtech_common::validate;
use madtech_proto::profiles::v1 as profiles_pb;
use madtech_proto::segments::v1 as pb;
use madtech_proto::time::{from_micros, to_micros};

use crate::rules::eval::Stored;
use crate::rules::text::{self, ParseError};
use crate::rules::{Cmp, EventFilter, EventMeasure, MAX_DAYS, MAX_DEPTH, Rule, Test, Value};
use crate::store::projection::{Change, Member, NewEvent, Snapshot};

/// Longest trait, property, event or identifier kind name.
const MAX_NAME_LEN: usize = 200;
/// Longest string a rule compares with.
const MAX_STRING_VALUE_LEN: usize = 4096;
/// Longest rule text.
pub const MAX_RULE_TEXT_LEN: usize = 64 * 1024;

/// The rule a request carries as a tree or as text (exactly one).
pub fn rule_from_request(tree: Option<&pb::Rule>, text: &str) -> Result<Rule, FieldError> {
    match (tree, text.trim().is_empty()) {
        (Some(tree), true) => rule_from_pb("rule", tree, 1),
        (None, false) => {
            if text.len() > MAX_RULE_TEXT_LEN {
                return Err(FieldError::new(
                    "rule_text",
                    format!("at most {MAX_RULE_TEXT_LEN} bytes"),
                ));
            }
            let rule = text::parse(text)
                .map_err(|err: ParseError| FieldError::new("rule_text", err.to_string()))?;
            // The text passed the parser; the same limits as a tree apply.
            rule_from_pb("rule_text", &rule_to_pb(&rule), 1)
        }
        (Some(_), false) => Err(FieldError::new("rule", "set rule or rule_text, not both")),
        (None, true) => Err(FieldError::new("rule", "set rule or rule_text")),
    }
}

fn name(field: &str, value: &str) -> Result<String, FieldError> {
    Ok(validate::text(field, value, MAX_NAME_LEN)?.to_string())
}

fn value_from_pb(
    field: &str,
    value: Option<&profiles_pb::TraitValue>,
) -> Result<Value, FieldError> {
    use profiles_pb::trait_value::Value as V;
    match value.and_then(|v| v.value.as_ref()) {
        None => Err(FieldError::new(field, "a value must have a type")),
        Some(V::StringValue(s)) if s.len() <= MAX_STRING_VALUE_LEN => Ok(Value::String(s.clone())),
        Some(V::StringValue(_)) => Err(FieldError::new(
            field,
            format!("strings are at most {MAX_STRING_VALUE_LEN} bytes"),
        )),
        Some(V::NumberValue(n)) if n.is_finite() => Ok(Value::Number(*n)),
        Some(V::NumberValue(_)) => Err(FieldError::new(field, "numbers must be finite")),
        Some(V::BoolValue(b)) => Ok(Value::Bool(*b)),
        Some(V::TimestampValue(ts)) => to_micros(ts)
            .map(Value::Timestamp)
            .ok_or_else(|| FieldError::new(field, "timestamp out of range")),
        Some(V::ListValue(_)) => Err(FieldError::new(
            field,
            "rules compare strings, numbers, bools and timestamps; test a list with `exists`",
        )),
    }
}

pub fn value_to_pb(value: &Value) -> profiles_pb::TraitValue {
    use profiles_pb::trait_value::Value as V;
    let value = match value {
        Value::String(s) => V::StringValue(s.clone()),
        Value::Number(n) => V::NumberValue(*n),
        Value::Bool(b) => V::BoolValue(*b),
        Value::Timestamp(micros) => V::TimestampValue(from_micros(*micros)),
    };
    profiles_pb::TraitValue { value: Some(value) }
}

fn cmp_from_pb(field: &str, comparator: i32) -> Result<Cmp, FieldError> {
    use pb::Comparator as C;
    match C::try_from(comparator).unwrap_or(C::Unspecified) {
        C::Lt => Ok(Cmp::Lt),
        C::Le => Ok(Cmp::Le),
        C::Eq => Ok(Cmp::Eq),
        C::Ne => Ok(Cmp::Ne),
        C::Ge => Ok(Cmp::Ge),
        C::Gt => Ok(Cmp::Gt),
        C::Unspecified => Err(FieldError::new(field, "set a comparator")),
    }
}

fn cmp_to_pb(cmp: Cmp) -> i32 {
    use pb::Comparator as C;
    match cmp {
        Cmp::Lt => C::Lt,
        Cmp::Le => C::Le,
        Cmp::Eq => C::Eq,
        Cmp::Ne => C::Ne,
        Cmp::Ge => C::Ge,
        Cmp::Gt => C::Gt,
    }
    .into()
}

fn test_from_pb(field: &str, test: Option<&pb::ValueTest>) -> Result<Test, FieldError> {
    use pb::value_test::Test as T;
    match test.and_then(|t| t.test.as_ref()) {
        None | Some(T::Exists(false)) => {
            Err(FieldError::new(field, "a test must say what it checks"))
        }
        Some(T::Exists(true)) => Ok(Test::Exists),
        Some(T::Equals(v)) => Ok(Test::Equals(value_from_pb(
            &format!("{field}.equals"),
            Some(v),
        )?)),
        Some(T::In(list)) => list
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| value_from_pb(&format!("{field}.in.values[{i}]"), Some(v)))
            .collect::<Result<_, _>>()
            .map(Test::In),
        Some(T::Compare(c)) => {
            let cmp = cmp_from_pb(&format!("{field}.compare.comparator"), c.comparator)?;
            let value_field = format!("{field}.compare.value");
            match value_from_pb(&value_field, c.value.as_ref())? {
                v @ (Value::Number(_) | Value::Timestamp(_)) => Ok(Test::Compare(cmp, v)),
                _ => Err(FieldError::new(
                    value_field,
                    "comparisons take a number or a timestamp",
                )),
            }
        }
        Some(T::StartsWith(s)) if s.len() <= MAX_STRING_VALUE_LEN => Ok(Test::Prefix(s.clone())),
        Some(T::Contains(s)) if s.len() <= MAX_STRING_VALUE_LEN => Ok(Test::Contains(s.clone())),
        Some(T::StartsWith(_) | T::Contains(_)) => Err(FieldError::new(
            field,
            format!("strings are at most {MAX_STRING_VALUE_LEN} bytes"),
        )),
    }
}

fn test_to_pb(test: &Test) -> pb::ValueTest {
    use pb::value_test::Test as T;
    let test = match test {
        Test::Exists => T::Exists(true),
        Test::Equals(v) => T::Equals(value_to_pb(v)),
        Test::In(values) => T::In(pb::ValueList {
            values: values.iter().map(value_to_pb).collect(),
        }),
        Test::Compare(cmp, v) => T::Compare(pb::Comparison {
            comparator: cmp_to_pb(*cmp),
            value: Some(value_to_pb(v)),
        }),
        Test::Prefix(s) => T::StartsWith(s.clone()),
        Test::Contains(s) => T::Contains(s.clone()),
    };
    pb::ValueTest { test: Some(test) }
}

fn days(field: &str, days: u32) -> Result<u32, FieldError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(days)
    } else {
        Err(FieldError::new(field, format!("1 to {MAX_DAYS} days")))
    }
}

/// Converts and validates a protobuf rule tree; `field` is its path.
pub fn rule_from_pb(field: &str, rule: &pb::Rule, depth: usize) -> Result<Rule, FieldError> {
    use pb::rule::Rule as Kind;
    if depth > MAX_DEPTH {
        return Err(FieldError::new(
            field,
            format!("rules nest at most {MAX_DEPTH} deep"),
        ));
    }
    let list = |name: &str, list: &pb::RuleList| -> Result<Vec<Rule>, FieldError> {
        list.rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule_from_pb(&format!("{field}.{name}.rules[{i}]"), r, depth + 1))
            .collect()
    };
    match &rule.rule {
        None => Err(FieldError::new(field, "a rule must say what it checks")),
        Some(Kind::TraitEquals(eq)) => Ok(Rule::Trait {
            name: name(&format!("{field}.trait_equals.trait"), &eq.r#trait)?,
            test: Test::Equals(value_from_pb(
                &format!("{field}.trait_equals.value"),
                eq.value.as_ref(),
            )?),
        }),
        Some(Kind::Trait(t)) => Ok(Rule::Trait {
            name: name(&format!("{field}.trait.trait"), &t.r#trait)?,
            test: test_from_pb(&format!("{field}.trait.test"), t.test.as_ref())?,
        }),
        Some(Kind::RegionIn(set)) => {
            let regions = set
                .regions
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let path = format!("{field}.region_in.regions[{i}]");
                    let region = validate::region(&path, r)?;
                    if region.is_empty() {
                        return Err(FieldError::required(path));
                    }
                    Ok(region)
                })
                .collect::<Result<_, _>>()?;
            Ok(Rule::RegionIn(regions))
        }
        Some(Kind::All(rules)) => Ok(Rule::All(list("all", rules)?)),
        Some(Kind::Any(rules)) => Ok(Rule::Any(list("any", rules)?)),
        Some(Kind::Not(inner)) => Ok(Rule::Not(Box::new(rule_from_pb(
            &format!("{field}.not"),
            inner,
            depth + 1,
        )?))),
        Some(Kind::HasIdentifier(kind)) => Ok(Rule::HasIdentifier(name(
            &format!("{field}.has_identifier"),
            kind,
        )?)),
        Some(Kind::InSegment(id)) => Ok(Rule::InSegment(name(&format!("{field}.in_segment"), id)?)),
        Some(Kind::Event(event)) => {
            use pb::event_condition::Measure as M;
            let here = format!("{field}.event");
            let properties = event
                .r#where
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let path = format!("{here}.where[{i}]");
                    Ok((
                        name(&format!("{path}.property"), &p.property)?,
                        test_from_pb(&format!("{path}.test"), p.test.as_ref())?,
                    ))
                })
                .collect::<Result<_, FieldError>>()?;
            let measure = match &event.measure {
                None => {
                    return Err(FieldError::new(
                        format!("{here}.measure"),
                        "set count, last_before_days or last_after_days",
                    ));
                }
                Some(M::Count(c)) => EventMeasure::Count {
                    days: days(&format!("{here}.count.days"), c.days)?,
                    cmp: cmp_from_pb(&format!("{here}.count.comparator"), c.comparator)?,
                    count: c.count,
                },
                Some(M::LastBeforeDays(d)) => EventMeasure::LastBefore {
                    days: days(&format!("{here}.last_before_days"), *d)?,
                },
                Some(M::LastAfterDays(d)) => EventMeasure::LastAfter {
                    days: days(&format!("{here}.last_after_days"), *d)?,
                },
            };
            Ok(Rule::Event {
                filter: EventFilter {
                    name: name(&format!("{here}.event"), &event.event)?,
                    properties,
                },
                measure,
            })
        }
    }
}

pub fn rule_to_pb(rule: &Rule) -> pb::Rule {
    use pb::rule::Rule as Kind;
    let list = |rules: &[Rule]| pb::RuleList {
        rules: rules.iter().map(rule_to_pb).collect(),
    };
    let kind = match rule {
        Rule::Trait { name, test } => Kind::Trait(pb::TraitTest {
            r#trait: name.clone(),
            test: Some(test_to_pb(test)),
        }),
        Rule::RegionIn(regions) => Kind::RegionIn(pb::RegionIn {
            regions: regions.iter().cloned().collect(),
        }),
        Rule::All(rules) => Kind::All(list(rules)),
        Rule::Any(rules) => Kind::Any(list(rules)),
        Rule::Not(inner) => Kind::Not(Box::new(rule_to_pb(inner))),
        Rule::HasIdentifier(kind) => Kind::HasIdentifier(kind.clone()),
        Rule::InSegment(id) => Kind::InSegment(id.clone()),
        Rule::Event { filter, measure } => {
            use pb::event_condition::Measure as M;
            Kind::Event(pb::EventCondition {
                event: filter.name.clone(),
                r#where: filter
                    .properties
                    .iter()
                    .map(|(property, test)| pb::PropertyTest {
                        property: property.clone(),
                        test: Some(test_to_pb(test)),
                    })
                    .collect(),
                measure: Some(match *measure {
                    EventMeasure::Count { days, cmp, count } => M::Count(pb::EventCount {
                        days,
                        comparator: cmp_to_pb(cmp),
                        count,
                    }),
                    EventMeasure::LastBefore { days } => M::LastBeforeDays(days),
                    EventMeasure::LastAfter { days } => M::LastAfterDays(days),
                }),
            })
        }
    };
    pb::Rule { rule: Some(kind) }
}

/// A trait or property value as the projection keeps it.
pub fn stored_from_pb(value: &profiles_pb::TraitValue) -> Stored {
    use profiles_pb::trait_value::Value as V;
    match &value.value {
        Some(V::StringValue(s)) => Stored::Value(Value::String(s.clone())),
        Some(V::NumberValue(n)) => Stored::Value(Value::Number(*n)),
        Some(V::BoolValue(b)) => Stored::Value(Value::Bool(*b)),
        Some(V::TimestampValue(ts)) => {
            to_micros(ts).map_or(Stored::Other, |t| Stored::Value(Value::Timestamp(t)))
        }
        Some(V::ListValue(_)) | None => Stored::Other,
    }
}

/// A profile change as the projection applies it (`None` for nothing).
pub fn change_from_pb(change: profiles_pb::ProfileChange) -> Option<Change> {
    use profiles_pb::profile_change::Change as C;
    Some(match change.change? {
        C::Upserted(upserted) => {
            let profile = upserted.profile?;
            Change::Upserted(Snapshot {
                identifiers: profile
                    .identifiers
                    .into_iter()
                    .map(|id| (id.kind, id.value))
                    .collect(),
                traits: profile
                    .traits
                    .iter()
                    .map(|(name, value)| (name.clone(), stored_from_pb(value)))
                    .collect(),
                profile_id: profile.profile_id,
                region: profile.region,
                merged_ids: profile.merged_profile_ids,
            })
        }
        C::Merged(merged) => Change::Merged {
            survivor: merged.survivor_profile_id,
            merged: merged.merged_profile_ids,
        },
        C::Erased(erased) => Change::Erased {
            profile_ids: erased.profile_ids,
        },
        C::EventsAppended(appended) => Change::Events(
            appended
                .events
                .into_iter()
                .map(|event| NewEvent {
                    occurred_at_micros: event.timestamp.as_ref().and_then(to_micros).unwrap_or(0),
                    properties: event
                        .properties
                        .iter()
                        .map(|(name, value)| (name.clone(), stored_from_pb(value)))
                        .collect(),
                    profile_id: event.profile_id,
                    name: event.name,
                })
                .collect(),
        ),
    })
}

/// A member as an export sends it (and as the projection stores it: see
/// `store::projection::export_doc`).
pub fn member_to_pb(member: Member) -> pb::AudienceMember {
    pb::AudienceMember {
        profile_id: member.profile_id,
        identifiers: member
            .identifiers
            .into_iter()
            .map(|(kind, value)| profiles_pb::Identifier { kind, value })
            .collect(),
        region: member.region,
        pseudonymous_id: String::new(),
        hashed_identifiers: Vec::new(),
        merged_profile_ids: member.merged_ids,
        birth_date: member.birth_date.unwrap_or_default(),
    }
}

/// The member an export sent (or the projection stored); an empty birth
/// date is an unknown one.
pub fn member_from_pb(member: pb::AudienceMember) -> Member {
    Member {
        profile_id: member.profile_id,
        region: member.region,
        identifiers: member
            .identifiers
            .into_iter()
            .map(|identifier| (identifier.kind, identifier.value))
            .collect(),
        merged_ids: member.merged_profile_ids,
        birth_date: Some(member.birth_date).filter(|date| !date.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region_rule(regions: &[&str]) -> pb::Rule {
        pb::Rule {
            rule: Some(pb::rule::Rule::RegionIn(pb::RegionIn {
                regions: regions.iter().map(|r| r.to_string()).collect(),
            })),
        }
    }

    #[test]
    fn text_and_trees_give_the_same_rule() {
        let text = r#"region in ["FR"] and not has phone and count(event "purchase" where amount >= 10, last 30d) > 1 and trait.plan in ["pro"] and last(event "login") after 7d and in_segment("s1")"#;
        let from_text = rule_from_request(None, text).expect("valid text");
        let tree = rule_to_pb(&from_text);
        let from_tree = rule_from_request(Some(&tree), "").expect("valid tree");
        assert_eq!(from_tree, from_text);
        assert_eq!(
            text::parse(&text::print(&from_tree)).expect("reparses"),
            from_text
        );
    }

    #[test]
    fn invalid_rules_name_the_path() {
        let nested = pb::Rule {
            rule: Some(pb::rule::Rule::Any(pb::RuleList {
                rules: vec![region_rule(&["FR"]), region_rule(&["Paris"])],
            })),
        };
        let err = rule_from_pb("rule", &nested, 1).expect_err("bad region");
        assert_eq!(err.field, "rule.any.rules[1].region_in.regions[0]");
        assert_eq!(
            rule_from_pb("rule", &pb::Rule { rule: None }, 1)
                .expect_err("empty")
                .field,
            "rule"
        );
        let zero_days = pb::Rule {
            rule: Some(pb::rule::Rule::Event(pb::EventCondition {
                event: "x".into(),
                r#where: vec![],
                measure: Some(pb::event_condition::Measure::LastAfterDays(0)),
            })),
        };
        assert_eq!(
            rule_from_pb("rule", &zero_days, 1)
                .expect_err("0 days")
                .field,
            "rule.event.last_after_days"
        );
        let bad_text = rule_from_request(None, "has").expect_err("incomplete");
        assert_eq!(bad_text.field, "rule_text");
        assert!(
            bad_text.reason.starts_with("line 1, column 4"),
            "{}",
            bad_text.reason
        );
        assert_eq!(
            rule_from_request(None, " ").expect_err("neither").field,
            "rule"
        );
        assert_eq!(
            rule_from_request(Some(&region_rule(&["FR"])), "has email")
                .expect_err("both")
                .field,
            "rule"
        );

        let mut deep = region_rule(&["FR"]);
        for _ in 0..MAX_DEPTH {
            deep = pb::Rule {
                rule: Some(pb::rule::Rule::All(pb::RuleList { rules: vec![deep] })),
            };
        }
        assert!(
            rule_from_pb("rule", &deep, 1)
                .expect_err("too deep")
                .reason
                .contains("nest")
        );
    }
}
