//! How reporting commands print what they report: human-readable text (the default) or,
//! with the global `--json` flag, one JSON document on stdout.
//!
//! A command builds one serializable value of what it reports and hands it to
//! [`Format::emit`] with a function that renders it as text. Errors and progress stay on
//! stderr as text in both formats, and the exit status does not depend on the format.

use serde::Serialize;
use thiserror::Error;

/// The output format chosen on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// Text for people (the default).
    #[default]
    Human,
    /// One JSON document on stdout (`--json`).
    Json,
}

/// The report could not be printed as JSON.
#[derive(Debug, Error)]
#[error("cannot encode the report as JSON (a bug in esvm; run again without --json): {0}")]
pub struct OutputError(#[source] pub serde_json::Error);

impl Format {
    /// `Json` if `--json` was given.
    pub fn from_json_flag(json: bool) -> Format {
        if json {
            Format::Json
        } else {
            Format::Human
        }
    }

    pub fn is_json(self) -> bool {
        self == Format::Json
    }

    /// The text of `value` in this format: pretty-printed JSON, or what `human` makes of it.
    /// Without a trailing newline unless `human` adds one.
    pub fn render<T: Serialize + ?Sized>(
        self,
        value: &T,
        human: impl FnOnce(&T) -> String,
    ) -> Result<String, OutputError> {
        match self {
            Format::Json => serde_json::to_string_pretty(value).map_err(OutputError),
            Format::Human => Ok(human(value)),
        }
    }

    /// Print `value` on stdout in this format (see [`Format::render`]), followed by a newline
    /// unless the text already ends with one (or is empty).
    pub fn emit<T: Serialize + ?Sized>(
        self,
        value: &T,
        human: impl FnOnce(&T) -> String,
    ) -> Result<(), OutputError> {
        let text = self.render(value, human)?;
        if text.is_empty() || text.ends_with('\n') {
            print!("{text}");
        } else {
            println!("{text}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Report {
        name: &'static str,
        count: u32,
    }

    #[test]
    fn json_is_the_value_and_human_is_the_text() {
        let r = Report {
            name: "demo",
            count: 3,
        };
        let human = |r: &Report| format!("{} x{}", r.name, r.count);
        let j = Format::Json.render(&r, human).unwrap();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["name"], "demo");
        assert_eq!(v["count"], 3);
        let h = Format::Human.render(&r, human).unwrap();
        assert_eq!(h, "demo x3");
        assert!(serde_json::from_str::<serde_json::Value>(&h).is_err());
        assert_eq!(Format::from_json_flag(true), Format::Json);
        assert_eq!(Format::from_json_flag(false), Format::Human);
        assert_eq!(Format::default(), Format::Human);
    }
}
