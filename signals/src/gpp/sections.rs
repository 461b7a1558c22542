//! The GPP section registry and a table-driven decoder for the US sections.
//!
//! Sources: IAB Tech Lab GPP "Section Information" (ids 1–12) and the
//! technical specification of each US section (US-National, US-States/*),
//! whose section ids 13–27 match the registry as implemented by the IAB
//! reference libraries.
//!
//! The US sections share one encoding: a core subsection of a 6-bit Version
//! followed by 2-bit fields and N×2-bit lists, then optional `.`-separated
//! subsections. They differ only in which fields appear and how long the
//! lists are, so each is a row of field specs below rather than its own
//! decoder.

use serde::Serialize;

use crate::DecodeError;
use crate::bits::{BitReader, split_with_offsets};

/// The highest section id in the registry.
pub(crate) const MAX_KNOWN_SECTION_ID: u16 = 27;

/// How the crate handles a registered section.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SectionDecoder {
    TcfEuV2,
    UspV1,
    /// Candidate core layouts, longest first: the first that fits the bits
    /// present is used (see [`USNAT_LAYOUTS`]).
    Us(&'static [&'static [UsField]]),
    /// Registered but not decoded: kept as the raw section text.
    Undecoded,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SectionInfo {
    pub(crate) id: u16,
    /// The client-side API prefix, used as the section's JSON key.
    pub(crate) name: &'static str,
    pub(crate) decoder: SectionDecoder,
}

const fn section(id: u16, name: &'static str, decoder: SectionDecoder) -> SectionInfo {
    SectionInfo { id, name, decoder }
}

use SectionDecoder::{TcfEuV2, Undecoded, Us, UspV1};

/// Every registered section id, in id order (index = id - 1).
///
/// Not decoded, and returned raw: 1 (TCF v1, deprecated), 3 and 4 (the header
/// and signal integrity, which are not consent sections), 5 (TCF Canada) and
/// 24–27 (Maryland, Indiana, Kentucky, Rhode Island), whose layouts depart
/// from the shared US shape (some move sensitive-data consents into a
/// subsection of their own).
const REGISTRY: [SectionInfo; MAX_KNOWN_SECTION_ID as usize] = [
    section(1, "tcfeuv1", Undecoded),
    section(2, "tcfeuv2", TcfEuV2),
    section(3, "header", Undecoded),
    section(4, "signal_integrity", Undecoded),
    section(5, "tcfcav1", Undecoded),
    section(6, "uspv1", UspV1),
    section(7, "usnat", Us(USNAT_LAYOUTS)),
    section(8, "usca", Us(&[USCA])),
    section(9, "usva", Us(&[USVA])),
    section(10, "usco", Us(&[USCO])),
    section(11, "usut", Us(&[USUT])),
    section(12, "usct", Us(&[USCT])),
    section(13, "usfl", Us(&[USFL])),
    section(14, "usmt", Us(&[USMT])),
    section(15, "usor", Us(&[USOR])),
    section(16, "ustx", Us(&[USTX])),
    section(17, "usde", Us(&[USDE])),
    section(18, "usia", Us(&[USIA])),
    section(19, "usne", Us(&[USNE])),
    section(20, "usnh", Us(&[USNH])),
    section(21, "usnj", Us(&[USNJ])),
    section(22, "ustn", Us(&[USTN])),
    section(23, "usmn", Us(&[USMN])),
    section(24, "usmd", Undecoded),
    section(25, "usin", Undecoded),
    section(26, "usky", Undecoded),
    section(27, "usri", Undecoded),
];

pub(crate) fn lookup(id: u16) -> Option<&'static SectionInfo> {
    REGISTRY.get(usize::from(id).checked_sub(1)?)
}

/// A field of a US section core, after the 6-bit Version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UsField {
    SharingNotice,
    ProcessingNotice,
    SaleOptOutNotice,
    SharingOptOutNotice,
    TargetedAdvertisingOptOutNotice,
    SensitiveDataProcessingOptOutNotice,
    SensitiveDataOptOutNotice,
    SensitiveDataLimitUseNotice,
    SaleOptOut,
    SharingOptOut,
    TargetedAdvertisingOptOut,
    /// N-Bitfield(2, n): one 2-bit value per category of sensitive data.
    SensitiveDataProcessing(u8),
    /// N-Bitfield(2, n) in most sections …
    KnownChildSensitiveDataConsents(u8),
    /// … but a single Int(2) in some (va, co, ut, tx, ia, ne, tn, mn).
    KnownChildSensitiveDataConsent,
    PersonalDataConsents,
    AdditionalDataProcessingConsent,
    MspaCoveredTransaction,
    MspaOptOutOptionMode,
    MspaServiceProviderMode,
}

use UsField::*;

impl UsField {
    /// The spec's field name, for error messages.
    fn spec_name(self) -> &'static str {
        match self {
            SharingNotice => "SharingNotice",
            ProcessingNotice => "ProcessingNotice",
            SaleOptOutNotice => "SaleOptOutNotice",
            SharingOptOutNotice => "SharingOptOutNotice",
            TargetedAdvertisingOptOutNotice => "TargetedAdvertisingOptOutNotice",
            SensitiveDataProcessingOptOutNotice => "SensitiveDataProcessingOptOutNotice",
            SensitiveDataOptOutNotice => "SensitiveDataOptOutNotice",
            SensitiveDataLimitUseNotice => "SensitiveDataLimitUseNotice",
            SaleOptOut => "SaleOptOut",
            SharingOptOut => "SharingOptOut",
            TargetedAdvertisingOptOut => "TargetedAdvertisingOptOut",
            SensitiveDataProcessing(_) => "SensitiveDataProcessing",
            KnownChildSensitiveDataConsents(_) | KnownChildSensitiveDataConsent => {
                "KnownChildSensitiveDataConsents"
            }
            PersonalDataConsents => "PersonalDataConsents",
            AdditionalDataProcessingConsent => "AdditionalDataProcessingConsent",
            MspaCoveredTransaction => "MspaCoveredTransaction",
            MspaOptOutOptionMode => "MspaOptOutOptionMode",
            MspaServiceProviderMode => "MspaServiceProviderMode",
        }
    }

    const fn bits(self) -> usize {
        match self {
            SensitiveDataProcessing(n) | KnownChildSensitiveDataConsents(n) => 2 * n as usize,
            _ => 2,
        }
    }
}

const VERSION_BITS: usize = 6;

/// Bits of a core layout, Version included.
pub(crate) const fn layout_bits(layout: &[UsField]) -> usize {
    let mut bits = VERSION_BITS;
    let mut i = 0;
    while i < layout.len() {
        bits += layout[i].bits();
        i += 1;
    }
    bits
}

// US National. The spec grew from 12 to 16 sensitive-data categories and from
// 2 to 3 known-child categories; strings of both layouts are in use and the
// reference libraries disagree on the Version that marks them, so the layout
// is chosen by the number of bits the core has (70 vs 60).
const USNAT_CURRENT: &[UsField] = &usnat(16, 3);
const USNAT_LEGACY: &[UsField] = &usnat(12, 2);
const USNAT_LAYOUTS: &[&[UsField]] = &[USNAT_CURRENT, USNAT_LEGACY];

const fn usnat(sensitive: u8, child: u8) -> [UsField; 15] {
    [
        SharingNotice,
        SaleOptOutNotice,
        SharingOptOutNotice,
        TargetedAdvertisingOptOutNotice,
        SensitiveDataProcessingOptOutNotice,
        SensitiveDataLimitUseNotice,
        SaleOptOut,
        SharingOptOut,
        TargetedAdvertisingOptOut,
        SensitiveDataProcessing(sensitive),
        KnownChildSensitiveDataConsents(child),
        PersonalDataConsents,
        MspaCoveredTransaction,
        MspaOptOutOptionMode,
        MspaServiceProviderMode,
    ]
}

const USCA: &[UsField] = &[
    SaleOptOutNotice,
    SharingOptOutNotice,
    SensitiveDataLimitUseNotice,
    SaleOptOut,
    SharingOptOut,
    SensitiveDataProcessing(9),
    KnownChildSensitiveDataConsents(2),
    PersonalDataConsents,
    MspaCoveredTransaction,
    MspaOptOutOptionMode,
    MspaServiceProviderMode,
];

// Virginia, Colorado and Connecticut share a shape: sharing notice, sale and
// targeted-advertising notices and opt-outs, sensitive data, known child and
// the MSPA fields. Utah adds a sensitive-data opt-out notice.
const USVA: &[UsField] = &first_states(8, KnownChildSensitiveDataConsent);
const USCO: &[UsField] = &first_states(7, KnownChildSensitiveDataConsent);
const USCT: &[UsField] = &first_states(8, KnownChildSensitiveDataConsents(3));
const USUT: &[UsField] = &[
    SharingNotice,
    SaleOptOutNotice,
    TargetedAdvertisingOptOutNotice,
    SensitiveDataProcessingOptOutNotice,
    SaleOptOut,
    TargetedAdvertisingOptOut,
    SensitiveDataProcessing(8),
    KnownChildSensitiveDataConsent,
    MspaCoveredTransaction,
    MspaOptOutOptionMode,
    MspaServiceProviderMode,
];

const fn first_states(sensitive: u8, child: UsField) -> [UsField; 10] {
    [
        SharingNotice,
        SaleOptOutNotice,
        TargetedAdvertisingOptOutNotice,
        SaleOptOut,
        TargetedAdvertisingOptOut,
        SensitiveDataProcessing(sensitive),
        child,
        MspaCoveredTransaction,
        MspaOptOutOptionMode,
        MspaServiceProviderMode,
    ]
}

// The later state sections (2024 on) share another: a processing notice (a
// sharing notice in Montana), sale and targeted-advertising notices and
// opt-outs, sensitive data, known child, a consent to additional processing
// and the MSPA fields. Iowa has a sensitive-data opt-out notice instead of
// the additional-processing consent.
const USFL: &[UsField] = &later_states(ProcessingNotice, 8, KnownChildSensitiveDataConsents(3));
const USMT: &[UsField] = &later_states(SharingNotice, 8, KnownChildSensitiveDataConsents(3));
const USOR: &[UsField] = &later_states(ProcessingNotice, 11, KnownChildSensitiveDataConsents(3));
const USTX: &[UsField] = &later_states(ProcessingNotice, 8, KnownChildSensitiveDataConsent);
const USDE: &[UsField] = &later_states(ProcessingNotice, 9, KnownChildSensitiveDataConsents(5));
const USNE: &[UsField] = &later_states(ProcessingNotice, 8, KnownChildSensitiveDataConsent);
const USNH: &[UsField] = &later_states(ProcessingNotice, 8, KnownChildSensitiveDataConsents(3));
const USNJ: &[UsField] = &later_states(ProcessingNotice, 10, KnownChildSensitiveDataConsents(5));
const USTN: &[UsField] = &later_states(ProcessingNotice, 8, KnownChildSensitiveDataConsent);
const USMN: &[UsField] = &later_states(ProcessingNotice, 8, KnownChildSensitiveDataConsent);
const USIA: &[UsField] = &[
    ProcessingNotice,
    SaleOptOutNotice,
    TargetedAdvertisingOptOutNotice,
    SensitiveDataOptOutNotice,
    SaleOptOut,
    TargetedAdvertisingOptOut,
    SensitiveDataProcessing(8),
    KnownChildSensitiveDataConsent,
    MspaCoveredTransaction,
    MspaOptOutOptionMode,
    MspaServiceProviderMode,
];

const fn later_states(first_notice: UsField, sensitive: u8, child: UsField) -> [UsField; 11] {
    [
        first_notice,
        SaleOptOutNotice,
        TargetedAdvertisingOptOutNotice,
        SaleOptOut,
        TargetedAdvertisingOptOut,
        SensitiveDataProcessing(sensitive),
        child,
        AdditionalDataProcessingConsent,
        MspaCoveredTransaction,
        MspaOptOutOptionMode,
        MspaServiceProviderMode,
    ]
}

/// SubsectionType of the Global Privacy Control subsection.
const GPC_SUBSECTION: u8 = 1;

/// The known-child consents of a US section: one 2-bit value per category
/// in most sections, a single value in some (serialized as a number there,
/// as the spec types it Int(2)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum KnownChildConsents {
    Single(u8),
    PerCategory(Vec<u8>),
}

impl KnownChildConsents {
    pub fn values(&self) -> &[u8] {
        match self {
            Self::Single(value) => std::slice::from_ref(value),
            Self::PerCategory(values) => values,
        }
    }
}

/// A decoded US national or state section.
///
/// Field values are the spec's 2-bit codes, passed through as encoded
/// (values of 3, which the specs leave undefined, are not rejected). In
/// notices: 0 not applicable, 1 yes, 2 no. In opt-outs: 0 not applicable,
/// 1 opted out, 2 did not opt out. In consents: 0 not applicable, 1 no
/// consent, 2 consent. MspaCoveredTransaction: 1 yes, 2 no. Fields a
/// section does not have are `None` and left out of the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsSection {
    #[serde(skip)]
    pub id: u16,
    /// The section's API prefix (`usnat`, `usca`, …).
    #[serde(skip)]
    pub name: &'static str,
    /// As encoded; not checked (see the usnat layouts).
    pub version: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sale_opt_out_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing_opt_out_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targeted_advertising_opt_out_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitive_data_processing_opt_out_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitive_data_opt_out_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitive_data_limit_use_notice: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sale_opt_out: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing_opt_out: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targeted_advertising_opt_out: Option<u8>,
    pub sensitive_data_processing: Vec<u8>,
    pub known_child_sensitive_data_consents: KnownChildConsents,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personal_data_consents: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_data_processing_consent: Option<u8>,
    pub mspa_covered_transaction: u8,
    pub mspa_opt_out_option_mode: u8,
    pub mspa_service_provider_mode: u8,
    /// The Global Privacy Control bit, when the GPC subsection is present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpc: Option<bool>,
}

/// The 2-bit code for "opted out" in the opt-out fields.
const OPTED_OUT: u8 = 1;

impl UsSection {
    fn new(info: &SectionInfo, version: u8) -> Self {
        Self {
            id: info.id,
            name: info.name,
            version,
            sharing_notice: None,
            processing_notice: None,
            sale_opt_out_notice: None,
            sharing_opt_out_notice: None,
            targeted_advertising_opt_out_notice: None,
            sensitive_data_processing_opt_out_notice: None,
            sensitive_data_opt_out_notice: None,
            sensitive_data_limit_use_notice: None,
            sale_opt_out: None,
            sharing_opt_out: None,
            targeted_advertising_opt_out: None,
            sensitive_data_processing: Vec::new(),
            known_child_sensitive_data_consents: KnownChildConsents::PerCategory(Vec::new()),
            personal_data_consents: None,
            additional_data_processing_consent: None,
            mspa_covered_transaction: 0,
            mspa_opt_out_option_mode: 0,
            mspa_service_provider_mode: 0,
            gpc: None,
        }
    }

    pub fn opted_out_of_sale(&self) -> bool {
        self.sale_opt_out == Some(OPTED_OUT)
    }

    pub fn opted_out_of_sharing(&self) -> bool {
        self.sharing_opt_out == Some(OPTED_OUT)
    }

    pub fn opted_out_of_targeted_advertising(&self) -> bool {
        self.targeted_advertising_opt_out == Some(OPTED_OUT)
    }

    fn read_field(&mut self, r: &mut BitReader, field: UsField) -> Result<(), DecodeError> {
        let name = field.spec_name();
        match field {
            SensitiveDataProcessing(n) => self.sensitive_data_processing = read_list(r, n, name)?,
            KnownChildSensitiveDataConsents(n) => {
                self.known_child_sensitive_data_consents =
                    KnownChildConsents::PerCategory(read_list(r, n, name)?);
            }
            _ => {
                let value = r.read_u8(2, name)?;
                match field {
                    SharingNotice => self.sharing_notice = Some(value),
                    ProcessingNotice => self.processing_notice = Some(value),
                    SaleOptOutNotice => self.sale_opt_out_notice = Some(value),
                    SharingOptOutNotice => self.sharing_opt_out_notice = Some(value),
                    TargetedAdvertisingOptOutNotice => {
                        self.targeted_advertising_opt_out_notice = Some(value);
                    }
                    SensitiveDataProcessingOptOutNotice => {
                        self.sensitive_data_processing_opt_out_notice = Some(value);
                    }
                    SensitiveDataOptOutNotice => self.sensitive_data_opt_out_notice = Some(value),
                    SensitiveDataLimitUseNotice => {
                        self.sensitive_data_limit_use_notice = Some(value);
                    }
                    SaleOptOut => self.sale_opt_out = Some(value),
                    SharingOptOut => self.sharing_opt_out = Some(value),
                    TargetedAdvertisingOptOut => self.targeted_advertising_opt_out = Some(value),
                    KnownChildSensitiveDataConsent => {
                        self.known_child_sensitive_data_consents =
                            KnownChildConsents::Single(value);
                    }
                    PersonalDataConsents => self.personal_data_consents = Some(value),
                    AdditionalDataProcessingConsent => {
                        self.additional_data_processing_consent = Some(value);
                    }
                    MspaCoveredTransaction => self.mspa_covered_transaction = value,
                    MspaOptOutOptionMode => self.mspa_opt_out_option_mode = value,
                    MspaServiceProviderMode => self.mspa_service_provider_mode = value,
                    SensitiveDataProcessing(_) | KnownChildSensitiveDataConsents(_) => {}
                }
            }
        }
        Ok(())
    }
}

fn read_list(r: &mut BitReader, count: u8, field: &'static str) -> Result<Vec<u8>, DecodeError> {
    (0..count).map(|_| r.read_u8(2, field)).collect()
}

/// The first layout whose length fits the bits present; when none does, the
/// shortest, so that the error names the field that is cut off.
fn choose_layout(layouts: &[&'static [UsField]], available: usize) -> &'static [UsField] {
    layouts
        .iter()
        .copied()
        .find(|layout| layout_bits(layout) <= available)
        .or_else(|| layouts.last().copied())
        .unwrap_or(&[])
}

/// Decodes a US section: the core subsection, then any `.`-separated
/// subsections.
///
/// The GPC subsection is read wherever it appears: GPP defines it as a
/// reusable subsection, and a section whose spec does not list it gains
/// nothing from rejecting it. Subsection types other than GPC are skipped
/// for forward compatibility.
pub(crate) fn decode_us_section(
    info: &SectionInfo,
    layouts: &[&'static [UsField]],
    text: &str,
    offset: usize,
) -> Result<UsSection, DecodeError> {
    let mut subsections = split_with_offsets(text, '.', offset);
    let (core, core_offset) = subsections.next().unwrap_or((text, offset));
    if core.is_empty() {
        return Err(DecodeError::Empty {
            what: "US section core",
        });
    }
    let mut r = BitReader::from_base64url(core, core_offset)?;
    let layout = choose_layout(layouts, r.remaining());
    let mut section = UsSection::new(info, r.read_u8(6, "Version")?);
    for &field in layout {
        section.read_field(&mut r, field)?;
    }

    for (text, offset) in subsections {
        if text.is_empty() {
            return Err(DecodeError::Empty {
                what: "GPP subsection",
            });
        }
        let mut r = BitReader::from_base64url(text, offset)?;
        if r.read_u8(2, "SubsectionType")? == GPC_SUBSECTION {
            section.gpc = Some(r.read_bool("Gpc")?);
        }
    }
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_indexed_by_id() {
        for (index, info) in REGISTRY.iter().enumerate() {
            assert_eq!(usize::from(info.id), index + 1, "{}", info.name);
            assert_eq!(lookup(info.id).map(|i| i.id), Some(info.id));
        }
        assert!(lookup(0).is_none());
        assert!(lookup(MAX_KNOWN_SECTION_ID + 1).is_none());
    }

    /// Every US layout must carry the fields `UsSection` treats as always
    /// present, exactly once, and no field twice.
    #[test]
    fn us_layouts_are_complete() {
        for info in &REGISTRY {
            let SectionDecoder::Us(layouts) = info.decoder else {
                continue;
            };
            for layout in layouts {
                let count =
                    |wanted: fn(&UsField) -> bool| layout.iter().filter(|f| wanted(f)).count();
                assert_eq!(
                    count(|f| matches!(f, SensitiveDataProcessing(_))),
                    1,
                    "{}",
                    info.name
                );
                assert_eq!(
                    count(|f| matches!(
                        f,
                        KnownChildSensitiveDataConsents(_) | KnownChildSensitiveDataConsent
                    )),
                    1,
                    "{}",
                    info.name
                );
                for mspa in [
                    MspaCoveredTransaction,
                    MspaOptOutOptionMode,
                    MspaServiceProviderMode,
                ] {
                    assert_eq!(
                        layout.iter().filter(|&&f| f == mspa).count(),
                        1,
                        "{}",
                        info.name
                    );
                }
                for (i, field) in layout.iter().enumerate() {
                    assert!(
                        !layout[i + 1..].contains(field),
                        "{}: {field:?} twice",
                        info.name
                    );
                }
            }
        }
    }

    #[test]
    fn usnat_layouts_differ_in_length() {
        assert_eq!(layout_bits(USNAT_CURRENT), 70);
        assert_eq!(layout_bits(USNAT_LEGACY), 60);
        assert_eq!(choose_layout(USNAT_LAYOUTS, 72), USNAT_CURRENT);
        assert_eq!(choose_layout(USNAT_LAYOUTS, 66), USNAT_LEGACY);
        assert_eq!(choose_layout(USNAT_LAYOUTS, 60), USNAT_LEGACY);
        assert_eq!(choose_layout(USNAT_LAYOUTS, 12), USNAT_LEGACY);
    }
}
