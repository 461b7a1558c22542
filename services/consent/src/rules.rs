//! The consent policy compliance owns (`policies/consent.toml`): the purpose
//! catalogue, which signal fields opt out of which purpose, where GPC is
//! binding, when choices expire and when a business may ask again. Regions
//! map to regimes through the `g2` rows of the gateway's consent policy, so
//! both services read the same map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

use crate::ledger::Choice;

/// The model and policy pair whose `g2` rows map regions to regimes.
const REGIME_MODEL: &str = "consent_model.conf";
const REGIME_POLICY: &str = "consent_policy.csv";
/// The consent service's own policy file.
pub const POLICY_FILE: &str = "consent.toml";
/// The region asked for when the map does not know a region (ISO 3166's
/// "unknown"), as the gateway does.
const UNKNOWN_REGION: &str = "ZZ";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

fn invalid(file: impl Into<String>, reason: impl Into<String>) -> RulesError {
    RulesError::Invalid {
        file: file.into(),
        reason: reason.into(),
    }
}

/// A signal field that can opt a person out of a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OptOutField {
    UspSale,
    GppSale,
    GppSharing,
    GppTargetedAdvertising,
    GppSensitiveData,
    Gpc,
}

impl OptOutField {
    const ALL: [OptOutField; 6] = [
        OptOutField::UspSale,
        OptOutField::GppSale,
        OptOutField::GppSharing,
        OptOutField::GppTargetedAdvertising,
        OptOutField::GppSensitiveData,
        OptOutField::Gpc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OptOutField::UspSale => "usp.opt_out_sale",
            OptOutField::GppSale => "gpp.sale_opt_out",
            OptOutField::GppSharing => "gpp.sharing_opt_out",
            OptOutField::GppTargetedAdvertising => "gpp.targeted_advertising_opt_out",
            OptOutField::GppSensitiveData => "gpp.sensitive_data_processing",
            OptOutField::Gpc => "gpc",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|field| field.as_str() == name)
    }
}

/// One purpose of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purpose {
    pub name: String,
    pub description: String,
    /// TCF purposes that must all be consented to; empty when TCF says
    /// nothing about this purpose.
    pub tcf_purposes: Vec<u8>,
    /// Also needs the destination's TCF vendor consent.
    pub tcf_vendor_consent: bool,
    pub opted_out_by: BTreeSet<OptOutField>,
}

/// Choices of a state expire this long after collection in these regimes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub name: String,
    pub regimes: BTreeSet<String>,
    pub state: Choice,
    pub after: Duration,
}

/// After a denial in these regimes, a grant of these purposes is refused
/// for `wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reask {
    pub name: String,
    pub regimes: BTreeSet<String>,
    pub purposes: BTreeSet<String>,
    pub wait: Duration,
    pub unless_person_initiated: bool,
}

/// How data-subject requests are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivacyRules {
    pub default_within: Duration,
    pub opt_out_purposes: Vec<String>,
    /// (regimes, within), in file order.
    pub deadlines: Vec<(BTreeSet<String>, Duration)>,
}

/// The whole policy, loaded and checked.
#[derive(Debug, Clone)]
pub struct ConsentRules {
    purposes: BTreeMap<String, Purpose>,
    gpc_binding: BTreeSet<String>,
    expiry: Vec<Expiry>,
    reask: Vec<Reask>,
    privacy: PrivacyRules,
    /// TCF vendor ids whose consent a TC string records, by destination kind.
    tcf_vendors: BTreeMap<String, u16>,
    /// Region or group → the groups it belongs to (the `g2` rows).
    region_groups: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    purposes: BTreeMap<String, PurposeFile>,
    gpc: GpcFile,
    #[serde(default)]
    expiry: Vec<ExpiryFile>,
    #[serde(default)]
    reask: Vec<ReaskFile>,
    privacy_requests: PrivacyFile,
    #[serde(default)]
    tcf_vendors: BTreeMap<String, u16>,
    /// The gateway's; checked here so `madtech policy lint` reports mistakes.
    #[serde(default)]
    age_bands: Option<AgeBandsFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgeBandsFile {
    bands: Vec<AgeBandFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgeBandFile {
    name: String,
    below: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacyFile {
    #[serde(with = "humantime_serde")]
    default_within: Duration,
    opt_out_purposes: Vec<String>,
    #[serde(default)]
    deadline: Vec<DeadlineFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadlineFile {
    regimes: Vec<String>,
    #[serde(with = "humantime_serde")]
    within: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurposeFile {
    description: String,
    #[serde(default)]
    tcf_purposes: Vec<u8>,
    #[serde(default)]
    tcf_vendor_consent: bool,
    #[serde(default)]
    opted_out_by: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpcFile {
    binding_regimes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpiryFile {
    name: String,
    regimes: Vec<String>,
    state: String,
    #[serde(with = "humantime_serde")]
    after: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReaskFile {
    name: String,
    regimes: Vec<String>,
    purposes: Vec<String>,
    #[serde(with = "humantime_serde")]
    wait: Duration,
    #[serde(default)]
    unless_person_initiated: bool,
}

impl ConsentRules {
    /// Reads `consent.toml` and the regime map from the policy directory.
    pub async fn load(dir: &Path) -> Result<Self, RulesError> {
        let region_rows = regime_rows(dir).await?;
        let text = std::fs::read_to_string(dir.join(POLICY_FILE))
            .map_err(|err| invalid(POLICY_FILE, err.to_string()))?;
        Self::from_parts(&text, region_rows)
    }

    /// Builds the rules from the policy text and the `g2` rows
    /// (region or group, group).
    pub fn from_parts(
        policy_text: &str,
        region_rows: Vec<(String, String)>,
    ) -> Result<Self, RulesError> {
        let file: PolicyFile = Figment::from(Toml::string(policy_text))
            .extract()
            .map_err(|err| invalid(POLICY_FILE, err.to_string()))?;
        let mut region_groups: HashMap<String, Vec<String>> = HashMap::new();
        for (member, group) in region_rows {
            region_groups.entry(member).or_default().push(group);
        }
        let known_regimes: BTreeSet<&str> = region_groups
            .values()
            .flatten()
            .map(String::as_str)
            .collect();
        let check_regimes = |what: &str,
                             regimes: Vec<String>|
         -> Result<BTreeSet<String>, RulesError> {
            for regime in &regimes {
                if !known_regimes.contains(regime.as_str()) {
                    return Err(invalid(
                        POLICY_FILE,
                        format!("{what}: regime {regime:?} is not in {REGIME_POLICY}'s g2 rows"),
                    ));
                }
            }
            Ok(regimes.into_iter().collect())
        };

        let mut purposes = BTreeMap::new();
        for (name, purpose) in file.purposes {
            madtech_common::validate::policy_name("purpose", &name)
                .map_err(|err| invalid(POLICY_FILE, format!("purposes.{name}: {}", err.reason)))?;
            if let Some(bad) = purpose.tcf_purposes.iter().find(|p| !(1..=24).contains(*p)) {
                return Err(invalid(
                    POLICY_FILE,
                    format!("purposes.{name}.tcf_purposes: {bad} is not a TCF purpose (1 to 24)"),
                ));
            }
            let mut opted_out_by = BTreeSet::new();
            for field in &purpose.opted_out_by {
                let parsed = OptOutField::parse(field).ok_or_else(|| {
                    invalid(
                        POLICY_FILE,
                        format!("purposes.{name}.opted_out_by: unknown signal field {field:?}"),
                    )
                })?;
                opted_out_by.insert(parsed);
            }
            let mut tcf_purposes = purpose.tcf_purposes;
            tcf_purposes.sort_unstable();
            tcf_purposes.dedup();
            purposes.insert(
                name.clone(),
                Purpose {
                    name,
                    description: purpose.description,
                    tcf_purposes,
                    tcf_vendor_consent: purpose.tcf_vendor_consent,
                    opted_out_by,
                },
            );
        }
        if purposes.is_empty() {
            return Err(invalid(POLICY_FILE, "the purpose catalogue is empty"));
        }
        let gpc_binding = check_regimes("gpc.binding_regimes", file.gpc.binding_regimes)?;
        let mut expiry = Vec::new();
        for rule in file.expiry {
            let what = format!("expiry {:?}", rule.name);
            let state = match rule.state.as_str() {
                "granted" => Choice::Granted,
                "denied" => Choice::Denied,
                other => {
                    return Err(invalid(
                        POLICY_FILE,
                        format!("{what}: state {other:?} is not granted or denied"),
                    ));
                }
            };
            if rule.after.is_zero() {
                return Err(invalid(
                    POLICY_FILE,
                    format!("{what}: after must be positive"),
                ));
            }
            expiry.push(Expiry {
                regimes: check_regimes(&what, rule.regimes)?,
                name: rule.name,
                state,
                after: rule.after,
            });
        }
        let mut reask = Vec::new();
        for rule in file.reask {
            let what = format!("reask {:?}", rule.name);
            if let Some(unknown) = rule.purposes.iter().find(|p| !purposes.contains_key(*p)) {
                return Err(invalid(
                    POLICY_FILE,
                    format!("{what}: purpose {unknown:?} is not in the catalogue"),
                ));
            }
            reask.push(Reask {
                regimes: check_regimes(&what, rule.regimes)?,
                purposes: rule.purposes.into_iter().collect(),
                name: rule.name,
                wait: rule.wait,
                unless_person_initiated: rule.unless_person_initiated,
            });
        }
        let privacy_file = file.privacy_requests;
        if let Some(unknown) = privacy_file
            .opt_out_purposes
            .iter()
            .find(|p| !purposes.contains_key(*p))
        {
            return Err(invalid(
                POLICY_FILE,
                format!("privacy_requests.opt_out_purposes: {unknown:?} is not in the catalogue"),
            ));
        }
        let mut deadlines = Vec::new();
        for rule in privacy_file.deadline {
            if rule.within.is_zero() {
                return Err(invalid(
                    POLICY_FILE,
                    "privacy_requests.deadline: within must be positive",
                ));
            }
            deadlines.push((
                check_regimes("privacy_requests.deadline", rule.regimes)?,
                rule.within,
            ));
        }
        if privacy_file.default_within.is_zero() {
            return Err(invalid(
                POLICY_FILE,
                "privacy_requests.default_within must be positive",
            ));
        }
        let privacy = PrivacyRules {
            default_within: privacy_file.default_within,
            opt_out_purposes: privacy_file.opt_out_purposes,
            deadlines,
        };
        let mut floor = 0;
        for band in file.age_bands.iter().flat_map(|bands| &bands.bands) {
            let what = format!("age_bands: band {:?}", band.name);
            // Bands such as `16_17` may start with a digit.
            let snake = (1..=64).contains(&band.name.len())
                && band
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !snake {
                return Err(invalid(
                    POLICY_FILE,
                    format!("{what}: not a snake_case name"),
                ));
            }
            if matches!(band.name.as_str(), "adult" | "unknown") {
                return Err(invalid(
                    POLICY_FILE,
                    format!("{what}: adult and unknown are implied"),
                ));
            }
            if band.below <= floor || band.below > 130 {
                return Err(invalid(
                    POLICY_FILE,
                    format!("{what}: below must rise from band to band, at most 130"),
                ));
            }
            floor = band.below;
        }
        for (kind, vendor) in &file.tcf_vendors {
            madtech_common::validate::policy_name("destination kind", kind).map_err(|err| {
                invalid(POLICY_FILE, format!("tcf_vendors.{kind}: {}", err.reason))
            })?;
            if *vendor == 0 {
                return Err(invalid(
                    POLICY_FILE,
                    format!("tcf_vendors.{kind}: 0 is not a vendor id"),
                ));
            }
        }
        Ok(ConsentRules {
            purposes,
            gpc_binding,
            expiry,
            reask,
            privacy,
            tcf_vendors: file.tcf_vendors,
            region_groups,
        })
    }

    pub fn purpose(&self, name: &str) -> Option<&Purpose> {
        self.purposes.get(name)
    }

    pub fn purposes(&self) -> impl Iterator<Item = &Purpose> {
        self.purposes.values()
    }

    /// Every group a region belongs to, directly or through other groups;
    /// an unknown region is treated as `ZZ`.
    pub fn regimes_of(&self, region: &str) -> BTreeSet<String> {
        let start = if self.region_groups.contains_key(region) {
            region
        } else {
            UNKNOWN_REGION
        };
        let mut found = BTreeSet::new();
        let mut pending = vec![start];
        while let Some(member) = pending.pop() {
            for group in self.region_groups.get(member).into_iter().flatten() {
                if found.insert(group.clone()) {
                    pending.push(group);
                }
            }
        }
        found
    }

    /// Whether GPC is a binding opt-out in any of these regimes.
    pub fn gpc_binding(&self, regimes: &BTreeSet<String>) -> bool {
        !self.gpc_binding.is_disjoint(regimes)
    }

    /// How long a choice lasts in these regimes: the shortest matching rule.
    pub fn lifetime(&self, regimes: &BTreeSet<String>, choice: Choice) -> Option<Duration> {
        self.expiry
            .iter()
            .filter(|rule| rule.state == choice && !rule.regimes.is_disjoint(regimes))
            .map(|rule| rule.after)
            .min()
    }

    /// The TCF vendor ids whose consent TC strings record: only when some
    /// purpose needs vendor consent.
    pub fn tcf_vendors(&self) -> impl Iterator<Item = u16> + '_ {
        let needed = self.purposes.values().any(|p| p.tcf_vendor_consent);
        let vendors: BTreeSet<u16> = if needed {
            self.tcf_vendors.values().copied().collect()
        } else {
            BTreeSet::new()
        };
        vendors.into_iter()
    }

    pub fn privacy(&self) -> &PrivacyRules {
        &self.privacy
    }

    /// How long a data-subject request from this region may take, and the
    /// regime that sets it ("" for the default): the shortest matching rule.
    pub fn request_deadline(&self, region: &str) -> (String, Duration) {
        let regimes = self.regimes_of(region);
        self.privacy
            .deadlines
            .iter()
            .filter_map(|(rule_regimes, within)| {
                rule_regimes
                    .intersection(&regimes)
                    .next()
                    .map(|regime| (regime.clone(), *within))
            })
            .min_by_key(|(_, within)| *within)
            .unwrap_or_else(|| (String::new(), self.privacy.default_within))
    }

    /// The re-ask rules that hold back a grant of `purpose` in these regimes.
    pub fn reask_rules<'a>(
        &'a self,
        regimes: &'a BTreeSet<String>,
        purpose: &'a str,
    ) -> impl Iterator<Item = &'a Reask> + 'a {
        self.reask.iter().filter(move |rule| {
            rule.purposes.contains(purpose) && !rule.regimes.is_disjoint(regimes)
        })
    }
}

/// The `g2` rows of the consent policy, read through casbin so they are
/// understood exactly as the gateway understands them.
async fn regime_rows(dir: &Path) -> Result<Vec<(String, String)>, RulesError> {
    use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, StringAdapter};
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file)).map_err(|err| invalid(file, err.to_string()))
    };
    let model = DefaultModel::from_str(&read(REGIME_MODEL)?)
        .await
        .map_err(|err| invalid(REGIME_MODEL, err.to_string()))?;
    let enforcer = Enforcer::new(model, StringAdapter::new(read(REGIME_POLICY)?))
        .await
        .map_err(|err| invalid(REGIME_POLICY, err.to_string()))?;
    Ok(enforcer
        .get_named_grouping_policy("g2")
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [member, group, ..] => Some((member.clone(), group.clone())),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn shipped_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
    }

    pub(crate) async fn shipped() -> ConsentRules {
        ConsentRules::load(&shipped_dir())
            .await
            .expect("shipped policy loads")
    }

    fn rows() -> Vec<(String, String)> {
        [
            ("FR", "EEA"),
            ("EEA", "GDPR"),
            ("US-CA", "CCPA"),
            ("ZZ", "GDPR"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    const MINIMAL: &str = r#"
        [purposes.ad_targeting]
        description = "ads"
        tcf_purposes = [4, 1, 3, 3]
        opted_out_by = ["gpc"]
        [gpc]
        binding_regimes = ["CCPA"]
        [privacy_requests]
        default_within = "28days"
        opt_out_purposes = ["ad_targeting"]
        [[privacy_requests.deadline]]
        regimes = ["CCPA"]
        within = "45days"
    "#;

    #[tokio::test]
    async fn the_shipped_policy_loads_with_the_catalogue_the_suite_needs() {
        let rules = shipped().await;
        for purpose in [
            "analytics",
            "personalization",
            "email_marketing",
            "ad_targeting",
            "ad_measurement",
            "data_sale",
            "sensitive_data",
        ] {
            assert!(rules.purpose(purpose).is_some(), "{purpose}");
        }
        assert_eq!(
            rules
                .purpose("ad_targeting")
                .expect("in the catalogue")
                .tcf_purposes,
            [1, 3, 4]
        );
        assert!(rules.gpc_binding(&rules.regimes_of("US-CA")));
        assert!(rules.gpc_binding(&rules.regimes_of("US-CO")));
        assert!(!rules.gpc_binding(&rules.regimes_of("FR")));
    }

    #[test]
    fn regions_reach_their_regimes_through_groups_and_unknown_regions_are_zz() {
        let rules = ConsentRules::from_parts(MINIMAL, rows()).expect("valid");
        assert_eq!(
            rules.regimes_of("FR"),
            BTreeSet::from(["EEA".to_string(), "GDPR".to_string()])
        );
        assert_eq!(rules.regimes_of("BR"), BTreeSet::from(["GDPR".to_string()]));
        assert_eq!(
            rules
                .purpose("ad_targeting")
                .expect("in the catalogue")
                .tcf_purposes,
            [1, 3, 4],
            "sorted, without repeats"
        );
    }

    #[test]
    fn request_deadlines_follow_the_regime_with_a_default() {
        let rules = ConsentRules::from_parts(MINIMAL, rows()).expect("valid");
        let day = Duration::from_secs(86_400);
        assert_eq!(
            rules.request_deadline("US-CA"),
            ("CCPA".to_string(), 45 * day)
        );
        assert_eq!(rules.request_deadline("FR"), (String::new(), 28 * day));
    }

    #[test]
    fn the_shortest_matching_expiry_applies() {
        let policy = format!(
            "{MINIMAL}
            [[expiry]]
            name = \"long\"
            regimes = [\"GDPR\"]
            state = \"granted\"
            after = \"395days\"
            [[expiry]]
            name = \"short\"
            regimes = [\"EEA\"]
            state = \"granted\"
            after = \"30days\""
        );
        let rules = ConsentRules::from_parts(&policy, rows()).expect("valid");
        let day = Duration::from_secs(86_400);
        assert_eq!(
            rules.lifetime(&rules.regimes_of("FR"), Choice::Granted),
            Some(30 * day)
        );
        assert_eq!(
            rules.lifetime(&rules.regimes_of("FR"), Choice::Denied),
            None
        );
        assert_eq!(
            rules.lifetime(&rules.regimes_of("US-CA"), Choice::Granted),
            None
        );
    }

    #[test]
    fn mistakes_in_the_policy_are_errors_that_say_where() {
        let cases = [
            ("[gpc]\nbinding_regimes = []", "purposes"),
            (
                "[purposes.Ads]\ndescription = \"x\"\n[gpc]\nbinding_regimes = []",
                "purposes.Ads",
            ),
            (
                "[purposes.ads]\ndescription = \"x\"\ntcf_purposes = [0]\n[gpc]\nbinding_regimes = []",
                "not a TCF purpose",
            ),
            (
                "[purposes.ads]\ndescription = \"x\"\nopted_out_by = [\"usp.sale\"]\n[gpc]\nbinding_regimes = []",
                "unknown signal field",
            ),
            (
                "[purposes.ads]\ndescription = \"x\"\n[gpc]\nbinding_regimes = [\"NOWHERE\"]",
                "regime \"NOWHERE\"",
            ),
            (
                "[purposes.ads]\ndescription = \"x\"\n[gpc]\nbinding_regimes = []\n[[reask]]\nname = \"r\"\nregimes = [\"CCPA\"]\npurposes = [\"other\"]\nwait = \"1day\"",
                "not in the catalogue",
            ),
            (
                "[purposes.ads]\ndescription = \"x\"\n[gpc]\nbinding_regimes = []\n[[expiry]]\nname = \"e\"\nregimes = [\"GDPR\"]\nstate = \"unset\"\nafter = \"1day\"",
                "not granted or denied",
            ),
            (
                "[purposes.ads]\ndescription = \"x\"\nsurprise = 1\n[gpc]\nbinding_regimes = []",
                "surprise",
            ),
        ];
        for (text, expected) in cases {
            let text = format!(
                "{text}\n[privacy_requests]\ndefault_within = \"1day\"\nopt_out_purposes = []"
            );
            let text = text.as_str();
            let err = ConsentRules::from_parts(text, rows())
                .expect_err(text)
                .to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }
}
