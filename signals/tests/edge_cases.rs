//! Hand-picked edge cases: malformed strings must fail with the right error,
//! odd but valid ones must decode.

mod common;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use common::{
    BitWriter, Padding, TcModel, USNAT_CURRENT, USNAT_LEGACY, VendorSet, gpp_header,
    us_expected_json, us_section, value_count,
};
use madtech_signals::{
    DecodeError, GppSection, KnownChildConsents, Signal, SignalKind, Tcf22Problem, decode,
    decode_gpp, decode_tcf, decode_usp,
};

/// From the published vectors (tests/vectors/signals.json).
const T1: &str = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA";
const T2: &str = "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA.IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA";
const T4: &str = "COv__-wOv__-wC2AAAENAPCgAAAAAAAAAAAAA_wAQA_gEBABAEAAAA";
const G2: &str = "DBACNY~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA~1YNN";
const G6: &str = "DBABLA~BVVVkkkkkpFY.YA";

fn ids<const N: usize>(ids: [u16; N]) -> BTreeSet<u16> {
    BTreeSet::from(ids)
}

fn vendors(ids: BTreeSet<u16>, as_ranges: bool) -> VendorSet {
    VendorSet {
        ids,
        as_ranges,
        repeat_entries: false,
    }
}

fn header(ids: &[u16]) -> String {
    gpp_header(&ids.iter().copied().collect(), Padding::Sextet)
}

// ---- truncation ----------------------------------------------------------

/// Every prefix of a TC string either fails or, if the cut removed only
/// padding or whole trailing segments, decodes to the same segments.
#[test]
fn truncated_tc_strings_fail_or_decode_consistently() {
    for full in [T1, T2, T4] {
        let expected = decode_tcf(full).expect("vector decodes");
        for end in 0..full.len() {
            let prefix = &full[..end];
            let Ok(tc) = decode_tcf(prefix) else { continue };
            let mut core = tc.clone();
            let mut full_core = expected.clone();
            for t in [&mut core, &mut full_core] {
                (t.disclosed_vendors, t.allowed_vendors, t.publisher_tc) = (None, None, None);
            }
            assert_eq!(core, full_core, "prefix {prefix:?}");
            if tc.disclosed_vendors.is_some() {
                assert_eq!(
                    tc.disclosed_vendors, expected.disclosed_vendors,
                    "{prefix:?}"
                );
            }
            assert!(tc.allowed_vendors.is_none() || tc.allowed_vendors == expected.allowed_vendors);
        }
    }
    // T1's core needs all 44 characters: no strict prefix decodes.
    assert!((0..T1.len()).all(|end| decode_tcf(&T1[..end]).is_err()));
}

#[test]
fn truncated_gpp_and_usp_strings_never_panic() {
    for full in [G2, G6, "DBABBg~BVWSSSVY.YA", "DBABTA~1YNN", "1YNN"] {
        let expected = decode(full, None).expect("vector decodes");
        for end in 0..full.len() {
            let prefix = &full[..end];
            match (decode(prefix, None), &expected) {
                (Ok(Signal::Gpp(gpp)), Signal::Gpp(full_gpp)) => {
                    assert_eq!(gpp.section_ids, full_gpp.section_ids, "{prefix:?}");
                }
                (Ok(signal), _) => panic!("{prefix:?} decoded as {signal:?}"),
                (Err(_), _) => {}
            }
        }
    }
}

#[test]
fn truncation_names_the_field() {
    assert_eq!(
        decode_tcf("COtybn4PA_zT4KjACBEN"),
        Err(DecodeError::Truncated {
            field: "VendorListVersion",
            needed: 12,
            available: 0
        })
    );
}

// ---- TCF vendor sections -------------------------------------------------

/// The core up to PublisherCC (213 bits), ready for hand-written vendor
/// sections.
fn core_prefix() -> BitWriter {
    let w = TcModel::minimal().core_prefix_bits();
    assert_eq!(w.len(), 213);
    w
}

/// The core up to the vendor consent section's IsRangeEncoding = 1.
fn core_with_range_header(max_vendor_id: u64) -> BitWriter {
    let mut w = core_prefix();
    w.int(max_vendor_id, 16).bool(true);
    w
}

#[test]
fn bitfield_shorter_than_max_vendor_id_is_rejected() {
    let mut w = core_prefix();
    // Vendor consents: MaxVendorId 500 as a bitfield, but only 10 bits follow.
    w.int(500, 16).bool(false).int(0b1010, 10);
    let error = decode_tcf(&w.base64url(Padding::Byte)).expect_err("bitfield too short");
    assert!(
        matches!(
            error,
            DecodeError::BitfieldTooShort {
                field: "VendorConsents BitField",
                max_vendor_id: 500,
                ..
            }
        ),
        "{error}"
    );
}

fn empty_sections_after_consents(w: &mut BitWriter) {
    w.int(0, 16).bool(false); // vendor LI: MaxVendorId 0
    w.int(0, 12); // no publisher restrictions
}

#[test]
fn range_ending_before_its_start_is_rejected() {
    let mut w = core_with_range_header(100);
    w.int(1, 12).bool(true).int(50, 16).int(40, 16);
    empty_sections_after_consents(&mut w);
    assert_eq!(
        decode_tcf(&w.base64url(Padding::Byte)),
        Err(DecodeError::InvalidRange {
            field: "VendorConsents EndVendorId",
            start: 50,
            end: 40
        })
    );
}

#[test]
fn vendor_ids_outside_max_vendor_id_are_rejected() {
    for bad in [0u64, 101] {
        let mut w = core_with_range_header(100);
        w.int(1, 12).bool(false).int(bad, 16);
        empty_sections_after_consents(&mut w);
        let error = decode_tcf(&w.base64url(Padding::Byte)).expect_err("out of range");
        assert!(
            matches!(
                error,
                DecodeError::VendorIdOutOfRange {
                    max_vendor_id: 100,
                    ..
                }
            ),
            "{bad}: {error}"
        );
    }
}

#[test]
fn repeated_and_overlapping_vendor_ids_are_deduplicated() {
    let mut w = core_with_range_header(40);
    let entries: [(u64, u64); 5] = [(30, 40), (5, 5), (1, 10), (5, 5), (35, 36)];
    w.int(entries.len() as u64, 12);
    for (start, end) in entries {
        w.bool(start != end).int(start, 16);
        if start != end {
            w.int(end, 16);
        }
    }
    empty_sections_after_consents(&mut w);
    let tc = decode_tcf(&w.base64url(Padding::Byte)).expect("valid");
    let expected: Vec<u16> = (1..=10).chain(30..=40).collect();
    assert_eq!(tc.vendor_consents, expected);
}

#[test]
fn huge_ranges_stay_bounded() {
    // 4095 entries each covering 1..=65535: the decoder must not expand
    // 268 million ids.
    let mut w = core_with_range_header(65535);
    w.int(4095, 12);
    for _ in 0..4095 {
        w.bool(true).int(1, 16).int(65535, 16);
    }
    empty_sections_after_consents(&mut w);
    let tc = decode_tcf(&w.base64url(Padding::Byte)).expect("valid");
    assert_eq!(tc.vendor_consents.len(), 65535);
}

#[test]
fn range_and_bitfield_encodings_agree() {
    let set: BTreeSet<u16> = (1..=30).chain([77, 78, 500]).collect();
    let mut as_bits = TcModel::minimal();
    as_bits.vendor_consents = vendors(set.clone(), false);
    let mut as_ranges = as_bits.clone();
    as_ranges.vendor_consents = vendors(set.clone(), true);
    let bits = decode_tcf(&as_bits.encode()).expect("valid");
    let ranges = decode_tcf(&as_ranges.encode()).expect("valid");
    assert_eq!(bits, ranges);
    assert_eq!(bits.vendor_consents, set.into_iter().collect::<Vec<_>>());
    assert!(bits.has_vendor_consent(77) && !bits.has_vendor_consent(76));
}

#[test]
fn publisher_restrictions_decode() {
    let mut model = TcModel::minimal();
    model.publisher_restrictions = vec![(2, 1, ids([8, 9, 10, 52])), (7, 0, ids([4]))];
    let tc = decode_tcf(&model.encode()).expect("valid");
    assert_eq!(tc.publisher_restrictions.len(), 2);
    assert_eq!(tc.publisher_restrictions[0].vendors, vec![8, 9, 10, 52]);
    assert_eq!(
        tc.publisher_restrictions[1].kind(),
        madtech_signals::RestrictionKind::NotAllowed
    );
}

// ---- TCF segments, characters and versions ------------------------------

#[test]
fn characters_outside_base64url_are_rejected_with_their_position() {
    let mut bad = T1.to_owned();
    bad.replace_range(15..16, "*");
    assert_eq!(
        decode_tcf(&bad),
        Err(DecodeError::InvalidCharacter {
            position: 15,
            character: '*'
        })
    );
    // Standard base64's `+` and `/` are not base64url; positions count
    // from the start of the whole string, across segments.
    let segment_start = T2.find('.').expect("segments") + 1;
    let with_plus = format!("{}+{}", &T2[..segment_start], &T2[segment_start + 1..]);
    assert_eq!(
        decode_tcf(&with_plus),
        Err(DecodeError::InvalidCharacter {
            position: segment_start,
            character: '+'
        })
    );
    assert!(matches!(
        decode_tcf(&format!("{T1} ")),
        Err(DecodeError::InvalidCharacter { position: 44, .. })
    ));
}

#[test]
fn base64_padding_is_accepted_only_at_the_end() {
    let plain = decode_tcf(T1).expect("valid");
    assert_eq!(decode_tcf(&format!("{T1}==")).as_ref(), Ok(&plain));
    assert_eq!(decode_tcf(&format!("{T1}=")).as_ref(), Ok(&plain));
    let (core, rest) = T2.split_once('.').expect("segments");
    assert_eq!(decode_tcf(&format!("{core}=.{rest}")), decode_tcf(T2));
    assert!(matches!(
        decode_tcf(&format!("{}={}", &T1[..20], &T1[20..])),
        Err(DecodeError::InvalidCharacter {
            position: 20,
            character: '='
        })
    ));
}

#[test]
fn tc_string_versions_other_than_2_are_rejected() {
    // A TCF v1 consent string (version 1).
    assert_eq!(
        decode_tcf("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA"),
        Err(DecodeError::UnsupportedVersion {
            signal: "TCF",
            found: 1,
            expected: 2
        })
    );
}

#[test]
fn unknown_and_repeated_segments_are_rejected() {
    let (core, _) = T2.split_once('.').expect("segments");
    let disclosed = T2.split('.').nth(1).expect("disclosed segment");
    assert!(matches!(
        decode_tcf(&format!("{core}.{disclosed}.{disclosed}")),
        Err(DecodeError::InvalidSegment {
            segment_type: 1,
            ..
        })
    ));
    // SegmentType 4 ("g" = 100000).
    assert!(matches!(
        decode_tcf(&format!("{core}.gAAA")),
        Err(DecodeError::InvalidSegment {
            segment_type: 4,
            ..
        })
    ));
    assert!(matches!(
        decode_tcf(&format!("{core}.")),
        Err(DecodeError::Empty { .. })
    ));
}

#[test]
fn allowed_vendors_and_publisher_tc_decode() {
    let tc = decode_tcf(T2).expect("valid");
    assert!(tc.allowed_vendors.is_some());
    let mut model = TcModel::minimal();
    model.publisher_tc = Some(common::PublisherModel {
        purpose_consents: BTreeSet::from([1, 10]),
        purpose_legitimate_interests: BTreeSet::from([2]),
        num_custom_purposes: 3,
        custom_purpose_consents: BTreeSet::from([1, 3]),
        custom_purpose_legitimate_interests: BTreeSet::new(),
    });
    let tc = decode_tcf(&model.encode()).expect("valid");
    let json = serde_json::to_value(&tc).expect("serializes");
    assert_eq!(
        json["publisher_tc"]["custom_purpose_consents"],
        serde_json::json!([1, 3])
    );
    assert_eq!(json["publisher_tc"]["num_custom_purposes"], 3);
}

#[test]
fn deciseconds_are_kept() {
    let tc = decode_tcf(T4).expect("valid");
    let expected: DateTime<Utc> = "2020-03-09T15:53:02.400Z".parse().expect("timestamp");
    assert_eq!(tc.created, expected);
    let json = serde_json::to_value(&tc).expect("serializes");
    assert_eq!(json["created"], "2020-03-09T15:53:02.400Z");
    assert_eq!(json["last_updated"], "2020-03-09T15:53:02.400Z");
}

// ---- TCF 2.2 -------------------------------------------------------------

#[test]
fn tcf22_rules_are_reported_not_enforced() {
    // T1: policy version 2, global scope; LI for purposes 2 and 9 only.
    let tc = decode_tcf(T1).expect("older strings still decode");
    assert_eq!(
        tc.validate_tcf22(),
        Err(vec![
            Tcf22Problem::PolicyVersionTooOld {
                tcf_policy_version: 2
            },
            Tcf22Problem::NotServiceSpecific,
        ])
    );
    let json = serde_json::to_value(&tc).expect("serializes");
    assert_eq!(json["problems"].as_array().map(Vec::len), Some(2));

    let valid = decode_tcf(&TcModel::minimal().encode()).expect("valid");
    assert_eq!(valid.validate_tcf22(), Ok(()));
    assert_eq!(
        serde_json::to_value(&valid).expect("serializes")["problems"],
        serde_json::json!([])
    );

    let mut li = TcModel::minimal();
    li.purpose_legitimate_interests = BTreeSet::from([2, 3, 6, 7]);
    let tc = decode_tcf(&li.encode()).expect("valid");
    assert_eq!(
        tc.validate_tcf22(),
        Err(vec![
            Tcf22Problem::LegitimateInterestNotAllowed {
                purpose: 3,
                publisher: false
            },
            Tcf22Problem::LegitimateInterestNotAllowed {
                purpose: 6,
                publisher: false
            },
        ])
    );
}

// ---- GPP -----------------------------------------------------------------

#[test]
fn both_gpp_padding_styles_decode() {
    for text in ["DBABM", "DBABMA"] {
        assert_eq!(
            decode_gpp(text).map(|g| g.section_ids),
            Ok(vec![2]),
            "{text}"
        );
    }
    let values = vec![1u8; value_count(USNAT_CURRENT)];
    let sextet = us_section(1, &values, Some(false), Padding::Sextet);
    let byte = us_section(1, &values, Some(false), Padding::Byte);
    assert_ne!(sextet, byte);
    let a = decode_gpp(&format!("DBABLA~{sextet}")).expect("valid");
    let b = decode_gpp(&format!("DBABL~{byte}")).expect("valid");
    assert_eq!(a, b);
}

#[test]
fn usnat_layout_is_chosen_by_length() {
    let legacy_values: Vec<u8> = (0..value_count(USNAT_LEGACY))
        .map(|i| (i % 3) as u8)
        .collect();
    for padding in [Padding::Sextet, Padding::Byte] {
        let text = format!(
            "{}~{}",
            header(&[7]),
            us_section(1, &legacy_values, None, padding)
        );
        let gpp = decode_gpp(&text).expect("legacy usnat");
        let Some(GppSection::Us(usnat)) = gpp.section("usnat") else {
            panic!("no usnat in {text}");
        };
        assert_eq!(usnat.sensitive_data_processing.len(), 12);
        assert_eq!(usnat.known_child_sensitive_data_consents.values().len(), 2);
        assert_eq!(
            serde_json::to_value(usnat).expect("serializes"),
            us_expected_json(USNAT_LEGACY, 1, &legacy_values, None)
        );
    }
    // The same Version with the current layout's 70 bits.
    let current_values = vec![2u8; value_count(USNAT_CURRENT)];
    let text = format!(
        "DBABLA~{}",
        us_section(1, &current_values, None, Padding::Byte)
    );
    let gpp = decode_gpp(&text).expect("current usnat");
    let usnat = gpp.us_sections().next().expect("usnat");
    assert_eq!(usnat.sensitive_data_processing.len(), 16);
    assert_eq!(
        usnat.known_child_sensitive_data_consents,
        KnownChildConsents::PerCategory(vec![2, 2, 2])
    );
    assert!(usnat.gpc.is_none());
    assert!(
        serde_json::to_value(usnat)
            .expect("serializes")
            .get("gpc")
            .is_none()
    );
}

#[test]
fn truncated_us_sections_name_the_field() {
    // 40 bits: shorter than either usnat layout.
    let error = decode_gpp("DBABLA~BVVVkkk").expect_err("truncated");
    assert!(
        matches!(
            error.root_cause(),
            DecodeError::Truncated {
                field: "SensitiveDataProcessing",
                ..
            }
        ),
        "{error}"
    );
    assert!(matches!(
        error,
        DecodeError::InSection {
            id: 7,
            name: "usnat",
            ..
        }
    ));
}

#[test]
fn unknown_section_ids_are_rejected() {
    let text = header(&[28]);
    assert_eq!(
        decode_gpp(&text),
        Err(DecodeError::UnknownSection { id: 28 })
    );
    // A range running past the registry is rejected before it is expanded.
    let mut w = BitWriter::new();
    w.int(3, 6)
        .int(1, 6)
        .int(1, 12)
        .bool(true)
        .fibonacci(2)
        .fibonacci(1 << 40);
    assert!(matches!(
        decode_gpp(&w.base64url(Padding::Sextet)),
        Err(DecodeError::UnknownSection { .. })
    ));
}

#[test]
fn section_count_must_match_the_header() {
    assert_eq!(
        decode_gpp("DBACNY~1YNN"),
        Err(DecodeError::SectionCountMismatch {
            declared: 2,
            found: 1
        })
    );
    assert_eq!(
        decode_gpp("DBABTA~1YNN~1YNN"),
        Err(DecodeError::SectionCountMismatch {
            declared: 1,
            found: 2
        })
    );
    // A header alone (the spec's first example) lists ids without sections.
    let header_only = decode_gpp("DBACNY").expect("header only");
    assert_eq!(header_only.section_ids, vec![2, 6]);
    assert!(header_only.sections.is_empty());
}

#[test]
fn gpp_header_type_and_version_are_checked() {
    assert_eq!(decode_gpp(T1), Err(DecodeError::NotGppHeader { found: 2 }));
    assert!(matches!(
        decode_gpp("DCABM"),
        Err(DecodeError::UnsupportedVersion {
            signal: "GPP",
            found: 2,
            ..
        })
    ));
}

#[test]
fn errors_inside_sections_say_which_section_and_where() {
    let bad = G2.replace("~1YNN", "~1YXN");
    let error = decode_gpp(&bad).expect_err("bad uspv1");
    assert_eq!(
        error,
        DecodeError::InSection {
            id: 6,
            name: "uspv1",
            source: Box::new(DecodeError::InvalidUspCharacter {
                position: bad.len() - 2,
                character: 'X'
            })
        }
    );
    let bad_tcf = G2.replacen('P', "*", 1);
    let error = decode_gpp(&bad_tcf).expect_err("bad tcfeuv2");
    assert_eq!(
        error.root_cause(),
        &DecodeError::InvalidCharacter {
            position: 8,
            character: '*'
        }
    );
    assert!(matches!(
        decode_gpp("DBABTA~"),
        Err(DecodeError::InSection { .. })
    ));
}

#[test]
fn registered_sections_without_a_decoder_are_kept_raw() {
    let gpp = decode_gpp(&format!("{}~opaque.text~1---", header(&[5, 6]))).expect("valid");
    let json = serde_json::to_value(&gpp).expect("serializes");
    assert_eq!(json["tcfcav1"], serde_json::json!({"raw": "opaque.text"}));
    assert_eq!(json["uspv1"]["notice"], "-");
    assert_eq!(json["section_ids"], serde_json::json!([5, 6]));
}

#[test]
fn gpc_subsection_is_read_and_unknown_subsections_skipped() {
    let core = us_section(
        1,
        &vec![0u8; value_count(USNAT_CURRENT)],
        None,
        Padding::Sextet,
    );
    let with_false = decode_gpp(&format!("DBABLA~{core}.QA")).expect("valid"); // 01 0
    assert_eq!(
        with_false.us_sections().next().and_then(|s| s.gpc),
        Some(false)
    );
    let unknown = decode_gpp(&format!("DBABLA~{core}.wA")).expect("valid"); // type 3
    assert_eq!(unknown.us_sections().next().and_then(|s| s.gpc), None);
    assert!(matches!(
        decode_gpp(&format!("DBABLA~{core}.")),
        Err(DecodeError::InSection { .. })
    ));
}

#[test]
fn single_value_known_child_field_serializes_as_a_number() {
    // usva (9): version, 5 notices/opt-outs, 8 sensitive, 1 known child, 3 MSPA.
    let values = [1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 1];
    let text = format!(
        "{}~{}",
        header(&[9]),
        us_section(1, &values, None, Padding::Sextet)
    );
    let gpp = decode_gpp(&text).expect("valid");
    let json = serde_json::to_value(&gpp).expect("serializes");
    assert_eq!(json["usva"]["known_child_sensitive_data_consents"], 2);
    assert_eq!(json["usva"]["mspa_service_provider_mode"], 1);
    let usva = gpp.us_sections().next().expect("usva");
    assert!(!usva.opted_out_of_sale());
}

// ---- US Privacy, detection and kinds ------------------------------------

#[test]
fn us_privacy_strings_are_strict_about_shape() {
    for bad in ["", "1YN", "1YNNN", "1YN?", "2YNN", "aYNN", "1 NN", "1YNé"] {
        assert!(decode_usp(bad).is_err(), "{bad:?}");
    }
    assert!(decode_usp("1ynn").is_ok());
}

#[test]
fn kinds_are_detected_from_the_shape() {
    let kind = |input: &str| decode(input, None).map(|signal| signal.kind());
    assert_eq!(kind("1YNN"), Ok(SignalKind::Usp));
    assert_eq!(kind("1---"), Ok(SignalKind::Usp));
    assert_eq!(kind("DBABM"), Ok(SignalKind::Gpp));
    assert_eq!(kind(G2), Ok(SignalKind::Gpp));
    assert_eq!(kind(T2), Ok(SignalKind::Tcf));
    assert_eq!(madtech_signals::detect("x~y"), SignalKind::Gpp);
    assert_eq!(madtech_signals::detect("2YNN"), SignalKind::Usp);
    assert!(matches!(decode("", None), Err(DecodeError::Empty { .. })));
    // An explicit kind is obeyed even when the shape says otherwise.
    assert!(decode("1YNN", Some(SignalKind::Tcf)).is_err());
}

#[test]
fn signal_json_carries_its_kind() {
    let json = serde_json::to_value(decode("1YNN", None).expect("valid")).expect("serializes");
    assert_eq!(
        json,
        serde_json::json!({"kind": "usp", "version": 1, "notice": "Y", "opt_out_sale": "N", "lspa_covered": "N"})
    );
    let json = serde_json::to_value(decode(G2, None).expect("valid")).expect("serializes");
    assert_eq!(json["kind"], "gpp");
    assert_eq!(json["tcfeuv2"]["cmp_id"], 31);
}

#[test]
fn signal_kinds_parse() {
    for (name, kind) in [
        ("tcf", SignalKind::Tcf),
        ("TCF", SignalKind::Tcf),
        ("tcfeuv2", SignalKind::Tcf),
        ("gpp", SignalKind::Gpp),
        ("usp", SignalKind::Usp),
        ("uspv1", SignalKind::Usp),
    ] {
        assert_eq!(name.parse::<SignalKind>(), Ok(kind), "{name}");
        assert_eq!(kind.as_str().parse::<SignalKind>(), Ok(kind));
    }
    assert!("tcf1".parse::<SignalKind>().is_err());
}
