//! x87/SSE state in the FXSAVE image format.

use serde::{Deserialize, Serialize};

/// Size of an FXSAVE/FXRSTOR image.
pub const FXSAVE_SIZE: usize = 512;

/// x87 and SSE state. Field meanings follow the 64-bit FXSAVE image (Intel SDM vol. 1 10.5.1,
/// AMD APM vol. 2 11.4.4), so conversion to and from FXSAVE bytes is lossless: `st` in stack
/// order (ST(0) first, TOP in `fsw` bits 13:11), `ftw` abridged per *physical* register
/// (bit p = Rp not empty), `fip`/`fdp` 64-bit offsets (the FCS/FDS selectors of the 32-bit
/// image are not represented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word: one bit per register, 1 = valid.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    pub mxcsr_mask: u32,
    /// ST0..ST7 / MM0..MM7, 80-bit values in the low 10 bytes of each slot.
    pub st: [[u8; 16]; 8],
    pub xmm: [[u8; 16]; 16],
}

impl Default for FpuState {
    /// The state after RESET/INIT (FNINIT defaults, MXCSR all exceptions masked).
    fn default() -> Self {
        FpuState {
            fcw: 0x037f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            mxcsr: 0x1f80,
            mxcsr_mask: 0xffff,
            st: [[0; 16]; 8],
            xmm: [[0; 16]; 16],
        }
    }
}

impl FpuState {
    /// Serialise to the 512-byte 64-bit FXSAVE image.
    pub fn to_fxsave(&self) -> [u8; FXSAVE_SIZE] {
        let mut b = [0u8; FXSAVE_SIZE];
        b[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        b[4] = self.ftw;
        b[6..8].copy_from_slice(&self.fop.to_le_bytes());
        b[8..16].copy_from_slice(&self.fip.to_le_bytes());
        b[16..24].copy_from_slice(&self.fdp.to_le_bytes());
        b[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&self.mxcsr_mask.to_le_bytes());
        for (i, st) in self.st.iter().enumerate() {
            b[32 + 16 * i..48 + 16 * i].copy_from_slice(st);
        }
        for (i, x) in self.xmm.iter().enumerate() {
            b[160 + 16 * i..176 + 16 * i].copy_from_slice(x);
        }
        b
    }

    /// Parse a 64-bit FXSAVE image.
    pub fn from_fxsave(b: &[u8; FXSAVE_SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let mut st = [[0u8; 16]; 8];
        for (i, s) in st.iter_mut().enumerate() {
            s.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
        }
        let mut xmm = [[0u8; 16]; 16];
        for (i, x) in xmm.iter_mut().enumerate() {
            x.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
        }
        FpuState {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftw: b[4],
            fop: u16_at(6),
            fip: u64_at(8),
            fdp: u64_at(16),
            mxcsr: u32_at(24),
            mxcsr_mask: u32_at(28),
            st,
            xmm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fxsave_roundtrip(seed in proptest::collection::vec(any::<u8>(), 416)) {
            let mut img = [0u8; FXSAVE_SIZE];
            img[..416].copy_from_slice(&seed);
            img[5] = 0; // reserved byte
            let f = FpuState::from_fxsave(&img);
            prop_assert_eq!(f.to_fxsave(), img);
        }
    }

    #[test]
    fn fxsave_offsets() {
        let mut f = FpuState::default();
        f.xmm[15] = [0xab; 16];
        f.st[7][9] = 0x7f;
        let img = f.to_fxsave();
        assert_eq!(&img[24..28], &0x1f80u32.to_le_bytes());
        assert_eq!(img[160 + 15 * 16], 0xab);
        assert_eq!(img[32 + 7 * 16 + 9], 0x7f);
    }
}
