//! Lazy arithmetic flags.
//!
//! The common flag producers (ADD/ADC/SUB/SBB/CMP/NEG, logic ops, INC/DEC) only record their
//! operands and result; flags are computed when something reads them. Everything else sets
//! the six arithmetic flags eagerly through [`Cpu::set_arith`].
//!
//! Architecturally undefined flags follow the modelled CPU (AMD family 17h); the table of
//! what each instruction produces is in [`crate::model`].

use crate::Cpu;
use esvm_arch::bits::rflags::{AF, ARITH, CF, OF, PF, SF, ZF};

pub(crate) const F_NONE: u8 = 0;
pub(crate) const F_ADD: u8 = 1;
pub(crate) const F_ADC: u8 = 2;
pub(crate) const F_SUB: u8 = 3;
pub(crate) const F_SBB: u8 = 4;
pub(crate) const F_LOGIC: u8 = 5;
pub(crate) const F_INC: u8 = 6;
pub(crate) const F_DEC: u8 = 7;

#[inline(always)]
pub(crate) const fn mask(sz: u8) -> u64 {
    match sz {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

#[inline(always)]
pub(crate) const fn sign(sz: u8) -> u64 {
    1u64 << (sz as u32 * 8 - 1)
}

/// Sign-extend the low `sz` bytes of `v`.
#[inline(always)]
pub(crate) const fn sx(v: u64, sz: u8) -> u64 {
    match sz {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

#[inline(always)]
pub(crate) fn parity(v: u64) -> u64 {
    if (v as u8).count_ones() & 1 == 0 {
        PF
    } else {
        0
    }
}

/// ZF, SF, PF of a result of size `sz`.
#[inline(always)]
pub(crate) fn szp(res: u64, sz: u8) -> u64 {
    let r = res & mask(sz);
    (if r == 0 { ZF } else { 0 }) | (if r & sign(sz) != 0 { SF } else { 0 }) | parity(r)
}

/// Left shift that puts the sign bit of a `sz`-byte value at bit 63 (sizes other than 1, 2
/// and 4 count as 8, as in `mask`).
#[inline(always)]
const fn top_shift(sz: u8) -> u32 {
    (64 - 8 * sz as u32) & 63
}

impl Cpu {
    /// Record a lazy flag producer: operation `op` of size `sz` on `a` and `b` giving `res`.
    /// The three values are kept shifted left so that their bit `8 * sz - 1` is bit 63:
    /// comparisons of the record are then plain 64-bit (signed or unsigned) comparisons.
    #[inline(always)]
    pub(crate) fn lazy(&mut self, op: u8, sz: u8, a: u64, b: u64, res: u64) {
        let sh = top_shift(sz);
        self.f_op = op;
        self.f_sz = sz;
        self.f_a = a << sh;
        self.f_b = b << sh;
        self.f_res = res << sh;
    }

    /// Compute the arithmetic flags from the lazy record.
    pub(crate) fn compute_arith(&self) -> u64 {
        let sz = self.f_sz;
        let sh = top_shift(sz);
        let s = sign(sz);
        let (a, b, r) = (self.f_a >> sh, self.f_b >> sh, self.f_res >> sh);
        let base = szp(r, sz);
        match self.f_op {
            F_ADD | F_ADC => {
                let cf = if self.f_op == F_ADD {
                    r < a
                } else {
                    r < a || (self.f_cin != 0 && r == a)
                };
                base | (cf as u64 * CF)
                    | ((a ^ b ^ r) & 0x10)
                    | (if (a ^ r) & (b ^ r) & s != 0 { OF } else { 0 })
            }
            F_SUB | F_SBB => {
                let cf = if self.f_op == F_SUB {
                    a < b
                } else {
                    a < b || (self.f_cin != 0 && a == b)
                };
                base | (cf as u64 * CF)
                    | ((a ^ b ^ r) & 0x10)
                    | (if (a ^ b) & (a ^ r) & s != 0 { OF } else { 0 })
            }
            F_LOGIC => base,
            F_INC => base | (self.f_cin & CF) | ((a ^ r) & 0x10) | (if r == s { OF } else { 0 }),
            F_DEC => {
                base | (self.f_cin & CF) | ((a ^ r) & 0x10) | (if r == s - 1 { OF } else { 0 })
            }
            _ => self.rflags & ARITH,
        }
    }

    /// Full RFLAGS.
    #[inline]
    pub(crate) fn get_rflags(&self) -> u64 {
        if self.f_op == F_NONE {
            self.rflags
        } else {
            (self.rflags & !ARITH) | self.compute_arith()
        }
    }

    /// Materialise lazy flags into `rflags`.
    #[inline]
    pub(crate) fn flush_flags(&mut self) {
        if self.f_op != F_NONE {
            self.rflags = (self.rflags & !ARITH) | self.compute_arith();
            self.f_op = F_NONE;
        }
    }

    /// Store RFLAGS as given (reserved bits fixed).
    pub(crate) fn set_rflags_raw(&mut self, v: u64) {
        self.rflags = (v & 0x003f_7fd5) | esvm_arch::bits::rflags::FIXED;
        self.f_op = F_NONE;
    }

    /// Set the six arithmetic flags.
    #[inline(always)]
    pub(crate) fn set_arith(&mut self, f: u64) {
        self.rflags = (self.rflags & !ARITH) | (f & ARITH);
        self.f_op = F_NONE;
    }

    /// Replace the arithmetic flags selected by `which` with those of `f`.
    #[inline(always)]
    pub(crate) fn set_some(&mut self, which: u64, f: u64) {
        self.flush_flags();
        self.rflags = (self.rflags & !which) | (f & which);
    }

    #[inline(always)]
    pub(crate) fn cf(&self) -> bool {
        match self.f_op {
            F_NONE => self.rflags & CF != 0,
            F_SUB => self.f_a < self.f_b,
            F_ADD => self.f_res < self.f_a,
            F_LOGIC => false,
            F_INC | F_DEC => self.f_cin & CF != 0,
            _ => self.compute_arith() & CF != 0,
        }
    }

    #[inline(always)]
    pub(crate) fn zf(&self) -> bool {
        if self.f_op == F_NONE {
            self.rflags & ZF != 0
        } else {
            self.f_res == 0
        }
    }

    /// Evaluate condition code `cc` (x86 encoding: O NO B AE E NE BE A S NS P NP L GE LE G).
    /// ZF and SF come from the lazy result of every producer; CF, OF and the compound
    /// conditions directly from the operands of SUB/CMP and logic ops (CF = OF = 0) and
    /// ADD's CF; everything else from the materialised flags. The record's values are
    /// shifted to the top of the word (see `lazy`), so no masking or sign extension is
    /// needed here.
    #[inline(always)]
    pub(crate) fn cond(&self, cc: u8) -> bool {
        let op = self.f_op;
        let r = if op == F_NONE {
            self.cond_slow(cc >> 1)
        } else {
            let (a, b, r) = (self.f_a, self.f_b, self.f_res);
            match cc >> 1 {
                2 => r == 0,
                4 => (r as i64) < 0,
                0 if op == F_SUB => (((a ^ b) & (a ^ r)) as i64) < 0,
                1 if op == F_SUB => a < b,
                3 if op == F_SUB => a <= b,
                6 if op == F_SUB => (a as i64) < (b as i64),
                7 if op == F_SUB => (a as i64) <= (b as i64),
                0 | 1 if op == F_LOGIC => false,
                3 if op == F_LOGIC => r == 0,
                6 if op == F_LOGIC => (r as i64) < 0,
                7 if op == F_LOGIC => (r as i64) <= 0,
                1 if op == F_ADD => r < a,
                _ => self.cond_slow(cc >> 1),
            }
        };
        r ^ (cc & 1 != 0)
    }

    fn cond_slow(&self, c: u8) -> bool {
        let f = self.get_rflags();
        match c {
            0 => f & OF != 0,
            1 => f & CF != 0,
            2 => f & ZF != 0,
            3 => f & (CF | ZF) != 0,
            4 => f & SF != 0,
            5 => f & PF != 0,
            6 => (f & SF != 0) != (f & OF != 0),
            _ => f & ZF != 0 || ((f & SF != 0) != (f & OF != 0)),
        }
    }
}

#[allow(dead_code)]
pub(crate) const ALL: u64 = CF | PF | AF | ZF | SF | OF;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Harness;

    /// The lazy shortcuts of `cond` agree with the materialised flags for every producer,
    /// size and condition.
    #[test]
    fn cond_matches_materialised_flags() {
        let mut h = Harness::new(4 << 20);
        let c = &mut h.cpu;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let special = [
            0u64,
            1,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff_ffff,
            u64::MAX,
        ];
        for _ in 0..20_000 {
            let sz = [1u8, 2, 4, 8][(rnd() % 4) as usize];
            let m = mask(sz);
            let mut pick = || {
                let r = rnd();
                if r % 3 == 0 {
                    special[(r >> 8) as usize % special.len()] & m
                } else {
                    (r >> 4) & m
                }
            };
            let (a, b) = (pick(), pick());
            let cin = rnd() & 1;
            let op = [F_ADD, F_ADC, F_SUB, F_SBB, F_LOGIC, F_INC, F_DEC][(rnd() % 7) as usize];
            let r = match op {
                F_ADD => a.wrapping_add(b),
                F_ADC => a.wrapping_add(b).wrapping_add(cin),
                F_SUB => a.wrapping_sub(b),
                F_SBB => a.wrapping_sub(b).wrapping_sub(cin),
                F_LOGIC => a & b,
                F_INC => a.wrapping_add(1),
                _ => a.wrapping_sub(1),
            } & m;
            c.lazy(op, sz, a, if op == F_INC || op == F_DEC { 1 } else { b }, r);
            c.f_cin = if op == F_INC || op == F_DEC {
                cin * CF
            } else {
                cin
            };
            let f = c.get_rflags();
            for cc in 0..16u8 {
                let want = match cc >> 1 {
                    0 => f & OF != 0,
                    1 => f & CF != 0,
                    2 => f & ZF != 0,
                    3 => f & (CF | ZF) != 0,
                    4 => f & SF != 0,
                    5 => f & PF != 0,
                    6 => (f & SF != 0) != (f & OF != 0),
                    _ => f & ZF != 0 || ((f & SF != 0) != (f & OF != 0)),
                } ^ (cc & 1 != 0);
                assert_eq!(
                    c.cond(cc),
                    want,
                    "op {op} sz {sz} a {a:#x} b {b:#x} cc {cc}"
                );
            }
        }
    }
}
