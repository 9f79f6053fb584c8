//! The SEV-ES guest ABI of esvm: the constants the guest runtime's SEV-ES support
//! (`sev.rs`, `ghcb.rs`, `vc.rs`) and the SEV-ES test guests share with the host.
//!
//! Like `bootinfo.rs`, this file is compiled in two places: the guest runtime declares it
//! as `mod sevabi;`, host crates include it with
//! `#[path = ".../guests/rt/src/sevabi.rs"] mod sevabi;` (`esvm_guests::sevabi`). It uses
//! nothing but `core` and contains no `unsafe`.
//!
//! Facts about the GHCB protocol follow the AMD GHCB specification (pub. 56421); the
//! hypervisor side of esvm is `crates/hv/src/ghcb/`. The esvm-specific parts (reason set 1,
//! the checkpoint port, the `sev-cr` steps) are documented in `docs/sev-es-guest.md`.

// Host crates include this file as a module and do not use every item.
#![allow(dead_code)]

/// The C-bit position the esvm "hardware" reports (CPUID 0x8000_001F `EBX[5:0]`, and the
/// GHCB MSR protocol's SEV_INFO response `[31:24]`). The runtime does not rely on this
/// constant: it uses the position it negotiates and checks that both sources agree.
pub const C_BIT_POSITION: u8 = 47;

/// The GHCB MSR: MSR-protocol requests, or the GPA of the GHCB page. RDMSR/WRMSR of it
/// never raise #VC.
pub const MSR_GHCB: u32 = 0xC001_0130;
/// SEV_STATUS: bit 0 SEV enabled, bit 1 SEV-ES enabled.
pub const MSR_SEV_STATUS: u32 = 0xC001_0131;
/// SEV_STATUS bit 0.
pub const SEV_STATUS_SEV: u64 = 1 << 0;
/// SEV_STATUS bit 1.
pub const SEV_STATUS_SEV_ES: u64 = 1 << 1;

/// The CPUID leaf that describes the memory-encryption features.
pub const CPUID_SEV_LEAF: u32 = 0x8000_001F;
/// CPUID 0x8000_001F `EAX` bit 1: SEV supported.
pub const CPUID_SEV_EAX_SEV: u32 = 1 << 1;
/// CPUID 0x8000_001F `EAX` bit 3: SEV-ES supported.
pub const CPUID_SEV_EAX_SEV_ES: u32 = 1 << 3;
/// CPUID 0x8000_001F `EBX[5:0]`: the C-bit position.
pub const CPUID_SEV_EBX_CBIT_MASK: u32 = 0x3F;

/// Lowest GHCB protocol version the runtime speaks.
pub const GHCB_VERSION_MIN: u16 = 1;
/// Highest GHCB protocol version the runtime speaks.
pub const GHCB_VERSION_MAX: u16 = 2;

/// The #VC vector.
pub const VC_VECTOR: u8 = 29;

/// The GHCB MSR protocol (requests carried in the GHCB MSR itself).
pub mod msr_protocol {
    /// Mask of GHCBInfo, the request/response code in bits 11:0.
    pub const INFO_MASK: u64 = 0xFFF;
    /// SEV_INFO response: `[63:48]` max version, `[47:32]` min version, `[31:24]` C-bit.
    pub const SEV_INFO_RESP: u64 = 0x001;
    /// SEV_INFO request.
    pub const SEV_INFO_REQ: u64 = 0x002;
    /// CPUID request: `[31:30]` register (0 EAX, 1 EBX, 2 ECX, 3 EDX), `[63:32]` function.
    pub const CPUID_REQ: u64 = 0x004;
    /// CPUID response: `[31:30]` the register echoed, `[63:32]` its value.
    pub const CPUID_RESP: u64 = 0x005;
    /// Termination request: `[15:12]` reason set, `[23:16]` reason code.
    pub const TERM_REQ: u64 = 0x100;

    /// Encodes a CPUID request for `register` (0..=3 = EAX..EDX) of `function`.
    pub const fn cpuid_request(function: u32, register: u8) -> u64 {
        ((function as u64) << 32) | (((register & 3) as u64) << 30) | CPUID_REQ
    }

    /// Decodes a CPUID response to a request for `register`; `None` if `msr` is not
    /// such a response.
    pub const fn cpuid_response(msr: u64, register: u8) -> Option<u32> {
        if msr & INFO_MASK != CPUID_RESP || (msr >> 30) & 3 != (register & 3) as u64 {
            return None;
        }
        Some((msr >> 32) as u32)
    }

    /// Encodes a termination request.
    pub const fn term_request(reason_set: u8, reason_code: u8) -> u64 {
        (((reason_set & 0xF) as u64) << 12) | ((reason_code as u64) << 16) | TERM_REQ
    }

    /// A decoded SEV_INFO response.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SevInfo {
        /// Highest protocol version the hypervisor supports.
        pub max_version: u16,
        /// Lowest protocol version the hypervisor supports.
        pub min_version: u16,
        /// C-bit position.
        pub c_bit: u8,
    }

    /// Decodes a SEV_INFO response; `None` if `msr` is not one.
    pub const fn sev_info(msr: u64) -> Option<SevInfo> {
        if msr & INFO_MASK != SEV_INFO_RESP {
            return None;
        }
        Some(SevInfo {
            max_version: (msr >> 48) as u16,
            min_version: (msr >> 32) as u16,
            c_bit: (msr >> 24) as u8,
        })
    }

    /// The protocol version the guest uses with a hypervisor offering
    /// `[info.min_version, info.max_version]`: the highest version both support, or
    /// `None` if the ranges do not overlap.
    pub const fn negotiate(info: SevInfo) -> Option<u16> {
        let v = if info.max_version < super::GHCB_VERSION_MAX {
            info.max_version
        } else {
            super::GHCB_VERSION_MAX
        };
        if v < super::GHCB_VERSION_MIN || v < info.min_version {
            None
        } else {
            Some(v)
        }
    }
}

/// SW_EXITCODE values (AMD APM vol. 2 exit codes, GHCB software-defined exit codes). The
/// #VC error code is the exit code of the event.
pub mod exit_code {
    pub const DR7_READ: u64 = 0x27;
    pub const DR7_WRITE: u64 = 0x37;
    pub const RDTSC: u64 = 0x6E;
    pub const RDPMC: u64 = 0x6F;
    pub const CPUID: u64 = 0x72;
    pub const INVD: u64 = 0x76;
    pub const IOIO: u64 = 0x7B;
    pub const MSR: u64 = 0x7C;
    pub const VMMCALL: u64 = 0x81;
    pub const RDTSCP: u64 = 0x87;
    pub const WBINVD: u64 = 0x89;
    pub const MONITOR: u64 = 0x8A;
    pub const MWAIT: u64 = 0x8B;
    /// Nested page fault: the #VC error code of an MMIO access (a C-bit-clear access to a
    /// guest-physical address outside RAM).
    pub const NPF: u64 = 0x400;
    pub const MMIO_READ: u64 = 0x8000_0001;
    pub const MMIO_WRITE: u64 = 0x8000_0002;
    pub const TERM_REQUEST: u64 = 0x8000_FFFE;
}

/// The GHCB page layout (offsets in the 4 KiB page).
pub mod ghcb_layout {
    pub const CPL: usize = 0x0CB;
    pub const XSS: usize = 0x140;
    pub const DR7: usize = 0x160;
    pub const RAX: usize = 0x1F8;
    pub const RCX: usize = 0x308;
    pub const RDX: usize = 0x310;
    pub const RBX: usize = 0x318;
    pub const RSI: usize = 0x330;
    pub const SW_EXITCODE: usize = 0x390;
    pub const SW_EXITINFO1: usize = 0x398;
    pub const SW_EXITINFO2: usize = 0x3A0;
    pub const SW_SCRATCH: usize = 0x3A8;
    pub const XCR0: usize = 0x3E8;
    /// The valid bitmap: bit `offset / 8` marks the quadword at `offset` as supplied.
    pub const VALID_BITMAP: usize = 0x3F0;
    /// Size of the valid bitmap in bytes.
    pub const VALID_BITMAP_SIZE: usize = 16;
    /// The shared buffer (scratch area inside the page).
    pub const SHARED_BUFFER: usize = 0x800;
    /// Size of the shared buffer.
    pub const SHARED_BUFFER_SIZE: usize = 0xFF0 - 0x800;
    /// Protocol version (u16).
    pub const PROTOCOL_VERSION: usize = 0xFFA;
    /// Usage (u32; 0 = standard GHCB).
    pub const USAGE: usize = 0xFFC;

    /// Index of the valid-bitmap bit of the field at `offset`.
    pub const fn valid_bit(offset: usize) -> usize {
        offset / 8
    }
}

/// IOIO SW_EXITINFO1 encoding.
pub mod ioio {
    pub const TYPE_IN: u64 = 1 << 0;
    pub const STRING: u64 = 1 << 2;
    pub const REP: u64 = 1 << 3;
    pub const SIZE8: u64 = 1 << 4;
    pub const SIZE16: u64 = 1 << 5;
    pub const SIZE32: u64 = 1 << 6;
    pub const ADDR16: u64 = 1 << 7;
    pub const ADDR32: u64 = 1 << 8;
    pub const ADDR64: u64 = 1 << 9;
    pub const PORT_SHIFT: u32 = 16;

    /// SW_EXITINFO1 for a port access: `size` is 1, 2 or 4 bytes, `addr_bits` 32 or 64
    /// (only meaningful for string I/O).
    pub const fn exit_info1(
        port: u16,
        size: u8,
        is_in: bool,
        string: bool,
        rep: bool,
        addr_bits: u8,
    ) -> u64 {
        let size_bit = match size {
            1 => SIZE8,
            2 => SIZE16,
            _ => SIZE32,
        };
        let addr_bit = match addr_bits {
            16 => ADDR16,
            32 => ADDR32,
            _ => ADDR64,
        };
        ((port as u64) << PORT_SHIFT)
            | addr_bit
            | size_bit
            | if rep { REP } else { 0 }
            | if string { STRING } else { 0 }
            | if is_in { TYPE_IN } else { 0 }
    }
}

/// What the hypervisor puts in SW_EXITINFO1 (low 32 bits) after a GHCB request.
pub mod response {
    /// Handled.
    pub const SUCCESS: u64 = 0;
    /// Raise the exception described in SW_EXITINFO2 (EVENTINJ format).
    pub const ISSUE_EXCEPTION: u64 = 1;
    /// Malformed request; SW_EXITINFO2 holds the hypervisor's error code.
    pub const MALFORMED: u64 = 2;
    /// EVENTINJ: valid bit.
    pub const EVENT_VALID: u64 = 1 << 31;
    /// EVENTINJ: type field (bits 10:8); 3 = exception.
    pub const EVENT_TYPE_MASK: u64 = 7 << 8;
    /// EVENTINJ type 3: exception.
    pub const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
}

/// Termination reasons (GHCB TERM_REQUEST `SW_EXITINFO1[3:0]` set / `[11:4]` code; MSR
/// protocol `[15:12]` set / `[23:16]` code).
pub mod term {
    /// Reason set 0: the GHCB specification's general reasons.
    pub const SET_GENERAL: u8 = 0;
    /// Set 0, code 0: general termination request (what `sev-smoke` sends at its end).
    pub const GENERAL: u8 = 0;
    /// Set 0, code 1: the hypervisor's GHCB protocol version range is not supported.
    pub const PROTOCOL_UNSUPPORTED: u8 = 1;

    /// Reason set 1: the esvm guest runtime.
    pub const SET_ESVM: u8 = 1;
    /// SEV_INFO request answered with something else than a SEV_INFO response.
    pub const BAD_SEV_INFO: u8 = 1;
    /// A MSR-protocol CPUID request answered with something else than its response.
    pub const BAD_CPUID_RESPONSE: u8 = 2;
    /// SEV_INFO, CPUID 0x8000_001F and CR3 disagree about the C-bit (or it is invalid).
    pub const C_BIT_MISMATCH: u8 = 3;
    /// CPUID 0x8000_001F or SEV_STATUS lack SEV / SEV-ES.
    pub const NOT_SEV_ES: u8 = 4;
    /// The GHCB page could not be made shared (page-table split failed).
    pub const GHCB_SETUP: u8 = 5;
    /// A #VC other than CPUID arrived before the GHCB page existed (info: exit code).
    pub const EARLY_VC_UNSUPPORTED: u8 = 6;
    /// A #VC with an exit code the handler does not handle (info: exit code).
    pub const VC_UNSUPPORTED_EXIT: u8 = 7;
    /// The instruction at RIP is not one the handler decodes for that exit code (info:
    /// the first 8 instruction bytes, little endian).
    pub const VC_DECODE: u8 = 8;
    /// The hypervisor answered SW_EXITINFO1 = 2 (info: SW_EXITINFO2, its error code).
    pub const GHCB_MALFORMED: u8 = 9;
    /// The hypervisor's answer is not usable: SW_EXITINFO1 missing or unknown, an output
    /// field not marked valid, or an event that is not an exception (info: exit code).
    pub const GHCB_BAD_RESPONSE: u8 = 10;
    /// The GHCB was needed while a request on it was in flight (a #VC or an exception
    /// inside a GHCB transaction).
    pub const GHCB_BUSY: u8 = 11;
    /// #VC nested deeper than the runtime's IST budget allows.
    pub const VC_NESTING: u8 = 12;
    /// An MMIO access the handler cannot perform: unmapped address, C-bit set, FS/GS
    /// segment, or crossing a page (info: the linear address).
    pub const MMIO_UNSUPPORTED: u8 = 13;
    /// A guest asked for termination through `esvm_rt::sev::terminate` (info: its own).
    pub const GUEST_REQUEST: u8 = 14;

    /// A short description of a reason, for logs.
    pub const fn describe(set: u8, code: u8) -> &'static str {
        match (set, code) {
            (SET_GENERAL, GENERAL) => "general termination request",
            (SET_GENERAL, PROTOCOL_UNSUPPORTED) => "GHCB protocol version range not supported",
            (SET_ESVM, BAD_SEV_INFO) => "bad SEV_INFO response",
            (SET_ESVM, BAD_CPUID_RESPONSE) => "bad MSR-protocol CPUID response",
            (SET_ESVM, C_BIT_MISMATCH) => "C-bit position inconsistent",
            (SET_ESVM, NOT_SEV_ES) => "SEV-ES not reported by CPUID/SEV_STATUS",
            (SET_ESVM, GHCB_SETUP) => "cannot map the GHCB page shared",
            (SET_ESVM, EARLY_VC_UNSUPPORTED) => "#VC before the GHCB exists",
            (SET_ESVM, VC_UNSUPPORTED_EXIT) => "#VC with an unsupported exit code",
            (SET_ESVM, VC_DECODE) => "#VC on an instruction the handler cannot decode",
            (SET_ESVM, GHCB_MALFORMED) => "hypervisor reported a malformed GHCB request",
            (SET_ESVM, GHCB_BAD_RESPONSE) => "unusable GHCB response",
            (SET_ESVM, GHCB_BUSY) => "GHCB needed while in use",
            (SET_ESVM, VC_NESTING) => "#VC nested too deeply",
            (SET_ESVM, MMIO_UNSUPPORTED) => "unsupported MMIO access",
            (SET_ESVM, GUEST_REQUEST) => "guest request",
            _ => "unknown reason",
        }
    }
}

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
    }

    /// Decodes a value written to [`PORT`].
    pub const fn decode(value: u32) -> Option<Checkpoint> {
        if value == PF_READY {
            Some(Checkpoint::PfReady)
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

/// `sev-mmio`: the default guest-physical address of the MMIO window it tests (a
/// RAM-like device of at least [`MMIO_TEST_WINDOW`] bytes that returns what was written).
pub const MMIO_TEST_DEFAULT_ADDR: u64 = 0xFEB0_0000;
/// `sev-mmio`: bytes of the window the guest uses.
pub const MMIO_TEST_WINDOW: u64 = 0x40;
/// `sev-pf`: the default error code the test injects with the #PF (`ec=` argument).
pub const PF_DEFAULT_ERROR_CODE: u64 = 0x6;
