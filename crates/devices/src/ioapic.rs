//! An I/O APIC (82093AA style, version 0x20 with the EOI register) with 24 pins at
//! `layout::IOAPIC_ADDR`: IOREGSEL at offset 0x00, IOWIN at 0x10, EOI at 0x40.
//!
//! Registers: ID (0), version (1: version 0x20, 23 = last redirection entry), arbitration
//! (2), and the redirection table (0x10 + 2n low, 0x11 + 2n high). Each entry routes its pin
//! as a message (vector, delivery mode, destination) to the local APICs; edge-triggered pins
//! send one on each rising edge of the (polarity-corrected) input, level-triggered pins send
//! one while asserted and remote IRR is clear, then set remote IRR until the EOI of the
//! vector (a local APIC's EOI broadcast, or a write to the EOI register). Unmasking an
//! asserted level-triggered pin sends at once.
//!
//! The pins: ISA IRQ n on pin n, but the PIT's IRQ 0 on pin 2 (the interrupt source override
//! the MADT describes, as on PCs), and the 8259's INTR on pin 0 (ExtINT, unused by Linux).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Number of pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// The version register: version 0x20, max redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x0017_0020;

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_ACTIVE_LOW: u64 = 1 << 13;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Bits the guest writes: everything but delivery status and remote IRR.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// Errors of the I/O APIC.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IoApicError {
    /// A saved state the I/O APIC cannot be in.
    #[error(
        "saved I/O APIC state is invalid: {0}; the state is corrupt or from an incompatible build"
    )]
    InvalidState(String),
}

/// An interrupt message to the local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicMessage {
    /// Vector.
    pub vector: u8,
    /// Delivery mode (see `lapic::delivery`).
    pub mode: u32,
    /// Logical (true) or physical destination.
    pub logical: bool,
    /// Destination (APIC ID or logical mask, bits 63:56 of the entry).
    pub dest: u32,
    /// Level-triggered (its EOI is broadcast back).
    pub level: bool,
}

/// The saved state of the I/O APIC (also its live state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoApicState {
    /// IOREGSEL.
    pub ioregsel: u32,
    /// The ID register (bits 27:24).
    pub id: u32,
    /// The redirection table.
    pub rte: Vec<u64>,
    /// Input level of each pin (bit n = pin n), before polarity.
    pub lines: u32,
}

/// An I/O APIC; see the module documentation.
#[derive(Debug, Clone)]
pub struct IoApic {
    s: IoApicState,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// Reset state: every entry masked, edge, active high, vector 0; ID 0.
    pub fn new() -> Self {
        Self {
            s: IoApicState {
                ioregsel: 0,
                id: 0,
                rte: vec![RTE_MASKED; IOAPIC_PINS],
                lines: 0,
            },
        }
    }

    /// Saved state.
    pub fn state(&self) -> IoApicState {
        self.s.clone()
    }

    /// Put the I/O APIC in `state`. On error nothing changes.
    pub fn restore(&mut self, state: &IoApicState) -> Result<(), IoApicError> {
        if state.rte.len() != IOAPIC_PINS {
            return Err(IoApicError::InvalidState(format!(
                "{} redirection entries, expected {IOAPIC_PINS}",
                state.rte.len()
            )));
        }
        self.s = state.clone();
        Ok(())
    }

    /// Redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.s.rte.get(pin).copied()
    }

    fn asserted(&self, pin: usize) -> bool {
        let level = self.s.lines & (1 << pin) != 0;
        level != (self.s.rte[pin] & RTE_ACTIVE_LOW != 0)
    }

    fn message(&self, pin: usize) -> IoApicMessage {
        let e = self.s.rte[pin];
        IoApicMessage {
            vector: e as u8,
            mode: ((e >> 8) & 7) as u32,
            logical: e & (1 << 11) != 0,
            dest: (e >> 56) as u32,
            level: e & RTE_LEVEL != 0,
        }
    }

    /// Send `pin`'s message if a level-triggered pin is asserted, unmasked and not waiting
    /// for its EOI.
    fn service_level(&mut self, pin: usize, out: &mut Vec<IoApicMessage>) {
        let e = self.s.rte[pin];
        if e & RTE_LEVEL != 0 && e & (RTE_MASKED | RTE_REMOTE_IRR) == 0 && self.asserted(pin) {
            self.s.rte[pin] |= RTE_REMOTE_IRR;
            out.push(self.message(pin));
        }
    }

    /// Drive input `pin` to `level`; messages to deliver go to `out`.
    pub fn set_level(&mut self, pin: usize, level: bool, out: &mut Vec<IoApicMessage>) {
        if pin >= IOAPIC_PINS {
            return;
        }
        let was = self.asserted(pin);
        if level {
            self.s.lines |= 1 << pin;
        } else {
            self.s.lines &= !(1 << pin);
        }
        let now = self.asserted(pin);
        let e = self.s.rte[pin];
        if e & RTE_LEVEL != 0 {
            self.service_level(pin, out);
        } else if now && !was && e & RTE_MASKED == 0 {
            out.push(self.message(pin));
        }
    }

    /// Set input `pin`'s level without sending anything (a device's power-on level).
    pub fn preset_line(&mut self, pin: usize, level: bool) {
        if pin < IOAPIC_PINS {
            if level {
                self.s.lines |= 1 << pin;
            } else {
                self.s.lines &= !(1 << pin);
            }
        }
    }

    /// The EOI of `vector` (broadcast by a local APIC or written to the EOI register):
    /// level-triggered entries of that vector clear remote IRR and send again if their pin
    /// is still asserted.
    pub fn eoi(&mut self, vector: u8, out: &mut Vec<IoApicMessage>) {
        for pin in 0..IOAPIC_PINS {
            let e = self.s.rte[pin];
            if e as u8 == vector && e & RTE_REMOTE_IRR != 0 {
                self.s.rte[pin] &= !RTE_REMOTE_IRR;
                self.service_level(pin, out);
            }
        }
    }

    fn read_register(&self, index: u32) -> u32 {
        match index {
            0 => self.s.id,
            1 => IOAPIC_VERSION,
            2 => self.s.id,
            0x10..=0x3f => {
                let e = self.s.rte[((index - 0x10) / 2) as usize];
                if index.is_multiple_of(2) {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, index: u32, v: u32, out: &mut Vec<IoApicMessage>) {
        match index {
            0 => self.s.id = v & 0x0f00_0000,
            0x10..=0x3f => {
                let pin = ((index - 0x10) / 2) as usize;
                let old = self.s.rte[pin];
                let new = if index.is_multiple_of(2) {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                let keep = old & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS);
                let mut e = (new & RTE_WRITABLE) | keep;
                if e & RTE_LEVEL == 0 {
                    e &= !RTE_REMOTE_IRR;
                }
                self.s.rte[pin] = e;
                self.service_level(pin, out);
            }
            _ => {}
        }
    }

    /// Guest MMIO read at `offset` in the I/O APIC page.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset & !3 {
            0x00 => self.s.ioregsel,
            0x10 => self.read_register(self.s.ioregsel),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// Guest MMIO write at `offset` in the I/O APIC page (32-bit registers; IOREGSEL also
    /// takes a byte write).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], out: &mut Vec<IoApicMessage>) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x00 => self.s.ioregsel = v & 0xff,
            0x10 if n == 4 => self.write_register(self.s.ioregsel, v, out),
            0x40 if n == 4 => self.eoi(v as u8, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u32, low: u32, high: u32) -> Vec<IoApicMessage> {
        let mut out = Vec::new();
        io.mmio_write(0, &[(0x11 + 2 * pin) as u8], &mut out);
        io.mmio_write(0x10, &high.to_le_bytes(), &mut out);
        io.mmio_write(0, &[(0x10 + 2 * pin) as u8], &mut out);
        io.mmio_write(0x10, &low.to_le_bytes(), &mut out);
        out
    }

    fn read(io: &IoApic, reg: u8) -> u32 {
        let mut io = io.clone();
        let mut out = Vec::new();
        io.mmio_write(0, &[reg], &mut out);
        let mut b = [0u8; 4];
        io.mmio_read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers() {
        let mut io = IoApic::new();
        assert_eq!(read(&io, 1), 0x0017_0020);
        assert_eq!(read(&io, 0x10), 1 << 16, "masked at reset");
        program(&mut io, 3, 0x4033 | (1 << 14) | (1 << 12), 0x0100_0000);
        assert_eq!(
            read(&io, 0x16),
            0x4033 & 0xafff,
            "status bits are read-only"
        );
        assert_eq!(read(&io, 0x17), 0x0100_0000);
        let mut out = Vec::new();
        io.mmio_write(0, &[0], &mut out);
        io.mmio_write(0x10, &0x0500_0000u32.to_le_bytes(), &mut out);
        assert_eq!(read(&io, 0), 0x0500_0000);
    }

    #[test]
    fn edge_pins_send_on_rising_edges() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        io.set_level(2, true, &mut out);
        assert!(out.is_empty(), "masked");
        io.set_level(2, false, &mut out);
        program(&mut io, 2, 0x30, 0);
        io.set_level(2, true, &mut out);
        io.set_level(2, true, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0],
            IoApicMessage {
                vector: 0x30,
                mode: 0,
                logical: false,
                dest: 0,
                level: false
            }
        );
        io.set_level(2, false, &mut out);
        io.set_level(2, true, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn level_pins_wait_for_eoi_through_remote_irr() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        io.preset_line(9, true); // active low: high is idle
        assert!(program(&mut io, 9, 0x8041 | (1 << 13), 0).is_empty()); // level, active low
        io.set_level(9, true, &mut out);
        assert!(out.is_empty(), "active low: high is idle");
        io.set_level(9, false, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].level);
        assert_ne!(read(&io, 0x22) & (1 << 14), 0, "remote IRR set");
        io.eoi(0x41, &mut out);
        assert_eq!(out.len(), 2, "still asserted: sent again");
        io.set_level(9, true, &mut out);
        io.eoi(0x41, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(read(&io, 0x22) & (1 << 14), 0);
        // The EOI register does the same.
        io.set_level(9, false, &mut out);
        assert_eq!(out.len(), 3);
        io.set_level(9, true, &mut out);
        io.mmio_write(0x40, &0x41u32.to_le_bytes(), &mut out);
        assert_eq!(read(&io, 0x22) & (1 << 14), 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_sends() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 5, 0x18050, 0);
        io.set_level(5, true, &mut out);
        assert!(out.is_empty());
        let sent = program(&mut io, 5, 0x8050, 0);
        assert_eq!(sent.len(), 1);
    }

    #[test]
    fn state_round_trip() {
        let mut io = IoApic::new();
        program(&mut io, 1, 0x31, 0);
        let s = io.state();
        let mut other = IoApic::new();
        other.restore(&s).unwrap();
        assert_eq!(other.state(), s);
        let mut bad = s;
        bad.rte.pop();
        assert!(other.restore(&bad).is_err());
    }
}
