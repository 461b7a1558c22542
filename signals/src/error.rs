//! The one error type of the crate.
//!
//! Every variant names what was being read, so a caller can log a rejected
//! signal with a reason a person can act on. Positions are byte offsets into
//! the string handed to the public decoder, also for errors found inside a GPP
//! section or a TC string segment.

use thiserror::Error;

/// Why a consent signal could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input, or a part of it that must carry data, is empty.
    #[error("empty {what}")]
    Empty { what: &'static str },

    /// A character outside the base64url alphabet (`A-Z a-z 0-9 - _`, plus
    /// trailing `=` padding).
    #[error("invalid character {character:?} at byte {position}: not base64url")]
    InvalidCharacter { position: usize, character: char },

    /// The bits ran out in the middle of a field.
    #[error("truncated: {field} needs {needed} bits but only {available} remain")]
    Truncated {
        field: &'static str,
        needed: usize,
        available: usize,
    },

    /// A vendor bitfield is shorter than its MaxVendorId says.
    #[error(
        "{field}: bitfield needs MaxVendorId = {max_vendor_id} bits but only {available} remain"
    )]
    BitfieldTooShort {
        field: &'static str,
        max_vendor_id: u16,
        available: usize,
    },

    /// A vendor range whose end lies before its start.
    #[error("{field}: range {start}-{end} ends before it starts")]
    InvalidRange {
        field: &'static str,
        start: u16,
        end: u16,
    },

    /// A vendor id of 0, or above the section's MaxVendorId.
    #[error("{field}: vendor id {id} is outside 1..={max_vendor_id}")]
    VendorIdOutOfRange {
        field: &'static str,
        id: u16,
        max_vendor_id: u16,
    },

    /// A two-letter code (language, country) holds a value that is no letter.
    #[error("{field}: {value} does not encode a letter A-Z")]
    InvalidLetter { field: &'static str, value: u8 },

    /// A Fibonacci-coded integer too long to fit in 64 bits.
    #[error("{field}: Fibonacci-coded integer does not fit in 64 bits")]
    FibonacciOverflow { field: &'static str },

    /// A timestamp chrono cannot represent.
    #[error("{field}: timestamp out of range")]
    InvalidTimestamp { field: &'static str },

    /// The version field holds a version this crate does not decode.
    #[error("unsupported {signal} version {found} (expected {expected})")]
    UnsupportedVersion {
        signal: &'static str,
        found: u64,
        expected: u64,
    },

    /// A TC string segment of a type the TCF does not define, or a segment
    /// type that appears twice.
    #[error("TC string segment type {segment_type}: {reason}")]
    InvalidSegment {
        segment_type: u8,
        reason: &'static str,
    },

    /// The GPP header's type field is not 3 ("header").
    #[error("not a GPP string: header type is {found}, expected 3")]
    NotGppHeader { found: u64 },

    /// A section id the GPP section registry does not know.
    #[error("unknown GPP section id {id}")]
    UnknownSection { id: u64 },

    /// The header lists a different number of sections than follow it.
    #[error("GPP header lists {declared} sections but {found} follow it")]
    SectionCountMismatch { declared: usize, found: usize },

    /// A GPP section failed to decode; `source` says why.
    #[error("GPP section {id} ({name}): {source}")]
    InSection {
        id: u16,
        name: &'static str,
        source: Box<DecodeError>,
    },

    /// A US Privacy string that is not exactly four characters.
    #[error("US Privacy string must be 4 characters, got {length}")]
    InvalidUspLength { length: usize },

    /// A US Privacy flag that is not `Y`, `N` or `-`.
    #[error("invalid US Privacy character {character:?} at byte {position}")]
    InvalidUspCharacter { position: usize, character: char },
}

impl DecodeError {
    /// The innermost error, looking through [`DecodeError::InSection`].
    pub fn root_cause(&self) -> &DecodeError {
        match self {
            DecodeError::InSection { source, .. } => source.root_cause(),
            other => other,
        }
    }
}
