//! Tooling for the people who own the policies: test cases that pin
//! decisions (`policies/tests/*.csv`), the reason behind a decision, a lint
//! for mistakes casbin would accept silently, and the decisions that change
//! between two policy sets. Used by `madtech policy …` and by CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::{CONSENT, IDENTIFIERS, PolicyError, PolicySet, RBAC, UNKNOWN_REGION};
use madtech_common::hashing::Form;

/// One question a policy set answers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum Question {
    Rbac {
        role: String,
        method: String,
    },
    Consent {
        destination: String,
        purpose: String,
        region: String,
        consent: String,
        /// An age band of `consent.toml` [age_bands], `adult` or `unknown`.
        age: String,
    },
    Identifier {
        destination: String,
        kind: String,
        form: String,
    },
}

impl Question {
    /// The policy file whose rows answer it.
    pub fn policy_file(&self) -> &'static str {
        match self {
            Question::Rbac { .. } => RBAC.1,
            Question::Consent { .. } => CONSENT.1,
            Question::Identifier { .. } => IDENTIFIERS.1,
        }
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub question: Question,
    pub allowed: bool,
    /// For consent: the region the decision was asked under (`ZZ` when the
    /// policy does not know the person's region).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked_region: Option<String>,
    /// The policy rows that allowed it (none for a denial by default).
    pub matched: Vec<Vec<String>>,
    pub policy_file: &'static str,
    pub policy_version: String,
}

impl PolicySet {
    pub fn explain(&self, question: &Question) -> Result<Explanation, PolicyError> {
        let (allowed, matched, asked_region) = match question {
            Question::Rbac { role, method } => {
                let (allowed, matched) = self.explain_method(role, method)?;
                (allowed, matched, None)
            }
            Question::Consent {
                destination,
                purpose,
                region,
                consent,
                age,
            } => {
                let (allowed, matched) =
                    self.explain_crossing(destination, purpose, region, consent, age)?;
                let asked = self.regime_region(region).to_string();
                (allowed, matched, Some(asked))
            }
            Question::Identifier {
                destination,
                kind,
                form,
            } => {
                let (allowed, matched) = self.explain_identifier(destination, kind, form)?;
                (allowed, matched, None)
            }
        };
        Ok(Explanation {
            question: question.clone(),
            allowed,
            asked_region,
            matched,
            policy_file: question.policy_file(),
            policy_version: self.version.clone(),
        })
    }
}

/// Expected outcome of a test case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

/// A test case: a question, the expected decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub file: String,
    pub line: usize,
    pub question: Question,
    pub expect: Expect,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

#[derive(Deserialize)]
struct RbacRow {
    role: String,
    method: String,
    expect: Expect,
    description: String,
}

#[derive(Deserialize)]
struct ConsentRow {
    destination: String,
    purpose: String,
    region: String,
    consent: String,
    age: String,
    expect: Expect,
    description: String,
}

#[derive(Deserialize)]
struct IdentifierRow {
    destination: String,
    kind: String,
    form: String,
    expect: Expect,
    description: String,
}

/// The case files, relative to the policy directory.
pub const CASE_FILES: [&str; 3] = [
    "tests/rbac.csv",
    "tests/consent.csv",
    "tests/identifiers.csv",
];

fn read_rows<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Vec<(usize, T)>, CaseError> {
    let path = dir.join(name);
    let invalid = |reason: String| CaseError::Invalid {
        file: name.to_string(),
        reason,
    };
    let mut reader = csv::Reader::from_path(&path).map_err(|err| invalid(err.to_string()))?;
    reader
        .deserialize::<T>()
        .enumerate()
        .map(|(i, row)| {
            // Line numbers count the header, as an editor shows them.
            row.map(|row| (i + 2, row))
                .map_err(|err| invalid(format!("line {}: {err}", i + 2)))
        })
        .collect()
}

/// Every test case in `dir/tests/`.
pub fn load_cases(dir: &Path) -> Result<Vec<Case>, CaseError> {
    let mut cases = Vec::new();
    for (line, row) in read_rows::<RbacRow>(dir, CASE_FILES[0])? {
        cases.push(Case {
            file: CASE_FILES[0].into(),
            line,
            question: Question::Rbac {
                role: row.role,
                method: row.method,
            },
            expect: row.expect,
            description: row.description,
        });
    }
    for (line, row) in read_rows::<ConsentRow>(dir, CASE_FILES[1])? {
        cases.push(Case {
            file: CASE_FILES[1].into(),
            line,
            question: Question::Consent {
                destination: row.destination,
                purpose: row.purpose,
                region: row.region,
                consent: row.consent,
                age: row.age,
            },
            expect: row.expect,
            description: row.description,
        });
    }
    for (line, row) in read_rows::<IdentifierRow>(dir, CASE_FILES[2])? {
        cases.push(Case {
            file: CASE_FILES[2].into(),
            line,
            question: Question::Identifier {
                destination: row.destination,
                kind: row.kind,
                form: row.form,
            },
            expect: row.expect,
            description: row.description,
        });
    }
    Ok(cases)
}

/// What running the cases found.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub passed: usize,
    /// Cases whose decision differs from the expectation.
    pub failed: Vec<String>,
    /// Policy lines no case exercises, as `file: row`.
    pub uncovered: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.uncovered.is_empty()
    }
}

/// Runs every case against `set` and checks that every policy line is
/// exercised by at least one case.
pub fn run_cases(set: &PolicySet, cases: &[Case]) -> Result<Report, PolicyError> {
    let mut report = Report::default();
    // Regions asked with no recorded choice: the case that tells an opt-in
    // regime from an opt-out one, so a region mapped to the wrong regime
    // fails a case instead of passing unnoticed.
    let mut regions_asked_unset = BTreeSet::new();
    let mut matched: BTreeMap<&'static str, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut reached: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for case in cases {
        let explanation = set.explain(&case.question)?;
        let expected = case.expect == Expect::Allow;
        if explanation.allowed == expected {
            report.passed += 1;
        } else {
            report.failed.push(format!(
                "{}:{}: expected {:?}, got {} ({})",
                case.file,
                case.line,
                case.expect,
                if explanation.allowed { "allow" } else { "deny" },
                case.description
            ));
        }
        let file = explanation.policy_file;
        matched.entry(file).or_default().extend(explanation.matched);
        let names = reached.entry(file).or_default();
        match &case.question {
            Question::Rbac { role, .. } => {
                names.insert(role.clone());
            }
            Question::Consent {
                destination, age, ..
            } => {
                names.insert(destination.clone());
                names.insert(age.clone());
            }
            Question::Identifier { destination, .. } => {
                names.insert(destination.clone());
            }
        }
        if let Some(region) = explanation.asked_region {
            if matches!(&case.question, Question::Consent { consent, .. } if consent == "unset") {
                regions_asked_unset.insert(region.clone());
            }
            names.insert(region);
        }
    }
    let rows_by_file = set.rows();
    let regions: Vec<&Vec<String>> = rows_by_file
        .get(CONSENT.1)
        .into_iter()
        .flatten()
        .filter(|r| r[0] == "g2" && r.len() == 3)
        .collect();
    let groups: BTreeSet<&String> = regions.iter().map(|r| &r[2]).collect();
    for row in &regions {
        let region = &row[1];
        if !groups.contains(region) && !regions_asked_unset.contains(region) {
            report.uncovered.push(format!(
                "{}: {} (no case asks for this region with consent unset)",
                CONSENT.1,
                row.join(", ")
            ));
        }
    }
    for (file, rows) in rows_by_file {
        let empty_matched = BTreeSet::new();
        let empty_reached = BTreeSet::new();
        let file_matched = matched.get(file).unwrap_or(&empty_matched);
        let mut file_reached = reached.get(file).unwrap_or(&empty_reached).clone();
        // A grouping row (a -> b) is exercised when a case reaches `a`;
        // then `b` is reached too. Iterate to a fixed point.
        let groupings: Vec<&Vec<String>> = rows.iter().filter(|r| r[0].starts_with('g')).collect();
        loop {
            let before = file_reached.len();
            for row in &groupings {
                if row.len() == 3 && file_reached.contains(&row[1]) {
                    file_reached.insert(row[2].clone());
                }
            }
            if file_reached.len() == before {
                break;
            }
        }
        for row in &rows {
            let covered = if row[0].starts_with('g') {
                row.len() == 3 && file_reached.contains(&row[1])
            } else {
                file_matched.contains(&row[1..].to_vec())
            };
            if !covered {
                report.uncovered.push(format!("{file}: {}", row.join(", ")));
            }
        }
    }
    Ok(report)
}

/// The decisions that differ between two sets, over the union of both sets'
/// test cases.
pub fn diff(
    old: &PolicySet,
    new: &PolicySet,
    cases: &[Case],
) -> Result<Vec<(Question, bool, bool)>, PolicyError> {
    let questions: BTreeSet<&Question> = cases.iter().map(|c| &c.question).collect();
    let mut changed = Vec::new();
    for question in questions {
        let before = old.explain(question)?.allowed;
        let after = new.explain(question)?.allowed;
        if before != after {
            changed.push((question.clone(), before, after));
        }
    }
    Ok(changed)
}

/// Mistakes casbin accepts without a word: names no request can carry and
/// rules no request can reach.
pub fn lint(set: &PolicySet) -> Result<Vec<String>, CaseError> {
    let mut problems = Vec::new();
    let purposes = set.purposes().cloned().ok_or_else(|| CaseError::Invalid {
        file: PURPOSES.to_string(),
        reason: "missing: the purpose catalogue lives there".into(),
    })?;
    let rows = set.rows();
    let grouping = |file: &str, ptype: &str| -> Vec<(String, String)> {
        rows.get(file)
            .map(|rows| {
                rows.iter()
                    .filter(|r| r[0] == ptype && r.len() == 3)
                    .map(|r| (r[1].clone(), r[2].clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let reachable = |edges: &[(String, String)]| -> BTreeSet<String> {
        // Every name reachable from a leaf (a name nothing maps to).
        let targets: BTreeSet<&String> = edges.iter().map(|(_, b)| b).collect();
        let mut reached: BTreeSet<String> = edges
            .iter()
            .filter(|(a, _)| !targets.contains(a))
            .map(|(a, _)| a.clone())
            .collect();
        loop {
            let before = reached.len();
            for (a, b) in edges {
                if reached.contains(a) {
                    reached.insert(b.clone());
                }
            }
            if reached.len() == before {
                return reached;
            }
        }
    };

    // Consent: purposes from the catalogue, destination classes and regimes
    // some request can reach, region codes shaped like ISO 3166.
    let destinations = reachable(&grouping(CONSENT.1, "g"));
    let regions = grouping(CONSENT.1, "g2");
    let regimes = reachable(&regions);
    let targets: BTreeSet<&String> = regions.iter().map(|(_, b)| b).collect();
    for (region, _) in &regions {
        if !targets.contains(region) && madtech_common::validate::region("region", region).is_err()
        {
            problems.push(format!(
                "{}: region {region:?} is not an ISO 3166 code",
                CONSENT.1
            ));
        }
    }
    let mut seen_regions = BTreeMap::new();
    for (region, regime) in &regions {
        if let Some(other) = seen_regions.insert(region.clone(), regime.clone()) {
            problems.push(format!(
                "{}: region {region} maps to both {other} and {regime}",
                CONSENT.1
            ));
        }
    }
    if !seen_regions.contains_key(UNKNOWN_REGION) {
        problems.push(format!(
            "{}: unknown regions ({UNKNOWN_REGION}) map to no regime, so they are denied everything",
            CONSENT.1
        ));
    }
    // Age bands and the groups they reach (a band is its own group).
    let ages = grouping(CONSENT.1, "g3");
    let mut age_groups = reachable(&ages);
    age_groups.extend(set.age_bands().names().map(str::to_string));
    for row in rows
        .get(CONSENT.1)
        .into_iter()
        .flatten()
        .filter(|r| r[0] == "p")
    {
        let (Some(dest), Some(purpose), Some(regime)) = (row.get(1), row.get(2), row.get(3)) else {
            problems.push(format!(
                "{}: a rule without destination, purpose and regime: {}",
                CONSENT.1,
                row.join(", ")
            ));
            continue;
        };
        if !purposes.contains(purpose) {
            problems.push(format!(
                "{}: unknown purpose {purpose:?} (not in {PURPOSES})",
                CONSENT.1
            ));
        }
        if !destinations.contains(dest) {
            problems.push(format!(
                "{}: no destination kind reaches class {dest:?}: {}",
                CONSENT.1,
                row.join(", ")
            ));
        }
        if !regimes.contains(regime) {
            problems.push(format!(
                "{}: no region reaches regime {regime:?}: {}",
                CONSENT.1,
                row.join(", ")
            ));
        }
        if let Some(age) = row.get(5)
            && age != "*"
            && !age_groups.contains(age)
        {
            problems.push(format!(
                "{}: no age band reaches {age:?}: {}",
                CONSENT.1,
                row.join(", ")
            ));
        }
    }
    for (band, _) in &ages {
        if !set.age_bands().names().any(|known| known == band) {
            problems.push(format!(
                "{}: age band {band:?} is not one of consent.toml's [age_bands], adult or unknown",
                CONSENT.1
            ));
        }
    }
    // Identifiers: destination classes some kind reaches.
    let id_destinations = reachable(&grouping(IDENTIFIERS.1, "g"));
    for row in rows
        .get(IDENTIFIERS.1)
        .into_iter()
        .flatten()
        .filter(|r| r[0] == "p")
    {
        let dest = row.get(1).map(String::as_str).unwrap_or_default();
        if !id_destinations.contains(dest) {
            problems.push(format!(
                "{}: no destination kind reaches class {dest:?}",
                IDENTIFIERS.1
            ));
        }
        let form = row.get(3).map(String::as_str).unwrap_or_default();
        if Form::parse(form).is_none() {
            let known: Vec<&str> = Form::ALL.iter().map(|f| f.name()).collect();
            problems.push(format!(
                "{}: form {form:?} is not one the gateway computes ({})",
                IDENTIFIERS.1,
                known.join(", ")
            ));
        }
    }
    // Identifiers: one form at most per destination kind and identifier kind.
    let identifier_kinds: BTreeSet<&str> = rows
        .get(IDENTIFIERS.1)
        .into_iter()
        .flatten()
        .filter(|r| r[0] == "p")
        .filter_map(|r| r.get(2).map(String::as_str))
        .collect();
    let destination_kinds: BTreeSet<String> = grouping(IDENTIFIERS.1, "g")
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    for dest in &destination_kinds {
        for kind in &identifier_kinds {
            if let Err(err) = set.identifier_form(dest, kind) {
                problems.push(err.to_string());
            }
        }
    }
    // RBAC: every method pattern names methods the API has.
    let methods = crate::route::api_methods();
    for row in rows
        .get(RBAC.1)
        .into_iter()
        .flatten()
        .filter(|r| r[0] == "p")
    {
        let (Some(role), Some(pattern)) = (row.get(1), row.get(2)) else {
            problems.push(format!(
                "{}: a rule without role and method: {}",
                RBAC.1,
                row.join(", ")
            ));
            continue;
        };
        let known = match pattern.strip_suffix('*') {
            Some(prefix) => methods.iter().any(|m| m.starts_with(prefix)),
            None => methods.contains(pattern),
        };
        if !known {
            problems.push(format!(
                "{}: {pattern:?} matches no method of the API",
                RBAC.1
            ));
        }
        if madtech_common::validate::policy_name("role", role).is_err() {
            problems.push(format!(
                "{}: role {role:?} is not a snake_case name",
                RBAC.1
            ));
        }
    }
    Ok(problems)
}

/// The consent service's policy, which holds the purpose catalogue,
/// relative to the policy directory.
pub const PURPOSES: &str = crate::policy::CONSENT_RULES;

/// The shipped policy directory, for tests.
pub fn shipped_policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_shipped_cases_pass_and_cover_every_policy_line() {
        let dir = shipped_policies();
        let set = PolicySet::load(&dir).await.expect("policies");
        let cases = load_cases(&dir).expect("cases");
        assert!(cases.len() > 50);
        let report = run_cases(&set, &cases).expect("run");
        assert!(report.failed.is_empty(), "{:#?}", report.failed);
        assert!(report.uncovered.is_empty(), "{:#?}", report.uncovered);
    }

    #[tokio::test]
    async fn the_shipped_policies_are_lint_free() {
        let dir = shipped_policies();
        let set = PolicySet::load(&dir).await.expect("policies");
        assert_eq!(lint(&set).expect("lint"), Vec::<String>::new());
    }

    #[tokio::test]
    async fn explanations_name_the_rule_and_the_region_asked_under() {
        let set = PolicySet::load(&shipped_policies())
            .await
            .expect("policies");
        let question = Question::Consent {
            destination: "file".into(),
            purpose: "ad_targeting".into(),
            region: "US-CA".into(),
            consent: "unset".into(),
            age: "adult".into(),
        };
        let explanation = set.explain(&question).expect("explain");
        assert!(explanation.allowed);
        assert_eq!(explanation.asked_region.as_deref(), Some("US-CA"));
        assert_eq!(
            explanation.matched,
            vec![
                vec![
                    "all_destinations",
                    "ad_targeting",
                    "CCPA",
                    "unset",
                    "may_opt_out",
                    "allow"
                ]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
            ]
        );
        let unknown = Question::Consent {
            destination: "file".into(),
            purpose: "ad_targeting".into(),
            region: "Atlantis".into(),
            consent: "unset".into(),
            age: "adult".into(),
        };
        let explanation = set.explain(&unknown).expect("explain");
        assert!(!explanation.allowed);
        assert_eq!(explanation.asked_region.as_deref(), Some(UNKNOWN_REGION));
        assert!(explanation.matched.is_empty());
    }

    fn copy_shipped() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        let shipped = shipped_policies();
        std::fs::create_dir(dir.path().join("tests")).expect("tests dir");
        for entry in std::fs::read_dir(&shipped).expect("read") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))
                    .expect("copy");
            }
        }
        for name in CASE_FILES {
            std::fs::copy(shipped.join(name), dir.path().join(name)).expect("copy case");
        }
        dir
    }

    fn append(dir: &Path, name: &str, line: &str) {
        let path = dir.join(name);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str(line);
        std::fs::write(path, text).expect("write");
    }

    #[tokio::test]
    async fn uncovered_lines_failed_cases_and_lint_problems_are_reported() {
        let dir = copy_shipped();
        append(
            dir.path(),
            CONSENT.1,
            "p, all_destinations, ad_targeting, LGPD, granted, *, allow\n",
        );
        append(
            dir.path(),
            CONSENT.1,
            "p, all_destinations, ad_targting, GDPR, granted, *, allow\n",
        );
        append(
            dir.path(),
            CONSENT.1,
            "p, all_destinations, ad_measurement, GDPR, granted, toddler, allow\n",
        );
        append(
            dir.path(),
            RBAC.1,
            "p, marketer, /madtech.profiles.v1.ProfileService/GetProfil\n",
        );
        append(
            dir.path(),
            CASE_FILES[1],
            "file,ad_targeting,FR,unset,adult,allow,wrong on purpose\n",
        );
        append(
            dir.path(),
            IDENTIFIERS.1,
            "p, google_hashing, phone, sha256_digits\np, email_hashing, email, md5\n",
        );
        let set = PolicySet::load(dir.path()).await.expect("still loads");
        let report = run_cases(&set, &load_cases(dir.path()).expect("cases")).expect("run");
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert!(report.failed[0].contains("wrong on purpose"));
        assert!(
            report.uncovered.iter().any(|l| l.contains("LGPD")),
            "{:?}",
            report.uncovered
        );
        let problems = lint(&set).expect("lint");
        assert!(
            problems.iter().any(|p| p.contains("regime \"LGPD\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("unknown purpose \"ad_targting\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("no age band reaches \"toddler\"")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("GetProfil")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("phone may reach google_ads as both sha256 and sha256_digits")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("form \"md5\"")),
            "{problems:?}"
        );
    }

    #[tokio::test]
    async fn a_region_moved_to_a_laxer_regime_fails_a_case() {
        let dir = copy_shipped();
        let path = dir.path().join(CONSENT.1);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(
            &path,
            text.replace("g2, AT, EEA", "g2, AT, US_STATE_OPT_OUT"),
        )
        .expect("write");
        let set = PolicySet::load(dir.path()).await.expect("loads");
        let report = run_cases(&set, &load_cases(dir.path()).expect("cases")).expect("run");
        assert!(
            report.failed.iter().any(|f| f.contains("AT is in the EEA")),
            "{:?}",
            report.failed
        );
    }

    #[tokio::test]
    async fn every_region_needs_a_case_without_consent() {
        let dir = copy_shipped();
        append(dir.path(), CONSENT.1, "g2, US-XY, US_STATE_OPT_OUT\n");
        let set = PolicySet::load(dir.path()).await.expect("loads");
        let report = run_cases(&set, &load_cases(dir.path()).expect("cases")).expect("run");
        assert!(
            report.uncovered.iter().any(|u| u.contains("US-XY")),
            "{:?}",
            report.uncovered
        );
    }

    #[tokio::test]
    async fn diff_lists_the_decisions_that_change() {
        let old = PolicySet::load(&shipped_policies()).await.expect("old");
        let dir = copy_shipped();
        append(
            dir.path(),
            RBAC.1,
            "p, marketer, /madtech.segments.v1.SegmentService/ExportAudience\n",
        );
        let new = PolicySet::load(dir.path()).await.expect("new");
        let cases = load_cases(dir.path()).expect("cases");
        let changed = diff(&old, &new, &cases).expect("diff");
        assert_eq!(
            changed,
            vec![(
                Question::Rbac {
                    role: "marketer".into(),
                    method: "/madtech.segments.v1.SegmentService/ExportAudience".into(),
                },
                false,
                true
            )]
        );
    }

    #[test]
    fn malformed_case_files_name_the_line() {
        let dir = copy_shipped();
        append(
            dir.path(),
            CASE_FILES[0],
            "admin,/x,perhaps,bad expectation\n",
        );
        let err = load_cases(dir.path()).expect_err("bad");
        assert!(err.to_string().contains("tests/rbac.csv"), "{err}");
        assert!(err.to_string().contains("line"), "{err}");
    }
}
