//! Identifiers and their normalisation. Every other part of the suite sees
//! only normalised values, so the same person always hashes the same way.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use madtech_common::error::FieldError;
use serde::{Deserialize, Serialize};

/// The kinds of identifier a profile can carry: the built-in ones, and the
/// custom kinds the identity rules declare.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentifierKind {
    Email,
    Phone,
    CustomerId,
    /// A mobile advertising id (IDFA / GAID).
    Maid,
    CookieId,
    AnonymousId,
    /// Declared in the identity rules; normalised as the rules say.
    Custom(Arc<str>),
}

impl IdentifierKind {
    pub const BUILT_IN: [IdentifierKind; 6] = [
        IdentifierKind::Email,
        IdentifierKind::Phone,
        IdentifierKind::CustomerId,
        IdentifierKind::Maid,
        IdentifierKind::CookieId,
        IdentifierKind::AnonymousId,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            IdentifierKind::Email => "email",
            IdentifierKind::Phone => "phone",
            IdentifierKind::CustomerId => "customer_id",
            IdentifierKind::Maid => "maid",
            IdentifierKind::CookieId => "cookie_id",
            IdentifierKind::AnonymousId => "anonymous_id",
            IdentifierKind::Custom(name) => name,
        }
    }

    /// The kind named `name`: built-in, or else custom.
    pub fn from_name(name: &str) -> IdentifierKind {
        IdentifierKind::built_in(name).unwrap_or_else(|| IdentifierKind::Custom(name.into()))
    }

    /// The built-in kind named `name`.
    pub fn built_in(name: &str) -> Option<IdentifierKind> {
        IdentifierKind::BUILT_IN
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for IdentifierKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IdentifierKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(IdentifierKind::from_name(&name))
    }
}

/// A normalised identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: IdentifierKind,
    pub value: String,
}

impl Identifier {
    /// `kind:value`: unique, the identity graph's key.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }
}

/// How a custom identifier kind's values are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomNormalisation {
    /// Trimmed, bounded, no control characters; case kept.
    Opaque,
    /// As `opaque`, then lower-cased.
    Lowercase,
}

/// Longest value accepted for free-form ids.
const MAX_ID_LEN: usize = 256;

/// Normalises identifiers with the library that knows each kind's rules.
#[derive(Debug, Clone)]
pub struct Normaliser {
    default_phone_region: phonenumber::country::Id,
    custom: BTreeMap<Arc<str>, CustomNormalisation>,
}

impl Normaliser {
    /// `default_phone_region` is an ISO 3166-1 alpha-2 code used for phone
    /// numbers written without a country code.
    pub fn new(default_phone_region: &str) -> Result<Self, FieldError> {
        let region = default_phone_region.parse().map_err(|_| {
            FieldError::new("default_phone_region", "is not an ISO 3166-1 alpha-2 code")
        })?;
        Ok(Normaliser {
            default_phone_region: region,
            custom: BTreeMap::new(),
        })
    }

    /// Accepts the custom kinds `custom` declares besides the built-in ones.
    pub fn with_custom_kinds(
        mut self,
        custom: impl IntoIterator<Item = (String, CustomNormalisation)>,
    ) -> Self {
        self.custom = custom
            .into_iter()
            .map(|(name, how)| (Arc::from(name), how))
            .collect();
        self
    }

    fn kind(&self, field: &str, kind: &str) -> Result<IdentifierKind, FieldError> {
        if let Some(kind) = IdentifierKind::built_in(kind) {
            return Ok(kind);
        }
        if let Some((name, _)) = self.custom.get_key_value(kind) {
            return Ok(IdentifierKind::Custom(Arc::clone(name)));
        }
        let known: Vec<&str> = IdentifierKind::BUILT_IN
            .iter()
            .map(IdentifierKind::as_str)
            .chain(self.custom.keys().map(|name| &**name))
            .collect();
        Err(FieldError::new(
            format!("{field}.kind"),
            format!(
                "unknown identifier kind {kind:?}; expected one of {}",
                known.join(", ")
            ),
        ))
    }

    /// Normalises `value` as an identifier of `kind`; `field` names the
    /// request field in the error.
    pub fn normalise(
        &self,
        field: &str,
        kind: &str,
        value: &str,
    ) -> Result<Identifier, FieldError> {
        let kind = self.kind(field, kind)?;
        let field = format!("{field}.value");
        let value = value.trim();
        if value.is_empty() {
            return Err(FieldError::required(field));
        }
        let value = match &kind {
            IdentifierKind::Email => normalise_email(&field, value)?,
            IdentifierKind::Phone => self.normalise_phone(&field, value)?,
            IdentifierKind::Maid => normalise_maid(&field, value)?,
            IdentifierKind::CustomerId | IdentifierKind::CookieId | IdentifierKind::AnonymousId => {
                normalise_opaque(&field, value)?
            }
            IdentifierKind::Custom(name) => {
                let value = normalise_opaque(&field, value)?;
                match self.custom.get(name) {
                    Some(CustomNormalisation::Lowercase) => value.to_lowercase(),
                    _ => value,
                }
            }
        };
        Ok(Identifier { kind, value })
    }

    fn normalise_phone(&self, field: &str, value: &str) -> Result<String, FieldError> {
        let number = phonenumber::parse(Some(self.default_phone_region), value)
            .map_err(|err| FieldError::new(field, format!("not a phone number: {err}")))?;
        if !phonenumber::is_valid(&number) {
            return Err(FieldError::new(
                field,
                "not a valid phone number for its region",
            ));
        }
        Ok(number.format().mode(phonenumber::Mode::E164).to_string())
    }
}

fn normalise_email(field: &str, value: &str) -> Result<String, FieldError> {
    let lowered = value.to_lowercase();
    if !email_address::EmailAddress::is_valid(&lowered) {
        return Err(FieldError::new(field, "not a valid email address"));
    }
    Ok(lowered)
}

fn normalise_maid(field: &str, value: &str) -> Result<String, FieldError> {
    let id = uuid::Uuid::parse_str(value)
        .map_err(|_| FieldError::new(field, "a mobile advertising id must be a UUID"))?;
    Ok(id.hyphenated().to_string())
}

fn normalise_opaque(field: &str, value: &str) -> Result<String, FieldError> {
    if value.len() > MAX_ID_LEN {
        return Err(FieldError::new(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(field, "contains control characters"));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normaliser() -> Normaliser {
        Normaliser::new("FR").expect("FR is a region")
    }

    fn ok(kind: &str, value: &str) -> String {
        normaliser()
            .normalise("identifiers[0]", kind, value)
            .expect("normalises")
            .value
    }

    fn err(kind: &str, value: &str) -> FieldError {
        normaliser()
            .normalise("identifiers[0]", kind, value)
            .expect_err("must be rejected")
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            ok("email", "  Alice.Smith@Example.COM \n"),
            "alice.smith@example.com"
        );
    }

    #[test]
    fn invalid_emails_name_the_field() {
        let e = err("email", "not-an-email");
        assert_eq!(e.field, "identifiers[0].value");
        assert!(err("email", "a@").reason.contains("email"));
        assert_eq!(err("email", "   ").reason, "is required");
    }

    #[test]
    fn phones_become_e164_with_the_default_region() {
        assert_eq!(ok("phone", "01 42 68 53 00"), "+33142685300");
        assert_eq!(ok("phone", "+1 (650) 253-0000"), "+16502530000");
        assert_eq!(ok("phone", "+44 20 7031 3000"), "+442070313000");
    }

    #[test]
    fn invalid_phones_are_rejected() {
        assert!(err("phone", "12").reason.contains("phone"));
        assert!(err("phone", "hello").reason.contains("phone"));
    }

    #[test]
    fn maids_are_lower_case_hyphenated_uuids() {
        assert_eq!(
            ok("maid", "6D92078A-8246-4BA4-AE5B-76104861E7DC"),
            "6d92078a-8246-4ba4-ae5b-76104861e7dc"
        );
        assert!(err("maid", "not-a-uuid").reason.contains("UUID"));
    }

    #[test]
    fn unknown_kinds_name_the_kind_field() {
        let e = err("fax", "123");
        assert_eq!(e.field, "identifiers[0].kind");
    }

    #[test]
    fn custom_kinds_are_normalised_as_declared() {
        let normaliser = normaliser().with_custom_kinds([
            ("loyalty_id".to_string(), CustomNormalisation::Lowercase),
            ("crm_key".to_string(), CustomNormalisation::Opaque),
        ]);
        let loyalty = normaliser
            .normalise("identifiers[0]", "loyalty_id", " AB-12 ")
            .expect("declared");
        assert_eq!(loyalty.kind.as_str(), "loyalty_id");
        assert_eq!(loyalty.value, "ab-12");
        assert_eq!(loyalty.key(), "loyalty_id:ab-12");
        let crm = normaliser
            .normalise("identifiers[0]", "crm_key", "AB-12")
            .expect("declared");
        assert_eq!(crm.value, "AB-12");
        let unknown = normaliser
            .normalise("identifiers[0]", "fax", "1")
            .expect_err("undeclared");
        assert!(unknown.reason.contains("loyalty_id"), "{}", unknown.reason);
    }

    #[test]
    fn international_phones_keep_their_country() {
        assert_eq!(ok("phone", "+49 30 901820"), "+4930901820");
        assert_eq!(ok("phone", "0033 1 42 68 53 00"), "+33142685300");
        assert_eq!(ok("phone", "+81 3-3224-9999"), "+81332249999");
    }

    #[test]
    fn padded_mixed_case_emails_normalise_the_same() {
        assert_eq!(
            ok("email", "\tBOB@Example.Org  "),
            ok("email", "bob@example.org")
        );
    }

    #[test]
    fn opaque_ids_are_trimmed_and_bounded() {
        assert_eq!(ok("customer_id", " C-42 "), "C-42");
        assert!(err("cookie_id", &"x".repeat(300)).reason.contains("longer"));
        assert!(err("anonymous_id", "a\u{0}b").reason.contains("control"));
    }
}
