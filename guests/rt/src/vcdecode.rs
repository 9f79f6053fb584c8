//! Decoder for the instructions the SEV-ES #VC handler emulates.
//!
//! On a #VC the hardware gives the guest nothing but the exit code and RIP; the handler
//! reads the instruction bytes at RIP and decodes them itself to find operands, sizes and
//! the instruction length. This decoder knows exactly the 64-bit-mode forms the handler
//! supports and rejects everything else (the handler then terminates the guest):
//!
//! - CPUID, RDMSR, WRMSR, RDTSC, RDTSCP, VMMCALL, WBINVD, INVD, MONITOR, MWAIT,
//!   MOV r64, DR7 and MOV DR7, r64;
//! - IN/OUT with an imm8 or DX port and AL/AX/EAX; INS/OUTS (B/W/D) with REP;
//! - MMIO moves: `88`/`89` (store register), `C6 /0`/`C7 /0` (store immediate), `8A`/`8B`
//!   (load register), `0F B6`/`0F B7` (MOVZX) with 8/16/32/64-bit operands and any ModRM/SIB
//!   addressing (including RIP-relative), but no FS/GS segment override, LOCK or REP.
//!
//! Compiled into the guest runtime (`mod vcdecode;`) and, for its unit tests against
//! iced-x86, into the host crate `esvm-guests`. `core` only, no `unsafe`.

// Host crates include this file as a module and do not use every item.
#![allow(dead_code)]

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// Why bytes were not decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// More than 15 bytes.
    TooLong,
    /// Not an instruction (form) the handler supports.
    Unsupported,
    /// An MMIO form with a register instead of a memory operand.
    RegisterOperand,
    /// An FS/GS segment override, LOCK, or REP/REPNE on a memory move.
    UnsupportedPrefix,
}

/// A general-purpose register operand: `num` in x86 encoding order (0 RAX, 1 RCX, 2 RDX,
/// 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15); `high8` selects AH/CH/DH/BH
/// (`num` 0..=3) for a byte operand encoded without REX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg {
    pub num: u8,
    pub high8: bool,
}

impl Reg {
    const fn byte(n: u8, rex: bool) -> Reg {
        if !rex && n >= 4 && n < 8 {
            Reg {
                num: n - 4,
                high8: true,
            }
        } else {
            Reg {
                num: n,
                high8: false,
            }
        }
    }

    const fn full(n: u8) -> Reg {
        Reg {
            num: n,
            high8: false,
        }
    }

    /// The `width`-byte value of this operand given the full register value.
    pub const fn read(self, full: u64, width: u8) -> u64 {
        if self.high8 {
            return (full >> 8) & 0xFF;
        }
        match width {
            1 => full & 0xFF,
            2 => full & 0xFFFF,
            4 => full & 0xFFFF_FFFF,
            _ => full,
        }
    }

    /// The full register value after writing `value` to this operand with `width` bytes:
    /// 1- and 2-byte writes merge, 4-byte writes zero-extend, 8-byte writes replace.
    pub const fn write(self, old: u64, width: u8, value: u64) -> u64 {
        if self.high8 {
            return (old & !0xFF00) | ((value & 0xFF) << 8);
        }
        match width {
            1 => (old & !0xFF) | (value & 0xFF),
            2 => (old & !0xFFFF) | (value & 0xFFFF),
            4 => value & 0xFFFF_FFFF,
            _ => value,
        }
    }
}

/// A memory operand (flat segment: no FS/GS override).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mem {
    /// Base register, if any.
    pub base: Option<u8>,
    /// Index register, if any.
    pub index: Option<u8>,
    /// Index scale: 1, 2, 4 or 8.
    pub scale: u8,
    /// Sign-extended displacement.
    pub disp: i64,
    /// RIP-relative (`disp` is relative to the next instruction).
    pub rip_relative: bool,
    /// 32-bit address size (0x67 prefix): the address wraps at 4 GiB.
    pub addr32: bool,
}

impl Mem {
    /// The linear address, given the registers (`gpr(n)`, x86 order) and the address of
    /// the next instruction.
    pub fn effective_address(&self, gpr: impl Fn(u8) -> u64, next_rip: u64) -> u64 {
        let mut a = if self.rip_relative {
            next_rip
        } else {
            match self.base {
                Some(b) => gpr(b),
                None => 0,
            }
        };
        if let Some(i) = self.index {
            a = a.wrapping_add(gpr(i).wrapping_mul(u64::from(self.scale)));
        }
        a = a.wrapping_add(self.disp as u64);
        if self.addr32 {
            a & 0xFFFF_FFFF
        } else {
            a
        }
    }
}

/// The port operand of IN/OUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPort {
    Imm(u8),
    Dx,
}

/// A port I/O instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    pub is_in: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP (F3) or REPNE (F2) on INS/OUTS.
    pub rep: bool,
    /// Operand size in bytes: 1, 2 or 4.
    pub size: u8,
    pub port: IoPort,
    /// 32-bit address size (ECX/ESI/EDI) for INS/OUTS.
    pub addr32: bool,
}

/// What an MMIO move does with the `size` bytes at its memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Store the low `size` bytes of a register (`88`, `89`).
    StoreReg(Reg),
    /// Store the low `size` bytes of an immediate, sign-extended to 64 bits (`C6`, `C7`).
    StoreImm(u64),
    /// Load, zero-extend and write `dst` with `dst_size` bytes (see [`Reg::write`])
    /// (`8A`, `8B`, `0F B6`, `0F B7`).
    Load { dst: Reg, dst_size: u8 },
}

/// An MMIO move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio {
    /// Bytes accessed: 1, 2, 4 or 8.
    pub size: u8,
    pub op: MmioOp,
    pub mem: Mem,
}

impl Mmio {
    /// Whether the access writes memory.
    pub const fn is_write(&self) -> bool {
        !matches!(self.op, MmioOp::Load { .. })
    }
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    Cpuid,
    Rdmsr,
    Wrmsr,
    Rdtsc,
    Rdtscp,
    Vmmcall,
    Wbinvd,
    Invd,
    Monitor,
    Mwait,
    /// `MOV r64, DR7` into GPR `gpr`.
    MovFromDr7 {
        gpr: u8,
    },
    /// `MOV DR7, r64` from GPR `gpr`.
    MovToDr7 {
        gpr: u8,
    },
    Io(Io),
    Mmio(Mmio),
}

impl Insn {
    /// Whether this instruction raises #VC with `exit_code` (see `esvm_abi::exit_code`).
    pub const fn matches_exit_code(&self, exit_code: u64) -> bool {
        let want: u64 = match self {
            Insn::Cpuid => 0x72,
            Insn::Rdmsr | Insn::Wrmsr => 0x7C,
            Insn::Rdtsc => 0x6E,
            Insn::Rdtscp => 0x87,
            Insn::Vmmcall => 0x81,
            Insn::Wbinvd => 0x89,
            Insn::Invd => 0x76,
            Insn::Monitor => 0x8A,
            Insn::Mwait => 0x8B,
            Insn::MovFromDr7 { .. } => 0x27,
            Insn::MovToDr7 { .. } => 0x37,
            Insn::Io(_) => 0x7B,
            Insn::Mmio(_) => 0x400,
        };
        want == exit_code
    }
}

/// An instruction and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub insn: Insn,
    pub len: usize,
}

#[derive(Clone, Copy, Default)]
struct Prefixes {
    opsize: bool,
    addr32: bool,
    rep: bool,
    repne: bool,
    lock: bool,
    fs_gs: bool,
    rex: u8,
}

impl Prefixes {
    fn w(&self) -> bool {
        self.rex & 8 != 0
    }
    fn r(&self) -> u8 {
        (self.rex >> 2) & 1
    }
    fn x(&self) -> u8 {
        (self.rex >> 1) & 1
    }
    fn b(&self) -> u8 {
        self.rex & 1
    }
    /// Operand size of a 16/32/64-bit form.
    fn osize(&self) -> u8 {
        if self.w() {
            8
        } else if self.opsize {
            2
        } else {
            4
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= MAX_INSN_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn imm(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }

    fn simm(&mut self, n: usize) -> Result<i64, DecodeError> {
        let v = self.imm(n)?;
        let shift = 64 - 8 * n as u32;
        Ok(((v << shift) as i64) >> shift)
    }
}

/// Decodes ModRM (+SIB, displacement) with a memory operand; returns it and the ModRM
/// reg field (extended by REX.R).
fn modrm_mem(c: &mut Cursor<'_>, p: &Prefixes) -> Result<(Mem, u8), DecodeError> {
    let m = c.next()?;
    let md = m >> 6;
    let reg = ((m >> 3) & 7) | (p.r() << 3);
    let rm = m & 7;
    if md == 3 {
        return Err(DecodeError::RegisterOperand);
    }
    let mut mem = Mem {
        base: None,
        index: None,
        scale: 1,
        disp: 0,
        rip_relative: false,
        addr32: p.addr32,
    };
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = c.next()?;
        mem.scale = 1 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | (p.x() << 3);
        if idx != 4 {
            mem.index = Some(idx);
        }
        let b = sib & 7;
        if b == 5 && md == 0 {
            disp_len = 4;
        } else {
            mem.base = Some(b | (p.b() << 3));
        }
    } else if rm == 5 && md == 0 {
        mem.rip_relative = true;
        disp_len = 4;
    } else {
        mem.base = Some(rm | (p.b() << 3));
    }
    if disp_len != 0 {
        mem.disp = c.simm(disp_len)?;
    }
    Ok((mem, reg))
}

/// Decodes the instruction at the start of `bytes` (at most 15 are looked at).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut c = Cursor { bytes, pos: 0 };
    let mut p = Prefixes::default();
    let op = loop {
        let b = c.next()?;
        match b {
            0x66 => p.opsize = true,
            0x67 => p.addr32 = true,
            0xF3 => {
                p.rep = true;
                p.repne = false;
            }
            0xF2 => {
                p.repne = true;
                p.rep = false;
            }
            0xF0 => p.lock = true,
            0x64 | 0x65 => p.fs_gs = true,
            0x26 | 0x2E | 0x36 | 0x3E => {}
            0x40..=0x4F => {
                p.rex = b;
                continue;
            }
            _ => break b,
        }
        // A legacy prefix after REX cancels the REX.
        p.rex = 0;
    };
    if p.lock {
        return Err(DecodeError::UnsupportedPrefix);
    }
    let insn = match op {
        0x0F => decode_0f(&mut c, &p)?,
        0x88 | 0x89 | 0x8A | 0x8B | 0xC6 | 0xC7 => {
            if p.fs_gs || p.rep || p.repne {
                return Err(DecodeError::UnsupportedPrefix);
            }
            let (mem, reg) = modrm_mem(&mut c, &p)?;
            let size = if op & 1 == 0 { 1 } else { p.osize() };
            let rex = p.rex != 0;
            let op = match op {
                0x88 => MmioOp::StoreReg(Reg::byte(reg, rex)),
                0x89 => MmioOp::StoreReg(Reg::full(reg)),
                0x8A => MmioOp::Load {
                    dst: Reg::byte(reg, rex),
                    dst_size: 1,
                },
                0x8B => MmioOp::Load {
                    dst: Reg::full(reg),
                    dst_size: size,
                },
                _ => {
                    // C6 /0, C7 /0 (other reg fields are not MOV).
                    if reg & 7 != 0 {
                        return Err(DecodeError::Unsupported);
                    }
                    let imm = match size {
                        1 => c.simm(1)?,
                        2 => c.simm(2)?,
                        _ => c.simm(4)?,
                    };
                    MmioOp::StoreImm(imm as u64)
                }
            };
            Insn::Mmio(Mmio { size, op, mem })
        }
        0xE4..=0xE7 | 0xEC..=0xEF => {
            let is_in = op & 2 == 0;
            // REX.W wins over 0x66 and port I/O has no 64-bit form: 32 bits.
            let size = if op & 1 == 0 {
                1
            } else if p.opsize && !p.w() {
                2
            } else {
                4
            };
            let port = if op & 8 == 0 {
                IoPort::Imm(c.next()?)
            } else {
                IoPort::Dx
            };
            Insn::Io(Io {
                is_in,
                string: false,
                rep: false,
                size,
                port,
                addr32: p.addr32,
            })
        }
        0x6C..=0x6F => {
            if p.fs_gs {
                return Err(DecodeError::UnsupportedPrefix);
            }
            // REX.W wins over 0x66 and port I/O has no 64-bit form: 32 bits.
            let size = if op & 1 == 0 {
                1
            } else if p.opsize && !p.w() {
                2
            } else {
                4
            };
            Insn::Io(Io {
                is_in: op & 2 == 0,
                string: true,
                rep: p.rep || p.repne,
                size,
                port: IoPort::Dx,
                addr32: p.addr32,
            })
        }
        _ => return Err(DecodeError::Unsupported),
    };
    Ok(Decoded { insn, len: c.pos })
}

fn decode_0f(c: &mut Cursor<'_>, p: &Prefixes) -> Result<Insn, DecodeError> {
    let op = c.next()?;
    // F2/F3 select other instructions in the 0F map (F3 0F 01 D9 is VMGEXIT).
    if p.rep || p.repne {
        return Err(DecodeError::UnsupportedPrefix);
    }
    Ok(match op {
        0xA2 => Insn::Cpuid,
        0x30 => Insn::Wrmsr,
        0x31 => Insn::Rdtsc,
        0x32 => Insn::Rdmsr,
        0x09 => Insn::Wbinvd,
        0x08 => Insn::Invd,
        0x01 if p.opsize => return Err(DecodeError::UnsupportedPrefix),
        0x01 => match c.next()? {
            0xD9 => Insn::Vmmcall,
            0xF9 => Insn::Rdtscp,
            0xC8 => Insn::Monitor,
            0xC9 => Insn::Mwait,
            _ => return Err(DecodeError::Unsupported),
        },
        0x21 | 0x23 => {
            // MOV to/from a debug register: always a register operand (mod is ignored).
            let m = c.next()?;
            let dr = ((m >> 3) & 7) | (p.r() << 3);
            if dr != 7 {
                return Err(DecodeError::Unsupported);
            }
            let gpr = (m & 7) | (p.b() << 3);
            if op == 0x21 {
                Insn::MovFromDr7 { gpr }
            } else {
                Insn::MovToDr7 { gpr }
            }
        }
        0xB6 | 0xB7 => {
            if p.fs_gs {
                return Err(DecodeError::UnsupportedPrefix);
            }
            let (mem, reg) = modrm_mem(c, p)?;
            Insn::Mmio(Mmio {
                size: if op == 0xB6 { 1 } else { 2 },
                op: MmioOp::Load {
                    dst: Reg::full(reg),
                    dst_size: p.osize(),
                },
                mem,
            })
        }
        _ => return Err(DecodeError::Unsupported),
    })
}
