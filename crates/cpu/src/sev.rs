//! SEV-ES mode of the software vCPU: the "hardware" side of an encrypted-state guest.
//!
//! A [`Cpu`] created with [`CpuConfig::sev_es`] set behaves like an AMD SEV-ES guest vCPU:
//!
//! - **Memory** (see `mem/encrypt.rs` for the page model): the C-bit ([`SevEsConfig::c_bit`])
//!   is not an address bit. It is stripped from CR3 and from every page-table entry (it never
//!   raises a reserved-bit fault; the other bits above the reduced physical-address width,
//!   [`SEV_PHYS_ADDR_REDUCTION`], do); page tables are always read (and their A/D bits set)
//!   through the private view, whatever the C-bit of the entry (or CR3) pointing to them, as
//!   AMD specifies; the leaf's C-bit selects the view of the data access. With paging off
//!   every access is private. Instruction fetches always use the private view. An access
//!   with the C-bit set to a guest-physical address outside RAM is fatal (shutdown, nothing
//!   delivered to the guest); with the C-bit clear it is MMIO and raises #VC with error code
//!   0x400 (NPF) instead of an MMIO exit. A private access while
//!   [`PhysMemory::enable_encryption`] has not run is fatal too (SEV-ES needs the guest's
//!   memory key).
//! - **#VC** (vector 29, a fault: RIP stays at the instruction, the error code is the SVM exit
//!   code) instead of an exit for: CPUID 0x72; IN/OUT/INS/OUTS 0x7B (after the IOPL check);
//!   RDMSR/WRMSR 0x7C for every MSR whose state is not in the VMSA (APIC base, TSC, anything
//!   unknown); VMMCALL 0x81; RDTSC 0x6E and RDTSCP 0x87 (after the CR4.TSD check); RDPMC 0x6F
//!   (after the CR4.PCE check); INVD 0x76 and WBINVD 0x89 (CPL 0); MONITOR 0x8A and MWAIT 0x8B
//!   (CPL 0, #UD otherwise); MOV from DR7 0x27 and to DR7 0x37 (CPL 0). RDTSC, RDTSCP, INVD,
//!   WBINVD and the DR7 accesses are the hypervisor's choice ([`SevEsConfig::intercepts`]);
//!   when not intercepted they execute as on a plain vCPU. The intercept lists of
//!   [`CpuConfig`] do not apply.
//! - **Direct MSRs**: EFER, STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP,
//!   FS_BASE, GS_BASE, PAT and TSC_AUX (their state lives in the VMSA); the GHCB MSR
//!   0xC001_0130 (host-visible: [`Cpu::ghcb_msr`], [`Cpu::set_ghcb_msr`]); SEV_STATUS
//!   0xC001_0131 reads 3 (SEV | SEV-ES), writes raise #GP.
//! - **VMGEXIT** (`rep vmmcall`, F3 0F 01 D9, also the F2 form) retires and exits with
//!   [`Exit::Vmgexit`] carrying the GHCB MSR; the next [`Cpu::run`] continues after it.
//!   Outside SEV-ES mode VMGEXIT, VMMCALL, MONITOR, MWAIT and RDPMC raise #UD (the model has
//!   no hypercall exit).
//! - **Write traps**: MOV to CR0/CR4/CR8, CLTS, LMSW and WRMSR EFER complete (the instruction
//!   retires) and then exit with [`Exit::WriteTrap`] carrying the new value and the EFER after
//!   the write (a CR0 write may change EFER.LMA). Every successful write traps, even one that
//!   leaves the value unchanged. CR3 writes do not trap.
//! - HLT, interrupts, exceptions and shutdown are automatic, as in plain mode.
//! - **VMSA**: [`Cpu::to_vmsa`] saves the vCPU into an SEV-ES save area and [`Cpu::load_vmsa`]
//!   loads one; see [`Cpu::to_vmsa`] for where the pending-event state goes.

use crate::mem::View;
use crate::{Cpu, CpuConfig, CpuError, Exc, Exit, Mode, PhysMemory, Stop, P_FLUSH, R};
use esvm_arch::bits::vector;
use esvm_arch::vmsa::{offset, SEV_FEATURE_ES};
use esvm_arch::{PendingEvents, PendingException, VcpuSnapshot, Vmsa};
use std::sync::atomic::{AtomicU64, Ordering};

/// SEV-ES configuration of a vCPU ([`CpuConfig::sev_es`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevEsConfig {
    /// Position of the C-bit in page-table entries and CR3 (CPUID 0x8000_001F EBX bits 5:0);
    /// esvm uses 47. Must be in 32..=51 and above every RAM address.
    pub c_bit: u8,
    /// Which of the optional events raise #VC: the hypervisor's choice, as the intercept
    /// bits of the VMCB on hardware.
    pub intercepts: VcIntercepts,
}

impl SevEsConfig {
    /// C-bit `c_bit`, KVM's SEV-ES intercepts.
    pub fn new(c_bit: u8) -> Self {
        SevEsConfig {
            c_bit,
            intercepts: VcIntercepts::default(),
        }
    }
}

/// The events a hypervisor may choose to intercept or let an SEV-ES guest execute directly
/// (VMCB intercept bits). An intercepted one raises #VC (the guest asks the hypervisor
/// through the GHCB); one not intercepted executes as on a plain vCPU, on state the
/// hardware holds for the guest (the TSC with its offset, TSC_AUX and DR7 in the VMSA).
/// Events an SEV-ES guest always takes to the hypervisor (CPUID, port I/O, MSRs outside the
/// VMSA, VMMCALL, MONITOR/MWAIT, RDPMC) are not in the set: the model has nothing to run
/// them on in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcIntercepts {
    pub rdtsc: bool,
    pub rdtscp: bool,
    pub invd: bool,
    pub wbinvd: bool,
    /// MOV from DR7 (and DR5 as its alias).
    pub dr7_read: bool,
    /// MOV to DR7 (and DR5 as its alias).
    pub dr7_write: bool,
}

impl VcIntercepts {
    /// What KVM sets for an SEV-ES guest (arch/x86/kvm/svm: `init_vmcb`, `sev_es_init_vmcb`):
    /// RDTSC and RDTSCP run in the guest on the offset TSC; INVD, WBINVD and DR7 accesses
    /// are intercepted.
    pub const KVM_SEV_ES: VcIntercepts = VcIntercepts {
        rdtsc: false,
        rdtscp: false,
        invd: true,
        wbinvd: true,
        dr7_read: true,
        dr7_write: true,
    };
    /// Every optional event intercepted.
    pub const ALL: VcIntercepts = VcIntercepts {
        rdtsc: true,
        rdtscp: true,
        invd: true,
        wbinvd: true,
        dr7_read: true,
        dr7_write: true,
    };
}

impl Default for VcIntercepts {
    fn default() -> Self {
        VcIntercepts::KVM_SEV_ES
    }
}

/// The register a [`Exit::WriteTrap`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapReg {
    /// MOV to CR0, CLTS, LMSW (SVM exit code 0x90).
    Cr0,
    /// MOV to CR4 (0x94).
    Cr4,
    /// MOV to CR8 (0x98).
    Cr8,
    /// WRMSR to EFER (0x8F).
    Efer,
}

/// SVM exit codes, used as #VC error codes: the guest ABI's definition.
pub use esvm_abi::exit_code;

/// SEV_STATUS as an SEV-ES guest reads it: bit 0 SEV, bit 1 SEV-ES.
pub const SEV_STATUS_VALUE: u64 = esvm_abi::sev::SEV_STATUS_SEV | esvm_abi::sev::SEV_STATUS_SEV_ES;

/// How many physical-address bits an SEV-ES guest loses to memory encryption (CPUID
/// 0x8000_001F `EBX[11:6]`, which the hypervisor reports): with the 48-bit physical addresses
/// of CPUID 0x8000_0008, a guest-physical address has 47 bits, and bits 47..51 of a
/// page-table entry other than the C-bit are reserved (AMD APM vol. 2, "Secure Encrypted
/// Virtualization": the reduced bits are treated as reserved).
pub const SEV_PHYS_ADDR_REDUCTION: u32 = 1;

/// esvm's use of VMSA fields beyond the architectural registers (the pending-event state
/// [`Cpu::to_vmsa`] must carry to resume exactly).
pub mod vmsa_layout {
    /// EVENT_INJ: a pending exception in SVM EVENTINJ format.
    pub const EVENT_INJ: usize = esvm_arch::vmsa::offset::EVENT_INJ;
    /// EVENT_INJ bits: valid (31), error code valid (11), type (10:8, 3 = exception).
    pub const EVENT_VALID: u64 = 1 << 31;
    pub const EVENT_EV: u64 = 1 << 11;
    pub const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
    /// VINTR_CTRL: V_TPR (7:0) = CR8, V_IRQ (8) with V_INTR_VECTOR (39:32) = a pending
    /// external interrupt, V_NMI (11) = NMI pending, V_NMI_MASK (12) = NMIs blocked.
    pub const VINTR_CTRL: usize = esvm_arch::vmsa::offset::VINTR_CTRL;
    pub const V_IRQ: u64 = 1 << 8;
    pub const V_NMI: u64 = 1 << 11;
    pub const V_NMI_MASK: u64 = 1 << 12;
    pub const V_INTR_VECTOR_SHIFT: u32 = 32;
    /// A quadword AMD's layout leaves reserved (0x3F0), esvm-defined: bit 0 = interrupt
    /// shadow (after STI / MOV SS), bit 1 = halted.
    pub const RUN_STATE: usize = 0x3f0;
    pub const RUN_SHADOW: u64 = 1 << 0;
    pub const RUN_HALTED: u64 = 1 << 1;
}

/// Per-vCPU SEV-ES state.
pub(crate) struct SevCpu {
    pub c_bit: u8,
    pub intercepts: VcIntercepts,
    /// `1 << c_bit`.
    pub cmask: u64,
    pub ghcb_msr: u64,
    /// The memory's conversion generation and the last one this vCPU's TLB reflects.
    gen: *const AtomicU64,
    seen_gen: u64,
    /// Conversions this vCPU made (see [`Cpu::sev_conversions`]).
    conversions: u64,
    /// Private backing base, once encryption is on (null before).
    private: *mut u8,
    /// Why the configuration is unusable (reported as a shutdown at the first run).
    config_error: Option<String>,
    /// The vCPU's attention flags are registered for conversion notices.
    watching: bool,
}

impl SevCpu {
    pub(crate) fn new(config: &CpuConfig, mem: &PhysMemory) -> Option<Box<SevCpu>> {
        let c = config.sev_es?;
        let config_error = if !(32..=51).contains(&c.c_bit) {
            Some(format!(
                "SEV-ES C-bit position {} is not supported: it must be in 32..=51",
                c.c_bit
            ))
        } else if (1u64 << c.c_bit) < mem.size() {
            Some(format!(
                "SEV-ES C-bit position {} is an address bit of guest RAM ({:#x} bytes); choose a higher bit",
                c.c_bit,
                mem.size()
            ))
        } else {
            None
        };
        let gen = mem.conversion_gen();
        Some(Box::new(SevCpu {
            c_bit: c.c_bit,
            intercepts: c.intercepts,
            cmask: 1u64 << c.c_bit.min(63),
            ghcb_msr: 0,
            gen,
            // SAFETY: `gen` points into `mem`, which the vCPU keeps alive.
            seen_gen: unsafe { (*gen).load(Ordering::Acquire) },
            conversions: 0,
            private: std::ptr::null_mut(),
            config_error,
            watching: false,
        }))
    }
}

impl Cpu {
    /// The SEV-ES configuration, if this vCPU runs in SEV-ES mode.
    pub fn sev_es(&self) -> Option<SevEsConfig> {
        self.sev.as_ref().map(|s| SevEsConfig {
            c_bit: s.c_bit,
            intercepts: s.intercepts,
        })
    }

    /// The GHCB MSR (0xC001_0130): host-visible state, as the VMCB's GHCB field on hardware.
    /// 0 outside SEV-ES mode.
    pub fn ghcb_msr(&self) -> u64 {
        self.sev.as_ref().map_or(0, |s| s.ghcb_msr)
    }

    /// Set the GHCB MSR (the hypervisor's MSR-protocol responses). Ignored outside SEV-ES
    /// mode.
    pub fn set_ghcb_msr(&mut self, value: u64) {
        if let Some(s) = &mut self.sev {
            s.ghcb_msr = value;
        }
    }

    /// Save the vCPU into an SEV-ES save area (the VMSA), as hardware does at VMEXIT.
    ///
    /// Registers, segments (hidden parts included), descriptor tables, CR0/2/3/4, EFER, CPL,
    /// the VMSA's MSRs (STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_*, PAT, TSC_AUX),
    /// x87/SSE state, XCR0, DR0-3/6/7 go to their architectural offsets; CR8 to V_TPR
    /// (VINTR_CTRL bits 7:0); SEV_FEATURES gets bit [`SEV_FEATURE_ES`]. The pending-event state
    /// (see [`vmsa_layout`]):
    /// - a pending exception → EVENT_INJ (valid, type 3, vector, error code valid + error
    ///   code in bits 63:32). A CR2 value the exception would load on delivery is stored as
    ///   CR2 itself (delivery is the vCPU's very next step, so the guest cannot tell);
    /// - a pending external interrupt → VINTR_CTRL V_IRQ + V_INTR_VECTOR; NMI pending /
    ///   NMIs blocked → VINTR_CTRL bits 11 / 12;
    /// - interrupt shadow and halted → bits 0 / 1 of the reserved quadword at 0x3F0.
    ///
    /// Not in the VMSA (host-visible, tracked by the hypervisor): the GHCB MSR, the APIC
    /// base, the TSC. Fields esvm does not model (YMM, PKRU, XSS, x87 CS/DS) are 0.
    pub fn to_vmsa(&self) -> Vmsa {
        use vmsa_layout::*;
        let mut v = Vmsa::default();
        v.set_regs(&self.regs());
        let mut s = self.sregs();
        if let Some(cr2) = self.ev_exception.and_then(|e| e.cr2) {
            s.cr2 = cr2;
        }
        v.set_sregs(&s);
        v.set_u8(offset::CPL, self.cpl);
        v.set_msrs(&self.msrs);
        v.set_fpu(&self.fpu());
        v.set_debug(&self.dr);
        v.set_xcr0(self.xcr0);
        v.set_u64(offset::SEV_FEATURES, 1 << SEV_FEATURE_ES);
        if let Some(e) = self.ev_exception {
            let mut inj = EVENT_VALID | EVENT_TYPE_EXCEPTION | e.vector as u64;
            if let Some(ec) = e.error_code {
                inj |= EVENT_EV | ((ec as u64) << 32);
            }
            v.set_u64(EVENT_INJ, inj);
        }
        let mut vintr = v.u64_at(VINTR_CTRL);
        if let Some(vec) = self.ev_interrupt {
            vintr |= V_IRQ | ((vec as u64) << V_INTR_VECTOR_SHIFT);
        }
        if self.nmi_pending {
            vintr |= V_NMI;
        }
        if self.nmi_masked {
            vintr |= V_NMI_MASK;
        }
        v.set_u64(VINTR_CTRL, vintr);
        let mut run = 0;
        if self.shadow {
            run |= RUN_SHADOW;
        }
        if self.halted {
            run |= RUN_HALTED;
        }
        v.set_u64(RUN_STATE, run);
        v
    }

    /// Load the vCPU from an SEV-ES save area (the inverse of [`Cpu::to_vmsa`]:
    /// `to_vmsa` after `load_vmsa(v)` gives `v` back for every `v` that `to_vmsa` produced).
    /// The APIC base, TSC and GHCB MSR stay as they are. Nothing changes if the VMSA is
    /// refused (SEV_FEATURES without the ES bit or with others, malformed event fields,
    /// an invalid XCR0 or MXCSR, inconsistent control registers or CPL).
    pub fn load_vmsa(&mut self, v: &Vmsa) -> Result<(), CpuError> {
        use vmsa_layout::*;
        let bad = |what: String| Err(CpuError::InvalidState(format!("VMSA: {what}")));
        if v.sev_features() != 1 << SEV_FEATURE_ES {
            return bad(format!(
                "SEV_FEATURES {:#x} is not an SEV-ES save area of this model (expected {:#x})",
                v.sev_features(),
                1u64 << SEV_FEATURE_ES
            ));
        }
        let inj = v.u64_at(EVENT_INJ);
        let exception = if inj & EVENT_VALID != 0 {
            if inj & 0x7fff_f700 != EVENT_TYPE_EXCEPTION & 0x7fff_f700 {
                return bad(format!(
                    "EVENT_INJ {inj:#x} is not an exception (type 3, reserved bits clear)"
                ));
            }
            if inj & EVENT_EV == 0 && inj >> 32 != 0 {
                return bad(format!(
                    "EVENT_INJ {inj:#x} has an error code without the error-code-valid bit"
                ));
            }
            Some(PendingException {
                vector: inj as u8,
                error_code: (inj & EVENT_EV != 0).then_some((inj >> 32) as u32),
                cr2: None,
            })
        } else if inj != 0 {
            return bad(format!("EVENT_INJ {inj:#x} has bits set but is not valid"));
        } else {
            None
        };
        let vintr = v.u64_at(VINTR_CTRL);
        let known = 0xf | V_IRQ | V_NMI | V_NMI_MASK | (0xff << V_INTR_VECTOR_SHIFT);
        if vintr & !known != 0 || (vintr & V_IRQ == 0 && vintr >> V_INTR_VECTOR_SHIFT != 0) {
            return bad(format!(
                "VINTR_CTRL {vintr:#x} has bits this model does not use (V_TPR above 15, a \
                 vector without V_IRQ, ...)"
            ));
        }
        let run = v.u64_at(RUN_STATE);
        if run & !(RUN_SHADOW | RUN_HALTED) != 0 {
            return bad(format!("run-state word {run:#x} at 0x3f0 has unknown bits"));
        }
        let fpu = v.fpu();
        if fpu.mxcsr & !crate::exec::sse::MXCSR_MASK != 0 {
            return bad(format!("MXCSR {:#x} sets reserved bits", fpu.mxcsr));
        }
        let xcr0 = v.xcr0();
        if xcr0 & 1 == 0 || xcr0 & !3 != 0 {
            return bad(format!(
                "XCR0 {xcr0:#x}: only x87 (bit 0, required) and SSE (bit 1) are supported"
            ));
        }
        let mut sregs = v.sregs();
        sregs.apic_base = self.apic_base;
        let cpl = v.u8_at(offset::CPL);
        if cpl > 3 || (sregs.cr0 & esvm_arch::bits::cr0::PE == 0 && cpl != 0) {
            return bad(format!("CPL {cpl} is not possible in this mode"));
        }
        let snap = VcpuSnapshot {
            version: VcpuSnapshot::VERSION,
            regs: v.regs(),
            sregs,
            fpu,
            xcr0,
            msrs: v.msrs(),
            debug: v.debug(),
            events: PendingEvents {
                exception,
                interrupt: (vintr & V_IRQ != 0).then_some((vintr >> V_INTR_VECTOR_SHIFT) as u8),
                nmi_pending: vintr & V_NMI != 0,
                nmi_masked: vintr & V_NMI_MASK != 0,
                interrupt_shadow: run & RUN_SHADOW != 0,
                halted: run & RUN_HALTED != 0,
            },
            tsc: self.tsc(),
            // Not in the VMSA: the generator goes on from this vCPU's state.
            rdrand: None,
        };
        self.restore(&snap)?;
        if self.mode != Mode::Real {
            self.set_cpl(cpl);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ internals

    /// At the start of [`Cpu::run`]: an unusable configuration is a shutdown; otherwise
    /// bring the TLB up to date with page conversions.
    #[cold]
    pub(crate) fn sev_enter(&mut self) -> Option<Exit> {
        let s = self.sev.as_mut()?;
        if let Some(reason) = &s.config_error {
            let reason = reason.clone();
            self.shutdown = Some(reason.clone());
            return Some(Exit::Shutdown { reason });
        }
        if !s.watching {
            s.watching = true;
            self.mem.watch_conversions(&self.kick);
        }
        self.sev_poll();
        None
    }

    /// After a conversion notice ([`crate::KICK_SEV`], seen at a block boundary) and at each
    /// [`Cpu::run`]: flush the TLB if pages changed view since it was last flushed.
    #[inline]
    pub(crate) fn sev_poll(&mut self) {
        if let Some(s) = &mut self.sev {
            // SAFETY: `gen` points into `self.mem`, alive as long as `self`.
            let g = unsafe { (*s.gen).load(Ordering::Acquire) };
            if g != s.seen_gen {
                s.seen_gen = g;
                self.tlb.flush();
                self.cache.flush_lookup();
            }
        }
    }

    /// This vCPU converted page `page`: drop the TLB entries that point at its old view now
    /// and end the block after this instruction.
    ///
    /// If this conversion is the only one since the TLB last caught up with the conversion
    /// generation, only the data entries of `page` can be stale (every other entry points at
    /// the backing that still holds its page's content), so only they go. Instruction entries
    /// and decoded-block lookups hold no view: code is always fetched through
    /// [`Cpu::sev_fetch`] when a block is looked up or built, and the conversion bumped the
    /// page's code epoch, which every cached lookup checks. Otherwise (other vCPUs or the host
    /// converted pages meanwhile) everything is dropped, as [`Cpu::sev_poll`] does.
    #[cold]
    fn sev_converted(&mut self, page: u64) {
        self.pending |= P_FLUSH;
        let Some(s) = &mut self.sev else {
            return;
        };
        s.conversions += 1;
        // SAFETY: as in `sev_poll`.
        let g = unsafe { (*s.gen).load(Ordering::Acquire) };
        let only_ours = g == s.seen_gen.wrapping_add(1);
        s.seen_gen = g;
        if only_ours {
            self.tlb.flush_gpn(page);
        } else {
            self.tlb.flush();
            self.cache.flush_lookup();
        }
    }

    /// How many page conversions this vCPU has made (0 outside SEV-ES mode). A caller that
    /// holds a host address from the TLB compares it before and after translating something
    /// else: unchanged means the address still holds its page's content.
    #[inline]
    pub(crate) fn sev_conversions(&self) -> u64 {
        self.sev.as_ref().map_or(0, |s| s.conversions)
    }

    /// A fatal condition of the SEV-ES model: the vCPU shuts down with `reason`.
    #[cold]
    pub(crate) fn sev_fatal(&mut self, reason: String) -> Stop {
        self.shutdown = Some(reason.clone());
        self.exit = Some(Exit::Shutdown { reason });
        Stop::Exit
    }

    /// The C-bit mask (0 outside SEV-ES mode).
    #[inline]
    pub(crate) fn sev_cmask(&self) -> u64 {
        self.sev.as_ref().map_or(0, |s| s.cmask)
    }

    /// Make RAM page `page` hold its content in `view` (converting it if needed) and return
    /// the base of that view's backing (RAM or the private backing).
    pub(crate) fn sev_view(&mut self, page: u64, view: View) -> R<*mut u8> {
        // Post-copy: every SEV-ES RAM access resolves its page here; a page that has not
        // arrived is waited for before it is converted or touched.
        self.wait_present(page)?;
        match self.mem.make_view(page, view) {
            None if view == View::Shared => Ok(self.ram),
            None => Err(self.sev_fatal(format!(
                "SEV-ES guest accessed guest-physical page {:#x} through the C-bit, but guest \
                 memory encryption is not enabled (PhysMemory::enable_encryption, i.e. \
                 LAUNCH_START, must run before the vCPU)",
                page << 12
            ))),
            Some(converted) => {
                if converted {
                    self.sev_converted(page);
                }
                if view == View::Shared {
                    return Ok(self.ram);
                }
                let s = self.sev.as_mut().expect("SEV-ES vCPU");
                if s.private.is_null() {
                    s.private = self.mem.private_base();
                }
                Ok(s.private)
            }
        }
    }

    /// Instruction fetch at `gpa` (as translated, possibly tagged with the C-bit): strip the
    /// tag and make the page Private (code is always fetched through the private view).
    /// Addresses outside RAM are returned as they are (the caller reports them).
    pub(crate) fn sev_fetch(&mut self, gpa: u64) -> R<u64> {
        let g = gpa & !self.sev_cmask();
        if g < self.ram_size {
            self.sev_view(g >> 12, View::Private)?;
        }
        Ok(g)
    }

    /// Where decoded code is copied from: the private backing in SEV-ES mode (after
    /// [`Cpu::sev_fetch`]), else RAM.
    #[inline]
    pub(crate) fn code_src(&self) -> *mut u8 {
        match &self.sev {
            Some(s) if !s.private.is_null() => s.private,
            _ => self.ram,
        }
    }

    /// #VC with exit code `code` ([`exit_code`]) as its error code. Every exit code the
    /// CPU raises fits the 32-bit error code (`esvm_abi::exit_code` tests it).
    #[inline]
    pub(crate) fn vc<T>(code: u64) -> R<T> {
        debug_assert!(code <= u64::from(u32::MAX), "#VC exit code {code:#x}");
        Err(Stop::Exc(Exc::ec(vector::VC, code as u32)))
    }
}

#[cfg(test)]
mod tests;
