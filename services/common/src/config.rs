//! Layered configuration: defaults → TOML file → `MADTECH_` environment
//! variables (`__` separates nesting levels) → command-line overrides, then
//! `validate()`. Every component owns one typed struct with
//! `deny_unknown_fields`; tests build the struct directly instead of touching the
//! process environment.

use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The prefix of every environment variable MadTech reads.
pub const ENV_PREFIX: &str = "MADTECH_";

/// `MADTECH_*` variables that are not configuration keys: the configuration
/// file's path, the test database and the CI cache.
pub const NOT_CONFIGURATION: [&str; 3] = ["config", "test_postgres_url", "ci_cache"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        // figment's message names the key and the source (file or variable).
        ConfigError::Invalid(err.to_string())
    }
}

/// Checks that a configuration makes sense as a whole, beyond what its types
/// already guarantee.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Where configuration comes from, besides the struct's defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources<'a> {
    /// A TOML file; it must exist when named.
    pub file: Option<&'a Path>,
    /// Environment variables as name/value pairs; only `MADTECH_*` ones are
    /// read. Passed in rather than read here, so tests (and the manifest
    /// checks) hand over a map instead of touching the process environment.
    pub environment: Vec<(String, String)>,
}

impl<'a> Sources<'a> {
    /// `file` and this process's environment (variables that are not valid
    /// UTF-8 are skipped: none of ours is).
    pub fn from_process(file: Option<&'a Path>) -> Self {
        let environment = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Sources { file, environment }
    }
}

/// Adds `MADTECH_A__B_C=value` as the key `a.b_c`. Values are read like
/// TOML scalars (`false`, `8`, `1.5`; anything else is a string).
fn with_environment(mut figment: Figment, environment: &[(String, String)]) -> Figment {
    for (name, value) in environment {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if key.is_empty() || NOT_CONFIGURATION.contains(&key.as_str()) {
            continue;
        }
        let value: figment::value::Value = match value.parse() {
            Ok(value) => value,
            Err(never) => match never {},
        };
        figment = figment.merge(Variable {
            name: name.clone(),
            value: Serialized::default(&key.replace("__", "."), value),
        });
    }
    figment
}

/// One environment variable, named in error messages.
struct Variable {
    name: String,
    value: Serialized<figment::value::Value>,
}

impl figment::Provider for Variable {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.value.data()
    }
}

/// Loads `T` from its defaults, then `sources`, then `overrides` (a
/// serializable value whose present fields win, e.g. command-line flags).
pub fn load<T, O>(sources: &Sources<'_>, overrides: &O) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
    O: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = sources.file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile {
                path: path.display().to_string(),
            });
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = with_environment(figment, &sources.environment);
    let config: T = figment.merge(Serialized::defaults(overrides)).extract()?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        name: String,
        nested: Nested,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        port: u16,
    }

    impl Default for Nested {
        fn default() -> Self {
            Nested { port: 7 }
        }
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.name == "bad" {
                return Err(ConfigError::Invalid("name must not be bad".into()));
            }
            Ok(())
        }
    }

    #[derive(Serialize)]
    struct NoOverrides {}

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let path = dir.path().join("madtech.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn file_then_overrides_win_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "name = \"file\"\n[nested]\nport = 9\n");
        #[derive(Serialize)]
        struct Flags {
            name: &'static str,
        }
        let sources = Sources {
            file: Some(&path),
            environment: vec![],
        };
        let config: Sample = load(&sources, &Flags { name: "flag" }).expect("load");
        assert_eq!(
            config,
            Sample {
                name: "flag".into(),
                nested: Nested { port: 9 }
            }
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "nmae = \"typo\"\n");
        let sources = Sources {
            file: Some(&path),
            environment: vec![],
        };
        let err = load::<Sample, _>(&sources, &NoOverrides {}).expect_err("typo must fail");
        assert!(err.to_string().contains("nmae"), "{err}");
    }

    #[test]
    fn malformed_files_and_failed_validation_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "name = [unclosed\n");
        let sources = Sources {
            file: Some(&path),
            environment: vec![],
        };
        assert!(load::<Sample, _>(&sources, &NoOverrides {}).is_err());

        let path = write(&dir, "name = \"bad\"\n");
        let sources = Sources {
            file: Some(&path),
            environment: vec![],
        };
        let err = load::<Sample, _>(&sources, &NoOverrides {}).expect_err("validation");
        assert!(err.to_string().contains("must not be bad"));
    }

    #[test]
    fn environment_variables_nest_on_double_underscores() {
        let environment = vec![
            ("MADTECH_NAME".to_string(), "from-env".to_string()),
            ("MADTECH_NESTED__PORT".to_string(), "8".to_string()),
            ("MADTECH_CONFIG".to_string(), "/not/a/key.toml".to_string()),
            ("OTHER_NAME".to_string(), "ignored".to_string()),
        ];
        let sources = Sources {
            file: None,
            environment,
        };
        let config: Sample = load(&sources, &NoOverrides {}).expect("load");
        assert_eq!(
            config,
            Sample {
                name: "from-env".into(),
                nested: Nested { port: 8 }
            }
        );

        let typo = vec![("MADTECH_NESTED__PROT".to_string(), "8".to_string())];
        let err = load::<Sample, _>(
            &Sources {
                file: None,
                environment: typo,
            },
            &NoOverrides {},
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn a_named_file_must_exist() {
        let missing = Path::new("/nonexistent/madtech.toml");
        let sources = Sources {
            file: Some(missing),
            environment: vec![],
        };
        let err = load::<Sample, _>(&sources, &NoOverrides {}).expect_err("missing");
        assert!(matches!(err, ConfigError::MissingFile { .. }));
    }
}
