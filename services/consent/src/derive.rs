//! From what a request says to one choice per purpose: explicit choices and
//! the consent signals sent with them (TCF, GPP, US Privacy, GPC) are turned
//! into purposes through the catalogue, then reconciled. GPC, where binding,
//! wins over everything; otherwise, when two sources disagree the denial
//! stands. Every overridden choice is kept as a recorded conflict.

use std::collections::BTreeMap;

use madtech_common::error::FieldError;
use madtech_proto::time::duration_micros;
use madtech_signals::{
    GppString, TcString, Tcf22Problem, UsPrivacy, UsSection, UspFlag, decode_gpp, decode_tcf,
    decode_usp,
};

use crate::ledger::{
    Choice, LegalBasis, ReaskHold, Record, RecordedChoice, SignalEvidence, Source,
};
use crate::rules::{ConsentRules, OptOutField, Purpose};

/// A signal as it arrived with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalInput {
    /// An IAB TCF v2 TC string.
    Tcf(String),
    /// An IAB GPP string.
    Gpp(String),
    /// An IAB US Privacy string.
    Usp(String),
    /// The browser sent `Sec-GPC: 1`.
    Gpc,
}

impl SignalInput {
    pub fn kind(&self) -> &'static str {
        match self {
            SignalInput::Tcf(_) => "tcf",
            SignalInput::Gpp(_) => "gpp",
            SignalInput::Usp(_) => "usp",
            SignalInput::Gpc => "gpc",
        }
    }

    /// The text kept in the ledger as evidence.
    pub fn raw(&self) -> &str {
        match self {
            SignalInput::Tcf(raw) | SignalInput::Gpp(raw) | SignalInput::Usp(raw) => raw,
            SignalInput::Gpc => "Sec-GPC: 1",
        }
    }
}

/// One purpose's choice as it will be written, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Derived {
    pub purpose: String,
    pub choice: Choice,
    pub legal_basis: LegalBasis,
    /// Index into the request's signals; `None` for an explicit choice.
    pub signal: Option<usize>,
    /// Which fields decided it, e.g. `tcf purposes 1,3,4 consented`.
    pub derived_from: String,
    /// Choices for the same purpose that lost to this one.
    pub conflict: Option<String>,
}

/// What a request amounts to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Derivation {
    /// One per purpose, in purpose order.
    pub choices: Vec<Derived>,
    /// The CMP that produced a TC string, when one was sent.
    pub cmp: Option<(u16, u16)>,
    /// Things worth telling the caller that changed nothing (a GPC signal
    /// where it is not binding, a signal that says nothing about any
    /// purpose).
    pub notes: Vec<String>,
}

/// How strictly TC strings are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcfValidity {
    /// Reject strings that break TCF 2.2's rules.
    Tcf22,
    /// Accept strings made under earlier policies (most public test strings).
    AcceptOlder,
}

/// What a RecordConsent request collected, validated.
#[derive(Debug, Clone)]
pub struct Collection {
    /// Empty while the person is known only by `identifier`.
    pub profile_id: String,
    /// The person by `(kind, value)`, to be resolved by profiles.
    pub identifier: Option<(String, String)>,
    /// Explicit choices; every purpose is in the catalogue, at most once.
    pub choices: Vec<(String, Choice)>,
    /// The basis of the explicit choices.
    pub legal_basis: LegalBasis,
    pub signals: Vec<SignalInput>,
    pub source: Source,
    pub region: String,
    pub notice_version: String,
    pub collected_at_micros: Option<i64>,
    /// The CMP as the caller named it; a TC string's own CMP wins.
    pub cmp: Option<(u16, u16)>,
    pub person_initiated: bool,
}

/// The ledger record a collection amounts to, and notes for the caller.
#[derive(Debug, Clone)]
pub struct Plan {
    pub record: Record,
    pub notes: Vec<String>,
}

/// Derives one choice per purpose and attaches the policy to each: how long
/// it lasts and which re-ask rules may hold it back.
pub fn plan(
    rules: &ConsentRules,
    collection: Collection,
    validity: TcfValidity,
) -> Result<Plan, FieldError> {
    let derivation = derive(
        rules,
        &collection.region,
        &collection.choices,
        collection.legal_basis,
        &collection.signals,
        validity,
    )?;
    let regimes = rules.regimes_of(&collection.region);
    let choices = derivation
        .choices
        .into_iter()
        .map(|derived| {
            let lifetime_micros = rules
                .lifetime(&regimes, derived.choice)
                .map(duration_micros);
            let holds = rules
                .reask_rules(&regimes, &derived.purpose)
                .filter(|rule| !(collection.person_initiated && rule.unless_person_initiated))
                .map(|rule| ReaskHold {
                    rule: rule.name.clone(),
                    wait_micros: duration_micros(rule.wait),
                })
                .collect();
            RecordedChoice {
                signal: derived.signal.map(|index| {
                    let signal = &collection.signals[index];
                    SignalEvidence {
                        kind: signal.kind().to_string(),
                        raw: signal.raw().to_string(),
                    }
                }),
                purpose: derived.purpose,
                state: derived.choice.into(),
                legal_basis: derived.legal_basis,
                derived_from: derived.derived_from,
                conflict: derived.conflict,
                lifetime_micros,
                holds,
            }
        })
        .collect();
    Ok(Plan {
        record: Record {
            profile_id: collection.profile_id,
            choices,
            source: collection.source,
            region: collection.region,
            notice_version: collection.notice_version,
            cmp: derivation.cmp.or(collection.cmp),
            collected_at_micros: collection.collected_at_micros,
        },
        notes: derivation.notes,
    })
}

/// Turns explicit choices and signals into one choice per purpose.
fn derive(
    rules: &ConsentRules,
    region: &str,
    explicit: &[(String, Choice)],
    explicit_basis: LegalBasis,
    signals: &[SignalInput],
    validity: TcfValidity,
) -> Result<Derivation, FieldError> {
    let regimes = rules.regimes_of(region);
    let gpc_binding = rules.gpc_binding(&regimes);
    let mut candidates: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    let mut derivation = Derivation::default();
    for (purpose, choice) in explicit {
        candidates
            .entry(purpose.clone())
            .or_default()
            .push(Candidate {
                choice: *choice,
                basis: explicit_basis,
                signal: None,
                from: "explicit choice".into(),
                gpc: false,
            });
    }
    for (index, signal) in signals.iter().enumerate() {
        let field = |name: &str| format!("signals[{index}].{name}");
        let mut found = Vec::new();
        match signal {
            SignalInput::Tcf(raw) => {
                let tc = decode_tcf(raw)
                    .map_err(|err| FieldError::new(field("tc_string"), err.to_string()))?;
                check_tcf(&tc, validity)
                    .map_err(|reason| FieldError::new(field("tc_string"), reason))?;
                derivation.cmp = Some((tc.cmp_id, tc.cmp_version));
                tcf_choices(rules, &tc, "tcf", &mut found);
            }
            SignalInput::Gpp(raw) => {
                let gpp = decode_gpp(raw)
                    .map_err(|err| FieldError::new(field("gpp_string"), err.to_string()))?;
                if let Some(tc) = gpp.tcf() {
                    check_tcf(tc, validity).map_err(|reason| {
                        FieldError::new(field("gpp_string"), format!("tcfeuv2: {reason}"))
                    })?;
                    derivation.cmp = Some((tc.cmp_id, tc.cmp_version));
                }
                gpp_choices(rules, &gpp, gpc_binding, &mut found, &mut derivation.notes);
            }
            SignalInput::Usp(raw) => {
                let usp = decode_usp(raw)
                    .map_err(|err| FieldError::new(field("us_privacy"), err.to_string()))?;
                usp_choices(rules, &usp, "usp", &mut found);
            }
            SignalInput::Gpc => {
                if gpc_binding {
                    gpc_choices(rules, "gpc", &mut found);
                } else {
                    derivation.notes.push(not_binding_note(&regimes));
                }
            }
        }
        if found.is_empty() && !matches!(signal, SignalInput::Gpc) {
            derivation.notes.push(format!(
                "signals[{index}] ({}) says nothing about any purpose",
                signal.kind()
            ));
        }
        for (purpose, mut candidate) in found {
            candidate.signal = Some(index);
            candidates.entry(purpose).or_default().push(candidate);
        }
    }
    derivation.choices = candidates
        .into_iter()
        .map(|(purpose, candidates)| reconcile(purpose, candidates))
        .collect();
    Ok(derivation)
}

/// One source's say on one purpose.
#[derive(Debug, Clone)]
struct Candidate {
    choice: Choice,
    basis: LegalBasis,
    signal: Option<usize>,
    from: String,
    gpc: bool,
}

fn reconcile(purpose: String, candidates: Vec<Candidate>) -> Derived {
    // GPC first, then any denial, then the first grant.
    let winner = candidates
        .iter()
        .position(|c| c.gpc)
        .or_else(|| candidates.iter().position(|c| c.choice == Choice::Denied))
        .unwrap_or(0);
    let chosen = &candidates[winner];
    let losers: Vec<String> = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| *i != winner && c.choice != chosen.choice)
        .map(|(_, c)| format!("{} ({}) overridden by {}", c.choice, c.from, chosen.from))
        .collect();
    Derived {
        purpose,
        choice: chosen.choice,
        legal_basis: chosen.basis,
        signal: chosen.signal,
        derived_from: chosen.from.clone(),
        conflict: (!losers.is_empty()).then(|| losers.join("; ")),
    }
}

fn check_tcf(tc: &TcString, validity: TcfValidity) -> Result<(), String> {
    if validity == TcfValidity::AcceptOlder {
        return Ok(());
    }
    tc.validate_tcf22().map_err(|problems| {
        let problems: Vec<String> = problems.iter().map(Tcf22Problem::to_string).collect();
        format!("not a valid TCF 2.2 string: {}", problems.join("; "))
    })
}

fn signal_candidate(choice: Choice, basis: LegalBasis, from: String) -> Candidate {
    Candidate {
        choice,
        basis,
        signal: None,
        from,
        gpc: false,
    }
}

/// Purposes with TCF purposes: granted when all of them are consented to.
fn tcf_choices(
    rules: &ConsentRules,
    tc: &TcString,
    prefix: &str,
    found: &mut Vec<(String, Candidate)>,
) {
    for purpose in rules.purposes().filter(|p| !p.tcf_purposes.is_empty()) {
        let missing: Vec<String> = purpose
            .tcf_purposes
            .iter()
            .filter(|p| !tc.has_purpose_consent(**p))
            .map(u8::to_string)
            .collect();
        let (choice, from) = if missing.is_empty() {
            (
                Choice::Granted,
                format!(
                    "{prefix} purposes {} consented",
                    list(&purpose.tcf_purposes)
                ),
            )
        } else {
            (
                Choice::Denied,
                format!("{prefix} purposes {} not consented", missing.join(",")),
            )
        };
        found.push((
            purpose.name.clone(),
            signal_candidate(choice, LegalBasis::Consent, from),
        ));
    }
    // Vendor consent, per vendor the policy lists, as purposes of its own.
    for vendor in rules.tcf_vendors() {
        let (choice, verb) = if tc.has_vendor_consent(vendor) {
            (Choice::Granted, "consented")
        } else {
            (Choice::Denied, "not consented")
        };
        found.push((
            madtech_proto::consent::tcf_vendor_purpose(vendor),
            signal_candidate(
                choice,
                LegalBasis::Consent,
                format!("{prefix} vendor {vendor} {verb}"),
            ),
        ));
    }
}

fn list(ids: &[u8]) -> String {
    ids.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

fn usp_choices(
    rules: &ConsentRules,
    usp: &UsPrivacy,
    prefix: &str,
    found: &mut Vec<(String, Candidate)>,
) {
    let choice = match usp.opt_out_sale {
        UspFlag::Yes => Choice::Denied,
        UspFlag::No => Choice::Granted,
        UspFlag::NotApplicable => return,
    };
    let from = format!("{prefix} opt_out_sale={}", usp.opt_out_sale.as_str());
    for purpose in opted_out_by(rules, OptOutField::UspSale) {
        found.push((
            purpose.name.clone(),
            signal_candidate(choice, LegalBasis::OptOut, from.clone()),
        ));
    }
}

fn gpc_choices(rules: &ConsentRules, from: &str, found: &mut Vec<(String, Candidate)>) {
    for purpose in opted_out_by(rules, OptOutField::Gpc) {
        let mut candidate = signal_candidate(Choice::Denied, LegalBasis::OptOut, from.to_string());
        candidate.gpc = true;
        found.push((purpose.name.clone(), candidate));
    }
}

fn not_binding_note(regimes: &std::collections::BTreeSet<String>) -> String {
    let regimes: Vec<&str> = regimes.iter().map(String::as_str).collect();
    format!(
        "GPC is not a binding opt-out under {}; nothing recorded for it",
        regimes.join(", ")
    )
}

fn opted_out_by(rules: &ConsentRules, field: OptOutField) -> impl Iterator<Item = &Purpose> {
    rules
        .purposes()
        .filter(move |p| p.opted_out_by.contains(&field))
}

/// The spec's 2-bit codes in US sections: 1 opted out (or no consent),
/// 2 did not opt out (or consent), 0 not applicable.
const OPTED_OUT: u8 = 1;
const NOT_OPTED_OUT: u8 = 2;

fn gpp_choices(
    rules: &ConsentRules,
    gpp: &GppString,
    gpc_binding: bool,
    found: &mut Vec<(String, Candidate)>,
    notes: &mut Vec<String>,
) {
    if let Some(tc) = gpp.tcf() {
        tcf_choices(rules, tc, "gpp tcfeuv2", found);
    }
    if let Some(usp) = gpp.us_privacy() {
        usp_choices(rules, usp, "gpp uspv1", found);
    }
    for section in gpp.us_sections() {
        for purpose in rules.purposes() {
            if let Some((choice, from)) = us_section_choice(section, purpose) {
                found.push((
                    purpose.name.clone(),
                    signal_candidate(choice, LegalBasis::OptOut, from),
                ));
            }
        }
        if section.gpc == Some(true) {
            if gpc_binding {
                gpc_choices(rules, &format!("gpp {}.gpc", section.name), found);
            } else {
                notes.push(format!(
                    "gpp {}.gpc is set, but GPC is not binding here",
                    section.name
                ));
            }
        }
    }
}

/// A purpose's choice from one US section: denied when any field the
/// purpose is opted out by says so, granted when one says the person did
/// not opt out, nothing when every field is absent or not applicable.
fn us_section_choice(section: &UsSection, purpose: &Purpose) -> Option<(Choice, String)> {
    let mut values: Vec<(&str, u8)> = Vec::new();
    for field in &purpose.opted_out_by {
        match field {
            OptOutField::GppSale => {
                values.extend(section.sale_opt_out.map(|v| ("sale_opt_out", v)))
            }
            OptOutField::GppSharing => {
                values.extend(section.sharing_opt_out.map(|v| ("sharing_opt_out", v)))
            }
            OptOutField::GppTargetedAdvertising => values.extend(
                section
                    .targeted_advertising_opt_out
                    .map(|v| ("targeted_advertising_opt_out", v)),
            ),
            OptOutField::GppSensitiveData => {
                let categories = &section.sensitive_data_processing;
                let value = if categories.contains(&OPTED_OUT) {
                    Some(OPTED_OUT)
                } else if categories.contains(&NOT_OPTED_OUT) {
                    Some(NOT_OPTED_OUT)
                } else {
                    None
                };
                values.extend(value.map(|v| ("sensitive_data_processing", v)));
                // Known children's data always needs consent: no consent for
                // any category counts as a denial too.
                if section
                    .known_child_sensitive_data_consents
                    .values()
                    .contains(&OPTED_OUT)
                {
                    values.push(("known_child_sensitive_data_consents", OPTED_OUT));
                }
            }
            OptOutField::UspSale | OptOutField::Gpc => {}
        }
    }
    let pick = |code: u8| values.iter().find(|(_, v)| *v == code);
    if let Some((name, _)) = pick(OPTED_OUT) {
        Some((Choice::Denied, format!("gpp {}.{name}=1", section.name)))
    } else {
        pick(NOT_OPTED_OUT)
            .map(|(name, _)| (Choice::Granted, format!("gpp {}.{name}=2", section.name)))
    }
}

#[cfg(test)]
mod tests;
