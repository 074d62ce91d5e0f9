//! `shardpay serve --config FILE`: the serve options from a TOML file.
//!
//! Every key of the file is the long name of a `serve` option, with `_` or
//! `-` between words (`data_dir = "data"`, `mysql_urls = ["mysql://…", …]`).
//! A value given on the command line wins over the environment
//! (`SHARDPAY_…`), which wins over the file, which wins over the default.
//! The file is checked before anything starts: an unknown key, or a value
//! the option would refuse, is an error that names the file and the key.
//!
//! clap reads the command line and the environment, each value with its
//! option's own parser; figment layers the values clap took from either
//! over the file, and the file over the rest (the defaults), and extracts
//! the serve options from the layers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use figment::providers::Serialized;
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The option that names the file, and its environment variable.
pub const OPTION: &str = "config";
pub const ENV: &str = "SHARDPAY_CONFIG";

/// Options that cannot come from the file.
const NOT_IN_FILE: &[&str] = &["config", "help", "version", "log-format"];

/// Layers the config file named by `--config` (or `SHARDPAY_CONFIG`) into
/// `args`, the serve options clap parsed into `matches`: a value given on
/// the command line or in the environment stays, a value of the file
/// replaces a default. Does nothing without a file.
pub fn layer<T>(
    args: &mut T,
    serve: &clap::Command,
    matches: &clap::ArgMatches,
) -> anyhow::Result<()>
where
    T: Serialize + DeserializeOwned,
{
    let Some(path) = matches.get_one::<PathBuf>(OPTION) else {
        return Ok(());
    };
    let file = read(serve, path)?;
    let parsed = match Value::serialize(&*args)? {
        Value::Dict(_, dict) => dict,
        other => panic!("the serve options serialize to a table, not {other:?}"),
    };
    let given: Dict = parsed
        .iter()
        .filter(|(id, _)| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|(id, value)| (id.clone(), value.clone()))
        .collect();
    let defaults = Figment::from(Serialized::defaults(parsed));
    // Each value is tried on its own, so that a refused one is named by its
    // key (serde's error for a flattened field does not carry it).
    for (key, value) in &file {
        defaults
            .clone()
            .merge(Serialized::default(key, value))
            .extract::<T>()
            .map_err(|e| {
                anyhow::anyhow!(
                    "config file {}: `{key}`: {}",
                    path.display(),
                    refusal(&e.kind)
                )
            })?;
    }
    *args = defaults
        .merge(Serialized::defaults(file))
        .merge(Serialized::defaults(given))
        .extract()
        .map_err(|e| anyhow::anyhow!("config file {}: {}", path.display(), refusal(&e.kind)))?;
    Ok(())
}

/// Why a value was refused, in the words clap uses for a choice.
fn refusal(kind: &figment::error::Kind) -> String {
    match kind {
        figment::error::Kind::UnknownVariant(found, expected) => format!(
            "invalid value {found:?}; possible values: {}",
            expected.join(", ")
        ),
        other => other.to_string(),
    }
}

/// The file's values by the option they set (`data-dir` read as
/// `data_dir`), each key checked to be one the file may hold.
pub fn read(serve: &clap::Command, path: &Path) -> anyhow::Result<Dict> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the config file {}; check the path given to --config or {ENV}",
            path.display()
        )
    })?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
    let mut values = Dict::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = find(serve, &long)
            .filter(|_| !NOT_IN_FILE.contains(&long.as_str()))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "config file {}: unknown key `{key}`. Known keys: {}",
                    path.display(),
                    keys(serve).join(", ")
                )
            })?;
        anyhow::ensure!(
            arg.get_env().is_some(),
            "config file {}: `{key}` can only be given on the command line",
            path.display()
        );
        values.insert(arg.get_id().as_str().to_string(), Value::serialize(value)?);
    }
    Ok(values)
}

/// The option a key names: a long option, or a positional by its name.
fn find<'c>(serve: &'c clap::Command, long: &str) -> Option<&'c clap::Arg> {
    serve.get_arguments().find(|a| match a.get_long() {
        Some(l) => l == long,
        None => a.is_positional() && a.get_id().as_str() == long,
    })
}

/// The long name of an option, or a positional's name.
fn name_of(arg: &clap::Arg) -> Option<String> {
    match arg.get_long() {
        Some(l) => Some(l.to_string()),
        None if arg.is_positional() => Some(arg.get_id().as_str().to_string()),
        None => None,
    }
}

/// Every key a config file may hold.
pub fn keys(serve: &clap::Command) -> Vec<String> {
    serve
        .get_arguments()
        .filter(|a| a.get_env().is_some())
        .filter_map(name_of)
        .filter(|l| !NOT_IN_FILE.contains(&l.as_str()))
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// The reference table of the keys: key, environment variable, default and
/// what it does. docs/configuration.md holds it; a test keeps them equal.
#[cfg(test)]
pub fn reference(serve: &clap::Command) -> String {
    let mut out = String::from(
        "| Key | Environment variable | Default | What it sets |\n|---|---|---|---|\n",
    );
    for arg in serve.get_arguments() {
        let Some(long) = name_of(arg) else { continue };
        if NOT_IN_FILE.contains(&long.as_str()) || arg.get_env().is_none() {
            continue;
        }
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            match arg.get_action() {
                clap::ArgAction::SetTrue => "`false`".to_string(),
                _ => "(none)".to_string(),
            }
        } else if defaults.iter().all(|d| d.is_empty()) {
            "(empty)".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_help()
            .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{}` | {env} | {default} | {help} |\n",
            long.replace('-', "_")
        ));
    }
    out
}
