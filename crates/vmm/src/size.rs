//! Human-readable sizes: parsing (`64`, `512M`, `2GiB`, `4K`) and printing (`64 MiB`,
//! `1 KiB`), and the up-front checks of a guest's memory size.
//!
//! One rule for every size option of the command line: a bare number means MiB (`--mem 64`
//! is 64 MiB), units K, M, G, T (also KiB/MiB/GiB/TiB and KB/MB/GB/TB, all binary) say
//! otherwise, and `B` means bytes (`4096B`).

use thiserror::Error;

/// What a bare number counts: MiB.
pub const DEFAULT_UNIT_SHIFT: u32 = 20;

/// Why a size could not be parsed or is not usable.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size: give a number with an optional unit, e.g. 512M or 2G (a bare number means MiB)")]
    Empty,
    #[error("invalid size {0:?}: expected a number with an optional unit K, M, G (or KiB, MiB, GiB; B for bytes), e.g. 512M; a bare number means MiB")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
    #[error("{what} {} is not a multiple of the 4 KiB page size; give e.g. {}", format_size(*size), format_size(size.next_multiple_of(4096)))]
    NotPageMultiple { what: &'static str, size: u64 },
    #[error("{what} {} is too small: it must be at least {}", format_size(*size), format_size(*min))]
    TooSmall {
        what: &'static str,
        size: u64,
        min: u64,
    },
    #[error("{what} {} is too large: esvm's guest memory map holds at most {}", format_size(*size), format_size(*max))]
    TooLarge {
        what: &'static str,
        size: u64,
        max: u64,
    },
}

/// Parse `N` (MiB), `NK`, `NM`, `NG`, `NT` (binary units; `KiB`/`MiB`/`GiB` and
/// `KB`/`MB`/`GB` are accepted as the same binary units) or `NB` (bytes).
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
        "" => DEFAULT_UNIT_SHIFT,
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Invalid(s.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// `bytes` in human units: exactly in the largest binary unit that shows it as a whole
/// number below 10000 (`64 MiB`, `1 KiB`, `1536 KiB`), else with one decimal in the largest
/// unit it reaches (`117.7 MiB`); whole bytes below 10000 (`100 bytes`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 5] = [
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
        (0, "bytes"),
    ];
    for (shift, name) in UNITS {
        if bytes.is_multiple_of(1 << shift) && (bytes >> shift) < 10_000 && bytes >> shift > 0 {
            return format!("{} {name}", bytes >> shift);
        }
    }
    for (shift, name) in UNITS {
        if bytes >= 1 << shift {
            return format!("{:.1} {name}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    "0 bytes".into()
}

/// The least guest RAM `esvm run` starts a VM with: the esvm boot convention reserves the
/// first 2 MiB (page tables, boot-info block, GDT) below the image.
pub const MIN_GUEST_MEM: u64 = 4 << 20;

/// Check a guest memory size up front: a multiple of 4 KiB, at least [`MIN_GUEST_MEM`],
/// at most what the VM's memory map holds (`esvm_arch::layout::MAX_RAM_SIZE`).
pub fn check_guest_mem(size: u64) -> Result<u64, SizeError> {
    let what = "guest memory";
    if size < MIN_GUEST_MEM {
        return Err(SizeError::TooSmall {
            what,
            size,
            min: MIN_GUEST_MEM,
        });
    }
    if !size.is_multiple_of(4096) {
        return Err(SizeError::NotPageMultiple { what, size });
    }
    let max = esvm_arch::layout::MAX_RAM_SIZE;
    if size > max {
        return Err(SizeError::TooLarge { what, size, max });
    }
    Ok(size)
}

/// `--mem`'s value parser: [`parse_size`], then [`check_guest_mem`].
pub fn parse_guest_mem(s: &str) -> Result<u64, String> {
    parse_size(s)
        .and_then(check_guest_mem)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("64"), Ok(64 << 20), "a bare number is MiB");
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 64 k"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1KiB"), Ok(1024));
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
        assert!(matches!(
            parse_size("99999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn human_units() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        assert_eq!(format_size(1536 << 10), "1536 KiB");
        assert_eq!(format_size(123_456_789), "117.7 MiB");
        assert_eq!(format_size(100), "100 bytes");
        assert_eq!(format_size(0), "0 bytes");
        // What a size prints as parses back to the same size.
        for s in [4096u64, 64 << 20, 1 << 40, 5 << 10] {
            let shown = format_size(s).replace(' ', "");
            assert_eq!(parse_size(&shown), Ok(s), "{shown}");
        }
    }

    #[test]
    fn guest_memory_is_checked_up_front() {
        assert_eq!(parse_guest_mem("64"), Ok(64 << 20));
        let e = parse_guest_mem("64B").unwrap_err();
        assert_eq!(
            e,
            "guest memory 64 bytes is too small: it must be at least 4 MiB"
        );
        let e = parse_guest_mem("4097K").unwrap_err();
        assert!(e.contains("not a multiple of the 4 KiB page size"), "{e}");
        assert!(e.contains("give e.g. 4100 KiB"), "{e}");
        let e = parse_guest_mem("100G").unwrap_err();
        assert_eq!(
            e,
            "guest memory 100 GiB is too large: esvm's guest memory map holds at most 3 GiB"
        );
    }

    #[test]
    fn formatted_sizes_parse_back() {
        for s in ["1K", "5M", "256M", "1G"] {
            let b = parse_size(s).unwrap();
            assert_eq!(parse_size(&format_size(b).replace(' ', "")), Ok(b), "{s}");
        }
    }
}
