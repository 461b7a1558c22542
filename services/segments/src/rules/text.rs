//! The readable form of a rule, parsed to the same tree the protobuf form
//! gives and printed back:
//!
//! ```text
//! region in ["FR", "DE"] and count(event "purchase" where amount > 50, last 30d) >= 2
//! trait.plan in ["pro", "enterprise"] and not has phone
//! last(event "login") before 90d or in_segment("churn-risk")
//! ```
//!
//! Grammar (lowest precedence first): `a or b`, `a and b`, `not a`, then
//! `( … )`, `true`, `false`, `region in [..]`, `has KIND`,
//! `in_segment("ID")`, `trait.NAME TEST` (or `trait["NAME"] TEST`),
//! `count(EVENT, last Nd) CMP N`, `last(EVENT) before|after Nd`, where
//! `EVENT` is `event "NAME" [where PROP TEST and …]` and `TEST` is
//! `exists`, `== v`, `!= n`, `< n`, `<= n`, `> n`, `>= n`, `in [v, …]`,
//! `starts_with "s"` or `contains "s"`. Values are strings, numbers, `true`,
//! `false` and `time("RFC 3339")`. Errors name the line and column.

use std::collections::BTreeSet;
use std::fmt::{self, Write};

use chrono::{DateTime, SecondsFormat};

use super::{Cmp, EventFilter, EventMeasure, MAX_DAYS, MAX_DEPTH, Rule, Test, Value};

/// A parse error at a position (1-based line and column, in characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Number(f64),
    /// `30d`
    Days(u32),
    Sym(&'static str),
    End,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(name) => write!(f, "`{name}`"),
            Token::Str(s) => write!(f, "the string {s:?}"),
            Token::Number(n) => write!(f, "the number {n}"),
            Token::Days(d) => write!(f, "`{d}d`"),
            Token::Sym(s) => write!(f, "`{s}`"),
            Token::End => f.write_str("the end of the rule"),
        }
    }
}

#[derive(Debug, Clone)]
struct Spanned {
    token: Token,
    line: usize,
    column: usize,
}

const SYMBOLS: [&str; 13] = [
    "==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ",", ".", "-",
];

fn tokenize(text: &str) -> Result<Vec<Spanned>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line, mut column) = (0, 1, 1);
    let advance = |i: &mut usize, line: &mut usize, column: &mut usize, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *column = 1;
        } else {
            *column += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut column, c);
            continue;
        }
        let (start_line, start_column) = (line, column);
        let error = |message: String| ParseError {
            line: start_line,
            column: start_column,
            message,
        };
        let token = if c == '"' {
            advance(&mut i, &mut line, &mut column, c);
            let mut s = String::new();
            loop {
                let Some(&c) = chars.get(i) else {
                    return Err(error("this string is not closed".into()));
                };
                advance(&mut i, &mut line, &mut column, c);
                match c {
                    '"' => break,
                    '\\' => {
                        let Some(&escaped) = chars.get(i) else {
                            return Err(error("this string is not closed".into()));
                        };
                        advance(&mut i, &mut line, &mut column, escaped);
                        s.push(match escaped {
                            '"' => '"',
                            '\\' => '\\',
                            'n' => '\n',
                            't' => '\t',
                            other => {
                                return Err(error(format!(
                                    "unknown escape \\{other} (use \\\" \\\\ \\n \\t)"
                                )));
                            }
                        });
                    }
                    c => s.push(c),
                }
            }
            Token::Str(s)
        } else if c.is_ascii_digit() {
            let start = i;
            while chars
                .get(i)
                .is_some_and(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E'))
                || (i > start
                    && matches!(chars.get(i), Some('+' | '-'))
                    && matches!(chars[i - 1], 'e' | 'E'))
            {
                let c = chars[i];
                advance(&mut i, &mut line, &mut column, c);
            }
            let digits: String = chars[start..i].iter().collect();
            if chars.get(i) == Some(&'d')
                && !chars
                    .get(i + 1)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_')
            {
                advance(&mut i, &mut line, &mut column, 'd');
                let days: u32 = digits
                    .parse()
                    .map_err(|_| error(format!("`{digits}d` is not a whole number of days")))?;
                Token::Days(days)
            } else {
                let n: f64 = digits
                    .parse()
                    .map_err(|_| error(format!("`{digits}` is not a number")))?;
                if !n.is_finite() {
                    return Err(error(format!("`{digits}` is too large")));
                }
                Token::Number(n)
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while chars
                .get(i)
                .is_some_and(|c| c.is_alphanumeric() || *c == '_')
            {
                let c = chars[i];
                advance(&mut i, &mut line, &mut column, c);
            }
            Token::Ident(chars[start..i].iter().collect())
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let Some(symbol) = SYMBOLS.iter().find(|s| rest.starts_with(**s)) else {
                return Err(error(format!("unexpected character {c:?}")));
            };
            for c in symbol.chars() {
                advance(&mut i, &mut line, &mut column, c);
            }
            Token::Sym(symbol)
        };
        tokens.push(Spanned {
            token,
            line: start_line,
            column: start_column,
        });
    }
    tokens.push(Spanned {
        token: Token::End,
        line,
        column,
    });
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Spanned>,
    at: usize,
    /// Where the last token taken was, to point errors at it.
    taken: usize,
    depth: usize,
}

/// Parses a rule's text form.
pub fn parse(text: &str) -> Result<Rule, ParseError> {
    let mut parser = Parser {
        tokens: tokenize(text)?,
        at: 0,
        taken: 0,
        depth: 0,
    };
    let rule = parser.or()?;
    match parser.peek() {
        Token::End => Ok(rule),
        other => Err(parser.error(format!("expected `and`, `or` or the end, found {other}"))),
    }
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.at].token
    }

    fn next(&mut self) -> Token {
        let token = self.tokens[self.at].token.clone();
        self.taken = self.at;
        if self.at + 1 < self.tokens.len() {
            self.at += 1;
        }
        token
    }

    fn error(&self, message: String) -> ParseError {
        let here = &self.tokens[self.at];
        ParseError {
            line: here.line,
            column: here.column,
            message,
        }
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Token::Ident(w) if w == word)
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let found = self.is_word(word);
        if found {
            self.next();
        }
        found
    }

    fn expect_word(&mut self, word: &str) -> Result<(), ParseError> {
        if self.eat_word(word) {
            Ok(())
        } else {
            Err(self.error(format!("expected `{word}`, found {}", self.peek())))
        }
    }

    fn expect_sym(&mut self, symbol: &str) -> Result<(), ParseError> {
        if self.peek() == &Token::Sym(sym(symbol)) {
            self.next();
            Ok(())
        } else {
            Err(self.error(format!("expected `{symbol}`, found {}", self.peek())))
        }
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Token::Str(s) => {
                let s = s.clone();
                self.next();
                Ok(s)
            }
            other => Err(self.error(format!("expected {what} (a quoted string), found {other}"))),
        }
    }

    fn days(&mut self) -> Result<u32, ParseError> {
        match self.peek() {
            Token::Days(d) if *d >= 1 && *d <= MAX_DAYS => {
                let d = *d;
                self.next();
                Ok(d)
            }
            Token::Days(_) => Err(self.error(format!("windows are 1d to {MAX_DAYS}d"))),
            other => Err(self.error(format!(
                "expected a number of days like `30d`, found {other}"
            ))),
        }
    }

    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ParseError>,
    ) -> Result<T, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(format!("rules nest at most {MAX_DEPTH} deep")));
        }
        let result = f(self);
        self.depth -= 1;
        result
    }

    fn or(&mut self) -> Result<Rule, ParseError> {
        let mut rules = vec![self.and()?];
        while self.eat_word("or") {
            rules.push(self.and()?);
        }
        Ok(if rules.len() == 1 {
            rules.remove(0)
        } else {
            Rule::Any(rules)
        })
    }

    fn and(&mut self) -> Result<Rule, ParseError> {
        let mut rules = vec![self.unary()?];
        while self.eat_word("and") {
            rules.push(self.unary()?);
        }
        Ok(if rules.len() == 1 {
            rules.remove(0)
        } else {
            Rule::All(rules)
        })
    }

    fn unary(&mut self) -> Result<Rule, ParseError> {
        if self.eat_word("not") {
            return self.nested(|p| Ok(Rule::Not(Box::new(p.unary()?))));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Rule, ParseError> {
        match self.peek().clone() {
            Token::Sym("(") => {
                self.next();
                let rule = self.nested(|p| p.or())?;
                self.expect_sym(")")?;
                Ok(rule)
            }
            Token::Ident(word) => match word.as_str() {
                "true" => {
                    self.next();
                    Ok(Rule::All(Vec::new()))
                }
                "false" => {
                    self.next();
                    Ok(Rule::Any(Vec::new()))
                }
                "region" => {
                    self.next();
                    self.expect_word("in")?;
                    let regions = self.list(|p| {
                        let (line, column) = (p.tokens[p.at].line, p.tokens[p.at].column);
                        let code = p.string("a region code")?;
                        madtech_common::validate::region("region", &code)
                            .ok()
                            .filter(|r| !r.is_empty())
                            .ok_or(ParseError {
                                line,
                                column,
                                message: format!("{code:?} is not an ISO 3166 region code"),
                            })
                    })?;
                    Ok(Rule::RegionIn(regions.into_iter().collect::<BTreeSet<_>>()))
                }
                "has" => {
                    self.next();
                    match self.next() {
                        Token::Ident(kind) => Ok(Rule::HasIdentifier(kind)),
                        other => {
                            self.at = self.taken;
                            Err(self.error(format!(
                                "expected an identifier kind like `email`, found {other}"
                            )))
                        }
                    }
                }
                "in_segment" => {
                    self.next();
                    self.expect_sym("(")?;
                    let id = self.string("a segment id")?;
                    self.expect_sym(")")?;
                    Ok(Rule::InSegment(id))
                }
                "trait" => {
                    self.next();
                    let name = self.trait_name()?;
                    let test = self.test()?;
                    Ok(Rule::Trait { name, test })
                }
                "count" => {
                    self.next();
                    self.expect_sym("(")?;
                    let filter = self.event_filter()?;
                    self.expect_sym(",")?;
                    self.expect_word("last")?;
                    let days = self.days()?;
                    self.expect_sym(")")?;
                    let cmp = self.cmp()?.ok_or_else(|| {
                        self.error(format!(
                            "expected a comparison like `>= 2`, found {}",
                            self.peek()
                        ))
                    })?;
                    let count = match self.peek() {
                        Token::Number(n) if n.fract() == 0.0 && *n >= 0.0 && *n <= 1e9 => {
                            let n = *n as u32;
                            self.next();
                            n
                        }
                        other => {
                            return Err(self.error(format!(
                                "expected a whole number of events, found {other}"
                            )));
                        }
                    };
                    Ok(Rule::Event {
                        filter,
                        measure: EventMeasure::Count { days, cmp, count },
                    })
                }
                "last" => {
                    self.next();
                    self.expect_sym("(")?;
                    let filter = self.event_filter()?;
                    self.expect_sym(")")?;
                    let before = if self.eat_word("before") {
                        true
                    } else if self.eat_word("after") {
                        false
                    } else {
                        return Err(
                            self.error(format!("expected `before` or `after`, found {}", self.peek()))
                        );
                    };
                    let days = self.days()?;
                    let measure = if before {
                        EventMeasure::LastBefore { days }
                    } else {
                        EventMeasure::LastAfter { days }
                    };
                    Ok(Rule::Event { filter, measure })
                }
                other => Err(self.error(format!(
                    "expected a condition (`trait.…`, `region in`, `has`, `count(…)`, `last(…)`, `in_segment(…)`, `not`, `(`), found `{other}`"
                ))),
            },
            other => Err(self.error(format!("expected a condition, found {other}"))),
        }
    }

    fn trait_name(&mut self) -> Result<String, ParseError> {
        match self.next() {
            Token::Sym(".") => match self.next() {
                Token::Ident(name) => Ok(name),
                other => {
                    self.at = self.taken;
                    Err(self.error(format!("expected a trait name, found {other}")))
                }
            },
            Token::Sym("[") => {
                let name = self.string("a trait name")?;
                self.expect_sym("]")?;
                Ok(name)
            }
            other => {
                self.at = self.taken;
                Err(self.error(format!(
                    "expected `.name` or `[\"name\"]` after `trait`, found {other}"
                )))
            }
        }
    }

    fn event_filter(&mut self) -> Result<EventFilter, ParseError> {
        self.expect_word("event")?;
        let name = self.string("an event name")?;
        let mut properties = Vec::new();
        if self.eat_word("where") {
            loop {
                let property = match self.next() {
                    Token::Ident(name) => name,
                    Token::Str(name) => name,
                    other => {
                        self.at = self.taken;
                        return Err(self.error(format!("expected a property name, found {other}")));
                    }
                };
                properties.push((property, self.test()?));
                if !self.eat_word("and") {
                    break;
                }
            }
        }
        Ok(EventFilter { name, properties })
    }

    fn cmp(&mut self) -> Result<Option<Cmp>, ParseError> {
        let cmp = match self.peek() {
            Token::Sym("==") => Cmp::Eq,
            Token::Sym("!=") => Cmp::Ne,
            Token::Sym("<") => Cmp::Lt,
            Token::Sym("<=") => Cmp::Le,
            Token::Sym(">") => Cmp::Gt,
            Token::Sym(">=") => Cmp::Ge,
            _ => return Ok(None),
        };
        self.next();
        Ok(Some(cmp))
    }

    fn test(&mut self) -> Result<Test, ParseError> {
        if self.eat_word("exists") {
            return Ok(Test::Exists);
        }
        if self.eat_word("in") {
            return Ok(Test::In(self.list(|p| p.value())?));
        }
        if self.eat_word("starts_with") {
            return Ok(Test::Prefix(self.string("a prefix")?));
        }
        if self.eat_word("contains") {
            return Ok(Test::Contains(self.string("a substring")?));
        }
        let Some(cmp) = self.cmp()? else {
            return Err(self.error(format!(
                "expected a test (`exists`, `==`, `<`, `in`, `starts_with`, `contains`, …), found {}",
                self.peek()
            )));
        };
        let at = self.at;
        let value = self.value()?;
        match (cmp, &value) {
            (Cmp::Eq, _) => Ok(Test::Equals(value)),
            (_, Value::Number(_) | Value::Timestamp(_)) => Ok(Test::Compare(cmp, value)),
            _ => {
                self.at = at;
                Err(self.error(format!(
                    "`{}` compares numbers and times; for other values write `not … == …`",
                    cmp.symbol()
                )))
            }
        }
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        let negative = self.peek() == &Token::Sym("-");
        if negative {
            self.next();
        }
        match self.next() {
            Token::Number(n) => Ok(Value::Number(if negative { -n } else { n })),
            Token::Str(s) if !negative => Ok(Value::String(s)),
            Token::Ident(word) if !negative && word == "true" => Ok(Value::Bool(true)),
            Token::Ident(word) if !negative && word == "false" => Ok(Value::Bool(false)),
            Token::Ident(word) if !negative && word == "time" => {
                self.expect_sym("(")?;
                let at = self.at;
                let text = self.string("an RFC 3339 time")?;
                let time = DateTime::parse_from_rfc3339(&text).map_err(|err| {
                    self.at = at;
                    self.error(format!("{text:?} is not an RFC 3339 time: {err}"))
                })?;
                self.expect_sym(")")?;
                Ok(Value::Timestamp(time.timestamp_micros()))
            }
            other => {
                self.at = self.taken;
                Err(self.error(format!("expected a value, found {other}")))
            }
        }
    }

    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, ParseError>,
    ) -> Result<Vec<T>, ParseError> {
        self.expect_sym("[")?;
        let mut items = Vec::new();
        if self.peek() == &Token::Sym("]") {
            self.next();
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            if self.peek() == &Token::Sym(",") {
                self.next();
                continue;
            }
            self.expect_sym("]")?;
            return Ok(items);
        }
    }
}

/// The `&'static str` of a symbol (tokens keep static symbols).
fn sym(symbol: &str) -> &'static str {
    SYMBOLS
        .iter()
        .find(|s| **s == symbol)
        .copied()
        .unwrap_or("")
}

/// Prints a rule in its text form; `parse` gives the rule back.
pub fn print(rule: &Rule) -> String {
    let mut out = String::new();
    print_rule(&mut out, rule, Context::Top);
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Context {
    Top,
    InAnd,
    InNot,
}

fn print_rule(out: &mut String, rule: &Rule, context: Context) {
    match rule {
        Rule::All(rules) if rules.is_empty() => out.push_str("true"),
        Rule::Any(rules) if rules.is_empty() => out.push_str("false"),
        Rule::All(rules) | Rule::Any(rules) if rules.len() == 1 => {
            print_rule(out, &rules[0], context);
        }
        Rule::All(rules) => {
            let parens = context == Context::InNot;
            if parens {
                out.push('(');
            }
            for (i, r) in rules.iter().enumerate() {
                if i > 0 {
                    out.push_str(" and ");
                }
                print_rule(out, r, Context::InAnd);
            }
            if parens {
                out.push(')');
            }
        }
        Rule::Any(rules) => {
            let parens = context != Context::Top;
            if parens {
                out.push('(');
            }
            for (i, r) in rules.iter().enumerate() {
                if i > 0 {
                    out.push_str(" or ");
                }
                print_rule(out, r, Context::Top);
            }
            if parens {
                out.push(')');
            }
        }
        Rule::Not(inner) => {
            out.push_str("not ");
            print_rule(out, inner, Context::InNot);
        }
        Rule::Trait { name, test } => {
            out.push_str("trait");
            if is_ident(name) {
                let _ = write!(out, ".{name}");
            } else {
                let _ = write!(out, "[{}]", quote(name));
            }
            print_test(out, test);
        }
        Rule::HasIdentifier(kind) => {
            let _ = write!(out, "has {kind}");
        }
        Rule::RegionIn(regions) => {
            let list: Vec<String> = regions.iter().map(|r| quote(r)).collect();
            let _ = write!(out, "region in [{}]", list.join(", "));
        }
        Rule::InSegment(id) => {
            let _ = write!(out, "in_segment({})", quote(id));
        }
        Rule::Event { filter, measure } => {
            let mut event = format!("event {}", quote(&filter.name));
            for (i, (name, test)) in filter.properties.iter().enumerate() {
                event.push_str(if i == 0 { " where " } else { " and " });
                if is_ident(name) {
                    event.push_str(name);
                } else {
                    event.push_str(&quote(name));
                }
                print_test(&mut event, test);
            }
            let _ = match measure {
                EventMeasure::Count { days, cmp, count } => {
                    write!(out, "count({event}, last {days}d) {} {count}", cmp.symbol())
                }
                EventMeasure::LastBefore { days } => write!(out, "last({event}) before {days}d"),
                EventMeasure::LastAfter { days } => write!(out, "last({event}) after {days}d"),
            };
        }
    }
}

const KEYWORDS: [&str; 8] = [
    "and",
    "or",
    "not",
    "exists",
    "in",
    "starts_with",
    "contains",
    "where",
];

fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&name)
        && !matches!(name, "true" | "false" | "time")
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn print_value(out: &mut String, value: &Value) {
    let _ = match value {
        Value::String(s) => write!(out, "{}", quote(s)),
        Value::Number(n) => write!(out, "{n}"),
        Value::Bool(b) => write!(out, "{b}"),
        Value::Timestamp(micros) => match DateTime::from_timestamp_micros(*micros) {
            Some(t) => write!(
                out,
                "time({})",
                quote(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            ),
            None => write!(out, "time(\"invalid\")"),
        },
    };
}

fn print_test(out: &mut String, test: &Test) {
    match test {
        Test::Exists => out.push_str(" exists"),
        Test::Equals(v) => {
            out.push_str(" == ");
            print_value(out, v);
        }
        Test::Compare(cmp, v) => {
            let _ = write!(out, " {} ", cmp.symbol());
            print_value(out, v);
        }
        Test::In(values) => {
            out.push_str(" in [");
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                print_value(out, v);
            }
            out.push(']');
        }
        Test::Prefix(s) => {
            let _ = write!(out, " starts_with {}", quote(s));
        }
        Test::Contains(s) => {
            let _ = write!(out, " contains {}", quote(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses_to_the_expected_tree() {
        let rule = parse(
            r#"region in ["FR","DE"] and count(event "purchase" where amount > 50, last 30d) >= 2"#,
        )
        .expect("parses");
        assert_eq!(
            rule,
            Rule::All(vec![
                Rule::RegionIn(BTreeSet::from(["DE".into(), "FR".into()])),
                Rule::Event {
                    filter: EventFilter {
                        name: "purchase".into(),
                        properties: vec![(
                            "amount".into(),
                            Test::Compare(Cmp::Gt, Value::Number(50.0))
                        )],
                    },
                    measure: EventMeasure::Count {
                        days: 30,
                        cmp: Cmp::Ge,
                        count: 2
                    },
                },
            ])
        );
        assert_eq!(
            print(&rule),
            r#"region in ["DE", "FR"] and count(event "purchase" where amount > 50, last 30d) >= 2"#
        );
    }

    #[test]
    fn precedence_and_parentheses() {
        let rule =
            parse("has email or has phone and not (has maid or trait.x exists)").expect("ok");
        let Rule::Any(parts) = &rule else {
            panic!("or is the loosest: {rule:?}")
        };
        assert!(matches!(&parts[1], Rule::All(_)));
        let printed = print(&rule);
        assert_eq!(
            printed,
            "has email or has phone and not (has maid or trait.x exists)"
        );
        assert_eq!(parse(&printed).expect("reparses"), rule);
    }

    #[test]
    fn every_form_round_trips() {
        for text in [
            "true",
            "false",
            r#"trait["first seen"] < time("2026-01-01T00:00:00Z")"#,
            r#"trait.plan in ["pro", 3, true] and trait.ltv >= -1.5"#,
            r#"trait.email starts_with "ann" or trait.name contains "\"q\"""#,
            r#"last(event "login" where "page path" == "/" and ok == true) before 90d"#,
            r#"not in_segment("vip") and last(event "purchase") after 7d"#,
            r#"count(event "view", last 1d) != 0"#,
            r#"not (has email and has phone)"#,
        ] {
            let rule = parse(text).unwrap_or_else(|err| panic!("{text}: {err}"));
            let printed = print(&rule);
            assert_eq!(
                parse(&printed).expect("printed form parses"),
                rule,
                "{text} → {printed}"
            );
        }
    }

    #[test]
    fn errors_point_at_line_and_column() {
        for (text, line, column, needle) in [
            ("region in [\"FR\",\n  \"XX1\"]", 2, 3, "ISO 3166"),
            ("trait.plan ==", 1, 14, "expected a value"),
            (
                "has email and\n\n   or has phone",
                3,
                4,
                "expected a condition",
            ),
            ("count(event \"x\", last 0d) > 1", 1, 23, "1d"),
            ("trait.plan > \"pro\"", 1, 14, "compares numbers"),
            ("trait.plan == \"open", 1, 15, "not closed"),
            ("region in [\"FR\"] region", 1, 18, "expected `and`"),
            ("last(event \"x\") sometime 3d", 1, 17, "before"),
            ("trait.t == time(\"yesterday\")", 1, 17, "RFC 3339"),
            ("#", 1, 1, "unexpected character"),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!((err.line, err.column), (line, column), "{text}: {err}");
            assert!(err.message.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{}has email{}", "not (".repeat(40), ")".repeat(40));
        assert!(parse(&deep).expect_err("too deep").message.contains("nest"));
    }
}
