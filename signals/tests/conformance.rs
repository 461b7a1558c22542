//! The published test vectors (tests/vectors/signals.json): every entry must
//! decode to the expected fields, or fail when `expect` is `"error"`.

use chrono::{DateTime, Utc};
use madtech_signals::{SignalKind, decode};
use serde_json::Value;

const VECTORS: &str = include_str!("vectors/signals.json");

/// The original the copy was taken from, beside the workspace.
const SHARED_VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/testdata/signals.json"
);

struct Vector {
    name: String,
    kind: SignalKind,
    input: String,
    expect: Value,
}

fn vectors() -> Vec<Vector> {
    let document: Value = serde_json::from_str(VECTORS).expect("signals.json is JSON");
    let signals = document["signals"]
        .as_object()
        .expect("signals.json has a `signals` object");
    assert!(!signals.is_empty(), "no vectors");
    signals
        .iter()
        .map(|(name, vector)| Vector {
            name: name.clone(),
            kind: vector["kind"]
                .as_str()
                .expect("kind is a string")
                .parse()
                .expect("kind is known"),
            input: vector["input"]
                .as_str()
                .expect("input is a string")
                .to_owned(),
            expect: vector["expect"].clone(),
        })
        .collect()
}

fn instant(value: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value.as_str()?)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Differences between `expected` and `actual`, looking only at the members
/// `expected` has. Timestamps compare as instants, numbers as numbers.
fn differences(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            for (key, expected) in expected {
                let path = format!("{path}.{key}");
                match actual.get(key) {
                    Some(actual) => differences(&path, expected, actual, out),
                    None => out.push(format!("{path}: missing, expected {expected}")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (index, (expected, actual)) in e.iter().zip(a).enumerate() {
                differences(&format!("{path}[{index}]"), expected, actual, out);
            }
        }
        (Value::Number(e), Value::Number(a)) if e.as_f64() == a.as_f64() => {}
        (Value::String(_), Value::String(_)) if expected == actual => {}
        (Value::String(_), Value::String(_))
            if instant(expected).is_some() && instant(expected) == instant(actual) => {}
        _ if expected == actual => {}
        _ => out.push(format!("{path}: expected {expected}, got {actual}")),
    }
}

#[test]
fn every_vector_decodes_as_published() {
    let vectors = vectors();
    let mut failures = Vec::new();
    for vector in &vectors {
        let decoded = decode(&vector.input, Some(vector.kind));
        let expects_error = vector.expect == Value::String("error".into());
        match (decoded, expects_error) {
            (Err(_), true) => {}
            (Ok(signal), true) => failures.push(format!(
                "{} ({:?}): expected an error, decoded {}",
                vector.name,
                vector.input,
                serde_json::to_string(&signal).unwrap_or_default()
            )),
            (Err(error), false) => failures.push(format!(
                "{} ({:?}): expected to decode, failed: {error}",
                vector.name, vector.input
            )),
            (Ok(signal), false) => {
                let actual = serde_json::to_value(&signal).expect("signal serializes");
                let mut diffs = Vec::new();
                differences("", &vector.expect, &actual, &mut diffs);
                if !diffs.is_empty() {
                    failures.push(format!(
                        "{} ({:?}):\n  {}",
                        vector.name,
                        vector.input,
                        diffs.join("\n  ")
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors failed:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
}

#[test]
fn kind_detection_agrees_with_every_decodable_vector() {
    for vector in vectors() {
        if vector.expect.is_object() {
            let detected = decode(&vector.input, None)
                .unwrap_or_else(|error| panic!("{}: {error}", vector.name));
            assert_eq!(detected.kind(), vector.kind, "{}", vector.name);
        }
    }
}

#[test]
fn the_copy_matches_the_shared_original_when_present() {
    let Ok(original) = std::fs::read_to_string(SHARED_VECTORS) else {
        eprintln!("{SHARED_VECTORS} not present; checking the copy only");
        return;
    };
    let original: Value = serde_json::from_str(&original).expect("shared vectors are JSON");
    let copy: Value = serde_json::from_str(VECTORS).expect("copied vectors are JSON");
    assert_eq!(
        original["signals"], copy["signals"],
        "tests/vectors/signals.json is out of date: copy shared/testdata/signals.json again"
    );
}

/// The comparison itself must be able to fail.
#[test]
fn differences_are_found() {
    let expected = serde_json::json!({"a": [1, 2], "t": "2020-03-09T15:53:02.4Z", "s": "x"});
    let same =
        serde_json::json!({"a": [1, 2], "t": "2020-03-09T15:53:02.400000Z", "s": "x", "extra": 1});
    let other = serde_json::json!({"a": [1], "t": "2020-03-09T15:53:02Z"});
    let mut out = Vec::new();
    differences("", &expected, &same, &mut out);
    assert!(out.is_empty(), "{out:?}");
    differences("", &expected, &other, &mut out);
    assert_eq!(out.len(), 3, "{out:?}");
}
