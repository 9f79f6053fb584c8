//! Instruction handlers and their selection at decode time.

pub(crate) mod alu;
pub(crate) mod ctrl;
pub(crate) mod misc;
pub(crate) mod mmx;
pub(crate) mod sse;
pub(crate) mod string;
pub(crate) mod system;
pub(crate) mod x87;

use crate::{Cpu, Mode, R};
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

pub(crate) type Handler = fn(&mut Cpu, &Insn) -> R;

/// Operand kinds.
pub(crate) const KNONE: u8 = 0;
pub(crate) const KREG: u8 = 1;
pub(crate) const KMEM: u8 = 2;
pub(crate) const KIMM: u8 = 3;

/// `base`/`index` values that are not GPRs.
pub(crate) const B_NONE: u8 = 0xff;
pub(crate) const B_RIP: u8 = 0x10;

/// A pre-decoded instruction.
#[derive(Clone)]
pub(crate) struct Insn {
    pub h: Handler,
    /// The handler that runs exactly this instruction: `h`, except where `h` runs a fused
    /// pair (see `alu::fuse_cmp_jcc`).
    pub h1: Handler,
    /// Memory displacement, or for near branches the offset from the next instruction.
    pub disp: u64,
    pub imm: u64,
    pub imm2: u64,
    /// Address-size mask for effective addresses.
    pub amask: u64,
    pub len: u8,
    /// Operand size in bytes (of operand 0 unless the handler says otherwise).
    pub sz: u8,
    /// Register operands (encoded: GPR 0-15, AH/CH/DH/BH 16-19; XMM/CR/DR/segment numbers).
    pub r0: u8,
    pub r1: u8,
    pub r2: u8,
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    pub seg: u8,
    pub k0: u8,
    pub k1: u8,
    pub k2: u8,
    /// Condition code for Jcc/SETcc/CMOVcc.
    pub cc: u8,
    pub lock: bool,
    /// Address size in bytes (2, 4, 8).
    pub asz: u8,
    /// Host-executed SSE operation, when the handler uses one.
    pub xop: Option<sse::XOp>,
    pub i: Instruction,
}

/// Encode a register operand.
pub(crate) fn enc_reg(r: Register) -> u8 {
    match r {
        Register::AH => 16,
        Register::CH => 17,
        Register::DH => 18,
        Register::BH => 19,
        _ if r.is_gpr() => r.full_register().number() as u8,
        _ => r.number() as u8,
    }
}

fn seg_num(r: Register) -> u8 {
    match r {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        Register::GS => 5,
        _ => 3,
    }
}

/// Address size from the prefix bytes and the mode.
fn address_size(mode: Mode, bytes: &[u8]) -> u8 {
    let mut has67 = false;
    for &b in bytes {
        match b {
            0x67 => has67 = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0xf0 | 0xf2 | 0xf3 => {}
            0x40..=0x4f if mode == Mode::Long64 => {}
            _ => break,
        }
    }
    match (mode.bits(), has67) {
        (64, false) => 8,
        (64, true) => 4,
        (32, false) => 4,
        (32, true) => 2,
        (_, false) => 2,
        (_, true) => 4,
    }
}

/// Index of the opcode byte in `bytes` (after the legacy prefixes and, in 64-bit mode, REX).
pub(crate) fn opcode_index(mode: Mode, bytes: &[u8]) -> usize {
    let mut k = 0;
    while let Some(&b) = bytes.get(k) {
        match b {
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 => k += 1,
            0x40..=0x4f if mode == Mode::Long64 => k += 1,
            _ => break,
        }
    }
    k
}

fn amask(asz: u8) -> u64 {
    match asz {
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn cc_of(i: &Instruction) -> u8 {
    use iced_x86::ConditionCode as C;
    match i.condition_code() {
        C::o => 0,
        C::no => 1,
        C::b => 2,
        C::ae => 3,
        C::e => 4,
        C::ne => 5,
        C::be => 6,
        C::a => 7,
        C::s => 8,
        C::ns => 9,
        C::p => 10,
        C::np => 11,
        C::l => 12,
        C::ge => 13,
        C::le => 14,
        C::g => 15,
        _ => 0,
    }
}

/// Build the pre-decoded form of `i` (raw `bytes`) in `mode`.
pub(crate) fn make(i: &Instruction, mode: Mode, bytes: &[u8]) -> Insn {
    let asz = address_size(mode, bytes);
    let mut d = Insn {
        h: system::h_ud,
        h1: system::h_ud,
        disp: 0,
        imm: 0,
        imm2: 0,
        amask: amask(asz),
        len: i.len().max(1) as u8,
        sz: 0,
        r0: 0,
        r1: 0,
        r2: 0,
        base: B_NONE,
        index: B_NONE,
        scale: 0,
        seg: 3,
        k0: KNONE,
        k1: KNONE,
        k2: KNONE,
        cc: cc_of(i),
        lock: i.has_lock_prefix(),
        asz,
        xop: None,
        i: *i,
    };
    if i.code() == Code::INVALID {
        return d;
    }
    let n = i.op_count().min(3);
    let mut nimm = 0;
    for op in 0..n {
        let (k, r) = match i.op_kind(op) {
            OpKind::Register => (KREG, enc_reg(i.op_register(op))),
            OpKind::Memory => {
                let base = i.memory_base();
                let index = i.memory_index();
                d.seg = seg_num(i.memory_segment());
                if base == Register::RIP || base == Register::EIP {
                    d.base = B_RIP;
                    d.disp = i.memory_displacement64().wrapping_sub(i.next_ip());
                    d.asz = if base == Register::RIP { 8 } else { 4 };
                } else {
                    d.disp = i.memory_displacement64();
                    if base != Register::None {
                        d.base = base.full_register().number() as u8;
                        d.asz = base.size() as u8;
                    }
                }
                if index != Register::None && index.is_gpr() {
                    d.index = index.full_register().number() as u8;
                    d.scale = i.memory_index_scale().trailing_zeros() as u8;
                    d.asz = index.size() as u8;
                }
                d.amask = amask(d.asz);
                (KMEM, 0)
            }
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                d.disp = i.near_branch_target().wrapping_sub(i.next_ip());
                (KIMM, 0)
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                d.imm = if i.op_kind(op) == OpKind::FarBranch16 {
                    i.far_branch16() as u64
                } else {
                    i.far_branch32() as u64
                };
                d.imm2 = i.far_branch_selector() as u64;
                (KIMM, 0)
            }
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {
                let v = i.immediate(op);
                if nimm == 0 {
                    d.imm = v;
                } else {
                    d.imm2 = v;
                }
                nimm += 1;
                (KIMM, 0)
            }
            _ => (KNONE, 0),
        };
        match op {
            0 => {
                d.k0 = k;
                d.r0 = r;
            }
            1 => {
                d.k1 = k;
                d.r1 = r;
            }
            _ => {
                d.k2 = k;
                d.r2 = r;
            }
        }
    }
    // Operand size: of operand 0, else of operand 1.
    d.sz = op_size(i, 0).or_else(|| op_size(i, 1)).unwrap_or(0);
    d.h = select(i, &mut d, mode, bytes);
    d.h1 = d.h;
    d
}

fn op_size(i: &Instruction, op: u32) -> Option<u8> {
    if op >= i.op_count() {
        return None;
    }
    match i.op_kind(op) {
        OpKind::Register => {
            let r = i.op_register(op);
            if r.is_gpr() {
                Some(r.size() as u8)
            } else {
                None
            }
        }
        OpKind::Memory => {
            let s = i.memory_size().size();
            if (1..=8).contains(&s) {
                Some(s as u8)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Instructions that must end a block even though they do not branch.
pub(crate) fn is_system(i: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        i.mnemonic(),
        Cpuid
            | Rdmsr
            | Wrmsr
            | Swapgs
            | Lgdt
            | Lidt
            | Ltr
            | Lldt
            | Cli
            | Sti
            | Hlt
            | In
            | Out
            | Insb
            | Insw
            | Insd
            | Outsb
            | Outsw
            | Outsd
            | Xsetbv
            | Invlpg
            | Popf
            | Popfd
            | Popfq
            | Lmsw
            | Clts
            | Wbinvd
            | Invd
            | Pause
            | Rdtsc
            | Rdtscp
            | Fxrstor
            | Fxrstor64
            | Ldmxcsr
    ) || (i.mnemonic() == Mov
        && (0..i.op_count()).any(|o| {
            i.op_kind(o) == OpKind::Register && {
                let r = i.op_register(o);
                r.is_cr() || r.is_dr() || r.is_segment_register()
            }
        }))
        || (i.mnemonic() == Pop
            && i.op_kind(0) == OpKind::Register
            && i.op0_register().is_segment_register())
}

/// Choose the handler.
fn select(i: &Instruction, d: &mut Insn, mode: Mode, bytes: &[u8]) -> Handler {
    use Mnemonic as M;
    let m = i.mnemonic();
    // Instructions invalid in 64-bit mode are already INVALID in iced's 64-bit decoder.
    if d.lock {
        let lockable = matches!(
            m,
            M::Add
                | M::Adc
                | M::And
                | M::Btc
                | M::Btr
                | M::Bts
                | M::Cmpxchg
                | M::Cmpxchg8b
                | M::Cmpxchg16b
                | M::Dec
                | M::Inc
                | M::Neg
                | M::Not
                | M::Or
                | M::Sbb
                | M::Sub
                | M::Xadd
                | M::Xchg
                | M::Xor
        );
        if !lockable || d.k0 != KMEM {
            return system::h_ud;
        }
    }
    if let Some(h) = misc::select(m, i, d, bytes, mode) {
        return h;
    }
    if let Some(h) = x87::select(m, i, d, bytes, mode) {
        return h;
    }
    if let Some(h) = alu::select(m, i, d) {
        return h;
    }
    if let Some(h) = ctrl::select(m, i, d, mode) {
        return h;
    }
    if let Some(h) = string::select(m, i, d) {
        return h;
    }
    if let Some(h) = system::select(m, i, d, mode) {
        return h;
    }
    if let Some(h) = mmx::select(m, i, d) {
        return h;
    }
    if let Some(h) = sse::select(m, i, d) {
        return h;
    }
    let _ = M::INVALID;
    system::h_ud
}

// ---------------------------------------------------------------------- operand helpers

impl Cpu {
    /// Read register `r` (encoded) with size `sz`.
    #[inline(always)]
    pub(crate) fn rr(&self, r: u8, sz: usize) -> u64 {
        match sz {
            1 => {
                if r < 16 {
                    self.gpr[r as usize & 15] & 0xff
                } else {
                    (self.gpr[(r - 16) as usize & 3] >> 8) & 0xff
                }
            }
            2 => self.gpr[r as usize & 15] & 0xffff,
            4 => self.gpr[r as usize & 15] & 0xffff_ffff,
            _ => self.gpr[r as usize & 15],
        }
    }

    /// Write register `r` with size `sz` (32-bit writes zero-extend, 8/16-bit merge).
    #[inline(always)]
    pub(crate) fn rw(&mut self, r: u8, sz: usize, v: u64) {
        match sz {
            1 => {
                if r < 16 {
                    let g = &mut self.gpr[r as usize & 15];
                    *g = (*g & !0xff) | (v & 0xff);
                } else {
                    let g = &mut self.gpr[(r - 16) as usize & 3];
                    *g = (*g & !0xff00) | ((v & 0xff) << 8);
                }
            }
            2 => {
                let g = &mut self.gpr[r as usize & 15];
                *g = (*g & !0xffff) | (v & 0xffff);
            }
            4 => self.gpr[r as usize & 15] = v & 0xffff_ffff,
            _ => self.gpr[r as usize & 15] = v,
        }
    }

    /// Effective address (offset within the segment) of the memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, d: &Insn) -> u64 {
        let mut a = d.disp;
        if d.base < 16 {
            a = a.wrapping_add(self.gpr[d.base as usize]);
        } else if d.base == B_RIP {
            a = a.wrapping_add(self.next_rip);
        }
        if d.index < 16 {
            a = a.wrapping_add(self.gpr[d.index as usize] << d.scale);
        }
        a & d.amask
    }

    /// Generic operand read (`n` = 0, 1, 2) with size `sz`.
    pub(crate) fn opr(&mut self, d: &Insn, n: u8, sz: usize) -> R<u64> {
        let (k, r) = match n {
            0 => (d.k0, d.r0),
            1 => (d.k1, d.r1),
            _ => (d.k2, d.r2),
        };
        match k {
            KREG => Ok(self.rr(r, sz)),
            KMEM => {
                let ea = self.ea(d);
                self.rd_sz(d.seg as usize, ea, sz as u8)
            }
            KIMM => {
                let second = (n == 1 && d.k0 == KIMM) || (n == 2 && d.k1 == KIMM);
                Ok((if second { d.imm2 } else { d.imm }) & crate::flags::mask(sz as u8))
            }
            _ => Ok(0),
        }
    }

    /// Generic operand write.
    pub(crate) fn opw(&mut self, d: &Insn, n: u8, sz: usize, v: u64) -> R {
        let (k, r) = match n {
            0 => (d.k0, d.r0),
            1 => (d.k1, d.r1),
            _ => (d.k2, d.r2),
        };
        match k {
            KREG => {
                self.rw(r, sz, v);
                Ok(())
            }
            KMEM => {
                let ea = self.ea(d);
                self.wr_sz(d.seg as usize, ea, sz as u8, v)
            }
            _ => Ok(()),
        }
    }

    /// Linear address of the memory operand for an access of `sz` bytes.
    #[inline(always)]
    pub(crate) fn mlin(&self, d: &Insn, sz: usize, write: bool) -> R<u64> {
        let ea = self.ea(d);
        self.lin(d.seg as usize, ea, sz, write)
    }
}
