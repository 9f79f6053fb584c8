//! PCI configuration mechanism #1 (ports 0xcf8-0xcff) for a bus with no devices.
//!
//! The address register (dword accesses at 0xcf8) keeps the enable bit (31), bus (23:16),
//! device (15:11), function (10:8) and register (7:2), and reads back what was written with
//! the reserved bits 30:24 and 1:0 as 0, as the PCI spec asks. The data ports (0xcfc-0xcff,
//! any width) read all-ones for every bus, device, function and register — "no device" —
//! and writes to them are dropped. Accesses to 0xcf8-0xcfb other than a whole dword are not
//! the address register: per the spec they are ordinary I/O cycles, which nothing here
//! answers (they read all-ones and count as unclaimed).
//!
//! # What Linux 6.1 makes of it
//! `pci_check_type1` (arch/x86/pci/direct.c) writes 0x80000000 and reads it back: that
//! works. It then runs `pci_sanity_check`, which passes at once when DMI names a BIOS from
//! 2001 or later and otherwise looks on bus 0 for a host bridge, a VGA device or an Intel or
//! Compaq vendor ID. esvm has no SMBIOS tables and bus 0 is empty, so the check fails (a
//! debug message only). `pci_check_type2` reads the bytes at 0xcf8 and 0xcfa back as 0xff
//! and fails too, and there is no ACPI MCFG for MMCONFIG. Linux then prints
//! `PCI: Fatal: No config space access function found` and, later, `PCI: System does not
//! support PCI`, and boots on without PCI (`pci=off` prints the same line). With `pci=conf1`
//! on the command line the sanity check is skipped: `PCI: Using configuration type 1 for base
//! access`, then bus 0 is scanned and found empty, with no error. A default probe without
//! that option needs SMBIOS (BIOS date >= 2001) or a host bridge at 00:00.0, neither of which
//! this device provides.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// The configuration address register.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// The first configuration data port.
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// Registry id of the configuration ports.
pub const PCI_CONFIG_ID: &str = "pci-conf1";
/// The writable bits of the address register: enable, bus, device, function, register.
pub const PCI_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Saved state of the configuration ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// The address register.
    pub address: u32,
}

/// Configuration mechanism #1 on an empty bus. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciConfig {
    address: u32,
}

impl PciConfig {
    /// The address register at 0 (disabled).
    pub fn new() -> Self {
        Self::default()
    }

    /// The address register.
    pub fn address(&self) -> u32 {
        self.address
    }
}

fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

impl Persist for PciConfig {
    type State = PciConfigState;
    type Error = Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> PciConfigState {
        PciConfigState {
            address: self.address,
        }
    }

    fn restore(&mut self, state: &PciConfigState) -> Result<(), Infallible> {
        self.address = state.address & PCI_ADDRESS_MASK;
        Ok(())
    }
}

/// Ports 0xcf8-0xcff on the platform, taking 1-, 2- and 4-byte accesses whole.
impl Device for PciConfig {
    fn id(&self) -> &str {
        PCI_CONFIG_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![PortRegion::whole(PCI_CONFIG_ADDRESS, 8)]
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE
    }

    fn io_read(
        &mut self,
        _base: u16,
        offset: u16,
        data: &mut [u8],
        _cx: &mut DeviceContext<'_>,
    ) -> Access {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4.., _) => data.fill(0xff), // no device answers a configuration read
            _ => return Access::NotMine,
        }
        Access::Handled
    }

    fn io_write(
        &mut self,
        _base: u16,
        offset: u16,
        data: &[u8],
        _cx: &mut DeviceContext<'_>,
    ) -> Access {
        match (offset, data.len()) {
            (0, 4) => self.address = le_value(data) & PCI_ADDRESS_MASK,
            (4.., _) => {} // no device takes a configuration write
            _ => return Access::NotMine,
        }
        Access::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::IrqSink;

    struct NoIrq;
    impl IrqSink for NoIrq {
        fn set_level(&mut self, irq: u8, _level: bool) {
            panic!("the PCI ports drove IRQ {irq}");
        }
    }

    fn read(p: &mut PciConfig, offset: u16, len: usize) -> (Access, u32) {
        let mut b = [0u8; 4];
        let a = p.io_read(PCI_CONFIG_ADDRESS, offset, &mut b[..len], &mut DeviceContext::new(0, &mut NoIrq));
        (a, le_value(&b[..len]))
    }

    fn write(p: &mut PciConfig, offset: u16, v: u32, len: usize) -> Access {
        p.io_write(PCI_CONFIG_ADDRESS, offset, &v.to_le_bytes()[..len], &mut DeviceContext::new(0, &mut NoIrq))
    }

    #[test]
    fn every_function_reads_as_no_device() {
        let mut p = PciConfig::new();
        for bus in [0u32, 1, 0x80, 0xff] {
            for devfn in [0u32, 0x08, 0xf8, 0xff] {
                for reg in [0u32, 0x08, 0x0c, 0x3c, 0xfc] {
                    let addr = 0x8000_0000 | bus << 16 | devfn << 8 | reg;
                    assert_eq!(write(&mut p, 0, addr, 4), Access::Handled);
                    assert_eq!(read(&mut p, 4, 4), (Access::Handled, 0xffff_ffff));
                    assert_eq!(read(&mut p, 6, 2), (Access::Handled, 0xffff));
                    assert_eq!(read(&mut p, 7, 1), (Access::Handled, 0xff));
                    assert_eq!(write(&mut p, 4, 0x1234_5678, 4), Access::Handled);
                    assert_eq!(read(&mut p, 4, 4).1, 0xffff_ffff, "writes are dropped");
                }
            }
        }
    }

    #[test]
    fn the_address_register_reads_back_without_reserved_bits() {
        let mut p = PciConfig::new();
        assert_eq!(read(&mut p, 0, 4), (Access::Handled, 0));
        write(&mut p, 0, 0x8000_0000, 4);
        assert_eq!(read(&mut p, 0, 4).1, 0x8000_0000, "Linux's pci_check_type1");
        write(&mut p, 0, 0xffff_ffff, 4);
        assert_eq!(p.address(), 0x80ff_fffc);
        // Byte and word accesses at 0xcf8-0xcfb are not the register.
        assert_eq!(write(&mut p, 3, 0x01, 1), Access::NotMine);
        assert_eq!(write(&mut p, 0, 0, 2), Access::NotMine);
        assert_eq!(read(&mut p, 0, 1).0, Access::NotMine);
        assert_eq!(read(&mut p, 2, 1).0, Access::NotMine);
        assert_eq!(p.address(), 0x80ff_fffc);
        let json = serde_json::to_string(&Persist::save(&p)).unwrap();
        let mut r = PciConfig::new();
        Persist::restore(&mut r, &serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(r, p);
    }
}
