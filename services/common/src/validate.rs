//! Shape checks shared by every service's request validation. Each returns a
//! [`FieldError`] naming the field, never panics.

use crate::error::FieldError;

/// Requires a non-empty string field; returns it trimmed.
pub fn require<'a>(field: &str, value: &'a str) -> Result<&'a str, FieldError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(FieldError::required(field));
    }
    Ok(trimmed)
}

/// A required free-text field (a name, an id): trimmed, 1 to `max_len`
/// bytes, no control characters (which some databases refuse).
pub fn text<'a>(field: &str, value: &'a str, max_len: usize) -> Result<&'a str, FieldError> {
    let value = require(field, value)?;
    bounded(field, value, max_len)
}

/// Checks every item of a repeated field with `check`, which is given the
/// item's own field name (`field[i]`), so an error names the item at fault.
pub fn each<T, U>(
    field: &str,
    values: &[T],
    mut check: impl FnMut(&str, &T) -> Result<U, FieldError>,
) -> Result<Vec<U>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| check(&format!("{field}[{i}]"), value))
        .collect()
}

/// An optional free-text field: like [`text`], but empty is fine.
pub fn optional_text<'a>(
    field: &str,
    value: &'a str,
    max_len: usize,
) -> Result<&'a str, FieldError> {
    bounded(field, value.trim(), max_len)
}

fn bounded<'a>(field: &str, value: &'a str, max_len: usize) -> Result<&'a str, FieldError> {
    if value.len() > max_len {
        return Err(FieldError::new(field, format!("at most {max_len} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value)
}

/// Checks the shape of an ISO 3166-1 alpha-2 (`FR`) or ISO 3166-2 (`US-CA`)
/// code and upper-cases it; the empty string means unknown.
pub fn region(field: &str, value: &str) -> Result<String, FieldError> {
    let region = value.trim().to_ascii_uppercase();
    if region.is_empty() {
        return Ok(region);
    }
    let (country, subdivision) = match region.split_once('-') {
        Some((country, subdivision)) => (country, Some(subdivision)),
        None => (region.as_str(), None),
    };
    let country_ok = country.len() == 2 && country.chars().all(|c| c.is_ascii_uppercase());
    let subdivision_ok = subdivision
        .is_none_or(|s| (1..=3).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric()));
    if !country_ok || !subdivision_ok {
        return Err(FieldError::new(
            field,
            "must be an ISO 3166-1 alpha-2 code such as FR or an ISO 3166-2 code such as US-CA",
        ));
    }
    Ok(region)
}

/// A purpose or other policy name: lower-case snake case, 1 to 64 bytes,
/// starting with a letter.
pub fn policy_name(field: &str, value: &str) -> Result<String, FieldError> {
    let valid = (1..=64).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(FieldError::new(
            field,
            "must be 1 to 64 characters of a-z, 0-9 and _, starting with a letter",
        ));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_iso_3166_shaped() {
        assert_eq!(region("region", "fr").expect("ok"), "FR");
        assert_eq!(region("region", " us-ca ").expect("ok"), "US-CA");
        assert_eq!(region("region", "").expect("ok"), "");
        for bad in ["France", "US-", "U1", "US-CALI", "-CA"] {
            assert_eq!(region("region", bad).expect_err(bad).field, "region");
        }
    }

    #[test]
    fn required_fields_are_trimmed() {
        assert_eq!(require("x", " a ").expect("ok"), "a");
        assert_eq!(require("x", "  ").expect_err("blank").reason, "is required");
    }

    #[test]
    fn free_text_is_bounded_and_printable() {
        assert_eq!(
            text("name", " Spring sale ", 20).expect("ok"),
            "Spring sale"
        );
        assert_eq!(
            text("name", &"x".repeat(21), 20).expect_err("long").field,
            "name"
        );
        assert!(text("name", "a\u{0}b", 20).is_err());
        assert!(text("name", " ", 20).is_err());
        assert_eq!(optional_text("v", " ", 20).expect("empty is fine"), "");
    }

    #[test]
    fn policy_names_are_snake_case() {
        assert!(policy_name("p", "ad_targeting").is_ok());
        for bad in ["", "Ad", "1st", "ad-targeting", &"a".repeat(65)] {
            assert!(policy_name("p", bad).is_err(), "{bad}");
        }
    }
}
