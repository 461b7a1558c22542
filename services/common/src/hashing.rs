//! The forms in which an identifier may cross: how it is normalised beyond
//! what the profiles service already did, then hashed. Which form reaches
//! which destination is policy (`identifiers_policy.csv`, its third
//! column); what each form computes is defined here, against the
//! platforms' published test vectors. The gateway hashes with them; the
//! consent service looks a person up in every form when a data-subject
//! request asks what the adtech zone holds.
//!
//! The profiles service has already normalised every value (emails trimmed
//! and lower-cased, phones in E.164 with `+`, mobile ids as lower-case
//! UUIDs), which is what most platforms match on.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// SHA-256 (hex) of the value as the profiles service normalised it:
    /// Google Customer Match, LinkedIn, files and webhooks.
    Sha256,
    /// UID2's normalisation, then SHA-256: for `gmail.com` addresses the
    /// dots and anything from a `+` are removed from the local part (The
    /// Trade Desk, and anything that matches on UID2).
    Sha256Uid2,
    /// Phones as digits only, country code first, without the `+` (Meta's
    /// format), then SHA-256; other kinds as [`Form::Sha256`].
    Sha256Digits,
}

impl Form {
    pub const ALL: [Form; 3] = [Form::Sha256, Form::Sha256Uid2, Form::Sha256Digits];

    /// The form's name in the identifiers policy.
    pub fn name(self) -> &'static str {
        match self {
            Form::Sha256 => "sha256",
            Form::Sha256Uid2 => "sha256_uid2",
            Form::Sha256Digits => "sha256_digits",
        }
    }

    pub fn parse(name: &str) -> Option<Form> {
        Form::ALL.into_iter().find(|form| form.name() == name)
    }

    /// The lower-case hex SHA-256 of `value` (of identifier `kind`) in
    /// this form.
    pub fn hash(self, kind: &str, value: &str) -> String {
        let mut hex = String::new();
        self.hash_into(kind, value, &mut hex);
        hex
    }

    /// [`Form::hash`] written over `hex`, reusing its allocation.
    pub fn hash_into(self, kind: &str, value: &str, hex: &mut String) {
        let digest = match (self, kind) {
            (Form::Sha256Uid2, "email") => Sha256::digest(uid2_email(value).as_bytes()),
            (Form::Sha256Digits, "phone") => {
                Sha256::digest(value.trim().trim_start_matches('+').as_bytes())
            }
            _ => Sha256::digest(value.as_bytes()),
        };
        write_hex(&digest.into(), hex);
    }
}

pub fn sha256_hex(value: &str) -> String {
    let mut hex = String::new();
    write_hex(&Sha256::digest(value.as_bytes()).into(), &mut hex);
    hex
}

/// Writes the lower-case hex of a SHA-256 digest over `hex`. `hex::encode`
/// collects its string a char at a time, which showed as ~5% of the
/// gateway's work in a crossing's profile (a member's identifiers and
/// pseudonym are each one digest); a crossing reuses one string per field.
pub fn write_hex(digest: &[u8; 32], hex: &mut String) {
    let mut digits = [0; 64];
    hex::encode_to_slice(digest, &mut digits).expect("64 digits for 32 bytes");
    hex.clear();
    hex.push_str(std::str::from_utf8(&digits).expect("hex digits are ASCII"));
}

/// UID2 email normalisation (UID2 documentation, "Normalization and
/// Encoding"): trimmed, lower-cased, and for `gmail.com` only, the local
/// part without `.` and without a `+` and what follows it.
fn uid2_email(email: &str) -> String {
    let email = email.trim().to_lowercase();
    match email.rsplit_once('@') {
        Some((local, "gmail.com")) => {
            let local = local.split('+').next().unwrap_or_default().replace('.', "");
            format!("{local}@gmail.com")
        }
        _ => email,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Published vectors, as collected in shared/testdata/signals.json
    // (`hashing`), each with its source.

    #[test]
    fn uid2_vectors() {
        // IABTechLab/uid2docs, gs-normalization-encoding.md.
        for (input, hex) in [
            (
                "user@example.com",
                "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514",
            ),
            (
                "MyEmail@example.com",
                "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5",
            ),
            (
                "Jane.Saoirse@gmail.com",
                "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
            ),
        ] {
            assert_eq!(Form::Sha256Uid2.hash("email", input), hex, "{input}");
        }
        assert_eq!(
            Form::Sha256Uid2.hash("phone", "+12345678901"),
            "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee"
        );
        assert_eq!(
            uid2_email("jane.saoirse+ads@gmail.com"),
            "janesaoirse@gmail.com"
        );
        assert_eq!(
            uid2_email("jane.saoirse+ads@example.com"),
            "jane.saoirse+ads@example.com",
            "only gmail.com addresses lose dots and tags"
        );
    }

    #[test]
    fn google_and_meta_vectors() {
        // googleads/google-ads-python add_customer_match_user_list.py input,
        // as the profiles service normalises it.
        assert_eq!(
            Form::Sha256.hash("email", "dana@example.com"),
            "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"
        );
        // Meta's Custom Audience users reference example.
        assert_eq!(
            Form::Sha256Digits.hash("email", "test1@example.com"),
            "9b431636bd164765d63c573c346708846af4f68fe3701a77a3bdd7e7e5166254"
        );
    }

    #[test]
    fn meta_phones_are_digits_without_the_plus() {
        assert_eq!(
            Form::Sha256Digits.hash("phone", "+12345678901"),
            sha256_hex("12345678901")
        );
        assert_ne!(
            Form::Sha256Digits.hash("phone", "+12345678901"),
            Form::Sha256.hash("phone", "+12345678901")
        );
    }

    #[test]
    fn forms_round_trip_their_names() {
        for form in Form::ALL {
            assert_eq!(Form::parse(form.name()), Some(form));
        }
        assert_eq!(Form::parse("raw"), None);
    }
}
