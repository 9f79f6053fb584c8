//! Generator of random, fault-free x86-64 integer instruction sequences.
//!
//! A program is a list of [`OpSpec`]s: a [`Template`] plus a few words of raw entropy that the
//! template decodes into registers, operand sizes, immediates, addresses and encodings. Proptest
//! shrinks the list (fewer instructions) and the entropy towards zero (which decodes to the
//! simplest choices: RAX, first encoding, value 0), so failing cases minimise well.
//!
//! # Safety invariants of generated code
//! For any input registers and flags, provided RSP starts within ±[`RSP_SLACK`] of
//! [`STACK_TOP`] (checked by [`Program::run_native`]), a generated program
//! - only accesses memory inside the scratch buffer: every memory operand's base/index
//!   registers are loaded with constants by the template right before the access (or the
//!   operand is absolute, or RSP-relative with a small displacement); string instructions get
//!   RSI/RDI/RCX set with room in both directions; BT with a register bit offset gets a bounded
//!   offset;
//! - never writes RSP other than through PUSH/POP (RSP, SP, ESP and SPL are never destinations),
//!   and pushes/pops at most a few hundred bytes;
//! - never faults: DIV/IDIV operands are constructed so that the divisor is non-zero and the
//!   quotient fits; CMPXCHG16B operands are 16-byte aligned; LOCK only on memory destinations;
//!   POPF only loads arithmetic flags, DF and reserved bits (never TF, AC, IF, IOPL, NT, ID);
//! - only jumps forward to a label inside the program, and so always leaves through its end.
//!
//! # Undefined flags
//! Where the architecture leaves a flag undefined after an instruction (union of the Intel SDM
//! and the AMD APM), the generator marks it undefined; [`Program::flags_mask`] is the set of
//! flags still defined at the end, and only those are compared. Before an instruction that
//! *reads* a flag currently undefined (ADC/SBB, RCL/RCR, CMC, Jcc/SETcc/CMOVcc, LOOPcc, LAHF,
//! PUSHF), a `CMP reg, reg` is inserted so no undefined value can leak into registers or memory.
//! The per-instruction rules are listed at each template (see `Fx` values in the source).
//!
//! Results that are architecturally undefined are avoided, except one that is compared on
//! purpose: BSF/BSR with a zero source leave the destination unchanged (documented by AMD and
//! what Intel CPUs do in practice). 16-bit SHLD/SHRD counts above 16 (undefined result) and
//! 16-bit BSWAP (undefined) are never generated.

use crate::features::HostFeatures;
use crate::run::{NativeError, NativeState};
use crate::{CODE_ADDR, DATA_SIZE, FLAGS_MASK, SCRATCH_ADDR, SCRATCH_SIZE, STACK_TOP};
use esvm_arch::bits::rflags::{AF, ARITH, CF, DF, OF, PF, SF, ZF};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FastFormatter, Instruction,
    InstructionBlock, MemoryOperand, Register, RepPrefixKind,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

/// How far the input RSP may be from [`STACK_TOP`] for [`Program::run_native`].
pub const RSP_SLACK: u64 = 0x400;
/// Number of entropy words per instruction template.
pub const ENTROPY_WORDS: usize = 16;

/// Errors of program generation.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("iced-x86 has no instruction code named {0:?} (generator bug)")]
    UnknownCode(String),
    #[error("cannot build {what}: {source} (generator bug)")]
    Encode {
        what: String,
        source: iced_x86::IcedError,
    },
    #[error("template {0:?} needs a CPU feature this host lacks; filter templates with Template::supported")]
    Unsupported(Template),
    #[error("input RSP {rsp:#x} is not within {slack:#x} of STACK_TOP {top:#x}; generated programs only stay inside the scratch buffer from there", slack = RSP_SLACK, top = STACK_TOP)]
    StackOutOfRange { rsp: u64 },
}

/// Instruction templates. Each emits one instruction of its kind (plus the setup it needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Template {
    /// MOV reg,reg / reg,imm (incl. MOVABS, B0+r, C7 sign-extended) / reg,mem / mem,reg /
    /// mem,imm / moffs forms; 8..64 bits with AH..BH.
    Mov,
    /// ADD OR ADC SBB AND SUB XOR CMP, reg,reg (both directions).
    AluRR,
    /// ALU reg,imm (imm8 sign-extended, full immediates, accumulator short forms).
    AluRI,
    /// ALU reg,mem.
    AluRM,
    /// ALU mem,reg and mem,imm (LOCK sometimes).
    AluM,
    /// 2..4 ADC/SBB in a row (multi-word arithmetic), optionally started by ADD/SUB/CLC/STC.
    AdcSbbChain,
    /// TEST reg,reg / reg,imm / mem,reg / mem,imm / accumulator short forms.
    Test,
    /// INC/DEC reg or mem.
    IncDec,
    /// NEG/NOT reg or mem.
    NegNot,
    /// ROL ROR RCL RCR SHL SHR SAL(/6) SAR by 1, imm8 or CL, reg or mem; counts 0, 1, size-1,
    /// size, size+1, 31..33, 63..65, 255 and random.
    Shift,
    /// SHLD/SHRD by imm8 or CL, reg or mem destination, 16/32/64.
    ShldShrd,
    /// One-operand MUL/IMUL, 8..64, reg or mem.
    Mul1,
    /// IMUL reg, r/m (16/32/64).
    Imul2,
    /// IMUL reg, r/m, imm8/imm16/imm32.
    Imul3,
    /// DIV/IDIV reg or mem with constructed, non-faulting operands (incl. most-negative quotient).
    Div,
    /// BT BTS BTR BTC: reg,reg / reg,imm8 / mem,imm8 / mem,reg with a register bit offset
    /// reaching ±1 KiB around the operand (upper register bits randomised where ignored).
    Bt,
    /// BSF/BSR reg or mem source, sometimes zero.
    BsfBsr,
    /// TZCNT/LZCNT/POPCNT (each only if the host supports it), sometimes zero.
    CountBits,
    /// CMOVcc reg, r/m (all 16 conditions, 16/32/64; the 32-bit form zero-extends even if false).
    Cmov,
    /// SETcc reg8 (incl. AH..BH) or mem8.
    Setcc,
    /// CMP (random form) followed by SETcc.
    SetccAfterCmp,
    /// CMPXCHG reg or mem (sometimes with the accumulator made equal), LOCK sometimes.
    Cmpxchg,
    /// XADD reg or mem, LOCK sometimes.
    Xadd,
    /// XCHG reg,reg (incl. 90+r short forms) and mem,reg.
    Xchg,
    /// CMPXCHG8B / CMPXCHG16B (if the host supports it), equal and unequal cases.
    Cmpxchg8b16b,
    /// MOVS STOS LODS CMPS SCAS, b/w/d/q, with and without REP/REPE/REPNE, counts 0..64, DF
    /// either way, 64- and 32-bit address size.
    StringOp,
    /// PUSH/POP of r64, r16, m64, m16 and immediates (incl. PUSH RSP and POP into [RSP+x]).
    PushPop,
    /// PUSHFQ/POPFQ/PUSHFW/POPFW with arithmetic flags, DF and reserved bits.
    PushfPopf,
    /// LEA with every addressing form (incl. RIP-relative, 32-bit address size, 16-bit dest).
    Lea,
    /// MOVZX/MOVSX from 8/16 bits (incl. AH..BH sources) and MOVSXD.
    MovzxMovsx,
    /// CBW CWDE CDQE CWD CDQ CQO.
    SignExtendAcc,
    /// BSWAP r32/r64.
    Bswap,
    /// MOVBE load/store 16/32/64 (if the host supports it).
    Movbe,
    /// LAHF / SAHF (if the host supports them in 64-bit mode).
    LahfSahf,
    /// CLC STC CMC CLD STD.
    FlagOps,
    /// Forward Jcc/JMP (short or near), JRCXZ/JECXZ, LOOP/LOOPE/LOOPNE (RCX or ECX) over a
    /// block of simple instructions.
    Branch,
    /// XLATB.
    Xlat,
    /// A flag producer (ALU, shift, NEG, INC/DEC, IMUL), one or two instructions that update
    /// only some flags (INC/DEC, rotates, shifts by 0, BT, CLC/STC/CMC, SAHF, CMPXCHG8B), then
    /// a flag consumer (SETcc, CMOVcc, ADC/SBB, PUSHF, LAHF, Jcc): exercises lazy flag
    /// evaluation across partial updates.
    FlagChain,
}

impl Template {
    /// Every template.
    pub const ALL: [Template; 40] = [
        Template::Mov,
        Template::AluRR,
        Template::AluRI,
        Template::AluRM,
        Template::AluM,
        Template::AdcSbbChain,
        Template::Test,
        Template::IncDec,
        Template::NegNot,
        Template::Shift,
        Template::ShldShrd,
        Template::Mul1,
        Template::Imul2,
        Template::Imul3,
        Template::Div,
        Template::Bt,
        Template::BsfBsr,
        Template::CountBits,
        Template::Cmov,
        Template::Setcc,
        Template::SetccAfterCmp,
        Template::Cmpxchg,
        Template::Xadd,
        Template::Xchg,
        Template::Cmpxchg8b16b,
        Template::StringOp,
        Template::PushPop,
        Template::PushfPopf,
        Template::Lea,
        Template::MovzxMovsx,
        Template::SignExtendAcc,
        Template::Bswap,
        Template::Movbe,
        Template::LahfSahf,
        Template::FlagOps,
        Template::Branch,
        Template::Xlat,
        Template::FlagChain,
        // Shifts and flag chains are the richest sources of corner cases: weight them twice.
        Template::Shift,
        Template::FlagChain,
    ];

    /// Whether the host can run this template natively.
    pub fn supported(self, f: &HostFeatures) -> bool {
        match self {
            Template::CountBits => f.bmi1 || f.lzcnt || f.popcnt,
            Template::Movbe => f.movbe,
            Template::LahfSahf => f.lahf_lm,
            _ => true,
        }
    }

    /// The templates the host supports (with repetitions as weights).
    pub fn all_supported(f: &HostFeatures) -> Vec<Template> {
        Template::ALL
            .iter()
            .copied()
            .filter(|t| t.supported(f))
            .collect()
    }
}

/// One template instance: the template and the entropy it decodes.
#[derive(Clone, PartialEq, Eq)]
pub struct OpSpec {
    pub template: Template,
    pub entropy: [u64; ENTROPY_WORDS],
}

impl std::fmt::Debug for OpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}{:x?}", self.template, self.entropy)
    }
}

/// An assembled program.
#[derive(Clone, Debug)]
pub struct Program {
    /// Machine code, to be placed at [`CODE_ADDR`]; execution ends when RIP reaches its end.
    pub code: Vec<u8>,
    /// RFLAGS bits (within [`FLAGS_MASK`]) that are architecturally defined at the end.
    pub flags_mask: u64,
    /// Number of instructions (including setup instructions).
    pub instructions: usize,
    /// Disassembly, one instruction per line.
    pub listing: String,
}

/// Random register/flag inputs, with the scratch buffer derived from a seed.
#[derive(Clone, PartialEq, Eq)]
pub struct Input {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub scratch_seed: u64,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Input {{ gpr: [")?;
        for (i, g) in self.gpr.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}={g:#x}", esvm_arch::Gpr::ALL[i].name())?;
        }
        write!(
            f,
            "], rflags: {:#x}, scratch_seed: {:#x} }}",
            self.rflags, self.scratch_seed
        )
    }
}

impl Input {
    /// The full state: registers, flags, and a scratch buffer filled from `scratch_seed`.
    pub fn state(&self) -> NativeState {
        let mut scratch = vec![0u8; SCRATCH_SIZE];
        let mut s = self.scratch_seed;
        for chunk in scratch.chunks_mut(8) {
            let v = splitmix(&mut s);
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        }
        NativeState {
            gpr: self.gpr,
            rflags: self.rflags & FLAGS_MASK,
            scratch,
        }
    }
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A register value biased towards corner cases.
pub fn value_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => any::<u64>(),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => prop::sample::select(vec![
            0x8000_0000_0000_0000u64,
            0x7FFF_FFFF_FFFF_FFFF,
            0xFFFF_FFFF,
            0x8000_0000,
            0x7FFF_FFFF,
            0xFFFF,
            0x8000,
            0x7FFF,
            0xFF,
            0x80,
            0x7F,
            1,
        ]),
        1 => 0u64..64,
        1 => (0u64..64).prop_map(|v| v.wrapping_neg()),
        1 => any::<u32>().prop_map(u64::from),
    ]
}

/// Random inputs: corner-case-biased GPRs, RSP = [`STACK_TOP`], random arithmetic flags and DF,
/// random scratch contents.
pub fn input_strategy() -> impl Strategy<Value = Input> {
    (
        prop::array::uniform16(value_strategy()),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(mut gpr, rflags, scratch_seed)| {
            gpr[esvm_arch::Gpr::Rsp as usize] = STACK_TOP;
            Input {
                gpr,
                rflags: rflags & FLAGS_MASK,
                scratch_seed,
            }
        })
}

/// One random template instance among those the host supports.
pub fn op_strategy(features: &HostFeatures) -> impl Strategy<Value = OpSpec> {
    op_strategy_from(Template::all_supported(features))
}

/// One random template instance among `templates` (repetitions weight; must not be empty).
pub fn op_strategy_from(templates: Vec<Template>) -> impl Strategy<Value = OpSpec> {
    (
        prop::sample::select(templates),
        prop::array::uniform16(any::<u64>()),
    )
        .prop_map(|(template, entropy)| OpSpec { template, entropy })
}

/// Random programs of `len` template instances among those the host supports.
pub fn program_strategy(
    features: &HostFeatures,
    len: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op_strategy(features), len)
}

/// Random programs of `len` template instances among `templates`.
pub fn program_strategy_from(
    templates: Vec<Template>,
    len: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op_strategy_from(templates), len)
}

impl Program {
    /// Runs the program natively (see [`crate::run_native`]). Safe because generated programs
    /// only touch the scratch buffer and stack (see the module docs), given an RSP near
    /// [`STACK_TOP`], which this checks.
    pub fn run_native(&self, input: &NativeState) -> Result<NativeState, RunError> {
        let rsp = input.gpr[esvm_arch::Gpr::Rsp as usize];
        if rsp.abs_diff(STACK_TOP) > RSP_SLACK {
            return Err(GenError::StackOutOfRange { rsp }.into());
        }
        // SAFETY: the code comes from `assemble`, whose output only accesses the scratch buffer
        // and the stack inside it (RSP checked above), leaves through its end, never faults and
        // never sets TF/AC (module docs, "Safety invariants").
        Ok(unsafe { crate::run::run_native(&self.code, input) }?)
    }

    /// Compares two final states of this program (registers, the flags in
    /// [`Program::flags_mask`], scratch buffer); returns a description of every difference.
    pub fn diff(&self, expected: &NativeState, actual: &NativeState) -> Vec<String> {
        let mut out = Vec::new();
        for r in esvm_arch::Gpr::ALL {
            let (e, a) = (expected.get(r), actual.get(r));
            if e != a {
                out.push(format!("{}: expected {e:#018x}, got {a:#018x}", r.name()));
            }
        }
        let (e, a) = (
            expected.rflags & self.flags_mask,
            actual.rflags & self.flags_mask,
        );
        if e != a {
            out.push(format!(
                "rflags (mask {:#x}): expected {e:#x} [{}], got {a:#x} [{}]",
                self.flags_mask,
                flag_names(e),
                flag_names(a)
            ));
        }
        let mut shown = 0;
        let mut count = 0;
        for (i, (e, a)) in expected.scratch.iter().zip(&actual.scratch).enumerate() {
            if e != a {
                count += 1;
                if shown < 16 {
                    shown += 1;
                    out.push(format!(
                        "scratch[{:#x}] (addr {:#x}): expected {e:#04x}, got {a:#04x}",
                        i,
                        SCRATCH_ADDR + i as u64
                    ));
                }
            }
        }
        if count > shown {
            out.push(format!("... {} more scratch bytes differ", count - shown));
        }
        if expected.scratch.len() != actual.scratch.len() {
            out.push(format!(
                "scratch length: expected {}, got {}",
                expected.scratch.len(),
                actual.scratch.len()
            ));
        }
        out
    }
}

/// Errors of [`Program::run_native`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Gen(#[from] GenError),
    #[error(transparent)]
    Native(#[from] NativeError),
}

/// Names of the set flags in `f`, e.g. "CF ZF".
pub fn flag_names(f: u64) -> String {
    let names = [
        (CF, "CF"),
        (PF, "PF"),
        (AF, "AF"),
        (ZF, "ZF"),
        (SF, "SF"),
        (DF, "DF"),
        (OF, "OF"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|&(_, n)| n)
        .collect();
    v.join(" ")
}

/// Assembles a program from template instances. Templates the host does not support are an
/// error (filter with [`Template::supported`]).
pub fn assemble(ops: &[OpSpec], features: &HostFeatures) -> Result<Program, GenError> {
    assemble_excluding(ops, features, &[])
}

/// [`assemble`], with templates that [`Template::FlagChain`] must not use as building blocks
/// (to keep hunting while a bug in one of them is open).
pub fn assemble_excluding(
    ops: &[OpSpec],
    features: &HostFeatures,
    exclude: &[Template],
) -> Result<Program, GenError> {
    let mut b = Builder {
        insns: Vec::new(),
        undef: 0,
        next_label: 1,
        pending_label: None,
        features: *features,
        exclude: exclude.to_vec(),
    };
    for op in ops {
        if !op.template.supported(features) {
            return Err(GenError::Unsupported(op.template));
        }
        let mut e = Entropy::new(&op.entropy);
        b.template(op.template, &mut e)?;
    }
    if let Some(l) = b.pending_label.take() {
        let mut nop = Instruction::with(Code::Nopd);
        nop.set_ip(l);
        b.insns.push(nop);
    }
    let block = InstructionBlock::new(&b.insns, CODE_ADDR);
    let res = BlockEncoder::encode(64, block, BlockEncoderOptions::DONT_FIX_BRANCHES).map_err(
        |source| GenError::Encode {
            what: "the program".into(),
            source,
        },
    )?;
    let code = res.code_buffer;
    Ok(Program {
        listing: disassemble(&code),
        instructions: b.insns.len(),
        flags_mask: FLAGS_MASK & !b.undef,
        code,
    })
}

/// Disassembly of code placed at [`CODE_ADDR`], one line per instruction.
pub fn disassemble(code: &[u8]) -> String {
    let mut d = Decoder::with_ip(64, code, CODE_ADDR, DecoderOptions::NONE);
    let mut f = FastFormatter::new();
    let mut out = String::new();
    let mut text = String::new();
    while d.can_decode() {
        let ins = d.decode();
        text.clear();
        f.format(&ins, &mut text);
        let start = (ins.ip() - CODE_ADDR) as usize;
        let bytes = crate::run::hex(&code[start..start + ins.len()]);
        let _ = writeln!(out, "{:#x}: {bytes:<40} {text}", ins.ip());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Entropy decoding

struct Entropy<'a> {
    words: &'a [u64],
    i: usize,
    state: u64,
}

impl<'a> Entropy<'a> {
    fn new(words: &'a [u64]) -> Self {
        let state = words.iter().fold(0x5EED_u64, |a, &w| a.rotate_left(7) ^ w);
        Entropy { words, i: 0, state }
    }

    /// The next word: the given ones first, then a deterministic stream derived from them.
    fn next(&mut self) -> u64 {
        let v = match self.words.get(self.i) {
            Some(&w) => w,
            None => splitmix(&mut self.state),
        };
        self.i += 1;
        v
    }

    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next() % n
    }

    /// True with probability 1/n; false for zero entropy (simplest choice when shrinking).
    fn chance(&mut self, n: u64) -> bool {
        self.below(n) == 1
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    /// A `bits`-wide value biased towards corner cases.
    fn value(&mut self, bits: u32) -> u64 {
        let m = mask(bits);
        let sign = 1u64 << (bits - 1);
        match self.below(12) {
            0..=5 => self.next() & m,
            6 => 0,
            7 => m,
            8 => sign,
            9 => sign - 1,
            10 => self.below(17),
            _ => m.wrapping_sub(self.below(16)) & m,
        }
    }

    /// A `bits`-wide value, sign-extended to i64.
    fn svalue(&mut self, bits: u32) -> i64 {
        sext(self.value(bits), bits)
    }

    /// Uniform in lo..=hi.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

fn sext(v: u64, bits: u32) -> i64 {
    let sh = 64 - bits;
    ((v << sh) as i64) >> sh
}

// ---------------------------------------------------------------------------------------------
// Registers

use iced_x86::Register::{
    AH, AL, AX, BH, BL, BP, BPL, BX, CH, CL, CX, DH, DI, DIL, DL, DX, EAX, EBP, EBX, ECX, EDI, EDX,
    ESI, ESP, R10, R10D, R10L, R10W, R11, R11D, R11L, R11W, R12, R12D, R12L, R12W, R13, R13D, R13L,
    R13W, R14, R14D, R14L, R14W, R15, R15D, R15L, R15W, R8, R8D, R8L, R8W, R9, R9D, R9L, R9W, RAX,
    RBP, RBX, RCX, RDI, RDX, RIP, RSI, RSP, SI, SIL, SP, SPL,
};

const R64: [Register; 16] = [
    RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15,
];
const R32: [Register; 16] = [
    EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D,
];
const R16: [Register; 16] = [
    AX, CX, DX, BX, SP, BP, SI, DI, R8W, R9W, R10W, R11W, R12W, R13W, R14W, R15W,
];
const R8B: [Register; 16] = [
    AL, CL, DL, BL, SPL, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L, R14L, R15L,
];
const LEGACY8: [Register; 8] = [AL, CL, DL, BL, AH, CH, DH, BH];
const I_RAX: usize = 0;
const I_RCX: usize = 1;
const I_RDX: usize = 2;
const I_RBX: usize = 3;
const I_RSP: usize = 4;
const I_RSI: usize = 6;
const I_RDI: usize = 7;

fn gpr(size: u32, idx: usize) -> Register {
    match size {
        8 => R8B[idx],
        16 => R16[idx],
        32 => R32[idx],
        _ => R64[idx],
    }
}

/// Encoding number 0..15 of the 64-bit register containing `r` (AH -> 0).
fn num(r: Register) -> usize {
    match r {
        AH => 0,
        CH => 1,
        DH => 2,
        BH => 3,
        _ => r.full_register() as usize - RAX as usize,
    }
}

fn is_high8(r: Register) -> bool {
    matches!(r, AH | CH | DH | BH)
}

fn needs_rex(r: Register) -> bool {
    !is_high8(r) && (num(r) >= 8 || matches!(r, SPL | BPL | SIL | DIL))
}

fn compatible(a: Register, b: Register) -> bool {
    !((is_high8(a) && needs_rex(b)) || (is_high8(b) && needs_rex(a)))
}

/// Makes `b` encodable together with `a` (AH..BH cannot appear with a REX prefix).
fn fix_pair(e: &mut Entropy, a: Register, b: Register) -> Register {
    if compatible(a, b) {
        b
    } else if is_high8(a) {
        // `b` needs REX: use a legacy byte register instead.
        e.pick(&LEGACY8)
    } else {
        // `b` is AH..BH and `a` needs REX: use the low byte of the same register.
        R8B[num(b)]
    }
}

/// A register index that may be written (anything but RSP).
fn widx(e: &mut Entropy) -> usize {
    let i = e.below(15) as usize;
    if i >= I_RSP {
        i + 1
    } else {
        i
    }
}

/// A writable register index not in `avoid` (bit mask of indices), if one exists.
fn widx_avoiding(e: &mut Entropy, avoid: u32) -> usize {
    let avoid = avoid | (1 << I_RSP);
    let free: Vec<usize> = (0..16).filter(|i| avoid & (1 << i) == 0).collect();
    free[e.below(free.len() as u64) as usize]
}

fn ridx(e: &mut Entropy) -> usize {
    e.below(16) as usize
}

/// An 8-bit register; `writable` excludes SPL, `legacy` restricts to AL..BL/AH..BH.
fn reg8(e: &mut Entropy, writable: bool, legacy: bool) -> Register {
    if legacy || e.chance(4) {
        return e.pick(&LEGACY8);
    }
    let i = if writable { widx(e) } else { ridx(e) };
    R8B[i]
}

/// Two registers of `size` for a reg,reg instruction; `w0`/`w1` say which are written.
fn reg_pair(e: &mut Entropy, size: u32, w0: bool, w1: bool) -> (Register, Register) {
    if size == 8 {
        let a = reg8(e, w0, false);
        let b = reg8(e, w1, false);
        return (a, fix_pair(e, a, b));
    }
    let a = if w0 { widx(e) } else { ridx(e) };
    let b = if w1 { widx(e) } else { ridx(e) };
    (gpr(size, a), gpr(size, b))
}

fn size_any(e: &mut Entropy) -> u32 {
    e.pick(&[64, 32, 16, 8])
}

fn size_no8(e: &mut Entropy) -> u32 {
    e.pick(&[64, 32, 16])
}

// ---------------------------------------------------------------------------------------------
// Flags

/// Effect of one instruction on the arithmetic flags: which it reads, which it sets to defined
/// values, which it leaves undefined. Flags in none of the sets are unaffected.
#[derive(Clone, Copy)]
struct Fx {
    reads: u64,
    defs: u64,
    undef: u64,
}

const NOFX: Fx = Fx {
    reads: 0,
    defs: 0,
    undef: 0,
};
/// ADD SUB CMP NEG ADC SBB XADD CMPXCHG CMPS SCAS: all six defined.
const FX_ARITH: Fx = Fx {
    reads: 0,
    defs: ARITH,
    undef: 0,
};
/// AND OR XOR TEST: OF=CF=0, SF ZF PF by result, AF undefined (SDM/APM "AF undefined").
const FX_LOGIC: Fx = Fx {
    reads: 0,
    defs: ARITH & !AF,
    undef: AF,
};
/// MUL/IMUL (all forms): CF and OF defined, SF ZF AF PF undefined.
const FX_MUL: Fx = Fx {
    reads: 0,
    defs: CF | OF,
    undef: SF | ZF | AF | PF,
};
/// DIV/IDIV: all six undefined.
const FX_DIV: Fx = Fx {
    reads: 0,
    defs: 0,
    undef: ARITH,
};

fn alu_fx(op: &str) -> Fx {
    match op {
        "Adc" | "Sbb" => Fx {
            reads: CF,
            ..FX_ARITH
        },
        "And" | "Or" | "Xor" => FX_LOGIC,
        _ => FX_ARITH,
    }
}

/// Condition codes as iced names them, and the flags each reads.
const CONDS: [(&str, u64); 16] = [
    ("o", OF),
    ("no", OF),
    ("b", CF),
    ("ae", CF),
    ("e", ZF),
    ("ne", ZF),
    ("be", CF | ZF),
    ("a", CF | ZF),
    ("s", SF),
    ("ns", SF),
    ("p", PF),
    ("np", PF),
    ("l", SF | OF),
    ("ge", SF | OF),
    ("le", ZF | SF | OF),
    ("g", ZF | SF | OF),
];

fn reads(f: u64) -> Fx {
    Fx {
        reads: f,
        defs: 0,
        undef: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Instruction construction

fn code(name: &str) -> Result<Code, GenError> {
    static MAP: OnceLock<HashMap<String, Code>> = OnceLock::new();
    let map = MAP.get_or_init(|| Code::values().map(|c| (format!("{c:?}"), c)).collect());
    map.get(name)
        .copied()
        .ok_or_else(|| GenError::UnknownCode(name.to_string()))
}

/// An operand for [`mk`].
#[derive(Clone, Copy)]
enum Op {
    R(Register),
    M(MemoryOperand),
    I(i32),
}

fn mk(name: &str, ops: &[Op]) -> Result<Instruction, GenError> {
    let c = code(name)?;
    let r = match *ops {
        [] => Ok(Instruction::with(c)),
        [Op::R(a)] => Instruction::with1(c, a),
        [Op::M(a)] => Instruction::with1(c, a),
        [Op::I(a)] => Instruction::with1(c, a),
        [Op::R(a), Op::R(b)] => Instruction::with2(c, a, b),
        [Op::R(a), Op::M(b)] => Instruction::with2(c, a, b),
        [Op::M(a), Op::R(b)] => Instruction::with2(c, a, b),
        [Op::R(a), Op::I(b)] => Instruction::with2(c, a, b),
        [Op::M(a), Op::I(b)] => Instruction::with2(c, a, b),
        [Op::R(a), Op::R(b), Op::I(x)] => Instruction::with3(c, a, b, x),
        [Op::R(a), Op::R(b), Op::R(x)] => Instruction::with3(c, a, b, x),
        [Op::R(a), Op::M(b), Op::I(x)] => Instruction::with3(c, a, b, x),
        [Op::M(a), Op::R(b), Op::I(x)] => Instruction::with3(c, a, b, x),
        [Op::M(a), Op::R(b), Op::R(x)] => Instruction::with3(c, a, b, x),
        _ => {
            return Err(GenError::UnknownCode(format!(
                "{name} with {} operands",
                ops.len()
            )))
        }
    };
    let i = r.map_err(|source| GenError::Encode {
        what: name.to_string(),
        source,
    })?;
    // Encode it once on its own, so an impossible operand combination is reported here, with
    // its name, rather than by the block encoder for the whole program.
    iced_x86::Encoder::new(64)
        .encode(&i, CODE_ADDR)
        .map_err(|source| GenError::Encode {
            what: format!("{name} {i}"),
            source,
        })?;
    Ok(i)
}

/// Displacement size iced expects for a full displacement: the address size in bytes.
fn addr_bytes(base: Register, index: Register) -> u32 {
    let r = if base != Register::None { base } else { index };
    if r.is_gpr32() {
        4
    } else {
        8
    }
}

fn mem(base: Register, index: Register, scale: u32, disp: i64) -> MemoryOperand {
    let displ_size = if base == Register::None {
        addr_bytes(base, index)
    } else if disp == 0 {
        0
    } else if (-128..128).contains(&disp) {
        1
    } else {
        addr_bytes(base, index)
    };
    MemoryOperand::new(base, index, scale, disp, displ_size, false, Register::None)
}

/// The same memory operand `delta` bytes further on.
fn mem_plus(m: MemoryOperand, delta: i64) -> MemoryOperand {
    if m.base == Register::None && m.index == Register::None {
        return MemoryOperand::new(
            Register::None,
            Register::None,
            1,
            m.displacement + delta,
            m.displ_size,
            false,
            Register::None,
        );
    }
    mem(m.base, m.index, m.scale, m.displacement + delta)
}

/// Immediate suffix and value range of the main immediate form for an operand size.
fn imm_for(e: &mut Entropy, size: u32) -> (&'static str, i32) {
    match size {
        8 => ("imm8", e.svalue(8) as i32),
        16 => ("imm16", e.svalue(16) as i32),
        _ => ("imm32", e.svalue(32) as i32),
    }
}

// ---------------------------------------------------------------------------------------------
// The builder

struct Builder {
    insns: Vec<Instruction>,
    /// Flags currently undefined.
    undef: u64,
    next_label: u64,
    /// Label to attach to the next instruction.
    pending_label: Option<u64>,
    features: HostFeatures,
    /// Templates FlagChain must not use.
    exclude: Vec<Template>,
}

/// Region of the scratch buffer (offsets) a memory access may touch.
#[derive(Clone, Copy)]
struct Region {
    lo: u64,
    hi: u64,
}

const DATA: Region = Region {
    lo: 0,
    hi: DATA_SIZE as u64,
};

impl Builder {
    fn push(&mut self, mut i: Instruction) {
        if let Some(l) = self.pending_label.take() {
            i.set_ip(l);
        }
        self.insns.push(i);
    }

    /// Emits `i` with flag effect `fx`, first re-defining any undefined flag it reads.
    fn emit(&mut self, e: &mut Entropy, i: Instruction, fx: Fx) -> Result<(), GenError> {
        if fx.reads & self.undef != 0 {
            self.fix_flags(e)?;
        }
        self.push(i);
        self.undef = (self.undef & !fx.defs) | fx.undef;
        Ok(())
    }

    fn fix_flags(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let (a, b) = (ridx(e), ridx(e));
        let i = mk("Cmp_rm64_r64", &[Op::R(R64[a]), Op::R(R64[b])])?;
        self.push(i);
        self.undef = 0;
        Ok(())
    }

    /// Loads a 64-bit constant into register `idx` (never RSP) with a random MOV encoding.
    fn set64(&mut self, e: &mut Entropy, idx: usize, v: u64) -> Result<(), GenError> {
        debug_assert_ne!(idx, I_RSP);
        let i = match e.below(3) {
            1 if v <= u32::MAX as u64 => {
                mk("Mov_r32_imm32", &[Op::R(R32[idx]), Op::I(v as u32 as i32)])?
            }
            2 if (v as i64) == (v as i32 as i64) => {
                mk("Mov_rm64_imm32", &[Op::R(R64[idx]), Op::I(v as i32)])?
            }
            _ => Instruction::with2(code("Mov_r64_imm64")?, R64[idx], v).map_err(|source| {
                GenError::Encode {
                    what: "mov r64, imm64".into(),
                    source,
                }
            })?,
        };
        self.push(i);
        Ok(())
    }

    /// Loads `v` into the low `size` bits of register `r` (upper bits per the usual rules).
    fn set_sized(&mut self, r: Register, size: u32, v: u64) -> Result<(), GenError> {
        let i = match size {
            8 => mk("Mov_r8_imm8", &[Op::R(r), Op::I(sext(v, 8) as i32)])?,
            16 => mk("Mov_r16_imm16", &[Op::R(r), Op::I(sext(v, 16) as i32)])?,
            32 => mk("Mov_r32_imm32", &[Op::R(r), Op::I(v as u32 as i32)])?,
            _ => Instruction::with2(code("Mov_r64_imm64")?, r, v).map_err(|source| {
                GenError::Encode {
                    what: "mov r64, imm64".into(),
                    source,
                }
            })?,
        };
        self.push(i);
        Ok(())
    }

    /// A memory operand for an access of `span` bytes (aligned to `align`) inside `region`,
    /// with whatever base/index setup it needs emitted now. Registers in `avoid` (bit mask of
    /// indices) are not used; `legacy` restricts to registers encodable without REX. Returns
    /// the operand and the mask of registers it uses.
    fn mem(
        &mut self,
        e: &mut Entropy,
        span: u64,
        align: u64,
        avoid: u32,
        legacy: bool,
        region: Region,
    ) -> Result<(MemoryOperand, u32), GenError> {
        let avoid = avoid | if legacy { 0xFF00 } else { 0 };
        let room = region.hi - region.lo - span;
        let mut off = region.lo
            + match e.below(4) {
                // Near either end of the region (accesses crossing 4 KiB boundaries inside
                // it are covered by the uniform case).
                1 => e.below(64).min(room),
                2 => room - e.below(64).min(room),
                _ => e.below(room + 1),
            };
        off -= off % align;
        let addr = SCRATCH_ADDR + off;
        let can_base = (avoid | (1 << I_RSP)) != 0xFFFF;
        let mode = if can_base { e.below(7) } else { 4 };
        Ok(match mode {
            0 | 1 => {
                let b = widx_avoiding(e, avoid);
                let disp = match e.below(3) {
                    0 => 0,
                    1 => e.range(-128, 127),
                    _ => e.range(-0x10000, 0x10000),
                };
                self.set64(e, b, addr.wrapping_sub(disp as u64))?;
                (mem(R64[b], Register::None, 1, disp), 1 << b)
            }
            2 => {
                let b = widx_avoiding(e, avoid);
                let x = widx_avoiding(e, avoid | (1 << b));
                let scale = e.pick(&[1u32, 2, 4, 8]);
                let xv = e.range(-512, 512);
                let disp = e.range(-128, 127);
                let bv = (addr as i64)
                    .wrapping_sub(xv * scale as i64)
                    .wrapping_sub(disp);
                self.set64(e, b, bv as u64)?;
                self.set64(e, x, xv as u64)?;
                (mem(R64[b], R64[x], scale, disp), (1 << b) | (1 << x))
            }
            3 if align == 1 && span <= 16 => {
                // RSP-relative into the private stack; RSP is within STACK_TOP ± (RSP_SLACK +
                // a few hundred bytes of pushes), the stack area spans 8 KiB around it.
                let disp = e.range(-(RSP_SLACK as i64), RSP_SLACK as i64);
                (mem(RSP, Register::None, 1, disp), 1 << I_RSP)
            }
            5 => {
                // 32-bit address size: the upper halves of the registers must be ignored.
                let b = widx_avoiding(e, avoid);
                let disp = e.range(-128, 127);
                let hi = if e.chance(2) { 0 } else { e.next() << 32 };
                let v = hi | (addr.wrapping_sub(disp as u64) & 0xFFFF_FFFF);
                self.set64(e, b, v)?;
                (mem(R32[b], Register::None, 1, disp), 1 << b)
            }
            6 => {
                // Index only: [index*scale + disp32].
                let x = widx_avoiding(e, avoid);
                let scale = e.pick(&[1u32, 2, 4, 8]);
                let xv = e.range(-256, 256);
                let disp = addr as i64 - xv * scale as i64;
                self.set64(e, x, xv as u64)?;
                (mem(Register::None, R64[x], scale, disp), 1 << x)
            }
            _ => {
                // Absolute [disp32] (SIB without base or index); displacement size 4 selects
                // the 32-bit address size (67 prefix), 8 the 64-bit one.
                let ds = if e.chance(3) { 4 } else { 8 };
                let m = MemoryOperand::new(
                    Register::None,
                    Register::None,
                    1,
                    addr as i64,
                    ds,
                    false,
                    Register::None,
                );
                (m, 0)
            }
        })
    }

    /// `mem` over the whole data area.
    fn mem_any(
        &mut self,
        e: &mut Entropy,
        span: u64,
        avoid: u32,
        legacy: bool,
    ) -> Result<(MemoryOperand, u32), GenError> {
        self.mem(e, span, 1, avoid, legacy, DATA)
    }

    fn label(&mut self) -> u64 {
        let l = self.next_label;
        self.next_label += 1;
        l
    }

    fn bind(&mut self, l: u64) -> Result<(), GenError> {
        if self.pending_label.is_some() {
            // Two labels on one spot: give the first one its own NOP.
            let nop = Instruction::with(Code::Nopd);
            self.push(nop);
        }
        self.pending_label = Some(l);
        Ok(())
    }

    fn template(&mut self, t: Template, e: &mut Entropy) -> Result<(), GenError> {
        match t {
            Template::Mov => self.t_mov(e),
            Template::AluRR => {
                let op = e.pick(&ALU_OPS);
                let s = size_any(e);
                let (a, b) = reg_pair(e, s, op != "Cmp", false);
                let form = if e.chance(2) {
                    "r{s}_rm{s}"
                } else {
                    "rm{s}_r{s}"
                };
                let name = format!("{op}_{}", form.replace("{s}", &s.to_string()));
                let i = mk(&name, &[Op::R(a), Op::R(b)])?;
                self.emit(e, i, alu_fx(op))
            }
            Template::AluRI => {
                let op = e.pick(&ALU_OPS);
                let s = size_any(e);
                let r = if s == 8 {
                    reg8(e, op != "Cmp", false)
                } else {
                    gpr(s, if op != "Cmp" { widx(e) } else { ridx(e) })
                };
                let i = self.alu_imm(e, op, s, Op::R(r))?;
                self.emit(e, i, alu_fx(op))
            }
            Template::AluRM => {
                let op = e.pick(&ALU_OPS);
                let s = size_any(e);
                let r = if s == 8 {
                    reg8(e, op != "Cmp", false)
                } else {
                    gpr(s, if op != "Cmp" { widx(e) } else { ridx(e) })
                };
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, is_high8(r))?;
                let i = mk(&format!("{op}_r{s}_rm{s}"), &[Op::R(r), Op::M(m)])?;
                self.emit(e, i, alu_fx(op))
            }
            Template::AluM => {
                let op = e.pick(&ALU_OPS);
                let s = size_any(e);
                let with_reg = e.chance(2);
                let r = if s == 8 {
                    reg8(e, false, false)
                } else {
                    gpr(s, ridx(e))
                };
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, with_reg && is_high8(r))?;
                let mut i = if with_reg {
                    mk(&format!("{op}_rm{s}_r{s}"), &[Op::M(m), Op::R(r)])?
                } else {
                    self.alu_imm(e, op, s, Op::M(m))?
                };
                if op != "Cmp" && e.chance(3) {
                    i.set_has_lock_prefix(true);
                }
                self.emit(e, i, alu_fx(op))
            }
            Template::AdcSbbChain => {
                let s = size_no8(e);
                match e.below(4) {
                    1 => self.emit(e, Instruction::with(Code::Clc), Fx { defs: CF, ..NOFX })?,
                    2 => self.emit(e, Instruction::with(Code::Stc), Fx { defs: CF, ..NOFX })?,
                    3 => {
                        let op = e.pick(&["Add", "Sub"]);
                        let (a, b) = reg_pair(e, s, true, false);
                        let i = mk(&format!("{op}_rm{s}_r{s}"), &[Op::R(a), Op::R(b)])?;
                        self.emit(e, i, FX_ARITH)?;
                    }
                    _ => {}
                }
                let n = 2 + e.below(3);
                for _ in 0..n {
                    let op = e.pick(&["Adc", "Sbb"]);
                    let i = if e.chance(3) {
                        let r = gpr(s, widx(e));
                        let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                        mk(&format!("{op}_r{s}_rm{s}"), &[Op::R(r), Op::M(m)])?
                    } else {
                        let (a, b) = reg_pair(e, s, true, false);
                        mk(&format!("{op}_rm{s}_r{s}"), &[Op::R(a), Op::R(b)])?
                    };
                    self.emit(e, i, alu_fx(op))?;
                }
                Ok(())
            }
            Template::Test => self.t_test(e),
            Template::IncDec | Template::NegNot => {
                let op = if t == Template::IncDec {
                    e.pick(&["Inc", "Dec"])
                } else {
                    e.pick(&["Neg", "Not"])
                };
                let fx = match op {
                    // INC/DEC: CF unaffected, the rest defined.
                    "Inc" | "Dec" => Fx {
                        reads: 0,
                        defs: ARITH & !CF,
                        undef: 0,
                    },
                    "Neg" => FX_ARITH,
                    _ => NOFX,
                };
                let s = size_any(e);
                let i = if e.chance(3) {
                    let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                    let mut i = mk(&format!("{op}_rm{s}"), &[Op::M(m)])?;
                    if e.chance(2) {
                        i.set_has_lock_prefix(true);
                    }
                    i
                } else {
                    let r = if s == 8 {
                        reg8(e, true, false)
                    } else {
                        gpr(s, widx(e))
                    };
                    mk(&format!("{op}_rm{s}"), &[Op::R(r)])?
                };
                self.emit(e, i, fx)
            }
            Template::Shift => self.t_shift(e),
            Template::ShldShrd => self.t_shld(e),
            Template::Mul1 => {
                let op = e.pick(&["Mul", "Imul"]);
                let s = size_any(e);
                let i = if e.chance(3) {
                    let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                    mk(&format!("{op}_rm{s}"), &[Op::M(m)])?
                } else {
                    let r = if s == 8 {
                        reg8(e, false, false)
                    } else {
                        gpr(s, ridx(e))
                    };
                    mk(&format!("{op}_rm{s}"), &[Op::R(r)])?
                };
                self.emit(e, i, FX_MUL)
            }
            Template::Imul2 | Template::Imul3 => {
                let s = size_no8(e);
                let d = gpr(s, widx(e));
                let src = if e.chance(3) {
                    Op::M(self.mem_any(e, s as u64 / 8, 0, false)?.0)
                } else {
                    Op::R(gpr(s, ridx(e)))
                };
                let i = if t == Template::Imul2 {
                    mk(&format!("Imul_r{s}_rm{s}"), &[Op::R(d), src])?
                } else if e.chance(2) {
                    let v = e.svalue(8) as i32;
                    mk(&format!("Imul_r{s}_rm{s}_imm8"), &[Op::R(d), src, Op::I(v)])?
                } else {
                    let (suffix, v) = imm_for(e, s);
                    mk(
                        &format!("Imul_r{s}_rm{s}_{suffix}"),
                        &[Op::R(d), src, Op::I(v)],
                    )?
                };
                self.emit(e, i, FX_MUL)
            }
            Template::Div => self.t_div(e),
            Template::Bt => self.t_bt(e),
            Template::BsfBsr | Template::CountBits => self.t_bitscan(e, t),
            Template::Cmov => {
                let (cc, fl) = e.pick(&CONDS);
                let s = size_no8(e);
                let d = gpr(s, widx(e));
                let src = if e.chance(3) {
                    Op::M(self.mem_any(e, s as u64 / 8, 0, false)?.0)
                } else {
                    Op::R(gpr(s, ridx(e)))
                };
                let i = mk(&format!("Cmov{cc}_r{s}_rm{s}"), &[Op::R(d), src])?;
                self.emit(e, i, reads(fl))
            }
            Template::Setcc => self.t_setcc(e),
            Template::SetccAfterCmp => {
                let s = size_any(e);
                let (a, b) = reg_pair(e, s, false, false);
                let i = if e.chance(3) {
                    self.alu_imm(e, "Cmp", s, Op::R(a))?
                } else {
                    mk(&format!("Cmp_rm{s}_r{s}"), &[Op::R(a), Op::R(b)])?
                };
                self.emit(e, i, FX_ARITH)?;
                self.t_setcc(e)
            }
            Template::Cmpxchg => self.t_cmpxchg(e),
            Template::Xadd => {
                let s = size_any(e);
                let i = if e.chance(2) {
                    let r = if s == 8 {
                        reg8(e, true, false)
                    } else {
                        gpr(s, widx(e))
                    };
                    let (m, _) = self.mem_any(e, s as u64 / 8, 0, is_high8(r))?;
                    let mut i = mk(&format!("Xadd_rm{s}_r{s}"), &[Op::M(m), Op::R(r)])?;
                    if e.chance(2) {
                        i.set_has_lock_prefix(true);
                    }
                    i
                } else {
                    let (a, b) = reg_pair(e, s, true, true);
                    mk(&format!("Xadd_rm{s}_r{s}"), &[Op::R(a), Op::R(b)])?
                };
                self.emit(e, i, FX_ARITH)
            }
            Template::Xchg => {
                let s = size_any(e);
                let i = match e.below(3) {
                    0 => {
                        let (a, b) = reg_pair(e, s, true, true);
                        mk(&format!("Xchg_rm{s}_r{s}"), &[Op::R(a), Op::R(b)])?
                    }
                    1 if s != 8 => {
                        // 90+r short form (XCHG EAX,EAX = 90 is NOP and does not zero-extend).
                        let r = gpr(s, widx(e));
                        let acc = gpr(s, I_RAX);
                        let name = match s {
                            16 => "Xchg_r16_AX",
                            32 => "Xchg_r32_EAX",
                            _ => "Xchg_r64_RAX",
                        };
                        mk(name, &[Op::R(r), Op::R(acc)])?
                    }
                    _ => {
                        let r = if s == 8 {
                            reg8(e, true, false)
                        } else {
                            gpr(s, widx(e))
                        };
                        let (m, _) = self.mem_any(e, s as u64 / 8, 0, is_high8(r))?;
                        mk(&format!("Xchg_rm{s}_r{s}"), &[Op::M(m), Op::R(r)])?
                    }
                };
                self.emit(e, i, NOFX)
            }
            Template::Cmpxchg8b16b => self.t_cmpxchg8b(e),
            Template::StringOp => self.t_string(e),
            Template::PushPop => self.t_pushpop(e),
            Template::PushfPopf => self.t_pushf(e),
            Template::Lea => self.t_lea(e),
            Template::MovzxMovsx => self.t_movx(e),
            Template::SignExtendAcc => {
                let c = e.pick(&[
                    Code::Cbw,
                    Code::Cwde,
                    Code::Cdqe,
                    Code::Cwd,
                    Code::Cdq,
                    Code::Cqo,
                ]);
                self.emit(e, Instruction::with(c), NOFX)
            }
            Template::Bswap => {
                let s = e.pick(&[64u32, 32]);
                let r = gpr(s, widx(e));
                let i = mk(&format!("Bswap_r{s}"), &[Op::R(r)])?;
                self.emit(e, i, NOFX)
            }
            Template::Movbe => {
                let s = size_no8(e);
                let store = e.chance(2);
                let r = gpr(s, if store { ridx(e) } else { widx(e) });
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                let i = if store {
                    mk(&format!("Movbe_m{s}_r{s}"), &[Op::M(m), Op::R(r)])?
                } else {
                    mk(&format!("Movbe_r{s}_m{s}"), &[Op::R(r), Op::M(m)])?
                };
                self.emit(e, i, NOFX)
            }
            Template::LahfSahf => match e.below(3) {
                // LAHF copies SF ZF AF PF CF into AH.
                0 => self.emit(
                    e,
                    Instruction::with(Code::Lahf),
                    reads(SF | ZF | AF | PF | CF),
                ),
                // SAHF loads SF ZF AF PF CF from AH (OF unaffected).
                n => {
                    if n == 2 {
                        let v = e.value(8);
                        self.set_sized(AH, 8, v)?;
                    }
                    let fx = Fx {
                        reads: 0,
                        defs: SF | ZF | AF | PF | CF,
                        undef: 0,
                    };
                    self.emit(e, Instruction::with(Code::Sahf), fx)
                }
            },
            Template::FlagOps => {
                let (c, fx) = e.pick(&[
                    (Code::Clc, Fx { defs: CF, ..NOFX }),
                    (Code::Stc, Fx { defs: CF, ..NOFX }),
                    (
                        Code::Cmc,
                        Fx {
                            reads: CF,
                            defs: CF,
                            undef: 0,
                        },
                    ),
                    (Code::Cld, NOFX),
                    (Code::Std, NOFX),
                ]);
                self.emit(e, Instruction::with(c), fx)
            }
            Template::Branch => self.t_branch(e),
            Template::FlagChain => {
                let ok = |t: &Template| !self.exclude.contains(t);
                let producers: Vec<Template> = [
                    Template::AluRR,
                    Template::AluRI,
                    Template::Shift,
                    Template::NegNot,
                    Template::IncDec,
                    Template::Imul2,
                    Template::ShldShrd,
                ]
                .into_iter()
                .filter(ok)
                .collect();
                let mut partial = vec![
                    Template::IncDec,
                    Template::Shift,
                    Template::Bt,
                    Template::FlagOps,
                    Template::Cmpxchg8b16b,
                ];
                let mut consumer = vec![
                    Template::Setcc,
                    Template::Cmov,
                    Template::AdcSbbChain,
                    Template::PushfPopf,
                    Template::Branch,
                ];
                if self.features.lahf_lm {
                    partial.push(Template::LahfSahf);
                    consumer.push(Template::LahfSahf);
                }
                partial.retain(ok);
                consumer.retain(ok);
                if producers.is_empty() || partial.is_empty() || consumer.is_empty() {
                    return Err(GenError::Unsupported(Template::FlagChain));
                }
                let producer = e.pick(&producers);
                self.template(producer, e)?;
                for _ in 0..1 + e.below(2) {
                    let t = e.pick(&partial);
                    self.template(t, e)?;
                }
                let t = e.pick(&consumer);
                self.template(t, e)
            }
            Template::Xlat => {
                // XLAT reads [RBX + AL]: point RBX at a 256-byte table in the data area.
                let base = SCRATCH_ADDR + e.below(DATA_SIZE as u64 - 256);
                self.set64(e, I_RBX, base)?;
                let xm = MemoryOperand::new(RBX, AL, 1, 0, 0, false, Register::None);
                let i = mk("Xlat_m8", &[Op::M(xm)])?;
                self.emit(e, i, NOFX)
            }
        }
    }

    /// `op` with an immediate operand on `dst` (register or memory), choosing among imm8
    /// sign-extended, full immediate and accumulator short forms.
    fn alu_imm(
        &mut self,
        e: &mut Entropy,
        op: &str,
        s: u32,
        dst: Op,
    ) -> Result<Instruction, GenError> {
        let acc = matches!(dst, Op::R(r) if r == gpr(s, I_RAX));
        match e.below(3) {
            1 if s != 8 => {
                let v = e.svalue(8) as i32;
                mk(&format!("{op}_rm{s}_imm8"), &[dst, Op::I(v)])
            }
            2 if acc => {
                let (suffix, v) = imm_for(e, s);
                let a = match s {
                    8 => "AL",
                    16 => "AX",
                    32 => "EAX",
                    _ => "RAX",
                };
                mk(&format!("{op}_{a}_{suffix}"), &[dst, Op::I(v)])
            }
            _ => {
                let (suffix, v) = imm_for(e, s);
                mk(&format!("{op}_rm{s}_{suffix}"), &[dst, Op::I(v)])
            }
        }
    }

    fn t_mov(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let s = size_any(e);
        let i = match e.below(6) {
            0 => {
                let (a, b) = reg_pair(e, s, true, false);
                let form = if e.chance(2) {
                    "r{s}_rm{s}"
                } else {
                    "rm{s}_r{s}"
                };
                mk(
                    &format!("Mov_{}", form.replace("{s}", &s.to_string())),
                    &[Op::R(a), Op::R(b)],
                )?
            }
            1 => {
                let r = if s == 8 {
                    reg8(e, true, false)
                } else {
                    gpr(s, widx(e))
                };
                match (s, e.below(2)) {
                    (64, 0) => {
                        let v = e.value(64);
                        Instruction::with2(code("Mov_r64_imm64")?, r, v).map_err(|source| {
                            GenError::Encode {
                                what: "mov r64, imm64".into(),
                                source,
                            }
                        })?
                    }
                    (64, _) => mk("Mov_rm64_imm32", &[Op::R(r), Op::I(e.svalue(32) as i32)])?,
                    (_, k) => {
                        let (suffix, v) = imm_for(e, s);
                        let form = if k == 0 { "r" } else { "rm" };
                        mk(&format!("Mov_{form}{s}_{suffix}"), &[Op::R(r), Op::I(v)])?
                    }
                }
            }
            2 | 3 => {
                let load = e.below(4) == 2;
                let r = if s == 8 {
                    reg8(e, load, false)
                } else {
                    gpr(s, if load { widx(e) } else { ridx(e) })
                };
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, is_high8(r))?;
                if load {
                    mk(&format!("Mov_r{s}_rm{s}"), &[Op::R(r), Op::M(m)])?
                } else {
                    mk(&format!("Mov_rm{s}_r{s}"), &[Op::M(m), Op::R(r)])?
                }
            }
            4 => {
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                let (suffix, v) = imm_for(e, s);
                mk(&format!("Mov_rm{s}_{suffix}"), &[Op::M(m), Op::I(v)])?
            }
            _ => {
                // moffs forms: A0-A3 with a 64-bit absolute address.
                let off = e.below(DATA_SIZE as u64 - 8);
                let m = MemoryOperand::new(
                    Register::None,
                    Register::None,
                    1,
                    (SCRATCH_ADDR + off) as i64,
                    8,
                    false,
                    Register::None,
                );
                let acc = gpr(s, I_RAX);
                let n = match s {
                    8 => ("AL", "moffs8"),
                    16 => ("AX", "moffs16"),
                    32 => ("EAX", "moffs32"),
                    _ => ("RAX", "moffs64"),
                };
                if e.chance(2) {
                    mk(&format!("Mov_{}_{}", n.1, n.0), &[Op::M(m), Op::R(acc)])?
                } else {
                    mk(&format!("Mov_{}_{}", n.0, n.1), &[Op::R(acc), Op::M(m)])?
                }
            }
        };
        self.emit(e, i, NOFX)
    }

    fn t_test(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let s = size_any(e);
        let i = match e.below(4) {
            0 => {
                let (a, b) = reg_pair(e, s, false, false);
                mk(&format!("Test_rm{s}_r{s}"), &[Op::R(a), Op::R(b)])?
            }
            1 => {
                let r = if s == 8 {
                    reg8(e, false, false)
                } else {
                    gpr(s, ridx(e))
                };
                let (suffix, v) = imm_for(e, s);
                if r == gpr(s, I_RAX) && e.chance(2) {
                    let a = match s {
                        8 => "AL",
                        16 => "AX",
                        32 => "EAX",
                        _ => "RAX",
                    };
                    mk(&format!("Test_{a}_{suffix}"), &[Op::R(r), Op::I(v)])?
                } else {
                    mk(&format!("Test_rm{s}_{suffix}"), &[Op::R(r), Op::I(v)])?
                }
            }
            2 => {
                let r = if s == 8 {
                    reg8(e, false, false)
                } else {
                    gpr(s, ridx(e))
                };
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, is_high8(r))?;
                mk(&format!("Test_rm{s}_r{s}"), &[Op::M(m), Op::R(r)])?
            }
            _ => {
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                let (suffix, v) = imm_for(e, s);
                mk(&format!("Test_rm{s}_{suffix}"), &[Op::M(m), Op::I(v)])?
            }
        };
        self.emit(e, i, FX_LOGIC)
    }

    /// A shift/rotate count biased towards the interesting values for operand size `s`.
    fn count(e: &mut Entropy, s: u32) -> u8 {
        match e.below(8) {
            0 => e.next() as u8,
            1 => 0,
            2 => 1,
            3 => (s - 1) as u8,
            4 => s as u8,
            5 => (s + 1) as u8,
            6 => e.pick(&[9u8, 17, 31, 32, 33, 63, 64, 65, 0x80, 0xFF]),
            _ => e.below(s as u64) as u8,
        }
    }

    fn t_shift(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let kind = e.pick(&["Rol", "Ror", "Rcl", "Rcr", "Shl", "Shr", "Sal", "Sar"]);
        let s = size_any(e);
        let form = e.below(3); // 0: CL, 1: imm8, 2: by 1
        let use_mem = e.chance(3);
        let c = match form {
            2 => 1,
            _ => Self::count(e, s),
        };
        // Memory operand first (its base must not be RCX when the count goes to CL).
        let dst = if use_mem {
            let avoid = if form == 0 { 1 << I_RCX } else { 0 };
            Op::M(self.mem_any(e, s as u64 / 8, avoid, false)?.0)
        } else {
            Op::R(if s == 8 {
                let legacy = form == 0 && e.chance(2);
                reg8(e, true, legacy)
            } else {
                gpr(s, widx(e))
            })
        };
        let i = match form {
            0 => {
                self.set_sized(CL, 8, c as u64)?;
                mk(&format!("{kind}_rm{s}_CL"), &[dst, Op::R(CL)])?
            }
            1 => mk(&format!("{kind}_rm{s}_imm8"), &[dst, Op::I(c as i32)])?,
            _ => mk(&format!("{kind}_rm{s}_1"), &[dst, Op::I(1)])?,
        };
        let mc = (c as u32) & if s == 64 { 63 } else { 31 };
        let fx = if mc == 0 {
            // Masked count 0: no flags affected (and RCL/RCR do not read CF).
            NOFX
        } else {
            // OF is defined only for a masked count of 1 (SDM/APM: "OF undefined for
            // multi-bit shifts/rotates").
            let of = if mc == 1 { (OF, 0) } else { (0, OF) };
            match kind {
                // ROL/ROR: CF (and OF for count 1) only; SF ZF AF PF unaffected.
                "Rol" | "Ror" => Fx {
                    reads: 0,
                    defs: CF | of.0,
                    undef: of.1,
                },
                // RCL/RCR: read CF; CF (and OF for 1) written; others unaffected.
                "Rcl" | "Rcr" => Fx {
                    reads: CF,
                    defs: CF | of.0,
                    undef: of.1,
                },
                _ => {
                    // SHL/SHR/SAL/SAR: SF ZF PF by result, AF undefined; CF is the last bit
                    // shifted out, but undefined for SHL/SHR/SAL when the count is >= the
                    // operand size (only possible for 8/16-bit operands).
                    let cf_undef = kind != "Sar" && mc >= s;
                    let cf = if cf_undef { (0, CF) } else { (CF, 0) };
                    Fx {
                        reads: 0,
                        defs: SF | ZF | PF | cf.0 | of.0,
                        undef: AF | cf.1 | of.1,
                    }
                }
            }
        };
        self.emit(e, i, fx)
    }

    fn t_shld(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let kind = e.pick(&["Shld", "Shrd"]);
        let s = size_no8(e);
        let by_cl = e.chance(2);
        let mut c = Self::count(e, s);
        if s == 16 && (c & 31) > 16 {
            // A 16-bit SHLD/SHRD with a masked count above 16 has an undefined result.
            c &= 15;
        }
        let src = gpr(s, ridx(e));
        let dst = if e.chance(3) {
            let avoid = if by_cl { 1 << I_RCX } else { 0 };
            Op::M(self.mem_any(e, s as u64 / 8, avoid, false)?.0)
        } else {
            Op::R(gpr(s, widx(e)))
        };
        let i = if by_cl {
            self.set_sized(CL, 8, c as u64)?;
            mk(
                &format!("{kind}_rm{s}_r{s}_CL"),
                &[dst, Op::R(src), Op::R(CL)],
            )?
        } else {
            mk(
                &format!("{kind}_rm{s}_r{s}_imm8"),
                &[dst, Op::R(src), Op::I(c as i32)],
            )?
        };
        let mc = (c as u32) & if s == 64 { 63 } else { 31 };
        let fx = if mc == 0 {
            NOFX
        } else if mc == 1 {
            // CF SF ZF PF OF defined for count 1; AF undefined.
            Fx {
                reads: 0,
                defs: ARITH & !AF,
                undef: AF,
            }
        } else {
            // Count > 1: OF undefined too.
            Fx {
                reads: 0,
                defs: CF | SF | ZF | PF,
                undef: AF | OF,
            }
        };
        self.emit(e, i, fx)
    }

    fn t_div(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let op = e.pick(&["Div", "Idiv"]);
        let n = size_any(e);
        let m = mask(n) as u128;
        // Divisor d and dividend D (2n bits) such that the quotient fits in n bits.
        let (d, dividend): (u64, u128) = if op == "Div" {
            let mut d = e.value(n);
            if d == 0 {
                d = 1 + e.below(mask(n).min(255));
            }
            let hi = e.next() % d;
            let lo = e.value(n);
            (d, ((hi as u128) << n) | lo as u128)
        } else {
            let mut d = e.svalue(n) as i128;
            if d == 0 {
                d = if e.chance(2) { -1 } else { 1 };
            }
            let q = e.svalue(n) as i128;
            let ad = d.unsigned_abs();
            let mut r = if e.chance(3) {
                0
            } else {
                (e.next() as u128 % ad) as i128
            };
            if r != 0 && (q < 0) != (d < 0) {
                // The remainder has the sign of the dividend.
                r = -r;
            }
            let mut big = q * d + r;
            // For n = 64 every candidate fits in 128 bits.
            let fits = n == 64 || {
                let lim = 1i128 << (2 * n - 1);
                big >= -lim && big < lim
            };
            if !fits || big / d != q || big % d != r {
                big = q * d;
            }
            ((d as u64) & mask(n), (big as u128) & ((m << n) | m))
        };
        let hi = ((dividend >> n) & m) as u64;
        let lo = (dividend & m) as u64;
        let avoid = (1 << I_RAX) | (1 << I_RDX);
        let src = if e.chance(3) {
            let (mo, used) = self.mem_any(e, n as u64 / 8, avoid, false)?;
            let t = widx_avoiding(e, avoid | used);
            self.set64(e, t, d)?;
            let st = mk(&format!("Mov_rm{n}_r{n}"), &[Op::M(mo), Op::R(gpr(n, t))])?;
            self.push(st);
            Op::M(mo)
        } else {
            let r = if n == 8 {
                // Any byte register except AL/AH (the dividend is AX).
                let mut r = reg8(e, true, false);
                if matches!(r, AL | AH) {
                    r = e.pick(&[CL, DL, BL, CH, DH, BH]);
                }
                r
            } else {
                gpr(n, widx_avoiding(e, avoid))
            };
            self.set_sized(r, n, d)?;
            Op::R(r)
        };
        if n == 8 {
            self.set_sized(AX, 16, dividend as u64)?;
        } else {
            self.set_sized(gpr(n, I_RDX), n, hi)?;
            self.set_sized(gpr(n, I_RAX), n, lo)?;
        }
        let i = mk(&format!("{op}_rm{n}"), &[src])?;
        self.emit(e, i, FX_DIV)
    }

    fn t_bt(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let op = e.pick(&["Bt", "Bts", "Btr", "Btc"]);
        let s = size_no8(e);
        let i = match e.below(4) {
            0 => {
                let d = gpr(s, if op == "Bt" { ridx(e) } else { widx(e) });
                mk(
                    &format!("{op}_rm{s}_r{s}"),
                    &[Op::R(d), Op::R(gpr(s, ridx(e)))],
                )?
            }
            1 => {
                let d = gpr(s, if op == "Bt" { ridx(e) } else { widx(e) });
                mk(
                    &format!("{op}_rm{s}_imm8"),
                    &[Op::R(d), Op::I(e.below(256) as i32)],
                )?
            }
            2 => {
                let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
                let mut i = mk(
                    &format!("{op}_rm{s}_imm8"),
                    &[Op::M(m), Op::I(e.below(256) as i32)],
                )?;
                if op != "Bt" && e.chance(2) {
                    i.set_has_lock_prefix(true);
                }
                i
            }
            _ => {
                // Register bit offset: the access is at EA + (offset >> log2(s)) * s/8 (signed),
                // so keep ±1 KiB of room around the operand.
                let k = 0x400u64;
                let region = Region {
                    lo: k + 8,
                    hi: DATA_SIZE as u64 - k - 8,
                };
                let (m, used) = self.mem(e, s as u64 / 8, 1, 0, false, region)?;
                let o = e.range(-(8 * k as i64), 8 * k as i64 - 1);
                let x = widx_avoiding(e, used);
                // Bits above the operand size are ignored: randomise them.
                let v = if s == 64 {
                    o as u64
                } else {
                    (e.next() & !mask(s)) | (o as u64 & mask(s))
                };
                self.set64(e, x, v)?;
                let mut i = mk(&format!("{op}_rm{s}_r{s}"), &[Op::M(m), Op::R(gpr(s, x))])?;
                if op != "Bt" && e.chance(2) {
                    i.set_has_lock_prefix(true);
                }
                i
            }
        };
        // BT*: CF = the bit; OF SF AF PF undefined; ZF "unaffected" in current SDMs but
        // "undefined" in older SDMs and the APM: treated as undefined.
        let fx = Fx {
            reads: 0,
            defs: CF,
            undef: OF | SF | ZF | AF | PF,
        };
        self.emit(e, i, fx)
    }

    fn t_bitscan(&mut self, e: &mut Entropy, t: Template) -> Result<(), GenError> {
        let op = if t == Template::BsfBsr {
            e.pick(&["Bsf", "Bsr"])
        } else {
            let f = self.features;
            let ops: Vec<&str> = [("Tzcnt", f.bmi1), ("Lzcnt", f.lzcnt), ("Popcnt", f.popcnt)]
                .iter()
                .filter(|x| x.1)
                .map(|x| x.0)
                .collect();
            e.pick(&ops)
        };
        let s = size_no8(e);
        let zero = e.chance(3);
        let d = gpr(s, widx(e));
        let src = if e.chance(3) {
            let (m, _) = self.mem_any(e, s as u64 / 8, 0, false)?;
            if zero {
                let (suffix, _) = imm_for(e, s);
                let z = mk(&format!("Mov_rm{s}_{suffix}"), &[Op::M(m), Op::I(0)])?;
                self.push(z);
            }
            Op::M(m)
        } else {
            let r = gpr(s, ridx(e));
            if zero && r != gpr(s, I_RSP) {
                self.set_sized(r, s, 0)?;
            }
            Op::R(r)
        };
        let i = mk(&format!("{op}_r{s}_rm{s}"), &[Op::R(d), src])?;
        let fx = match op {
            // BSF/BSR: ZF = (source == 0); CF OF SF AF PF undefined. With a zero source the
            // destination is left unchanged (APM; Intel in practice) and *is* compared.
            "Bsf" | "Bsr" => Fx {
                reads: 0,
                defs: ZF,
                undef: CF | OF | SF | AF | PF,
            },
            // TZCNT/LZCNT: CF = (source == 0), ZF = (result == 0); OF SF AF PF undefined.
            "Tzcnt" | "Lzcnt" => Fx {
                reads: 0,
                defs: CF | ZF,
                undef: OF | SF | AF | PF,
            },
            // POPCNT: ZF = (source == 0), OF SF AF CF PF cleared.
            _ => FX_ARITH,
        };
        self.emit(e, i, fx)
    }

    fn t_setcc(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let (cc, fl) = e.pick(&CONDS);
        let dst = if e.chance(3) {
            Op::M(self.mem_any(e, 1, 0, false)?.0)
        } else {
            Op::R(reg8(e, true, false))
        };
        let i = mk(&format!("Set{cc}_rm8"), &[dst])?;
        self.emit(e, i, reads(fl))
    }

    fn t_cmpxchg(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let s = size_any(e);
        let equal = e.chance(2);
        let acc = if s == 8 { AL } else { gpr(s, I_RAX) };
        let src = if s == 8 {
            reg8(e, false, false)
        } else {
            gpr(s, ridx(e))
        };
        let i = if e.chance(2) {
            // The accumulator is loaded from the operand for the "equal" case, so the address
            // registers must not be RAX.
            let (m, _) = self.mem_any(e, s as u64 / 8, 1 << I_RAX, is_high8(src))?;
            if equal {
                let l = mk(&format!("Mov_r{s}_rm{s}"), &[Op::R(acc), Op::M(m)])?;
                self.push(l);
            }
            let mut i = mk(&format!("Cmpxchg_rm{s}_r{s}"), &[Op::M(m), Op::R(src)])?;
            if e.chance(2) {
                i.set_has_lock_prefix(true);
            }
            i
        } else {
            let d = if s == 8 {
                let d = reg8(e, true, false);
                fix_pair(e, src, d)
            } else {
                gpr(s, widx(e))
            };
            if equal && d != acc {
                let l = mk(&format!("Mov_r{s}_rm{s}"), &[Op::R(acc), Op::R(d)])?;
                self.push(l);
            }
            mk(&format!("Cmpxchg_rm{s}_r{s}"), &[Op::R(d), Op::R(src)])?
        };
        self.emit(e, i, FX_ARITH)
    }

    fn t_cmpxchg8b(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let wide = self.features.cx16 && e.chance(2);
        let (span, align) = if wide { (16, 16) } else { (8, 1) };
        let avoid = (1 << I_RAX) | (1 << I_RDX);
        let (m, _) = self.mem(e, span, align, avoid, false, DATA)?;
        if e.chance(2) {
            // Make RDX:RAX (EDX:EAX) equal to the memory operand.
            let (r, h, n) = if wide { (RAX, RDX, 64) } else { (EAX, EDX, 32) };
            let l = mk(&format!("Mov_r{n}_rm{n}"), &[Op::R(r), Op::M(m)])?;
            self.push(l);
            let l = mk(
                &format!("Mov_r{n}_rm{n}"),
                &[Op::R(h), Op::M(mem_plus(m, span as i64 / 2))],
            )?;
            self.push(l);
        }
        let mut i = if wide {
            mk("Cmpxchg16b_m128", &[Op::M(m)])?
        } else {
            mk("Cmpxchg8b_m64", &[Op::M(m)])?
        };
        if e.chance(2) {
            i.set_has_lock_prefix(true);
        }
        // CMPXCHG8B/16B: ZF = equal; other flags unaffected.
        self.emit(
            e,
            i,
            Fx {
                reads: 0,
                defs: ZF,
                undef: 0,
            },
        )
    }

    fn t_string(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let op = e.pick(&["movs", "stos", "lods", "cmps", "scas"]);
        let (w, wname) = e.pick(&[(1u64, "b"), (2, "w"), (4, "d"), (8, "q")]);
        let rep = match (op, e.below(4)) {
            (_, 0) => RepPrefixKind::None,
            ("cmps" | "scas", 1) => RepPrefixKind::Repne,
            ("cmps" | "scas", _) => RepPrefixKind::Repe,
            _ => RepPrefixKind::Repe, // plain REP (F3)
        };
        let n = match e.below(4) {
            0 => e.below(65),
            1 => 0,
            2 => 1,
            _ => e.below(9),
        };
        match e.below(3) {
            1 => self.emit(e, Instruction::with(Code::Cld), NOFX)?,
            2 => self.emit(e, Instruction::with(Code::Std), NOFX)?,
            _ => {} // keep DF from the input / earlier instructions
        }
        let addr32 = e.chance(4);
        // Room for n elements in either direction.
        let margin = n * w + 16;
        let pick_addr =
            |e: &mut Entropy| SCRATCH_ADDR + margin + e.below(DATA_SIZE as u64 - 2 * margin);
        let (si, di) = (pick_addr(e), pick_addr(e));
        // With a 32-bit address size the registers are ECX/ESI/EDI; upper bits in them with a
        // REP prefix and ECX = 0 meet a vendor difference (see
        // `HostFeatures::modelled_family`): Intel zero-extends all three, AMD leaves them.
        let vendor_specific = rep != RepPrefixKind::None && n == 0;
        let high_ok = self.features.modelled_family || !vendor_specific;
        let hi = |e: &mut Entropy| {
            if addr32 && e.chance(2) {
                e.next() << 32
            } else {
                0
            }
        };
        let (h1, h2, h3) = (hi(e), hi(e), hi(e));
        let (h1, h2, h3) = if high_ok { (h1, h2, h3) } else { (0, 0, 0) };
        if matches!(op, "movs" | "lods" | "cmps") {
            self.set64(e, I_RSI, h1 | si)?;
        }
        if matches!(op, "movs" | "stos" | "cmps" | "scas") {
            self.set64(e, I_RDI, h2 | di)?;
        }
        if rep != RepPrefixKind::None || e.chance(2) {
            self.set64(e, I_RCX, h3 | n)?;
        }
        let asz = if addr32 { 32 } else { 64 };
        let seg = Register::None;
        let enc = |r: Result<Instruction, iced_x86::IcedError>| {
            r.map_err(|source| GenError::Encode {
                what: format!("{op}{wname}"),
                source,
            })
        };
        let i = match (op, wname) {
            ("movs", "b") => enc(Instruction::with_movsb(asz, seg, rep))?,
            ("movs", "w") => enc(Instruction::with_movsw(asz, seg, rep))?,
            ("movs", "d") => enc(Instruction::with_movsd(asz, seg, rep))?,
            ("movs", _) => enc(Instruction::with_movsq(asz, seg, rep))?,
            ("stos", "b") => enc(Instruction::with_stosb(asz, rep))?,
            ("stos", "w") => enc(Instruction::with_stosw(asz, rep))?,
            ("stos", "d") => enc(Instruction::with_stosd(asz, rep))?,
            ("stos", _) => enc(Instruction::with_stosq(asz, rep))?,
            ("lods", "b") => enc(Instruction::with_lodsb(asz, seg, rep))?,
            ("lods", "w") => enc(Instruction::with_lodsw(asz, seg, rep))?,
            ("lods", "d") => enc(Instruction::with_lodsd(asz, seg, rep))?,
            ("lods", _) => enc(Instruction::with_lodsq(asz, seg, rep))?,
            ("cmps", "b") => enc(Instruction::with_cmpsb(asz, seg, rep))?,
            ("cmps", "w") => enc(Instruction::with_cmpsw(asz, seg, rep))?,
            ("cmps", "d") => enc(Instruction::with_cmpsd(asz, seg, rep))?,
            ("cmps", _) => enc(Instruction::with_cmpsq(asz, seg, rep))?,
            ("scas", "b") => enc(Instruction::with_scasb(asz, rep))?,
            ("scas", "w") => enc(Instruction::with_scasw(asz, rep))?,
            ("scas", "d") => enc(Instruction::with_scasd(asz, rep))?,
            (_, _) => enc(Instruction::with_scasq(asz, rep))?,
        };
        // CMPS/SCAS set all six flags like CMP -- unless a REP prefix with RCX = 0 makes them
        // execute zero times (flags unaffected).
        let compares = matches!(op, "cmps" | "scas");
        let fx = if compares && !(rep != RepPrefixKind::None && n == 0) {
            FX_ARITH
        } else {
            NOFX
        };
        self.emit(e, i, fx)
    }

    fn t_pushpop(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let k = 1 + e.below(3);
        for _ in 0..k {
            let i = match e.below(10) {
                0 => mk("Push_r64", &[Op::R(R64[ridx(e)])])?,
                1 => mk("Pop_r64", &[Op::R(R64[widx(e)])])?,
                2 => {
                    if e.chance(2) {
                        mk("Pushq_imm8", &[Op::I(e.svalue(8) as i32)])?
                    } else {
                        mk("Pushq_imm32", &[Op::I(e.svalue(32) as i32)])?
                    }
                }
                3 => mk("Push_r16", &[Op::R(R16[ridx(e)])])?,
                4 => mk("Pop_r16", &[Op::R(R16[widx(e)])])?,
                5 => {
                    let (m, _) = self.mem_any(e, 8, 0, false)?;
                    mk("Push_rm64", &[Op::M(m)])?
                }
                6 => {
                    let (m, _) = self.mem_any(e, 8, 0, false)?;
                    mk("Pop_rm64", &[Op::M(m)])?
                }
                7 => {
                    let (m, _) = self.mem_any(e, 2, 0, false)?;
                    mk("Push_rm16", &[Op::M(m)])?
                }
                8 => {
                    let (m, _) = self.mem_any(e, 2, 0, false)?;
                    mk("Pop_rm16", &[Op::M(m)])?
                }
                _ => {
                    if e.chance(2) {
                        mk("Pushw_imm8", &[Op::I(e.svalue(8) as i32)])?
                    } else {
                        mk("Push_imm16", &[Op::I(e.svalue(16) as i32)])?
                    }
                }
            };
            self.emit(e, i, NOFX)?;
        }
        Ok(())
    }

    fn t_pushf(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        // Reserved RFLAGS bits (1 reads as one, 3/5/15 as zero): POPF must ignore them.
        const RESERVED: u64 = (1 << 1) | (1 << 3) | (1 << 5) | (1 << 15);
        let all = Fx {
            reads: 0,
            defs: ARITH,
            undef: 0,
        };
        match e.below(5) {
            0 => {
                self.emit(e, Instruction::with(Code::Pushfq), reads(ARITH))?;
                let i = mk("Pop_r64", &[Op::R(R64[widx(e)])])?;
                self.emit(e, i, NOFX)
            }
            1 => {
                let r = widx(e);
                let v = e.next() & (FLAGS_MASK | RESERVED);
                self.set64(e, r, v)?;
                self.emit(e, mk("Push_r64", &[Op::R(R64[r])])?, NOFX)?;
                self.emit(e, Instruction::with(Code::Popfq), all)
            }
            2 => {
                self.emit(e, Instruction::with(Code::Pushfw), reads(ARITH))?;
                let i = mk("Pop_r16", &[Op::R(R16[widx(e)])])?;
                self.emit(e, i, NOFX)
            }
            3 => {
                let r = widx(e);
                let v = e.next() & (FLAGS_MASK | RESERVED) & 0xFFFF;
                self.set_sized(R16[r], 16, v)?;
                self.emit(e, mk("Push_r16", &[Op::R(R16[r])])?, NOFX)?;
                self.emit(e, Instruction::with(Code::Popfw), all)
            }
            _ => {
                self.emit(e, Instruction::with(Code::Pushfq), reads(ARITH))?;
                self.emit(e, Instruction::with(Code::Popfq), all)
            }
        }
    }

    fn t_lea(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let s = size_no8(e);
        let d = gpr(s, widx(e));
        let addr32 = e.chance(3);
        let regs = if addr32 { &R32 } else { &R64 };
        let disp = match e.below(3) {
            0 => e.svalue(32),
            1 => e.svalue(8),
            _ => 0,
        };
        let index = |e: &mut Entropy| {
            let i = ridx(e);
            if i == I_RSP {
                Register::None
            } else {
                regs[i]
            }
        };
        let m = match e.below(5) {
            0 => {
                let b = regs[ridx(e)];
                let x = index(e);
                mem(b, x, e.pick(&[1, 2, 4, 8]), disp)
            }
            1 => mem(regs[ridx(e)], Register::None, 1, disp),
            2 => {
                let x = index(e);
                let sc = e.pick(&[1, 2, 4, 8]);
                if x == Register::None {
                    let ds = if addr32 { 4 } else { 8 };
                    MemoryOperand::new(
                        Register::None,
                        Register::None,
                        1,
                        disp,
                        ds,
                        false,
                        Register::None,
                    )
                } else {
                    mem(Register::None, x, sc, disp)
                }
            }
            3 if !addr32 => {
                // RIP-relative: the displacement is given as the absolute target.
                let target = CODE_ADDR.wrapping_add(e.range(-0x10000, 0x10000) as u64);
                MemoryOperand::new(
                    RIP,
                    Register::None,
                    1,
                    target as i64,
                    8,
                    false,
                    Register::None,
                )
            }
            _ => {
                let (v, ds) = if addr32 {
                    (disp as u32 as i64, 4)
                } else {
                    (disp, 8)
                };
                MemoryOperand::new(
                    Register::None,
                    Register::None,
                    1,
                    v,
                    ds,
                    false,
                    Register::None,
                )
            }
        };
        let i = mk(&format!("Lea_r{s}_m"), &[Op::R(d), Op::M(m)])?;
        self.emit(e, i, NOFX)
    }

    fn t_movx(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let (name, from, sizes): (&str, u32, &[u32]) = match e.below(5) {
            0 => ("Movzx", 8, &[16, 32, 64]),
            1 => ("Movsx", 8, &[16, 32, 64]),
            2 => ("Movzx", 16, &[16, 32, 64]),
            3 => ("Movsx", 16, &[16, 32, 64]),
            _ => ("Movsxd", 32, &[64]),
        };
        let mut s = e.pick(sizes);
        let mem_src = e.chance(3);
        let src = if mem_src {
            Op::M(self.mem_any(e, from as u64 / 8, 0, false)?.0)
        } else if from == 8 {
            Op::R(reg8(e, false, false))
        } else {
            Op::R(gpr(from, ridx(e)))
        };
        let mut di = widx(e);
        if let Op::R(r) = src {
            if is_high8(r) {
                // A high-byte source forbids REX: legacy destination, no REX.W.
                if s == 64 {
                    s = 32;
                }
                di = e.pick(&[0, 1, 2, 3, 5, 6, 7]);
            }
        }
        let i = mk(&format!("{name}_r{s}_rm{from}"), &[Op::R(gpr(s, di)), src])?;
        self.emit(e, i, NOFX)
    }

    /// A simple register-only instruction for branch bodies.
    fn simple(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let s = e.pick(&[64u32, 32]);
        let (a, b) = (gpr(s, widx(e)), gpr(s, ridx(e)));
        let (name, fx) = e.pick(&[
            ("Add_rm{s}_r{s}", FX_ARITH),
            ("Sub_rm{s}_r{s}", FX_ARITH),
            ("Xor_rm{s}_r{s}", FX_LOGIC),
            ("Mov_rm{s}_r{s}", NOFX),
        ]);
        let i = mk(&name.replace("{s}", &s.to_string()), &[Op::R(a), Op::R(b)])?;
        self.emit(e, i, fx)
    }

    fn t_branch(&mut self, e: &mut Entropy) -> Result<(), GenError> {
        let kind = e.below(6);
        let long = kind <= 2 && e.chance(4);
        let near = long || e.chance(2);
        let l = self.label();
        let (c, fx) = match kind {
            0..=2 => {
                if e.chance(2) {
                    let (a, b) = reg_pair(e, 64, false, false);
                    self.emit(e, mk("Cmp_rm64_r64", &[Op::R(a), Op::R(b)])?, FX_ARITH)?;
                }
                let (cc, fl) = e.pick(&CONDS);
                let sz = if near { "rel32" } else { "rel8" };
                (code(&format!("J{cc}_{sz}_64"))?, reads(fl))
            }
            3 => (
                if near {
                    Code::Jmp_rel32_64
                } else {
                    Code::Jmp_rel8_64
                },
                NOFX,
            ),
            _ => {
                // JRCXZ/JECXZ/LOOP/LOOPE/LOOPNE (rel8 only); RCX from the input or small.
                if e.chance(2) {
                    let v = e.below(3);
                    let hi = if e.chance(2) { e.next() << 32 } else { 0 };
                    self.set64(e, I_RCX, v | hi)?;
                }
                e.pick(&[
                    (Code::Jrcxz_rel8_64, NOFX),
                    (Code::Jecxz_rel8_64, NOFX),
                    (Code::Loop_rel8_64_RCX, NOFX),
                    (Code::Loop_rel8_64_ECX, NOFX),
                    (Code::Loope_rel8_64_RCX, reads(ZF)),
                    (Code::Loopne_rel8_64_RCX, reads(ZF)),
                    (Code::Loope_rel8_64_ECX, reads(ZF)),
                    (Code::Loopne_rel8_64_ECX, reads(ZF)),
                ])
            }
        };
        let br = Instruction::with_branch(c, l).map_err(|source| GenError::Encode {
            what: format!("{c:?}"),
            source,
        })?;
        self.emit(e, br, fx)?;
        let undef_taken = self.undef;
        if long {
            // More than 127 bytes: forces the rel32 form.
            for _ in 0..14 {
                let r = widx(e);
                let v = e.next();
                self.set64(e, r, v)?;
            }
        } else {
            let k = e.below(4);
            for _ in 0..k {
                self.simple(e)?;
            }
        }
        self.bind(l)?;
        // Either path may have been taken.
        self.undef |= undef_taken;
        Ok(())
    }
}

const ALU_OPS: [&str; 8] = ["Add", "Or", "Adc", "Sbb", "And", "Sub", "Xor", "Cmp"];

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: Template, seed: u64) -> OpSpec {
        let mut s = seed;
        OpSpec {
            template: t,
            entropy: std::array::from_fn(|_| splitmix(&mut s)),
        }
    }

    fn all_features() -> HostFeatures {
        HostFeatures {
            lzcnt: true,
            bmi1: true,
            popcnt: true,
            movbe: true,
            lahf_lm: true,
            cx16: true,
            modelled_family: true,
        }
    }

    #[test]
    fn every_template_assembles_for_many_seeds_and_zero_entropy() {
        let f = all_features();
        for t in Template::ALL {
            let zero = OpSpec {
                template: t,
                entropy: [0; ENTROPY_WORDS],
            };
            assemble(&[zero], &f).unwrap_or_else(|err| panic!("{t:?} zero: {err}"));
            for seed in 0..400 {
                let p = assemble(&[spec(t, seed)], &f)
                    .unwrap_or_else(|err| panic!("{t:?} seed {seed}: {err}"));
                assert!(!p.code.is_empty());
                // The code decodes cleanly (no invalid instruction).
                let mut d = Decoder::with_ip(64, &p.code, CODE_ADDR, DecoderOptions::NONE);
                while d.can_decode() {
                    let i = d.decode();
                    assert!(!i.is_invalid(), "{t:?} seed {seed}:\n{}", p.listing);
                }
            }
        }
    }

    #[test]
    fn unsupported_template_is_an_error() {
        let f = HostFeatures::baseline();
        let err = assemble(&[spec(Template::Movbe, 1)], &f).unwrap_err();
        assert!(matches!(err, GenError::Unsupported(Template::Movbe)));
        assert!(!Template::all_supported(&f).contains(&Template::CountBits));
    }

    #[test]
    fn undefined_flags_are_masked_and_redefined_before_reads() {
        let f = all_features();
        // DIV leaves all six undefined.
        let div = spec(Template::Div, 3);
        let p = assemble(std::slice::from_ref(&div), &f).unwrap();
        assert_eq!(p.flags_mask, DF);
        // A following SETcc must be preceded by a CMP that redefines the flags.
        let p2 = assemble(&[div, spec(Template::Setcc, 5)], &f).unwrap();
        let l: Vec<&str> = p2.listing.lines().collect();
        let set = l.iter().position(|x| x.contains(" set")).unwrap();
        assert!(
            l[set - 1].contains("cmp ") || l[set - 2].contains("cmp "),
            "{}",
            p2.listing
        );
        assert_eq!(p2.flags_mask, FLAGS_MASK);
    }

    #[test]
    fn generated_programs_run_natively_without_faults() {
        let f = HostFeatures::detect();
        let ts = Template::all_supported(&f);
        let mut seed = 99u64;
        for n in 0..3000u64 {
            let len = 1 + (n % 8) as usize;
            let ops: Vec<OpSpec> = (0..len)
                .map(|_| {
                    let t = ts[(splitmix(&mut seed) % ts.len() as u64) as usize];
                    spec(t, splitmix(&mut seed))
                })
                .collect();
            let p = assemble(&ops, &f).unwrap();
            let mut gpr = [0u64; 16];
            for g in gpr.iter_mut() {
                *g = splitmix(&mut seed);
            }
            gpr[4] = STACK_TOP;
            let input = Input {
                gpr,
                rflags: splitmix(&mut seed),
                scratch_seed: n,
            };
            let out = p.run_native(&input.state());
            if let Err(err) = out {
                panic!("{ops:?}\n{}\n{err}", p.listing);
            }
        }
    }

    #[test]
    fn native_results_match_a_few_known_programs() {
        let f = HostFeatures::detect();
        // Zero entropy: Div decodes to `div` with a known, constructed dividend/divisor.
        let p = assemble(
            &[OpSpec {
                template: Template::Lea,
                entropy: [0; ENTROPY_WORDS],
            }],
            &f,
        )
        .unwrap();
        let mut input = Input {
            gpr: [7; 16],
            rflags: 0,
            scratch_seed: 0,
        }
        .state();
        input.gpr[4] = STACK_TOP;
        let out = p.run_native(&input).unwrap();
        // Zero entropy: lea rax, [rax+rax*1] (64-bit, base+index, no displacement).
        assert!(p.listing.contains("lea rax,[rax+rax]"), "{}", p.listing);
        assert_eq!(out.gpr[0], 14);
    }

    #[test]
    fn bad_rsp_is_rejected() {
        let p = assemble(&[spec(Template::PushPop, 1)], &HostFeatures::detect()).unwrap();
        let mut s = NativeState::new();
        s.gpr[4] = 0x1234;
        assert!(matches!(
            p.run_native(&s),
            Err(RunError::Gen(GenError::StackOutOfRange { rsp: 0x1234 }))
        ));
    }
}
