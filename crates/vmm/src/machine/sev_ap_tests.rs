//! SEV-ES AP start-up on a machine: an AP parks in the AP start stub (the GHCB AP reset
//! hold), stays held without a SIPI and after INIT, and a SIPI releases it through the
//! hypervisor (`SevVcpu::deliver_sipi`) into the CS:IP of the AP jump table — or, while the
//! table is still zero, back into the hold.

use std::path::Path;
use std::sync::{Arc, Mutex};

use esvm_arch::vmsa::Vmsa;
use esvm_psp::Psp;

use super::*;
use crate::sev_launch::{self, SevLaunchArgs};

/// Where the test's AP entry goes (real mode, free in the esvm convention): a HLT.
const ENTRY: u64 = 0x7000;

/// sevdemo on a launched 2-vCPU SEV-ES machine; the jump table holds `table` (IP at +0, CS
/// at +2) from the launch on, as if the guest had written it, and [`ENTRY`] holds a HLT.
fn launched(table: Option<(u16, u16)>) -> Machine {
    launched_on(table, None)
}

/// [`launched`] on the platform stored in `platform`, or an ephemeral one.
fn launched_on(table: Option<(u16, u16)>, platform: Option<&Path>) -> Machine {
    let config = MachineConfig {
        backend: BackendKind::Emu,
        vm_type: VmType::SevEs,
        mem_size: 16 << 20,
        vcpus: 2,
        max_instructions: None,
    };
    let mut m = Machine::new(&config, Box::new(std::io::sink())).unwrap();
    let boot = m
        .load(esvm_guests::builtin("sevdemo").unwrap().elf, "")
        .unwrap();
    if let Some((ip, cs)) = table {
        let mut t = ip.to_le_bytes().to_vec();
        t.extend_from_slice(&cs.to_le_bytes());
        m.vm()
            .memory()
            .write(layout::AP_JUMP_TABLE_ADDR, &t)
            .unwrap();
    }
    m.vm().memory().write(ENTRY, &[0xf4]).unwrap(); // hlt
    let psp = match platform {
        Some(dir) => sev_launch::open_platform(dir).unwrap(),
        None => {
            let ca = esvm_psp::EmulatedAmdCa::generate(2048).unwrap();
            let mut psp = Psp::ephemeral(&ca, Default::default()).unwrap();
            psp.init().unwrap();
            Arc::new(Mutex::new(psp))
        }
    };
    let args = SevLaunchArgs {
        platform: Path::new("-"),
        session: None,
        measurement_out: None,
        secret: None,
        policy: None,
    };
    let regions = sev_launch::measured_regions(&boot);
    sev_launch::launch_on(&mut m, &regions, psp, &args).unwrap();
    m
}

fn retired(m: &Machine, i: usize) -> u64 {
    m.vcpus[i].instructions_retired().unwrap()
}

/// vCPU `i`'s decrypted VMSA (the launch policy allows debugging).
fn vmsa(m: &Machine, i: usize) -> Vmsa {
    let bytes = m.vcpus[i].sev().unwrap().debug_vmsa().unwrap();
    Vmsa::from_bytes(&bytes[..]).unwrap()
}

/// Run AP 1 until it parks: it ran the stub up to its VMGEXIT and is held.
fn park(m: &mut Machine) -> u64 {
    assert_eq!(
        m.vcpu_run_states()[1],
        VcpuRunState::Running,
        "APs run from the start"
    );
    assert!(m.run_once(1).unwrap().is_none());
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    let n = retired(m, 1);
    assert!(
        (5..20).contains(&n),
        "the stub ran {n} instructions to its hold"
    );
    n
}

#[test]
fn a_held_ap_stays_held_without_sipi_ignores_init_and_a_sipi_sends_it_to_the_jump_table() {
    let mut m = launched(Some((0, (ENTRY >> 4) as u16)));
    // Registered at launch, as firmware's AP_JUMP_TABLE SET would: the guest's GET finds it.
    assert_eq!(
        m.sev().unwrap().host_state().unwrap().ap_jump_table,
        layout::AP_JUMP_TABLE_ADDR
    );
    let parked = park(&mut m);
    // Another run without a SIPI: still held, nothing executed (not a HLT an interrupt
    // or a new turn would end).
    assert!(m.run_once(1).unwrap().is_none());
    assert_eq!(retired(&m, 1), parked);
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    // INIT alone: the hypervisor cannot reset a protected vCPU; it stays held.
    m.apply_ap_signal(1, ApSignal::Init).unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    assert!(m.run_once(1).unwrap().is_none());
    assert_eq!(retired(&m, 1), parked);
    // The SIPI (its vector means nothing to a protected vCPU) releases it: it reads the
    // table and far-jumps to CS:IP = 0x700:0, the HLT at ENTRY.
    m.apply_ap_signal(1, ApSignal::Sipi(0x9a)).unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Running);
    // A second SIPI to the running vCPU is ignored.
    m.apply_ap_signal(1, ApSignal::Sipi(0x9a)).unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Running);
    assert!(m.run_once(1).unwrap().is_none());
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Halted);
    let v = vmsa(&m, 1);
    let (regs, sregs) = (v.regs(), v.sregs());
    assert_eq!((sregs.cs.selector, sregs.cs.base), (0x700, ENTRY));
    assert_eq!(regs.rip, 1, "after the HLT at CS:0");
    assert_eq!(sregs.cr0 & 1, 0, "still in real mode");
    // The boot vCPU was never touched.
    assert_eq!(retired(&m, 0), 0);
}

#[test]
fn a_sipi_before_the_guest_wrote_the_jump_table_sends_the_ap_back_into_the_hold() {
    let mut m = launched(None);
    let parked = park(&mut m);
    m.apply_ap_signal(1, ApSignal::Sipi(0x10)).unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Running);
    assert!(m.run_once(1).unwrap().is_none());
    // It checked the response, found the table zero and asked for the hold again.
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    let again = retired(&m, 1);
    assert!(again > parked && again - parked < 25, "{parked} -> {again}");
    let v = vmsa(&m, 1);
    assert_eq!(v.sregs().cs.base, layout::AP_STUB_ADDR, "still in the stub");
}

/// A held AP is sealed held: a sealed snapshot (SEND_UPDATE_VMSA, the hold in the
/// authenticated VMSA extension and in the host state) restores (RECEIVE_UPDATE_VMSA) into a
/// machine where the AP is still held, stays held when run, and a later SIPI releases it
/// into the jump table's CS:IP.
#[test]
fn a_held_ap_is_restored_held_and_released_by_a_later_sipi() {
    let dir = tempfile::tempdir().unwrap();
    let plat = dir.path().join("platform");
    let ca = esvm_psp::EmulatedAmdCa::generate(2048).unwrap();
    drop(Psp::create(&plat, &ca, Default::default()).unwrap());
    let mut m = launched_on(Some((0, (ENTRY >> 4) as u16)), Some(&plat));
    park(&mut m);
    let snap = dir.path().join("snap");
    // The snapshot is taken by the run loop (held, so the guest runs no further).
    let h = m.handle();
    let hold = h.control.hold().unwrap();
    let source = std::thread::spawn(move || m.run());
    crate::snapshot::save(&h, &snap).unwrap();
    drop(hold);
    // The source finishes its guest on the boot vCPU, the AP still held.
    assert_eq!(source.join().unwrap().unwrap(), Outcome::Exited(0));
    let mut r = crate::snapshot::restore(
        &snap,
        BackendKind::Emu,
        Some(&plat),
        Box::new(std::io::sink()),
    )
    .unwrap();
    assert_eq!(r.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    assert_eq!(
        r.sev().unwrap().host_state().unwrap().ap_jump_table,
        layout::AP_JUMP_TABLE_ADDR,
        "the registered jump table travels with the guest"
    );
    // Run anyway (as a machine without the scheduler state would): the hypervisor keeps it
    // held.
    assert!(r.run_once(1).unwrap().is_none());
    assert_eq!(r.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    assert_eq!(retired(&r, 1), 0);
    r.apply_ap_signal(1, ApSignal::Sipi(0x10)).unwrap();
    assert!(r.run_once(1).unwrap().is_none());
    assert_eq!(r.vcpu_run_states()[1], VcpuRunState::Halted);
    let v = vmsa(&r, 1);
    assert_eq!((v.sregs().cs.base, v.regs().rip), (ENTRY, 1));
}

/// A SIPI that reaches an AP before it ran into the hold is ignored (it is not held), so
/// the AP would then park for good: the machine parks every fresh AP before the boot vCPU
/// runs, as firmware does before it hands over to the OS.
#[test]
fn fresh_aps_park_before_the_boot_vcpu_runs_so_an_early_sipi_is_not_lost() {
    let mut m = launched(Some((0, (ENTRY >> 4) as u16)));
    // Without the parking: an early SIPI finds the AP not held and is ignored.
    m.apply_ap_signal(1, ApSignal::Sipi(0x9a)).unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Running);
    // The machine's parking, then the same SIPI releases it.
    m.park_fresh_sev_aps().unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::ApResetHold);
    let parked = retired(&m, 1);
    assert!((5..20).contains(&parked), "{parked}");
    assert_eq!(retired(&m, 0), 0, "the boot vCPU has not run");
    // Parking again does nothing: the AP has run.
    m.park_fresh_sev_aps().unwrap();
    assert_eq!(retired(&m, 1), parked);
    m.apply_ap_signal(1, ApSignal::Sipi(0x9a)).unwrap();
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Running);
    assert!(m.run_once(1).unwrap().is_none());
    assert_eq!(m.vcpu_run_states()[1], VcpuRunState::Halted);
}
