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

/// `bytes` in the largest binary unit it reaches: `1 KiB`, `64 MiB`, `1.5 GiB`, `512 B`
/// (at most two decimals, trailing zeros dropped).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift {
            if bytes.is_multiple_of(1 << shift) {
                return format!("{} {unit}", bytes >> shift);
            }
            let v = format!("{:.2}", bytes as f64 / (1u64 << shift) as f64);
            return format!("{} {unit}", v.trim_end_matches('0').trim_end_matches('.'));
        }
    }
    format!("{bytes} B")
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

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size((1 << 30) + (1 << 29)), "1.5 GiB");
        assert_eq!(human_size((1 << 20) + 1), "1 MiB");
        assert_eq!(human_size(3 << 40), "3 TiB");
        for s in ["1K", "5M", "256M", "1G"] {
            let b = parse_size(s).unwrap();
            assert_eq!(parse_size(&human_size(b).replace(' ', "")), Ok(b), "{s}");
        }
    }
}
