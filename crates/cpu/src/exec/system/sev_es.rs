//! SEV-ES handlers of system instructions: #VC for non-automatic events, VMGEXIT, write
//! traps after CR0/CR4/CR8/EFER writes, and the MSRs an SEV-ES vCPU accesses directly.
//!
//! Blocks decoded by an SEV-ES vCPU get these handlers through [`patch`] (at decode time, so
//! plain vCPUs run exactly the handlers they always had).

use super::{clts, h_ud, io_allowed, lmsw, mov_cr, mov_dr, msr_read, msr_write, need_cpl0};
use crate::exec::{Handler, Insn, KREG};
use crate::sev::{exit_code as ec, VcIntercepts, SEV_STATUS_VALUE};
use crate::{gp0, ud, Cpu, Exit, Stop, TrapReg, R};
use esvm_arch::bits::cr4;
use esvm_arch::msr::*;
use iced_x86::{Mnemonic, Register};

/// Give the instructions of a block decoded in SEV-ES mode their SEV-ES handlers.
/// Events `intercepts` leaves to the guest keep their plain handlers.
pub(crate) fn patch(insns: &mut [Insn], intercepts: &VcIntercepts) {
    for d in insns {
        patch_one(d, intercepts);
    }
}

fn patch_one(d: &mut Insn, x: &VcIntercepts) {
    use Mnemonic as M;
    if d.lock {
        // LOCK on any of these is #UD, which `select` already chose.
        return;
    }
    let m = d.i.mnemonic();
    let h: Handler = match m {
        // Not modelled outside SEV-ES mode (#UD there).
        M::Vmgexit => vmgexit,
        M::Vmmcall if d.i.has_rep_prefix() || d.i.has_repne_prefix() => vmgexit,
        M::Vmmcall => vmmcall,
        M::Monitor => monitor,
        M::Mwait => mwait,
        M::Rdpmc => rdpmc,
        // Keep #UD where the plain decoder chose it (a merged identical function could only
        // make this match more handlers that are #UD anyway).
        _ if std::ptr::fn_addr_eq(d.h, h_ud as Handler) => return,
        M::Cpuid => cpuid,
        M::In | M::Out | M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd => io,
        M::Rdmsr => rdmsr,
        M::Wrmsr => wrmsr,
        M::Rdtsc if x.rdtsc => rdtsc,
        M::Rdtscp if x.rdtscp => rdtsc,
        M::Invd if x.invd => invd_wbinvd,
        M::Wbinvd if x.wbinvd => invd_wbinvd,
        M::Clts => clts_trap,
        M::Lmsw => lmsw_trap,
        M::Mov => {
            // As `select` chooses `mov_cr` / `mov_dr` (by operands, not by comparing
            // handler addresses, which optimisation may merge or duplicate).
            let reg = |k: u8, r: Register| if k == KREG { r } else { Register::None };
            let r0 = reg(d.k0, d.i.op0_register());
            let r1 = reg(d.k1, d.i.op1_register());
            if r0.is_cr() || r1.is_cr() {
                mov_cr_trap
            } else if (r0.is_dr() && x.dr7_write) || (r1.is_dr() && x.dr7_read) {
                mov_dr7_vc
            } else {
                return;
            }
        }
        _ => return,
    };
    d.h = h;
    d.h1 = h;
}

// ---------------------------------------------------------------------- #VC events

fn vmmcall(_c: &mut Cpu, _d: &Insn) -> R {
    Cpu::vc(ec::VMMCALL)
}

fn monitor(c: &mut Cpu, _d: &Insn) -> R {
    if c.cpl != 0 {
        return ud();
    }
    Cpu::vc(ec::MONITOR)
}

fn mwait(c: &mut Cpu, _d: &Insn) -> R {
    if c.cpl != 0 {
        return ud();
    }
    Cpu::vc(ec::MWAIT)
}

fn rdpmc(c: &mut Cpu, _d: &Insn) -> R {
    if c.cr4 & cr4::PCE == 0 && c.cpl != 0 {
        return gp0();
    }
    Cpu::vc(ec::RDPMC)
}

fn cpuid(_c: &mut Cpu, _d: &Insn) -> R {
    Cpu::vc(ec::CPUID)
}

fn io(c: &mut Cpu, _d: &Insn) -> R {
    io_allowed(c)?;
    Cpu::vc(ec::IOIO)
}

fn rdtsc(c: &mut Cpu, d: &Insn) -> R {
    if c.cr4 & cr4::TSD != 0 && c.cpl != 0 {
        return gp0();
    }
    Cpu::vc(if d.i.mnemonic() == Mnemonic::Rdtscp {
        ec::RDTSCP
    } else {
        ec::RDTSC
    })
}

fn invd_wbinvd(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    Cpu::vc(if d.i.mnemonic() == Mnemonic::Invd {
        ec::INVD
    } else {
        ec::WBINVD
    })
}

/// MOV from/to DR7 (also DR5 as its alias with CR4.DE clear): #VC; other debug registers
/// are accessed directly.
fn mov_dr7_vc(c: &mut Cpu, d: &Insn) -> R {
    need_cpl0(c)?;
    let to_dr = d.i.op0_register().is_dr();
    let n = if to_dr { d.r0 } else { d.r1 };
    if n == 7 || (n == 5 && c.cr4 & cr4::DE == 0) {
        return Cpu::vc(if to_dr { ec::DR7_WRITE } else { ec::DR7_READ });
    }
    mov_dr(c, d)
}

// ---------------------------------------------------------------------- VMGEXIT

fn vmgexit(c: &mut Cpu, _d: &Insn) -> R {
    c.exit = Some(Exit::Vmgexit {
        ghcb_msr: c.ghcb_msr(),
    });
    Err(Stop::ExitRetire)
}

// ---------------------------------------------------------------------- MSRs

/// MSRs whose state is in the VMSA: accessed directly, without #VC.
fn in_vmsa(idx: u32) -> bool {
    matches!(
        idx,
        IA32_EFER
            | IA32_STAR
            | IA32_LSTAR
            | IA32_CSTAR
            | IA32_FMASK
            | IA32_KERNEL_GS_BASE
            | IA32_SYSENTER_CS
            | IA32_SYSENTER_ESP
            | IA32_SYSENTER_EIP
            | IA32_FS_BASE
            | IA32_GS_BASE
            | IA32_PAT
            | IA32_TSC_AUX
    )
}

fn rdmsr(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    let idx = c.gpr[1] as u32;
    let v = match idx {
        SEV_GHCB => c.ghcb_msr(),
        SEV_STATUS => SEV_STATUS_VALUE,
        _ if in_vmsa(idx) => match msr_read(c, idx) {
            Some(v) => v,
            None => return gp0(),
        },
        _ => return Cpu::vc(ec::MSR),
    };
    c.gpr[0] = v & 0xffff_ffff;
    c.gpr[2] = v >> 32;
    Ok(())
}

fn wrmsr(c: &mut Cpu, _d: &Insn) -> R {
    need_cpl0(c)?;
    let idx = c.gpr[1] as u32;
    let v = (c.gpr[0] & 0xffff_ffff) | (c.gpr[2] << 32);
    match idx {
        SEV_GHCB => {
            c.set_ghcb_msr(v);
            Ok(())
        }
        SEV_STATUS => gp0(),
        _ if in_vmsa(idx) => match msr_write(c, idx, v) {
            Ok(true) if idx == IA32_EFER => trap(c, TrapReg::Efer),
            Ok(true) => Err(Stop::Retire),
            _ => gp0(),
        },
        _ => Cpu::vc(ec::MSR),
    }
}

// ---------------------------------------------------------------------- write traps

/// Exit with a write trap for `reg` after the instruction retired.
fn trap(c: &mut Cpu, reg: TrapReg) -> R {
    let value = match reg {
        TrapReg::Cr0 => c.cr0,
        TrapReg::Cr4 => c.cr4,
        TrapReg::Cr8 => c.cr8,
        TrapReg::Efer => c.efer,
    };
    c.exit = Some(Exit::WriteTrap {
        reg,
        value,
        efer: c.efer,
    });
    Err(Stop::ExitRetire)
}

/// The write completed (the plain handlers return `Ok` or `Retire` on success).
fn completed(r: R) -> Result<(), Stop> {
    match r {
        Ok(()) | Err(Stop::Retire) => Ok(()),
        other => other,
    }
}

fn mov_cr_trap(c: &mut Cpu, d: &Insn) -> R {
    if !d.i.op0_register().is_cr() {
        return mov_cr(c, d);
    }
    let reg = match d.r0 {
        0 => TrapReg::Cr0,
        4 => TrapReg::Cr4,
        8 => TrapReg::Cr8,
        _ => return mov_cr(c, d),
    };
    completed(mov_cr(c, d))?;
    trap(c, reg)
}

fn clts_trap(c: &mut Cpu, d: &Insn) -> R {
    completed(clts(c, d))?;
    trap(c, TrapReg::Cr0)
}

fn lmsw_trap(c: &mut Cpu, d: &Insn) -> R {
    completed(lmsw(c, d))?;
    trap(c, TrapReg::Cr0)
}
