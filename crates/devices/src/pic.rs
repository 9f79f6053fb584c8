//! A cascaded pair of Intel 8259A programmable interrupt controllers: master at 0x20/0x21
//! (IRQ 0-7), slave at 0xa0/0xa1 (IRQ 8-15) on the master's IR2.
//!
//! Modelled: ICW1-ICW4 initialisation (edge/level, single/cascade, ICW4 needed, auto-EOI,
//! special fully nested mode), OCW1 masks, OCW2 EOI (non-specific, specific, with rotation),
//! set-priority and rotate-in-auto-EOI commands, OCW3 IRR/ISR read select, poll command and
//! special mask mode, priority resolution with rotation, and INTA with spurious IRQ 7 / 15.
//!
//! Interrupt inputs are driven with [`Pic::set_irq`] (a level) or [`Pic::pulse_irq`] (an edge).
//! In edge mode a request is latched in IRR on a low-to-high transition and stays there until
//! acknowledged (or the controller is re-initialised). The slave's INT output drives the
//! master's IR2 input.
//!
//! Reset state (what the VMM starts a guest with): initialised like a PC BIOS leaves it —
//! master vectors 0x08-0x0f, slave 0x70-0x77, cascade on IR2, edge triggered — with every
//! input masked, so nothing is delivered until the guest programs and unmasks the PICs.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::{IrqSink, Persist};

/// Master command port.
pub const PIC_MASTER_CMD: u16 = 0x20;
/// Master data (mask) port.
pub const PIC_MASTER_DATA: u16 = 0x21;
/// Slave command port.
pub const PIC_SLAVE_CMD: u16 = 0xa0;
/// Slave data (mask) port.
pub const PIC_SLAVE_DATA: u16 = 0xa1;
/// Master IR line the slave is cascaded on.
pub const CASCADE_IRQ: u8 = 2;
/// Id of the PIC pair's state in saved device state.
pub const PIC_ID: &str = "pic";

/// Errors of the PIC.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PicError {
    /// An IRQ number outside 0..=15.
    #[error("IRQ {0} does not exist on the 8259 pair; use 0..=15")]
    NoSuchIrq(u8),
    /// A port that is not a PIC port.
    #[error("port {0:#06x} is not a PIC port (0x20, 0x21, 0xa0, 0xa1)")]
    NoSuchPort(u16),
    /// A saved state that the device cannot be in.
    #[error("saved PIC state is invalid: {0}; the state is corrupt or from an incompatible build")]
    InvalidState(String),
}

/// State of one 8259A; also its saved form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// Current level of the eight inputs (for edge detection).
    pub lines: u8,
    /// Vector of IR0 (ICW2 & 0xf8).
    pub vector_base: u8,
    /// IR line with the highest priority (rotation).
    pub priority_base: u8,
    /// Initialisation step: 0 done, 1 expecting ICW2, 2 expecting ICW3, 3 expecting ICW4.
    pub init_step: u8,
    /// ICW1.IC4: an ICW4 follows.
    pub icw4_needed: bool,
    /// ICW1.SNGL: single controller, no ICW3.
    pub single: bool,
    /// ICW1.LTIM: level-triggered inputs.
    pub level_triggered: bool,
    /// ICW3: on the master, which IR lines have slaves; on the slave, its cascade id.
    pub icw3: u8,
    /// ICW4.AEOI.
    pub auto_eoi: bool,
    /// ICW4.SFNM.
    pub special_fully_nested: bool,
    /// ICW4.uPM (8086 mode); 8080 mode is recorded but vectors are always delivered 8086-style.
    pub mode_8086: bool,
    /// OCW2 rotate-in-auto-EOI.
    pub rotate_on_auto_eoi: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// OCW3 read select: ISR (true) or IRR (false).
    pub read_isr: bool,
    /// OCW3 poll command armed for the next command-port read.
    pub poll: bool,
}

impl PicChipState {
    fn reset(vector_base: u8, icw3: u8) -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0xff,
            lines: 0,
            vector_base,
            priority_base: 0,
            init_step: 0,
            icw4_needed: true,
            single: false,
            level_triggered: false,
            icw3,
            auto_eoi: false,
            special_fully_nested: false,
            mode_8086: true,
            rotate_on_auto_eoi: false,
            special_mask: false,
            read_isr: false,
            poll: false,
        }
    }

    /// Priority rank (0 highest) of the highest-priority bit of `mask`.
    fn best(&self, mask: u8) -> Option<u8> {
        (0..8u8).find(|p| mask & (1 << ((p + self.priority_base) & 7)) != 0)
    }

    fn irq_of_rank(&self, rank: u8) -> u8 {
        (rank + self.priority_base) & 7
    }

    /// The IR line this chip would deliver now, if its INT output is asserted.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let requests = self.irr & !self.imr;
        let rank = self.best(requests)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if is_master && self.special_fully_nested {
            // A slave's further, higher-priority requests may nest.
            in_service &= !self.icw3;
        }
        let cur = self.best(in_service).unwrap_or(8);
        (rank < cur).then(|| self.irq_of_rank(rank))
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << irq;
        if self.level_triggered {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// INTA for `irq` on this chip.
    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_base = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        self.irr &= !bit;
        if self.level_triggered && self.lines & bit != 0 {
            self.irr |= bit;
        }
    }

    fn eoi_irq(&mut self, irq: u8, rotate: bool) {
        self.isr &= !(1 << irq);
        if rotate {
            self.priority_base = (irq + 1) & 7;
        }
    }

    fn write_cmd(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1.
            self.irr = 0;
            self.isr = 0;
            self.imr = 0;
            self.priority_base = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.rotate_on_auto_eoi = false;
            self.auto_eoi = false;
            self.special_fully_nested = false;
            self.mode_8086 = false;
            self.icw4_needed = value & 0x01 != 0;
            self.single = value & 0x02 != 0;
            self.level_triggered = value & 0x08 != 0;
            if self.level_triggered {
                self.irr = self.lines;
            }
            self.init_step = 1;
        } else if value & 0x08 == 0 {
            // OCW2.
            let level = value & 7;
            match value >> 5 {
                0b001 => {
                    if let Some(r) = self.best(self.isr) {
                        let irq = self.irq_of_rank(r);
                        self.eoi_irq(irq, false);
                    }
                }
                0b011 => self.eoi_irq(level, false),
                0b101 => {
                    if let Some(r) = self.best(self.isr) {
                        let irq = self.irq_of_rank(r);
                        self.eoi_irq(irq, true);
                    }
                }
                0b111 => self.eoi_irq(level, true),
                0b100 => self.rotate_on_auto_eoi = true,
                0b000 => self.rotate_on_auto_eoi = false,
                0b110 => self.priority_base = (level + 1) & 7,
                _ => {} // 0b010: no operation
            }
        } else {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            1 => {
                self.vector_base = value & 0xf8;
                self.init_step = if !self.single {
                    2
                } else if self.icw4_needed {
                    3
                } else {
                    0
                };
            }
            2 => {
                self.icw3 = value;
                self.init_step = if self.icw4_needed { 3 } else { 0 };
            }
            3 => {
                self.mode_8086 = value & 0x01 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.special_fully_nested = value & 0x10 != 0;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    fn validate(&self, which: &str) -> Result<(), PicError> {
        if self.init_step > 3 {
            return Err(PicError::InvalidState(format!(
                "{which} init step {} is above 3",
                self.init_step
            )));
        }
        if self.priority_base > 7 {
            return Err(PicError::InvalidState(format!(
                "{which} priority base {} is above 7",
                self.priority_base
            )));
        }
        Ok(())
    }
}

/// Saved state of the PIC pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// Master (IRQ 0-7).
    pub master: PicChipState,
    /// Slave (IRQ 8-15).
    pub slave: PicChipState,
}

/// The master/slave 8259A pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pic {
    master: PicChipState,
    slave: PicChipState,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// The pair in its reset state (see the module documentation).
    pub fn new() -> Self {
        Self {
            master: PicChipState::reset(0x08, 1 << CASCADE_IRQ),
            slave: PicChipState::reset(0x70, CASCADE_IRQ),
        }
    }

    /// The reset state with inputs already at `levels` (bit n = IRQ n) and no request
    /// latched: for wiring devices whose outputs idle high without a power-on edge.
    pub fn with_line_levels(levels: u16) -> Self {
        let mut pic = Self::new();
        let [lo, hi] = levels.to_le_bytes();
        pic.master.lines = lo;
        pic.slave.lines = hi;
        pic
    }

    /// Set input `irq` (0-15) to `level` without latching a request: the power-on level of
    /// a newly connected device's output. Other IRQ numbers are ignored.
    pub(crate) fn preset_line(&mut self, irq: u8, level: bool) {
        let (chip, bit) = match irq {
            0..=7 => (&mut self.master, 1u8 << irq),
            8..=15 => (&mut self.slave, 1u8 << (irq - 8)),
            _ => return,
        };
        if level {
            chip.lines |= bit;
        } else {
            chip.lines &= !bit;
        }
    }

    /// Rebuild from saved state.
    pub fn from_state(state: &PicState) -> Result<Self, PicError> {
        state.master.validate("master")?;
        state.slave.validate("slave")?;
        let mut pic = Self {
            master: state.master.clone(),
            slave: state.slave.clone(),
        };
        // The master's IR2 level is derived from the slave; a consistent state already
        // agrees, and a recomputation never sets IRR on a state that was saved consistently.
        pic.update_cascade();
        Ok(pic)
    }

    /// Saved state.
    pub fn state(&self) -> PicState {
        PicState {
            master: self.master.clone(),
            slave: self.slave.clone(),
        }
    }

    /// Master chip state (read-only view).
    pub fn master(&self) -> &PicChipState {
        &self.master
    }

    /// Slave chip state (read-only view).
    pub fn slave(&self) -> &PicChipState {
        &self.slave
    }

    fn update_cascade(&mut self) {
        let out = self.slave.pending(false).is_some();
        self.master.set_line(CASCADE_IRQ, out);
    }

    fn is_cascade(&self, irq: u8) -> bool {
        !self.master.single && self.master.icw3 & (1 << irq) != 0
    }

    /// Drive input `irq` (0-15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) -> Result<(), PicError> {
        // Devices report their levels on every call: a line that keeps its level changes
        // nothing (in level mode IRR already follows the line), so skip the cascade update.
        let (lines, bit) = match irq {
            0..=7 => (self.master.lines, 1u8 << irq),
            8..=15 => (self.slave.lines, 1u8 << (irq - 8)),
            _ => return Err(PicError::NoSuchIrq(irq)),
        };
        if (lines & bit != 0) == level {
            return Ok(());
        }
        match irq {
            0..=7 => self.master.set_line(irq, level),
            8..=15 => {
                self.slave.set_line(irq - 8, level);
                self.update_cascade();
            }
            _ => return Err(PicError::NoSuchIrq(irq)),
        }
        Ok(())
    }

    /// A rising then falling edge on input `irq` (an edge-triggered device interrupt).
    pub fn pulse_irq(&mut self, irq: u8) -> Result<(), PicError> {
        self.set_irq(irq, false)?;
        self.set_irq(irq, true)?;
        self.set_irq(irq, false)
    }

    /// Vector the next INTA would return, if the master's INT output is asserted. When the
    /// master asks on behalf of a slave that no longer has a request this is the slave's
    /// spurious vector (IRQ 15).
    pub fn pending_vector(&self) -> Option<u8> {
        let m = self.master.pending(true)?;
        if self.is_cascade(m) {
            let s = self.slave.pending(false).unwrap_or(7);
            Some(self.slave.vector_base | s)
        } else {
            Some(self.master.vector_base | m)
        }
    }

    /// Whether the INT output to the CPU is asserted.
    pub fn has_interrupt(&self) -> bool {
        self.master.pending(true).is_some()
    }

    /// The interrupt acknowledge cycle: returns the vector and moves the request to
    /// in-service. With no request it returns the master's spurious vector (IRQ 7) and
    /// changes nothing; a cascade request with no slave request gives the slave's spurious
    /// vector (IRQ 15) with the master's IR2 in service, as on the real part.
    pub fn acknowledge(&mut self) -> u8 {
        let Some(m) = self.master.pending(true) else {
            return self.master.vector_base | 7;
        };
        self.master.ack(m);
        let vector = if self.is_cascade(m) {
            match self.slave.pending(false) {
                Some(s) => {
                    self.slave.ack(s);
                    self.slave.vector_base | s
                }
                None => self.slave.vector_base | 7,
            }
        } else {
            self.master.vector_base | m
        };
        self.update_cascade();
        vector
    }

    fn poll(&mut self, slave: bool) -> u8 {
        let chip = if slave {
            &mut self.slave
        } else {
            &mut self.master
        };
        chip.poll = false;
        let result = match chip.pending(!slave) {
            Some(irq) => {
                chip.ack(irq);
                0x80 | irq
            }
            None => 0,
        };
        if slave {
            self.update_cascade();
        }
        result
    }

    /// Guest read of a PIC port.
    pub fn read_port(&mut self, port: u16) -> Result<u8, PicError> {
        let (slave, data) = match port {
            PIC_MASTER_CMD => (false, false),
            PIC_MASTER_DATA => (false, true),
            PIC_SLAVE_CMD => (true, false),
            PIC_SLAVE_DATA => (true, true),
            _ => return Err(PicError::NoSuchPort(port)),
        };
        let chip = if slave { &self.slave } else { &self.master };
        Ok(if data {
            chip.imr
        } else if chip.poll {
            self.poll(slave)
        } else if chip.read_isr {
            chip.isr
        } else {
            chip.irr
        })
    }

    /// Guest write of a PIC port.
    pub fn write_port(&mut self, port: u16, value: u8) -> Result<(), PicError> {
        match port {
            PIC_MASTER_CMD => self.master.write_cmd(value),
            PIC_MASTER_DATA => self.master.write_data(value),
            PIC_SLAVE_CMD => self.slave.write_cmd(value),
            PIC_SLAVE_DATA => self.slave.write_data(value),
            _ => return Err(PicError::NoSuchPort(port)),
        }
        if port == PIC_SLAVE_CMD || port == PIC_SLAVE_DATA {
            self.update_cascade();
        }
        Ok(())
    }
}

impl Persist for Pic {
    type State = PicState;
    type Error = PicError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> PicState {
        self.state()
    }

    fn restore(&mut self, state: &PicState) -> Result<(), PicError> {
        *self = Self::from_state(state)?;
        Ok(())
    }
}

/// Devices' interrupt lines end at the PIC pair; lines above 15 do not exist and are ignored.
impl IrqSink for Pic {
    fn set_level(&mut self, irq: u8, level: bool) {
        let _ = self.set_irq(irq, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence Linux (`init_8259A`) and SeaBIOS use, remapping to 0x20 / 0x28.
    fn linux_init(pic: &mut Pic) {
        let w = |pic: &mut Pic, p, v| pic.write_port(p, v).unwrap();
        w(pic, 0x21, 0xff); // mask all
        w(pic, 0xa1, 0xff);
        w(pic, 0x20, 0x11); // ICW1: edge, cascade, ICW4
        w(pic, 0x21, 0x20); // ICW2: vectors 0x20-0x27
        w(pic, 0x21, 0x04); // ICW3: slave on IR2
        w(pic, 0x21, 0x01); // ICW4: 8086, normal EOI
        w(pic, 0xa0, 0x11);
        w(pic, 0xa1, 0x28);
        w(pic, 0xa1, 0x02); // slave id 2
        w(pic, 0xa1, 0x01);
        w(pic, 0x21, 0xfb); // all masked but the cascade
        w(pic, 0xa1, 0xff);
    }

    fn ready_pic() -> Pic {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        pic.write_port(0x21, 0x00).unwrap();
        pic.write_port(0xa1, 0x00).unwrap();
        pic
    }

    fn eoi(pic: &mut Pic, irq: u8) {
        if irq >= 8 {
            pic.write_port(0xa0, 0x20).unwrap();
        }
        pic.write_port(0x20, 0x20).unwrap();
    }

    #[test]
    fn reset_state_masks_everything() {
        let mut pic = Pic::new();
        pic.pulse_irq(0).unwrap();
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.read_port(0x21).unwrap(), 0xff);
        pic.write_port(0x21, 0xfe).unwrap();
        assert_eq!(pic.pending_vector(), Some(0x08), "BIOS-style default base");
    }

    #[test]
    fn initial_line_levels_latch_nothing() {
        let mut pic = Pic::with_line_levels(0x0001);
        pic.write_port(0x21, 0x00).unwrap();
        pic.set_irq(0, true).unwrap();
        assert_eq!(pic.pending_vector(), None, "already high: no edge");
        pic.set_irq(0, false).unwrap();
        pic.set_irq(0, true).unwrap();
        assert_eq!(pic.pending_vector(), Some(0x08));
    }

    #[test]
    fn init_sequence_programs_both_chips() {
        let mut pic = Pic::new();
        linux_init(&mut pic);
        let (m, s) = (pic.master(), pic.slave());
        assert_eq!(
            (m.vector_base, m.icw3, m.init_step, m.imr),
            (0x20, 0x04, 0, 0xfb)
        );
        assert_eq!(
            (s.vector_base, s.icw3, s.init_step, s.imr),
            (0x28, 0x02, 0, 0xff)
        );
        assert!(m.mode_8086 && !m.auto_eoi && !m.level_triggered && !m.single);
        assert_eq!(pic.read_port(0x21).unwrap(), 0xfb);
        assert_eq!(pic.read_port(0xa1).unwrap(), 0xff);
    }

    #[test]
    fn icw1_without_icw4_and_single_mode() {
        let mut pic = Pic::new();
        pic.write_port(0x20, 0x12).unwrap(); // single, no ICW4
        pic.write_port(0x21, 0x40).unwrap(); // ICW2 only
        assert_eq!(pic.master().init_step, 0);
        pic.write_port(0x21, 0x00).unwrap(); // now OCW1
        pic.set_irq(2, true).unwrap();
        assert_eq!(pic.acknowledge(), 0x42, "single mode: IR2 is a plain input");
    }

    #[test]
    fn delivers_and_acknowledges_master_irq() {
        let mut pic = ready_pic();
        assert_eq!(pic.pending_vector(), None);
        pic.pulse_irq(1).unwrap();
        assert_eq!(pic.read_port(0x20).unwrap(), 0x02, "IRR read by default");
        assert_eq!(pic.pending_vector(), Some(0x21));
        assert_eq!(pic.acknowledge(), 0x21);
        assert_eq!(pic.pending_vector(), None);
        pic.write_port(0x20, 0x0b).unwrap(); // OCW3: read ISR
        assert_eq!(pic.read_port(0x20).unwrap(), 0x02);
        eoi(&mut pic, 1);
        assert_eq!(pic.read_port(0x20).unwrap(), 0x00);
        pic.write_port(0x20, 0x0a).unwrap(); // back to IRR
        assert_eq!(pic.read_port(0x20).unwrap(), 0x00);
    }

    #[test]
    fn masking_holds_requests_until_unmasked() {
        let mut pic = ready_pic();
        pic.write_port(0x21, 0x01).unwrap();
        pic.pulse_irq(0).unwrap();
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(
            pic.read_port(0x20).unwrap() & 1,
            1,
            "request latched in IRR"
        );
        pic.write_port(0x21, 0x00).unwrap();
        assert_eq!(pic.pending_vector(), Some(0x20));
    }

    #[test]
    fn edge_triggered_needs_a_new_rising_edge() {
        let mut pic = ready_pic();
        pic.set_irq(3, true).unwrap();
        assert_eq!(pic.acknowledge(), 0x23);
        eoi(&mut pic, 3);
        pic.set_irq(3, true).unwrap(); // still high: no new edge
        assert_eq!(pic.pending_vector(), None);
        pic.set_irq(3, false).unwrap();
        pic.set_irq(3, true).unwrap();
        assert_eq!(pic.pending_vector(), Some(0x23));
    }

    #[test]
    fn level_triggered_mode_follows_the_line() {
        let mut pic = Pic::new();
        pic.write_port(0x20, 0x19).unwrap(); // LTIM
        pic.write_port(0x21, 0x20).unwrap();
        pic.write_port(0x21, 0x04).unwrap();
        pic.write_port(0x21, 0x01).unwrap();
        pic.write_port(0x21, 0x00).unwrap();
        pic.set_irq(5, true).unwrap();
        assert_eq!(pic.acknowledge(), 0x25);
        eoi(&mut pic, 5);
        assert_eq!(pic.pending_vector(), Some(0x25), "still asserted");
        pic.set_irq(5, false).unwrap();
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn priority_and_nesting() {
        let mut pic = ready_pic();
        pic.pulse_irq(4).unwrap();
        pic.pulse_irq(6).unwrap();
        assert_eq!(pic.acknowledge(), 0x24, "lower IR line wins");
        assert_eq!(pic.pending_vector(), None, "IR6 blocked by IR4 in service");
        pic.pulse_irq(1).unwrap();
        assert_eq!(pic.acknowledge(), 0x21, "higher priority nests");
        eoi(&mut pic, 1); // non-specific EOI clears the highest in service (IR1)
        pic.write_port(0x20, 0x0b).unwrap();
        assert_eq!(pic.read_port(0x20).unwrap(), 0x10);
        eoi(&mut pic, 4);
        assert_eq!(pic.acknowledge(), 0x26);
    }

    #[test]
    fn specific_eoi_and_rotation() {
        let mut pic = ready_pic();
        pic.pulse_irq(0).unwrap();
        pic.pulse_irq(5).unwrap();
        assert_eq!(pic.acknowledge(), 0x20);
        pic.write_port(0x20, 0x60 | 5).unwrap(); // specific EOI for IR5 (not in service)
        pic.write_port(0x20, 0x0b).unwrap();
        assert_eq!(pic.read_port(0x20).unwrap(), 0x01, "IR0 still in service");
        pic.write_port(0x20, 0x60).unwrap(); // specific EOI IR0
        assert_eq!(pic.read_port(0x20).unwrap(), 0x00);
        // Set priority: IR5 lowest, so IR6 is now highest.
        pic.write_port(0x20, 0xc0 | 5).unwrap();
        pic.pulse_irq(6).unwrap();
        assert_eq!(pic.acknowledge(), 0x26, "IR6 beats IR5 after rotation");
        // Rotate on non-specific EOI: IR6 becomes lowest, IR7 highest.
        pic.write_port(0x20, 0xa0).unwrap();
        assert_eq!(pic.master().priority_base, 7);
        assert_eq!(pic.acknowledge(), 0x25);
        // Rotate on specific EOI.
        pic.write_port(0x20, 0xe0 | 5).unwrap();
        assert_eq!(pic.master().priority_base, 6);
    }

    #[test]
    fn cascade_delivers_slave_vectors() {
        let mut pic = ready_pic();
        pic.pulse_irq(12).unwrap();
        assert_eq!(pic.read_port(0x20).unwrap(), 0x04, "master sees IR2");
        assert_eq!(pic.read_port(0xa0).unwrap(), 0x10);
        assert_eq!(pic.pending_vector(), Some(0x2c));
        assert_eq!(pic.acknowledge(), 0x2c);
        pic.write_port(0x20, 0x0b).unwrap();
        pic.write_port(0xa0, 0x0b).unwrap();
        assert_eq!(pic.read_port(0x20).unwrap(), 0x04);
        assert_eq!(pic.read_port(0xa0).unwrap(), 0x10);
        // A master IRQ of higher priority than IR2 nests; a lower one waits.
        pic.pulse_irq(3).unwrap();
        assert_eq!(pic.pending_vector(), None);
        pic.pulse_irq(1).unwrap();
        assert_eq!(pic.acknowledge(), 0x21);
        eoi(&mut pic, 1);
        eoi(&mut pic, 12);
        assert_eq!(pic.read_port(0xa0).unwrap(), 0x00);
        assert_eq!(pic.read_port(0x20).unwrap(), 0x00);
        assert_eq!(pic.acknowledge(), 0x23);
    }

    #[test]
    fn slave_priority_and_second_request_after_eoi() {
        let mut pic = ready_pic();
        pic.pulse_irq(14).unwrap();
        pic.pulse_irq(9).unwrap();
        assert_eq!(pic.acknowledge(), 0x29);
        assert_eq!(pic.pending_vector(), None);
        eoi(&mut pic, 9);
        assert_eq!(pic.acknowledge(), 0x2e, "IRQ14 delivered after the EOI");
    }

    #[test]
    fn special_fully_nested_lets_slave_nest() {
        let mut pic = Pic::new();
        pic.write_port(0x20, 0x11).unwrap();
        pic.write_port(0x21, 0x20).unwrap();
        pic.write_port(0x21, 0x04).unwrap();
        pic.write_port(0x21, 0x11).unwrap(); // SFNM
        pic.write_port(0x21, 0x00).unwrap();
        pic.write_port(0xa1, 0x00).unwrap();
        pic.pulse_irq(12).unwrap();
        assert_eq!(pic.acknowledge(), 0x74, "slave still at its BIOS base");
        pic.pulse_irq(9).unwrap();
        assert_eq!(
            pic.acknowledge(),
            0x71,
            "higher-priority slave IRQ nests in SFNM"
        );
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let mut pic = ready_pic();
        assert_eq!(pic.acknowledge(), 0x27, "nothing pending: spurious IRQ7");
        pic.write_port(0x20, 0x0b).unwrap();
        assert_eq!(
            pic.read_port(0x20).unwrap(),
            0,
            "spurious IRQ7 sets no ISR bit"
        );
        // Master latched IR2, but the slave request is masked before INTA.
        pic.pulse_irq(10).unwrap();
        assert_eq!(pic.pending_vector(), Some(0x2a));
        pic.write_port(0xa1, 0x04).unwrap();
        assert_eq!(pic.pending_vector(), Some(0x2f));
        assert_eq!(pic.acknowledge(), 0x2f, "spurious IRQ15");
        assert_eq!(pic.read_port(0x20).unwrap(), 0x04, "master IR2 in service");
        pic.write_port(0xa0, 0x0b).unwrap();
        assert_eq!(pic.read_port(0xa0).unwrap(), 0x00, "slave ISR untouched");
    }

    #[test]
    fn auto_eoi_sets_no_isr() {
        let mut pic = Pic::new();
        pic.write_port(0x20, 0x11).unwrap();
        pic.write_port(0x21, 0x30).unwrap();
        pic.write_port(0x21, 0x04).unwrap();
        pic.write_port(0x21, 0x03).unwrap(); // AEOI
        pic.write_port(0x21, 0x00).unwrap();
        pic.pulse_irq(4).unwrap();
        assert_eq!(pic.acknowledge(), 0x34);
        assert_eq!(pic.master().isr, 0);
        pic.pulse_irq(5).unwrap();
        assert_eq!(pic.acknowledge(), 0x35, "no EOI needed");
        // Rotate in AEOI mode.
        pic.write_port(0x20, 0x80).unwrap();
        pic.pulse_irq(6).unwrap();
        assert_eq!(pic.acknowledge(), 0x36);
        assert_eq!(pic.master().priority_base, 7);
        pic.write_port(0x20, 0x00).unwrap();
        assert!(!pic.master().rotate_on_auto_eoi);
    }

    #[test]
    fn poll_command() {
        let mut pic = ready_pic();
        pic.write_port(0x20, 0x0c).unwrap(); // poll
        assert_eq!(pic.read_port(0x20).unwrap(), 0x00, "no request");
        pic.pulse_irq(5).unwrap();
        pic.write_port(0x20, 0x0c).unwrap();
        assert_eq!(pic.read_port(0x20).unwrap(), 0x85);
        assert_eq!(pic.master().isr, 0x20, "poll acknowledges");
        assert_eq!(
            pic.read_port(0x20).unwrap(),
            0x00,
            "back to IRR after one poll read"
        );
    }

    #[test]
    fn special_mask_mode_allows_lower_priority() {
        let mut pic = ready_pic();
        pic.pulse_irq(3).unwrap();
        assert_eq!(pic.acknowledge(), 0x23);
        pic.pulse_irq(5).unwrap();
        assert_eq!(pic.pending_vector(), None);
        pic.write_port(0x21, 0x08).unwrap(); // mask IR3 (in service)
        pic.write_port(0x20, 0x68).unwrap(); // set special mask mode
        assert_eq!(pic.pending_vector(), Some(0x25));
        pic.write_port(0x20, 0x48).unwrap(); // reset special mask mode
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn reinit_clears_requests_and_service() {
        let mut pic = ready_pic();
        pic.pulse_irq(1).unwrap();
        pic.pulse_irq(4).unwrap();
        pic.acknowledge();
        linux_init(&mut pic);
        assert_eq!((pic.master().irr, pic.master().isr), (0, 0));
    }

    #[test]
    fn bad_irq_and_port_are_errors() {
        let mut pic = Pic::new();
        assert_eq!(pic.set_irq(16, true), Err(PicError::NoSuchIrq(16)));
        assert_eq!(pic.read_port(0x22), Err(PicError::NoSuchPort(0x22)));
        assert_eq!(pic.write_port(0x40, 0), Err(PicError::NoSuchPort(0x40)));
    }

    #[test]
    fn save_restore_with_irq_in_service_continues_identically() {
        let mut a = ready_pic();
        a.pulse_irq(0).unwrap();
        a.pulse_irq(11).unwrap();
        assert_eq!(a.acknowledge(), 0x20);
        a.pulse_irq(4).unwrap();
        a.write_port(0xa0, 0x0b).unwrap();
        let json = serde_json::to_string(&a.state()).unwrap();
        let mut b = Pic::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(a, b);
        for pic in [&mut a, &mut b] {
            assert_eq!(pic.pending_vector(), None, "IR0 in service blocks the rest");
            eoi(pic, 0);
        }
        let seq_a: Vec<u8> = (0..3).map(|_| a.acknowledge()).collect();
        let seq_b: Vec<u8> = (0..3).map(|_| b.acknowledge()).collect();
        assert_eq!(seq_a, seq_b);
        assert_eq!(
            seq_a,
            vec![0x2b, 0x27, 0x27],
            "IR2 (slave IRQ 11) before IR4, then spurious while IR2 is in service"
        );
        assert_eq!(a, b);
    }

    #[test]
    fn invalid_state_is_rejected() {
        let mut st = Pic::new().state();
        st.slave.init_step = 9;
        assert!(matches!(
            Pic::from_state(&st),
            Err(PicError::InvalidState(_))
        ));
        let mut st = Pic::new().state();
        st.master.priority_base = 8;
        assert!(Pic::from_state(&st).is_err());
    }
}
