//! What esvm's SEV-ES test guests (`guests/bin/sev-*.rs`) share with the host tests that
//! run them: the checkpoint port, the `sev-cr` steps, the `sev-fpu` pattern and the
//! defaults of `sev-mmio` and `sev-pf` (`docs/sev-es-guest.md`, section 4).

pub mod fpu_pattern;

/// The checkpoint port: SEV-ES test guests write a 32-bit value to it (through the GHCB,
/// like any port write) at points where the host test wants to look at the hypervisor's
/// view of the vCPU. A VMM that does not care ignores writes to it.
pub mod checkpoint {
    /// The port.
    pub const PORT: u16 = 0xF6;
    /// `sev-cr`: the value written after step `n` (0 = the state before any write) is
    /// `CR_STEP | n`.
    pub const CR_STEP: u32 = 0x5EC0_0000;
    /// `sev-pf`: the #PF handler is installed; the guest halts (HLT, IF=0) right after
    /// this write and waits for the injected #PF.
    pub const PF_READY: u32 = 0x5EF0_0001;
    /// `sev-smoke nmi=1`: the NMI handler is installed; the host injects two NMIs at once
    /// right after this write.
    pub const NMI_READY: u32 = 0x5EF0_0002;
    /// `sev-smoke jump-table=1`: the AP jump table is set; the guest spins a while (the
    /// host may move it meanwhile), then reads it back.
    pub const JUMP_TABLE_SET: u32 = 0x5EF0_0003;
    /// Mask of the tag part of a checkpoint value.
    pub const TAG_MASK: u32 = 0xFFFF_0000;

    /// The value `sev-cr` writes after step `n`.
    pub const fn cr_step(n: u32) -> u32 {
        CR_STEP | (n & 0xFFFF)
    }

    /// A decoded checkpoint value.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Checkpoint {
        /// `sev-cr` finished step n.
        CrStep(u32),
        /// `sev-pf` is ready for the #PF.
        PfReady,
        /// `sev-smoke nmi=1` is ready for two NMIs.
        NmiReady,
        /// `sev-smoke jump-table=1` has set its AP jump table.
        JumpTableSet,
    }

    /// Decodes a value written to [`PORT`].
    pub const fn decode(value: u32) -> Option<Checkpoint> {
        if value == PF_READY {
            Some(Checkpoint::PfReady)
        } else if value == NMI_READY {
            Some(Checkpoint::NmiReady)
        } else if value == JUMP_TABLE_SET {
            Some(Checkpoint::JumpTableSet)
        } else if value & TAG_MASK == CR_STEP {
            Some(Checkpoint::CrStep(value & 0xFFFF))
        } else {
            None
        }
    }
}

/// The control-register steps of the `sev-cr` guest. Each step writes one register; the
/// guest reads all four back, prints them and writes [`checkpoint::cr_step`] to the
/// checkpoint port, so the host can compare the hypervisor's tracked CR0/CR4/CR8/EFER
/// with [`cr_steps::expected`] after every step.
pub mod cr_steps {
    /// The register a step writes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum CrReg {
        Cr0,
        Cr4,
        Cr8,
        Efer,
    }

    /// One step: `new = (old & !clear) | set` (CR8: `clear` is all ones, `set` the value).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CrStep {
        pub reg: CrReg,
        pub set: u64,
        pub clear: u64,
    }

    /// The four tracked registers.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CrState {
        pub cr0: u64,
        pub cr4: u64,
        pub cr8: u64,
        pub efer: u64,
    }

    /// CR0.MP.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0.AM.
    pub const CR0_AM: u64 = 1 << 18;
    /// CR4.PGE.
    pub const CR4_PGE: u64 = 1 << 7;
    /// CR4.OSXMMEXCPT.
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    /// EFER.SCE.
    pub const EFER_SCE: u64 = 1 << 0;

    const fn bits(reg: CrReg, set: u64, clear: u64) -> CrStep {
        CrStep { reg, set, clear }
    }
    const fn cr8(value: u64) -> CrStep {
        CrStep {
            reg: CrReg::Cr8,
            set: value,
            clear: u64::MAX,
        }
    }

    /// Steps 1..=11 (step 0 is the state before any write). Every bit touched is safe to
    /// toggle in the guest's situation (ring 0, no NX in its tables, no interrupts), and
    /// each register ends where it started.
    pub const STEPS: [CrStep; 11] = [
        bits(CrReg::Cr0, CR0_AM, 0),
        bits(CrReg::Cr0, 0, CR0_MP),
        bits(CrReg::Cr0, CR0_MP, CR0_AM),
        bits(CrReg::Cr4, CR4_PGE, 0),
        bits(CrReg::Cr4, 0, CR4_OSXMMEXCPT),
        bits(CrReg::Cr4, CR4_OSXMMEXCPT, CR4_PGE),
        cr8(5),
        cr8(15),
        cr8(0),
        bits(CrReg::Efer, 0, EFER_SCE),
        bits(CrReg::Efer, EFER_SCE, 0),
    ];

    /// Applies one step.
    pub const fn apply(s: CrState, step: CrStep) -> CrState {
        let mut out = s;
        match step.reg {
            CrReg::Cr0 => out.cr0 = (s.cr0 & !step.clear) | step.set,
            CrReg::Cr4 => out.cr4 = (s.cr4 & !step.clear) | step.set,
            CrReg::Cr8 => out.cr8 = (s.cr8 & !step.clear) | step.set,
            CrReg::Efer => out.efer = (s.efer & !step.clear) | step.set,
        }
        out
    }

    /// The state after step `n` (0..=11) starting from `initial`.
    pub const fn expected(initial: CrState, n: usize) -> CrState {
        let mut s = initial;
        let mut i = 0;
        while i < n && i < STEPS.len() {
            s = apply(s, STEPS[i]);
            i += 1;
        }
        s
    }
}

/// `sev-mmio`: bytes of the MMIO window the guest uses, by default the VMM's scratch
/// window at [`crate::layout::MMIO_SCRATCH_ADDR`] (`addr=` argument); a RAM-like device
/// that returns what was written.
pub const MMIO_TEST_WINDOW: u64 = 0x40;
/// `sev-pf`: the default error code the test injects with the #PF (`ec=` argument).
pub const PF_DEFAULT_ERROR_CODE: u64 = 0x6;

const _: () = assert!(MMIO_TEST_WINDOW <= crate::layout::MMIO_SCRATCH_SIZE);
