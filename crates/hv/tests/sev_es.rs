//! SEV-ES scenario tests on the emu backend, mirroring the KVM selftests
//! (sev_smoke_test.c and friends): real guests from `guests/`, launched through the
//! software secure processor, talking to the hypervisor only through the GHCB.

mod common;

use std::sync::{Arc, Mutex};

use common::{ca, launch_sev, platform};

use esvm_abi::testing::checkpoint::{self, Checkpoint};
use esvm_abi::testing::cr_steps;
use esvm_cpu::MemError;
use esvm_hv::emu::EmuVm;
use esvm_hv::sev::{Launcher, SevVcpuTransfer, SevVm};
use esvm_hv::{HvError, SregsView, Vcpu, Vm, VmConfig, VmExit, VmType};
use esvm_psp::session::{SessionError, SESSION_LEN};
use esvm_psp::{LaunchStart, OwnerSession, Policy, Psp, PspError};

struct SevGuest {
    vm: Arc<EmuVm>,
    vcpu: Box<dyn Vcpu>,
    serial: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum End {
    Exit(u8),
    Terminated(String),
    Shutdown(String),
}

/// Load `name` as an SEV-ES guest and run the whole launch sequence;
/// `before_launch` may change the vCPU's initial state (it is synced into the VMSA by
/// LAUNCH_UPDATE_VMSA).
fn launch(name: &str, args: &str, before_launch: impl FnOnce(&mut dyn Vcpu)) -> SevGuest {
    let (vm, vcpu) = launch_sev(name, args, 64 << 20, platform(), before_launch);
    SevGuest {
        vm,
        vcpu,
        serial: Vec::new(),
    }
}

impl SevGuest {
    /// Run until the guest ends; `on_checkpoint` sees each checkpoint write, `on_halt` each
    /// HLT exit (returns false to stop with an error).
    fn run(
        &mut self,
        mut on_checkpoint: impl FnMut(&mut dyn Vcpu, u32),
        mut on_halt: impl FnMut(&mut dyn Vcpu) -> bool,
    ) -> End {
        for _ in 0..1_000_000 {
            self.vcpu.set_instruction_budget(Some(50_000_000)).unwrap();
            let mut checkpoint_value = None;
            let mut halted = false;
            match self.vcpu.run().unwrap() {
                VmExit::IoOut { port: 0x3f8, data } => self.serial.push(data[0]),
                VmExit::IoOut { port: 0xf4, data } => return End::Exit(data[0]),
                VmExit::IoOut { port, data } if port == checkpoint::PORT => {
                    let mut v = [0u8; 4];
                    v[..data.len()].copy_from_slice(data);
                    checkpoint_value = Some(u32::from_le_bytes(v));
                }
                VmExit::IoOut { .. } => {}
                // 16550 line status: transmitter empty.
                VmExit::IoIn { port: 0x3fd, data } => data[0] = 0x60,
                VmExit::IoIn { data, .. } => data.fill(0xff),
                VmExit::MmioRead { data, .. } => data.fill(0xff),
                VmExit::MmioWrite { .. } => {}
                VmExit::Hlt => halted = true,
                VmExit::Terminated { reason } => return End::Terminated(reason),
                VmExit::Shutdown { reason } => return End::Shutdown(reason),
                VmExit::BudgetExhausted | VmExit::Interrupted => {}
                other => panic!("unexpected exit {other:?}"),
            }
            if let Some(v) = checkpoint_value {
                on_checkpoint(self.vcpu.as_mut(), v);
            }
            if halted && !on_halt(self.vcpu.as_mut()) {
                return End::Shutdown(format!("halted: {}", self.serial_text()));
            }
        }
        panic!("guest did not finish: {}", self.serial_text());
    }

    fn run_simple(&mut self) -> End {
        self.run(|_, _| {}, |_| false)
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }
}

#[test]
fn smoke_guest_ends_with_a_ghcb_termination_request() {
    // extra=1 also exercises VMMCALL, RDTSC(P), WBINVD, MSR and DR7 accesses through #VC.
    let mut g = launch("sev-smoke", "extra=1", |_| {});
    let end = g.run_simple();
    match end {
        End::Terminated(reason) => {
            assert!(reason.contains("reason set 0"), "{reason}");
            assert!(reason.contains("reason code 0x0"), "{reason}");
        }
        other => panic!(
            "expected a termination request, got {other:?}\n{}",
            g.serial_text()
        ),
    }
    assert!(
        !g.serial.is_empty(),
        "the smoke guest prints through the GHCB"
    );
    // The hypervisor's intercept set is KVM's: RDTSCP runs in the guest.
    assert!(
        g.serial_text().contains("(not intercepted)"),
        "{}",
        g.serial_text()
    );
}

/// The hypervisor counts each VMGEXIT once, by what it asked for, and the VMM reads the
/// counts through the SevVcpu extension.
#[test]
fn vmgexits_are_counted_by_exit_code() {
    use esvm_abi::{exit_code as ec, msr_protocol};
    use esvm_hv::ghcb::VmgexitKind;
    let mut g = launch("sev-smoke", "extra=1", |_| {});
    let before = g.vcpu.sev().unwrap().vmgexits().unwrap();
    assert_eq!(before.total(), 0);
    assert!(matches!(g.run_simple(), End::Terminated(_)));
    let n = g.vcpu.sev().unwrap().vmgexits().unwrap();
    // The guest prints through IOIO requests (string I/O: several bytes each), starts with
    // the MSR protocol (SEV information, CPUID) and ends with its termination request.
    assert!(!g.serial.is_empty());
    assert!(n.get(VmgexitKind::Ghcb(ec::IOIO)) >= 1, "{n:?}");
    let msr = |info: u64| VmgexitKind::Msr(info as u16);
    assert_eq!(n.get(msr(msr_protocol::SEV_INFO_REQ)), 1, "{n:?}");
    assert!(n.get(msr(msr_protocol::CPUID_REQ)) >= 1, "{n:?}");
    assert_eq!(n.get(msr(msr_protocol::TERM_REQ)), 1, "{n:?}");
    for code in [ec::CPUID, ec::VMMCALL, ec::WBINVD, ec::DR7_WRITE] {
        assert!(n.get(VmgexitKind::Ghcb(code)) >= 1, "{code:#x}: {n:?}");
    }
    // Not intercepted by this hypervisor (KVM's SEV-ES defaults): no #VC, no VMGEXIT.
    for code in [ec::RDTSC, ec::RDTSCP] {
        assert_eq!(n.get(VmgexitKind::Ghcb(code)), 0, "{code:#x}: {n:?}");
    }
    assert_eq!(n.total(), n.by_count().iter().map(|(_, c)| c).sum::<u64>());
}

/// MSRs outside the VMSA that the hypervisor emulates with state of its own (the MTRRs, as
/// KVM keeps them): what the VMM set before the launch is what the guest reads through #VC,
/// writes are kept, invalid values are a #GP the guest's #VC handler raises.
#[test]
fn mtrrs_set_before_the_launch_are_the_guests_through_vc() {
    let def_type = esvm_arch::msr::MTRR_DEF_TYPE_FIRMWARE;
    let mut g = launch("sev-smoke", &format!("mtrr={def_type:#x}"), |v| {
        v.set_msrs(&[(esvm_arch::msr::IA32_MTRR_DEF_TYPE, def_type)])
            .unwrap()
    });
    match g.run_simple() {
        End::Terminated(_) => {}
        other => panic!("{other:?}\n{}", g.serial_text()),
    }
    assert!(
        g.serial_text().contains("MTRRs through #VC ok"),
        "{}",
        g.serial_text()
    );
}

/// NMIs and NMI_COMPLETE: two NMIs injected at once both reach an SEV-ES guest, the second
/// only after the guest's NMI_COMPLETE for the first — although the first handler's #VC
/// ends the CPU's own NMI blocking with its IRET (without the hypervisor's blocking the
/// second NMI would land inside the first handler, which the guest reports).
#[test]
fn nmis_wait_for_the_guests_nmi_complete() {
    let mut g = launch("sev-smoke", "nmi=1", |_| {});
    let mut ready = false;
    let mut injected = false;
    let end = loop {
        // Short slices once the guest is ready, so an exit comes while it spins.
        let (end, value, budget_out) = step(&mut g, if ready { 100_000 } else { 50_000_000 });
        if let Some(end) = end {
            break end;
        }
        ready |= value.and_then(checkpoint::decode) == Some(Checkpoint::NmiReady);
        if ready && budget_out && !injected {
            g.vcpu.inject_nmi().unwrap();
            g.vcpu.inject_nmi().unwrap();
            injected = true;
        }
    };
    assert!(injected, "the guest never got ready: {}", g.serial_text());
    assert!(
        matches!(end, End::Terminated(_)),
        "{end:?}\n{}",
        g.serial_text()
    );
    assert!(
        g.serial_text()
            .contains("2 NMIs, the second after the first's NMI_COMPLETE ok"),
        "{}",
        g.serial_text()
    );
}

/// One step of a guest: handles the port exits the SEV-ES guests use; returns the end, a
/// checkpoint value, or None.
fn step(g: &mut SevGuest, budget: u64) -> (Option<End>, Option<u32>, bool) {
    g.vcpu.set_instruction_budget(Some(budget)).unwrap();
    match g.vcpu.run().unwrap() {
        VmExit::IoOut { port: 0x3f8, data } => g.serial.push(data[0]),
        VmExit::IoOut { port: 0xf4, data } => return (Some(End::Exit(data[0])), None, false),
        VmExit::IoOut { port, data } if port == checkpoint::PORT => {
            let mut v = [0u8; 4];
            v[..data.len()].copy_from_slice(data);
            return (None, Some(u32::from_le_bytes(v)), false);
        }
        VmExit::IoOut { .. } => {}
        VmExit::IoIn { port: 0x3fd, data } => data[0] = 0x60,
        VmExit::IoIn { data, .. } => data.fill(0xff),
        VmExit::BudgetExhausted => return (None, None, true),
        VmExit::Interrupted => {}
        VmExit::Terminated { reason } => return (Some(End::Terminated(reason)), None, false),
        VmExit::Shutdown { reason } => return (Some(End::Shutdown(reason)), None, false),
        other => panic!("unexpected exit {other:?}"),
    }
    (None, None, false)
}

/// The AP jump table is the VM's (GHCB AP_JUMP_TABLE SET/GET, which Linux asks for at every
/// boot) and moves with it: set before a migration, it is what the guest reads after.
#[test]
fn the_ap_jump_table_is_kept_per_vm_and_migrated() {
    let mut g = launch("sev-smoke", "jump-table=1", |_| {});
    let mut set = false;
    let mut moved = false;
    let end = loop {
        let (end, value, budget_out) = step(&mut g, if set { 100_000 } else { 50_000_000 });
        if let Some(end) = end {
            break end;
        }
        set |= value.and_then(checkpoint::decode) == Some(Checkpoint::JumpTableSet);
        if set && budget_out && !moved {
            g = migrate(&mut g, platform(), |_| {}).unwrap();
            moved = true;
        }
    };
    assert!(moved, "{end:?}: {}", g.serial_text());
    assert!(
        matches!(end, End::Terminated(_)),
        "{end:?}: {}",
        g.serial_text()
    );
    assert!(
        g.serial_text().contains("AP jump table 0x9f000 kept"),
        "{}",
        g.serial_text()
    );
}

#[test]
fn clobbered_idt_then_ud2_is_a_shutdown() {
    let mut g = launch("sev-idt", "", |_| {});
    match g.run_simple() {
        End::Shutdown(_) => {}
        other => panic!("expected shutdown, got {other:?}\n{}", g.serial_text()),
    }
}

#[test]
fn fpu_state_set_before_launch_is_byte_identical_in_the_guest() {
    let image = esvm_abi::testing::fpu_pattern::fxsave_image();
    let mut g = launch("sev-fpu", "", |v| {
        v.set_fpu(&esvm_arch::FpuState::from_fxsave(&image))
            .unwrap()
    });
    assert_eq!(g.run_simple(), End::Exit(0), "{}", g.serial_text());
}

#[test]
fn every_register_call_on_a_protected_vcpu_fails() {
    let mut g = launch("sev-smoke", "", |_| {});
    let v = g.vcpu.as_mut();
    assert!(v.is_protected());
    let protected = |r: Result<(), HvError>, what: &str| match r {
        Err(HvError::ProtectedState { .. }) => {}
        other => panic!("{what}: expected ProtectedState, got {other:?}"),
    };
    protected(v.get_regs().map(|_| ()), "get_regs");
    protected(v.set_regs(&Default::default()), "set_regs");
    protected(v.get_sregs().map(|_| ()), "get_sregs");
    protected(v.set_sregs(&Default::default()), "set_sregs");
    protected(v.get_fpu().map(|_| ()), "get_fpu");
    protected(v.set_fpu(&Default::default()), "set_fpu");
    protected(v.get_xcr0().map(|_| ()), "get_xcr0");
    protected(v.set_xcr0(1), "set_xcr0");
    protected(
        v.get_msrs(&[esvm_arch::msr::IA32_LSTAR]).map(|_| ()),
        "get_msrs",
    );
    protected(v.set_msrs(&[(esvm_arch::msr::IA32_LSTAR, 0)]), "set_msrs");
    protected(v.get_debug_regs().map(|_| ()), "get_debug_regs");
    protected(v.set_debug_regs(&Default::default()), "set_debug_regs");
    protected(v.snapshot().map(|_| ()), "snapshot");
    match v.get_sregs_view().unwrap() {
        SregsView::Tracked(t) => {
            assert_ne!(t.cr0 & 1, 0, "tracked CR0.PE of a long-mode guest");
            assert_ne!(t.efer & (1 << 10), 0, "tracked EFER.LMA");
        }
        SregsView::Full(_) => panic!("a protected vCPU must only show its tracked registers"),
    }
    // The host's copy of the VMSA is ciphertext.
    let enc = v.sev().unwrap().encrypted_vmsa().unwrap();
    assert_ne!(&enc[0x178..0x180], &[0u8; 8], "RIP slot");
    let _ = g.vm.memory();
}

#[test]
fn tracked_view_follows_the_guests_own_cr_writes() {
    let mut initial = None;
    let mut seen = 0;
    let mut g = launch("sev-cr", "", |_| {});
    let end = g.run(
        |v, value| {
            if let Some(Checkpoint::CrStep(n)) = checkpoint::decode(value) {
                let view = v.get_sregs_view().unwrap();
                let SregsView::Tracked(t) = view else {
                    panic!("protected vCPU showed full registers")
                };
                let now = cr_steps::CrState {
                    cr0: t.cr0,
                    cr4: t.cr4,
                    cr8: t.cr8,
                    efer: t.efer,
                };
                let init = *initial.get_or_insert(now);
                assert_eq!(now, cr_steps::expected(init, n as usize), "after step {n}");
                seen += 1;
            }
        },
        |_| false,
    );
    assert_eq!(end, End::Exit(0), "{}", g.serial_text());
    assert_eq!(
        seen,
        cr_steps::STEPS.len() + 1,
        "one checkpoint per step plus the initial state"
    );
}

#[test]
fn injected_page_fault_carries_its_error_code() {
    // Error-code delivery is decided from the tracked CR0.PE (set: long mode).
    let mut g = pf_guest_waiting();
    let end = finish_pf_guest(&mut g);
    assert_eq!(end, End::Exit(0), "{}", g.serial_text());
}

#[test]
fn sevdemo_matches_the_plain_demo_checksum() {
    let mut g = launch("sevdemo", "iterations=3000", |_| {});
    assert_eq!(g.run_simple(), End::Exit(0), "{}", g.serial_text());
    let want = format!(
        "checksum={:016x}",
        esvm_guests::demo::expected_checksum(3000, 0)
    );
    assert!(g.serial_text().contains(&want), "{}", g.serial_text());
}

#[test]
fn guest_without_vc_handler_shuts_down() {
    let mut g = launch("sev-novc", "", |_| {});
    match g.run_simple() {
        End::Shutdown(_) => {}
        other => panic!("expected shutdown, got {other:?}\n{}", g.serial_text()),
    }
}

#[test]
fn launch_update_vmsa_is_refused_while_dr7_enables_breakpoints() {
    let mut cfg = VmConfig::plain(16 << 20, 1);
    cfg.vm_type = VmType::SevEs;
    let vm = Arc::new(EmuVm::new(&cfg).unwrap());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut psp = Psp::ephemeral(ca(), Default::default()).unwrap();
    psp.init().unwrap();
    let mut launcher = Launcher::new(vm.clone())
        .unwrap()
        .start(
            Arc::new(Mutex::new(psp)),
            &LaunchStart {
                policy: Policy(Policy::ES),
                owner: None,
                share_key_with: None,
            },
        )
        .unwrap();
    let mut dr = vcpu.get_debug_regs().unwrap();
    dr.dr7 |= 1; // L0: breakpoint 0 enabled
    vcpu.set_debug_regs(&dr).unwrap();
    let err = launcher.update_vmsa(vcpu.as_mut()).unwrap_err().to_string();
    assert!(err.contains("DR7"), "{err}");
    assert!(!vcpu.is_protected());
    dr.dr7 &= !1;
    vcpu.set_debug_regs(&dr).unwrap();
    launcher.update_vmsa(vcpu.as_mut()).unwrap();
    assert!(vcpu.is_protected());
    // A second LAUNCH_UPDATE_VMSA for the same vCPU is refused.
    assert!(launcher.update_vmsa(vcpu.as_mut()).is_err());
}

#[test]
fn a_refused_launch_keeps_the_firmware_reason_as_the_error_source() {
    let mut cfg = VmConfig::plain(16 << 20, 1);
    cfg.vm_type = VmType::SevEs;
    let vm = Arc::new(EmuVm::new(&cfg).unwrap());
    let psp = platform();
    // The platform's own PDH as the owner's DH key, with a session blob the owner never
    // wrapped: its transport keys fail their MAC.
    let dh_cert = psp.lock().unwrap().pdh_cert_export().unwrap().pdh;
    let req = LaunchStart {
        policy: Policy(Policy::ES),
        owner: Some(OwnerSession {
            dh_cert: dh_cert.as_bytes().to_vec(),
            session: vec![0; SESSION_LEN],
        }),
        share_key_with: None,
    };
    let err = Launcher::new(vm).unwrap().start(psp, &req).err().unwrap();
    // The chain crosses two layers: HvError -> PspError -> SessionError.
    assert!(matches!(err, HvError::Psp(_)), "{err}");
    let psp_err = std::error::Error::source(&err).expect("the PSP error");
    assert!(psp_err.is::<PspError>(), "{psp_err}");
    let why = psp_err
        .source()
        .and_then(|e| e.downcast_ref::<SessionError>());
    assert_eq!(why, Some(&SessionError::WrapMac), "{err}");
}

#[test]
fn launch_update_data_outside_ram_keeps_the_memory_error_as_its_source() {
    let mut cfg = VmConfig::plain(16 << 20, 1);
    cfg.vm_type = VmType::SevEs;
    let vm = Arc::new(EmuVm::new(&cfg).unwrap());
    let mut launcher = Launcher::new(vm)
        .unwrap()
        .start(
            platform(),
            &LaunchStart {
                policy: Policy(Policy::ES),
                owner: None,
                share_key_with: None,
            },
        )
        .unwrap();
    let err = launcher.update_data(16 << 20, 4096).unwrap_err();
    assert!(matches!(err, HvError::SevMemory { .. }), "{err}");
    let why = std::error::Error::source(&err).and_then(|e| e.downcast_ref::<MemError>());
    assert!(
        matches!(why, Some(MemError::OutOfRange { addr, .. }) if *addr == 16 << 20),
        "{err}"
    );
}

#[test]
fn interrupts_below_the_tracked_task_priority_are_refused() {
    let mut g = launch("sev-smoke", "", |v| {
        let mut s = v.get_sregs().unwrap();
        s.cr8 = 5;
        v.set_sregs(&s).unwrap();
    });
    let v = g.vcpu.as_mut();
    assert_eq!(v.get_sregs_view().unwrap().cr8(), 5);
    assert!(v.queue_interrupt(0x40).is_err(), "class 4 <= TPR 5");
    v.queue_interrupt(0x60).unwrap();
}

/// Move `src` (at a clean point) into a fresh SEV-ES VM on `dst_psp` through SEND_* and
/// RECEIVE_*; `tamper` may change the vCPU transfer on the way.
fn migrate(
    src: &mut SevGuest,
    dst_psp: Arc<Mutex<Psp>>,
    tamper: impl FnOnce(&mut SevVcpuTransfer),
) -> Result<SevGuest, HvError> {
    let chain = dst_psp
        .lock()
        .unwrap()
        .pdh_cert_export()
        .unwrap()
        .to_bytes();
    let start = src.vm.send_start(&chain)?;
    let mut cfg = VmConfig::plain(src.vm.memory().size(), 1);
    cfg.vm_type = VmType::SevEs;
    let vm = Arc::new(EmuVm::new(&cfg).unwrap());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vm.receive_start(dst_psp, &start)?;
    let mut packet = Vec::new();
    let (mut private, mut shared) = (0, 0);
    for page in 0..src.vm.memory().size() / 4096 {
        packet.clear();
        src.vm.send_page(page, &mut packet)?;
        match esvm_hv::sev::PagePacket::decode(&packet)? {
            esvm_hv::sev::PagePacket::Private { .. } => private += 1,
            esvm_hv::sev::PagePacket::Shared(_) => shared += 1,
        }
        vm.receive_page(page, &packet)?;
    }
    assert!(
        private > 0 && shared > 0,
        "{private} private, {shared} shared"
    );
    let mut t = src.vcpu.sev().unwrap().send_state()?;
    tamper(&mut t);
    vcpu.sev_mut().unwrap().receive_state(&t)?;
    vm.set_host_state(&src.vm.host_state()?)?;
    vm.receive_finish(&src.vm.send_transcript_tag()?)?;
    src.vm.send_finish()?;
    Ok(SevGuest {
        vm,
        vcpu,
        serial: std::mem::take(&mut src.serial),
    })
}

/// Run sev-pf until it waits (halted) for the injected #PF.
fn pf_guest_waiting() -> SevGuest {
    let ready = std::cell::Cell::new(false);
    let mut g = launch("sev-pf", "ec=6", |_| {});
    let end = g.run(
        |_, value| {
            if checkpoint::decode(value) == Some(Checkpoint::PfReady) {
                ready.set(true);
            }
        },
        |_| false,
    );
    assert!(ready.get(), "{end:?}: {}", g.serial_text());
    g
}

/// Inject the #PF (error code 6) sev-pf waits for, once, and run it to its end.
fn finish_pf_guest(g: &mut SevGuest) -> End {
    let mut injected = false;
    g.run(
        |_, _| {},
        |v| {
            if injected {
                return false;
            }
            v.inject_exception(14, Some(6)).unwrap();
            let mut ev = v.get_events().unwrap();
            ev.halted = false;
            v.set_events(&ev).unwrap();
            injected = true;
            true
        },
    )
}

/// Issue 4 item 5: after SEND/RECEIVE the destination's tracked view is what the firmware
/// decrypted (equal to the source's), registers stay sealed, and a #PF injected there still
/// carries its error code (decided from the migrated tracked CR0.PE).
#[test]
fn migrated_vcpu_keeps_its_tracked_view_and_error_code_delivery() {
    let mut src = pf_guest_waiting();
    let SregsView::Tracked(before) = src.vcpu.get_sregs_view().unwrap() else {
        panic!("protected")
    };
    assert!(before.cr0 & 1 != 0, "long mode guest: {before:?}");
    let mut dst = migrate(&mut src, platform(), |_| {}).unwrap();
    assert!(dst.vcpu.is_protected());
    assert_eq!(
        dst.vcpu.get_sregs_view().unwrap(),
        SregsView::Tracked(before)
    );
    assert!(dst.vcpu.get_regs().is_err() && dst.vcpu.set_sregs(&Default::default()).is_err());
    // The source's firmware context is SENT: its packets and its guest are gone.
    assert!(src.vm.send_page(0, &mut Vec::new()).is_err());
    let end = finish_pf_guest(&mut dst);
    assert_eq!(end, End::Exit(0), "{}", dst.serial_text());
}

/// A changed VMSA packet, or hypervisor state that contradicts the authenticated extension,
/// is refused and leaves the destination vCPU unprotected and empty; the source can cancel
/// and run on.
#[test]
fn tampered_vcpu_transfers_are_refused() {
    type Tamper = fn(&mut SevVcpuTransfer);
    let cases: [(&str, Tamper); 4] = [
        ("ciphertext", |t| t.vmsa_ciphertext[0x158] ^= 1),
        ("extension", |t| {
            let n = t.vmsa_ciphertext.len();
            t.vmsa_ciphertext[n - 20] ^= 0x80
        }),
        ("header", |t| t.vmsa_header[30] ^= 1),
        ("ghcb msr", |t| t.host.ghcb_msr = 0x7000),
    ];
    for (what, tamper) in cases {
        let mut src = pf_guest_waiting();
        let e = match migrate(&mut src, platform(), tamper) {
            Err(e) => e,
            Ok(_) => panic!("{what}: accepted"),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("MAC") || msg.contains("does not match"),
            "{what}: {msg}"
        );
        src.vm.send_cancel().unwrap();
        // The source runs on: inject the #PF there and the guest completes.
        let end = finish_pf_guest(&mut src);
        assert_eq!(end, End::Exit(0), "{what}: {}", src.serial_text());
    }
}

/// As on hardware (VMRUN needs the encrypted VMSA) and KVM: an SEV-ES vCPU that has not
/// been through LAUNCH_UPDATE_VMSA refuses to run, before and after LAUNCH_START; after it
/// the same vCPU runs.
#[test]
fn vcpu_without_an_encrypted_vmsa_refuses_to_run() {
    let vm = Arc::new(EmuVm::new(&common::sev_config(16 << 20, 1)).unwrap());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let e = vcpu.run().unwrap_err().to_string();
    assert!(e.contains("no encrypted VMSA"), "{e}");
    let mut launcher = common::launch_start(&vm, platform()).unwrap();
    let e = vcpu.run().unwrap_err().to_string();
    assert!(e.contains("LAUNCH_UPDATE_VMSA"), "{e}");
    launcher.update_vmsa(vcpu.as_mut()).unwrap();
    vcpu.set_instruction_budget(Some(10)).unwrap();
    assert!(vcpu.run().is_ok());
}
