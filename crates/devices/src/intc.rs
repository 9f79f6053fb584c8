//! The interrupt controllers together: the 8259A pair, the I/O APIC and one local APIC per
//! vCPU (APIC ID = vCPU index), wired as on a PC.
//!
//! Every device interrupt line goes to both the 8259 pair (IRQ n) and the I/O APIC (pin n,
//! but IRQ 0 on pin 2: the MADT's interrupt source override). The I/O APIC's messages go to
//! the local APICs their redirection entry names (physical or logical destination; lowest
//! priority picks one), whose EOI of a level-triggered vector goes back to the I/O APIC.
//! Interprocessor interrupts (ICR writes) reach the local APICs they name: fixed and
//! lowest-priority vectors go to IRR, NMIs wait for the vCPU, INIT and SIPI queue as
//! [`ApSignal`]s for the VMM's AP state machine. The 8259's INTR reaches the boot vCPU only,
//! through its local APIC's LINT0 in ExtINT mode (the reset state) or while that APIC is
//! hardware-disabled, so guests that never program the APICs run on the 8259 as before.

use crate::device::IrqSink;
use crate::ioapic::{IoApic, IoApicMessage};
use crate::lapic::{delivery, IpiMessage, LapicEvent, LocalApic, Shorthand};
use crate::pic::Pic;

/// The I/O APIC pin of ISA IRQ `irq`, if it has one.
pub fn isa_gsi(irq: u8) -> Option<usize> {
    match irq {
        0 => Some(2),
        2 => None,
        1..=15 => Some(usize::from(irq)),
        _ => None,
    }
}

/// A start-up signal for a vCPU, which the VMM's AP state machine acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApSignal {
    /// INIT: the vCPU goes to wait-for-SIPI.
    Init,
    /// Start-up IPI with its vector (the vCPU starts at `vector << 12` in real mode).
    Sipi(u8),
}

/// What the platform holds of one vCPU's interrupt inputs.
#[derive(Debug, Clone)]
pub struct CpuIntc {
    /// The vCPU's local APIC.
    pub lapic: LocalApic,
    /// Whether the local APIC is enabled in IA32_APIC_BASE (bit 11). A hardware-disabled
    /// APIC takes no interrupts; the boot vCPU then gets the 8259's INTR directly.
    pub apic_hw_enabled: bool,
    /// x2APIC mode (IA32_APIC_BASE bit 10).
    pub x2apic: bool,
    /// An NMI waits for the vCPU.
    nmi: bool,
    /// INIT / SIPI received, in order, not yet taken by the VMM.
    signals: Vec<ApSignal>,
}

impl CpuIntc {
    fn new(id: u32) -> Self {
        Self {
            lapic: LocalApic::new(id),
            apic_hw_enabled: true,
            x2apic: false,
            nmi: false,
            signals: Vec::new(),
        }
    }
}

/// The platform's interrupt controllers; see the module documentation.
#[derive(Debug)]
pub struct Intc {
    /// The 8259A pair.
    pub pic: Pic,
    /// The I/O APIC.
    pub ioapic: IoApic,
    /// Per vCPU: its local APIC and interrupt state (index = vCPU = APIC ID at reset).
    cpus: Vec<CpuIntc>,
    /// INIT and SIPI messages delivered to vCPUs (statistics).
    pub ap_startups: u64,
    /// IPIs sent that reach a vCPU other than the sender.
    pub ipis_sent: u64,
}

impl Default for Intc {
    fn default() -> Self {
        Self::new()
    }
}

impl Intc {
    /// The controllers of a one-vCPU machine in their reset state.
    pub fn new() -> Self {
        Self::with_vcpus(1)
    }

    /// The controllers of a machine with `vcpus` vCPUs (at least one) in their reset state.
    pub fn with_vcpus(vcpus: usize) -> Self {
        Self {
            pic: Pic::new(),
            ioapic: IoApic::new(),
            cpus: (0..vcpus.max(1) as u32).map(CpuIntc::new).collect(),
            ap_startups: 0,
            ipis_sent: 0,
        }
    }

    /// Number of vCPUs (local APICs).
    pub fn vcpus(&self) -> usize {
        self.cpus.len()
    }

    /// Set the number of vCPUs: new ones get local APICs in their reset state, surplus ones
    /// are dropped.
    pub fn set_vcpus(&mut self, vcpus: usize) {
        let n = vcpus.max(1);
        self.cpus.truncate(n);
        while self.cpus.len() < n {
            self.cpus.push(CpuIntc::new(self.cpus.len() as u32));
        }
    }

    /// vCPU `cpu`'s interrupt state (panics if there is no such vCPU: callers pass indices
    /// below [`Intc::vcpus`]).
    pub fn cpu(&self, cpu: usize) -> &CpuIntc {
        &self.cpus[cpu]
    }

    /// vCPU `cpu`'s interrupt state, mutably.
    pub fn cpu_mut(&mut self, cpu: usize) -> &mut CpuIntc {
        &mut self.cpus[cpu]
    }

    /// vCPU `cpu`'s local APIC.
    pub fn lapic(&self, cpu: usize) -> &LocalApic {
        &self.cpus[cpu].lapic
    }

    /// vCPU `cpu`'s local APIC, mutably.
    pub fn lapic_mut(&mut self, cpu: usize) -> &mut LocalApic {
        &mut self.cpus[cpu].lapic
    }

    /// All local APICs, in vCPU order.
    pub fn lapics(&self) -> impl Iterator<Item = &LocalApic> + '_ {
        self.cpus.iter().map(|c| &c.lapic)
    }

    /// All local APICs, mutably.
    pub fn lapics_mut(&mut self) -> impl Iterator<Item = &mut LocalApic> + '_ {
        self.cpus.iter_mut().map(|c| &mut c.lapic)
    }

    /// Deliver an interrupt message of `mode` to vCPU `cpu`.
    fn deliver(&mut self, cpu: usize, mode: u32, vector: u8, level: bool) {
        let c = &mut self.cpus[cpu];
        match mode {
            delivery::FIXED | delivery::LOWEST if c.apic_hw_enabled => {
                c.lapic.accept(vector, level)
            }
            delivery::NMI => c.nmi = true,
            delivery::INIT => {
                c.signals.push(ApSignal::Init);
                self.ap_startups += 1;
            }
            delivery::SIPI => {
                c.signals.push(ApSignal::Sipi(vector));
                self.ap_startups += 1;
            }
            // SMI is not modelled; ExtINT through the I/O APIC (pin 0): the 8259's INTR
            // already reaches the boot vCPU through LINT0 when the guest wants it.
            _ => {}
        }
    }

    /// Of `targets`, the one lowest-priority delivery picks: the lowest processor priority,
    /// then the lowest APIC ID (a fixed rule, so runs replay).
    fn lowest_priority(&self, targets: &[usize]) -> Option<usize> {
        targets
            .iter()
            .copied()
            .min_by_key(|&i| (self.cpus[i].lapic.ppr() & 0xf0, self.cpus[i].lapic.id()))
    }

    /// Deliver `mode`/`vector` to the vCPUs in `targets`; lowest priority to one of them.
    fn deliver_to(&mut self, targets: Vec<usize>, mode: u32, vector: u8, level: bool) {
        if mode == delivery::LOWEST {
            if let Some(t) = self.lowest_priority(&targets) {
                self.deliver(t, mode, vector, level);
            }
            return;
        }
        for t in targets {
            self.deliver(t, mode, vector, level);
        }
    }

    /// Deliver the I/O APIC's messages. Its destination field has 8 bits: to an APIC in
    /// x2APIC mode 0xff is the broadcast and a logical destination is cluster 0.
    pub fn route_messages(&mut self, msgs: Vec<IoApicMessage>) {
        for m in msgs {
            let targets: Vec<usize> = (0..self.cpus.len())
                .filter(|&i| {
                    let c = &self.cpus[i];
                    c.apic_hw_enabled
                        && (c.lapic.matches(m.dest, m.logical, c.x2apic)
                            || (c.x2apic && !m.logical && m.dest == 0xff))
                })
                .collect();
            self.deliver_to(targets, m.mode, m.vector, m.level);
        }
    }

    /// Deliver an interprocessor interrupt sent by vCPU `from`.
    pub fn send_ipi(&mut self, from: usize, m: IpiMessage) {
        if m.init_deassert {
            return;
        }
        let n = self.cpus.len();
        let targets: Vec<usize> = match m.shorthand {
            Shorthand::None => (0..n)
                .filter(|&i| {
                    let c = &self.cpus[i];
                    c.apic_hw_enabled && c.lapic.matches(m.dest, m.logical, m.x2apic)
                })
                .collect(),
            Shorthand::SelfOnly => vec![from],
            Shorthand::AllIncludingSelf => (0..n).collect(),
            Shorthand::AllExcludingSelf => (0..n).filter(|&i| i != from).collect(),
        };
        if targets.iter().any(|&t| t != from) {
            self.ipis_sent += 1;
        }
        self.deliver_to(targets, m.mode, m.vector, false);
    }

    /// Act on what vCPU `from`'s local APIC asked for after a register write.
    pub fn lapic_events(&mut self, from: usize, events: Vec<LapicEvent>) {
        for e in events {
            match e {
                LapicEvent::EoiBroadcast(v) => {
                    let mut out = Vec::new();
                    self.ioapic.eoi(v, &mut out);
                    self.route_messages(out);
                }
                LapicEvent::Ipi(m) => self.send_ipi(from, m),
            }
        }
    }

    /// Set line `irq`'s power-on level on both controllers without a request.
    pub fn preset_line(&mut self, irq: u8, level: bool) {
        self.pic.preset_line(irq, level);
        if let Some(pin) = isa_gsi(irq) {
            self.ioapic.preset_line(pin, level);
        }
    }

    /// Whether the 8259's INTR reaches vCPU `cpu`: the boot vCPU's, through LINT0 or with
    /// its APIC hardware-disabled.
    fn pic_reaches_cpu(&self, cpu: usize) -> bool {
        let c = &self.cpus[cpu];
        cpu == 0 && (!c.apic_hw_enabled || c.lapic.accepts_pic())
    }

    /// The vector that would be delivered to vCPU `cpu` now: its local APIC's highest
    /// deliverable request, else (boot vCPU) the 8259's through LINT0.
    pub fn pending_vector(&self, cpu: usize) -> Option<u8> {
        let c = &self.cpus[cpu];
        if c.apic_hw_enabled {
            if let Some(v) = c.lapic.pending_vector() {
                return Some(v);
            }
        }
        if self.pic_reaches_cpu(cpu) {
            return self.pic.pending_vector();
        }
        None
    }

    /// Whether an interrupt request for vCPU `cpu` is held (its local APIC's IRR, or for the
    /// boot vCPU the 8259's output), deliverable now or not.
    pub fn has_request(&self, cpu: usize) -> bool {
        self.cpus[cpu].lapic.has_request() || (cpu == 0 && self.pic.pending_vector().is_some())
    }

    /// The interrupt-acknowledge cycle of vCPU `cpu` for [`Intc::pending_vector`].
    pub fn acknowledge(&mut self, cpu: usize) -> u8 {
        let c = &mut self.cpus[cpu];
        if c.apic_hw_enabled {
            if let Some(v) = c.lapic.acknowledge() {
                return v;
            }
        }
        self.pic.acknowledge()
    }

    /// Whether an NMI waits for vCPU `cpu`.
    pub fn nmi_pending(&self, cpu: usize) -> bool {
        self.cpus[cpu].nmi
    }

    /// Take vCPU `cpu`'s pending NMI.
    pub fn take_nmi(&mut self, cpu: usize) -> bool {
        std::mem::take(&mut self.cpus[cpu].nmi)
    }

    /// Whether INIT or SIPI signals wait for vCPU `cpu`.
    pub fn has_ap_signals(&self, cpu: usize) -> bool {
        !self.cpus[cpu].signals.is_empty()
    }

    /// Take vCPU `cpu`'s INIT and SIPI signals, oldest first.
    pub fn take_ap_signals(&mut self, cpu: usize) -> Vec<ApSignal> {
        std::mem::take(&mut self.cpus[cpu].signals)
    }
}

impl IrqSink for Intc {
    fn set_level(&mut self, irq: u8, level: bool) {
        self.pic.set_level(irq, level);
        if let Some(pin) = isa_gsi(irq) {
            let mut out = Vec::new();
            self.ioapic.set_level(pin, level, &mut out);
            self.route_messages(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_8259_reaches_the_cpu_until_lint0_is_masked() {
        let mut c = Intc::new();
        // Linux-style 8259 set-up, IRQ 0 unmasked at vector 0x30.
        for (p, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0xfe),
        ] {
            c.pic.write_port(p, v).unwrap();
        }
        c.set_level(0, true);
        assert_eq!(c.pending_vector(0), Some(0x30));
        assert_eq!(c.acknowledge(0), 0x30);
        c.pic.write_port(0x20, 0x20).unwrap();
        c.set_level(0, false);
        // The guest masks LINT0: the 8259 no longer reaches the CPU.
        let mut ev = Vec::new();
        c.lapic_mut(0).write_reg(0xf0, 0x1ff, false, &mut ev);
        c.lapic_mut(0).write_reg(0x350, 1 << 16, false, &mut ev);
        c.set_level(0, true);
        assert_eq!(c.pending_vector(0), None);
        // With the APIC hardware-disabled the 8259 goes straight to the CPU.
        c.cpu_mut(0).apic_hw_enabled = false;
        assert_eq!(c.pending_vector(0), Some(0x30));
    }

    #[test]
    fn irq0_reaches_the_lapic_through_pin_2_and_level_eoi_round_trips() {
        let mut c = Intc::new();
        let mut ev = Vec::new();
        c.lapic_mut(0).write_reg(0xf0, 0x1ff, false, &mut ev);
        c.lapic_mut(0).write_reg(0x350, 1 << 16, false, &mut ev);
        let mut out = Vec::new();
        // Pin 2: vector 0x30, edge, physical APIC 0. Pin 4 (COM1): level, vector 0x34.
        c.ioapic.mmio_write(0, &[0x14], &mut out);
        c.ioapic.mmio_write(0x10, &0x30u32.to_le_bytes(), &mut out);
        c.ioapic.mmio_write(0, &[0x18], &mut out);
        c.ioapic
            .mmio_write(0x10, &0x8034u32.to_le_bytes(), &mut out);
        c.set_level(0, true);
        assert_eq!(c.pending_vector(0), Some(0x30));
        assert_eq!(c.acknowledge(0), 0x30);
        c.lapic_mut(0).write_reg(0xb0, 0, false, &mut ev);
        c.lapic_events(0, std::mem::take(&mut ev));
        c.set_level(4, true);
        assert_eq!(c.acknowledge(0), 0x34);
        c.lapic_mut(0).write_reg(0xb0, 0, false, &mut ev);
        assert_eq!(ev, [LapicEvent::EoiBroadcast(0x34)]);
        c.lapic_events(0, std::mem::take(&mut ev));
        // Still asserted: delivered again after the EOI.
        assert_eq!(c.pending_vector(0), Some(0x34));
        c.acknowledge(0);
        c.set_level(4, false);
        c.lapic_mut(0).write_reg(0xb0, 0, false, &mut ev);
        c.lapic_events(0, std::mem::take(&mut ev));
        assert_eq!(c.pending_vector(0), None);
        assert_eq!(
            c.ioapic.entry(4).unwrap() & (1 << 14),
            0,
            "remote IRR clear"
        );
    }

    fn enable(c: &mut Intc, cpu: usize) {
        let mut ev = Vec::new();
        c.lapic_mut(cpu).write_reg(0xf0, 0x1ff, false, &mut ev);
    }

    /// Vector `v` via the ICR of `from` (xAPIC: high word first).
    fn icr(c: &mut Intc, from: usize, hi: u32, lo: u32) {
        let mut ev = Vec::new();
        c.lapic_mut(from)
            .write_reg(0x310, u64::from(hi), false, &mut ev);
        c.lapic_mut(from)
            .write_reg(0x300, u64::from(lo), false, &mut ev);
        c.lapic_events(from, ev);
    }

    /// vCPU `cpu` takes its interrupt and ends it (EOI).
    fn take(c: &mut Intc, cpu: usize) {
        c.lapic_mut(cpu).acknowledge();
        let mut ev = Vec::new();
        c.lapic_mut(cpu).write_reg(0xb0, 0, false, &mut ev);
        c.lapic_events(cpu, ev);
    }

    fn irr(c: &Intc, cpu: usize) -> Option<u8> {
        c.lapic(cpu).pending_vector()
    }

    #[test]
    fn ipis_reach_the_apics_they_name() {
        let mut c = Intc::with_vcpus(4);
        for i in 0..4 {
            enable(&mut c, i);
        }
        // Physical destination 2.
        icr(&mut c, 0, 2 << 24, 0x41);
        assert_eq!(
            (0..4).map(|i| irr(&c, i)).collect::<Vec<_>>(),
            [None, None, Some(0x41), None]
        );
        take(&mut c, 2);
        // Self, all-including-self, all-excluding-self.
        icr(&mut c, 1, 0, (1 << 18) | 0x42);
        assert_eq!(irr(&c, 1), Some(0x42));
        assert_eq!(irr(&c, 0), None);
        take(&mut c, 1);
        icr(&mut c, 3, 0, (2 << 18) | 0x43);
        assert!((0..4).all(|i| irr(&c, i) == Some(0x43)));
        for i in 0..4 {
            take(&mut c, i);
        }
        icr(&mut c, 3, 0, (3 << 18) | 0x44);
        assert_eq!(
            (0..4).map(|i| irr(&c, i)).collect::<Vec<_>>(),
            [Some(0x44), Some(0x44), Some(0x44), None]
        );
        for i in 0..3 {
            take(&mut c, i);
        }
        // Logical flat: CPU i has LDR bit i; mask 0b1010 reaches 1 and 3.
        let mut ev = Vec::new();
        for i in 0..4 {
            c.lapic_mut(i)
                .write_reg(0xd0, u64::from(1u32 << (24 + i)), false, &mut ev);
        }
        icr(&mut c, 0, 0b1010 << 24, (1 << 11) | 0x45);
        assert_eq!(
            (0..4).map(|i| irr(&c, i)).collect::<Vec<_>>(),
            [None, Some(0x45), None, Some(0x45)]
        );
        take(&mut c, 1);
        take(&mut c, 3);
        // Lowest priority among 1, 2, 3: CPU 1 has TPR 0x20, CPU 2 0x10, CPU 3 0x10: the
        // lowest priority class, then the lowest APIC ID.
        c.lapic_mut(1).set_tpr(0x20);
        c.lapic_mut(2).set_tpr(0x10);
        c.lapic_mut(3).set_tpr(0x10);
        icr(&mut c, 0, 0b1110 << 24, (1 << 11) | (1 << 8) | 0x46);
        assert_eq!(
            (0..4).map(|i| c.lapic(i).has_request()).collect::<Vec<_>>(),
            [false, false, true, false]
        );
        // NMI to 3 only.
        icr(&mut c, 0, 3 << 24, 4 << 8);
        assert_eq!(
            (0..4).map(|i| c.nmi_pending(i)).collect::<Vec<_>>(),
            [false, false, false, true]
        );
        assert!(c.take_nmi(3));
        assert!(!c.nmi_pending(3));
    }

    #[test]
    fn init_and_sipi_queue_as_ap_signals_and_the_deassert_is_ignored() {
        let mut c = Intc::with_vcpus(3);
        // The APs' APICs are software-disabled at reset: INIT and SIPI reach them anyway.
        icr(&mut c, 0, 1 << 24, (1 << 15) | (1 << 14) | (5 << 8));
        icr(&mut c, 0, 1 << 24, (1 << 15) | (5 << 8)); // de-assert
        icr(&mut c, 0, 1 << 24, (6 << 8) | 0x9a);
        icr(&mut c, 0, 0, (3 << 18) | (6 << 8) | 0x10);
        assert_eq!(
            c.take_ap_signals(1),
            [ApSignal::Init, ApSignal::Sipi(0x9a), ApSignal::Sipi(0x10)]
        );
        assert!(c.take_ap_signals(1).is_empty());
        assert_eq!(c.take_ap_signals(2), [ApSignal::Sipi(0x10)]);
        assert!(!c.has_ap_signals(0));
        // A fixed IPI to a software-disabled APIC is dropped.
        icr(&mut c, 0, 2 << 24, 0x50);
        assert!(!c.lapic(2).has_request());
        assert_eq!(c.ap_startups, 4);
        assert_eq!(c.ipis_sent, 4, "the de-assert is not sent");
    }

    #[test]
    fn the_ioapic_routes_to_the_named_apic_and_the_8259_only_to_the_bsp() {
        let mut c = Intc::with_vcpus(2);
        enable(&mut c, 0);
        enable(&mut c, 1);
        // Pin 4: vector 0x34, edge, physical APIC 1.
        let mut out = Vec::new();
        c.ioapic.mmio_write(0, &[0x18], &mut out);
        c.ioapic.mmio_write(0x10, &0x34u32.to_le_bytes(), &mut out);
        c.ioapic.mmio_write(0, &[0x19], &mut out);
        c.ioapic
            .mmio_write(0x10, &(1u32 << 24).to_le_bytes(), &mut out);
        c.set_level(4, true);
        assert_eq!(c.pending_vector(1), Some(0x34));
        assert!(!c.lapic(0).has_request());
        assert_eq!(c.acknowledge(1), 0x34);
        let mut ev = Vec::new();
        c.lapic_mut(1).write_reg(0xb0, 0, false, &mut ev);
        c.set_level(4, false);
        // x2APIC mode: logical destination 0b10 is cluster 0, APIC 1.
        c.cpu_mut(1).x2apic = true;
        c.ioapic.mmio_write(0, &[0x18], &mut out);
        c.ioapic
            .mmio_write(0x10, &(0x35u32 | (1 << 11)).to_le_bytes(), &mut out);
        c.ioapic.mmio_write(0, &[0x19], &mut out);
        c.ioapic
            .mmio_write(0x10, &(2u32 << 24).to_le_bytes(), &mut out);
        c.set_level(4, true);
        assert_eq!(c.pending_vector(1), Some(0x35));
        take(&mut c, 1);
        c.set_level(4, false);
        // The 8259 (unprogrammed: its INTR) never reaches an AP.
        for (p, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 4), (0x21, 1), (0x21, 0)] {
            c.pic.write_port(p, v).unwrap();
        }
        c.set_level(1, true);
        assert!(c.pic.pending_vector().is_some());
        assert!(!c.has_request(1));
        assert!(c.has_request(0));
    }
}
