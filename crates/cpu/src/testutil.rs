//! A tiny machine for tests and differential testing: flat memory, identity page tables, a
//! GDT/IDT/TSS, exception stubs, and long-mode entry — plus [`run_snippet`], which runs an
//! instruction sequence in a flat 64-bit ring-3 environment and reports where it ended.
//!
//! Physical/virtual layout of the [`Harness`] (identity-mapped with 2 MiB pages over the
//! first 1 GiB of guest RAM, supervisor RWX; see the constants):
//! - `GDT` (null, 0x08 kernel code64, 0x10 kernel data, 0x18 user code32, 0x20 user data,
//!   0x28 user code64, 0x30 TSS), `IDT` (256 gates to the stubs), `TSS` (RSP0, IST1);
//! - `STUBS`: the handler of vector `v` is a `HLT` at `STUBS + 4*v`, so an exception ends
//!   the run with [`Exit::Hlt`] and [`Harness::exception`] decodes it from the stack frame;
//! - `CODE` for test programs, `DATA` for their data, the kernel stack below `STACK_TOP`.

use crate::mem::PhysMemory;
use crate::{Cpu, CpuConfig, Exit};
use esvm_arch::bits::{cr0, cr4, efer, rflags, vector};
use esvm_arch::{DescriptorTable, Regs, Segment, SegmentAttributes, SpecialRegs};

pub const GDT: u64 = 0x1000;
pub const IDT: u64 = 0x2000;
pub const TSS: u64 = 0x3000;
pub const STUBS: u64 = 0x4000;
pub const PML4: u64 = 0x10000;
pub const STACK_TOP: u64 = 0x9_0000;
pub const IST1_TOP: u64 = 0x7_0000;
pub const CODE: u64 = 0x10_0000;
pub const DATA: u64 = 0x20_0000;

pub const KCODE: u16 = 0x08;
pub const KDATA: u16 = 0x10;
pub const UCODE32: u16 = 0x18;
pub const UDATA: u16 = 0x20;
pub const UCODE64: u16 = 0x28;
pub const TSS_SEL: u16 = 0x30;

/// A test machine.
pub struct Harness {
    pub cpu: Cpu,
}

/// An exception that ended a run on a harness stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caught {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// RIP pushed by the exception (the faulting instruction for faults).
    pub rip: u64,
    pub cr2: u64,
}

fn desc(base: u64, limit: u32, attrib: u16) -> u64 {
    (limit as u64 & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (((attrib as u64) & 0xff) << 40)
        | ((((limit >> 16) & 0xf) as u64) << 48)
        | ((((attrib >> 8) & 0xf) as u64) << 52)
        | (((base >> 24) & 0xff) << 56)
}

pub fn kernel_code64() -> Segment {
    Segment {
        selector: KCODE,
        base: 0,
        limit: 0xffff_ffff,
        attrib: SegmentAttributes::new(0xb, true, 0, true, true, false, true),
    }
}

pub fn kernel_data() -> Segment {
    Segment {
        selector: KDATA,
        base: 0,
        limit: 0xffff_ffff,
        attrib: SegmentAttributes::new(0x3, true, 0, true, false, true, true),
    }
}

impl Harness {
    /// A 64-bit CPL-0 machine with `mem_size` bytes of RAM (at least 4 MiB), paging on
    /// (identity, 2 MiB pages, NX enabled), interrupts off, RIP = `CODE`.
    pub fn new(mem_size: u64) -> Harness {
        let mem = PhysMemory::new_owned(mem_size).expect("test memory");
        Self::with_memory(mem, CpuConfig::default())
    }

    pub fn with_memory(mem: PhysMemory, config: CpuConfig) -> Harness {
        let size = mem.size();
        // GDT.
        let g = [
            0u64,
            desc(0, 0xfffff, 0xa9b), // kernel code64
            desc(0, 0xfffff, 0xc93), // kernel data
            desc(0, 0xfffff, 0xcfb), // user code32
            desc(0, 0xfffff, 0xcf3), // user data
            desc(0, 0xfffff, 0xafb), // user code64
            desc(TSS, 0x67, 0x89),   // TSS (available)
            0,                       // TSS high
        ];
        for (i, d) in g.iter().enumerate() {
            mem.write_u64(GDT + 8 * i as u64, *d).unwrap();
        }
        // TSS: RSP0, IST1.
        mem.write_u64(TSS + 4, STACK_TOP).unwrap();
        mem.write_u64(TSS + 0x24, IST1_TOP).unwrap();
        // Stubs and IDT.
        for v in 0..256u64 {
            mem.write(STUBS + 4 * v, &[0xf4, 0x90, 0x90, 0x90]).unwrap();
            let off = STUBS + 4 * v;
            let lo = (off & 0xffff)
                | ((KCODE as u64) << 16)
                | (0x8eu64 << 40)
                | (((off >> 16) & 0xffff) << 48);
            // DPL 3 on vectors 3 (INT3) and 0x80 so user code can raise them.
            let lo = if v == 3 || v == 0x80 {
                lo | (3 << 45)
            } else {
                lo
            };
            mem.write_u64(IDT + 16 * v, lo).unwrap();
            mem.write_u64(IDT + 16 * v + 8, off >> 32).unwrap();
        }
        // Page tables: identity map the first min(size, 1 GiB) with 2 MiB pages.
        let pdpt = PML4 + 0x1000;
        let pd = PML4 + 0x2000;
        mem.write_u64(PML4, pdpt | 3).unwrap();
        mem.write_u64(pdpt, pd | 3).unwrap();
        let n = (size.min(1 << 30)).div_ceil(2 << 20);
        for i in 0..n {
            mem.write_u64(pd + 8 * i, (i << 21) | 0x83).unwrap();
        }
        let mut cpu = Cpu::new(config, mem);
        let tss = Segment {
            selector: TSS_SEL,
            base: TSS,
            limit: 0x67,
            attrib: SegmentAttributes::new(0xb, false, 0, true, false, false, false),
        };
        let s = SpecialRegs {
            cs: kernel_code64(),
            ds: kernel_data(),
            es: kernel_data(),
            fs: kernel_data(),
            gs: kernel_data(),
            ss: kernel_data(),
            tr: tss,
            ldt: Segment::default(),
            gdt: DescriptorTable {
                base: GDT,
                limit: 8 * 8 - 1,
            },
            idt: DescriptorTable {
                base: IDT,
                limit: 256 * 16 - 1,
            },
            cr0: cr0::PE | cr0::PG | cr0::WP | cr0::ET | cr0::NE | cr0::MP,
            cr2: 0,
            cr3: PML4,
            cr4: cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT,
            cr8: 0,
            efer: efer::LME | efer::LMA | efer::NXE | efer::SCE,
            apic_base: esvm_arch::msr::APIC_BASE_DEFAULT_BSP,
        };
        cpu.set_sregs(&s).expect("valid long mode state");
        let mut r = Regs {
            rip: CODE,
            ..Regs::default()
        };
        r.gpr[4] = STACK_TOP;
        cpu.set_regs(&r);
        Harness { cpu }
    }

    pub fn mem(&self) -> &PhysMemory {
        self.cpu.memory()
    }

    /// Copy `code` to `CODE` and point RIP at it.
    pub fn load(&mut self, code: &[u8]) {
        self.cpu.memory().write(CODE, code).unwrap();
        self.restart(CODE);
    }

    /// Continue at `rip` (not halted).
    pub fn restart(&mut self, rip: u64) {
        let mut r = self.cpu.regs();
        r.rip = rip;
        self.cpu.set_regs(&r);
        let mut e = self.cpu.events();
        e.halted = false;
        self.cpu.set_events(&e);
    }

    /// Run until something other than BudgetExhausted, with a generous budget.
    pub fn run(&mut self) -> Exit {
        self.cpu.run(10_000_000)
    }

    /// If the CPU stopped on an exception stub, decode the exception from the stack frame.
    pub fn exception(&self) -> Option<Caught> {
        let rip = self.cpu.regs().rip;
        if !(STUBS + 1..STUBS + 1 + 4 * 256).contains(&rip) {
            return None;
        }
        let v = ((rip - 1 - STUBS) / 4) as u8;
        let rsp = self.cpu.regs().gpr[4];
        let m = self.cpu.memory();
        let (ec, frame) = if vector::has_error_code(v) {
            (Some(m.read_u64(rsp).ok()? as u32), rsp + 8)
        } else {
            (None, rsp)
        };
        Some(Caught {
            vector: v,
            error_code: ec,
            rip: m.read_u64(frame).ok()?,
            cr2: self.cpu.sregs().cr2,
        })
    }

    /// Map the 4 KiB page at virtual `virt` to `phys` with PTE flags `flags` (P is added),
    /// using page tables allocated from `pool` (advanced). Virtual addresses must be outside
    /// the identity-mapped first GiB or in a 2 MiB region not used otherwise.
    pub fn map_4k(&mut self, virt: u64, phys: u64, flags: u64, pool: &mut u64) {
        let m = self.cpu.memory().clone();
        let mut table = PML4;
        for level in (1..4).rev() {
            let shift = 12 + 9 * level;
            let idx = (virt >> shift) & 511;
            let ea = table + idx * 8;
            let mut e = m.read_u64(ea).unwrap();
            if e & 1 == 0 || e & 0x80 != 0 {
                let t = *pool;
                *pool += 0x1000;
                m.write(t, &[0u8; 4096]).unwrap();
                e = t | 7;
                m.write_u64(ea, e).unwrap();
            } else if e & 4 == 0 {
                // Make intermediate levels user-accessible; leaves decide.
                e |= 7;
                m.write_u64(ea, e).unwrap();
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        let idx = (virt >> 12) & 511;
        m.write_u64(table + idx * 8, phys | flags | 1).unwrap();
        let mut s = self.cpu.sregs();
        s.cr3 = PML4;
        self.cpu.set_sregs(&s).unwrap();
    }

    /// Switch to CPL 3 64-bit code at `rip` with stack `rsp` (IF as given in RFLAGS).
    pub fn enter_user(&mut self, rip: u64, rsp: u64, rflags_v: u64) {
        let mut s = self.cpu.sregs();
        s.cs = Segment {
            selector: UCODE64 | 3,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0xb, true, 3, true, true, false, true),
        };
        let ud = Segment {
            selector: UDATA | 3,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0x3, true, 3, true, false, true, true),
        };
        s.ss = ud;
        s.ds = ud;
        s.es = ud;
        self.cpu.set_sregs(&s).unwrap();
        let mut r = self.cpu.regs();
        r.rip = rip;
        r.gpr[4] = rsp;
        r.rflags = rflags_v | rflags::FIXED;
        self.cpu.set_regs(&r);
    }
}

// ---------------------------------------------------------------------- run_snippet

/// Where [`run_snippet`] maps the scratch buffer (user read/write, not executable).
pub const SNIPPET_SCRATCH: u64 = 0x1000_0000;
/// Largest scratch buffer [`run_snippet`] accepts.
pub const SNIPPET_SCRATCH_MAX: usize = 1 << 20;
/// The snippet's code is placed so that it *ends* here: its first byte is at
/// `SNIPPET_CODE_END - code.len()`, and the page at `SNIPPET_CODE_END` is unmapped, so
/// falling off the end stops the run.
pub const SNIPPET_CODE_END: u64 = 0x2010_0000;
/// Largest snippet.
pub const SNIPPET_CODE_MAX: usize = 64 * 1024;

/// Instructions a snippet may execute before [`SnippetEnd::Budget`].
pub const SNIPPET_BUDGET: u64 = 1_000_000;

/// How a snippet run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnippetEnd {
    /// Execution fell off the end of the code.
    Completed,
    /// An exception (vector, error code); `regs.rip` is the faulting instruction (or the next
    /// one for traps such as INT3/INTO) and `cr2` its address for #PF.
    Exception {
        vector: u8,
        error_code: Option<u32>,
        cr2: u64,
    },
    /// The snippet ran more than [`SNIPPET_BUDGET`] instructions.
    Budget,
    /// Anything else (an I/O exit, a shutdown): not expected from ring-3 code.
    Other,
}

/// Result of [`run_snippet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnippetOutcome {
    pub end: SnippetEnd,
    /// Registers at the end (RFLAGS includes IF and the fixed bit 1, as ring-3 code sees it).
    pub regs: Regs,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub retired: u64,
}

/// Run `code` in a flat 64-bit ring-3 environment: CS/SS/DS/ES flat user segments, FS/GS
/// base 0, IF=1, IOPL=0, CR0.WP/NE, SSE enabled, MXCSR from `mxcsr`. `regs` supplies the
/// GPRs and the arithmetic flags + DF (RIP is ignored: the code starts at
/// `SNIPPET_CODE_END - code.len()`). `mem` is mapped read/write at [`SNIPPET_SCRATCH`]
/// (size rounded up to 4 KiB with zeros, at most [`SNIPPET_SCRATCH_MAX`]); its final
/// contents are copied back. Nothing else is mapped at user privilege.
///
/// Panics if `code` or `mem` exceed the documented maxima (test-only helper).
pub fn run_snippet(code: &[u8], regs: &Regs, mem: &mut [u8]) -> SnippetOutcome {
    run_snippet_with(code, regs, mem, &[0; 16], 0x1f80)
}

/// [`run_snippet`] with initial XMM registers and MXCSR.
pub fn run_snippet_with(
    code: &[u8],
    regs: &Regs,
    mem: &mut [u8],
    xmm: &[u128; 16],
    mxcsr: u32,
) -> SnippetOutcome {
    assert!(code.len() <= SNIPPET_CODE_MAX && mem.len() <= SNIPPET_SCRATCH_MAX);
    const PHYS_SCRATCH: u64 = 0x40_0000;
    const PHYS_CODE: u64 = 0x60_0000;
    const POOL: u64 = 0x80_0000;
    let mut h = Harness::new(16 << 20);
    let m = h.mem().clone();
    let mut pool = POOL;
    // Scratch: user RW NX.
    let spages = mem.len().div_ceil(4096).max(1) as u64;
    m.write(PHYS_SCRATCH, mem).unwrap();
    for p in 0..spages {
        h.map_4k(
            SNIPPET_SCRATCH + p * 4096,
            PHYS_SCRATCH + p * 4096,
            2 | 4 | (1 << 63),
            &mut pool,
        );
    }
    // Code: user RX, ending at SNIPPET_CODE_END.
    let start = SNIPPET_CODE_END - code.len() as u64;
    let first = start & !0xfff;
    let cpages = (SNIPPET_CODE_END - first) / 4096;
    let phys_start = PHYS_CODE + (start - first);
    m.write(phys_start, code).unwrap();
    for p in 0..cpages.max(1) {
        h.map_4k(first + p * 4096, PHYS_CODE + p * 4096, 4, &mut pool);
    }
    let fl = (regs.rflags & (rflags::ARITH | rflags::DF)) | rflags::IF;
    h.enter_user(start, regs.gpr[4], fl);
    let mut r = h.cpu.regs();
    r.gpr = regs.gpr;
    h.cpu.set_regs(&r);
    let mut f = h.cpu.fpu();
    for (i, x) in xmm.iter().enumerate() {
        f.xmm[i] = x.to_le_bytes();
    }
    f.mxcsr = mxcsr;
    h.cpu.set_fpu(&f);
    let exit = h.cpu.run(SNIPPET_BUDGET);
    let base_retired = 0;
    let mut out_regs = h.cpu.regs();
    let end = match exit {
        Exit::BudgetExhausted => SnippetEnd::Budget,
        Exit::Hlt => match h.exception() {
            Some(c) => {
                // Restore the user-visible state from the exception frame.
                let rsp = h.cpu.regs().gpr[4];
                let frame = if c.error_code.is_some() { rsp + 8 } else { rsp };
                let rd = |a: u64| m.read_u64(a).unwrap();
                out_regs.rip = rd(frame);
                out_regs.rflags = rd(frame + 16);
                out_regs.gpr[4] = rd(frame + 24);
                if c.vector == vector::PF && c.cr2 == SNIPPET_CODE_END && c.rip == SNIPPET_CODE_END
                {
                    SnippetEnd::Completed
                } else {
                    SnippetEnd::Exception {
                        vector: c.vector,
                        error_code: c.error_code,
                        cr2: c.cr2,
                    }
                }
            }
            None => SnippetEnd::Other,
        },
        _ => SnippetEnd::Other,
    };
    m.read(PHYS_SCRATCH, mem).unwrap();
    let fpu = h.cpu.fpu();
    let mut xo = [0u128; 16];
    for (i, x) in fpu.xmm.iter().enumerate() {
        xo[i] = u128::from_le_bytes(*x);
    }
    // The exception delivery and the stub HLT retired no snippet instructions but the HLT.
    let retired = h.cpu.instructions_retired() - base_retired;
    SnippetOutcome {
        end,
        regs: out_regs,
        xmm: xo,
        mxcsr: fpu.mxcsr,
        retired: if matches!(end, SnippetEnd::Completed | SnippetEnd::Exception { .. }) {
            retired.saturating_sub(1)
        } else {
            retired
        },
    }
}
