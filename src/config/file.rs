//! The configuration file: TOML read into raw values, each with the line it is on, so that an
//! error names `file:line: key`. Keys are checked against [`OPTIONS`] (`-` and `_` are the
//! same); values stay text here and are parsed by the resolver like a flag's.

use super::Source;
use super::cli::{COMMAND, CONFIG};
use super::options::{OPTIONS, PORT};
use super::values::quoted;
use crate::fatal::Fatal;
use clap::ArgMatches;
use clap::parser::ValueSource;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The config file given by flag or variable, else this one when present.
pub const DEFAULT_FILE: &str = "corepool.toml";

/// A configuration file larger than this is not one (a device or a log named by mistake).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A TOML file read into raw values with their lines.
pub struct ConfigFile {
    path: String,
    values: BTreeMap<String, (toml::Value, usize)>,
}

impl ConfigFile {
    pub fn load(path: &Path, named_by: &str) -> Result<ConfigFile, Fatal> {
        let shown = path.display().to_string();
        let cannot = |why: String| Fatal::usage(format!("{named_by}: cannot read {shown}: {why}"));
        let meta = std::fs::metadata(path).map_err(|err| cannot(err.to_string()))?;
        if !meta.is_file() {
            return Err(cannot("not a regular file".into()));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(cannot(format!("larger than {} KiB", MAX_FILE_BYTES >> 10)));
        }
        let text = std::fs::read_to_string(path).map_err(|err| cannot(err.to_string()))?;
        ConfigFile::parse(&shown, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<ConfigFile, Fatal> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let table: BTreeMap<String, toml::Spanned<toml::Value>> =
            toml::from_str(text).map_err(|err| {
                let line = err.span().map(|s| line_of(s.start)).unwrap_or(1);
                let message = err
                    .message()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                Fatal::usage(format!("{path}:{line}: invalid TOML: {message}"))
            })?;
        let mut values = BTreeMap::new();
        for (raw_key, spanned) in table {
            let line = line_of(spanned.span().start);
            let key = raw_key.replace('-', "_");
            let known = key == COMMAND || OPTIONS.iter().any(|o| o.key == key);
            if !known {
                return Err(Fatal::usage(format!(
                    "{path}:{line}: unknown key '{raw_key}'"
                )));
            }
            if let Some((_, first)) = values.get(&key) {
                return Err(Fatal::usage(format!(
                    "{path}:{line}: '{raw_key}' repeats the key of line {first} (- and _ are the same)"
                )));
            }
            values.insert(key, (spanned.into_inner(), line));
        }
        Ok(ConfigFile {
            path: path.to_string(),
            values,
        })
    }

    /// The raw string of a scalar key, with its source.
    pub fn scalar(&self, key: &str) -> Result<Option<(String, Source)>, Fatal> {
        let Some((value, line)) = self.values.get(key) else {
            return Ok(None);
        };
        let source = Source::File {
            path: self.path.clone(),
            line: *line,
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            // `port = [3000, 4041]`: the same text as `--port 3000,4041`.
            toml::Value::Array(items) if key == PORT.spec.key => items
                .iter()
                .map(|item| match item {
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    toml::Value::String(s) => Ok(s.clone()),
                    _ => Err(Fatal::usage(format!(
                        "{}: expected port numbers, e.g. [3000, 4041]",
                        source.culprit(key)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            _ => {
                return Err(Fatal::usage(format!(
                    "{}: expected a string or a number",
                    source.culprit(key)
                )));
            }
        };
        Ok(Some((text, source)))
    }

    /// `command = ["node", "server.js"]`. A single string is refused: splitting it would have to
    /// guess at the shell's quoting.
    pub fn command(&self) -> Result<Option<(Vec<String>, Source)>, Fatal> {
        let Some((value, line)) = self.values.get(COMMAND) else {
            return Ok(None);
        };
        let source = Source::File {
            path: self.path.clone(),
            line: *line,
        };
        let bad = || {
            Fatal::usage(format!(
                "{}: expected a list of strings",
                source.culprit(COMMAND)
            ))
        };
        let argv: Vec<String> = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            toml::Value::String(s) => {
                let words: Vec<String> = s.split_whitespace().map(quoted).collect();
                return Err(Fatal::usage(format!(
                    "{}: expected a list of strings, e.g. command = [{}]",
                    source.culprit(COMMAND),
                    words.join(", ")
                )));
            }
            _ => return Err(bad()),
        };
        if argv.first().is_none_or(|program| program.is_empty()) {
            return Err(Fatal::usage(format!(
                "{}: is empty",
                source.culprit(COMMAND)
            )));
        }
        Ok(Some((argv, source)))
    }
}

pub fn find_file(matches: &ArgMatches) -> Result<Option<ConfigFile>, Fatal> {
    if let Some(path) = matches.get_one::<OsString>(CONFIG) {
        let named_by = match matches.value_source(CONFIG) {
            Some(ValueSource::EnvVariable) => "COREPOOL_CONFIG",
            _ => "--config",
        };
        return ConfigFile::load(Path::new(path), named_by).map(Some);
    }
    let default = PathBuf::from(DEFAULT_FILE);
    // A link to nowhere is a mistake to report, not a file to ignore.
    if default.symlink_metadata().is_ok() {
        return ConfigFile::load(&default, DEFAULT_FILE).map(Some);
    }
    Ok(None)
}
