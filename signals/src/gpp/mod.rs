//! IAB Global Privacy Platform (GPP) strings.
//!
//! Source: IAB Tech Lab GPP, "Consent String Specification". A GPP string is
//! a header, then one `~`-separated section per id the header lists, in the
//! header's order: `DBACNY~<TC string>~1YNN`.

mod header;
mod sections;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

pub use sections::{KnownChildConsents, UsSection};

use crate::DecodeError;
use crate::bits::split_with_offsets;
use crate::tcf::{TcString, decode_tcf_at};
use crate::usp::{UsPrivacy, decode_usp_at};
use sections::{SectionDecoder, SectionInfo};

/// A decoded GPP string.
///
/// Serializes as an object with `section_ids` and one member per decoded
/// section, named by the section's API prefix (`tcfeuv2`, `uspv1`, `usnat`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GppString {
    /// Section ids from the header, ascending.
    pub section_ids: Vec<u16>,
    /// The sections, in the order of `section_ids`; empty for a header-only
    /// string.
    pub sections: Vec<GppSection>,
}

/// One section of a GPP string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum GppSection {
    /// Section 2, the EU TCF v2 TC string (boxed: it is several times the
    /// size of the other variants).
    TcfEuV2(Box<TcString>),
    /// Section 6, the US Privacy string.
    UspV1(UsPrivacy),
    /// Sections 7–23, US national and state.
    Us(UsSection),
    /// A registered section this crate does not decode.
    Undecoded(UndecodedSection),
}

/// A section kept as its raw text (serialized as `{"raw": "…"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UndecodedSection {
    #[serde(skip)]
    pub id: u16,
    #[serde(skip)]
    pub name: &'static str,
    pub raw: String,
}

impl GppSection {
    pub fn id(&self) -> u16 {
        match self {
            Self::TcfEuV2(_) => 2,
            Self::UspV1(_) => 6,
            Self::Us(section) => section.id,
            Self::Undecoded(section) => section.id,
        }
    }

    /// The section's API prefix (`tcfeuv2`, `uspv1`, `usnat`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Self::TcfEuV2(_) => "tcfeuv2",
            Self::UspV1(_) => "uspv1",
            Self::Us(section) => section.name,
            Self::Undecoded(section) => section.name,
        }
    }
}

impl GppString {
    /// The section with this API prefix, if present.
    pub fn section(&self, name: &str) -> Option<&GppSection> {
        self.sections.iter().find(|section| section.name() == name)
    }

    pub fn tcf(&self) -> Option<&TcString> {
        self.sections.iter().find_map(|section| match section {
            GppSection::TcfEuV2(tc) => Some(tc.as_ref()),
            _ => None,
        })
    }

    pub fn us_privacy(&self) -> Option<&UsPrivacy> {
        self.sections.iter().find_map(|section| match section {
            GppSection::UspV1(usp) => Some(usp),
            _ => None,
        })
    }

    /// The US national and state sections present.
    pub fn us_sections(&self) -> impl Iterator<Item = &UsSection> {
        self.sections.iter().filter_map(|section| match section {
            GppSection::Us(us) => Some(us),
            _ => None,
        })
    }
}

impl Serialize for GppString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.sections.len() + 1))?;
        map.serialize_entry("section_ids", &self.section_ids)?;
        for section in &self.sections {
            map.serialize_entry(section.name(), section)?;
        }
        map.end()
    }
}

/// Decodes a GPP string.
///
/// A header with no sections after it (the spec's first example, `DBABM`)
/// decodes to its section ids and no sections. Once sections follow, there
/// must be exactly one per listed id.
pub fn decode_gpp(input: &str) -> Result<GppString, DecodeError> {
    if input.is_empty() {
        return Err(DecodeError::Empty { what: "GPP string" });
    }
    let mut parts = split_with_offsets(input, '~', 0);
    let (header, _) = parts.next().unwrap_or((input, 0));
    let section_ids = header::decode_header(header, 0)?;
    let parts: Vec<(&str, usize)> = parts.collect();
    if !parts.is_empty() && parts.len() != section_ids.len() {
        return Err(DecodeError::SectionCountMismatch {
            declared: section_ids.len(),
            found: parts.len(),
        });
    }
    let sections = section_ids
        .iter()
        .zip(parts)
        .map(|(&id, (text, offset))| decode_section(id, text, offset))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GppString {
        section_ids,
        sections,
    })
}

fn decode_section(id: u16, text: &str, offset: usize) -> Result<GppSection, DecodeError> {
    let info = sections::lookup(id).ok_or(DecodeError::UnknownSection { id: id.into() })?;
    decode_known_section(info, text, offset).map_err(|source| DecodeError::InSection {
        id,
        name: info.name,
        source: Box::new(source),
    })
}

fn decode_known_section(
    info: &SectionInfo,
    text: &str,
    offset: usize,
) -> Result<GppSection, DecodeError> {
    Ok(match info.decoder {
        SectionDecoder::TcfEuV2 => GppSection::TcfEuV2(Box::new(decode_tcf_at(text, offset)?)),
        SectionDecoder::UspV1 => GppSection::UspV1(decode_usp_at(text, offset)?),
        SectionDecoder::Us(layouts) => {
            GppSection::Us(sections::decode_us_section(info, layouts, text, offset)?)
        }
        SectionDecoder::Undecoded => GppSection::Undecoded(UndecodedSection {
            id: info.id,
            name: info.name,
            raw: text.to_owned(),
        }),
    })
}
