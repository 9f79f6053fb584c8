//! SEV-ES AP reset hold at the hypervisor level: a protected vCPU that runs the AP start
//! stub (`esvm_loader::ap_stub`) parks with `VmExit::ApResetHold`, every further run gives
//! the same exit without running it, and `SevVcpu::deliver_sipi` releases it (true) into
//! the CS:IP of the jump table; a SIPI to a vCPU that is not held is ignored (false).

mod common;

use std::sync::Arc;

use common::{launch_start, platform, sev_config};
use esvm_arch::layout;
use esvm_hv::emu::EmuVm;
use esvm_hv::{Vcpu, Vm, VmExit};

/// Where the jump table points: a HLT.
const ENTRY: u64 = 0x7000;

/// A launched one-vCPU SEV-ES VM whose vCPU starts as an AP in the stub; the jump table
/// holds `table` (IP, CS) from the launch on.
fn ap(table: Option<(u16, u16)>) -> (Arc<EmuVm>, Box<dyn Vcpu>) {
    let vm = Arc::new(EmuVm::new(&sev_config(16 << 20, 1)).unwrap());
    let (start, len) = esvm_loader::ap_stub::range();
    vm.memory()
        .write(start, &esvm_loader::ap_stub::page())
        .unwrap();
    if let Some((ip, cs)) = table {
        let t = (u32::from(cs) << 16 | u32::from(ip)).to_le_bytes();
        vm.memory().write(layout::AP_JUMP_TABLE_ADDR, &t).unwrap();
    }
    vm.memory().write(ENTRY, &[0xf4]).unwrap(); // hlt
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.restore(&esvm_loader::ap_stub::ap_initial_state())
        .unwrap();
    let mut launcher = launch_start(&vm, platform()).unwrap();
    launcher.update_data(start, len).unwrap();
    launcher.update_data(ENTRY, 0x1000).unwrap();
    launcher.update_vmsa(vcpu.as_mut()).unwrap();
    launcher.measure().unwrap().finish().unwrap();
    (vm, vcpu)
}

fn exit(vcpu: &mut dyn Vcpu) -> String {
    vcpu.set_instruction_budget(Some(10_000)).unwrap();
    match vcpu.run().unwrap() {
        VmExit::ApResetHold => "hold".into(),
        VmExit::Hlt => "hlt".into(),
        other => format!("{other:?}"),
    }
}

fn deliver_sipi(vcpu: &mut dyn Vcpu) -> bool {
    vcpu.sev_mut().unwrap().deliver_sipi().unwrap()
}

#[test]
fn a_held_vcpu_stays_held_until_a_sipi_and_then_jumps_through_the_table() {
    let (_vm, mut vcpu) = ap(Some((0, (ENTRY >> 4) as u16)));
    assert_eq!(exit(vcpu.as_mut()), "hold");
    let parked = vcpu.instructions_retired().unwrap();
    // Not a HLT: running it again (as after an interrupt) runs nothing and holds.
    assert_eq!(exit(vcpu.as_mut()), "hold");
    assert_eq!(vcpu.instructions_retired().unwrap(), parked);
    // The hold is visible in the GHCB MSR's answer only after the release.
    assert_eq!(vcpu.sev().unwrap().ghcb_msr().unwrap(), 0x007);
    assert!(deliver_sipi(vcpu.as_mut()), "it was held");
    assert_eq!(vcpu.sev().unwrap().ghcb_msr().unwrap(), 0x1007);
    assert!(
        !deliver_sipi(vcpu.as_mut()),
        "a second SIPI finds it released"
    );
    assert_eq!(exit(vcpu.as_mut()), "hlt", "through the table to the HLT");
    let v = esvm_arch::Vmsa::from_bytes(&vcpu.sev().unwrap().debug_vmsa().unwrap()[..]).unwrap();
    assert_eq!((v.sregs().cs.base, v.regs().rip), (ENTRY, 1));
    // A SIPI to a vCPU that is not held is ignored.
    assert!(!deliver_sipi(vcpu.as_mut()));
}

#[test]
fn released_before_the_table_is_written_it_holds_again() {
    let (_vm, mut vcpu) = ap(None);
    assert_eq!(exit(vcpu.as_mut()), "hold");
    assert!(deliver_sipi(vcpu.as_mut()));
    assert_eq!(exit(vcpu.as_mut()), "hold");
    assert!(deliver_sipi(vcpu.as_mut()), "held again");
}

#[test]
fn a_sipi_needs_a_launched_vcpu() {
    let vm = Arc::new(EmuVm::new(&sev_config(16 << 20, 1)).unwrap());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let e = vcpu.sev_mut().unwrap().deliver_sipi().unwrap_err();
    assert!(e.to_string().contains("LAUNCH_START"), "{e}");
}
