//! IAB Europe TCF v2 TC strings.
//!
//! Source: IAB Europe, "Transparency & Consent String with Global Vendor &
//! CMP List Formats" v2 (TCF v2.2), section "The TC String". A TC string is
//! `.`-separated base64url segments: the core segment first (it has no
//! segment type field), then optional segments that each begin with a 3-bit
//! SegmentType: 1 disclosed vendors, 2 allowed vendors (dropped in 2.2 but
//! still sent by older CMPs), 3 publisher TC.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::DecodeError;
use crate::bits::{BitReader, split_with_offsets};

/// A decoded TC string. Id lists (purposes, features, vendors) are sorted
/// and free of duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcString {
    /// Always 2.
    pub version: u8,
    /// When the TC string was first created, to the decisecond.
    pub created: DateTime<Utc>,
    /// When the TC string was last updated, to the decisecond.
    pub last_updated: DateTime<Utc>,
    pub cmp_id: u16,
    pub cmp_version: u16,
    pub consent_screen: u8,
    /// ISO 639-1 language of the CMP UI, upper case (`"EN"`).
    pub consent_language: String,
    pub vendor_list_version: u16,
    pub tcf_policy_version: u8,
    pub is_service_specific: bool,
    pub use_non_standard_texts: bool,
    /// Special features the user opted in to.
    pub special_feature_optins: Vec<u8>,
    /// Purposes the user consented to.
    pub purpose_consents: Vec<u8>,
    /// Purposes for which legitimate interest was disclosed and not objected to.
    pub purpose_legitimate_interests: Vec<u8>,
    pub purpose_one_treatment: bool,
    /// ISO 3166-1 alpha-2 country of the publisher, upper case (`"DE"`).
    pub publisher_cc: String,
    pub vendor_consents: Vec<u16>,
    pub vendor_legitimate_interests: Vec<u16>,
    pub publisher_restrictions: Vec<PublisherRestriction>,
    /// Vendors disclosed to the user (segment type 1), if the segment is there.
    pub disclosed_vendors: Option<Vec<u16>>,
    /// Vendors the publisher allows (segment type 2, legacy), if present.
    pub allowed_vendors: Option<Vec<u16>>,
    /// The publisher's own purposes (segment type 3), if present.
    pub publisher_tc: Option<PublisherTc>,
}

/// A publisher restriction: for one purpose, the vendors whose legal basis
/// the publisher overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublisherRestriction {
    pub purpose_id: u8,
    /// 0 purpose flatly not allowed, 1 require consent, 2 require legitimate
    /// interest, 3 undefined. See [`PublisherRestriction::kind`].
    pub restriction_type: u8,
    pub vendors: Vec<u16>,
}

/// The meaning of [`PublisherRestriction::restriction_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestrictionKind {
    NotAllowed,
    RequireConsent,
    RequireLegitimateInterest,
    Undefined,
}

impl PublisherRestriction {
    pub fn kind(&self) -> RestrictionKind {
        match self.restriction_type {
            0 => RestrictionKind::NotAllowed,
            1 => RestrictionKind::RequireConsent,
            2 => RestrictionKind::RequireLegitimateInterest,
            _ => RestrictionKind::Undefined,
        }
    }
}

/// The publisher TC segment: the publisher's transparency and consent for
/// standard and custom purposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublisherTc {
    pub purpose_consents: Vec<u8>,
    pub purpose_legitimate_interests: Vec<u8>,
    pub num_custom_purposes: u8,
    pub custom_purpose_consents: Vec<u8>,
    pub custom_purpose_legitimate_interests: Vec<u8>,
}

/// A rule of TCF 2.2 that a (well-formed) TC string breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tcf22Problem {
    /// TCF 2.2 strings carry TcfPolicyVersion 4 or later.
    PolicyVersionTooOld { tcf_policy_version: u8 },
    /// Global-scope TC strings were retired; 2.2 strings are service-specific.
    NotServiceSpecific,
    /// TCF 2.2 removed legitimate interest as a legal basis for purposes
    /// 3 to 6 (personalised advertising and content profiles and their use).
    LegitimateInterestNotAllowed { purpose: u8, publisher: bool },
}

/// Purposes that TCF 2.2 allows only with consent.
const CONSENT_ONLY_PURPOSES: [u8; 4] = [3, 4, 5, 6];

impl fmt::Display for Tcf22Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PolicyVersionTooOld { tcf_policy_version } => write!(
                f,
                "TcfPolicyVersion {tcf_policy_version} predates TCF 2.2 (policy version 4)"
            ),
            Self::NotServiceSpecific => write!(
                f,
                "IsServiceSpecific is 0, but TCF 2.2 allows only service-specific TC strings"
            ),
            Self::LegitimateInterestNotAllowed { purpose, publisher } => write!(
                f,
                "{} legitimate interest for purpose {purpose}, which TCF 2.2 allows only with consent",
                if *publisher {
                    "publisher claims"
                } else {
                    "claims"
                }
            ),
        }
    }
}

impl Serialize for Tcf22Problem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl TcString {
    /// The TCF 2.2 rules this string breaks; empty for a valid 2.2 string.
    pub fn tcf22_problems(&self) -> Vec<Tcf22Problem> {
        let mut problems = Vec::new();
        if self.tcf_policy_version < 4 {
            problems.push(Tcf22Problem::PolicyVersionTooOld {
                tcf_policy_version: self.tcf_policy_version,
            });
        }
        if !self.is_service_specific {
            problems.push(Tcf22Problem::NotServiceSpecific);
        }
        let publisher_li = self
            .publisher_tc
            .iter()
            .flat_map(|publisher| &publisher.purpose_legitimate_interests)
            .map(|&purpose| (purpose, true));
        let li = self
            .purpose_legitimate_interests
            .iter()
            .map(|&purpose| (purpose, false))
            .chain(publisher_li);
        for (purpose, publisher) in li {
            if CONSENT_ONLY_PURPOSES.contains(&purpose) {
                problems.push(Tcf22Problem::LegitimateInterestNotAllowed { purpose, publisher });
            }
        }
        problems
    }

    /// `Ok` when the string follows TCF 2.2. Decoding accepts older strings;
    /// a caller that enforces 2.2 (the default in the consent service) calls
    /// this and rejects on `Err`.
    pub fn validate_tcf22(&self) -> Result<(), Vec<Tcf22Problem>> {
        let problems = self.tcf22_problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    pub fn has_purpose_consent(&self, purpose: u8) -> bool {
        self.purpose_consents.binary_search(&purpose).is_ok()
    }

    pub fn has_vendor_consent(&self, vendor: u16) -> bool {
        self.vendor_consents.binary_search(&vendor).is_ok()
    }
}

fn rfc3339(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

// Written out rather than derived so that `problems`, which is computed from
// the other fields, cannot disagree with them.
impl Serialize for TcString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("TcString", 24)?;
        s.serialize_field("version", &self.version)?;
        s.serialize_field("created", &rfc3339(&self.created))?;
        s.serialize_field("last_updated", &rfc3339(&self.last_updated))?;
        s.serialize_field("cmp_id", &self.cmp_id)?;
        s.serialize_field("cmp_version", &self.cmp_version)?;
        s.serialize_field("consent_screen", &self.consent_screen)?;
        s.serialize_field("consent_language", &self.consent_language)?;
        s.serialize_field("vendor_list_version", &self.vendor_list_version)?;
        s.serialize_field("tcf_policy_version", &self.tcf_policy_version)?;
        s.serialize_field("is_service_specific", &self.is_service_specific)?;
        s.serialize_field("use_non_standard_texts", &self.use_non_standard_texts)?;
        s.serialize_field("special_feature_optins", &self.special_feature_optins)?;
        s.serialize_field("purpose_consents", &self.purpose_consents)?;
        s.serialize_field(
            "purpose_legitimate_interests",
            &self.purpose_legitimate_interests,
        )?;
        s.serialize_field("purpose_one_treatment", &self.purpose_one_treatment)?;
        s.serialize_field("publisher_cc", &self.publisher_cc)?;
        s.serialize_field("vendor_consents", &self.vendor_consents)?;
        s.serialize_field(
            "vendor_legitimate_interests",
            &self.vendor_legitimate_interests,
        )?;
        s.serialize_field("publisher_restrictions", &self.publisher_restrictions)?;
        s.serialize_field("disclosed_vendors", &self.disclosed_vendors)?;
        s.serialize_field("allowed_vendors", &self.allowed_vendors)?;
        s.serialize_field("publisher_tc", &self.publisher_tc)?;
        s.serialize_field("problems", &self.tcf22_problems())?;
        s.end()
    }
}

/// Decodes a TC string.
pub fn decode_tcf(input: &str) -> Result<TcString, DecodeError> {
    decode_tcf_at(input, 0)
}

/// Decodes a TC string found at byte `offset` of a larger string (the
/// `tcfeuv2` section of a GPP string), so errors point into that string.
pub(crate) fn decode_tcf_at(input: &str, offset: usize) -> Result<TcString, DecodeError> {
    if input.is_empty() {
        return Err(DecodeError::Empty { what: "TC string" });
    }
    let mut segments = split_with_offsets(input, '.', offset);
    let (core_text, core_offset) = segments.next().unwrap_or((input, offset));
    let mut tc = decode_core(&mut segment_reader(core_text, core_offset)?)?;

    for (text, segment_offset) in segments {
        let mut reader = segment_reader(text, segment_offset)?;
        let segment_type = reader.read_u8(3, "SegmentType")?;
        let slot_taken = match segment_type {
            1 => tc
                .disclosed_vendors
                .replace(read_vendor_section(&mut reader, &DISCLOSED_VENDORS)?)
                .is_some(),
            2 => tc
                .allowed_vendors
                .replace(read_vendor_section(&mut reader, &ALLOWED_VENDORS)?)
                .is_some(),
            3 => tc
                .publisher_tc
                .replace(read_publisher_tc(&mut reader)?)
                .is_some(),
            0 => {
                return Err(DecodeError::InvalidSegment {
                    segment_type,
                    reason: "the core segment must come first and only once",
                });
            }
            _ => {
                return Err(DecodeError::InvalidSegment {
                    segment_type,
                    reason: "not a segment type of TCF v2",
                });
            }
        };
        if slot_taken {
            return Err(DecodeError::InvalidSegment {
                segment_type,
                reason: "segment appears more than once",
            });
        }
    }
    Ok(tc)
}

fn segment_reader(text: &str, offset: usize) -> Result<BitReader, DecodeError> {
    if text.is_empty() {
        return Err(DecodeError::Empty {
            what: "TC string segment",
        });
    }
    BitReader::from_base64url(text, offset)
}

fn decode_core(r: &mut BitReader) -> Result<TcString, DecodeError> {
    let version = r.read_u8(6, "Version")?;
    if version != 2 {
        return Err(DecodeError::UnsupportedVersion {
            signal: "TCF",
            found: u64::from(version),
            expected: 2,
        });
    }
    Ok(TcString {
        version,
        created: read_deciseconds(r, "Created")?,
        last_updated: read_deciseconds(r, "LastUpdated")?,
        cmp_id: r.read_u16(12, "CmpId")?,
        cmp_version: r.read_u16(12, "CmpVersion")?,
        consent_screen: r.read_u8(6, "ConsentScreen")?,
        consent_language: read_letters(r, "ConsentLanguage")?,
        vendor_list_version: r.read_u16(12, "VendorListVersion")?,
        tcf_policy_version: r.read_u8(6, "TcfPolicyVersion")?,
        is_service_specific: r.read_bool("IsServiceSpecific")?,
        use_non_standard_texts: r.read_bool("UseNonStandardTexts")?,
        special_feature_optins: read_small_ids(r, 12, "SpecialFeatureOptIns")?,
        purpose_consents: read_small_ids(r, 24, "PurposesConsent")?,
        purpose_legitimate_interests: read_small_ids(r, 24, "PurposesLITransparency")?,
        purpose_one_treatment: r.read_bool("PurposeOneTreatment")?,
        publisher_cc: read_letters(r, "PublisherCC")?,
        vendor_consents: read_vendor_section(r, &VENDOR_CONSENTS)?,
        vendor_legitimate_interests: read_vendor_section(r, &VENDOR_LEGITIMATE_INTERESTS)?,
        publisher_restrictions: read_publisher_restrictions(r)?,
        disclosed_vendors: None,
        allowed_vendors: None,
        publisher_tc: None,
    })
}

fn read_publisher_tc(r: &mut BitReader) -> Result<PublisherTc, DecodeError> {
    let purpose_consents = read_small_ids(r, 24, "PubPurposesConsent")?;
    let purpose_legitimate_interests = read_small_ids(r, 24, "PubPurposesLITransparency")?;
    let num_custom_purposes = r.read_u8(6, "NumCustomPurposes")?;
    let custom = u16::from(num_custom_purposes);
    Ok(PublisherTc {
        purpose_consents,
        purpose_legitimate_interests,
        num_custom_purposes,
        custom_purpose_consents: read_small_ids(r, custom, "CustomPurposesConsent")?,
        custom_purpose_legitimate_interests: read_small_ids(
            r,
            custom,
            "CustomPurposesLITransparency",
        )?,
    })
}

/// Field names of one vendor section, for error messages.
struct VendorSectionFields {
    max_vendor_id: &'static str,
    is_range_encoding: &'static str,
    bitfield: &'static str,
    ranges: RangeFields,
}

struct RangeFields {
    num_entries: &'static str,
    is_a_range: &'static str,
    start: &'static str,
    end: &'static str,
}

macro_rules! range_fields {
    ($section:literal) => {
        RangeFields {
            num_entries: concat!($section, " NumEntries"),
            is_a_range: concat!($section, " IsARange"),
            start: concat!($section, " StartOrOnlyVendorId"),
            end: concat!($section, " EndVendorId"),
        }
    };
}

macro_rules! vendor_section_fields {
    ($section:literal) => {
        VendorSectionFields {
            max_vendor_id: concat!($section, " MaxVendorId"),
            is_range_encoding: concat!($section, " IsRangeEncoding"),
            bitfield: concat!($section, " BitField"),
            ranges: range_fields!($section),
        }
    };
}

const VENDOR_CONSENTS: VendorSectionFields = vendor_section_fields!("VendorConsents");
const VENDOR_LEGITIMATE_INTERESTS: VendorSectionFields =
    vendor_section_fields!("VendorLegitimateInterests");
const DISCLOSED_VENDORS: VendorSectionFields = vendor_section_fields!("DisclosedVendors");
const ALLOWED_VENDORS: VendorSectionFields = vendor_section_fields!("AllowedVendors");
const PUBLISHER_RESTRICTION_VENDORS: RangeFields = range_fields!("PubRestrictions");

/// A vendor section: MaxVendorId, then either a bitfield of MaxVendorId bits
/// or a list of ranges.
fn read_vendor_section(
    r: &mut BitReader,
    fields: &VendorSectionFields,
) -> Result<Vec<u16>, DecodeError> {
    let max_vendor_id = r.read_u16(16, fields.max_vendor_id)?;
    if r.read_bool(fields.is_range_encoding)? {
        return read_ranges(r, &fields.ranges, Some(max_vendor_id));
    }
    let available = r.remaining();
    if usize::from(max_vendor_id) > available {
        return Err(DecodeError::BitfieldTooShort {
            field: fields.bitfield,
            max_vendor_id,
            available,
        });
    }
    r.read_flags(max_vendor_id, fields.bitfield)
}

/// NumEntries ranges of vendor ids, returned as a sorted list without
/// duplicates. `max_vendor_id` bounds the ids where the section has one
/// (publisher restrictions have none).
fn read_ranges(
    r: &mut BitReader,
    fields: &RangeFields,
    max_vendor_id: Option<u16>,
) -> Result<Vec<u16>, DecodeError> {
    let entries = r.read_u16(12, fields.num_entries)?;
    let mut ranges = Vec::with_capacity(usize::from(entries));
    for _ in 0..entries {
        let is_a_range = r.read_bool(fields.is_a_range)?;
        let start = r.read_u16(16, fields.start)?;
        let end = if is_a_range {
            r.read_u16(16, fields.end)?
        } else {
            start
        };
        if end < start {
            return Err(DecodeError::InvalidRange {
                field: fields.end,
                start,
                end,
            });
        }
        let limit = max_vendor_id.unwrap_or(u16::MAX);
        for id in [start, end] {
            if id == 0 || id > limit {
                return Err(DecodeError::VendorIdOutOfRange {
                    field: fields.start,
                    id,
                    max_vendor_id: limit,
                });
            }
        }
        ranges.push((start, end));
    }
    Ok(expand_ranges(ranges))
}

/// Expands possibly overlapping ranges into sorted, distinct ids. Sorting
/// first keeps the work proportional to the ids produced (at most 65535),
/// not to the sum of range lengths, which a hostile string could make
/// 4095 × 65535.
fn expand_ranges(mut ranges: Vec<(u16, u16)>) -> Vec<u16> {
    ranges.sort_unstable();
    let mut ids = Vec::new();
    let mut next = 0u32;
    for (start, end) in ranges {
        let from = next.max(u32::from(start));
        ids.extend((from..=u32::from(end)).filter_map(|id| u16::try_from(id).ok()));
        next = next.max(u32::from(end) + 1);
    }
    ids
}

fn read_publisher_restrictions(
    r: &mut BitReader,
) -> Result<Vec<PublisherRestriction>, DecodeError> {
    let count = r.read_u16(12, "NumPubRestrictions")?;
    let mut restrictions = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let purpose_id = r.read_u8(6, "PubRestrictions PurposeId")?;
        let restriction_type = r.read_u8(2, "PubRestrictions RestrictionType")?;
        let vendors = read_ranges(r, &PUBLISHER_RESTRICTION_VENDORS, None)?;
        restrictions.push(PublisherRestriction {
            purpose_id,
            restriction_type,
            vendors,
        });
    }
    Ok(restrictions)
}

/// A bitfield of at most 255 ids (purposes, special features).
fn read_small_ids(
    r: &mut BitReader,
    bits: u16,
    field: &'static str,
) -> Result<Vec<u8>, DecodeError> {
    let ids = r.read_flags(bits, field)?;
    Ok(ids
        .into_iter()
        .filter_map(|id| u8::try_from(id).ok())
        .collect())
}

/// Two 6-bit letters, A = 0.
fn read_letters(r: &mut BitReader, field: &'static str) -> Result<String, DecodeError> {
    let mut letters = String::with_capacity(2);
    for _ in 0..2 {
        let value = r.read_u8(6, field)?;
        if value > 25 {
            return Err(DecodeError::InvalidLetter { field, value });
        }
        letters.push(char::from(b'A' + value));
    }
    Ok(letters)
}

/// A 36-bit count of deciseconds since the Unix epoch.
fn read_deciseconds(r: &mut BitReader, field: &'static str) -> Result<DateTime<Utc>, DecodeError> {
    let deciseconds = r.read_u64(36, field)?;
    i64::try_from(deciseconds)
        .ok()
        .and_then(|ds| ds.checked_mul(100))
        .and_then(DateTime::from_timestamp_millis)
        .ok_or(DecodeError::InvalidTimestamp { field })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_overlapping_ranges_once() {
        assert_eq!(
            expand_ranges(vec![(5, 7), (1, 2), (6, 9), (2, 2), (65535, 65535)]),
            vec![1, 2, 5, 6, 7, 8, 9, 65535]
        );
    }
}
