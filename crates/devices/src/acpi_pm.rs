//! The ACPI fixed-hardware power-management registers the FADT points at: the PM1a event
//! block at port 0x600 (PM1_STS at 0x600, PM1_EN at 0x602, 16 bits each) and the PM1a
//! control block at port 0x604 (PM1_CNT, 16 bits).
//!
//! PM1_CNT reads with SCI_EN set (the platform is always in ACPI mode: the FADT has no
//! SMI command port). Writing SLP_EN (bit 13) with SLP_TYP (bits 12:10) = the DSDT's `\_S5`
//! value ([`ACPI_SLP_TYP_S5`]) is the soft power-off ([`AcpiPm::take_power_off`]): the
//! VMM ends the VM, with exit status 0. Other
//! sleep types are ignored (no S1-S4). No event ever sets a PM1_STS bit (no power button, no
//! PM timer), so the SCI is never raised.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// PM1a event block (PM1_STS, PM1_EN).
pub const ACPI_PM1A_EVT: u16 = 0x600;
/// PM1a control block (PM1_CNT).
pub const ACPI_PM1A_CNT: u16 = 0x604;
/// SLP_TYP of S5 (soft off), as the DSDT's `\_S5` package gives it.
pub const ACPI_SLP_TYP_S5: u16 = 5;
/// Registry id.
pub const ACPI_PM_ID: &str = "acpi-pm";

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

/// Saved state of the PM registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiPmState {
    /// PM1_EN.
    pub pm1_en: u16,
    /// PM1_CNT as last written (without SLP_EN, which is write-only).
    pub pm1_cnt: u16,
}

/// The PM1a registers; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct AcpiPm {
    s: AcpiPmState,
    power_off: bool,
}

impl AcpiPm {
    /// Reset state.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    type Error = Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> AcpiPmState {
        self.s
    }

    fn restore(&mut self, state: &AcpiPmState) -> Result<(), Infallible> {
        self.s = *state;
        Ok(())
    }
}

fn fill(data: &mut [u8], v: u16, byte: usize) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(byte + i).copied().unwrap_or(0);
    }
}

impl Device for AcpiPm {
    fn id(&self) -> &str {
        ACPI_PM_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![
            PortRegion::whole(ACPI_PM1A_EVT, 4),
            PortRegion::whole(ACPI_PM1A_CNT, 2),
        ]
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE
    }

    fn io_read(
        &mut self,
        base: u16,
        offset: u16,
        data: &mut [u8],
        _: &mut DeviceContext<'_>,
    ) -> Access {
        let (reg, byte) = match (base, offset) {
            (ACPI_PM1A_EVT, 0 | 1) => (0, offset),
            (ACPI_PM1A_EVT, _) => (self.s.pm1_en, offset - 2),
            _ => (self.s.pm1_cnt | SCI_EN, offset),
        };
        fill(data, reg, usize::from(byte));
        Access::Handled
    }

    fn io_write(
        &mut self,
        base: u16,
        offset: u16,
        data: &[u8],
        _: &mut DeviceContext<'_>,
    ) -> Access {
        // Registers are 16 bits; a write at the register's start carries it (a byte write
        // of its low half keeps the high half).
        let merge = |old: u16, data: &[u8]| -> u16 {
            match data {
                [lo] => (old & 0xff00) | u16::from(*lo),
                [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
                [] => old,
            }
        };
        match (base, offset) {
            // PM1_STS: write-1-to-clear; nothing is ever set.
            (ACPI_PM1A_EVT, 0) => {}
            (ACPI_PM1A_EVT, 2) => self.s.pm1_en = merge(self.s.pm1_en, data),
            (ACPI_PM1A_CNT, 0) => {
                let v = merge(self.s.pm1_cnt, data);
                if v & SLP_EN != 0 && (v >> 10) & 7 == ACPI_SLP_TYP_S5 {
                    self.power_off = true;
                }
                self.s.pm1_cnt = v & !SLP_EN;
            }
            _ => {}
        }
        Access::Handled
    }

}

impl AcpiPm {
    /// Whether the guest asked for the soft power-off (S5) since the last call.
    pub fn take_power_off(&mut self) -> bool {
        std::mem::take(&mut self.power_off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::LevelRecorder;

    #[test]
    fn s5_sleep_powers_off_with_status_0() {
        let mut pm = AcpiPm::new();
        let mut irqs = LevelRecorder::default();
        let mut cx = DeviceContext::new(0, &mut irqs);
        let mut b = [0u8; 2];
        pm.io_read(ACPI_PM1A_CNT, 0, &mut b, &mut cx);
        assert_eq!(u16::from_le_bytes(b), SCI_EN, "always in ACPI mode");
        // SLP_TYP 5 without SLP_EN: nothing.
        pm.io_write(ACPI_PM1A_CNT, 0, &(5u16 << 10).to_le_bytes(), &mut cx);
        assert!(!pm.take_power_off());
        // S1 with SLP_EN: ignored.
        pm.io_write(ACPI_PM1A_CNT, 0, &((1u16 << 10) | SLP_EN).to_le_bytes(), &mut cx);
        assert!(!pm.take_power_off());
        pm.io_write(ACPI_PM1A_CNT, 0, &((5u16 << 10) | SLP_EN).to_le_bytes(), &mut cx);
        assert!(pm.take_power_off());
        assert!(!pm.take_power_off(), "taken once");
        pm.io_write(ACPI_PM1A_EVT, 2, &0x0120u16.to_le_bytes(), &mut cx);
        let mut en = [0u8; 2];
        pm.io_read(ACPI_PM1A_EVT, 2, &mut en, &mut cx);
        assert_eq!(u16::from_le_bytes(en), 0x0120);
        assert_eq!(pm.save().pm1_en, 0x0120);
    }
}
