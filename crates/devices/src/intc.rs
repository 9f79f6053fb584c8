//! The interrupt controllers together: the 8259A pair, the I/O APIC and the boot vCPU's
//! local APIC, wired as on a PC.
//!
//! Every device interrupt line goes to both the 8259 pair (IRQ n) and the I/O APIC (pin n,
//! but IRQ 0 on pin 2: the MADT's interrupt source override). The I/O APIC's messages go to
//! the local APIC, whose EOI of a level-triggered vector goes back to the I/O APIC. The
//! 8259's INTR reaches the vCPU through the local APIC's LINT0 in ExtINT mode (the reset
//! state) or while the APIC is hardware-disabled, so guests that never program the APICs
//! run on the 8259 as before.

use crate::device::IrqSink;
use crate::ioapic::{IoApic, IoApicMessage};
use crate::lapic::{delivery, LapicEvent, LocalApic};
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

/// The platform's interrupt controllers; see the module documentation.
#[derive(Debug)]
pub struct Intc {
    /// The 8259A pair.
    pub pic: Pic,
    /// The I/O APIC.
    pub ioapic: IoApic,
    /// The boot vCPU's local APIC.
    pub lapic: LocalApic,
    /// Whether the local APIC is enabled in IA32_APIC_BASE (bit 11); while it is not, the
    /// 8259's INTR goes straight to the vCPU.
    pub apic_hw_enabled: bool,
    /// An NMI waits for the vCPU.
    nmi: bool,
    /// INIT / SIPI sent to other vCPUs, for the AP start-up to come (counted only).
    pub ap_startups: u64,
}

impl Default for Intc {
    fn default() -> Self {
        Self::new()
    }
}

impl Intc {
    /// The controllers in their reset state.
    pub fn new() -> Self {
        Self {
            pic: Pic::new(),
            ioapic: IoApic::new(),
            lapic: LocalApic::new(0),
            apic_hw_enabled: true,
            nmi: false,
            ap_startups: 0,
        }
    }

    /// Deliver the I/O APIC's messages.
    pub fn route_messages(&mut self, msgs: Vec<IoApicMessage>) {
        for m in msgs {
            if !self.lapic.matches(m.dest, m.logical, false) {
                continue;
            }
            match m.mode {
                delivery::FIXED | delivery::LOWEST => self.lapic.accept(m.vector, m.level),
                delivery::NMI => self.nmi = true,
                // ExtINT through the I/O APIC (pin 0) and the rest: the 8259's INTR already
                // reaches the vCPU through LINT0 when the guest wants it.
                _ => {}
            }
        }
    }

    /// Act on what the local APIC asked for after a register write.
    pub fn lapic_events(&mut self, events: Vec<LapicEvent>) {
        for e in events {
            match e {
                LapicEvent::EoiBroadcast(v) => {
                    let mut out = Vec::new();
                    self.ioapic.eoi(v, &mut out);
                    self.route_messages(out);
                }
                LapicEvent::Nmi => self.nmi = true,
                LapicEvent::ApStartup { .. } => self.ap_startups += 1,
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

    fn pic_reaches_cpu(&self) -> bool {
        !self.apic_hw_enabled || self.lapic.accepts_pic()
    }

    /// The vector that would be delivered now: the local APIC's highest deliverable request,
    /// else the 8259's through LINT0.
    pub fn pending_vector(&self) -> Option<u8> {
        if self.apic_hw_enabled {
            if let Some(v) = self.lapic.pending_vector() {
                return Some(v);
            }
        }
        if self.pic_reaches_cpu() {
            return self.pic.pending_vector();
        }
        None
    }

    /// The interrupt-acknowledge cycle for [`Intc::pending_vector`].
    pub fn acknowledge(&mut self) -> u8 {
        if self.apic_hw_enabled {
            if let Some(v) = self.lapic.acknowledge() {
                return v;
            }
        }
        self.pic.acknowledge()
    }

    /// Take a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi)
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
        assert_eq!(c.pending_vector(), Some(0x30));
        assert_eq!(c.acknowledge(), 0x30);
        c.pic.write_port(0x20, 0x20).unwrap();
        c.set_level(0, false);
        // The guest masks LINT0: the 8259 no longer reaches the CPU.
        let mut ev = Vec::new();
        c.lapic.write_reg(0xf0, 0x1ff, false, &mut ev);
        c.lapic.write_reg(0x350, 1 << 16, false, &mut ev);
        c.set_level(0, true);
        assert_eq!(c.pending_vector(), None);
        // With the APIC hardware-disabled the 8259 goes straight to the CPU.
        c.apic_hw_enabled = false;
        assert_eq!(c.pending_vector(), Some(0x30));
    }

    #[test]
    fn irq0_reaches_the_lapic_through_pin_2_and_level_eoi_round_trips() {
        let mut c = Intc::new();
        let mut ev = Vec::new();
        c.lapic.write_reg(0xf0, 0x1ff, false, &mut ev);
        c.lapic.write_reg(0x350, 1 << 16, false, &mut ev);
        let mut out = Vec::new();
        // Pin 2: vector 0x30, edge, physical APIC 0. Pin 4 (COM1): level, vector 0x34.
        c.ioapic.mmio_write(0, &[0x14], &mut out);
        c.ioapic.mmio_write(0x10, &0x30u32.to_le_bytes(), &mut out);
        c.ioapic.mmio_write(0, &[0x18], &mut out);
        c.ioapic
            .mmio_write(0x10, &0x8034u32.to_le_bytes(), &mut out);
        c.set_level(0, true);
        assert_eq!(c.pending_vector(), Some(0x30));
        assert_eq!(c.acknowledge(), 0x30);
        c.lapic.write_reg(0xb0, 0, false, &mut ev);
        c.lapic_events(std::mem::take(&mut ev));
        c.set_level(4, true);
        assert_eq!(c.acknowledge(), 0x34);
        c.lapic.write_reg(0xb0, 0, false, &mut ev);
        assert_eq!(ev, [LapicEvent::EoiBroadcast(0x34)]);
        c.lapic_events(std::mem::take(&mut ev));
        // Still asserted: delivered again after the EOI.
        assert_eq!(c.pending_vector(), Some(0x34));
        c.acknowledge();
        c.set_level(4, false);
        c.lapic.write_reg(0xb0, 0, false, &mut ev);
        c.lapic_events(std::mem::take(&mut ev));
        assert_eq!(c.pending_vector(), None);
        assert_eq!(
            c.ioapic.entry(4).unwrap() & (1 << 14),
            0,
            "remote IRR clear"
        );
    }
}
