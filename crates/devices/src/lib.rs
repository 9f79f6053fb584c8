//! Legacy PC devices for esvm guests, on a virtual clock and fully snapshot-able.
//!
//! esvm's default backend is a deterministic software vCPU whose virtual time is derived from
//! its retired-instruction count, so nothing here reads the host clock (except the host
//! timestamp of benchmark marks, which is diagnostics only). Every device's guest-visible
//! state is a serde type and restores exactly: a device restored from a snapshot behaves from
//! then on exactly like the device that was saved.
//!
//! The pieces:
//! - [`IoBus`]: port-I/O dispatch (1/2/4-byte accesses, all-ones for unclaimed reads).
//! - [`Serial`]: COM1 16550A on vm-superio, interrupts through an [`IrqLine`].
//! - [`Pit`]: 8254 timer on virtual nanoseconds, with [`Pit::next_deadline_ns`].
//! - [`Pic`]: the cascaded 8259A pair with INTA ([`Pic::acknowledge`]).
//! - [`DebugExit`] (port 0xf4) and [`BenchMarker`] (port 0xf5).
//! - [`Devices`]: all of the above wired together (PIT to IRQ 0, COM1 to IRQ 4), with
//!   [`Devices::save`] / [`Devices::restore`].
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
//!     // 3. Run the vCPU no further than the next timer deadline.
//!     let _budget_ns = dev.next_deadline_ns().map(|d| d - now_ns);
//!     // 4. On a port exit: advance_to(exit time) then io_read / io_write.
//!     dev.advance_to(now_ns + 10);
//!     dev.io_write(0x3f8, b"x").unwrap();
//!     // 5. A guest write to port 0xf4 asks to stop the VM.
//!     if let Some(_status) = dev.take_exit_request() { break; }
//!     now_ns += 1_000_000;
//! }
//! let snapshot = dev.save(); // serde; restore with Devices::from_state / restore
//! # let _ = snapshot;
//! ```

pub mod bus;
pub mod debug;
pub mod irq;
pub mod legacy;
pub mod pic;
pub mod pit;
pub mod serial;

pub use bus::{AccessMode, BusError, BusStats, IoBus, PortIoDevice, PortRange};
pub use debug::{BenchMark, BenchMarker, DebugError, DebugExit, DebugExitState};
pub use irq::IrqLine;
pub use legacy::{Devices, DevicesError, DevicesState, DEVICES_STATE_VERSION};
pub use pic::{Pic, PicError, PicState};
pub use pit::{Pit, PitError, PitState, PIT_FREQUENCY_HZ};
pub use serial::{Serial, SerialDeviceState, SerialError, SharedBuffer};
