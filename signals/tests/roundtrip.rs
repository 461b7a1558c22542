//! Property tests: random models are encoded by the test encoder
//! (tests/common) and must decode back to themselves; arbitrary text must
//! never make a decoder panic.

mod common;

use std::collections::BTreeSet;

use common::{
    BitWriter, Padding, PublisherModel, TcModel, USCA, USDE, USIA, USNAT_CURRENT, USNAT_LEGACY,
    USUT, UsLayout, VendorSet, gpp_header, us_expected_json, us_section, value_count,
};
use madtech_signals::{
    GppSection, SignalKind, UspFlag, decode, decode_gpp, decode_tcf, decode_usp,
};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::select;

fn padding() -> impl Strategy<Value = Padding> {
    prop_oneof![Just(Padding::Sextet), Just(Padding::Byte)]
}

fn ids(range: std::ops::RangeInclusive<u8>) -> impl Strategy<Value = BTreeSet<u8>> {
    btree_set(range, 0..8)
}

fn vendor_set(max_id: u16) -> impl Strategy<Value = VendorSet> {
    (
        prop_oneof![
            btree_set(1..=max_id, 0..40),
            // Long runs, where range encoding pays off.
            (1..=max_id, 0..300u16).prop_map(move |(start, len)| {
                (start..=start.saturating_add(len).min(max_id)).collect()
            }),
        ],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(ids, as_ranges, repeat_entries)| VendorSet {
            ids,
            as_ranges,
            repeat_entries,
        })
}

fn publisher_model() -> impl Strategy<Value = PublisherModel> {
    (ids(1..=24), ids(1..=24), 0..64u8).prop_flat_map(|(consents, li, custom)| {
        let custom_ids = move || btree_set(1..=custom.max(1), 0..=usize::from(custom.min(8)));
        (custom_ids(), custom_ids()).prop_map(move |(custom_consents, custom_li)| {
            // A custom purpose id can only exist below NumCustomPurposes.
            let keep = |set: BTreeSet<u8>| set.into_iter().filter(|&id| id <= custom).collect();
            PublisherModel {
                purpose_consents: consents.clone(),
                purpose_legitimate_interests: li.clone(),
                num_custom_purposes: custom,
                custom_purpose_consents: keep(custom_consents),
                custom_purpose_legitimate_interests: keep(custom_li),
            }
        })
    })
}

prop_compose! {
    fn core_fields()(
        created in 0..(1u64 << 36),
        updated in 0..(1u64 << 36),
        cmp in (0..4096u16, 0..4096u16, 0..64u8),
        language in [0..26u8, 0..26u8],
        vendor_list_version in 0..4096u16,
        policy in 0..64u8,
        flags in [any::<bool>(), any::<bool>(), any::<bool>()],
        purposes in (ids(1..=12), ids(1..=24), ids(1..=24)),
        country in [0..26u8, 0..26u8],
    ) -> TcModel {
        let mut model = TcModel::minimal();
        model.created_deciseconds = created;
        model.last_updated_deciseconds = updated;
        (model.cmp_id, model.cmp_version, model.consent_screen) = cmp;
        model.consent_language = language;
        model.vendor_list_version = vendor_list_version;
        model.tcf_policy_version = policy;
        [model.is_service_specific, model.use_non_standard_texts, model.purpose_one_treatment] = flags;
        (model.special_feature_optins, model.purpose_consents, model.purpose_legitimate_interests) =
            purposes;
        model.publisher_cc = country;
        model
    }
}

prop_compose! {
    fn tc_model()(
        mut model in core_fields(),
        vendors in (vendor_set(2000), vendor_set(700)),
        restrictions in vec((0..64u8, 0..4u8, btree_set(1..=900u16, 1..20)), 0..4),
        optional in (
            proptest::option::of(vendor_set(1200)),
            proptest::option::of(vendor_set(50)),
            proptest::option::of(publisher_model()),
        ),
        padding in padding(),
    ) -> TcModel {
        (model.vendor_consents, model.vendor_legitimate_interests) = vendors;
        model.publisher_restrictions = restrictions;
        (model.disclosed_vendors, model.allowed_vendors, model.publisher_tc) = optional;
        model.padding = padding;
        model
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tc_strings_round_trip(model in tc_model()) {
        let encoded = model.encode();
        let decoded = decode_tcf(&encoded);
        prop_assert_eq!(decoded, Ok(model.expected()), "{}", encoded);
    }

    #[test]
    fn tc_strings_round_trip_inside_gpp(model in tc_model(), padding in padding()) {
        let encoded = format!("{}~{}", gpp_header(&BTreeSet::from([2]), padding), model.encode());
        let gpp = decode_gpp(&encoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(gpp.tcf(), Some(&model.expected()));
    }

    #[test]
    fn us_privacy_strings_round_trip(
        flags in vec(select(vec!['Y', 'N', '-', 'y', 'n']), 3),
    ) {
        let text: String = std::iter::once('1').chain(flags).collect();
        let usp = decode_usp(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let written: String = [usp.notice, usp.opt_out_sale, usp.lspa_covered]
            .iter()
            .map(|flag| flag.as_str())
            .collect();
        prop_assert_eq!(usp.version, 1);
        prop_assert_eq!(written, text[1..].to_uppercase());
        prop_assert_eq!(usp.opted_out_of_sale(), usp.opt_out_sale == UspFlag::Yes);
    }

    #[test]
    fn us_sections_round_trip(
        (id, layout, version, values) in us_layout().prop_flat_map(|(id, layout)| {
            (Just(id), Just(layout), 0..64u8, vec(0..4u8, value_count(layout)))
        }),
        gpc in proptest::option::of(any::<bool>()),
        padding in padding(),
    ) {
        let text = format!(
            "{}~{}",
            gpp_header(&BTreeSet::from([id]), padding),
            us_section(version, &values, gpc, padding)
        );
        let gpp = decode_gpp(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        let Some(GppSection::Us(section)) = gpp.sections.first() else {
            return Err(TestCaseError::fail(format!("{text}: no US section")));
        };
        prop_assert_eq!(section.id, id);
        let json = serde_json::to_value(section).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(json, us_expected_json(layout, version, &values, gpc), "{}", text);
    }

    #[test]
    fn gpp_headers_round_trip(
        ids in btree_set(select(vec![2u16, 6, 7, 8, 9, 10, 11, 12, 13, 17, 18, 22, 23, 27]), 1..10),
        padding in padding(),
    ) {
        let header = gpp_header(&ids, padding);
        let gpp = decode_gpp(&header).map_err(|e| TestCaseError::fail(format!("{header}: {e}")))?;
        prop_assert_eq!(gpp.section_ids, ids.into_iter().collect::<Vec<_>>());
        prop_assert!(gpp.sections.is_empty());
    }

    #[test]
    fn fibonacci_coded_ids_round_trip(value in 1..u64::MAX / 2) {
        // A header with NumberOfRanges 1 and a single id of `value`: every
        // such id but the registered ones must be rejected as unknown.
        let mut w = BitWriter::new();
        w.int(3, 6).int(1, 6).int(1, 12).bool(false).fibonacci(value);
        let result = decode_gpp(&w.base64url(Padding::Sextet));
        if value <= 27 {
            prop_assert_eq!(result.map(|gpp| gpp.section_ids), Ok(vec![value as u16]));
        } else {
            let rejected = matches!(
                result,
                Err(madtech_signals::DecodeError::UnknownSection { id }) if id == value
            );
            prop_assert!(rejected, "{:?}", result);
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        for kind in [None, Some(SignalKind::Tcf), Some(SignalKind::Gpp), Some(SignalKind::Usp)] {
            let _ = decode(&text, kind);
        }
    }

    #[test]
    fn arbitrary_base64url_never_panics(
        text in "[CD]?[A-Za-z0-9_=-]{0,12}([.~][A-Za-z0-9_=-]{0,80}){0,4}",
    ) {
        let _ = decode_tcf(&text);
        let _ = decode_gpp(&text);
        let _ = decode_usp(&text);
    }

    #[test]
    fn valid_headers_with_random_sections_never_panic(
        ids in btree_set(1..=27u16, 1..6),
        sections in vec("[A-Za-z0-9_-]{0,40}(\\.[A-Za-z0-9_-]{0,6})?", 0..7),
    ) {
        let text = std::iter::once(gpp_header(&ids, Padding::Sextet))
            .chain(sections)
            .collect::<Vec<_>>()
            .join("~");
        let _ = decode_gpp(&text);
    }

    #[test]
    fn tc_strings_with_flipped_bits_never_panic(model in tc_model(), flips in vec(any::<usize>(), 1..4)) {
        let mut bytes = model.encode().into_bytes();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for flip in flips {
            let index = flip % bytes.len();
            if bytes[index] != b'.' {
                bytes[index] = alphabet[(flip / bytes.len()) % 64];
            }
        }
        let _ = decode_tcf(&String::from_utf8(bytes).expect("ASCII"));
    }
}

fn us_layout() -> impl Strategy<Value = (u16, UsLayout)> {
    select(vec![
        (7u16, USNAT_CURRENT),
        (7, USNAT_LEGACY),
        (8, USCA),
        (11, USUT),
        (17, USDE),
        (18, USIA),
    ])
}
