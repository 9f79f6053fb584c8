//! Same-host move of an SEV-ES guest's encryption context between emu VMs (KVM's
//! KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM), mirroring KVM's sev_migrate_tests.c: real guests move
//! mid-run and finish on the destination; a chain of moves cannot come back to a dead VM;
//! the KVM parameter errors; concurrent cross moves do not deadlock.

use std::sync::atomic::{AtomicUsize, Ordering};
mod common;

use std::sync::{Arc, Barrier, Mutex};

use common::{launch_sev, launch_start, platform, sev_config};

use esvm_abi::testing::checkpoint::{self, Checkpoint};
use esvm_hv::emu::EmuVm;
use esvm_hv::sev::{Launcher, SevVm, Started};
use esvm_hv::{HvError, SregsView, Vcpu, Vm, VmConfig, VmExit, VmType};
use esvm_psp::session::PACKET_HEADER_LEN;
use esvm_psp::Psp;

const MEM: u64 = 64 << 20;

struct SevGuest {
    vm: Arc<EmuVm>,
    vcpus: Vec<Box<dyn Vcpu>>,
    psp: Arc<Mutex<Psp>>,
    serial: Vec<u8>,
    /// A RAM-like MMIO device (the page at `MMIO_SCRATCH_ADDR`, for sev-mmio).
    mmio: Vec<u8>,
    /// Reads the device answered.
    mmio_reads: usize,
    /// A launch in progress (LAUNCH_START done, not measured yet).
    launcher: Option<Launcher<Started>>,
}

const MMIO_PAGE: u64 = esvm_abi::layout::MMIO_SCRATCH_ADDR & !0xfff;

/// The offset of `[addr, addr+len)` in the MMIO device's page, if it lies inside.
fn mmio_offset(addr: u64, len: usize) -> Option<usize> {
    let off = addr.checked_sub(MMIO_PAGE)?;
    (off + len as u64 <= 4096).then_some(off as usize)
}

#[derive(Debug, PartialEq)]
enum End {
    Exit(u8),
    Terminated(String),
    Shutdown(String),
}

/// What the run loop shows its hook.
enum Ev {
    Serial,
    Checkpoint(u32),
    Halt,
    /// The VMM answered an MMIO read of the device (the answer is in the exit's buffer).
    MmioRead,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The hook asked to stop (at a clean exit boundary).
    Paused,
    End(End),
}

/// Load `name` as a one-vCPU SEV-ES guest and run the whole launch sequence.
fn launch(name: &str, args: &str) -> SevGuest {
    let psp = platform();
    let (vm, vcpu) = launch_sev(name, args, MEM, psp.clone(), |_| {});
    SevGuest {
        vm,
        vcpus: vec![vcpu],
        psp,
        serial: Vec::new(),
        mmio: vec![0; 4096],
        mmio_reads: 0,
        launcher: None,
    }
}

impl SevGuest {
    /// Run vCPU 0 until the guest ends or `hook` returns true ("pause here").
    fn run(&mut self, mut hook: impl FnMut(&mut dyn Vcpu, &[u8], Ev) -> bool) -> Outcome {
        for _ in 0..1_000_000 {
            let vcpu = &mut self.vcpus[0];
            vcpu.set_instruction_budget(Some(50_000_000)).unwrap();
            let mut ev = None;
            match vcpu.run().unwrap() {
                VmExit::IoOut { port: 0x3f8, data } => {
                    self.serial.push(data[0]);
                    ev = Some(Ev::Serial);
                }
                VmExit::IoOut { port: 0xf4, data } => return Outcome::End(End::Exit(data[0])),
                VmExit::IoOut { port, data } if port == checkpoint::PORT => {
                    let mut v = [0u8; 4];
                    v[..data.len()].copy_from_slice(data);
                    ev = Some(Ev::Checkpoint(u32::from_le_bytes(v)));
                }
                VmExit::IoOut { .. } => {}
                // 16550 line status: transmitter empty.
                VmExit::IoIn { port: 0x3fd, data } => data[0] = 0x60,
                VmExit::IoIn { data, .. } => data.fill(0xff),
                VmExit::MmioRead { addr, data } => match mmio_offset(addr, data.len()) {
                    Some(off) => {
                        data.copy_from_slice(&self.mmio[off..off + data.len()]);
                        self.mmio_reads += 1;
                        ev = Some(Ev::MmioRead);
                    }
                    None => data.fill(0xff),
                },
                VmExit::MmioWrite { addr, data } => {
                    if let Some(off) = mmio_offset(addr, data.len()) {
                        self.mmio[off..off + data.len()].copy_from_slice(data);
                    }
                }
                VmExit::Hlt => ev = Some(Ev::Halt),
                VmExit::Terminated { reason } => return Outcome::End(End::Terminated(reason)),
                VmExit::Shutdown { reason } => return Outcome::End(End::Shutdown(reason)),
                VmExit::BudgetExhausted | VmExit::Interrupted => {}
                other => panic!("unexpected exit {other:?}"),
            }
            if let Some(ev) = ev {
                let halt = matches!(ev, Ev::Halt);
                if hook(self.vcpus[0].as_mut(), &self.serial, ev) {
                    return Outcome::Paused;
                }
                if halt && self.vcpus[0].get_events().unwrap().halted {
                    return Outcome::End(End::Shutdown(format!("halted: {}", self.serial_text())));
                }
            }
        }
        panic!("guest did not finish: {}", self.serial_text());
    }

    fn run_to_end(&mut self) -> End {
        match self.run(|_, _, _| false) {
            Outcome::End(e) => e,
            Outcome::Paused => unreachable!(),
        }
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }

    /// Create a fresh SEV-ES VM over this guest's memory with the same vCPUs and move the
    /// guest into it; on success `self` is the dead source.
    fn move_to_new_vm(&mut self) -> Result<SevGuest, HvError> {
        let cfg = sev_config(self.vm.memory().size(), self.vcpus.len() as u32);
        let vm = Arc::new(EmuVm::new_sharing_memory(&cfg, &self.vm)?);
        let mut vcpus: Vec<Box<dyn Vcpu>> = self
            .vcpus
            .iter()
            .map(|v| vm.create_vcpu(v.id()))
            .collect::<Result<_, _>>()?;
        vm.move_enc_context_from(&mut vcpus, &*self.vm, &mut self.vcpus)?;
        Ok(SevGuest {
            vm,
            vcpus,
            psp: self.psp.clone(),
            serial: std::mem::take(&mut self.serial),
            mmio: std::mem::take(&mut self.mmio),
            mmio_reads: self.mmio_reads,
            launcher: None,
        })
    }
}

fn tracked(v: &dyn Vcpu) -> esvm_hv::TrackedSregs {
    match v.get_sregs_view().unwrap() {
        SregsView::Tracked(t) => t,
        SregsView::Full(_) => panic!("vCPU {} is not protected", v.id()),
    }
}

/// What a move must carry over, read through the hypervisor's API.
#[derive(Debug, PartialEq)]
struct HostView {
    tracked: esvm_hv::TrackedSregs,
    ghcb_msr: u64,
    events: esvm_arch::PendingEvents,
    tsc: u64,
    handle: Option<u32>,
}

fn host_view(g: &SevGuest) -> HostView {
    let v = g.vcpus[0].as_ref();
    HostView {
        tracked: tracked(v),
        ghcb_msr: v.sev().unwrap().ghcb_msr().unwrap(),
        events: v.get_events().unwrap(),
        tsc: v.get_tsc().unwrap(),
        handle: g.vm.handle(),
    }
}

fn err_text<T>(r: Result<T, HvError>, what: &str) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{what}: expected an error"),
    }
}

/// The source after a successful move: dead for running, for SEV commands (its own and its
/// vCPUs'), for the dirty log and for further moves; its vCPU keeps no guest state. (The
/// launch commands after LAUNCH_START exist only on a launch in progress: see
/// `a_launch_in_progress_dies_with_its_vm`.)
fn assert_dead(g: &mut SevGuest) {
    assert!(g.vm.is_dead());
    assert_eq!(g.vm.handle(), None);
    assert!(g.vm.sev_context().is_none());
    let v = g.vcpus[0].as_mut();
    let e = err_text(v.run().map(|_| ()), "run on a dead VM");
    assert!(e.contains("dead") && e.contains("destination VM"), "{e}");
    let e = err_text(v.sev().unwrap().encrypted_vmsa(), "VMSA of a dead vCPU");
    assert!(e.contains("dead"), "{e}");
    assert!(!v.is_protected(), "the guest state went to the destination");
    assert_eq!(
        v.get_regs().unwrap().rip,
        0xfff0,
        "a dead vCPU is scrubbed to RESET"
    );
    for (what, r) in [
        ("SEND_START", g.vm.send_start(&[]).map(|_| ())),
        ("host state", g.vm.host_state().map(|_| ())),
        (
            "LAUNCH_START",
            launch_start(&g.vm, g.psp.clone()).map(|_| ()),
        ),
    ] {
        let e = err_text(r, what);
        assert!(e.contains("dead"), "{what}: {e}");
    }
    let e = err_text(g.vm.take_dirty_log(), "dirty log of a dead VM");
    assert!(e.contains("dead"), "{e}");
}

/// A launch cut short by a move (a guest whose vCPUs are protected may move before
/// LAUNCH_FINISH) cannot go on at the dead source: LAUNCH_UPDATE_VMSA and LAUNCH_MEASURE
/// (moved while started), LAUNCH_SECRET and LAUNCH_FINISH (moved while measured) are refused
/// there, saying why.
#[test]
fn a_launch_in_progress_dies_with_its_vm() {
    let mut g = bare_guest(1, &[0]);
    let mut started = g.launcher.take().unwrap();
    let _moved = g.move_to_new_vm().unwrap();
    let e = err_text(
        started.update_vmsa(g.vcpus[0].as_mut()),
        "LAUNCH_UPDATE_VMSA on a dead VM",
    );
    assert!(e.contains("dead"), "{e}");
    let e = err_text(started.measure().map(|_| ()), "LAUNCH_MEASURE on a dead VM");
    assert!(e.contains("dead"), "{e}");

    let mut g = bare_guest(1, &[0]);
    let mut measured = g.launcher.take().unwrap().measure().unwrap();
    let _moved = g.move_to_new_vm().unwrap();
    let header = esvm_psp::PacketHeader::from_bytes(&[0; PACKET_HEADER_LEN]).unwrap();
    let e = err_text(
        measured.inject_secret(0x4000, &header, &[0; 16]),
        "LAUNCH_SECRET on a dead VM",
    );
    assert!(e.contains("dead"), "{e}");
    let e = err_text(measured.finish().map(|_| ()), "LAUNCH_FINISH on a dead VM");
    assert!(e.contains("dead"), "{e}");
}

/// sevdemo (with a dirty buffer, so guest memory matters) moves at tick 3 from A to B and at
/// tick 6 from B to C and finishes there with the exact output of an unmoved run; every move
/// keeps the firmware context and the vCPU's host-visible state; afterwards moving back into
/// A, or out of A or B, fails because they are dead.
#[test]
fn sevdemo_moves_twice_mid_run_and_finishes_with_the_right_checksum() {
    let args = "iterations=3000 dirty-mib=1";
    let mut a = launch("sevdemo", args);
    let ctx = a.vm.sev_context().unwrap();
    let pause_at = |tick: &'static str| {
        move |_: &mut dyn Vcpu, serial: &[u8], ev: Ev| {
            matches!(ev, Ev::Serial) && serial.ends_with(format!("tick {tick}\n").as_bytes())
        }
    };
    assert_eq!(a.run(pause_at("3")), Outcome::Paused, "{}", a.serial_text());
    let before = host_view(&a);
    let mut b = a.move_to_new_vm().unwrap();
    assert_eq!(host_view(&b), before, "A -> B");
    assert!(
        Arc::ptr_eq(&b.vm.sev_context().unwrap(), &ctx),
        "same guest context"
    );
    assert_dead(&mut a);

    assert_eq!(b.run(pause_at("6")), Outcome::Paused, "{}", b.serial_text());
    let before = host_view(&b);
    let mut c = b.move_to_new_vm().unwrap();
    assert_eq!(host_view(&c), before, "B -> C");
    assert_dead(&mut b);
    assert_eq!(
        c.psp.lock().unwrap().guest_handles().len(),
        1,
        "no new firmware context (no SEND/RECEIVE)"
    );

    assert_eq!(c.run_to_end(), End::Exit(0), "{}", c.serial_text());
    assert_eq!(
        c.serial_text(),
        esvm_guests::demo::expected_output_sev(MEM, 1, args, 3000, 1)
    );
    assert!(
        c.vm.take_dirty_log().unwrap().count() > 0,
        "C holds the dirty log"
    );

    // Back into the first VM (KVM: EIO), out of a dead VM, into a dead VM.
    let e = err_text(
        a.vm.move_enc_context_from(&mut a.vcpus, &*c.vm, &mut c.vcpus),
        "C -> A",
    );
    assert!(e.contains("destination VM is dead"), "{e}");
    let e = err_text(a.move_to_new_vm().map(|_| ()), "A -> new");
    assert!(e.contains("dead"), "{e}");
    let fresh = EmuVm::new_sharing_memory(&sev_config(MEM, 1), &c.vm).unwrap();
    let mut fresh_vcpus = vec![fresh.create_vcpu(0).unwrap()];
    let e = err_text(
        fresh.move_enc_context_from(&mut fresh_vcpus, &*b.vm, &mut b.vcpus),
        "B -> fresh",
    );
    assert!(e.contains("source VM is dead"), "{e}");
    // C is unaffected by all of that.
    assert!(!c.vm.is_dead() && c.vcpus[0].is_protected());
}

/// sev-pf waits (halted) for a #PF; the hypervisor queues it on the source, then moves the
/// guest: the pending exception, the tracked registers and the GHCB state go with the vCPU,
/// and the guest takes the #PF with its error code on the destination and passes.
#[test]
fn pending_exception_tracked_view_and_ghcb_state_move_with_the_vcpu() {
    let mut src = launch("sev-pf", "ec=6");
    let mut ready = false;
    let paused = src.run(|v, _, ev| match ev {
        Ev::Checkpoint(c) => {
            ready |= checkpoint::decode(c) == Some(Checkpoint::PfReady);
            false
        }
        Ev::Halt if ready => {
            v.inject_exception(14, Some(6)).unwrap();
            let mut e = v.get_events().unwrap();
            e.halted = false;
            v.set_events(&e).unwrap();
            true
        }
        _ => false,
    });
    assert_eq!(paused, Outcome::Paused, "{}", src.serial_text());
    let before = host_view(&src);
    assert_eq!(
        before.events.exception.map(|e| (e.vector, e.error_code)),
        Some((14, Some(6)))
    );
    assert!(before.tracked.cr0 & 1 != 0, "long-mode guest: {before:?}");
    assert_ne!(before.ghcb_msr, 0, "the guest has set up its GHCB");
    let mut dst = src.move_to_new_vm().unwrap();
    assert_eq!(host_view(&dst), before);
    let v = dst.vcpus[0].as_mut();
    assert!(v.is_protected());
    assert!(matches!(
        v.get_regs(),
        Err(HvError::ProtectedState { vcpu: 0, .. })
    ));
    v.sev().unwrap().encrypted_vmsa().unwrap();
    assert_dead(&mut src);
    assert_eq!(dst.run_to_end(), End::Exit(0), "{}", dst.serial_text());
}

/// A GHCB request blocked on the VMM moves with the VMM's answer: sev-mmio's MMIO reads go
/// through #VC and the GHCB; the guest moves while one of them waits, with the device's
/// answer already given. The destination completes the request with that answer instead of
/// reading the device again: the device sees exactly the reads of an unmoved run, and the
/// guest's output is the same.
#[test]
fn a_ghcb_request_waiting_for_the_vmm_moves_with_its_answer() {
    let mut reference = launch("sev-mmio", "");
    assert_eq!(
        reference.run_to_end(),
        End::Exit(0),
        "{}",
        reference.serial_text()
    );
    let reads = reference.mmio_reads;
    assert!(reads > 4, "{reads} MMIO reads");

    let mut src = launch("sev-mmio", "");
    let mut seen = 0;
    let paused = src.run(|_, _, ev| {
        seen += usize::from(matches!(ev, Ev::MmioRead));
        seen == reads / 2
    });
    assert_eq!(paused, Outcome::Paused, "{}", src.serial_text());
    assert!(src.vcpus[0].exit_pending(), "the GHCB request is in flight");
    let mut dst = src.move_to_new_vm().unwrap();
    assert!(dst.vcpus[0].exit_pending(), "the request moved");
    assert_eq!(dst.run_to_end(), End::Exit(0), "{}", dst.serial_text());
    assert_eq!(dst.serial_text(), reference.serial_text());
    assert_eq!(dst.mmio_reads, reads, "the device was read again");
}

/// An SEV-ES VM with `vcpus` vCPUs after LAUNCH_START, no guest loaded; `protect` says which
/// vCPUs go through LAUNCH_UPDATE_VMSA.
fn bare_guest(vcpus: u32, protect: &[u32]) -> SevGuest {
    let vm = Arc::new(EmuVm::new(&sev_config(4 << 20, vcpus)).unwrap());
    let mut vs: Vec<Box<dyn Vcpu>> = (0..vcpus).map(|i| vm.create_vcpu(i).unwrap()).collect();
    let psp = platform();
    let mut launcher = launch_start(&vm, psp.clone()).unwrap();
    for v in &mut vs {
        if protect.contains(&v.id()) {
            launcher.update_vmsa(v.as_mut()).unwrap();
        }
    }
    SevGuest {
        vm,
        vcpus: vs,
        psp,
        serial: Vec::new(),
        mmio: vec![0; 4096],
        mmio_reads: 0,
        launcher: Some(launcher),
    }
}

/// A VM over `src`'s memory with vCPUs `ids`.
fn sharing(src: &EmuVm, vm_type: VmType, ids: &[u32]) -> (Arc<EmuVm>, Vec<Box<dyn Vcpu>>) {
    let mut cfg = VmConfig::plain(src.memory().size(), 4);
    cfg.vm_type = vm_type;
    let vm = Arc::new(EmuVm::new_sharing_memory(&cfg, src).unwrap());
    let vcpus = ids.iter().map(|i| vm.create_vcpu(*i).unwrap()).collect();
    (vm, vcpus)
}

fn refused(r: Result<(), HvError>, what: &str, needle: &str) {
    let e = err_text(r, what);
    assert!(e.contains(needle), "{what}: {e:?} does not say {needle:?}");
}

/// KVM's parameter errors (and the emu model's own), each on otherwise valid parameters, each
/// leaving the source intact: at the end the same source moves and its guest completes.
#[test]
fn parameter_errors_are_refused_and_change_nothing() {
    // Non-SEV source (into an SEV-ES VM).
    let plain = EmuVm::new(&VmConfig::plain(4 << 20, 1)).unwrap();
    let mut plain_vcpus = vec![plain.create_vcpu(0).unwrap()];
    let (d, mut dv) = sharing(&plain, VmType::SevEs, &[0]);
    refused(
        d.move_enc_context_from(&mut dv, &plain, &mut plain_vcpus),
        "plain source",
        "source is a plain VM",
    );

    // SEV-ES source without a guest context.
    let unlaunched = EmuVm::new(&sev_config(4 << 20, 1)).unwrap();
    let mut uv = vec![unlaunched.create_vcpu(0).unwrap()];
    let (d, mut dv) = sharing(&unlaunched, VmType::SevEs, &[0]);
    refused(
        d.move_enc_context_from(&mut dv, &unlaunched, &mut uv),
        "source without context",
        "no SEV-ES guest context",
    );

    // A source vCPU without LAUNCH_UPDATE_VMSA (vCPU 1 of 2).
    let mut half = bare_guest(2, &[0]);
    let (d, mut dv) = sharing(&half.vm, VmType::SevEs, &[0, 1]);
    refused(
        d.move_enc_context_from(&mut dv, &*half.vm, &mut half.vcpus),
        "unprotected source vCPU",
        "source vCPU 1 has no encrypted VMSA",
    );
    // Once it is protected, the same destination takes the guest (the refusal changed
    // nothing on either side).
    let launcher = half.launcher.as_mut().unwrap();
    launcher.update_vmsa(half.vcpus[1].as_mut()).unwrap();
    d.move_enc_context_from(&mut dv, &*half.vm, &mut half.vcpus)
        .unwrap();
    assert!(dv.iter().all(|v| v.is_protected()) && half.vm.is_dead());

    // The real guest for the remaining cases.
    let mut g = launch("sevdemo", "iterations=200");
    let src = g.vm.clone();

    // SEV-ES source into a plain VM.
    let (d, mut dv) = sharing(&src, VmType::Plain, &[0]);
    refused(
        d.move_enc_context_from(&mut dv, &*src, &mut g.vcpus),
        "plain destination",
        "destination is a plain VM",
    );
    // vCPU count mismatch.
    let (d, mut dv) = sharing(&src, VmType::SevEs, &[0, 1]);
    refused(
        d.move_enc_context_from(&mut dv, &*src, &mut g.vcpus),
        "vCPU count",
        "vCPU mismatch",
    );
    // Same count, other ids.
    let (d, mut dv) = sharing(&src, VmType::SevEs, &[1]);
    refused(
        d.move_enc_context_from(&mut dv, &*src, &mut g.vcpus),
        "vCPU ids",
        "vCPU mismatch",
    );
    // A destination that already has a guest context.
    let other = bare_guest(1, &[0]);
    let mut other_vcpus = other.vcpus;
    refused(
        other
            .vm
            .move_enc_context_from(&mut other_vcpus, &*src, &mut g.vcpus),
        "destination with a context",
        "destination already has an SEV-ES guest context",
    );
    // A destination over other memory.
    let elsewhere = EmuVm::new(&sev_config(MEM, 1)).unwrap();
    let mut ev = vec![elsewhere.create_vcpu(0).unwrap()];
    refused(
        elsewhere.move_enc_context_from(&mut ev, &*src, &mut g.vcpus),
        "destination over other memory",
        "does not map the source's guest memory",
    );
    // The same VM.
    refused(
        src.move_enc_context_from(&mut [], &*src, &mut g.vcpus),
        "same VM",
        "same VM",
    );
    // vCPU lists that are not the VMs' own.
    let (d, mut dv) = sharing(&src, VmType::SevEs, &[0]);
    refused(
        d.move_enc_context_from(&mut [], &*src, &mut g.vcpus),
        "missing destination vCPU",
        "pass every one of them",
    );
    refused(
        d.move_enc_context_from(&mut dv, &*src, &mut ev),
        "foreign source vCPU",
        "belongs to another VM",
    );
    // A VM waiting for a moved context refuses LAUNCH_START and cannot run.
    refused(
        launch_start(&d, g.psp.clone()).map(|_| ()),
        "LAUNCH_START on a waiting VM",
        "new_sharing_memory",
    );
    let e = err_text(dv[0].run().map(|_| ()), "run on a waiting VM");
    assert!(e.contains("new_sharing_memory"), "{e}");

    // Nothing changed: the source runs on, then moves, and the guest completes.
    assert!(!src.is_dead() && g.vcpus[0].is_protected());
    assert_eq!(
        g.run(|_, s, ev| matches!(ev, Ev::Serial) && s.ends_with(b"tick 2\n")),
        Outcome::Paused
    );
    d.move_enc_context_from(&mut dv, &*src, &mut g.vcpus)
        .unwrap();
    let mut moved = SevGuest {
        vm: d,
        vcpus: dv,
        psp: g.psp.clone(),
        serial: std::mem::take(&mut g.serial),
        mmio: vec![0; 4096],
        mmio_reads: 0,
        launcher: None,
    };
    assert_eq!(moved.run_to_end(), End::Exit(0), "{}", moved.serial_text());
    assert_eq!(
        moved.serial_text(),
        esvm_guests::demo::expected_output_sev(MEM, 1, "iterations=200", 200, 0)
    );
}

/// KVM's locking test: three threads each move into their own VM from every VM in turn, many
/// times, all at once. Nothing deadlocks (each call returns), and the outcome is consistent:
/// the guest context ends up in exactly one live VM, and every successful move killed one VM.
#[test]
fn concurrent_cross_moves_do_not_deadlock() {
    const THREADS: usize = 3;
    const ITERATIONS: usize = 10_000;
    let first = Arc::new(EmuVm::new(&sev_config(1 << 20, 1)).unwrap());
    launch_start(&first, platform()).unwrap();
    let handle = first.handle();
    let mut vms = vec![first.clone()];
    for _ in 1..THREADS {
        vms.push(Arc::new(
            EmuVm::new_sharing_memory(&sev_config(1 << 20, 1), &first).unwrap(),
        ));
    }
    let vms = Arc::new(vms);
    let moved = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (vms, moved, busy, start) =
                (vms.clone(), moved.clone(), busy.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..ITERATIONS {
                    let src = &vms[i % THREADS];
                    match vms[t].move_enc_context_from(&mut [], &**src, &mut []) {
                        Ok(()) => {
                            moved.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.to_string().contains("another move") => {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let holders: Vec<_> = vms
        .iter()
        .filter(|v| !v.is_dead() && v.handle().is_some())
        .collect();
    assert_eq!(holders.len(), 1, "exactly one VM holds the guest");
    assert_eq!(holders[0].handle(), handle);
    let dead = vms.iter().filter(|v| v.is_dead()).count();
    assert_eq!(moved.load(Ordering::Relaxed), dead);
    eprintln!(
        "fixed VMs: {} moves, {} refused as busy",
        moved.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed)
    );
}

/// Churn: three threads keep creating VMs over the guest's memory and moving the guest
/// between random VMs of the growing pool, all at once, so that many moves succeed while
/// others race them. Every call returns, the guest ends up in exactly one live VM (with its
/// original firmware handle), and the number of successful moves is the number of dead VMs.
#[test]
fn concurrent_moves_among_new_vms_stay_consistent() {
    const THREADS: usize = 3;
    const ITERATIONS: usize = 2_000;
    let first = Arc::new(EmuVm::new(&sev_config(1 << 20, 1)).unwrap());
    launch_start(&first, platform()).unwrap();
    let handle = first.handle();
    let pool = Arc::new(Mutex::new(vec![first.clone()]));
    // The last VM a thread moved the guest into (a hint: other threads race it).
    let hint = Arc::new(Mutex::new(first));
    let moved = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, hint, moved, start) =
                (pool.clone(), hint.clone(), moved.clone(), start.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                let mut next = move || {
                    // xorshift64
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as usize
                };
                start.wait();
                for _ in 0..ITERATIONS {
                    let holder = hint.lock().unwrap().clone();
                    // A new VM over the memory (refused when `holder` died meanwhile), and
                    // the guest into it.
                    if let Ok(n) = EmuVm::new_sharing_memory(&sev_config(1 << 20, 1), &holder) {
                        let n = Arc::new(n);
                        pool.lock().unwrap().push(n.clone());
                        if n.move_enc_context_from(&mut [], &*holder, &mut []).is_ok() {
                            moved.fetch_add(1, Ordering::Relaxed);
                            *hint.lock().unwrap() = n;
                        }
                    }
                    // A cross move between random VMs of the pool (mostly refused).
                    let (a, b) = {
                        let p = pool.lock().unwrap();
                        (p[next() % p.len()].clone(), p[next() % p.len()].clone())
                    };
                    if a.move_enc_context_from(&mut [], &*b, &mut []).is_ok() {
                        moved.fetch_add(1, Ordering::Relaxed);
                        *hint.lock().unwrap() = a;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let pool = pool.lock().unwrap();
    let holders: Vec<_> = pool
        .iter()
        .filter(|v| !v.is_dead() && v.handle().is_some())
        .collect();
    assert_eq!(holders.len(), 1, "exactly one VM holds the guest");
    assert_eq!(holders[0].handle(), handle);
    let dead = pool.iter().filter(|v| v.is_dead()).count();
    assert_eq!(moved.load(Ordering::Relaxed), dead);
    assert!(dead > ITERATIONS / 10, "the guest moved only {dead} times");
    eprintln!("pool of {}: {dead} moves", pool.len());
}
