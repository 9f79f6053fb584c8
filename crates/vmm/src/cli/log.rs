//! Diagnostics: `--log-level LEVEL` (or the environment variable `ESVM_LOG`) chooses what
//! esvm logs on stderr.

use tracing_subscriber::EnvFilter;

/// What is logged when neither `--log-level` nor `ESVM_LOG` says.
pub const DEFAULT_LEVEL: &str = "warn";

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `--log-level` value: a level name, or a tracing filter of comma-separated
/// directives, each a level or `TARGET=LEVEL` (e.g. `warn,esvm::migrate=debug`). A bare word
/// that is not a level is refused rather than read as a target name that would log
/// everything of a module most users do not know.
pub fn parse_level(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(format!(
            "empty: give one of {} or a filter such as warn,esvm::migrate=debug",
            LEVELS.join(", ")
        ));
    }
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level: use one of {} or TARGET=LEVEL (e.g. \
                 esvm::migrate=debug)",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a log filter: {e}"))
}

/// The filter for `level` (already checked by [`parse_level`]), or [`DEFAULT_LEVEL`].
pub fn filter(level: Option<&str>) -> EnvFilter {
    level
        .and_then(|l| EnvFilter::builder().parse(l).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LEVEL))
}

/// Send diagnostics at `level` to stderr, in colour only when stderr is a terminal (a log
/// file or a pipe gets plain text).
pub fn init(level: Option<&str>) {
    tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_are_accepted_and_typos_refused() {
        for ok in [
            "warn",
            "DEBUG",
            "off",
            "warn,esvm::migrate=debug",
            "esvm=trace",
        ] {
            assert_eq!(parse_level(ok).as_deref(), Ok(ok), "{ok}");
        }
        for bad in ["", "verbose", "esvm", "esvm=loud", "warn,,debugg"] {
            let e = parse_level(bad).unwrap_err();
            assert!(e.contains("level") || e.contains("filter"), "{bad}: {e}");
        }
        assert_eq!(filter(None).to_string(), DEFAULT_LEVEL);
        assert_eq!(filter(Some("debug")).to_string(), "debug");
    }
}
