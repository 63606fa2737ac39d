//! Start-up settings in layers, each over the one before: defaults < the `--config` file (TOML,
//! YAML or JSON, by its extension) < `LB_*` environment variables < flags.
//!
//! A binary declares each setting once, as a field of one struct that is both its clap command
//! line and its serde shape: the flag is the field's name with `-` for `_`, the file key is the
//! name, and the variable is `LB_` and the name in capitals, with `__` between nested keys
//! (`LB_HEALTH_CHECK__INTERVAL_MS=5000` sets `interval_ms` of `[health_check]`). The `config`
//! crate merges the layers key by key, so a variable can change one field of a policy the file
//! sets.
//!
//! Each layer is checked on its own first, so an error names where the value came from: the file
//! (with line and column, through the file format's own parser), the variable, or the flag. An
//! unknown key is refused in the file and under a known variable prefix; an `LB_` variable that
//! names no setting at all is left alone, since the prefix is shared (Kubernetes, for one, sets
//! `<SERVICE>_PORT` variables for every service in a namespace).

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::SettingsError;

/// Prefix of every settings variable.
const PREFIX: &str = "LB_";
/// Between nested keys in a variable's name.
const NESTED: &str = "__";

/// The settings `T` from `file` (if any), the process's `LB_*` variables in `env`, and `flags`
/// (only the flags given; clap leaves the others `None`).
pub fn layered<T, F>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &F,
) -> Result<T, SettingsError>
where
    T: DeserializeOwned + Serialize,
    F: Serialize,
{
    let keys = top_level_keys::<T>();
    let mut builder = ::config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(source(&read_file::<T>(path)?, "the config file")?);
    }
    let env: ::config::Map<String, String> = env
        .into_iter()
        .filter(|(name, value)| {
            !value.is_empty()
                && name.strip_prefix(PREFIX).is_some_and(|rest| {
                    let top = rest.split(NESTED).next().unwrap_or_default();
                    keys.contains(top.to_ascii_lowercase().as_str())
                })
        })
        .collect();
    if !env.is_empty() {
        let environment = || {
            ::config::Environment::with_prefix(PREFIX.trim_end_matches('_'))
                .prefix_separator("_")
                .separator(NESTED)
                .source(Some(env.clone()))
        };
        ::config::Config::builder()
            .add_source(environment())
            .build()
            .and_then(|c| c.try_deserialize::<T>())
            .map_err(|e| environment_error(&e, &env))?;
        builder = builder.add_source(environment());
    }
    builder = builder.add_source(source(flags, "the command line")?);
    builder
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| SettingsError::Invalid {
            key: "config",
            message: e.to_string(),
        })
}

/// The process's variables, for [`layered`]; ones that are not Unicode cannot be settings.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect()
}

/// Reads and checks a settings file by its extension: `.toml`, `.yaml`/`.yml` or `.json`. Errors
/// name the file and, from the format's parser, the line and the key.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |message: String| SettingsError::Parse {
        path: path.to_owned(),
        message: message.trim_end().to_owned(),
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => serde_yaml_ng::from_str(&text).map_err(|e| parse_error(e.to_string())),
        Some("json") => serde_json::from_str(&text).map_err(|e| parse_error(e.to_string())),
        Some("toml") | None => toml::from_str(&text).map_err(|e| parse_error(e.to_string())),
        Some(other) => Err(parse_error(format!(
            "unknown format .{other}: a settings file is .toml, .yaml, .yml or .json"
        ))),
    }
}

/// `value` as a layer: its fields that are set (nulls, the unset options, are left out so that
/// they do not hide a lower layer's value).
fn source<V: Serialize>(value: &V, what: &str) -> Result<::config::Config, SettingsError> {
    let mut json = serde_json::to_value(value).map_err(|e| SettingsError::Invalid {
        key: "config",
        message: format!("{what}: {e}"),
    })?;
    drop_nulls(&mut json);
    ::config::Config::try_from(&json).map_err(|e| SettingsError::Invalid {
        key: "config",
        message: format!("{what}: {e}"),
    })
}

fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// An error in the environment layer, naming the variable: the one whose key the error names,
/// or all of them when it names none.
fn environment_error(e: &::config::ConfigError, env: &::config::Map<String, String>) -> SettingsError {
    let text = e.to_string();
    let mut names: Vec<&str> = env.keys().map(String::as_str).collect();
    names.sort_unstable();
    let named: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            let key = key_of(name);
            let leaf = key.rsplit('.').next().unwrap_or_default();
            text.contains(&format!("`{key}`"))
                || text.contains(&format!("unknown field `{leaf}`"))
        })
        .collect();
    let which = if named.is_empty() { names } else { named };
    SettingsError::Invalid {
        key: "environment",
        message: format!("{}: {text}", which.join(", ")),
    }
}

/// The key a variable sets: `LB_HEALTH_CHECK__INTERVAL_MS` → `health_check.interval_ms`.
fn key_of(name: &str) -> String {
    name.strip_prefix(PREFIX)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace(NESTED, ".")
}

/// The names of `T`'s fields, as serde's derive declares them to a deserializer.
fn top_level_keys<T: DeserializeOwned>() -> BTreeSet<&'static str> {
    let mut fields = BTreeSet::new();
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// A deserializer that only records the field names `deserialize_struct` is given.
struct FieldNames<'a>(&'a mut BTreeSet<&'static str>);

#[derive(Debug)]
struct Recorded;

impl std::fmt::Display for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("field names recorded")
    }
}

impl std::error::Error for Recorded {}

impl serde::de::Error for Recorded {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Recorded
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = Recorded;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Recorded> {
        Err(Recorded)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Recorded> {
        self.0.extend(fields);
        Err(Recorded)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A comma-separated list as one string (a variable's value), or a list (a file's), of items
/// that a string names (`String` itself, or a richer item a file may also write whole).
pub mod comma_list {
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        One(String),
        Many(Vec<T>),
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
    where
        D: serde::Deserializer<'de>,
        T: Deserialize<'de> + From<String>,
    {
        Ok(Option::<Either<T>>::deserialize(d)?.map(|v| match v {
            Either::One(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| T::from(s.to_owned()))
                .collect(),
            Either::Many(v) => v,
        }))
    }
}

#[cfg(test)]
#[path = "layers_tests.rs"]
mod tests;
