//! The local APIC of an SEV-ES guest through its MSRs: the guest's RDMSR/WRMSR of
//! IA32_TSC_DEADLINE and the x2APIC registers raise #VC, its #VC handler forwards them by
//! VMGEXIT (MSR), and the hypervisor hands them to the VMM as the RdMsr/WrMsr exits of a
//! plain vCPU. Here the VMM is a small run loop over esvm's real devices (`esvm_devices`:
//! local APIC, serial port, debug exit) on virtual time (retired instructions plus the time
//! skipped in HLT), as the esvm binary's machine runs them.
//!
//! The guest is `sev-apic` (guests/bin/sev-apic.rs): x2APIC registers, #GP for refused
//! accesses, and the TSC-deadline timer, whose interrupt must come when the deadline is
//! reached.

mod common;

use std::sync::{Arc, Mutex};

use common::{launch_sev_with, platform, sev_config};

use esvm_devices::Devices;
use esvm_hv::emu::EmuVm;
use esvm_hv::ghcb::VmgexitKind;
use esvm_hv::sev::{SevVm, MSR_TSC_DEADLINE};
use esvm_hv::{Vcpu, Vm, VmExit};

const MEM: u64 = 64 << 20;
const IA32_APIC_BASE: u32 = 0x1b;
const TIMER_VECTOR: u8 = 0x40;

/// COM1's output, shared with the devices.
#[derive(Clone, Default)]
struct Serial(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Serial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One forwarded MSR access the VMM saw: (index, written value or None for a read,
/// refused).
type MsrAccess = (u32, Option<u64>, bool);

/// The VMM: devices, virtual time, and what it saw.
struct Host {
    devices: Devices,
    serial: Serial,
    idle_ns: u64,
    /// The MSR exits of the guest, in order.
    msrs: Vec<MsrAccess>,
    /// IA32_TSC_DEADLINE writes: (value, the virtual time its deadline falls on).
    deadlines: Vec<(u64, u64)>,
    /// Timer interrupts handed to the vCPU, at these virtual times.
    timer_irqs: Vec<u64>,
}

/// Why the run stopped.
#[derive(Debug, PartialEq)]
enum Stop {
    Exit(u8),
    /// `pause` asked to stop after the VMM answered an exit.
    Paused,
}

impl Host {
    fn new() -> Self {
        let serial = Serial::default();
        Host {
            devices: Devices::new(Box::new(serial.clone())),
            serial,
            idle_ns: 0,
            msrs: Vec::new(),
            deadlines: Vec::new(),
            timer_irqs: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.serial.0.lock().unwrap()).into_owned()
    }

    fn now(&self, vcpu: &dyn Vcpu) -> u64 {
        vcpu.instructions_retired().unwrap() + self.idle_ns
    }

    /// The devices follow the tracked APIC base and CR8 of the protected vCPU.
    fn sync_apic(&mut self, vcpu: &dyn Vcpu) {
        let view = vcpu.get_sregs_view().unwrap();
        self.devices.set_apic_base(view.apic_base());
        self.devices.sync_cr8(view.cr8());
    }

    /// Run `vcpu` until the guest exits, or until `pause` (shown each MSR exit after it
    /// was answered) says stop.
    fn run(&mut self, vcpu: &mut dyn Vcpu, mut pause: impl FnMut(&MsrAccess) -> bool) -> Stop {
        self.sync_apic(vcpu);
        for _ in 0..1_000_000 {
            let now = self.now(vcpu);
            self.devices.advance_to(now);
            if self.devices.has_interrupt_request() {
                self.sync_apic(vcpu);
            }
            if let Some(vector) = self.devices.pending_interrupt() {
                let cr8 = vcpu.get_sregs_view().unwrap().cr8();
                if vcpu.get_events().unwrap().interrupt.is_none()
                    && vcpu.interrupt_window_open().unwrap()
                    && esvm_hv::sev::tpr_accepts(cr8, vector)
                {
                    let v = self.devices.acknowledge_interrupt();
                    if v == TIMER_VECTOR {
                        self.timer_irqs.push(now);
                    }
                    vcpu.queue_interrupt(v).unwrap();
                }
            }
            let mut slice = 10_000_000;
            if let Some(d) = self.devices.next_deadline_ns() {
                slice = d.saturating_sub(now).clamp(1, slice);
            }
            if self.devices.pending_interrupt().is_some() {
                slice = slice.min(64);
            }
            vcpu.set_instruction_budget(Some(slice)).unwrap();
            let mut access = None;
            let mut deadline = None;
            let mut apic_base_written = false;
            match vcpu.run().unwrap() {
                VmExit::IoOut { port, data } => {
                    self.devices.io_write(port, data).unwrap();
                    if let Some(code) = self.devices.take_exit_request() {
                        return Stop::Exit(code);
                    }
                }
                VmExit::IoIn { port, data } => self.devices.io_read(port, data).unwrap(),
                VmExit::MmioRead { addr, data } => {
                    if !self.devices.mmio_read(addr, data) {
                        data.fill(0xff);
                    }
                }
                VmExit::MmioWrite { addr, data } => {
                    self.devices.mmio_write(addr, data);
                }
                VmExit::WrMsr {
                    index: IA32_APIC_BASE,
                    ..
                } => apic_base_written = true,
                VmExit::RdMsr {
                    index,
                    value,
                    fault,
                } => {
                    match self.devices.apic_msr_read(index) {
                        Some(v) => *value = v,
                        None => *fault = true,
                    }
                    access = Some((index, None, *fault));
                }
                VmExit::WrMsr {
                    index,
                    value,
                    fault,
                } => {
                    *fault = !self.devices.apic_msr_writable(index);
                    if !*fault {
                        deadline = Some((index, value));
                    }
                    access = Some((index, Some(value), *fault));
                }
                VmExit::Hlt => {
                    assert!(
                        vcpu.interrupts_enabled().unwrap(),
                        "halted with interrupts off: {}",
                        self.text()
                    );
                    if self.devices.pending_interrupt().is_none() {
                        let d = self
                            .devices
                            .next_deadline_ns()
                            .unwrap_or_else(|| panic!("halted forever: {}", self.text()));
                        let skip = d.saturating_sub(self.now(vcpu));
                        self.idle_ns += skip;
                        let tsc = vcpu.get_tsc().unwrap();
                        vcpu.set_tsc(tsc + skip).unwrap();
                    }
                }
                VmExit::BudgetExhausted | VmExit::Interrupted => {}
                other => panic!("unexpected exit {other:?}: {}", self.text()),
            }
            if apic_base_written {
                self.sync_apic(vcpu);
            }
            if let Some((index, value)) = deadline {
                let tsc = vcpu.get_tsc().unwrap();
                let now = self.now(vcpu);
                self.devices.advance_to(now);
                self.devices.apic_msr_write(index, value, tsc);
                if index == MSR_TSC_DEADLINE {
                    self.deadlines
                        .push((value, now + value.saturating_sub(tsc)));
                }
            }
            if let Some(a) = access {
                self.msrs.push(a);
                if pause(&a) {
                    return Stop::Paused;
                }
            }
        }
        panic!("the guest did not finish: {}", self.text());
    }
}

/// `sev-apic` launched as a one-vCPU SEV-ES guest whose CPUID offers the local APIC with
/// x2APIC and the TSC-deadline timer, as the esvm machine's does.
fn launch(args: &str) -> (Arc<EmuVm>, Box<dyn Vcpu>) {
    launch_sev_with(config(), "sev-apic", args, platform(), |_| {})
}

fn config() -> esvm_hv::VmConfig {
    let mut cfg = sev_config(MEM, 1);
    cfg.cpuid = cfg.cpuid.clone().with_local_apic(true, true);
    cfg
}

/// The SEV-ES guest reads and writes x2APIC registers and arms the TSC-deadline timer through
/// the GHCB; every access reaches the VMM's local APIC as an MSR exit; the accesses the
/// APIC refuses (a write of the read-only version register, a read of a register that does
/// not exist) reach the guest as #GP, which it catches; each timer interrupt is handed over
/// at exactly the virtual time its deadline falls on, and the guest sees its TSC just past
/// the deadline.
#[test]
fn an_sev_es_guest_runs_the_x2apic_and_tsc_deadline_timer_through_the_ghcb() {
    let (_vm, mut vcpu) = launch("timers=3 delta=500000 slack=2000");
    let mut host = Host::new();
    assert_eq!(
        host.run(vcpu.as_mut(), |_| false),
        Stop::Exit(0),
        "{}",
        host.text()
    );
    let text = host.text();
    assert!(text.contains("sev-apic: SEV-ES guest;"), "{text}");
    assert!(
        text.contains("sev-apic: refused accesses raise #GP"),
        "{text}"
    );
    assert!(text.contains("sev-apic: all checks passed"), "{text}");
    // The refused accesses went to the VMM's APIC, which refused them.
    assert!(
        host.msrs.contains(&(0x803, Some(0), true)),
        "{:x?}",
        host.msrs
    );
    assert!(host.msrs.contains(&(0x801, None, true)), "{:x?}", host.msrs);
    assert!(
        host.msrs.contains(&(0x80f, Some(0x1ff), false)),
        "{:x?}",
        host.msrs
    );
    // EOIs through the x2APIC MSR, one per timer.
    let eois = host.msrs.iter().filter(|a| a.0 == 0x80b).count();
    assert_eq!(eois, 3, "{:x?}", host.msrs);
    // Each timer came when its deadline was reached: the interrupt was handed over at the
    // virtual time of the deadline (the guest halts meanwhile, so virtual time skips there).
    assert_eq!(host.deadlines.len(), 3);
    assert_eq!(host.timer_irqs.len(), 3, "{text}");
    for ((_, due), at) in host.deadlines.iter().zip(&host.timer_irqs) {
        assert_eq!(at, due, "timer handed over at {at}, due at {due}");
    }
    for line in text
        .lines()
        .filter(|l| l.contains("ticks after its deadline"))
    {
        let ticks: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(ticks < 200, "{line}");
    }
    // Every forwarded access was one VMGEXIT (MSR), besides the APIC base's.
    let counts = vcpu.sev().unwrap().vmgexits().unwrap();
    let msr_exits = counts.get(VmgexitKind::Ghcb(esvm_abi::exit_code::MSR));
    assert!(msr_exits > host.msrs.len() as u64, "{counts:?}");
}

/// A forwarded MSR access the VMM answered moves with its answer (a same-host move of the
/// encryption context while the request is in flight): the destination completes the
/// guest's RDMSR/WRMSR with that answer instead of asking the VMM again, so the local APIC
/// sees every access exactly once, and the guest finishes as in an unmoved run.
#[test]
fn a_forwarded_msr_access_in_flight_moves_with_its_answer() {
    let (_, mut reference) = launch("timers=2");
    let mut ref_host = Host::new();
    assert_eq!(ref_host.run(reference.as_mut(), |_| false), Stop::Exit(0));

    // Move in the middle of the version read, of the refused version write, and of the
    // first deadline write.
    for stop_at in [
        (0x803u32, None, false),
        (0x803, Some(0), true),
        (MSR_TSC_DEADLINE, None, false),
    ] {
        let (vm, vcpu) = launch("timers=2");
        let mut vcpus = vec![vcpu];
        let mut host = Host::new();
        let stopped = host.run(vcpus[0].as_mut(), |a| {
            a.0 == stop_at.0 && a.2 == stop_at.2 && (stop_at.1.is_none() || a.1 == stop_at.1)
        });
        assert_eq!(stopped, Stop::Paused, "{}", host.text());
        assert!(vcpus[0].exit_pending(), "the GHCB request is in flight");
        let retired = vcpus[0].instructions_retired().unwrap();
        let dst_vm = Arc::new(EmuVm::new_sharing_memory(&config(), &vm).unwrap());
        let mut dst: Vec<Box<dyn Vcpu>> = vec![dst_vm.create_vcpu(0).unwrap()];
        dst_vm
            .move_enc_context_from(&mut dst, &*vm, &mut vcpus)
            .unwrap();
        assert!(dst[0].exit_pending(), "the request moved");
        // The devices (the VMM's) stay; virtual time goes on from the source's count.
        host.idle_ns += retired;
        assert_eq!(
            host.run(dst[0].as_mut(), |_| false),
            Stop::Exit(0),
            "{}",
            host.text()
        );
        assert!(
            host.text().contains("sev-apic: all checks passed"),
            "{}",
            host.text()
        );
        assert_eq!(
            host.msrs, ref_host.msrs,
            "the VMM saw other MSR accesses than in the unmoved run (stop at {stop_at:x?})"
        );
    }
}
