//! The x87/SSE state the `sev-fpu` test puts into the vCPU before launch, defined once for
//! the guest (which compares it with its FXSAVE image taken at the first instruction) and
//! the host (which loads it into the vCPU before LAUNCH_UPDATE_VMSA).
//!
//! The image follows the 64-bit FXSAVE layout (AMD APM vol. 2 11.4.4): FCW at 0, FSW at
//! 2, abridged FTW at 4, MXCSR at 24, MXCSR_MASK at 28, ST0-ST7 at 32 + 16 i (80-bit
//! value in the low 10 bytes), XMM0-XMM15 at 160 + 16 i.
//!
//! Compared (see [`COMPARED`]): FCW, FSW, FTW, MXCSR, the 10 value bytes of ST0-ST7 and
//! all 16 bytes of XMM0-XMM15. Not compared: FOP, FIP, FDP (not part of the pattern; an
//! FXSAVE in 64-bit mode formats them differently by operand size), MXCSR_MASK (a CPU
//! property, absent from the VMSA), the reserved bytes 10-15 of each ST slot and the rest
//! of the image.

/// Size of an FXSAVE image.
pub const FXSAVE_SIZE: usize = 512;

/// FCW: all exceptions masked (bits 0-5), bit 6 as after FNINIT, precision control 10
/// (double), rounding control 10 (up). The reset value is 0x037F.
pub const FCW: u16 = 0x0A7F;
/// FSW: TOP = 0, no exception flags (so ST(i) is physical register i).
pub const FSW: u16 = 0x0000;
/// Abridged tag word: all eight registers valid.
pub const FTW: u8 = 0xFF;
/// MXCSR: all exceptions masked, rounding control 01 (down), flush-to-zero. The reset
/// value is 0x1F80.
pub const MXCSR: u32 = 0xBF80;
/// MXCSR_MASK written into [`fxsave_image`] (not compared).
pub const MXCSR_MASK: u32 = 0xFFFF;

/// Offset of ST0 in the image.
pub const ST_OFFSET: usize = 32;
/// Offset of XMM0 in the image.
pub const XMM_OFFSET: usize = 160;

/// The 80-bit value of ST`i` (i in 0..8), little endian: significand with the explicit
/// integer bit set (a normal number), exponent 0x3FFF + i, sign set for odd i.
pub const fn st(i: usize) -> [u8; 10] {
    let mant = 0x8000_0000_0000_0000u64 | (0x0123_4567_89AB_CDEFu64.rotate_left(8 * i as u32) >> 1);
    let sign_exp = (0x3FFF + i as u16) | if i % 2 == 1 { 0x8000 } else { 0 };
    let m = mant.to_le_bytes();
    let e = sign_exp.to_le_bytes();
    [m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], e[0], e[1]]
}

/// The 16 bytes of XMM`i` (i in 0..16); all 256 bytes of XMM0-15 are distinct.
pub const fn xmm(i: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut j = 0;
    while j < 16 {
        out[j] = ((i * 16 + j) as u8).wrapping_mul(0x9D).wrapping_add(0x3C);
        j += 1;
    }
    out
}

/// The FXSAVE image of the pattern (fields not in the pattern are zero, MXCSR_MASK is
/// [`MXCSR_MASK`]). Load it with FXRSTOR or convert it to the VMM's FPU state.
pub const fn fxsave_image() -> [u8; FXSAVE_SIZE] {
    let mut b = [0u8; FXSAVE_SIZE];
    let fcw = FCW.to_le_bytes();
    b[0] = fcw[0];
    b[1] = fcw[1];
    let fsw = FSW.to_le_bytes();
    b[2] = fsw[0];
    b[3] = fsw[1];
    b[4] = FTW;
    let mx = MXCSR.to_le_bytes();
    let mm = MXCSR_MASK.to_le_bytes();
    let mut k = 0;
    while k < 4 {
        b[24 + k] = mx[k];
        b[28 + k] = mm[k];
        k += 1;
    }
    let mut i = 0;
    while i < 8 {
        let v = st(i);
        let mut j = 0;
        while j < 10 {
            b[ST_OFFSET + 16 * i + j] = v[j];
            j += 1;
        }
        i += 1;
    }
    let mut i = 0;
    while i < 16 {
        let v = xmm(i);
        let mut j = 0;
        while j < 16 {
            b[XMM_OFFSET + 16 * i + j] = v[j];
            j += 1;
        }
        i += 1;
    }
    b
}

/// A compared field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Fcw,
    Fsw,
    Ftw,
    Mxcsr,
    /// ST register i.
    St(u8),
    /// XMM register i.
    Xmm(u8),
}

impl Field {
    /// The field's name as the guest prints it (`fcw`, `st3`, `xmm12`, ...) without the
    /// number; see [`Field::index`].
    pub const fn name(self) -> &'static str {
        match self {
            Field::Fcw => "fcw",
            Field::Fsw => "fsw",
            Field::Ftw => "ftw",
            Field::Mxcsr => "mxcsr",
            Field::St(_) => "st",
            Field::Xmm(_) => "xmm",
        }
    }

    /// The register number of ST/XMM fields.
    pub const fn index(self) -> Option<u8> {
        match self {
            Field::St(i) | Field::Xmm(i) => Some(i),
            _ => None,
        }
    }
}

/// Every compared byte range of the image: (field, offset, length).
pub const COMPARED: [(Field, usize, usize); 28] = {
    let mut out = [(Field::Fcw, 0, 2); 28];
    out[1] = (Field::Fsw, 2, 2);
    out[2] = (Field::Ftw, 4, 1);
    out[3] = (Field::Mxcsr, 24, 4);
    let mut i = 0;
    while i < 8 {
        out[4 + i] = (Field::St(i as u8), ST_OFFSET + 16 * i, 10);
        i += 1;
    }
    let mut i = 0;
    while i < 16 {
        out[12 + i] = (Field::Xmm(i as u8), XMM_OFFSET + 16 * i, 16);
        i += 1;
    }
    out
};

/// The first difference between an FXSAVE image and the pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The field.
    pub field: Field,
    /// Byte offset of the first differing byte in the image.
    pub offset: usize,
    /// The byte found.
    pub got: u8,
    /// The byte expected.
    pub expected: u8,
}

/// Compares the [`COMPARED`] ranges of `image` (an FXSAVE image, at least 512 bytes) with
/// the pattern; returns every field's first mismatch through `report` and the number of
/// mismatching fields (0 = identical).
pub fn compare(image: &[u8], mut report: impl FnMut(Mismatch)) -> usize {
    let want = fxsave_image();
    let mut bad = 0;
    for &(field, off, len) in COMPARED.iter() {
        for (k, &expected) in want.iter().enumerate().skip(off).take(len) {
            let got = image.get(k).copied().unwrap_or(0);
            if got != expected {
                report(Mismatch {
                    field,
                    offset: k,
                    got,
                    expected,
                });
                bad += 1;
                break;
            }
        }
    }
    bad
}
