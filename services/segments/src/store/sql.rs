//! Rules compiled to SQL over the projection, so the database finds the
//! members. Every literal is a bound parameter; the text holds only what
//! this module writes. The semantics are those of `rules::eval`, which a
//! property test checks on both backends' behaviour.

use std::collections::BTreeMap;

use madtech_common::error::FieldError;
use sea_orm::DbBackend;

pub use madtech_common::sql::{
    JsonFunctions, MAX_BINDS, Sql, execute, insert_rows, json_page, number,
};

use crate::error::SegmentError;
use crate::rules::Value as Literal;
use crate::rules::eval::window_start;
use crate::rules::{Cmp, EventFilter, EventMeasure, MAX_DEPTH, Rule, Test};

/// Whether `count(..) cmp count` only asks if there is any event: `Some(true)`
/// for at least one, `Some(false)` for none, `None` for a real count.
fn presence(cmp: Cmp, count: u32) -> Option<bool> {
    match (cmp, count) {
        (Cmp::Ge, 1) | (Cmp::Gt, 0) | (Cmp::Ne, 0) => Some(true),
        (Cmp::Lt, 1) | (Cmp::Le, 0) | (Cmp::Eq, 0) => Some(false),
        _ => None,
    }
}

/// Compiles rules for one evaluation: one backend, one "now", and the
/// segments that `in_segment` may refer to.
pub struct Compiler<'a> {
    pub backend: DbBackend,
    pub now_micros: i64,
    /// Every segment's rule by id, for `in_segment`.
    pub segments: &'a BTreeMap<String, Rule>,
}

impl Compiler<'_> {
    /// Appends a boolean SQL condition on the row `people` for `rule`.
    pub fn condition(&self, sql: &mut Sql, rule: &Rule) -> Result<(), SegmentError> {
        self.rule(sql, rule, 0)
    }

    fn rule(&self, sql: &mut Sql, rule: &Rule, depth: usize) -> Result<(), SegmentError> {
        if depth > MAX_DEPTH * 2 {
            return Err(SegmentError::Invalid(FieldError::new(
                "rule",
                "rules nest too deeply through their segments",
            )));
        }
        match rule {
            Rule::All(rules) | Rule::Any(rules) if rules.is_empty() => {
                sql.push(if matches!(rule, Rule::All(_)) {
                    "1 = 1"
                } else {
                    "1 = 0"
                });
            }
            Rule::All(rules) | Rule::Any(rules) => {
                let joiner = if matches!(rule, Rule::All(_)) {
                    " AND "
                } else {
                    " OR "
                };
                sql.push("(");
                for (i, r) in rules.iter().enumerate() {
                    if i > 0 {
                        sql.push(joiner);
                    }
                    self.rule(sql, r, depth + 1)?;
                }
                sql.push(")");
            }
            Rule::Not(inner) => {
                sql.push("NOT (");
                self.rule(sql, inner, depth + 1)?;
                sql.push(")");
            }
            Rule::Trait { name, test } => {
                sql.push("EXISTS (SELECT 1 FROM person_traits t WHERE t.profile_id = people.profile_id AND t.name = ")
                    .bind(name.clone())
                    .push(" AND ");
                self.test(sql, "t", test);
                sql.push(")");
            }
            Rule::HasIdentifier(kind) => {
                sql.push("EXISTS (SELECT 1 FROM person_identifiers i WHERE i.profile_id = people.profile_id AND i.kind = ")
                    .bind(kind.clone())
                    .push(")");
            }
            Rule::RegionIn(regions) => {
                if regions.is_empty() {
                    sql.push("1 = 0");
                } else {
                    sql.push("people.region IN (");
                    for (i, region) in regions.iter().enumerate() {
                        if i > 0 {
                            sql.push(", ");
                        }
                        sql.bind(region.clone());
                    }
                    sql.push(")");
                }
            }
            Rule::Event { filter, measure } => match *measure {
                EventMeasure::Count { days, cmp, count } => {
                    let since = Some(window_start(self.now_micros, days));
                    // "At least one" and "none" are presence tests: EXISTS
                    // stops at the first event instead of counting them all.
                    match presence(cmp, count) {
                        Some(present) => {
                            sql.push(if present { "EXISTS" } else { "NOT EXISTS" })
                                .push(" (SELECT 1 FROM person_events e WHERE ");
                            self.event_match(sql, filter, since);
                            sql.push(")");
                        }
                        None => {
                            sql.push("(SELECT count(*) FROM person_events e WHERE ");
                            self.event_match(sql, filter, since);
                            sql.push(") ")
                                .push(operator(cmp))
                                .push(" ")
                                .bind(i64::from(count));
                        }
                    }
                }
                EventMeasure::LastAfter { days } => {
                    sql.push("EXISTS (SELECT 1 FROM person_events e WHERE ");
                    self.event_match(sql, filter, Some(window_start(self.now_micros, days)));
                    sql.push(")");
                }
                EventMeasure::LastBefore { days } => {
                    sql.push("(EXISTS (SELECT 1 FROM person_events e WHERE ");
                    self.event_match(sql, filter, None);
                    sql.push(") AND NOT EXISTS (SELECT 1 FROM person_events e WHERE ");
                    self.event_match(sql, filter, Some(window_start(self.now_micros, days)));
                    sql.push("))");
                }
            },
            Rule::InSegment(id) => {
                let Some(other) = self.segments.get(id) else {
                    return Err(SegmentError::Invalid(FieldError::new(
                        "rule",
                        format!("in_segment({id:?}): no such segment"),
                    )));
                };
                self.rule(sql, other, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Conditions on the row `e` of `person_events` for the person.
    fn event_match(&self, sql: &mut Sql, filter: &EventFilter, since: Option<i64>) {
        sql.push("e.profile_id = people.profile_id AND e.name = ")
            .bind(filter.name.clone());
        if let Some(since) = since {
            sql.push(" AND e.occurred_at >= ").bind(since);
        }
        for (property, test) in &filter.properties {
            sql.push(" AND EXISTS (SELECT 1 FROM event_properties ep WHERE ep.event_id = e.id AND ep.name = ")
                .bind(property.clone())
                .push(" AND ");
            self.test(sql, "ep", test);
            sql.push(")");
        }
    }

    /// A test on the typed value columns of the row aliased `at`.
    fn test(&self, sql: &mut Sql, at: &str, test: &Test) {
        match test {
            Test::Exists => {
                sql.push("1 = 1");
            }
            Test::Equals(value) => equals(sql, at, value),
            Test::In(values) if values.is_empty() => {
                sql.push("1 = 0");
            }
            Test::In(values) => {
                sql.push("(");
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        sql.push(" OR ");
                    }
                    equals(sql, at, value);
                }
                sql.push(")");
            }
            Test::Compare(cmp, Literal::Number(n)) => {
                sql.push(&format!("({at}.kind = 'number' AND {at}.number_value "))
                    .push(operator(*cmp))
                    .push(" ")
                    .bind(*n)
                    .push(")");
            }
            Test::Compare(cmp, Literal::Timestamp(t)) => {
                sql.push(&format!("({at}.kind = 'timestamp' AND {at}.int_value "))
                    .push(operator(*cmp))
                    .push(" ")
                    .bind(*t)
                    .push(")");
            }
            // Comparisons take numbers and timestamps only (validated); any
            // other literal matches nothing, as in memory.
            Test::Compare(..) => {
                sql.push("1 = 0");
            }
            Test::Prefix(prefix) => {
                sql.push(&format!(
                    "({at}.kind = 'string' AND substr({at}.string_value, 1, length(CAST("
                ))
                .bind(prefix.clone())
                .push(" AS TEXT))) = ")
                .bind(prefix.clone())
                .push(")");
            }
            Test::Contains(needle) => {
                let find = match self.backend {
                    DbBackend::Postgres => "strpos",
                    _ => "instr",
                };
                sql.push(&format!(
                    "({at}.kind = 'string' AND {find}({at}.string_value, CAST("
                ))
                .bind(needle.clone())
                .push(" AS TEXT)) > 0)");
            }
        }
    }
}

fn equals(sql: &mut Sql, at: &str, value: &Literal) {
    match value {
        Literal::String(s) => sql
            .push(&format!("({at}.kind = 'string' AND {at}.string_value = "))
            .bind(s.clone()),
        Literal::Number(n) => sql
            .push(&format!("({at}.kind = 'number' AND {at}.number_value = "))
            .bind(*n),
        Literal::Bool(b) => sql
            .push(&format!("({at}.kind = 'bool' AND {at}.int_value = "))
            .bind(i64::from(*b)),
        Literal::Timestamp(t) => sql
            .push(&format!("({at}.kind = 'timestamp' AND {at}.int_value = "))
            .bind(*t),
    };
    sql.push(")");
}

fn operator(cmp: Cmp) -> &'static str {
    match cmp {
        Cmp::Lt => "<",
        Cmp::Le => "<=",
        Cmp::Eq => "=",
        Cmp::Ne => "<>",
        Cmp::Ge => ">=",
        Cmp::Gt => ">",
    }
}
