//! The GPP header section.
//!
//! Source: IAB Tech Lab GPP, "Consent String Specification", section
//! "Header": Type Int(6) = 3, Version Int(6) = 1, SectionIds Range
//! (Fibonacci). The range is NumberOfRanges Int(12), then per entry
//! IsRange Bool and one Fibonacci integer (a single id) or two (start and
//! end). Each Fibonacci integer is the difference from the id before it
//! (the previous entry's last id, or a range's start), which makes the ids
//! strictly increasing and keeps the header short.

use crate::DecodeError;
use crate::bits::BitReader;

use super::sections::MAX_KNOWN_SECTION_ID;

const HEADER_TYPE: u64 = 3;
const HEADER_VERSION: u64 = 1;

/// Reads the header and returns its section ids in order.
///
/// Ids beyond the section registry are rejected here, before a range is
/// expanded, so a hostile range cannot make the decoder allocate billions of
/// ids.
pub(crate) fn decode_header(text: &str, offset: usize) -> Result<Vec<u16>, DecodeError> {
    if text.is_empty() {
        return Err(DecodeError::Empty { what: "GPP header" });
    }
    let mut r = BitReader::from_base64url(text, offset)?;
    let header_type = r.read_u64(6, "Type")?;
    if header_type != HEADER_TYPE {
        return Err(DecodeError::NotGppHeader { found: header_type });
    }
    let version = r.read_u64(6, "Version")?;
    if version != HEADER_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            signal: "GPP",
            found: version,
            expected: HEADER_VERSION,
        });
    }

    let entries = r.read_u16(12, "NumberOfRanges")?;
    let mut ids = Vec::new();
    let mut last = 0u64;
    for _ in 0..entries {
        let is_range = r.read_bool("IsRange")?;
        let start = next_id(&mut r, last, "StartOrOnlySectionId")?;
        let end = if is_range {
            next_id(&mut r, start, "EndSectionId")?
        } else {
            start
        };
        ids.extend((start..=end).filter_map(|id| u16::try_from(id).ok()));
        last = end;
    }
    Ok(ids)
}

fn next_id(r: &mut BitReader, previous: u64, field: &'static str) -> Result<u64, DecodeError> {
    let id = previous
        .checked_add(r.read_fibonacci(field)?)
        .ok_or(DecodeError::FibonacciOverflow { field })?;
    if id > u64::from(MAX_KNOWN_SECTION_ID) {
        return Err(DecodeError::UnknownSection { id });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_spec_examples_with_either_padding() {
        assert_eq!(decode_header("DBABM", 0), Ok(vec![2]));
        assert_eq!(decode_header("DBABMA", 0), Ok(vec![2]));
        assert_eq!(decode_header("DBACNY", 0), Ok(vec![2, 6]));
        assert_eq!(decode_header("DBABTA", 0), Ok(vec![6]));
    }

    #[test]
    fn rejects_wrong_type_and_version() {
        // "CB…" has type 2: a TC string, not a GPP header.
        assert_eq!(
            decode_header("CBABM", 0),
            Err(DecodeError::NotGppHeader { found: 2 })
        );
        assert!(matches!(
            decode_header("DCABM", 0),
            Err(DecodeError::UnsupportedVersion { found: 2, .. })
        ));
    }
}
