//! The IAB US Privacy string (CCPA), version 1: four characters, e.g. `1YNN`.
//!
//! Source: IAB Tech Lab, "US Privacy String" (USPrivacy/CCPA/US Privacy
//! String.md). The spec writes the flags in upper case; lower case `y`/`n`
//! are accepted too, because CMPs in the wild emit them and the meaning is
//! unambiguous. Surrounding whitespace is not trimmed.

use serde::{Serialize, Serializer};

use crate::DecodeError;

/// One of the three US Privacy flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UspFlag {
    /// `Y`
    Yes,
    /// `N`
    No,
    /// `-`: the field does not apply (e.g. CCPA does not apply).
    NotApplicable,
}

impl UspFlag {
    fn parse(character: char) -> Option<Self> {
        match character {
            'Y' | 'y' => Some(Self::Yes),
            'N' | 'n' => Some(Self::No),
            '-' => Some(Self::NotApplicable),
            _ => None,
        }
    }

    /// The flag as the spec writes it: `"Y"`, `"N"` or `"-"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Yes => "Y",
            Self::No => "N",
            Self::NotApplicable => "-",
        }
    }
}

impl Serialize for UspFlag {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A decoded US Privacy string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct UsPrivacy {
    /// Always 1.
    pub version: u8,
    /// Explicit notice / opportunity to opt out was given.
    pub notice: UspFlag,
    /// The user opted out of the sale of personal information.
    pub opt_out_sale: UspFlag,
    /// The publisher is a signatory to the IAB Limited Service Provider
    /// Agreement and the transaction is covered by it.
    pub lspa_covered: UspFlag,
}

impl UsPrivacy {
    /// True when the user opted out of sale (`opt_out_sale` is `Y`).
    pub fn opted_out_of_sale(&self) -> bool {
        self.opt_out_sale == UspFlag::Yes
    }
}

/// Decodes a US Privacy string such as `1YNN` or `1---`.
pub fn decode_usp(input: &str) -> Result<UsPrivacy, DecodeError> {
    decode_usp_at(input, 0)
}

/// Decodes `input` found at byte `offset` of a larger string (a GPP section).
pub(crate) fn decode_usp_at(input: &str, offset: usize) -> Result<UsPrivacy, DecodeError> {
    if input.is_empty() {
        return Err(DecodeError::Empty {
            what: "US Privacy string",
        });
    }
    let characters: Vec<(usize, char)> = input.char_indices().collect();
    let [(_, version), notice, opt_out_sale, lspa_covered] = characters[..] else {
        return Err(DecodeError::InvalidUspLength {
            length: characters.len(),
        });
    };
    let version = match version.to_digit(10) {
        Some(1) => 1,
        Some(other) => {
            return Err(DecodeError::UnsupportedVersion {
                signal: "US Privacy",
                found: u64::from(other),
                expected: 1,
            });
        }
        None => {
            return Err(DecodeError::InvalidUspCharacter {
                position: offset,
                character: version,
            });
        }
    };
    let flag = |(position, character): (usize, char)| {
        UspFlag::parse(character).ok_or(DecodeError::InvalidUspCharacter {
            position: offset.saturating_add(position),
            character,
        })
    };
    Ok(UsPrivacy {
        version,
        notice: flag(notice)?,
        opt_out_sale: flag(opt_out_sale)?,
        lspa_covered: flag(lspa_covered)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_spec_examples() {
        let usp = decode_usp("1YNN").expect("valid");
        assert_eq!(usp.notice, UspFlag::Yes);
        assert_eq!(usp.opt_out_sale, UspFlag::No);
        assert_eq!(usp.lspa_covered, UspFlag::No);
        assert!(decode_usp("1NYN").expect("valid").opted_out_of_sale());
        assert_eq!(
            decode_usp("1---").expect("valid").notice,
            UspFlag::NotApplicable
        );
    }

    #[test]
    fn accepts_lower_case_flags() {
        assert_eq!(decode_usp("1yny"), decode_usp("1YNY"));
    }

    #[test]
    fn rejects_other_versions_lengths_and_characters() {
        assert!(matches!(
            decode_usp("2YNN"),
            Err(DecodeError::UnsupportedVersion { found: 2, .. })
        ));
        assert!(matches!(
            decode_usp("1YN"),
            Err(DecodeError::InvalidUspLength { length: 3 })
        ));
        assert!(matches!(
            decode_usp("1YNNN"),
            Err(DecodeError::InvalidUspLength { length: 5 })
        ));
        assert_eq!(
            decode_usp("1YXN"),
            Err(DecodeError::InvalidUspCharacter {
                position: 2,
                character: 'X'
            })
        );
        assert!(matches!(
            decode_usp("YYNN"),
            Err(DecodeError::InvalidUspCharacter { position: 0, .. })
        ));
        assert!(matches!(decode_usp(""), Err(DecodeError::Empty { .. })));
    }
}
