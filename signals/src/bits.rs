//! Base64url text to bits, and a reader over those bits.
//!
//! TC strings and GPP sections are bit strings written most significant bit
//! first and then cut into 6-bit base64url characters. Encoders disagree on
//! padding: the TCF pads to whole bytes, the GPP spec's examples pad only to
//! the next character (header `DBABM`), iabgpp-java to a whole byte and then
//! a character (`DBABMA`). The reader therefore keeps the 6-bit values as they
//! come instead of going through a byte-oriented base64 decoder (which would
//! reject a 5-character string) and leaves trailing bits unread.

use crate::DecodeError;

/// Bits decoded from base64url text, read front to back.
#[derive(Debug, Clone)]
pub(crate) struct BitReader {
    sextets: Vec<u8>,
    position: usize,
}

/// The 6-bit value of a base64url character.
fn sextet(character: char) -> Option<u8> {
    let value = match character {
        'A'..='Z' => u32::from(character) - u32::from('A'),
        'a'..='z' => u32::from(character) - u32::from('a') + 26,
        '0'..='9' => u32::from(character) - u32::from('0') + 52,
        '-' => 62,
        '_' => 63,
        _ => return None,
    };
    u8::try_from(value).ok()
}

impl BitReader {
    /// Decodes `text`; `offset` is where `text` starts in the caller's input,
    /// so that a bad character is reported at its position there.
    ///
    /// Up to two trailing `=` are accepted: some encoders emit standard
    /// base64 padding although the specs omit it.
    pub(crate) fn from_base64url(text: &str, offset: usize) -> Result<Self, DecodeError> {
        let body = text
            .strip_suffix("==")
            .or_else(|| text.strip_suffix('='))
            .unwrap_or(text);
        let sextets = body
            .char_indices()
            .map(|(index, character)| {
                sextet(character).ok_or(DecodeError::InvalidCharacter {
                    position: offset.saturating_add(index),
                    character,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            sextets,
            position: 0,
        })
    }

    /// Bits not yet read, padding included.
    pub(crate) fn remaining(&self) -> usize {
        self.sextets
            .len()
            .saturating_mul(6)
            .saturating_sub(self.position)
    }

    fn ensure(&self, needed: usize, field: &'static str) -> Result<(), DecodeError> {
        let available = self.remaining();
        if needed > available {
            return Err(DecodeError::Truncated {
                field,
                needed,
                available,
            });
        }
        Ok(())
    }

    fn next_bit(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let sextet = self
            .sextets
            .get(self.position / 6)
            .ok_or(DecodeError::Truncated {
                field,
                needed: 1,
                available: 0,
            })?;
        let bit = (sextet >> (5 - self.position % 6)) & 1 == 1;
        self.position = self.position.saturating_add(1);
        Ok(bit)
    }

    /// Reads an unsigned integer of `bits` bits (at most 64).
    pub(crate) fn read_u64(
        &mut self,
        bits: usize,
        field: &'static str,
    ) -> Result<u64, DecodeError> {
        debug_assert!(bits <= 64, "{field}: {bits} bits do not fit in a u64");
        self.ensure(bits, field)?;
        let mut value = 0u64;
        for _ in 0..bits {
            value = (value << 1) | u64::from(self.next_bit(field)?);
        }
        Ok(value)
    }

    /// Reads an integer of at most 8 bits.
    pub(crate) fn read_u8(&mut self, bits: usize, field: &'static str) -> Result<u8, DecodeError> {
        debug_assert!(bits <= 8);
        let value = self.read_u64(bits.min(8), field)?;
        Ok(u8::try_from(value).unwrap_or(u8::MAX))
    }

    /// Reads an integer of at most 16 bits.
    pub(crate) fn read_u16(
        &mut self,
        bits: usize,
        field: &'static str,
    ) -> Result<u16, DecodeError> {
        debug_assert!(bits <= 16);
        let value = self.read_u64(bits.min(16), field)?;
        Ok(u16::try_from(value).unwrap_or(u16::MAX))
    }

    pub(crate) fn read_bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        self.ensure(1, field)?;
        self.next_bit(field)
    }

    /// Reads `bits` flags and returns the 1-based positions of those set,
    /// the encoding of purpose, feature and vendor bitfields.
    pub(crate) fn read_flags(
        &mut self,
        bits: u16,
        field: &'static str,
    ) -> Result<Vec<u16>, DecodeError> {
        self.ensure(usize::from(bits), field)?;
        let mut set = Vec::new();
        for id in 1..=bits {
            if self.next_bit(field)? {
                set.push(id);
            }
        }
        Ok(set)
    }

    /// Reads a Fibonacci-coded integer (Zeckendorf representation, least
    /// significant term first, closed by two consecutive 1 bits), as used by
    /// the GPP header's section id ranges.
    pub(crate) fn read_fibonacci(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let overflow = DecodeError::FibonacciOverflow { field };
        // Terms of the sequence 1, 2, 3, 5, 8, …; `None` once past u64.
        let mut term = Some(1u64);
        let mut next = Some(2u64);
        let mut value = 0u64;
        let mut previous = false;
        loop {
            let bit = self.read_bool(field)?;
            if bit && previous {
                return Ok(value);
            }
            if bit {
                let weight = term.ok_or(overflow.clone())?;
                value = value.checked_add(weight).ok_or(overflow.clone())?;
            }
            previous = bit;
            let after = term.zip(next).and_then(|(a, b)| a.checked_add(b));
            term = next;
            next = after;
        }
    }
}

/// Splits `text` at `separator`, pairing each part with its byte offset in
/// the caller's input.
pub(crate) fn split_with_offsets(
    text: &str,
    separator: char,
    offset: usize,
) -> impl Iterator<Item = (&str, usize)> {
    let mut next_offset = offset;
    text.split(separator).map(move |part| {
        let part_offset = next_offset;
        next_offset = next_offset
            .saturating_add(part.len())
            .saturating_add(separator.len_utf8());
        (part, part_offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(text: &str) -> BitReader {
        BitReader::from_base64url(text, 0).expect("valid base64url")
    }

    #[test]
    fn reads_across_character_boundaries() {
        // "DB" = 000011 000001
        let mut bits = reader("DB");
        assert_eq!(bits.read_u64(4, "a").ok(), Some(0));
        assert_eq!(bits.read_u64(4, "b").ok(), Some(0b1100));
        assert_eq!(bits.read_u64(4, "c").ok(), Some(1));
        assert_eq!(bits.remaining(), 0);
    }

    #[test]
    fn reports_truncation_with_field_name() {
        let mut bits = reader("A");
        assert_eq!(
            bits.read_u64(7, "Created"),
            Err(DecodeError::Truncated {
                field: "Created",
                needed: 7,
                available: 6
            })
        );
    }

    #[test]
    fn rejects_characters_outside_base64url_with_position() {
        assert_eq!(
            BitReader::from_base64url("AB+C", 10).err(),
            Some(DecodeError::InvalidCharacter {
                position: 12,
                character: '+'
            })
        );
        assert!(BitReader::from_base64url("AB=C", 0).is_err());
        assert!(BitReader::from_base64url("ABC=", 0).is_ok());
        assert!(BitReader::from_base64url("AB==", 0).is_ok());
        assert!(BitReader::from_base64url("A===", 0).is_err());
    }

    #[test]
    fn decodes_fibonacci_integers() {
        let mut one = reader("w"); // 110000
        assert_eq!(one.read_fibonacci("f").ok(), Some(1));
        let mut two = reader("Y"); // 011000
        assert_eq!(two.read_fibonacci("f").ok(), Some(2));
        let mut four = reader("s"); // 101100
        assert_eq!(four.read_fibonacci("f").ok(), Some(4));
        let mut eight = reader("Dg"); // 000011 100000
        assert_eq!(eight.read_fibonacci("f").ok(), Some(8));
    }

    #[test]
    fn fibonacci_without_terminator_is_truncated() {
        let mut bits = reader("AAAA");
        assert!(matches!(
            bits.read_fibonacci("f"),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn fibonacci_past_u64_overflows() {
        // 100 alternating 1-0 bits never terminate early but sum past u64.
        let text = "q".repeat(20); // 101010 …
        let mut bits = reader(&(text + "w"));
        assert_eq!(
            bits.read_fibonacci("f"),
            Err(DecodeError::FibonacciOverflow { field: "f" })
        );
    }

    #[test]
    fn offsets_follow_the_parts() {
        let parts: Vec<_> = split_with_offsets("ab.c..def", '.', 10).collect();
        assert_eq!(parts, vec![("ab", 10), ("c", 13), ("", 15), ("def", 16)]);
    }
}
