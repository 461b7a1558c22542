//! Identity resolution rules and the plan they give for one call: which
//! profiles merge, which new identifiers attach, and which identifiers are
//! kept apart (and why). Pure: the store gathers the facts and applies the
//! plan in one transaction.
//!
//! The rules are a file a user can change (`policies/identity.toml`): per-kind
//! limits, priorities and blocked values, and custom identifier kinds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;

use crate::identity::{CustomNormalisation, Identifier, IdentifierKind, Normaliser};

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("identity rules {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// One kind's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindRule {
    /// At most this many identifiers of the kind per person; unlimited when
    /// absent.
    pub limit: Option<u32>,
    /// Lower wins: identifiers are linked in priority order, and one that
    /// would break a limit is kept apart.
    pub priority: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomKind {
    normalise: CustomNormalisation,
    #[serde(flatten)]
    rule: KindRule,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockedValue {
    kind: String,
    value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    kinds: BTreeMap<String, KindRule>,
    #[serde(default)]
    custom_kinds: BTreeMap<String, CustomKind>,
    #[serde(default)]
    blocked: Vec<BlockedValue>,
}

/// The rules in force.
#[derive(Debug, Clone, Default)]
pub struct IdentityRules {
    rules: BTreeMap<String, KindRule>,
    custom: Vec<(String, CustomNormalisation)>,
    /// Blocked values, normalised, as identifier keys.
    blocked: BTreeSet<String>,
}

/// Priority of a kind the rules do not mention: after every named kind.
const UNRANKED: u32 = u32::MAX;

impl IdentityRules {
    /// Reads and checks the rules file. `default_phone_region` normalises
    /// blocked phone numbers the way incoming ones are.
    pub fn load(path: &Path, default_phone_region: &str) -> Result<Self, RulesError> {
        let invalid = |reason: String| RulesError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(invalid("no such file".into()));
        }
        let file: RulesFile = Figment::from(Toml::file(path))
            .extract()
            .map_err(|err| invalid(err.to_string()))?;
        Self::from_file(file, default_phone_region).map_err(invalid)
    }

    /// Parses rules from TOML text (tests and tools).
    pub fn parse(text: &str, default_phone_region: &str) -> Result<Self, String> {
        let file: RulesFile = Figment::from(Toml::string(text))
            .extract()
            .map_err(|err| err.to_string())?;
        Self::from_file(file, default_phone_region)
    }

    fn from_file(file: RulesFile, default_phone_region: &str) -> Result<Self, String> {
        for name in file.kinds.keys() {
            if IdentifierKind::built_in(name).is_none() {
                return Err(format!(
                    "kinds.{name}: not a built-in kind; declare it under [custom_kinds.{name}]"
                ));
            }
        }
        let mut rules = file.kinds;
        let mut custom = Vec::new();
        for (name, kind) in file.custom_kinds {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid || IdentifierKind::built_in(&name).is_some() {
                return Err(format!(
                    "custom_kinds.{name}: names are 1 to 64 of a-z, 0-9 and _, and not a built-in kind"
                ));
            }
            rules.insert(name.clone(), kind.rule);
            custom.push((name, kind.normalise));
        }
        for (name, rule) in &rules {
            if rule.limit == Some(0) {
                return Err(format!("{name}.limit: must be at least 1"));
            }
        }
        let normaliser = Normaliser::new(default_phone_region)
            .map_err(|err| err.to_string())?
            .with_custom_kinds(custom.clone());
        let blocked = file
            .blocked
            .iter()
            .enumerate()
            .map(|(i, b)| {
                normaliser
                    .normalise(&format!("blocked[{i}]"), &b.kind, &b.value)
                    .map(|id| id.key())
                    .map_err(|err| err.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(IdentityRules {
            rules,
            custom,
            blocked,
        })
    }

    /// The custom kinds, for the normaliser.
    pub fn custom_kinds(&self) -> Vec<(String, CustomNormalisation)> {
        self.custom.clone()
    }

    pub fn is_blocked(&self, id: &Identifier) -> bool {
        self.blocked.contains(&id.key())
    }

    fn limit(&self, kind: &IdentifierKind) -> Option<u32> {
        self.rules.get(kind.as_str()).and_then(|rule| rule.limit)
    }

    fn priority(&self, kind: &IdentifierKind) -> u32 {
        self.rules
            .get(kind.as_str())
            .map_or(UNRANKED, |rule| rule.priority)
    }

    /// Plans one call. `incoming` are the call's identifiers; `owners` maps
    /// each already-known incoming identifier to its profile; `held` lists
    /// every identifier each of those profiles holds.
    pub fn plan(
        &self,
        incoming: &BTreeSet<Identifier>,
        owners: &BTreeMap<Identifier, String>,
        held: &BTreeMap<String, Vec<Identifier>>,
    ) -> Plan {
        let mut ordered: Vec<&Identifier> = incoming.iter().collect();
        ordered.sort_by_key(|id| (self.priority(&id.kind), *id));

        let mut plan = Plan::default();
        // Identifiers the resolved person holds, per kind.
        let mut holding: BTreeMap<&IdentifierKind, BTreeSet<&Identifier>> = BTreeMap::new();
        for id in ordered {
            if self.is_blocked(id) {
                plan.kept_apart.push(KeptApart {
                    identifier: id.clone(),
                    rule: "blocked".into(),
                    owner: owners.get(id).cloned(),
                });
                continue;
            }
            match owners.get(id) {
                Some(owner) if plan.profiles.contains(owner) => {}
                Some(owner) => {
                    let theirs = held.get(owner).map(Vec::as_slice).unwrap_or_default();
                    // A profile met before anything else is held is taken as
                    // it is, even if a rule was tightened since it was built.
                    let broken = if holding.is_empty() {
                        None
                    } else {
                        self.broken_limit(&holding, theirs)
                    };
                    match broken {
                        None => {
                            plan.profiles.insert(owner.clone());
                            plan.linked_by.entry(owner.clone()).or_insert(id.clone());
                            for held_id in theirs {
                                holding.entry(&held_id.kind).or_default().insert(held_id);
                            }
                        }
                        Some(kind) => plan.kept_apart.push(KeptApart {
                            identifier: id.clone(),
                            rule: self.limit_rule(&kind),
                            owner: Some(owner.clone()),
                        }),
                    }
                }
                None => match self.broken_limit(&holding, std::slice::from_ref(id)) {
                    None => {
                        plan.attach.insert(id.clone());
                        holding.entry(&id.kind).or_default().insert(id);
                    }
                    Some(kind) => plan.kept_apart.push(KeptApart {
                        identifier: id.clone(),
                        rule: self.limit_rule(&kind),
                        owner: None,
                    }),
                },
            }
        }
        plan
    }

    /// The kind whose limit `adding` would break on top of `holding`.
    fn broken_limit(
        &self,
        holding: &BTreeMap<&IdentifierKind, BTreeSet<&Identifier>>,
        adding: &[Identifier],
    ) -> Option<IdentifierKind> {
        let mut after: BTreeMap<&IdentifierKind, BTreeSet<&Identifier>> = BTreeMap::new();
        for id in adding {
            after.entry(&id.kind).or_default().insert(id);
        }
        after.into_iter().find_map(|(kind, new)| {
            let limit = self.limit(kind)?;
            let total = match holding.get(kind) {
                Some(existing) => existing.union(&new).count(),
                None => new.len(),
            };
            (total > limit as usize).then(|| kind.clone())
        })
    }

    fn limit_rule(&self, kind: &IdentifierKind) -> String {
        format!(
            "limit {} {}",
            kind.as_str(),
            self.limit(kind).unwrap_or_default()
        )
    }
}

/// What one call does to the identity graph.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Existing profiles that become (or stay) one person.
    pub profiles: BTreeSet<String>,
    /// For each of `profiles`, the incoming identifier that linked it.
    pub linked_by: BTreeMap<String, Identifier>,
    /// New identifiers to attach to the person.
    pub attach: BTreeSet<Identifier>,
    /// Identifiers not linked, with the rule that kept them apart.
    pub kept_apart: Vec<KeptApart>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeptApart {
    pub identifier: Identifier,
    pub rule: String,
    pub owner: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
        blocked = [
          { kind = "maid", value = "00000000-0000-0000-0000-000000000000" },
          { kind = "email", value = "Test@Example.com" },
        ]
        [kinds.customer_id]
        limit = 1
        priority = 1
        [kinds.email]
        limit = 2
        priority = 2
        [kinds.cookie_id]
        priority = 5
        [custom_kinds.loyalty_id]
        normalise = "lowercase"
        limit = 1
        priority = 3
    "#;

    fn rules() -> IdentityRules {
        IdentityRules::parse(RULES, "FR").expect("valid rules")
    }

    fn id(kind: &str, value: &str) -> Identifier {
        Normaliser::new("FR")
            .expect("region")
            .with_custom_kinds(rules().custom_kinds())
            .normalise("id", kind, value)
            .expect("valid")
    }

    fn incoming(ids: &[Identifier]) -> BTreeSet<Identifier> {
        ids.iter().cloned().collect()
    }

    #[test]
    fn unknown_identifiers_attach_to_a_new_person() {
        let plan = rules().plan(
            &incoming(&[id("email", "a@x.io"), id("cookie_id", "k1")]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert!(plan.profiles.is_empty());
        assert_eq!(plan.attach.len(), 2);
        assert!(plan.kept_apart.is_empty());
    }

    #[test]
    fn identifiers_of_two_people_merge_them() {
        let email = id("email", "a@x.io");
        let cookie = id("cookie_id", "k1");
        let owners = BTreeMap::from([(email.clone(), "p1".into()), (cookie.clone(), "p2".into())]);
        let held = BTreeMap::from([
            ("p1".to_string(), vec![email.clone()]),
            ("p2".to_string(), vec![cookie.clone()]),
        ]);
        let plan = rules().plan(&incoming(&[email.clone(), cookie]), &owners, &held);
        assert_eq!(plan.profiles, BTreeSet::from(["p1".into(), "p2".into()]));
        assert_eq!(plan.linked_by["p1"], email);
        assert!(plan.kept_apart.is_empty());
    }

    #[test]
    fn a_merge_that_breaks_a_limit_is_refused_and_the_higher_priority_wins() {
        // A family tablet's cookie is held by the person with customer C1; a
        // login as C2 on the same tablet must not make them one person.
        let c1 = id("customer_id", "C1");
        let c2 = id("customer_id", "C2");
        let cookie = id("cookie_id", "tablet");
        let owners = BTreeMap::from([(cookie.clone(), "p1".into())]);
        let held = BTreeMap::from([("p1".to_string(), vec![c1, cookie.clone()])]);
        let plan = rules().plan(&incoming(&[c2.clone(), cookie.clone()]), &owners, &held);
        assert!(plan.profiles.is_empty(), "p1 is not merged: {plan:?}");
        assert_eq!(plan.attach, BTreeSet::from([c2]));
        assert_eq!(
            plan.kept_apart,
            vec![KeptApart {
                identifier: cookie,
                rule: "limit customer_id 1".into(),
                owner: Some("p1".into()),
            }]
        );
    }

    #[test]
    fn a_new_identifier_over_the_limit_is_kept_apart() {
        let held_emails = [id("email", "a@x.io"), id("email", "b@x.io")];
        let third = id("email", "c@x.io");
        let owners = BTreeMap::from([(held_emails[0].clone(), "p1".to_string())]);
        let held = BTreeMap::from([("p1".to_string(), held_emails.to_vec())]);
        let plan = rules().plan(
            &incoming(&[held_emails[0].clone(), third.clone()]),
            &owners,
            &held,
        );
        assert_eq!(plan.profiles, BTreeSet::from(["p1".into()]));
        assert!(plan.attach.is_empty());
        assert_eq!(plan.kept_apart[0].identifier, third);
        assert_eq!(plan.kept_apart[0].rule, "limit email 2");
        // The person's own identifiers sent again change nothing.
        let again = rules().plan(&incoming(&held_emails), &owners, &held);
        assert!(again.kept_apart.is_empty() && again.attach.len() == 1);
    }

    #[test]
    fn blocked_values_never_link_anyone() {
        let zero = id("maid", "00000000-0000-0000-0000-000000000000");
        let test = id("email", " TEST@example.com");
        let plan = rules().plan(
            &incoming(&[zero, test, id("cookie_id", "k")]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(plan.attach.len(), 1);
        assert!(plan.kept_apart.iter().all(|k| k.rule == "blocked"));
        assert_eq!(plan.kept_apart.len(), 2);
    }

    #[test]
    fn custom_kinds_follow_their_rule() {
        let a = id("loyalty_id", "L-1");
        assert_eq!(a.value, "l-1");
        let plan = rules().plan(
            &incoming(&[a, id("loyalty_id", "L-2")]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(plan.attach.len(), 1);
        assert_eq!(plan.kept_apart[0].rule, "limit loyalty_id 1");
    }

    #[test]
    fn bad_rule_files_are_errors() {
        for (text, needle) in [
            ("[kinds.fax]\npriority = 1", "not a built-in kind"),
            ("[kinds.email]\nlimit = 0\npriority = 1", "at least 1"),
            ("[kinds.email]\nlimt = 2\npriority = 1", "limt"),
            (
                "[custom_kinds.email]\nnormalise = \"opaque\"\npriority = 1",
                "built-in",
            ),
            (
                "blocked = [{ kind = \"email\", value = \"nope\" }]",
                "blocked[0]",
            ),
            ("kinds = 3", "kinds"),
        ] {
            let err = IdentityRules::parse(text, "FR").expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn the_shipped_rules_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/identity.toml");
        let rules = IdentityRules::load(&path, "US").expect("policies/identity.toml is valid");
        assert!(rules.is_blocked(&id("maid", "00000000-0000-0000-0000-000000000000")));
        assert!(IdentityRules::load(Path::new("/nonexistent.toml"), "US").is_err());
    }
}
