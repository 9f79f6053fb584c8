//! The legacy interrupt hardware: the 8259A PIC pair and the 8254 PIT.

use crate::x86::outb;

const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_CMD: u16 = 0xA0;
const PIC2_DATA: u16 = 0xA1;
const EOI: u8 = 0x20;

/// Vector of IRQ 0 after [`remap`] with the conventional offset 0x20.
pub const IRQ_BASE: u8 = 0x20;

/// Reinitialises both PICs so IRQ 0..7 raise vectors `base..base+8` and IRQ 8..15
/// `base+8..base+16`; all lines masked afterwards.
pub fn remap(base: u8) {
    outb(PIC1_CMD, 0x11); // ICW1: edge, cascade, ICW4 follows
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, base); // ICW2: vector offset
    outb(PIC2_DATA, base.wrapping_add(8));
    outb(PIC1_DATA, 0x04); // ICW3: slave on IRQ 2
    outb(PIC2_DATA, 0x02); // ICW3: slave identity 2
    outb(PIC1_DATA, 0x01); // ICW4: 8086 mode
    outb(PIC2_DATA, 0x01);
    set_mask(0xFFFF);
}

/// Sets the interrupt mask of both PICs (bit n masks IRQ n).
pub fn set_mask(mask: u16) {
    outb(PIC1_DATA, mask as u8);
    outb(PIC2_DATA, (mask >> 8) as u8);
}

/// Unmasks exactly the IRQs in `irqs` (bit n = IRQ n); IRQ 2 (the cascade) is unmasked
/// too when any IRQ of the second PIC is.
pub fn unmask_only(irqs: u16) {
    let mut enabled = irqs;
    if irqs & 0xFF00 != 0 {
        enabled |= 1 << 2;
    }
    set_mask(!enabled);
}

/// Signals end of interrupt for `irq`.
pub fn eoi(irq: u8) {
    if irq >= 8 {
        outb(PIC2_CMD, EOI);
    }
    outb(PIC1_CMD, EOI);
}

/// Input clock of the PIT in Hz.
pub const PIT_HZ: u32 = 1_193_182;

/// Programs PIT channel 0 as a rate generator (mode 2) with the given 16-bit divisor
/// (0 means 65536).
pub fn pit_rate_generator(divisor: u16) {
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2, binary
    outb(0x40, divisor as u8);
    outb(0x40, (divisor >> 8) as u8);
}

/// The divisor that makes channel 0 tick at roughly `hz` (clamped to 19..=1193182 Hz).
pub fn pit_divisor_for(hz: u32) -> u16 {
    let d = PIT_HZ / hz.max(1);
    d.clamp(1, 65535) as u16
}
