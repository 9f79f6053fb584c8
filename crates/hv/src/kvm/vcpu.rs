//! A KVM vCPU behind the [`Vcpu`] trait.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use esvm_arch::bits::{cr0, rflags, vector};
use esvm_arch::msr::IA32_TIME_STAMP_COUNTER;
use esvm_arch::{DebugRegs, FpuState, PendingEvents, PendingException, Regs, SpecialRegs};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_mp_state, kvm_msr_entry, kvm_run, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs,
    KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO,
    KVM_EXIT_IO_IN, KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MAX_MSR_ENTRIES, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_PAYLOAD,
};
use kvm_ioctls::{Cap, VcpuFd};

use super::convert::{self, set_exception};
use super::kick::{self, KickState, KvmKicker};
use super::{kvm_err, KvmError, VmInner};
use crate::{BackendKind, HvError, Kicker, Result, Vcpu, VmExit};

/// MXCSR_MASK to report when the vCPU's FXSAVE image cannot be read (the SDM's value for a
/// zero mask field: every MXCSR bit but DAZ writable).
const DEFAULT_MXCSR_MASK: u32 = 0xffbf;

/// How far past a written TSC value a read-back may be and still count as honoured (about
/// 20 s at 3 GHz).
const TSC_SLACK: u64 = 1 << 36;

/// Index of the low half of XSTATE_BV in `kvm_xsave.region` (byte 512).
const XSTATE_BV_WORD: usize = 512 / 4;
/// XSTATE_BV bits of the x87 and SSE components.
const XFEATURE_X87_SSE: u32 = 0x3;

/// The 512-byte FXSAVE-format legacy area of an XSAVE image. KVM fills it completely (with
/// init values for components not in XSTATE_BV).
fn legacy_area(x: &kvm_bindings::kvm_xsave) -> [u8; esvm_arch::fpu::FXSAVE_SIZE] {
    let mut img = [0u8; esvm_arch::fpu::FXSAVE_SIZE];
    for (chunk, w) in img.chunks_exact_mut(4).zip(&x.region) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    img
}

/// An exit, decoded from `kvm_run` into owned values.
#[derive(Debug, Clone)]
enum Exit {
    Io {
        port: u16,
        input: bool,
        size: usize,
        count: usize,
        offset: usize,
    },
    Mmio {
        addr: u64,
        len: usize,
        write: bool,
    },
    RdMsr {
        index: u32,
    },
    WrMsr {
        index: u32,
        value: u64,
    },
    Hlt,
    Shutdown,
    IrqWindowOpen,
    Interrupted,
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    Internal {
        suberror: u32,
        data: Vec<u64>,
    },
    SystemEvent {
        kind: u32,
    },
    Other(u32),
}

/// A string I/O exit being handed to the VMM one element at a time.
#[derive(Debug, Clone, Copy)]
struct RepIo {
    port: u16,
    input: bool,
    size: usize,
    count: usize,
    offset: usize,
    next: usize,
}

/// Decode the exit KVM left in `run`. `run_size` bounds the I/O data area.
fn classify(run: &kvm_run, run_size: usize) -> Result<Exit> {
    Ok(match run.exit_reason {
        KVM_EXIT_IO => {
            // SAFETY: exit_reason KVM_EXIT_IO says the `io` member of the union is valid.
            let io = unsafe { run.__bindgen_anon_1.io };
            let size = io.size as usize;
            let count = io.count as usize;
            let offset = io.data_offset as usize;
            let fits = offset
                .checked_add(size.saturating_mul(count))
                .is_some_and(|end| end <= run_size);
            if !matches!(size, 1 | 2 | 4) || count == 0 || !fits {
                return Err(internal(format!(
                    "KVM reported a malformed I/O exit (port {:#x}, size {size}, count {count}, \
                     data offset {offset:#x})",
                    io.port
                )));
            }
            Exit::Io {
                port: io.port,
                input: io.direction as u32 == KVM_EXIT_IO_IN,
                size,
                count,
                offset,
            }
        }
        KVM_EXIT_MMIO => {
            // SAFETY: exit_reason KVM_EXIT_MMIO says the `mmio` member of the union is valid.
            let mmio = unsafe { run.__bindgen_anon_1.mmio };
            if mmio.len == 0 || mmio.len > 8 {
                return Err(internal(format!(
                    "KVM reported an MMIO exit of {} bytes at {:#x}",
                    mmio.len, mmio.phys_addr
                )));
            }
            Exit::Mmio {
                addr: mmio.phys_addr,
                len: mmio.len as usize,
                write: mmio.is_write != 0,
            }
        }
        KVM_EXIT_X86_RDMSR | KVM_EXIT_X86_WRMSR => {
            // SAFETY: these exit reasons say the `msr` member of the union is valid.
            let msr = unsafe { run.__bindgen_anon_1.msr };
            if run.exit_reason == KVM_EXIT_X86_RDMSR {
                Exit::RdMsr { index: msr.index }
            } else {
                Exit::WrMsr {
                    index: msr.index,
                    value: msr.data,
                }
            }
        }
        KVM_EXIT_HLT => Exit::Hlt,
        KVM_EXIT_SHUTDOWN => Exit::Shutdown,
        KVM_EXIT_IRQ_WINDOW_OPEN => Exit::IrqWindowOpen,
        KVM_EXIT_INTR => Exit::Interrupted,
        KVM_EXIT_FAIL_ENTRY => {
            // SAFETY: exit_reason KVM_EXIT_FAIL_ENTRY says `fail_entry` is valid.
            let f = unsafe { run.__bindgen_anon_1.fail_entry };
            Exit::FailEntry {
                reason: f.hardware_entry_failure_reason,
                cpu: f.cpu,
            }
        }
        KVM_EXIT_INTERNAL_ERROR => {
            // SAFETY: exit_reason KVM_EXIT_INTERNAL_ERROR says `internal` is valid.
            let i = unsafe { run.__bindgen_anon_1.internal };
            let n = (i.ndata as usize).min(i.data.len());
            Exit::Internal {
                suberror: i.suberror,
                data: i.data[..n].to_vec(),
            }
        }
        KVM_EXIT_SYSTEM_EVENT => {
            // SAFETY: exit_reason KVM_EXIT_SYSTEM_EVENT says `system_event` is valid.
            let e = unsafe { run.__bindgen_anon_1.system_event };
            Exit::SystemEvent { kind: e.type_ }
        }
        other => Exit::Other(other),
    })
}

fn internal(message: String) -> HvError {
    HvError::Internal {
        backend: BackendKind::Kvm,
        message,
    }
}

fn errno_is_interrupt(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::EINTR | libc::EAGAIN)
}

/// A vCPU of a [`super::KvmVm`].
pub struct KvmVcpu {
    id: u32,
    /// In a RefCell so `&self` accessors can finish an incomplete instruction (KVM_RUN needs
    /// `&mut VcpuFd`). Never borrowed across calls.
    fd: RefCell<VcpuFd>,
    vm: Arc<VmInner>,
    kick: Arc<KickState>,
    mxcsr_mask: u32,
    /// FPU state goes through KVM_GET/SET_XSAVE (whose legacy area is the FXSAVE image);
    /// KVM_GET/SET_FPU is the fallback. (Some KVMs lose MXCSR in KVM_GET_FPU.)
    xsave: bool,
    /// The last exit (I/O, MMIO, MSR) is completed by KVM on the next KVM_RUN.
    incomplete: Cell<bool>,
    /// A completion-only KVM_RUN produced a new exit, which the next `run` returns.
    replay: Cell<bool>,
    /// The last exit was an MSR exit: `msr_fault` goes to `kvm_run.msr.error` before entry.
    msr_exit: Cell<bool>,
    msr_fault: bool,
    /// String I/O being handed out element by element.
    rep: Cell<Option<RepIo>>,
    /// Without the in-kernel irqchip: an interrupt waiting for the guest to accept it.
    pending_irq: Option<u8>,
    /// Without the in-kernel irqchip: stopped at HLT until the VMM runs the vCPU again.
    halted: bool,
}

impl KvmVcpu {
    pub(super) fn new(id: u32, vm: Arc<VmInner>, cpuid: &[kvm_cpuid_entry2]) -> Result<Self> {
        kick::ensure_handler()?;
        let mut fd = vm
            .fd
            .create_vcpu(id as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = CpuId::from_entries(cpuid).map_err(KvmError::CpuidTable)?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        // With the in-kernel LAPIC, application processors start waiting for INIT/SIPI;
        // esvm starts every vCPU runnable (the VMM sets its state), as the emu backend does.
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        let xsave = vm.fd.check_extension(Cap::Xsave);
        let mxcsr_mask = Self::read_mxcsr_mask(&fd);
        let run: *mut kvm_run = fd.get_kvm_run();
        // SAFETY: `run` points at the vCPU's kvm_run mapping (valid while `fd` lives); we
        // only take the address of one field, without creating a reference.
        let immediate_exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        // SAFETY: `immediate_exit` is that byte of the kvm_run mapping, which the VcpuFd
        // moved into this vCPU keeps mapped until the vCPU is dropped, and `Drop for
        // KvmVcpu` detaches the kick state first.
        let kick = Arc::new(unsafe { KickState::new(immediate_exit) });
        Ok(KvmVcpu {
            id,
            fd: RefCell::new(fd),
            vm,
            kick,
            mxcsr_mask,
            xsave,
            incomplete: Cell::new(false),
            replay: Cell::new(false),
            msr_exit: Cell::new(false),
            msr_fault: false,
            rep: Cell::new(None),
            pending_irq: None,
            halted: false,
        })
    }

    /// The MXCSR_MASK the vCPU's FXSAVE reports (bytes 28..32 of the XSAVE legacy area).
    fn read_mxcsr_mask(fd: &VcpuFd) -> u32 {
        match fd.get_xsave() {
            Ok(x) if x.region[7] != 0 => x.region[7],
            _ => DEFAULT_MXCSR_MASK,
        }
    }

    /// Write the VMM's verdict on the last MSR exit into kvm_run before re-entry.
    fn apply_msr_fault(&self, run: &mut kvm_run) {
        if self.msr_exit.replace(false) {
            // The last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the union member KVM
            // reads back (a plain field write, no unsafe needed).
            run.__bindgen_anon_1.msr.error = self.msr_fault as u8;
        }
    }

    /// Let KVM finish an instruction that exited to us (I/O, MMIO, MSR), without running any
    /// further guest code: KVM_RUN with `immediate_exit` set, as the KVM API documents for
    /// saving state after such exits.
    fn settle(&self) -> Result<()> {
        if self.replay.get() {
            // The instruction is waiting for the VMM's data again; state is as KVM has it.
            return Ok(());
        }
        if !self.incomplete.get() {
            return Ok(());
        }
        if let Some(rep) = self.rep.get() {
            if rep.next + 1 < rep.count {
                return Err(HvError::InvalidState(format!(
                    "vCPU {} is in the middle of a string I/O instruction (port {:#x}, element \
                     {} of {}): run it until the instruction completes before reading or \
                     writing its state",
                    self.id,
                    rep.port,
                    rep.next + 1,
                    rep.count
                )));
            }
            // The VMM has had every element: KVM can complete the instruction.
            self.rep.set(None);
        }
        let mut fd = self.fd.borrow_mut();
        self.apply_msr_fault(fd.get_kvm_run());
        self.kick.set_immediate_exit(true);
        let r = fd.run().map(|_| ());
        self.kick.set_immediate_exit(false);
        self.incomplete.set(false);
        match r {
            Err(e) if errno_is_interrupt(&e) => Ok(()),
            Err(e) => Err(kvm_err("KVM_RUN (completing an exit)")(e)),
            Ok(()) => {
                // Completing the instruction needs more from the VMM (e.g. the second half of
                // a page-crossing MMIO access): hand that exit out on the next run().
                self.replay.set(true);
                Ok(())
            }
        }
    }

    /// Enter the guest once. Returns the decoded exit.
    fn enter(&mut self) -> Result<Exit> {
        kick::ensure_unblocked_here();
        let fd = self.fd.get_mut();
        if self.msr_exit.replace(false) {
            // As in apply_msr_fault: the last exit was an MSR exit.
            fd.get_kvm_run().__bindgen_anon_1.msr.error = self.msr_fault as u8;
        }
        self.kick.enter();
        let r = fd.run().map(|_| ());
        self.kick.leave();
        self.incomplete.set(false);
        match r {
            Ok(()) => classify(fd.get_kvm_run(), self.vm.run_size),
            Err(e) if errno_is_interrupt(&e) => {
                self.kick.acknowledge();
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(kvm_err("KVM_RUN")(e)),
        }
    }

    /// Without the in-kernel irqchip: inject a queued interrupt if the guest accepts one now,
    /// otherwise ask KVM to exit when it does.
    fn prepare_entry(&mut self) -> Result<()> {
        if self.vm.irqchip {
            return Ok(());
        }
        // The VMM runs the vCPU again: a HLT it stopped at is over.
        self.halted = false;
        let want_window = match self.pending_irq {
            None => false,
            Some(v) => {
                if self.window_open_raw()? {
                    let fd = self.fd.get_mut();
                    let mut ev = fd
                        .get_vcpu_events()
                        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
                    ev.interrupt.injected = 1;
                    ev.interrupt.nr = v;
                    ev.interrupt.soft = 0;
                    ev.flags = 0;
                    if ev.exception.pending != 0 {
                        ev.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
                    }
                    fd.set_vcpu_events(&ev)
                        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
                    self.pending_irq = None;
                    false
                } else {
                    true
                }
            }
        };
        self.fd.get_mut().get_kvm_run().request_interrupt_window = want_window as u8;
        Ok(())
    }

    /// RFLAGS.IF set, no interrupt shadow, and no event being delivered.
    fn window_open_raw(&self) -> Result<bool> {
        let fd = self.fd.borrow();
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let ev = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(regs.rflags & rflags::IF != 0
            && ev.interrupt.shadow == 0
            && ev.interrupt.injected == 0
            && ev.exception.injected == 0
            && ev.exception.pending == 0
            && ev.nmi.injected == 0)
    }

    /// Turn a decoded exit into the trait's exit, borrowing kvm_run for data.
    fn deliver(&mut self, exit: Exit) -> Result<VmExit<'_>> {
        match exit {
            Exit::Io {
                port,
                input,
                size,
                count,
                offset,
            } => {
                self.incomplete.set(true);
                let rep = RepIo {
                    port,
                    input,
                    size,
                    count,
                    offset,
                    next: 0,
                };
                self.rep.set((count > 1).then_some(rep));
                Ok(self.io_view(rep))
            }
            Exit::Mmio { addr, len, write } => {
                self.incomplete.set(true);
                let run = self.fd.get_mut().get_kvm_run();
                // SAFETY: the exit is KVM_EXIT_MMIO, so `mmio` is the valid union member.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let data = &mut mmio.data[..len];
                Ok(if write {
                    VmExit::MmioWrite { addr, data }
                } else {
                    VmExit::MmioRead { addr, data }
                })
            }
            Exit::RdMsr { index } => {
                self.incomplete.set(true);
                self.msr_exit.set(true);
                self.msr_fault = false;
                let run = self.fd.get_mut().get_kvm_run();
                // SAFETY: the exit is KVM_EXIT_X86_RDMSR, so `msr` is the valid union member.
                let msr = unsafe { &mut run.__bindgen_anon_1.msr };
                Ok(VmExit::RdMsr {
                    index,
                    value: &mut msr.data,
                    fault: &mut self.msr_fault,
                })
            }
            Exit::WrMsr { index, value } => {
                self.incomplete.set(true);
                self.msr_exit.set(true);
                self.msr_fault = false;
                Ok(VmExit::WrMsr {
                    index,
                    value,
                    fault: &mut self.msr_fault,
                })
            }
            Exit::Hlt => {
                if !self.vm.irqchip {
                    self.halted = true;
                }
                Ok(VmExit::Hlt)
            }
            Exit::Shutdown => Ok(VmExit::Shutdown {
                reason: format!("triple fault (KVM_EXIT_SHUTDOWN){}", self.where_now()),
            }),
            Exit::SystemEvent { kind } => Ok(VmExit::Shutdown {
                reason: format!("KVM system event {kind} (shutdown/reset request)"),
            }),
            Exit::Interrupted | Exit::IrqWindowOpen => Ok(VmExit::Interrupted),
            Exit::FailEntry { reason, cpu } => Err(internal(format!(
                "VM entry failed on vCPU {} (hardware entry failure reason {reason:#x}, host \
                 cpu {cpu}){}: the vCPU state is not valid for the hardware",
                self.id,
                self.where_now()
            ))),
            Exit::Internal { suberror, data } => {
                let what = match suberror {
                    KVM_INTERNAL_ERROR_EMULATION => {
                        "KVM could not emulate an instruction (on the software-assisted KVM \
                         this happens for ring-0 INT n/INT3, x87/SSE/XSAVE, SYSCALL and a few \
                         others; run such guests on the emu backend)"
                    }
                    KVM_INTERNAL_ERROR_SIMUL_EX => "an exception occurred while delivering one",
                    KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit",
                    _ => "unknown internal error",
                };
                Err(internal(format!(
                    "vCPU {}: KVM internal error {suberror} ({what}){}; data {data:x?}",
                    self.id,
                    self.where_now()
                )))
            }
            Exit::Other(reason) => Err(internal(format!(
                "vCPU {}: unexpected KVM exit reason {reason}{}",
                self.id,
                self.where_now()
            ))),
        }
    }

    fn io_view(&mut self, rep: RepIo) -> VmExit<'_> {
        let run: *mut kvm_run = self.fd.get_mut().get_kvm_run();
        let start = rep.offset + rep.next * rep.size;
        // SAFETY: classify() checked offset + size * count <= the kvm_run mapping size, and
        // next < count; the slice borrows `self` mutably, so the mapping (owned by the
        // VcpuFd) outlives it and nothing else accesses kvm_run meanwhile.
        let data = unsafe { std::slice::from_raw_parts_mut((run as *mut u8).add(start), rep.size) };
        if rep.input {
            VmExit::IoIn {
                port: rep.port,
                data,
            }
        } else {
            VmExit::IoOut {
                port: rep.port,
                data,
            }
        }
    }

    /// " at cs:rip ..." for error messages (empty if the registers cannot be read).
    fn where_now(&self) -> String {
        let fd = self.fd.borrow();
        match (fd.get_regs(), fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                " at {:#x}:{:#x} (cpl {}, cr0 {:#x}, efer {:#x})",
                s.cs.selector, r.rip, s.ss.dpl, s.cr0, s.efer
            ),
            _ => String::new(),
        }
    }

    fn msr_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
        items.chunks(KVM_MAX_MSR_ENTRIES)
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Kickers may outlive us: stop them touching kvm_run before it is unmapped.
        self.kick.detach();
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        if let Some(mut rep) = self.rep.take() {
            rep.next += 1;
            if rep.next < rep.count {
                self.rep.set(Some(rep));
                return Ok(self.io_view(rep));
            }
        }
        if self.replay.replace(false) {
            let exit = classify(self.fd.get_mut().get_kvm_run(), self.vm.run_size)?;
            return self.deliver(exit);
        }
        loop {
            self.prepare_entry()?;
            let exit = self.enter()?;
            if matches!(exit, Exit::IrqWindowOpen) && self.pending_irq.is_some() {
                continue;
            }
            return self.deliver(exit);
        }
    }

    fn get_regs(&self) -> Result<Regs> {
        self.settle()?;
        let r = self
            .fd
            .borrow()
            .get_regs()
            .map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.settle()?;
        self.fd
            .get_mut()
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(kvm_err("KVM_SET_REGS"))
    }

    fn get_sregs(&self) -> Result<SpecialRegs> {
        self.settle()?;
        let s = self
            .fd
            .borrow()
            .get_sregs()
            .map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()> {
        self.settle()?;
        self.fd
            .get_mut()
            .set_sregs(&convert::sregs_to_kvm(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))
    }

    fn get_fpu(&self) -> Result<FpuState> {
        self.settle()?;
        let fd = self.fd.borrow();
        if self.xsave {
            let x = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
            return Ok(FpuState::from_fxsave(&legacy_area(&x)));
        }
        let f = fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        Ok(convert::fpu_from_kvm(&f, self.mxcsr_mask))
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        self.settle()?;
        let fd = self.fd.get_mut();
        if self.xsave {
            let mut x = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
            let mut img = fpu.to_fxsave();
            // MXCSR_MASK is read-only CPU information: keep what the vCPU reports.
            img[28..32].copy_from_slice(&x.region[7].to_le_bytes());
            for (i, w) in img.chunks_exact(4).enumerate() {
                x.region[i] = u32::from_le_bytes(w.try_into().expect("4-byte chunk"));
            }
            // XSTATE_BV (header bytes 512..520): the x87 and SSE components are now live.
            x.region[XSTATE_BV_WORD] |= XFEATURE_X87_SSE;
            // SAFETY: `x` is a 4096-byte kvm_xsave obtained from KVM_GET_XSAVE on this vCPU;
            // esvm never enables dynamic XSTATE features (KVM_CAP_XSAVE2), so KVM_SET_XSAVE
            // reads exactly this struct.
            return unsafe { fd.set_xsave(&x) }.map_err(|source| {
                KvmError::Xsave {
                    mxcsr: fpu.mxcsr,
                    mxcsr_mask: self.mxcsr_mask,
                    source,
                }
                .into()
            });
        }
        fd.set_fpu(&convert::fpu_to_kvm(fpu))
            .map_err(kvm_err("KVM_SET_FPU"))
    }

    fn get_xcr0(&self) -> Result<u64> {
        self.settle()?;
        let x = self
            .fd
            .borrow()
            .get_xcrs()
            .map_err(kvm_err("KVM_GET_XCRS"))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        x.xcrs[..n]
            .iter()
            .find(|e| e.xcr == 0)
            .map(|e| e.value)
            .ok_or_else(|| internal("KVM_GET_XCRS did not report XCR0".into()))
    }

    fn set_xcr0(&mut self, xcr0: u64) -> Result<()> {
        self.settle()?;
        let mut x = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        x.xcrs[0].xcr = 0;
        x.xcrs[0].value = xcr0;
        self.fd
            .get_mut()
            .set_xcrs(&x)
            .map_err(|source| KvmError::Xcr0 { xcr0, source }.into())
    }

    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>> {
        self.settle()?;
        let fd = self.fd.borrow();
        let mut out = Vec::with_capacity(indices.len());
        for chunk in Self::msr_chunks(indices) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(KvmError::MsrList)?;
            let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
            if n < chunk.len() {
                return Err(HvError::InvalidState(format!(
                    "MSR {:#x} is not known to the KVM vCPU (KVM_GET_MSRS stopped there)",
                    chunk[n]
                )));
            }
            out.extend(msrs.as_slice().iter().map(|e| e.data));
        }
        Ok(out)
    }

    fn set_msrs(&mut self, entries: &[(u32, u64)]) -> Result<()> {
        self.settle()?;
        let fd = self.fd.get_mut();
        for chunk in Self::msr_chunks(entries) {
            let list: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&list).map_err(KvmError::MsrList)?;
            let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n < chunk.len() {
                let (index, value) = chunk[n];
                return Err(HvError::InvalidState(format!(
                    "KVM_SET_MSRS refused MSR {index:#x} = {value:#x}: the MSR is unknown to \
                     the KVM vCPU or the value is invalid for it"
                )));
            }
        }
        Ok(())
    }

    fn get_debug_regs(&self) -> Result<DebugRegs> {
        self.settle()?;
        let d = self
            .fd
            .borrow()
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        Ok(convert::debugregs_from_kvm(&d))
    }

    fn set_debug_regs(&mut self, regs: &DebugRegs) -> Result<()> {
        self.settle()?;
        self.fd
            .get_mut()
            .set_debug_regs(&convert::debugregs_to_kvm(regs))
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))
    }

    fn get_events(&self) -> Result<PendingEvents> {
        self.settle()?;
        let fd = self.fd.borrow();
        let k = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let mut e = convert::events_from_kvm(&k);
        if self.vm.irqchip {
            let mp = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
            e.halted = mp.mp_state == KVM_MP_STATE_HALTED;
        } else {
            e.halted = self.halted;
            if e.interrupt.is_none() {
                e.interrupt = self.pending_irq;
            }
        }
        Ok(e)
    }

    fn set_events(&mut self, events: &PendingEvents) -> Result<()> {
        self.settle()?;
        if let Some(ex) = &events.exception {
            if ex.vector >= 32 || ex.vector == vector::NMI {
                return Err(HvError::InvalidState(format!(
                    "pending exception vector {} is not an exception (0-31 except 2, NMI)",
                    ex.vector
                )));
            }
        }
        let payload = self.vm.exception_payload;
        let irqchip = self.vm.irqchip;
        let fd = self.fd.get_mut();
        if !payload {
            if let Some(cr2) = events.exception.and_then(|e| e.cr2) {
                // Without exception payloads KVM cannot write CR2 at delivery; write it now.
                let mut s = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                s.cr2 = cr2;
                fd.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
            }
        }
        let mut k: kvm_vcpu_events = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        // Without the in-kernel irqchip the interrupt waits in userspace for RFLAGS.IF, as
        // queue_interrupt does; with it, it goes into KVM's injection slot.
        let kvm_irq = if irqchip { events.interrupt } else { None };
        convert::events_to_kvm(events, kvm_irq, payload, &mut k);
        fd.set_vcpu_events(&k)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        if irqchip {
            let mp_state = if events.halted {
                KVM_MP_STATE_HALTED
            } else {
                KVM_MP_STATE_RUNNABLE
            };
            fd.set_mp_state(kvm_mp_state { mp_state })
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        } else {
            self.pending_irq = events.interrupt;
            self.halted = events.halted;
        }
        Ok(())
    }

    fn get_tsc(&self) -> Result<u64> {
        Ok(self.get_msrs(&[IA32_TIME_STAMP_COUNTER])?[0])
    }

    fn set_tsc(&mut self, tsc: u64) -> Result<()> {
        self.set_msrs(&[(IA32_TIME_STAMP_COUNTER, tsc)])?;
        // KVMs that run the guest on the host TSC without an offset (the software-assisted
        // one) accept the write but ignore it. Say so rather than pretend.
        let now = self.get_tsc()?;
        if now.wrapping_sub(tsc) > TSC_SLACK {
            tracing::warn!(
                "kvm: vCPU {}: the host's KVM ignored the guest TSC write ({tsc:#x}); the guest \
                 TSC reads {now:#x} and follows the host TSC",
                self.id
            );
        }
        Ok(())
    }

    fn inject_exception(&mut self, vec: u8, error_code: Option<u32>) -> Result<()> {
        if vec >= 32 {
            return Err(HvError::InvalidState(format!(
                "vector {vec} is not an exception (0-31); queue interrupts with queue_interrupt"
            )));
        }
        self.settle()?;
        let payload = self.vm.exception_payload;
        let fd = self.fd.get_mut();
        let mut k = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        if vec == vector::NMI {
            k.nmi.pending = 1;
            k.flags = kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
            if payload && k.exception.pending != 0 {
                k.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
            }
            return fd
                .set_vcpu_events(&k)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"));
        }
        if k.exception.pending != 0 || k.exception.injected != 0 {
            return Err(HvError::InvalidState(format!(
                "vCPU {}: exception {} is already pending; run the vCPU to deliver it first",
                self.id, k.exception.nr
            )));
        }
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        // Real mode pushes no error codes; in protected and long mode exactly the vectors
        // that define one push it (0 if the caller gave none).
        let pushes = sregs.cr0 & cr0::PE != 0 && vector::has_error_code(vec);
        let ex = PendingException {
            vector: vec,
            error_code: pushes.then(|| error_code.unwrap_or(0)),
            cr2: None,
        };
        set_exception(&mut k, Some(&ex), payload);
        k.flags = if payload {
            KVM_VCPUEVENT_VALID_PAYLOAD
        } else {
            0
        };
        fd.set_vcpu_events(&k)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
    }

    fn inject_nmi(&mut self) -> Result<()> {
        self.fd.borrow().nmi().map_err(kvm_err("KVM_NMI"))
    }

    fn queue_interrupt(&mut self, vector: u8) -> Result<()> {
        if self.vm.irqchip {
            return Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: "queue_interrupt with the in-kernel irqchip (KVM_INTERRUPT is refused \
                       there): interrupts come from the in-kernel PIC/IOAPIC/PIT; raise device \
                       interrupts with Vm::set_irq_line, or create the VM with \
                       KvmOptions { irqchip: false }"
                    .into(),
            });
        }
        if let Some(v) = self.pending_irq {
            return Err(HvError::InvalidState(format!(
                "vCPU {}: interrupt vector {v:#x} is still waiting to be accepted by the guest",
                self.id
            )));
        }
        self.pending_irq = Some(vector);
        Ok(())
    }

    fn interrupts_enabled(&self) -> Result<bool> {
        self.settle()?;
        let fd = self.fd.borrow();
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(regs.rflags & rflags::IF != 0)
    }

    fn interrupt_window_open(&self) -> Result<bool> {
        self.settle()?;
        Ok(self.pending_irq.is_none() && self.window_open_raw()?)
    }

    fn set_instruction_budget(&mut self, budget: Option<u64>) -> Result<()> {
        match budget {
            None => Ok(()),
            Some(_) => Err(HvError::Unsupported {
                backend: BackendKind::Kvm,
                what: "instruction budgets (KVM cannot stop a guest after a number of \
                       instructions; use the emu backend, or a Kicker for wall-clock limits)"
                    .into(),
            }),
        }
    }

    fn instructions_retired(&self) -> Option<u64> {
        None
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        Arc::new(KvmKicker(self.kick.clone()))
    }
}
