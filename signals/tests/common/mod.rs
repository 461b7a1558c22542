//! A small bit *encoder* for the tests: the crate only decodes, so the tests
//! write strings themselves from models, independently of the decoder's
//! tables, and check that decoding gives the model back.

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use madtech_signals::{PublisherRestriction, PublisherTc, TcString};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// How an encoder pads the last base64url character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Zero bits up to the next character (GPP spec examples: `DBABM`).
    Sextet,
    /// Zero bits up to a whole byte, then to the next character (TCF, and
    /// iabgpp-java: `DBABMA`).
    Byte,
}

#[derive(Debug, Clone, Default)]
pub struct BitWriter {
    bits: Vec<bool>,
}

impl BitWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.bits.len()
    }

    pub fn int(&mut self, value: u64, width: usize) -> &mut Self {
        assert!(
            width == 64 || value < (1 << width),
            "{value} does not fit in {width} bits"
        );
        for shift in (0..width).rev() {
            self.bits.push((value >> shift) & 1 == 1);
        }
        self
    }

    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.bits.push(value);
        self
    }

    /// A bitfield of `width` bits where bit i is set when id i + 1 is in `ids`.
    pub fn flags<T: Into<u64> + Copy>(&mut self, ids: &BTreeSet<T>, width: usize) -> &mut Self {
        let ids: BTreeSet<u64> = ids.iter().map(|&id| id.into()).collect();
        for id in 1..=width as u64 {
            self.bits.push(ids.contains(&id));
        }
        self
    }

    /// Fibonacci coding: the Zeckendorf representation, smallest term first,
    /// closed by an extra 1.
    pub fn fibonacci(&mut self, value: u64) -> &mut Self {
        assert!(value >= 1, "Fibonacci coding starts at 1");
        let mut terms = vec![1u64, 2];
        while let Some(next) = terms[terms.len() - 2].checked_add(terms[terms.len() - 1]) {
            if next > value {
                break;
            }
            terms.push(next);
        }
        let mut used = vec![false; terms.len()];
        let mut rest = value;
        for (index, &term) in terms.iter().enumerate().rev() {
            if term <= rest {
                used[index] = true;
                rest -= term;
            }
        }
        let last = used
            .iter()
            .rposition(|&u| u)
            .expect("value >= 1 uses a term");
        self.bits.extend_from_slice(&used[..=last]);
        self.bits.push(true);
        self
    }

    pub fn base64url(&self, padding: Padding) -> String {
        let mut bits = self.bits.clone();
        if padding == Padding::Byte {
            while !bits.len().is_multiple_of(8) {
                bits.push(false);
            }
        }
        while !bits.len().is_multiple_of(6) {
            bits.push(false);
        }
        bits.chunks(6)
            .map(|chunk| {
                let value = chunk
                    .iter()
                    .fold(0usize, |acc, &bit| (acc << 1) | usize::from(bit));
                char::from(ALPHABET[value])
            })
            .collect()
    }
}

/// Maximal runs of consecutive ids.
pub fn runs(ids: &BTreeSet<u16>) -> Vec<(u16, u16)> {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &id in ids {
        match runs.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(id) => *end = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// NumEntries and the entries of a TCF range section. With `repeat`, every
/// entry is written twice, which the decoder must de-duplicate.
pub fn tcf_ranges(w: &mut BitWriter, ids: &BTreeSet<u16>, repeat: bool) {
    let mut entries = runs(ids);
    if repeat {
        entries.extend(entries.clone());
    }
    w.int(entries.len() as u64, 12);
    for (start, end) in entries {
        w.bool(start != end).int(start.into(), 16);
        if start != end {
            w.int(end.into(), 16);
        }
    }
}

/// A TCF vendor section and how to encode it.
#[derive(Debug, Clone)]
pub struct VendorSet {
    pub ids: BTreeSet<u16>,
    pub as_ranges: bool,
    pub repeat_entries: bool,
}

impl VendorSet {
    pub fn encode(&self, w: &mut BitWriter) {
        let max_vendor_id = self.ids.last().copied().unwrap_or(0);
        w.int(max_vendor_id.into(), 16).bool(self.as_ranges);
        if self.as_ranges {
            tcf_ranges(w, &self.ids, self.repeat_entries);
        } else {
            w.flags(&self.ids, max_vendor_id.into());
        }
    }

    fn expected(&self) -> Vec<u16> {
        self.ids.iter().copied().collect()
    }
}

#[derive(Debug, Clone)]
pub struct PublisherModel {
    pub purpose_consents: BTreeSet<u8>,
    pub purpose_legitimate_interests: BTreeSet<u8>,
    pub num_custom_purposes: u8,
    pub custom_purpose_consents: BTreeSet<u8>,
    pub custom_purpose_legitimate_interests: BTreeSet<u8>,
}

/// Everything a TC string carries, in encodable form.
#[derive(Debug, Clone)]
pub struct TcModel {
    pub created_deciseconds: u64,
    pub last_updated_deciseconds: u64,
    pub cmp_id: u16,
    pub cmp_version: u16,
    pub consent_screen: u8,
    pub consent_language: [u8; 2],
    pub vendor_list_version: u16,
    pub tcf_policy_version: u8,
    pub is_service_specific: bool,
    pub use_non_standard_texts: bool,
    pub special_feature_optins: BTreeSet<u8>,
    pub purpose_consents: BTreeSet<u8>,
    pub purpose_legitimate_interests: BTreeSet<u8>,
    pub purpose_one_treatment: bool,
    pub publisher_cc: [u8; 2],
    pub vendor_consents: VendorSet,
    pub vendor_legitimate_interests: VendorSet,
    pub publisher_restrictions: Vec<(u8, u8, BTreeSet<u16>)>,
    pub disclosed_vendors: Option<VendorSet>,
    pub allowed_vendors: Option<VendorSet>,
    pub publisher_tc: Option<PublisherModel>,
    pub padding: Padding,
}

impl TcModel {
    /// A 2.2-valid model with no vendors, to be adjusted by a test.
    pub fn minimal() -> Self {
        let empty = VendorSet {
            ids: BTreeSet::new(),
            as_ranges: false,
            repeat_entries: false,
        };
        Self {
            created_deciseconds: 16_000_000_000,
            last_updated_deciseconds: 16_000_000_004,
            cmp_id: 10,
            cmp_version: 2,
            consent_screen: 1,
            consent_language: [4, 13], // EN
            vendor_list_version: 150,
            tcf_policy_version: 4,
            is_service_specific: true,
            use_non_standard_texts: false,
            special_feature_optins: BTreeSet::new(),
            purpose_consents: BTreeSet::from([1, 2, 3]),
            purpose_legitimate_interests: BTreeSet::from([2, 7]),
            purpose_one_treatment: false,
            publisher_cc: [3, 4], // DE
            vendor_consents: empty.clone(),
            vendor_legitimate_interests: empty,
            publisher_restrictions: Vec::new(),
            disclosed_vendors: None,
            allowed_vendors: None,
            publisher_tc: None,
            padding: Padding::Byte,
        }
    }

    /// The core segment up to PublisherCC, before the vendor sections, for
    /// tests that write those by hand.
    pub fn core_prefix_bits(&self) -> BitWriter {
        let mut w = BitWriter::new();
        w.int(2, 6)
            .int(self.created_deciseconds, 36)
            .int(self.last_updated_deciseconds, 36)
            .int(self.cmp_id.into(), 12)
            .int(self.cmp_version.into(), 12)
            .int(self.consent_screen.into(), 6)
            .int(self.consent_language[0].into(), 6)
            .int(self.consent_language[1].into(), 6)
            .int(self.vendor_list_version.into(), 12)
            .int(self.tcf_policy_version.into(), 6)
            .bool(self.is_service_specific)
            .bool(self.use_non_standard_texts)
            .flags(&self.special_feature_optins, 12)
            .flags(&self.purpose_consents, 24)
            .flags(&self.purpose_legitimate_interests, 24)
            .bool(self.purpose_one_treatment)
            .int(self.publisher_cc[0].into(), 6)
            .int(self.publisher_cc[1].into(), 6);
        w
    }

    pub fn core_bits(&self) -> BitWriter {
        let mut w = self.core_prefix_bits();
        self.vendor_consents.encode(&mut w);
        self.vendor_legitimate_interests.encode(&mut w);
        w.int(self.publisher_restrictions.len() as u64, 12);
        for (purpose, restriction_type, vendors) in &self.publisher_restrictions {
            w.int((*purpose).into(), 6)
                .int((*restriction_type).into(), 2);
            tcf_ranges(&mut w, vendors, false);
        }
        w
    }

    pub fn encode(&self) -> String {
        let mut segments = vec![self.core_bits().base64url(self.padding)];
        for (segment_type, vendors) in [(1, &self.disclosed_vendors), (2, &self.allowed_vendors)] {
            if let Some(vendors) = vendors {
                let mut w = BitWriter::new();
                w.int(segment_type, 3);
                vendors.encode(&mut w);
                segments.push(w.base64url(self.padding));
            }
        }
        if let Some(publisher) = &self.publisher_tc {
            let custom = usize::from(publisher.num_custom_purposes);
            let mut w = BitWriter::new();
            w.int(3, 3)
                .flags(&publisher.purpose_consents, 24)
                .flags(&publisher.purpose_legitimate_interests, 24)
                .int(publisher.num_custom_purposes.into(), 6)
                .flags(&publisher.custom_purpose_consents, custom)
                .flags(&publisher.custom_purpose_legitimate_interests, custom);
            segments.push(w.base64url(self.padding));
        }
        segments.join(".")
    }

    pub fn expected(&self) -> TcString {
        let time =
            |ds: u64| DateTime::<Utc>::from_timestamp_millis(ds as i64 * 100).expect("in range");
        let letters = |pair: [u8; 2]| pair.iter().map(|&l| char::from(b'A' + l)).collect();
        let list = |set: &BTreeSet<u8>| set.iter().copied().collect::<Vec<u8>>();
        TcString {
            version: 2,
            created: time(self.created_deciseconds),
            last_updated: time(self.last_updated_deciseconds),
            cmp_id: self.cmp_id,
            cmp_version: self.cmp_version,
            consent_screen: self.consent_screen,
            consent_language: letters(self.consent_language),
            vendor_list_version: self.vendor_list_version,
            tcf_policy_version: self.tcf_policy_version,
            is_service_specific: self.is_service_specific,
            use_non_standard_texts: self.use_non_standard_texts,
            special_feature_optins: list(&self.special_feature_optins),
            purpose_consents: list(&self.purpose_consents),
            purpose_legitimate_interests: list(&self.purpose_legitimate_interests),
            purpose_one_treatment: self.purpose_one_treatment,
            publisher_cc: letters(self.publisher_cc),
            vendor_consents: self.vendor_consents.expected(),
            vendor_legitimate_interests: self.vendor_legitimate_interests.expected(),
            publisher_restrictions: self
                .publisher_restrictions
                .iter()
                .map(
                    |(purpose_id, restriction_type, vendors)| PublisherRestriction {
                        purpose_id: *purpose_id,
                        restriction_type: *restriction_type,
                        vendors: vendors.iter().copied().collect(),
                    },
                )
                .collect(),
            disclosed_vendors: self.disclosed_vendors.as_ref().map(VendorSet::expected),
            allowed_vendors: self.allowed_vendors.as_ref().map(VendorSet::expected),
            publisher_tc: self.publisher_tc.as_ref().map(|p| PublisherTc {
                purpose_consents: list(&p.purpose_consents),
                purpose_legitimate_interests: list(&p.purpose_legitimate_interests),
                num_custom_purposes: p.num_custom_purposes,
                custom_purpose_consents: list(&p.custom_purpose_consents),
                custom_purpose_legitimate_interests: list(&p.custom_purpose_legitimate_interests),
            }),
        }
    }
}

/// A GPP header listing `ids` (ascending), runs of consecutive ids written
/// as ranges.
pub fn gpp_header(ids: &BTreeSet<u16>, padding: Padding) -> String {
    let mut w = BitWriter::new();
    w.int(3, 6).int(1, 6);
    let entries = runs(ids);
    w.int(entries.len() as u64, 12);
    let mut last = 0u64;
    for (start, end) in entries {
        let (start, end) = (u64::from(start), u64::from(end));
        w.bool(start != end).fibonacci(start - last);
        if start != end {
            w.fibonacci(end - start);
        }
        last = end;
    }
    w.base64url(padding)
}

/// A field of a US section as the tests restate the specs: its JSON key
/// and, for N-Bitfields, the number of 2-bit entries.
pub type UsLayout = &'static [(&'static str, Option<usize>)];

const S: Option<usize> = None;

pub const USNAT_CURRENT: UsLayout = &[
    ("sharing_notice", S),
    ("sale_opt_out_notice", S),
    ("sharing_opt_out_notice", S),
    ("targeted_advertising_opt_out_notice", S),
    ("sensitive_data_processing_opt_out_notice", S),
    ("sensitive_data_limit_use_notice", S),
    ("sale_opt_out", S),
    ("sharing_opt_out", S),
    ("targeted_advertising_opt_out", S),
    ("sensitive_data_processing", Some(16)),
    ("known_child_sensitive_data_consents", Some(3)),
    ("personal_data_consents", S),
    ("mspa_covered_transaction", S),
    ("mspa_opt_out_option_mode", S),
    ("mspa_service_provider_mode", S),
];

pub const USNAT_LEGACY: UsLayout = &[
    ("sharing_notice", S),
    ("sale_opt_out_notice", S),
    ("sharing_opt_out_notice", S),
    ("targeted_advertising_opt_out_notice", S),
    ("sensitive_data_processing_opt_out_notice", S),
    ("sensitive_data_limit_use_notice", S),
    ("sale_opt_out", S),
    ("sharing_opt_out", S),
    ("targeted_advertising_opt_out", S),
    ("sensitive_data_processing", Some(12)),
    ("known_child_sensitive_data_consents", Some(2)),
    ("personal_data_consents", S),
    ("mspa_covered_transaction", S),
    ("mspa_opt_out_option_mode", S),
    ("mspa_service_provider_mode", S),
];

pub const USCA: UsLayout = &[
    ("sale_opt_out_notice", S),
    ("sharing_opt_out_notice", S),
    ("sensitive_data_limit_use_notice", S),
    ("sale_opt_out", S),
    ("sharing_opt_out", S),
    ("sensitive_data_processing", Some(9)),
    ("known_child_sensitive_data_consents", Some(2)),
    ("personal_data_consents", S),
    ("mspa_covered_transaction", S),
    ("mspa_opt_out_option_mode", S),
    ("mspa_service_provider_mode", S),
];

pub const USUT: UsLayout = &[
    ("sharing_notice", S),
    ("sale_opt_out_notice", S),
    ("targeted_advertising_opt_out_notice", S),
    ("sensitive_data_processing_opt_out_notice", S),
    ("sale_opt_out", S),
    ("targeted_advertising_opt_out", S),
    ("sensitive_data_processing", Some(8)),
    ("known_child_sensitive_data_consents", S),
    ("mspa_covered_transaction", S),
    ("mspa_opt_out_option_mode", S),
    ("mspa_service_provider_mode", S),
];

pub const USDE: UsLayout = &[
    ("processing_notice", S),
    ("sale_opt_out_notice", S),
    ("targeted_advertising_opt_out_notice", S),
    ("sale_opt_out", S),
    ("targeted_advertising_opt_out", S),
    ("sensitive_data_processing", Some(9)),
    ("known_child_sensitive_data_consents", Some(5)),
    ("additional_data_processing_consent", S),
    ("mspa_covered_transaction", S),
    ("mspa_opt_out_option_mode", S),
    ("mspa_service_provider_mode", S),
];

pub const USIA: UsLayout = &[
    ("processing_notice", S),
    ("sale_opt_out_notice", S),
    ("targeted_advertising_opt_out_notice", S),
    ("sensitive_data_opt_out_notice", S),
    ("sale_opt_out", S),
    ("targeted_advertising_opt_out", S),
    ("sensitive_data_processing", Some(8)),
    ("known_child_sensitive_data_consents", S),
    ("mspa_covered_transaction", S),
    ("mspa_opt_out_option_mode", S),
    ("mspa_service_provider_mode", S),
];

/// Number of 2-bit values a layout holds.
pub fn value_count(layout: UsLayout) -> usize {
    layout.iter().map(|(_, n)| n.unwrap_or(1)).sum()
}

/// A US section core: `version`, then `values` (2 bits each) in layout
/// order; then a GPC subsection when `gpc` is given.
pub fn us_section(version: u8, values: &[u8], gpc: Option<bool>, padding: Padding) -> String {
    let mut w = BitWriter::new();
    w.int(version.into(), 6);
    for &value in values {
        w.int(value.into(), 2);
    }
    let mut text = w.base64url(padding);
    if let Some(gpc) = gpc {
        let mut g = BitWriter::new();
        g.int(1, 2).bool(gpc);
        text.push('.');
        text.push_str(&g.base64url(padding));
    }
    text
}

/// The JSON a layout and its values should decode to.
pub fn us_expected_json(
    layout: UsLayout,
    version: u8,
    values: &[u8],
    gpc: Option<bool>,
) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert("version".into(), version.into());
    let mut rest = values;
    for (key, count) in layout {
        let value = match count {
            None => {
                let (first, tail) = rest.split_first().expect("enough values");
                rest = tail;
                serde_json::Value::from(*first)
            }
            Some(n) => {
                let (list, tail) = rest.split_at(*n);
                rest = tail;
                serde_json::Value::from(list.to_vec())
            }
        };
        object.insert((*key).into(), value);
    }
    if let Some(gpc) = gpc {
        object.insert("gpc".into(), gpc.into());
    }
    serde_json::Value::Object(object)
}
