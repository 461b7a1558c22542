use std::collections::BTreeSet;

use super::*;
use crate::ledger::State;
use crate::rules::tests::shipped;

// The signals crate's test encoder: these tests write TC strings from models
// rather than carry opaque ones.
#[path = "../../../../signals/tests/common/mod.rs"]
#[allow(dead_code, clippy::all)]
mod encoder;

/// A TCF 2.2 string consenting to exactly `purposes`.
fn tc_string(purposes: &[u8]) -> String {
    tc_string_with_vendors(purposes, &[])
}

/// A TCF 2.2 string consenting to `purposes` and to `vendors`.
fn tc_string_with_vendors(purposes: &[u8], vendors: &[u16]) -> String {
    let mut model = encoder::TcModel::minimal();
    model.vendor_consents.ids = vendors.iter().copied().collect();
    model.purpose_consents = purposes.iter().copied().collect();
    model.purpose_legitimate_interests = BTreeSet::new();
    model.cmp_id = 300;
    model.cmp_version = 7;
    model.encode()
}

fn collection(region: &str, choices: &[(&str, Choice)], signals: Vec<SignalInput>) -> Collection {
    Collection {
        profile_id: "p".into(),
        identifier: None,
        choices: choices.iter().map(|(p, c)| (p.to_string(), *c)).collect(),
        legal_basis: LegalBasis::Consent,
        signals,
        source: Source::Cmp,
        region: region.into(),
        notice_version: "v1".into(),
        collected_at_micros: None,
        cmp: None,
        person_initiated: false,
    }
}

async fn planned(collection: Collection) -> Plan {
    plan(&shipped().await, collection, TcfValidity::Tcf22).expect("plans")
}

fn state_of<'a>(plan: &'a Plan, purpose: &str) -> &'a RecordedChoice {
    plan.record
        .choices
        .iter()
        .find(|c| c.purpose == purpose)
        .unwrap_or_else(|| panic!("no choice for {purpose}"))
}

#[tokio::test]
async fn a_tc_string_grants_the_purposes_whose_tcf_purposes_are_all_consented() {
    let raw = tc_string(&[1, 3, 4]);
    let plan = planned(collection("FR", &[], vec![SignalInput::Tcf(raw.clone())])).await;
    let targeting = state_of(&plan, "ad_targeting");
    assert_eq!(targeting.state, State::Granted);
    assert_eq!(targeting.legal_basis, LegalBasis::Consent);
    assert_eq!(targeting.derived_from, "tcf purposes 1,3,4 consented");
    assert_eq!(
        targeting.signal,
        Some(SignalEvidence {
            kind: "tcf".into(),
            raw
        }),
        "the raw string is kept as evidence"
    );
    let analytics = state_of(&plan, "analytics");
    assert_eq!(analytics.state, State::Denied);
    assert_eq!(analytics.derived_from, "tcf purposes 8,9 not consented");
    assert_eq!(
        plan.record.cmp,
        Some((300, 7)),
        "the CMP comes from the string"
    );
    assert!(
        plan.record
            .choices
            .iter()
            .all(|c| c.purpose != "email_marketing"),
        "TCF says nothing about email"
    );
}

#[tokio::test]
async fn pre_tcf22_strings_are_refused_unless_configured_and_malformed_ones_always() {
    let rules = shipped().await;
    // iabtcf-java's TCStringV2Test string: policy version 2, global scope.
    let old = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA";
    let err = plan(
        &rules,
        collection("FR", &[], vec![SignalInput::Tcf(old.into())]),
        TcfValidity::Tcf22,
    )
    .expect_err("older than 2.2");
    assert_eq!(err.field, "signals[0].tc_string");
    assert!(err.reason.contains("TCF 2.2"), "{}", err.reason);
    plan(
        &rules,
        collection("FR", &[], vec![SignalInput::Tcf(old.into())]),
        TcfValidity::AcceptOlder,
    )
    .expect("accepted when configured");

    let malformed = "COtybn4PA_zT4Kj*CBENAPCIAEBAAECAAIAAAAAAAAAA";
    for validity in [TcfValidity::Tcf22, TcfValidity::AcceptOlder] {
        let err = plan(
            &rules,
            collection(
                "FR",
                &[],
                vec![
                    SignalInput::Usp("1YNN".into()),
                    SignalInput::Tcf(malformed.into()),
                ],
            ),
            validity,
        )
        .expect_err("malformed");
        assert_eq!(err.field, "signals[1].tc_string");
    }
}

#[tokio::test]
async fn a_us_privacy_opt_out_denies_sale_and_sharing_on_the_opt_out_basis() {
    let plan = planned(collection(
        "US-CA",
        &[],
        vec![SignalInput::Usp("1NYN".into())],
    ))
    .await;
    for purpose in ["data_sale", "ad_targeting"] {
        let choice = state_of(&plan, purpose);
        assert_eq!(choice.state, State::Denied, "{purpose}");
        assert_eq!(choice.legal_basis, LegalBasis::OptOut);
        assert_eq!(choice.derived_from, "usp opt_out_sale=Y");
    }
    assert_eq!(plan.record.choices.len(), 2);

    let plan = planned(collection(
        "US-CA",
        &[],
        vec![SignalInput::Usp("1YNN".into())],
    ))
    .await;
    assert_eq!(
        state_of(&plan, "data_sale").state,
        State::Granted,
        "did not opt out"
    );

    let plan = planned(collection(
        "US-CA",
        &[],
        vec![SignalInput::Usp("1---".into())],
    ))
    .await;
    assert!(plan.record.choices.is_empty(), "CCPA does not apply");
    assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
}

#[tokio::test]
async fn a_gpp_state_section_opts_out_field_by_field_and_its_gpc_bit_counts() {
    // iabgpp-java UsCaTest: sale and sharing opted out, some sensitive
    // categories not consented, GPC set.
    let usca = "DBABBg~BVWSSSVY.YA";
    let plan = planned(collection(
        "US-CA",
        &[],
        vec![SignalInput::Gpp(usca.into())],
    ))
    .await;
    let sale = state_of(&plan, "data_sale");
    assert_eq!(sale.state, State::Denied);
    assert_eq!(sale.derived_from, "gpp usca.gpc", "GPC wins");
    assert_eq!(state_of(&plan, "ad_targeting").state, State::Denied);
    let sensitive = state_of(&plan, "sensitive_data");
    assert_eq!(sensitive.state, State::Denied);
    assert_eq!(
        sensitive.derived_from,
        "gpp usca.sensitive_data_processing=1"
    );

    // The GPP spec's example 2: a TCF section (no purposes consented) and
    // US Privacy "did not opt out".
    let spec = "DBACNY~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA~1YNN";
    let plan = super::plan(
        &shipped().await,
        collection("US-CA", &[], vec![SignalInput::Gpp(spec.into())]),
        TcfValidity::AcceptOlder,
    )
    .expect("plans");
    assert_eq!(state_of(&plan, "data_sale").state, State::Granted);
    let targeting = state_of(&plan, "ad_targeting");
    assert_eq!(targeting.state, State::Denied, "TCF purposes are missing");
    assert!(targeting.conflict.is_some(), "USP said yes: {targeting:?}");
    assert_eq!(plan.record.cmp, Some((31, 640)));
}

#[tokio::test]
async fn gpc_where_binding_wins_over_an_explicit_grant_and_records_the_conflict() {
    let plan = planned(collection(
        "US-CA",
        &[
            ("ad_targeting", Choice::Granted),
            ("analytics", Choice::Granted),
        ],
        vec![SignalInput::Gpc],
    ))
    .await;
    let targeting = state_of(&plan, "ad_targeting");
    assert_eq!(targeting.state, State::Denied);
    assert_eq!(targeting.derived_from, "gpc");
    assert_eq!(
        targeting.conflict.as_deref(),
        Some("granted (explicit choice) overridden by gpc")
    );
    assert_eq!(
        targeting.signal,
        Some(SignalEvidence {
            kind: "gpc".into(),
            raw: "Sec-GPC: 1".into()
        })
    );
    assert_eq!(state_of(&plan, "data_sale").state, State::Denied);
    let analytics = state_of(&plan, "analytics");
    assert_eq!(
        analytics.state,
        State::Granted,
        "GPC is about sale and sharing"
    );
    assert_eq!(analytics.conflict, None);
}

#[tokio::test]
async fn gpc_where_it_is_not_binding_changes_nothing_and_says_so() {
    let plan = planned(collection(
        "FR",
        &[("ad_targeting", Choice::Granted)],
        vec![SignalInput::Gpc],
    ))
    .await;
    assert_eq!(plan.record.choices.len(), 1);
    assert_eq!(state_of(&plan, "ad_targeting").state, State::Granted);
    assert!(
        plan.notes[0].contains("not a binding opt-out"),
        "{:?}",
        plan.notes
    );
}

#[tokio::test]
async fn the_policy_sets_expiry_and_reask_holds() {
    let plan = planned(collection(
        "FR",
        &[
            ("ad_targeting", Choice::Granted),
            ("analytics", Choice::Denied),
        ],
        vec![],
    ))
    .await;
    let day = 86_400_000_000;
    assert_eq!(
        state_of(&plan, "ad_targeting").lifetime_micros,
        Some(395 * day)
    );
    assert_eq!(state_of(&plan, "analytics").lifetime_micros, None);
    assert!(
        state_of(&plan, "ad_targeting").holds.is_empty(),
        "no re-ask rule in the EEA"
    );

    let ask = |person_initiated| {
        let mut c = collection("US-CA", &[("data_sale", Choice::Granted)], vec![]);
        c.person_initiated = person_initiated;
        c
    };
    let plan = planned(ask(false)).await;
    let holds = &state_of(&plan, "data_sale").holds;
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0].rule, "ccpa_twelve_months");
    assert_eq!(holds[0].wait_micros, 365 * day);
    let plan = planned(ask(true)).await;
    assert!(state_of(&plan, "data_sale").holds.is_empty());
}

#[tokio::test]
async fn a_tc_string_records_each_listed_vendor_s_consent_as_its_own_purpose() {
    let raw = tc_string_with_vendors(&[1, 3, 4], &[755, 21]);
    let plan = planned(collection("FR", &[], vec![SignalInput::Tcf(raw)])).await;
    let google = state_of(&plan, "tcf_vendor_755");
    assert_eq!(google.state, State::Granted);
    assert_eq!(google.derived_from, "tcf vendor 755 consented");
    assert_eq!(state_of(&plan, "tcf_vendor_21").state, State::Granted);
    let linkedin = state_of(&plan, "tcf_vendor_804");
    assert_eq!(linkedin.state, State::Denied, "not in the string");
    assert_eq!(linkedin.derived_from, "tcf vendor 804 not consented");
}
