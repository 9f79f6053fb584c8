//! The guest argument string: space-separated `key=value` words (a bare `key` has the
//! value ""). Later words override earlier ones with the same key.

use core::sync::atomic::{AtomicU64, Ordering};

static ARGS_ADDR: AtomicU64 = AtomicU64::new(0);
static ARGS_LEN: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init(addr: u64, len: u64) {
    ARGS_ADDR.store(addr, Ordering::Relaxed);
    ARGS_LEN.store(len, Ordering::Relaxed);
}

/// The whole argument string ("" if it was absent or not UTF-8).
pub fn all() -> &'static str {
    let (addr, len) = (
        ARGS_ADDR.load(Ordering::Relaxed),
        ARGS_LEN.load(Ordering::Relaxed),
    );
    if addr == 0 || len == 0 || len > 4095 {
        return "";
    }
    // SAFETY: the loader placed `len` bytes at `addr` in the reserved low area, which
    // nothing writes to after boot; the memory is identity-mapped.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The value of `key`, if the argument string has a word `key=value` or `key`.
pub fn arg(key: &str) -> Option<&'static str> {
    let mut found = None;
    for word in all().split_ascii_whitespace() {
        let (k, v) = word.split_once('=').unwrap_or((word, ""));
        if k == key {
            found = Some(v);
        }
    }
    found
}

/// Parses an unsigned number: decimal, `0x` hexadecimal, optionally followed by a binary
/// suffix `k`/`K` (2^10), `m`/`M` (2^20) or `g`/`G` (2^30). `_` separators are allowed.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (body, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1u64 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1u64 << 30),
        _ => (s, 1),
    };
    let (digits, radix) = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (body, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let d = c.to_digit(radix)?;
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(d))?;
        any = true;
    }
    if !any {
        return None;
    }
    value.checked_mul(mult)
}

/// The numeric value of `key`: `Ok(default)` if absent, `Err(text)` if present but not a
/// number (the guest should report it and exit).
pub fn arg_u64(key: &str, default: u64) -> Result<u64, &'static str> {
    match arg(key) {
        None => Ok(default),
        Some(v) => parse_u64(v).ok_or(v),
    }
}

/// Like [`arg_u64`], but prints an error and exits with status 2 on a malformed value.
pub fn arg_u64_or_exit(key: &str, default: u64) -> u64 {
    match arg_u64(key, default) {
        Ok(v) => v,
        Err(text) => {
            crate::println!("error: argument {}={} is not a number", key, text);
            crate::exit(2)
        }
    }
}

/// Whether `case` is listed in the comma-separated `skip=` argument (test guests use it
/// to leave out cases a backend cannot run, e.g. `skip=bp,int80`).
pub fn skipped(case: &str) -> bool {
    arg("skip").is_some_and(|list| list.split(',').any(|c| c == case))
}

/// Runs `f` unless `case` is listed in `skip=`; prints `<guest>: <case> skipped` if so.
pub fn run_case(guest: &str, case: &str, f: impl FnOnce()) {
    if skipped(case) {
        crate::println!("{}: {} skipped", guest, case);
    } else {
        f();
    }
}
