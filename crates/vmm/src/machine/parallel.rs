//! The vCPUs of a machine in parallel, each on a host thread of its own.
//!
//! # Epochs
//!
//! A parallel run is a sequence of *epochs*. In an epoch, scoped threads
//! (`std::thread::scope`) each own one vCPU (`&mut`) and share the rest of the machine: the
//! devices, the MMIO window and the run states behind one lock ([`Side`]), the published
//! instruction counts in atomics. A vCPU executes guest instructions without the lock and
//! takes it to handle its exit. An epoch ends when the machine as a whole is needed: the
//! control wants attention (pause, a job such as a snapshot's or a migration's, a stop), an
//! outcome ends the VM, `--max-instructions` is reached, or an INIT or SIPI waits for a
//! vCPU (the AP state machine, [`Machine::apply_ap_signal`], runs on the whole machine).
//! Every thread is then kicked and stops at a clean point — its exit fully handled
//! (`mid_exit` false: never inside an instruction or a GHCB exchange) — the scope joins, and
//! the machine's loop services the control with `&mut Machine` as in the one-thread mode.
//!
//! # The clock
//!
//! Virtual time is, as on one thread, every vCPU's retired instructions plus the time
//! skipped while all vCPUs were halted (1 instruction = 1 ns). Each thread publishes its
//! vCPU's count in an atomic after every run of it, so `now` is the sum of the published
//! counts plus the idle time, read under the lock. A vCPU runs slices of at most
//! [`PARALLEL_SLICE`] instructions (less before the next device deadline), so timers fire
//! within a slice of every vCPU of their time even though the clock moves with all of them.
//! `--max-instructions` is one budget: a slice takes at most what the other vCPUs' running
//! slices left of it, so the run stops at exactly the limit, as on one thread.
//!
//! A vCPU's TSC counts its own instructions; at the start of each slice it is brought
//! forward to the machine's clock (`now` plus the vCPU's offset, never back). vCPUs running
//! side by side therefore drift apart within a slice; the shared high-water mark of the
//! software vCPU (`CpuConfig::tsc_mark`, turned on for these machines) makes every guest
//! read return at least what any vCPU read before, so the TSC is monotonic on each vCPU and
//! across them (Linux's TSC warp check holds). A guest write of the TSC is kept as the
//! vCPU's offset only when it moves the TSC forward.
//!
//! # Halted vCPUs
//!
//! A halted vCPU's thread sleeps on a condition variable. A thread that handled an exit (an
//! IPI, a device interrupt, a timer that came due) wakes the sleepers whose vCPU now has an
//! interrupt it takes (or an NMI), and kicks the running vCPUs that have one waiting, so
//! that they take it at the start of their next slice. When every vCPU is halted (or waits
//! for SIPI), the last one to halt moves virtual time to the next device deadline, or waits
//! for console input, as the one-thread loop does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use esvm_devices::Devices;
use esvm_hv::{Kicker, Vcpu};

use super::{
    offer_interrupt_to, run_exit, sync_apic_of, wait_for_console_input, Clock, ExitSide, Machine,
    MachineError, VcpuRunState, MAX_SLICE_NS, MMIO_SCRATCH_LEN, WINDOW_POLL_NS,
};
use crate::console::ConsoleInput;
use crate::outcome::Outcome;
use crate::runctl::RunControl;

/// Most instructions a vCPU runs in parallel mode before it looks at the devices again
/// (100 µs of its virtual time): bounds how late a timer fires while the clock moves with
/// every vCPU.
pub const PARALLEL_SLICE: u64 = 100_000;

/// How often a sleeping (halted or waiting) vCPU thread looks at the control without being
/// woken.
const SLEEP_POLL: Duration = Duration::from_millis(5);

/// What the vCPU threads share behind the lock.
struct Side<'a> {
    devices: &'a mut Devices,
    scratch: &'a mut [u8; MMIO_SCRATCH_LEN],
    run_state: &'a mut [VcpuRunState],
    idle_ns: &'a mut u64,
    console: &'a mut Option<ConsoleInput>,
    /// Per vCPU, while it is halted: whether it halted with interrupts enabled.
    halted_if: Vec<bool>,
    /// Per vCPU: kicked for an interrupt since its slice started.
    kicked: Vec<bool>,
    /// How the epoch ended, if it ends the run (the first outcome or error wins).
    end: Option<Result<Outcome, MachineError>>,
    /// An INIT or SIPI waits for a vCPU.
    ap_signals: bool,
    /// The instruction counts of the [`Shared`] side (for `now`).
    published: &'a [AtomicU64],
    /// Per vCPU with `--max-instructions`: the published count at which its running slice
    /// ends (its share of the budget not yet retired is this minus its published count).
    slice_end: Vec<u64>,
}

impl Side<'_> {
    fn now(&self) -> u64 {
        let retired: u64 = self
            .published
            .iter()
            .map(|p| p.load(Ordering::Acquire))
            .sum();
        retired + *self.idle_ns
    }

    /// Instructions the running slices of vCPUs other than `cpu` may still retire.
    fn reserved_by_others(&self, cpu: usize) -> u64 {
        (0..self.published.len())
            .filter(|&j| j != cpu)
            .map(|j| {
                let retired = self.published[j].load(Ordering::Acquire);
                self.slice_end[j].saturating_sub(retired)
            })
            .sum()
    }

    /// Whether halted vCPU `i` has something that wakes it.
    fn wakes(&self, i: usize) -> bool {
        self.devices.nmi_pending_of(i)
            || (self.halted_if[i] && self.devices.pending_interrupt_of(i).is_some())
    }
}

/// The exit side of one vCPU thread: the lock's guard, and what the thread publishes.
struct Held<'g, 'a> {
    guard: MutexGuard<'g, Side<'a>>,
    cpu: usize,
    base: u64,
}

impl ExitSide for Held<'_, '_> {
    fn parts(&mut self) -> (&mut Devices, &mut [u8; MMIO_SCRATCH_LEN]) {
        let side = &mut *self.guard;
        (side.devices, side.scratch)
    }

    fn now_after(&mut self, vcpu: &dyn Vcpu) -> u64 {
        publish(&self.guard, self.cpu, self.base, vcpu);
        self.guard.now()
    }
}

/// Publish vCPU `cpu`'s instruction count (its backend count plus `base`).
fn publish(side: &Side<'_>, cpu: usize, base: u64, vcpu: &dyn Vcpu) {
    let n = base + vcpu.instructions_retired().unwrap_or(0);
    side.published[cpu].store(n, Ordering::Release);
}

/// What the threads of one epoch share.
struct Shared<'a> {
    side: Mutex<Side<'a>>,
    cond: Condvar,
    /// The epoch ends: every thread stops at its next clean point.
    stop: AtomicBool,
    kickers: Vec<std::sync::Arc<dyn Kicker>>,
    control: &'a RunControl<Machine>,
    apic: bool,
    max_instructions: Option<u64>,
}

impl<'a> Shared<'a> {
    fn lock(&self) -> MutexGuard<'_, Side<'a>> {
        self.side.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// End the epoch: every thread stops at its next clean point.
    fn end_epoch(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            for k in &self.kickers {
                k.kick();
            }
        }
        self.cond.notify_all();
    }

    /// End the run with `end` (the first one wins).
    fn finish(&self, side: &mut Side<'_>, end: Result<Outcome, MachineError>) {
        if side.end.is_none() {
            side.end = Some(end);
        }
        self.end_epoch();
    }

    /// After an exit of vCPU `cpu` was handled: wake the halted vCPUs that now have an
    /// interrupt to take, kick the running ones with one waiting, and end the epoch if an
    /// INIT or SIPI waits.
    fn propagate(&self, side: &mut Side<'_>, cpu: usize) {
        let mut wake = false;
        for j in 0..side.run_state.len() {
            if side.devices.has_ap_signals_of(j) {
                side.ap_signals = true;
            }
            match side.run_state[j] {
                VcpuRunState::Halted => wake |= side.wakes(j),
                VcpuRunState::Running
                    if j != cpu
                        && !side.kicked[j]
                        && (side.devices.nmi_pending_of(j)
                            || side.devices.pending_interrupt_of(j).is_some()) =>
                {
                    side.kicked[j] = true;
                    self.kickers[j].kick();
                }
                _ => {}
            }
        }
        if side.ap_signals {
            self.end_epoch();
        } else if wake {
            self.cond.notify_all();
        }
    }
}

impl Machine {
    /// The run loop with a host thread per vCPU; see the module documentation.
    pub(super) fn run_parallel(
        &mut self,
        control: &RunControl<Machine>,
    ) -> Result<Outcome, MachineError> {
        loop {
            if !self.mid_exit {
                if let Some(outcome) = self.pump_console() {
                    return Ok(outcome);
                }
                control.publish_instructions(self.instructions().unwrap_or(0));
                if control.attention() {
                    if let Some(outcome) = control.service(self) {
                        return Ok(outcome);
                    }
                }
                // INIT and SIPI (the AP state machine) on the whole machine.
                for i in 0..self.vcpus.len() {
                    for signal in self.devices.take_ap_signals_of(i) {
                        if let Some(outcome) = self.apply_ap_signal(i, signal)? {
                            return Ok(outcome);
                        }
                    }
                }
            }
            if let Some(outcome) = self.epoch(control)? {
                return Ok(outcome);
            }
        }
    }

    /// One epoch: every vCPU on a thread of its own until the machine is needed as a whole.
    /// Returns the outcome that ends the run, if one does.
    fn epoch(&mut self, control: &RunControl<Machine>) -> Result<Option<Outcome>, MachineError> {
        let n = self.vcpus.len();
        let published: Vec<AtomicU64> = self
            .vcpus
            .iter()
            .zip(&self.retired_base)
            .map(|(v, base)| AtomicU64::new(base + v.instructions_retired().unwrap_or(0)))
            .collect();
        let kickers = self.vcpus.iter().map(|v| v.kicker()).collect();
        let mid_exit_of = (self.mid_exit).then_some(self.current);
        let Clock::Virtual { idle_ns } = &mut self.clock else {
            return Err(MachineError::State(
                "vCPUs run in parallel only on virtual time (the emu backend)".into(),
            ));
        };
        let offsets = self
            .tsc_offsets
            .get_or_insert_with(|| vec![0; n])
            .as_mut_slice();
        let halted_if = self
            .vcpus
            .iter()
            .zip(self.run_state.iter())
            .map(|(v, s)| Ok(*s == VcpuRunState::Halted && v.interrupts_enabled()?))
            .collect::<Result<Vec<bool>, MachineError>>()?;
        let shared = Shared {
            side: Mutex::new(Side {
                devices: &mut self.devices,
                scratch: &mut self.mmio_scratch,
                run_state: &mut self.run_state,
                idle_ns,
                console: &mut self.console,
                halted_if,
                kicked: vec![false; n],
                end: None,
                ap_signals: false,
                published: &published,
                slice_end: vec![0; n],
            }),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            kickers,
            control,
            apic: self.apic,
            max_instructions: self.max_instructions,
        };
        let bases = &self.retired_base;
        let results: Vec<Result<(), MachineError>> = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(offsets.iter_mut())
                .enumerate()
                .map(|(i, (vcpu, off))| {
                    let shared = &shared;
                    let base = bases[i];
                    let mid = mid_exit_of == Some(i);
                    std::thread::Builder::new()
                        .name(format!("vcpu{i}"))
                        .spawn_scoped(scope, move || {
                            let r = vcpu_thread(shared, i, vcpu.as_mut(), base, off, mid);
                            if let Err(e) = r {
                                let mut g = shared.lock();
                                shared.finish(&mut g, Err(e));
                            }
                            Ok(())
                        })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| match t {
                    Ok(handle) => handle.join().unwrap_or_else(|_| {
                        Err(MachineError::State("a vCPU thread panicked".into()))
                    }),
                    Err(e) => Err(MachineError::State(format!(
                        "cannot start a vCPU thread: {e}"
                    ))),
                })
                .collect()
        });
        let side = shared
            .side
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let end = side.end;
        self.mid_exit = false;
        for r in results {
            r?;
        }
        match end {
            Some(Ok(outcome)) => Ok(Some(outcome)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

/// The thread of vCPU `cpu` in an epoch: slices of the vCPU until the epoch ends, each
/// exit handled under the lock. `mid`: the vCPU starts in the middle of an exit.
fn vcpu_thread(
    shared: &Shared<'_>,
    cpu: usize,
    vcpu: &mut dyn Vcpu,
    base: u64,
    tsc_offset: &mut i64,
    mut mid: bool,
) -> Result<(), MachineError> {
    loop {
        let mut g = shared.lock();
        if !mid {
            // A clean point: stop here if the epoch ends, sleep while halted.
            loop {
                if shared.control.attention() {
                    shared.end_epoch();
                }
                if shared.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let side = &mut *g;
                if let Some(console) = side.console.as_mut() {
                    let devices = &mut side.devices;
                    console.pump(|bytes| devices.enqueue_serial_input(bytes));
                    if console.quit_requested() {
                        let quit = Outcome::Stopped("from the console (Ctrl-A x)".into());
                        shared.finish(&mut g, Ok(quit));
                        return Ok(());
                    }
                }
                match g.run_state[cpu] {
                    VcpuRunState::Running => break,
                    VcpuRunState::Halted if g.wakes(cpu) => {
                        g.run_state[cpu] = VcpuRunState::Running;
                        break;
                    }
                    _ => {}
                }
                if g.run_state.iter().all(|s| *s != VcpuRunState::Running) {
                    // Every vCPU halted or waits: this thread moves time on.
                    match idle(&mut g, vcpu, cpu) {
                        Ok(None) => {
                            shared.cond.notify_all();
                            continue;
                        }
                        Ok(Some(outcome)) => {
                            shared.finish(&mut g, Ok(outcome));
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    }
                }
                g = shared
                    .cond
                    .wait_timeout(g, SLEEP_POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        // The slice: the devices' time, interrupts, its length.
        let now = g.now();
        let done = now - *g.idle_ns;
        shared.control.publish_instructions(done);
        let mut slice = PARALLEL_SLICE.min(MAX_SLICE_NS);
        if let Some(limit) = shared.max_instructions {
            if done >= limit {
                shared.finish(&mut g, Ok(Outcome::InstructionLimit(done)));
                return Ok(());
            }
            // The budget is shared: the other vCPUs' running slices hold their part of it,
            // so that all of them together stop at exactly `limit`.
            let left = (limit - done).saturating_sub(g.reserved_by_others(cpu));
            if left == 0 {
                // Wait until a slice ends (it notifies) and look again.
                drop(shared.cond.wait_timeout(g, SLEEP_POLL));
                continue;
            }
            slice = slice.min(left);
            g.slice_end[cpu] = g.published[cpu].load(Ordering::Acquire) + slice;
        }
        g.devices.advance_to(now);
        g.devices.select_vcpu(cpu);
        if g.devices.has_interrupt_request() {
            sync_apic_of(shared.apic, vcpu, g.devices, cpu)?;
        }
        offer_interrupt_to(shared.apic, vcpu, g.devices)?;
        if let Some(deadline) = g.devices.next_deadline_ns() {
            slice = slice.min(deadline.saturating_sub(now).max(1));
        }
        if g.devices.pending_interrupt().is_some() {
            slice = slice.min(WINDOW_POLL_NS);
        }
        g.kicked[cpu] = false;
        drop(g);
        // Its TSC catches up with the machine's clock (it never goes back).
        let target = now.wrapping_add(*tsc_offset as u64);
        if (target.wrapping_sub(vcpu.get_tsc()?) as i64) > 0 {
            vcpu.set_tsc(target)?;
        }
        vcpu.set_instruction_budget(Some(slice))?;
        let (h, held) = run_exit(vcpu, cpu, shared.apic, || {
            let mut guard = shared.lock();
            // The per-vCPU calls of the devices act on this vCPU (another thread may have
            // selected its own meanwhile).
            guard.devices.select_vcpu(cpu);
            Held { guard, cpu, base }
        })?;
        let mut g = held.guard;
        publish(&g, cpu, base, vcpu);
        if shared.max_instructions.is_some() {
            // Its unused share of the budget goes back to the others.
            g.slice_end[cpu] = 0;
            shared.cond.notify_all();
        }
        let now = g.now();
        g.devices.advance_to(now);
        // A guest write that moved the TSC forward stays.
        let ahead = vcpu.get_tsc()?.wrapping_sub(now) as i64;
        if ahead > *tsc_offset {
            *tsc_offset = ahead;
        }
        if h.held {
            // SEV-ES: parked in the AP reset hold until a SIPI (applied between epochs).
            g.run_state[cpu] = VcpuRunState::ApResetHold;
        } else if h.halted {
            g.run_state[cpu] = VcpuRunState::Halted;
            g.halted_if[cpu] = vcpu.interrupts_enabled()?;
        }
        mid = h.mid_exit;
        if let Some(outcome) = h.outcome {
            shared.finish(&mut g, Ok(outcome));
            return Ok(());
        }
        shared.propagate(&mut g, cpu);
        if h.halted || h.held {
            // The others may all be halted now: one of them moves time on.
            shared.cond.notify_all();
        }
    }
}

/// Every vCPU is halted or waits for SIPI (`cpu`, whose thread calls this, among them):
/// as [`Machine::idle`] on one thread. A vCPU that something wakes runs at once; if none
/// can ever wake, the guest powered off; otherwise virtual time skips to the next device
/// deadline (after a short real-time wait for console input while a console is open) and
/// the halted vCPUs with interrupts enabled look again.
fn idle(side: &mut Side<'_>, vcpu: &dyn Vcpu, cpu: usize) -> Result<Option<Outcome>, MachineError> {
    let n = side.run_state.len();
    let halted = |side: &Side<'_>, i: usize| side.run_state[i] == VcpuRunState::Halted;
    let mut woke = false;
    for i in 0..n {
        if halted(side, i) && side.wakes(i) {
            side.run_state[i] = VcpuRunState::Running;
            woke = true;
        }
    }
    if woke {
        return Ok(None);
    }
    if !(0..n).any(|i| halted(side, i) && side.halted_if[i]) {
        return Ok(Some(Outcome::PowerOff(crate::outcome::HALTED_OFF.into())));
    }
    let now = side.now();
    let deadline = side.devices.next_deadline_ns();
    let console_input = wait_for_console_input(side.console.as_mut(), now, deadline);
    if !console_input {
        match deadline {
            Some(deadline) => *side.idle_ns += deadline.saturating_sub(now),
            None if side.console.as_ref().is_some_and(|c| c.open()) => {}
            None => {
                return Err(MachineError::HaltedForever {
                    vcpu: cpu as u32,
                    rip: vcpu.get_regs().ok().map(|r| r.rip),
                })
            }
        }
    }
    let now = side.now();
    side.devices.advance_to(now);
    for i in 0..n {
        if halted(side, i) && side.halted_if[i] {
            side.run_state[i] = VcpuRunState::Running;
        }
    }
    Ok(None)
}
