//! Parsing of human-readable sizes such as `512M` or `2GiB`.

use thiserror::Error;

/// Why a size could not be parsed.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size: give a number with an optional unit, e.g. 512M or 2G")]
    Empty,
    #[error("invalid size {0:?}: expected a number with an optional unit K, M, G (or KiB, MiB, GiB), e.g. 512M")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parse `N`, `NK`, `NM`, `NG` (binary units; `KiB`/`MiB`/`GiB` and `KB`/`MB`/`GB` are accepted
/// as the same binary units; a bare number is bytes).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Invalid(s.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 64 k"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
    }

    #[test]
    fn errors() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("M"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("12X"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }
}
