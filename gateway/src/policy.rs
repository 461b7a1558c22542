//! The policy set: casbin models and policies from `policies/`, owned by
//! compliance. Loaded whole and validated before use; the gateway answers
//! every decision from one immutable set, so no request ever sees half of a
//! change. A set that does not load is never used: the gateway fails closed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;
use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, Model, StringAdapter};
use sha2::{Digest, Sha256};

use madtech_common::hashing::Form;

/// The model/policy pairs a policy directory must hold.
pub const RBAC: (&str, &str) = ("rbac_model.conf", "rbac_policy.csv");
pub const CONSENT: (&str, &str) = ("consent_model.conf", "consent_policy.csv");
pub const IDENTIFIERS: (&str, &str) = ("identifiers_model.conf", "identifiers_policy.csv");
/// The consent service's policy; the gateway reads its TCF vendor rules.
pub const CONSENT_RULES: &str = "consent.toml";

/// The region a consent decision is asked under when the policy does not
/// know the person's region (ISO 3166's code for "unknown").
pub const UNKNOWN_REGION: &str = "ZZ";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("policy evaluation failed: {0}")]
    Evaluate(String),
}

/// The policy files as read, before they are parsed.
struct PolicyTexts {
    /// (model, policy) of consent, identifiers and RBAC, in file-name order.
    pairs: [(String, String); 3],
    /// The consent service's policy, for the TCF vendor rules; absent in a
    /// directory without it.
    consent_rules: Option<String>,
    /// Hex SHA-256 over every file's name and content, in name order.
    version: String,
    files: Vec<String>,
}

impl PolicyTexts {
    fn read(dir: &Path) -> Result<Self, PolicyError> {
        let mut files = Vec::new();
        let mut hasher = Sha256::new();
        // Every file read goes into the version, in the order read.
        let mut read = |name: &str, required: bool| -> Result<Option<String>, PolicyError> {
            let text = match std::fs::read_to_string(dir.join(name)) {
                Ok(text) => text,
                Err(err) if !required && err.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(None);
                }
                Err(source) => {
                    return Err(PolicyError::Read {
                        file: name.to_string(),
                        source,
                    });
                }
            };
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            files.push(name.to_string());
            Ok(Some(text))
        };
        let mut read_pair =
            |(model, policy): (&str, &str)| -> Result<(String, String), PolicyError> {
                Ok((
                    read(model, true)?.unwrap_or_default(),
                    read(policy, true)?.unwrap_or_default(),
                ))
            };
        let pairs = [
            read_pair(CONSENT)?,
            read_pair(IDENTIFIERS)?,
            read_pair(RBAC)?,
        ];
        let consent_rules = read(CONSENT_RULES, false)?;
        Ok(PolicyTexts {
            pairs,
            consent_rules,
            version: hex::encode(hasher.finalize()),
            files,
        })
    }
}

/// What a reload check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files are what is in force already, or what was refused last.
    Unchanged,
    /// A new valid set is in force, with this version.
    Replaced(String),
    /// The files changed but do not make a valid set; the set in force stays.
    Refused(String),
}

/// Watches a policy directory and puts each new valid set in force. A
/// Kubernetes ConfigMap update swaps a symlink under the mount; reading the
/// files afresh each time follows it.
pub struct Reloader {
    dir: std::path::PathBuf,
    policies: Policies,
    /// The last version refused, so a broken set is reported once.
    refused: Option<String>,
}

impl Reloader {
    pub fn new(dir: &Path, policies: Policies) -> Self {
        Reloader {
            dir: dir.to_path_buf(),
            policies,
            refused: None,
        }
    }

    /// Reads the directory once and swaps in a changed, valid set.
    pub async fn check(&mut self) -> Reload {
        let texts = match PolicyTexts::read(&self.dir) {
            Ok(texts) => texts,
            Err(err) => return self.refuse("unreadable".into(), &err),
        };
        let in_force = self.policies.current().map(|set| set.version.clone());
        if in_force.as_deref() == Some(texts.version.as_str())
            || self.refused.as_deref() == Some(texts.version.as_str())
        {
            return Reload::Unchanged;
        }
        let version = texts.version.clone();
        match PolicySet::build(texts).await {
            Ok(set) => {
                self.policies.replace(set);
                self.refused = None;
                metrics::counter!("madtech_gateway_policy_reloads_total", "outcome" => "replaced")
                    .increment(1);
                tracing::info!(version = %version, "new policy set in force");
                Reload::Replaced(version)
            }
            Err(err) => self.refuse(version, &err),
        }
    }

    fn refuse(&mut self, version: String, err: &PolicyError) -> Reload {
        if self.refused.as_deref() != Some(version.as_str()) {
            metrics::counter!("madtech_gateway_policy_reloads_total", "outcome" => "refused")
                .increment(1);
            tracing::error!(version = %version, error = %err, "policy change refused; the set in force stays");
        }
        self.refused = Some(version.clone());
        Reload::Refused(version)
    }

    /// Checks every `interval` until `shutdown`.
    pub async fn run(
        mut self,
        interval: std::time::Duration,
        shutdown: madtech_common::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            self.check().await;
        }
    }
}

/// How many RBAC answers a set remembers; roles come from signed tokens and
/// methods from the API, so real traffic stays far below this.
const MAX_REMEMBERED_DECISIONS: usize = 10_000;

/// A loaded, validated set of policies.
pub struct PolicySet {
    rbac: Enforcer,
    consent: Enforcer,
    identifiers: Enforcer,
    /// Regions the consent policy maps to a regime.
    known_regions: HashSet<String>,
    /// From `consent.toml`; `None` when the directory has none.
    consent_rules: Option<ConsentRules>,
    /// RBAC answers so far: role → method → allowed.
    method_decisions: RwLock<HashMap<String, HashMap<String, bool>>>,
    /// Hex SHA-256 over every file's name and content, in name order.
    pub version: String,
    pub files: Vec<String>,
    pub loaded_at_micros: i64,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .finish()
    }
}

/// The parts of `consent.toml` the gateway applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ConsentRules {
    /// Every purpose of the catalogue.
    purposes: BTreeSet<String>,
    /// Purposes that need the destination's own TCF vendor consent.
    vendor_purposes: HashSet<String>,
    /// The TCF vendor id of each destination kind that is a TCF vendor.
    vendors: HashMap<String, u16>,
    age_bands: AgeBands,
}

/// A person's age band on a day, from their birth date: the first band
/// they are younger than (`below`, in whole years), else `adult`; `unknown`
/// without a readable birth date.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgeBands {
    /// (name, below), rising.
    bands: Vec<(String, u32)>,
}

pub const ADULT: &str = "adult";
pub const UNKNOWN_AGE: &str = "unknown";

impl AgeBands {
    /// The band's index (bands in order, then adult, then unknown) and name.
    pub fn band(&self, birth_date: &str, today: chrono::NaiveDate) -> (usize, &str) {
        let unknown = (self.bands.len() + 1, UNKNOWN_AGE);
        // Most members have no birth date, and `parse_from_str` reads its
        // format string anew on every call (~1% of a crossing's profile):
        // `YYYY-MM-DD` is what `NaiveDate`'s own parser reads.
        if birth_date.is_empty() {
            return unknown;
        }
        let Ok(born) = birth_date.parse::<chrono::NaiveDate>() else {
            return unknown;
        };
        let Some(age) = today.years_since(born) else {
            return unknown;
        };
        self.bands
            .iter()
            .position(|(_, below)| age < *below)
            .map_or((self.bands.len(), ADULT), |i| (i, self.bands[i].0.as_str()))
    }

    /// Every band name [`Self::band`] can answer.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.bands
            .iter()
            .map(|(name, _)| name.as_str())
            .chain([ADULT, UNKNOWN_AGE])
    }

    /// How many distinct answers [`Self::band`] can give.
    pub fn count(&self) -> usize {
        self.bands.len() + 2
    }
}

/// The purpose catalogue, TCF vendor rules and age bands of `consent.toml`
/// (the rest of that file is the consent service's, which checks all of it).
fn parse_consent_rules(text: &str) -> Result<ConsentRules, PolicyError> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        purposes: HashMap<String, Purpose>,
        #[serde(default)]
        tcf_vendors: HashMap<String, u16>,
        #[serde(default)]
        age_bands: Option<Bands>,
    }
    #[derive(serde::Deserialize)]
    struct Purpose {
        #[serde(default)]
        tcf_vendor_consent: bool,
    }
    #[derive(serde::Deserialize)]
    struct Bands {
        bands: Vec<Band>,
    }
    #[derive(serde::Deserialize)]
    struct Band {
        name: String,
        below: u32,
    }
    use figment::providers::{Format, Toml};
    let invalid = |reason: String| PolicyError::Invalid {
        file: CONSENT_RULES.to_string(),
        reason,
    };
    let file: File = figment::Figment::from(Toml::string(text))
        .extract()
        .map_err(|err| invalid(err.to_string()))?;
    let bands: Vec<(String, u32)> = file
        .age_bands
        .map(|b| b.bands.into_iter().map(|b| (b.name, b.below)).collect())
        .unwrap_or_default();
    if bands.windows(2).any(|w| w[0].1 >= w[1].1) {
        return Err(invalid(
            "age_bands: below must rise from band to band".into(),
        ));
    }
    Ok(ConsentRules {
        vendor_purposes: file
            .purposes
            .iter()
            .filter(|(_, p)| p.tcf_vendor_consent)
            .map(|(name, _)| name.clone())
            .collect(),
        purposes: file.purposes.into_keys().collect(),
        vendors: file.tcf_vendors,
        age_bands: AgeBands { bands },
    })
}

impl PolicySet {
    /// The ledger purpose holding the destination's TCF vendor consent, when
    /// `purpose` needs it and the destination kind is a TCF vendor. A person
    /// whose TC string refused that vendor does not cross to it for the
    /// purpose, whatever their purpose-level consent.
    pub fn tcf_vendor_purpose(&self, destination_kind: &str, purpose: &str) -> Option<String> {
        let rules = self.consent_rules.as_ref()?;
        if !rules.vendor_purposes.contains(purpose) {
            return None;
        }
        rules
            .vendors
            .get(destination_kind)
            .map(|vendor| madtech_proto::consent::tcf_vendor_purpose(*vendor))
    }

    /// The purposes a refusal of TCF vendor `purpose` (`tcf_vendor_<id>`)
    /// denies at a destination of `destination_kind`: every purpose that
    /// needs the vendor's consent when the kind is that vendor, none
    /// otherwise (nor for any other purpose).
    pub fn purposes_refused_with_vendor(
        &self,
        destination_kind: &str,
        purpose: &str,
    ) -> Vec<String> {
        let Some(rules) = self.consent_rules.as_ref() else {
            return Vec::new();
        };
        let is_the_kinds_vendor = rules
            .vendors
            .get(destination_kind)
            .is_some_and(|vendor| madtech_proto::consent::tcf_vendor_purpose(*vendor) == purpose);
        if !is_the_kinds_vendor {
            return Vec::new();
        }
        let mut purposes: Vec<String> = rules.vendor_purposes.iter().cloned().collect();
        purposes.sort_unstable();
        purposes
    }

    /// The purpose catalogue, when the directory has `consent.toml`.
    pub fn purposes(&self) -> Option<&BTreeSet<String>> {
        self.consent_rules.as_ref().map(|rules| &rules.purposes)
    }

    /// The age bands the consent policy decides on: none (everyone `adult`
    /// or `unknown`) without `consent.toml`.
    pub fn age_bands(&self) -> &AgeBands {
        static NONE: AgeBands = AgeBands { bands: Vec::new() };
        self.consent_rules
            .as_ref()
            .map_or(&NONE, |rules| &rules.age_bands)
    }

    /// Loads and validates every pair in `dir`.
    pub async fn load(dir: &Path) -> Result<Self, PolicyError> {
        Self::build(PolicyTexts::read(dir)?).await
    }

    async fn build(texts: PolicyTexts) -> Result<Self, PolicyError> {
        let consent_rules = texts
            .consent_rules
            .as_deref()
            .map(parse_consent_rules)
            .transpose()?;
        let [consent_texts, identifiers_texts, rbac_texts] = texts.pairs;
        let rbac = enforcer(RBAC, rbac_texts).await?;
        let consent = enforcer(CONSENT, consent_texts).await?;
        let identifiers = enforcer(IDENTIFIERS, identifiers_texts).await?;
        let known_regions = consent
            .get_named_grouping_policy("g2")
            .into_iter()
            .filter_map(|row| row.into_iter().next())
            .collect();
        Ok(PolicySet {
            rbac,
            consent,
            identifiers,
            known_regions,
            consent_rules,
            method_decisions: RwLock::new(HashMap::new()),
            version: texts.version,
            files: texts.files,
            loaded_at_micros: now_micros(),
        })
    }

    /// May `role` call the gRPC `method` (its full path)? Answers are
    /// remembered for the life of this set (a reload brings a new set and an
    /// empty memory), so a call costs a map lookup, not a casbin evaluation.
    pub fn allows_method(&self, role: &str, method: &str) -> Result<bool, PolicyError> {
        if let Ok(known) = self.method_decisions.read()
            && let Some(allowed) = known.get(role).and_then(|methods| methods.get(method))
        {
            return Ok(*allowed);
        }
        let allowed = evaluate(&self.rbac, (role, method))?;
        // Only methods the API has are remembered, so made-up paths cannot
        // grow the memory; and only while it is small.
        if crate::route::api_methods().contains(method)
            && let Ok(mut known) = self.method_decisions.write()
        {
            let size: usize = known.values().map(HashMap::len).sum();
            if size < MAX_REMEMBERED_DECISIONS {
                known
                    .entry(role.to_string())
                    .or_default()
                    .insert(method.to_string(), allowed);
            }
        }
        Ok(allowed)
    }

    /// May a person in `region` with `consent` for `purpose` reach a
    /// destination of `destination_kind`?
    pub fn allows_crossing(
        &self,
        destination_kind: &str,
        purpose: &str,
        region: &str,
        consent: &str,
        age_band: &str,
    ) -> Result<bool, PolicyError> {
        evaluate(
            &self.consent,
            (
                destination_kind,
                purpose,
                self.regime_region(region),
                consent,
                age_band,
            ),
        )
    }

    /// May an identifier of `kind` reach a destination of `destination_kind`
    /// in `form`?
    pub fn allows_identifier(
        &self,
        destination_kind: &str,
        kind: &str,
        form: &str,
    ) -> Result<bool, PolicyError> {
        evaluate(&self.identifiers, (destination_kind, kind, form))
    }

    /// The form in which an identifier of `kind` may reach a destination of
    /// `destination_kind`, or `None` when it may not cross. The policy must
    /// allow at most one form per pair (`madtech policy lint` checks);
    /// more than one is an error, so nothing crosses in a form nobody chose.
    pub fn identifier_form(
        &self,
        destination_kind: &str,
        kind: &str,
    ) -> Result<Option<Form>, PolicyError> {
        let mut allowed = None;
        for form in Form::ALL {
            if !self.allows_identifier(destination_kind, kind, form.name())? {
                continue;
            }
            if let Some(first) = allowed.replace(form) {
                return Err(PolicyError::Evaluate(format!(
                    "{}: {kind} may reach {destination_kind} as both {} and {}",
                    IDENTIFIERS.1,
                    first.name(),
                    form.name()
                )));
            }
        }
        Ok(allowed)
    }

    /// Like [`Self::allows_method`], with the rows that allowed it.
    pub fn explain_method(
        &self,
        role: &str,
        method: &str,
    ) -> Result<(bool, Vec<Vec<String>>), PolicyError> {
        explain(&self.rbac, (role, method))
    }

    /// Like [`Self::allows_crossing`], with the rows that allowed it.
    pub fn explain_crossing(
        &self,
        destination_kind: &str,
        purpose: &str,
        region: &str,
        consent: &str,
        age_band: &str,
    ) -> Result<(bool, Vec<Vec<String>>), PolicyError> {
        explain(
            &self.consent,
            (
                destination_kind,
                purpose,
                self.regime_region(region),
                consent,
                age_band,
            ),
        )
    }

    /// Like [`Self::allows_identifier`], with the rows that allowed it.
    pub fn explain_identifier(
        &self,
        destination_kind: &str,
        kind: &str,
        form: &str,
    ) -> Result<(bool, Vec<Vec<String>>), PolicyError> {
        explain(&self.identifiers, (destination_kind, kind, form))
    }

    /// Every row of every policy file, as `[ptype, field…]`, by file name.
    pub fn rows(&self) -> BTreeMap<&'static str, Vec<Vec<String>>> {
        let mut rows = BTreeMap::new();
        for (file, enforcer) in [
            (RBAC.1, &self.rbac),
            (CONSENT.1, &self.consent),
            (IDENTIFIERS.1, &self.identifiers),
        ] {
            let mut all = Vec::new();
            for (section, sections) in enforcer.get_model().get_model() {
                if section != "p" && section != "g" {
                    continue;
                }
                for (ptype, assertion) in sections {
                    for row in assertion.get_policy() {
                        let mut full = vec![ptype.clone()];
                        full.extend(row.iter().cloned());
                        all.push(full);
                    }
                }
            }
            all.sort();
            rows.insert(file, all);
        }
        rows
    }

    /// The region a decision is asked under: the person's, when the policy
    /// knows it, otherwise [`UNKNOWN_REGION`].
    pub fn regime_region<'a>(&self, region: &'a str) -> &'a str {
        if self.known_regions.contains(region) {
            region
        } else {
            UNKNOWN_REGION
        }
    }
}

pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn explain<A: casbin::EnforceArgs>(
    enforcer: &Enforcer,
    args: A,
) -> Result<(bool, Vec<Vec<String>>), PolicyError> {
    enforcer
        .enforce_ex(args)
        .map_err(|err| PolicyError::Evaluate(err.to_string()))
}

fn evaluate<A: casbin::EnforceArgs>(enforcer: &Enforcer, args: A) -> Result<bool, PolicyError> {
    enforcer
        .enforce(args)
        .map_err(|err| PolicyError::Evaluate(err.to_string()))
}

async fn enforcer(
    pair: (&str, &str),
    (model, policy): (String, String),
) -> Result<Enforcer, PolicyError> {
    let invalid = |file: &str, reason: String| PolicyError::Invalid {
        file: file.to_string(),
        reason,
    };
    let model = DefaultModel::from_str(&model)
        .await
        .map_err(|err| invalid(pair.0, err.to_string()))?;
    check_rows(&model, pair.1, &policy)?;
    Enforcer::new(model, StringAdapter::new(policy))
        .await
        .map_err(|err| invalid(pair.1, err.to_string()))
}

/// casbin silently skips rows of unknown types and evaluates rows of the
/// wrong width unpredictably; a policy with either is refused instead.
fn check_rows(model: &DefaultModel, file: &str, policy: &str) -> Result<(), PolicyError> {
    let model = model.get_model();
    let width = |section: &str, ptype: &str| -> Option<usize> {
        let assertion = model.get(section)?.get(ptype)?;
        Some(if section == "g" {
            assertion.value.matches('_').count()
        } else {
            assertion.tokens.len()
        })
    };
    for (number, line) in policy.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let ptype = fields[0];
        let section = if ptype.starts_with('g') { "g" } else { "p" };
        let problem = if line.contains('"') {
            Some("quoted fields are not supported".to_string())
        } else if fields.iter().any(|f| f.is_empty()) {
            Some("empty field".to_string())
        } else {
            match width(section, ptype) {
                None => Some(format!("the model defines no {ptype:?}")),
                Some(expected) if expected != fields.len() - 1 => Some(format!(
                    "{ptype} rows have {expected} fields, this one has {}",
                    fields.len() - 1
                )),
                Some(_) => None,
            }
        };
        if let Some(reason) = problem {
            return Err(PolicyError::Invalid {
                file: file.to_string(),
                reason: format!("line {}: {reason}", number + 1),
            });
        }
    }
    Ok(())
}

/// The policy set in force, shared by every layer. Readers take a snapshot
/// without locking; a new set is swapped in whole.
#[derive(Clone, Default)]
pub struct Policies(Arc<ArcSwapOption<PolicySet>>);

impl Policies {
    pub fn new(set: PolicySet) -> Self {
        report_in_force(None, &set.version);
        Policies(Arc::new(ArcSwapOption::from_pointee(set)))
    }

    /// The set in force, or `None` when no valid set is loaded (then
    /// nothing is allowed).
    pub fn current(&self) -> Option<Arc<PolicySet>> {
        self.0.load_full()
    }

    /// Puts `set` in force for every request that starts from now on.
    pub fn replace(&self, set: PolicySet) {
        let version = set.version.clone();
        let previous = self.0.swap(Some(Arc::new(set)));
        report_in_force(previous.as_ref().map(|p| p.version.as_str()), &version);
    }
}

/// `madtech_gateway_policy_info{version}` is 1 for the set in force and 0
/// for the one it replaced, so dashboards and alerts see which set decides;
/// `madtech_gateway_policy_loaded_timestamp_seconds` says since when.
fn report_in_force(previous: Option<&str>, version: &str) {
    if let Some(previous) = previous.filter(|p| *p != version) {
        metrics::gauge!("madtech_gateway_policy_info", "version" => previous.to_string()).set(0.0);
    }
    metrics::gauge!("madtech_gateway_policy_info", "version" => version.to_string()).set(1.0);
    metrics::gauge!("madtech_gateway_policy_loaded_timestamp_seconds")
        .set(now_micros() as f64 / 1e6);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shipped() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
    }

    async fn policies() -> PolicySet {
        PolicySet::load(&shipped())
            .await
            .expect("the shipped policies load")
    }

    fn copy_to_temp() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        for (model, policy) in [RBAC, CONSENT, IDENTIFIERS] {
            for name in [model, policy] {
                std::fs::copy(shipped().join(name), dir.path().join(name)).expect("copy");
            }
        }
        std::fs::copy(
            shipped().join(CONSENT_RULES),
            dir.path().join(CONSENT_RULES),
        )
        .expect("copy");
        dir
    }

    #[tokio::test]
    async fn age_bands_turn_on_the_birthday() {
        let p = policies().await;
        let bands = p.age_bands();
        let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 30).expect("date");
        assert_eq!(bands.band("2010-11-30", today).1, "16_17", "16 today");
        assert_eq!(bands.band("2010-12-01", today).1, "under_16", "16 tomorrow");
        assert_eq!(bands.band("2008-11-30", today).1, "adult", "18 today");
        assert_eq!(bands.band("2008-12-01", today).1, "16_17");
        assert_eq!(bands.band("", today).1, "unknown");
        assert_eq!(bands.band("30/11/2010", today).1, "unknown");
        assert_eq!(bands.band("2030-01-01", today).1, "unknown", "not born yet");
        let indexes: BTreeSet<usize> = ["2020-01-01", "2009-06-01", "1980-01-01", ""]
            .into_iter()
            .map(|born| bands.band(born, today).0)
            .collect();
        assert_eq!(indexes.len(), bands.count(), "one slot per answer");
        assert_eq!(
            bands.names().collect::<Vec<_>>(),
            ["under_16", "16_17", "adult", "unknown"]
        );
        assert!(
            !p.allows_crossing("file", "ad_targeting", "FR", "granted", "16_17")
                .expect("eval"),
            "no profiling ads to minors in the EU"
        );
    }

    #[tokio::test]
    async fn tcf_vendor_destinations_need_their_vendor_consent_for_targeting_only() {
        let p = policies().await;
        assert_eq!(
            p.tcf_vendor_purpose("google_ads", "ad_targeting")
                .as_deref(),
            Some("tcf_vendor_755")
        );
        assert_eq!(
            p.tcf_vendor_purpose("file", "ad_targeting"),
            None,
            "not a TCF vendor"
        );
        assert_eq!(
            p.tcf_vendor_purpose("google_ads", "ad_measurement"),
            None,
            "the purpose does not ask for vendor consent"
        );
        assert!(
            p.files.iter().any(|f| f == CONSENT_RULES),
            "part of the version"
        );

        // Without consent.toml there are no vendor rules, and a broken one
        // refuses the set.
        let dir = copy_to_temp();
        std::fs::remove_file(dir.path().join(CONSENT_RULES)).expect("remove");
        let bare = PolicySet::load(dir.path()).await.expect("loads");
        assert_eq!(bare.tcf_vendor_purpose("google_ads", "ad_targeting"), None);
        std::fs::write(dir.path().join(CONSENT_RULES), "tcf_vendors = 3").expect("write");
        assert!(PolicySet::load(dir.path()).await.is_err());
    }

    #[tokio::test]
    async fn roles_reach_only_their_methods() {
        let p = policies().await;
        let export = "/madtech.segments.v1.SegmentService/ExportAudience";
        let upsert = "/madtech.profiles.v1.ProfileService/UpsertProfile";
        let sync = "/madtech.activation.v1.ActivationService/RunSync";
        assert!(p.allows_method("admin", upsert).expect("eval"));
        assert!(p.allows_method("activation", export).expect("eval"));
        assert!(p.allows_method("activation", sync).expect("eval"));
        assert!(!p.allows_method("activation", upsert).expect("eval"));
        assert!(
            !p.allows_method(
                "activation",
                "/madtech.profiles.v1.ProfileService/GetProfile"
            )
            .expect("eval")
        );
        assert!(
            !p.allows_method(
                "activation",
                "/madtech.consent.v1.ConsentService/WatchConsentChanges"
            )
            .expect("eval")
        );
        assert!(p.allows_method("ingest", upsert).expect("eval"));
        assert!(!p.allows_method("ingest", export).expect("eval"));
        assert!(!p.allows_method("marketer", export).expect("eval"));
        assert!(!p.allows_method("nobody", upsert).expect("eval"));
    }

    #[tokio::test]
    async fn gdpr_is_opt_in_and_ccpa_opt_out() {
        let p = policies().await;
        let cases = [
            ("FR", "granted", true),
            ("FR", "unset", false),
            ("FR", "denied", false),
            ("GB", "granted", true),
            ("GB", "unset", false),
            ("US-CA", "unset", true),
            ("US-CA", "granted", true),
            ("US-CA", "denied", false),
            ("US-VA", "unset", true),
            ("US-VA", "denied", false),
            // Unknown regions get the strictest regime.
            ("", "granted", true),
            ("", "unset", false),
            ("XX", "unset", false),
        ];
        for (region, consent, expected) in cases {
            let got = p
                .allows_crossing("file", "ad_targeting", region, consent, "adult")
                .expect("eval");
            assert_eq!(got, expected, "{region} {consent}");
        }
        assert!(
            !p.allows_crossing("file", "email_marketing", "US-CA", "unset", "adult")
                .expect("eval"),
            "purposes without rules are denied"
        );
        assert!(
            !p.allows_crossing("unknown_kind", "ad_targeting", "US-CA", "unset", "adult")
                .expect("eval"),
            "destinations without a class are denied"
        );
    }

    #[tokio::test]
    async fn identifiers_cross_only_hashed() {
        let p = policies().await;
        assert!(
            p.allows_identifier("file", "email", "sha256")
                .expect("eval")
        );
        assert!(!p.allows_identifier("file", "email", "raw").expect("eval"));
        assert!(
            !p.allows_identifier("file", "customer_id", "sha256")
                .expect("eval")
        );
    }

    #[tokio::test]
    async fn the_version_changes_with_the_content() {
        let dir = copy_to_temp();
        let before = PolicySet::load(dir.path()).await.expect("load").version;
        assert_eq!(before, policies().await.version);
        let path = dir.path().join(RBAC.1);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str("p, marketer, /madtech.segments.v1.SegmentService/ExportAudience\n");
        std::fs::write(&path, text).expect("write");
        let after = PolicySet::load(dir.path()).await.expect("load");
        assert_ne!(after.version, before);
        assert_eq!(after.files.len(), 7);
    }

    #[tokio::test]
    async fn a_changed_valid_set_is_put_in_force_and_a_broken_one_is_refused() {
        let dir = copy_to_temp();
        let policies = Policies::new(PolicySet::load(dir.path()).await.expect("load"));
        let first = policies.current().expect("set").version.clone();
        let mut reloader = Reloader::new(dir.path(), policies.clone());
        assert_eq!(reloader.check().await, Reload::Unchanged);

        let rbac = dir.path().join(RBAC.1);
        let mut text = std::fs::read_to_string(&rbac).expect("read");
        text.push_str("p, marketer, /madtech.segments.v1.SegmentService/ExportAudience\n");
        std::fs::write(&rbac, &text).expect("write");
        let Reload::Replaced(second) = reloader.check().await else {
            panic!("a valid change is put in force");
        };
        assert_ne!(second, first);
        let export = "/madtech.segments.v1.SegmentService/ExportAudience";
        assert!(
            policies
                .current()
                .expect("set")
                .allows_method("marketer", export)
                .expect("eval")
        );

        std::fs::write(&rbac, "p, marketer\n").expect("break it");
        assert!(matches!(reloader.check().await, Reload::Refused(_)));
        assert_eq!(
            policies.current().expect("set").version,
            second,
            "the last good set stays"
        );
        assert!(
            policies
                .current()
                .expect("set")
                .allows_method("marketer", export)
                .expect("eval")
        );
        assert_eq!(
            reloader.check().await,
            Reload::Unchanged,
            "refused once, not again"
        );

        std::fs::remove_file(&rbac).expect("remove");
        assert!(matches!(reloader.check().await, Reload::Refused(_)));
        assert_eq!(policies.current().expect("set").version, second);
    }

    #[tokio::test]
    async fn broken_sets_are_refused_with_the_file_and_line() {
        for (file, text, expect) in [
            (RBAC.1, "p, admin\n", "line 1"),
            (RBAC.1, "x, admin, /*\n", "defines no"),
            (CONSENT.1, "g2, FR\n", "fields"),
            (
                RBAC.0,
                "[request_definition]\nr = role\n[matchers]\nm = r.nope(\n",
                "",
            ),
        ] {
            let dir = copy_to_temp();
            std::fs::write(dir.path().join(file), text).expect("write");
            let err = PolicySet::load(dir.path()).await.expect_err(file);
            let message = err.to_string();
            assert!(message.contains(expect), "{message}");
        }
        let dir = copy_to_temp();
        std::fs::remove_file(dir.path().join(IDENTIFIERS.0)).expect("rm");
        assert!(matches!(
            PolicySet::load(dir.path()).await,
            Err(PolicyError::Read { .. })
        ));
    }
}
