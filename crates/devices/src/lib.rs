//! The devices of an esvm guest, on a virtual clock, registered in one place and saved by id.
//!
//! esvm's default backend is a deterministic software vCPU whose virtual time is derived from
//! its retired-instruction count, so nothing here reads the host clock (except the host
//! timestamp of benchmark marks, which is diagnostics only). Every device's guest-visible
//! state is a serde type and restores exactly: a device restored from a snapshot behaves from
//! then on exactly like the device that was saved.
//!
//! The pieces:
//! - [`Device`] and [`Persist`]: what a device implements (port and MMIO handlers, a
//!   virtual-time hook, interrupt lines through a [`DeviceContext`], its saved state).
//! - [`Devices`]: the registry — every device on one port bus ([`IoBus`]) and one MMIO bus
//!   ([`MmioBus`]), wired to the interrupt controllers ([`Intc`]: the cascaded 8259A pair
//!   [`Pic`], the [`IoApic`] and the boot vCPU's [`LocalApic`], as on a PC; the 8259 reaches
//!   the vCPU through the local APIC's LINT0 in ExtINT mode),
//!   with [`Devices::save`] / [`Devices::restore`] keeping each device's state by id. The
//!   port table is in the [`registry`] module.
//! - The built-in devices, listed at the bottom of this file: [`Serial`] (COM1 16550A on
//!   vm-superio, IRQ 4), [`Pit`] (8254 on virtual nanoseconds, IRQ 0), [`DebugExit`]
//!   (port 0xf4), [`BenchMarker`] (port 0xf5), [`Rtc`] (MC146818 with CMOS RAM, IRQ 8),
//!   [`I8042`] (keyboard controller, IRQ 1, the CPU reset line), [`PostCode`] (port 0x80)
//!   [`PciConfig`] (PCI configuration mechanism #1 on an empty bus) and [`AcpiPm`] (the
//!   FADT's PM1a registers at 0x600/0x604: S5 is the guest's power-off).
//!
//! # Driving it from the VMM
//! ```
//! use esvm_devices::Devices;
//!
//! let mut dev = Devices::new(Box::new(std::io::sink()));
//! let mut now_ns = 0u64; // the vCPU's virtual time
//! for _ in 0..3 {
//!     // 1. Bring the devices to the vCPU's time; timer edges reach the PIC.
//!     dev.advance_to(now_ns);
//!     // 2. If the vCPU's interrupt window is open (IF=1, no shadow), deliver.
//!     if dev.pending_interrupt().is_some() {
//!         let _vector = dev.acknowledge_interrupt(); // inject this vector
//!     }
//!     // 3. Run the vCPU no further than the next device deadline.
//!     let _budget_ns = dev.next_deadline_ns().map(|d| d - now_ns);
//!     // 4. On a port or MMIO exit: advance_to(exit time), then the access.
//!     dev.advance_to(now_ns + 10);
//!     dev.io_write(0x3f8, b"x").unwrap();
//!     let mut word = [0u8; 4];
//!     if !dev.mmio_read(0xfeb0_0000, &mut word) {
//!         word = [0xff; 4]; // no device there: the VMM's to answer
//!     }
//!     // 5. A guest write to port 0xf4 asks to stop the VM.
//!     if let Some(_status) = dev.take_exit_request() { break; }
//!     now_ns += 1_000_000;
//! }
//! let snapshot = dev.save(); // serde; restore with Devices::from_state / restore
//! # let _ = snapshot;
//! ```
//!
//! # Adding a device
//! One new file and one registration line:
//!
//! 1. Write `src/<name>.rs` with the device: a type implementing [`Device`] (its
//!    [`Device::id`], [`Device::port_regions`] / [`Device::mmio_regions`], the handlers it
//!    needs; interrupts through [`DeviceContext::set_irq`] / [`DeviceContext::pulse_irq`];
//!    [`Device::advance_to`] and [`Device::next_deadline_ns`] if it has timers;
//!    [`Device::hooks`] to leave the run-loop calls it does not need) and
//!    [`Persist`] (a serde `State`, `STATE_VERSION = 1`, `save`, `restore`), with unit tests
//!    beside it. Document its ports and IRQ in the [`registry`] port table.
//! 2. Add one line `<name> => <name>::Type::new(...);` to the `builtin_devices!` list at the
//!    bottom of this file. The line declares the module and registers the device.
//!
//! Nothing else changes: the registry routes its ranges, clocks it, wires its interrupt
//! lines, and saves its state under its id; [`DevicesState`] has no per-device fields, and
//! the VMM's state-format markers are derived ([`Devices::state_format`] names every id and
//! state version). A device the VMM adds at run time is one call to [`Devices::register`].
//! When a device's state changes later, bump its `STATE_VERSION`: older saved states are
//! then refused with a message naming the device.

pub mod bus;
pub mod device;
pub mod intc;
pub mod ioapic;
pub mod irq;
pub mod lapic;
pub mod pic;
pub mod registry;

pub use acpi_pm::{AcpiPm, ACPI_PM1A_CNT, ACPI_PM1A_EVT, ACPI_SLP_TYP_S5};
pub use bench::{BenchError, BenchMark, BenchMarker};
pub use bus::{AccessMode, BusError, BusStats, IoBus, MmioBus, MmioRange, PortIoDevice, PortRange};
pub use debug::{DebugExit, DebugExitState};
pub use device::{
    Access, AsAny, Device, DeviceContext, Hooks, IrqSink, MmioRegion, Persist, PersistDyn,
    PortRegion, SavedDevice, StateError,
};
pub use i8042::{I8042Error, I8042State, I8042};
pub use intc::Intc;
pub use ioapic::{IoApic, IoApicState};
pub use irq::IrqLine;
pub use lapic::{LapicState, LocalApic};
pub use pci::{PciConfig, PciConfigState};
pub use pic::{Pic, PicError, PicState};
pub use pit::{Pit, PitError, PitState, PIT_FREQUENCY_HZ};
pub use post::{PostCode, PostCodeState};
pub use registry::{
    state_format, Devices, DevicesConfig, DevicesError, DevicesState, DEVICES_STATE_VERSION,
    IOAPIC_ADDR, LAPIC_ADDR,
};
pub use rtc::{Rtc, RtcError, RtcState, RtcTime};
pub use serial::{Serial, SerialDeviceState, SerialError, SharedBuffer};

/// The former name of [`BenchError`].
pub type DebugError = BenchError;

/// Declares each built-in device's module and registers the device: one line per device,
/// `module => constructor;`, in registration order. `$cfg` is the [`DevicesConfig`] the
/// constructors may take host-side resources and settings from.
macro_rules! builtin_devices {
    ($cfg:ident; $($module:ident => $device:expr;)*) => {
        $(pub mod $module;)*

        /// The built-in devices of [`Devices::with_config`], in registration order.
        pub(crate) fn builtin_devices($cfg: DevicesConfig) -> Vec<Box<dyn Device>> {
            vec![$(Box::new($device)),*]
        }
    };
}

builtin_devices! { config;
    pit => pit::Pit::new();
    serial => serial::Serial::com1(config.serial_out);
    debug => debug::DebugExit::new();
    bench => bench::BenchMarker::new();
    rtc => rtc::Rtc::new(config.rtc_start);
    i8042 => i8042::I8042::new();
    post => post::PostCode::new();
    pci => pci::PciConfig::new();
    acpi_pm => acpi_pm::AcpiPm::new();
}
