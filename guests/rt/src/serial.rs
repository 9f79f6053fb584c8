//! Polled COM1 output, `print!`/`println!`, and SSE-free integer formatting.
//!
//! `core`'s own integer formatting (and padding) uses SSE instructions; the runtime keeps
//! the common path integer-only, so guests format numbers through [`Dec`], [`Hex`] and
//! [`Hex16`], whose `Display` writes digits straight to the sink without padding logic.

use crate::x86::{inb, outb};
use core::fmt;
use esvm_abi::boot::SERIAL_PORT;

const THR: u16 = SERIAL_PORT;
const LSR: u16 = SERIAL_PORT + 5;
const LSR_THRE: u8 = 1 << 5;

/// Writes one byte to COM1, waiting until the transmit holding register is empty.
#[inline]
pub fn write_byte(b: u8) {
    // SEV-ES with a GHCB: buffered and sent through the GHCB.
    if crate::sev::serial_write(&[b]) {
        return;
    }
    while inb(LSR) & LSR_THRE == 0 {
        core::hint::spin_loop();
    }
    outb(THR, b);
}

/// Writes raw bytes to COM1.
pub fn write_bytes(bytes: &[u8]) {
    if crate::sev::serial_write(bytes) {
        return;
    }
    for &b in bytes {
        write_byte(b);
    }
}

/// The COM1 writer; a unit struct, usable from any context (there is a single vCPU).
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Serial output cannot fail; a formatting error of a Display impl is ignored.
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

/// Prints a line to COM1 (lines end with `\n` only).
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_byte(b'\n') };
    ($($arg:tt)*) => {{
        $crate::serial::_print(format_args!($($arg)*));
        $crate::serial::write_byte(b'\n');
    }};
}

const DIGITS: [&str; 16] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "a", "b", "c", "d", "e", "f",
];

/// Writes `v` in base `radix` (10 or 16), most significant digit first, padded with
/// zeros to `min_digits`. No buffer: a zeroed stack buffer would be initialised with SSE
/// stores.
fn emit(f: &mut fmt::Formatter<'_>, v: u64, radix: u64, min_digits: u32) -> fmt::Result {
    let mut p = 1u64;
    let mut digits = 1u32;
    // p * radix <= v cannot overflow.
    while v / p >= radix {
        p *= radix;
        digits += 1;
    }
    for _ in digits..min_digits {
        f.write_str("0")?;
    }
    loop {
        f.write_str(DIGITS[((v / p) % radix) as usize])?;
        if p == 1 {
            return Ok(());
        }
        p /= radix;
    }
}

/// Unsigned decimal.
#[derive(Clone, Copy)]
pub struct Dec(pub u64);

/// Signed decimal.
#[derive(Clone, Copy)]
pub struct SDec(pub i64);

/// Lowercase hexadecimal with a `0x` prefix, no padding.
#[derive(Clone, Copy)]
pub struct Hex(pub u64);

/// Exactly 16 lowercase hexadecimal digits, no prefix.
#[derive(Clone, Copy)]
pub struct Hex16(pub u64);

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        emit(f, self.0, 10, 1)
    }
}

impl fmt::Display for SDec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            f.write_str("-")?;
        }
        emit(f, self.0.unsigned_abs(), 10, 1)
    }
}

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        emit(f, self.0, 16, 1)
    }
}

impl fmt::Display for Hex16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        emit(f, self.0, 16, 16)
    }
}
