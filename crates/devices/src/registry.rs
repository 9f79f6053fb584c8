//! [`Devices`]: the device registry of an esvm guest — every device on one port-I/O bus and
//! one MMIO bus, on one virtual clock, wired to the interrupt controller, saved by id.
//!
//! | ports         | id             | device                      | interrupt |
//! |---------------|----------------|-----------------------------|-----------|
//! | 0x20-0x21     | `pic`          | master 8259A PIC            |           |
//! | 0x40-0x43     | `pit`          | 8254 PIT                    | IRQ 0     |
//! | 0x60, 0x64    | `i8042`        | i8042 keyboard controller   | IRQ 1     |
//! | 0x61          | `pit`          | PIT gate 2 / OUT2 / refresh |           |
//! | 0x70-0x71     | `rtc`          | MC146818 RTC + CMOS RAM     | IRQ 8     |
//! | 0x80          | `post`         | POST-code / delay port      |           |
//! | 0xa0-0xa1     | `pic`          | slave 8259A PIC (on IR2)    |           |
//! | 0xf4          | `debug-exit`   | debug exit (any width)      |           |
//! | 0xf5          | `bench-marker` | benchmark marker            |           |
//! | 0x3f8-0x3ff   | `com1`         | COM1 16550A UART            | IRQ 4     |
//! | 0x600-0x605   | `acpi-pm`      | ACPI PM1a event and control |           |
//! | 0xcf8-0xcff   | `pci-conf1`    | PCI config #1, no devices   |           |
//!
//! MMIO: the I/O APIC at [`IOAPIC_ADDR`] (`ioapic`) and one local APIC per vCPU at
//! [`LAPIC_ADDR`] (`lapic0`, `lapic1`, ...: each vCPU sees its own there; its x2APIC MSRs
//! through [`Devices::apic_msr_read`] / [`Devices::apic_msr_write`]). The per-vCPU calls
//! (the APIC page, the APIC MSRs, interrupt delivery) act on the vCPU chosen with
//! [`Devices::select_vcpu`] (vCPU 0 until then); the `*_of` calls name one. Every interrupt line goes to the 8259 (IRQ n) and the I/O
//! APIC (pin n; IRQ 0 on pin 2), see [`crate::intc`].
//!
//! Every other port is unclaimed (reads all-ones, writes dropped and counted), and so is
//! every MMIO address no device claims (the VMM answers those itself). More devices join
//! with [`Devices::register`] (saved with the others) or [`Devices::register_device`]
//! (host-side port handlers the VMM saves itself).
//!
//! # Saved state
//! [`DevicesState`] keeps each device's state by its id ([`Device::id`]) together with the
//! device's own state version ([`Persist::STATE_VERSION`](crate::Persist)); the interrupt
//! controllers are saved as `pic`, `ioapic` and `lapic0`, `lapic1`, ... (one per vCPU). Adding a device adds an entry, never
//! a field. A restore refuses, with a message naming the device, a state that lacks one of
//! this registry's devices (except those added since older esvm versions saved states, which
//! restore in their reset state: `ioapic`, the local APICs, `acpi-pm`), holds a device it does not
//! have, or holds another version of a device's state;
//! the map as a whole is versioned by [`DEVICES_STATE_VERSION`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bench::{BenchMark, BenchMarker};
use crate::bus::{
    AccessMode, BusError, BusStats, IoBus, MmioBus, MmioRange, PortIoDevice, PortRange,
};
use crate::device::{
    Access, Device, DeviceContext, LevelRecorder, PersistDyn, SavedDevice, StateError,
};
use crate::intc::Intc;
use crate::ioapic::IoApic;
use crate::lapic::{LocalApic, TSC_DEADLINE_MSR};
use crate::pic::{Pic, PicError, PIC_ID, PIC_MASTER_CMD, PIC_SLAVE_CMD};
use crate::pit::{Pit, PIT_ID};
use crate::rtc::RtcTime;
use crate::serial::{Serial, COM1_ID};

/// Version of the [`DevicesState`] container: the map of per-device states. Each device
/// versions its own state; this changes only when the container does. The VMM's machine
/// state, snapshot and migration format versions are derived from it.
pub const DEVICES_STATE_VERSION: u32 = 2;

/// Guest-physical address of the local APIC page (`esvm_abi::layout::LAPIC_ADDR`).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Guest-physical address of the I/O APIC page (`esvm_abi::layout::IOAPIC_ADDR`).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Saved-state id of the I/O APIC.
pub const IOAPIC_ID: &str = "ioapic";
/// Saved-state id of the boot vCPU's local APIC.
pub const LAPIC_ID: &str = "lapic0";

/// Saved-state id of vCPU `cpu`'s local APIC.
pub fn lapic_id(cpu: usize) -> String {
    format!("lapic{cpu}")
}

/// Whether a state may lack device `id` (added since older esvm versions saved states).
fn added_later(id: &str) -> bool {
    ADDED_LATER.contains(&id)
        || id
            .strip_prefix("lapic")
            .is_some_and(|n| n.parse::<usize>().is_ok())
}
/// State version of the I/O APIC and local APIC states.
const APIC_STATE_VERSION: u32 = 1;
/// Saved states of older esvm versions lack these (they had no such device); such a state
/// restores with these devices in their reset state.
const ADDED_LATER: &[&str] = &[IOAPIC_ID, LAPIC_ID, crate::acpi_pm::ACPI_PM_ID];

fn apic_saved<T: Serialize>(state: &T) -> SavedDevice {
    SavedDevice {
        version: APIC_STATE_VERSION,
        state: serde_json::to_value(state).unwrap_or_else(|e| {
            serde_json::Value::String(format!("state not representable as JSON: {e}"))
        }),
    }
}

fn apic_state<T: serde::de::DeserializeOwned>(
    id: &str,
    saved: &SavedDevice,
) -> Result<T, DevicesError> {
    serde_json::from_value(saved.state.clone()).map_err(|e| DevicesError::DeviceState {
        id: id.to_string(),
        source: StateError::Decode(e),
    })
}

/// The offset of an access of `len` bytes at `addr` in the 4 KiB page at `base`, if it
/// lies inside.
fn page_offset(addr: u64, base: u64, len: usize) -> Option<u64> {
    let off = addr.checked_sub(base)?;
    (off.checked_add(len as u64)? <= 0x1000).then_some(off)
}

/// Errors of the device registry.
#[derive(Debug, Error)]
pub enum DevicesError {
    /// A bad access or a port/MMIO conflict on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A saved state from another container format version.
    #[error("devices state version {found} is not supported by this build (it reads version {expected}); restore it with the esvm version that saved it")]
    UnsupportedVersion {
        /// Version in the state.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The saved state has no entry for one of this registry's devices.
    #[error("the saved device state has no state for device `{id}`: it was saved by an esvm without that device; restore it with the esvm version that saved it")]
    MissingDevice {
        /// The device without a state.
        id: String,
    },
    /// The saved state holds a device this registry does not have.
    #[error("the saved device state holds device `{id}`, which this esvm does not have; restore it with the esvm version that saved it")]
    UnknownDevice {
        /// The unknown device.
        id: String,
    },
    /// A device's saved state is of another version.
    #[error("device `{id}`: saved state version {found} is not supported (this esvm reads version {expected}); restore it with the esvm version that saved it")]
    DeviceVersion {
        /// The device.
        id: String,
        /// Version in the state.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// A device refused its saved state.
    #[error("device `{id}`: {source}")]
    DeviceState {
        /// The device.
        id: String,
        /// Why.
        #[source]
        source: StateError,
    },
    /// Two devices with one id.
    #[error("a device with id `{0}` is already registered; give each device a unique id")]
    DuplicateId(String),
    /// An invalid IRQ number for the PIC.
    #[error("PIC: {0}")]
    Pic(#[from] PicError),
    /// Removing a device that is part of the saved state.
    #[error("port {0:#06x} belongs to a registered device, which is part of the VM's saved state and cannot be removed")]
    BuiltIn(u16),
}

/// Saved state of every registered device (serde, versioned). The serial output writer, the
/// benchmark marks and the bus diagnostics are host-side and not part of it; devices added
/// with [`Devices::register_device`] are the VMM's to save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// Container format version, [`DEVICES_STATE_VERSION`].
    pub version: u32,
    /// Virtual time the devices were last advanced to, in ns.
    pub now_ns: u64,
    /// Each device's state by id (the PIC pair as `pic`).
    pub devices: BTreeMap<String, SavedDevice>,
}

impl DevicesState {
    /// The decoded state of device `id`, whose type is `D`.
    pub fn get<D: crate::Persist>(&self, id: &str) -> Result<D::State, DevicesError> {
        let saved = self
            .devices
            .get(id)
            .ok_or_else(|| DevicesError::MissingDevice { id: id.to_string() })?;
        if saved.version != D::STATE_VERSION {
            return Err(DevicesError::DeviceVersion {
                id: id.to_string(),
                found: saved.version,
                expected: D::STATE_VERSION,
            });
        }
        serde_json::from_value(saved.state.clone()).map_err(|e| DevicesError::DeviceState {
            id: id.to_string(),
            source: StateError::Decode(e),
        })
    }

    /// Replace (or add) the state of device `id`, whose type is `D`.
    pub fn set<D: crate::Persist>(&mut self, id: &str, state: &D::State) {
        let state = serde_json::to_value(state).unwrap_or_else(|e| {
            serde_json::Value::String(format!("state not representable as JSON: {e}"))
        });
        self.devices.insert(
            id.to_string(),
            SavedDevice {
                version: D::STATE_VERSION,
                state,
            },
        );
    }
}

/// What the registry's constructor needs from the VMM.
pub struct DevicesConfig {
    /// Where COM1's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// What the RTC shows at virtual time 0 (default 2026-01-01T00:00:00 UTC).
    pub rtc_start: RtcTime,
}

impl DevicesConfig {
    /// The default platform, COM1 writing to `serial_out`.
    pub fn new(serial_out: Box<dyn Write + Send>) -> Self {
        Self {
            serial_out,
            rtc_start: RtcTime::default(),
        }
    }
}

impl fmt::Debug for DevicesConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicesConfig")
            .field("rtc_start", &self.rtc_start)
            .finish_non_exhaustive()
    }
}

/// What a port range routes to.
enum Slot {
    /// The interrupt controller's own ports.
    Pic,
    /// A registered device, by index.
    Device(usize),
    /// A host-side handler from [`Devices::register_device`].
    Extra(Box<dyn PortIoDevice>),
}

/// The devices of one VM. See the crate documentation for how the VMM drives it and how to
/// add a device.
pub struct Devices {
    bus: IoBus<Slot>,
    mmio: MmioBus<usize>,
    devices: Vec<Box<dyn Device>>,
    /// Indices of the devices with [`Hooks::clock`](crate::Hooks).
    clocked: Vec<usize>,
    /// Indices of the devices with [`Hooks::requests`](crate::Hooks).
    requesters: Vec<usize>,
    /// Per device: whether it has [`Hooks::requests`](crate::Hooks).
    is_requester: Vec<bool>,
    /// A requester was called since the last [`Devices::take_exit_request`] found nothing:
    /// requests only arise in calls into a device, so there is nothing to poll otherwise.
    poll_exit: bool,
    /// The same for [`Devices::take_reset_request`].
    poll_reset: bool,
    /// The interrupt controllers (8259 pair, I/O APIC, local APIC): every device's
    /// interrupt lines end here.
    pic: Intc,
    /// Per vCPU: the CR8 last seen by [`Devices::sync_cr8`].
    cr8: Vec<u32>,
    /// Per vCPU: IA32_APIC_BASE, from [`Devices::set_apic_base`].
    apic_base: Vec<u64>,
    /// The vCPU the per-vCPU calls act on ([`Devices::select_vcpu`]).
    cpu: usize,
    now_ns: u64,
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Devices")
            .field("now_ns", &self.now_ns)
            .field("bus", &self.bus)
            .field("mmio", &self.mmio)
            .field("devices", &self.ids().collect::<Vec<_>>())
            .field("pic", &self.pic)
            .finish()
    }
}

/// The platform's port ranges before any device registers: the interrupt controller's.
fn controller_bus() -> Result<IoBus<Slot>, BusError> {
    let mut bus = IoBus::new();
    bus.insert(
        PortRange::new(PIC_MASTER_CMD, 2)?,
        AccessMode::Bytewise,
        Slot::Pic,
    )?;
    bus.insert(
        PortRange::new(PIC_SLAVE_CMD, 2)?,
        AccessMode::Bytewise,
        Slot::Pic,
    )?;
    Ok(bus)
}

/// The id and version of every state in a registry, e.g. `devices/2 com1/1 pic/1 ...`: two
/// builds whose lists differ cannot restore each other's device state.
fn format_of<'a>(entries: impl Iterator<Item = (&'a str, u32)>) -> String {
    let mut all: Vec<(&str, u32)> = entries.collect();
    all.sort_unstable();
    let mut s = format!("devices/{DEVICES_STATE_VERSION}");
    for (id, v) in all {
        s.push_str(&format!(" {id}/{v}"));
    }
    s
}

/// The device state format of this build's default platform ([`Devices::state_format`]).
pub fn state_format() -> String {
    Devices::new(Box::new(std::io::sink())).state_format()
}

impl Devices {
    /// All built-in devices in their reset state at virtual time 0, COM1 writing to
    /// `serial_out`.
    pub fn new(serial_out: Box<dyn Write + Send>) -> Self {
        Self::with_config(DevicesConfig::new(serial_out))
    }

    /// All built-in devices (the list in the crate root) in their reset state at virtual
    /// time 0.
    pub fn with_config(config: DevicesConfig) -> Self {
        let mut d = Self {
            // The controller's ranges are constants and disjoint; the unit tests build them.
            bus: controller_bus().expect("the PIC's port ranges are valid and disjoint"),
            mmio: MmioBus::new(),
            devices: Vec::new(),
            clocked: Vec::new(),
            requesters: Vec::new(),
            is_requester: Vec::new(),
            poll_exit: false,
            poll_reset: false,
            pic: Intc::new(),
            cr8: vec![0],
            // The power-on value for the boot vCPU until the VMM says otherwise: the local
            // APIC at 0xfee00000, enabled, BSP.
            apic_base: vec![LAPIC_ADDR | (1 << 11) | (1 << 8)],
            cpu: 0,
            now_ns: 0,
        };
        for device in crate::builtin_devices(config) {
            // Constant ranges and ids; the unit tests register every built-in device.
            d.register(device)
                .expect("the built-in devices have valid, disjoint ranges and unique ids");
        }
        d
    }

    /// Devices rebuilt from `state`, COM1 writing to `serial_out`.
    pub fn from_state(
        state: &DevicesState,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, DevicesError> {
        let mut d = Self::new(serial_out);
        // One vCPU per saved local APIC.
        let vcpus = state
            .devices
            .keys()
            .filter_map(|k| k.strip_prefix("lapic")?.parse::<usize>().ok())
            .max()
            .map_or(1, |m| m + 1);
        d.set_vcpus(vcpus);
        d.restore(state)?;
        Ok(d)
    }

    /// Add `device`: its port and MMIO ranges join the buses, its state joins the saved
    /// state under its id, and the levels it drives at the current time become its
    /// interrupt lines' levels without latching a request. On error nothing is changed.
    pub fn register(&mut self, mut device: Box<dyn Device>) -> Result<(), DevicesError> {
        let id = device.id().to_string();
        if id == PIC_ID || self.devices.iter().any(|d| d.id() == id) {
            return Err(DevicesError::DuplicateId(id));
        }
        let index = self.devices.len();
        let mut ports = Vec::new();
        let mut mmio = Vec::new();
        let result = (|| {
            for r in device.port_regions() {
                let range = PortRange::new(r.base, r.len)?;
                self.bus.insert(range, r.mode, Slot::Device(index))?;
                ports.push(range.base());
            }
            for r in device.mmio_regions() {
                let range = MmioRange::new(r.base, r.len)?;
                self.mmio.insert(range, index)?;
                mmio.push(range.base());
            }
            Ok::<(), BusError>(())
        })();
        if let Err(e) = result {
            for base in ports {
                self.bus.remove(base);
            }
            for base in mmio {
                self.mmio.remove(base);
            }
            return Err(e.into());
        }
        let mut levels = LevelRecorder::default();
        device.advance_to(
            self.now_ns,
            &mut DeviceContext::new(self.now_ns, &mut levels),
        );
        for (irq, level) in levels.levels {
            self.pic.preset_line(irq, level);
        }
        let hooks = device.hooks();
        if hooks.clock {
            self.clocked.push(index);
        }
        if hooks.requests {
            self.requesters.push(index);
            self.poll_exit = true;
            self.poll_reset = true;
        }
        self.is_requester.push(hooks.requests);
        self.devices.push(device);
        Ok(())
    }

    /// The ids of the registered devices, in registration order.
    pub fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.devices.iter().map(|d| d.id())
    }

    /// The registered device `id`, if it is a `D`.
    pub fn device<D: Device>(&self, id: &str) -> Option<&D> {
        let dev = self.devices.iter().find(|d| d.id() == id)?;
        // `as_any` of the device itself, not of its box.
        dev.as_ref().as_any().downcast_ref::<D>()
    }

    /// Mutable form of [`Devices::device`].
    pub fn device_mut<D: Device>(&mut self, id: &str) -> Option<&mut D> {
        let dev = self.devices.iter_mut().find(|d| d.id() == id)?;
        dev.as_mut().as_any_mut().downcast_mut::<D>()
    }

    /// The id and state version of every saved device, e.g. `devices/2 com1/1 pic/1 ...`:
    /// two registries whose formats differ cannot restore each other's state.
    pub fn state_format(&self) -> String {
        let lapics: Vec<String> = (0..self.pic.vcpus()).map(lapic_id).collect();
        format_of(
            [
                (PIC_ID, self.pic.pic.state_version()),
                (IOAPIC_ID, APIC_STATE_VERSION),
            ]
            .into_iter()
            .chain(lapics.iter().map(|id| (id.as_str(), APIC_STATE_VERSION)))
            .chain(self.devices.iter().map(|d| (d.id(), d.state_version()))),
        )
    }

    /// Snapshot of every registered device and the interrupt controller.
    pub fn save(&self) -> DevicesState {
        let mut devices = BTreeMap::new();
        devices.insert(PIC_ID.to_string(), self.pic.pic.save_state());
        devices.insert(IOAPIC_ID.to_string(), apic_saved(&self.pic.ioapic.state()));
        for (i, lapic) in self.pic.lapics().enumerate() {
            devices.insert(lapic_id(i), apic_saved(&lapic.state()));
        }
        for d in &self.devices {
            devices.insert(d.id().to_string(), d.save_state());
        }
        DevicesState {
            version: DEVICES_STATE_VERSION,
            now_ns: self.now_ns,
            devices,
        }
    }

    /// Put every registered device and the interrupt controller in the saved `state`,
    /// keeping the current serial output writer, benchmark marks and extra devices. On
    /// error nothing is changed.
    pub fn restore(&mut self, state: &DevicesState) -> Result<(), DevicesError> {
        if state.version != DEVICES_STATE_VERSION {
            return Err(DevicesError::UnsupportedVersion {
                found: state.version,
                expected: DEVICES_STATE_VERSION,
            });
        }
        // Check the whole map before touching any device.
        let lapic_ids: Vec<String> = (0..self.pic.vcpus()).map(lapic_id).collect();
        let mut mine: Vec<(&str, u32)> = vec![
            (PIC_ID, self.pic.pic.state_version()),
            (IOAPIC_ID, APIC_STATE_VERSION),
        ];
        mine.extend(lapic_ids.iter().map(|id| (id.as_str(), APIC_STATE_VERSION)));
        mine.extend(self.devices.iter().map(|d| (d.id(), d.state_version())));
        for (id, expected) in &mine {
            let Some(saved) = state.devices.get(*id) else {
                // Devices added since an older esvm saved the state keep their reset
                // state: that esvm's guest had none of them.
                if added_later(id) {
                    continue;
                }
                return Err(DevicesError::MissingDevice { id: id.to_string() });
            };
            if saved.version != *expected {
                return Err(DevicesError::DeviceVersion {
                    id: id.to_string(),
                    found: saved.version,
                    expected: *expected,
                });
            }
        }
        if let Some(id) = state
            .devices
            .keys()
            .find(|k| !mine.iter().any(|(id, _)| id == k))
        {
            return Err(DevicesError::UnknownDevice { id: id.clone() });
        }
        // The APICs first (they cannot fail halfway: both are decoded before either is set).
        let ioapic = match state.devices.get(IOAPIC_ID) {
            Some(saved) => Some(apic_state(IOAPIC_ID, saved)?),
            None => None,
        };
        let mut lapics = Vec::new();
        for id in &lapic_ids {
            lapics.push(match state.devices.get(id) {
                Some(saved) => Some(apic_state::<crate::LapicState>(id, saved)?),
                None => None,
            });
        }
        let mut new_ioapic = IoApic::new();
        if ioapic.is_none() {
            // A state from before the I/O APIC: its inputs are at the levels the devices
            // drive, which the restored 8259 pair records.
            if let Some(saved) = state.devices.get(PIC_ID) {
                if let Ok(pic) = serde_json::from_value::<crate::PicState>(saved.state.clone()) {
                    let levels = u16::from_le_bytes([pic.master.lines, pic.slave.lines]);
                    for irq in 0..16u8 {
                        if let Some(pin) = crate::intc::isa_gsi(irq) {
                            new_ioapic.preset_line(pin, levels & (1 << irq) != 0);
                        }
                    }
                }
            }
        }
        if let Some(s) = &ioapic {
            new_ioapic
                .restore(s)
                .map_err(|e| DevicesError::DeviceState {
                    id: IOAPIC_ID.into(),
                    source: StateError::Invalid(Box::new(e)),
                })?;
        }
        let mut new_lapics = Vec::new();
        for (i, saved) in lapics.iter().enumerate() {
            let mut new_lapic = LocalApic::new(i as u32);
            if let Some(s) = saved {
                new_lapic
                    .restore(s, state.now_ns)
                    .map_err(|e| DevicesError::DeviceState {
                        id: lapic_id(i),
                        source: StateError::Invalid(Box::new(e)),
                    })?;
            }
            new_lapics.push(new_lapic);
        }
        // Restore one by one (unit 0 is the PIC, unit i the i-th device); if one refuses,
        // put back the ones already restored.
        let backup = self.save();
        for i in 0..=self.devices.len() {
            if let Err(source) = self.restore_unit(i, &state.devices) {
                for j in 0..i {
                    // Their own state of a moment ago: it restores.
                    let _ = self.restore_unit(j, &backup.devices);
                }
                return Err(DevicesError::DeviceState {
                    id: self.unit_id(i).to_string(),
                    source,
                });
            }
        }
        self.pic.ioapic = new_ioapic;
        for (slot, lapic) in self.pic.lapics_mut().zip(new_lapics) {
            *slot = lapic;
        }
        self.now_ns = state.now_ns;
        // The restored devices may hold requests.
        self.poll_exit = true;
        self.poll_reset = true;
        Ok(())
    }

    fn unit_id(&self, unit: usize) -> &str {
        match unit.checked_sub(1) {
            None => PIC_ID,
            Some(i) => self.devices[i].id(),
        }
    }

    /// Restore unit `unit` (0: the PIC, i: device i - 1) from its entry in `states`, which
    /// the caller has checked exists.
    fn restore_unit(
        &mut self,
        unit: usize,
        states: &BTreeMap<String, SavedDevice>,
    ) -> Result<(), StateError> {
        let Some(saved) = states.get(self.unit_id(unit)) else {
            return Ok(());
        };
        match unit.checked_sub(1) {
            None => self.pic.pic.restore_state(saved),
            Some(i) => self.devices[i].restore_state(saved),
        }
    }

    /// Current virtual time in ns.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Move virtual time forward to `now_ns` (an earlier time is ignored), delivering timer
    /// edges to the PIC. Call it with the vCPU's virtual time before every port or MMIO
    /// access and before checking for interrupts.
    pub fn advance_to(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        let now = self.now_ns;
        let Self {
            devices,
            clocked,
            is_requester,
            poll_exit,
            poll_reset,
            pic,
            ..
        } = self;
        for &i in clocked.iter() {
            devices[i].advance_to(now, &mut DeviceContext::new(now, pic));
            if is_requester[i] {
                (*poll_exit, *poll_reset) = (true, true);
            }
        }
        for lapic in pic.lapics_mut() {
            lapic.advance_to(now);
        }
    }

    /// Virtual time (ns) of the next device event that can raise an interrupt, if one is
    /// scheduled: run the vCPU no further than this before calling [`Devices::advance_to`]
    /// again.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.clocked
            .iter()
            .filter_map(|&i| self.devices[i].next_deadline_ns())
            .chain(self.pic.lapics().filter_map(LocalApic::next_deadline_ns))
            .min()
    }

    /// Guest `IN` of `data.len()` (1, 2 or 4) bytes from `port`, at the current virtual time.
    pub fn io_read(&mut self, port: u16, data: &mut [u8]) -> Result<(), DevicesError> {
        let now = self.now_ns;
        let Self {
            bus,
            devices,
            is_requester,
            poll_exit,
            poll_reset,
            pic,
            ..
        } = self;
        bus.read_with(port, data, |slot, base, offset, bytes| match slot {
            Slot::Pic => {
                bytes.fill(pic.pic.read_port(base + offset).unwrap_or(0xff));
                true
            }
            Slot::Device(i) => {
                if is_requester[*i] {
                    (*poll_exit, *poll_reset) = (true, true);
                }
                let mut cx = DeviceContext::new(now, pic);
                devices[*i].io_read(base, offset, bytes, &mut cx) == Access::Handled
            }
            Slot::Extra(dev) => {
                dev.read(offset, bytes);
                true
            }
        })?;
        Ok(())
    }

    /// Guest `OUT` of `data` (1, 2 or 4 bytes, little-endian) to `port`, at the current
    /// virtual time.
    pub fn io_write(&mut self, port: u16, data: &[u8]) -> Result<(), DevicesError> {
        let now = self.now_ns;
        let Self {
            bus,
            devices,
            is_requester,
            poll_exit,
            poll_reset,
            pic,
            ..
        } = self;
        bus.write_with(port, data, |slot, base, offset, bytes| match slot {
            Slot::Pic => {
                if let Some(v) = bytes.first() {
                    let _ = pic.pic.write_port(base + offset, *v);
                }
                true
            }
            Slot::Device(i) => {
                if is_requester[*i] {
                    (*poll_exit, *poll_reset) = (true, true);
                }
                let mut cx = DeviceContext::new(now, pic);
                devices[*i].io_write(base, offset, bytes, &mut cx) == Access::Handled
            }
            Slot::Extra(dev) => {
                dev.write(offset, bytes);
                true
            }
        })?;
        Ok(())
    }

    /// Guest MMIO read of `data.len()` bytes at guest-physical `addr`, at the current virtual
    /// time. Returns whether a device answered it; if not, `data` is untouched and the
    /// access is the VMM's to answer.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(off) = page_offset(addr, LAPIC_ADDR, data.len()) {
            self.pic.lapic(self.cpu).mmio_read(off, data);
            return true;
        }
        if let Some(off) = page_offset(addr, IOAPIC_ADDR, data.len()) {
            self.pic.ioapic.mmio_read(off, data);
            return true;
        }
        let now = self.now_ns;
        let Self {
            mmio,
            devices,
            is_requester,
            poll_exit,
            poll_reset,
            pic,
            ..
        } = self;
        let Some((range, i)) = mmio.target_mut(addr, data.len()) else {
            return false;
        };
        if is_requester[*i] {
            (*poll_exit, *poll_reset) = (true, true);
        }
        let mut cx = DeviceContext::new(now, pic);
        devices[*i].mmio_read(range.base(), addr - range.base(), data, &mut cx) == Access::Handled
    }

    /// Guest MMIO write of `data` (little-endian) at guest-physical `addr`, at the current
    /// virtual time. Returns whether a device took it; if not, it is the VMM's.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        if let Some(off) = page_offset(addr, LAPIC_ADDR, data.len()) {
            let mut events = Vec::new();
            self.pic
                .lapic_mut(self.cpu)
                .mmio_write(off, data, &mut events);
            self.pic.lapic_events(self.cpu, events);
            return true;
        }
        if let Some(off) = page_offset(addr, IOAPIC_ADDR, data.len()) {
            let mut out = Vec::new();
            self.pic.ioapic.mmio_write(off, data, &mut out);
            self.pic.route_messages(out);
            return true;
        }
        let now = self.now_ns;
        let Self {
            mmio,
            devices,
            is_requester,
            poll_exit,
            poll_reset,
            pic,
            ..
        } = self;
        let Some((range, i)) = mmio.target_mut(addr, data.len()) else {
            return false;
        };
        if is_requester[*i] {
            (*poll_exit, *poll_reset) = (true, true);
        }
        let mut cx = DeviceContext::new(now, pic);
        devices[*i].mmio_write(range.base(), addr - range.base(), data, &mut cx) == Access::Handled
    }

    /// The number of vCPUs, each with its local APIC (1 until [`Devices::set_vcpus`]).
    pub fn vcpus(&self) -> usize {
        self.pic.vcpus()
    }

    /// Give the platform `vcpus` vCPUs (at least one): the new ones get their local APIC in
    /// its reset state (APIC ID = vCPU index) and the power-on IA32_APIC_BASE of an AP.
    pub fn set_vcpus(&mut self, vcpus: usize) {
        let n = vcpus.max(1);
        self.pic.set_vcpus(n);
        self.cr8.resize(n, 0);
        self.apic_base.resize(n, LAPIC_ADDR | (1 << 11));
        self.cpu = self.cpu.min(n - 1);
    }

    /// Make vCPU `cpu` the one the per-vCPU calls act on: its APIC page, APIC MSRs,
    /// interrupts. Call it before running that vCPU. An index beyond the vCPUs is ignored.
    pub fn select_vcpu(&mut self, cpu: usize) {
        if cpu < self.pic.vcpus() {
            self.cpu = cpu;
        }
    }

    /// The vCPU the per-vCPU calls act on.
    pub fn selected_vcpu(&self) -> usize {
        self.cpu
    }

    /// Vector of the interrupt the selected vCPU would take now, if any. Hand it to the vCPU
    /// only when its interrupt window is open (RFLAGS.IF set, no interrupt shadow), via
    /// [`Devices::acknowledge_interrupt`].
    pub fn pending_interrupt(&self) -> Option<u8> {
        self.pic.pending_vector(self.cpu)
    }

    /// [`Devices::pending_interrupt`] of vCPU `cpu` (None for no such vCPU).
    pub fn pending_interrupt_of(&self, cpu: usize) -> Option<u8> {
        (cpu < self.pic.vcpus())
            .then(|| self.pic.pending_vector(cpu))
            .flatten()
    }

    /// Whether an interrupt request for the selected vCPU is held anywhere (its local APIC's
    /// IRR, or for the boot vCPU the 8259's output), deliverable now or not: the VMM then
    /// brings the task priority up to date.
    pub fn has_interrupt_request(&self) -> bool {
        self.pic.has_request(self.cpu)
    }

    /// [`Devices::has_interrupt_request`] of vCPU `cpu` (false for no such vCPU).
    pub fn has_interrupt_request_of(&self, cpu: usize) -> bool {
        cpu < self.pic.vcpus() && self.pic.has_request(cpu)
    }

    /// The selected vCPU's CR8 as the VMM knows it (tracked for a protected vCPU): a changed
    /// value is a MOV to CR8, which sets the local APIC's TPR bits 7:4.
    pub fn sync_cr8(&mut self, cr8: u64) {
        let cr8 = (cr8 & 0xf) as u32;
        if self.cr8[self.cpu] != cr8 {
            self.cr8[self.cpu] = cr8;
            self.pic.lapic_mut(self.cpu).set_tpr(cr8 << 4);
        }
    }

    /// IA32_APIC_BASE as the selected vCPU holds it: bit 11 enables the local APIC (while it
    /// is clear the 8259 reaches the boot vCPU directly), bit 10 selects x2APIC mode.
    pub fn set_apic_base(&mut self, apic_base: u64) {
        self.apic_base[self.cpu] = apic_base;
        let c = self.pic.cpu_mut(self.cpu);
        c.apic_hw_enabled = apic_base & (1 << 11) != 0;
        c.x2apic = apic_base & (1 << 10) != 0;
    }

    /// IA32_APIC_BASE of the selected vCPU as last given to [`Devices::set_apic_base`].
    pub fn apic_base(&self) -> u64 {
        self.apic_base[self.cpu]
    }

    fn x2apic(&self) -> bool {
        self.pic.cpu(self.cpu).x2apic
    }

    /// An NMI for the selected vCPU (from a local APIC or the I/O APIC), if one waits.
    pub fn take_nmi(&mut self) -> bool {
        self.pic.take_nmi(self.cpu)
    }

    /// Whether an NMI waits for vCPU `cpu`.
    pub fn nmi_pending_of(&self, cpu: usize) -> bool {
        cpu < self.pic.vcpus() && self.pic.nmi_pending(cpu)
    }

    /// Whether INIT or SIPI signals wait for vCPU `cpu`.
    pub fn has_ap_signals_of(&self, cpu: usize) -> bool {
        cpu < self.pic.vcpus() && self.pic.has_ap_signals(cpu)
    }

    /// Take the INIT and SIPI signals sent to vCPU `cpu`, oldest first.
    pub fn take_ap_signals_of(&mut self, cpu: usize) -> Vec<crate::intc::ApSignal> {
        if cpu < self.pic.vcpus() {
            self.pic.take_ap_signals(cpu)
        } else {
            Vec::new()
        }
    }

    /// RDMSR of an x2APIC register or IA32_TSC_DEADLINE of the selected vCPU. None: not an
    /// APIC MSR, or not readable now (the guest gets #GP).
    pub fn apic_msr_read(&self, msr: u32) -> Option<u64> {
        let lapic = self.pic.lapic(self.cpu);
        if msr == TSC_DEADLINE_MSR {
            return Some(lapic.tsc_deadline());
        }
        let reg = LocalApic::x2apic_reg(msr).filter(|_| self.x2apic())?;
        lapic.read_reg(reg, true)
    }

    /// Whether a WRMSR of `msr` is taken (true) or raises #GP: IA32_TSC_DEADLINE always,
    /// x2APIC registers in x2APIC mode if they exist and are writable.
    pub fn apic_msr_writable(&self, msr: u32) -> bool {
        msr == TSC_DEADLINE_MSR
            || LocalApic::x2apic_reg(msr)
                .filter(|_| self.x2apic())
                .is_some_and(LocalApic::x2apic_writable)
    }

    /// WRMSR of an x2APIC register or IA32_TSC_DEADLINE of the selected vCPU (`tsc`: its
    /// guest TSC now). False: the guest gets #GP.
    pub fn apic_msr_write(&mut self, msr: u32, value: u64, tsc: u64) -> bool {
        let cpu = self.cpu;
        if msr == TSC_DEADLINE_MSR {
            self.pic.lapic_mut(cpu).write_tsc_deadline(value, tsc);
            return true;
        }
        let Some(reg) = LocalApic::x2apic_reg(msr).filter(|_| self.x2apic()) else {
            return false;
        };
        let mut events = Vec::new();
        let ok = self
            .pic
            .lapic_mut(cpu)
            .write_reg(reg, value, true, &mut events);
        self.pic.lapic_events(cpu, events);
        ok
    }

    /// The interrupt controllers (8259 pair, I/O APIC, local APICs).
    pub fn intc(&self) -> &Intc {
        &self.pic
    }

    /// The interrupt-acknowledge cycle of the selected vCPU: returns the vector to inject
    /// (possibly a spurious IRQ 7 / 15 vector, which the guest must see as well) and marks
    /// it in service.
    pub fn acknowledge_interrupt(&mut self) -> u8 {
        self.pic.acknowledge(self.cpu)
    }

    /// Drive PIC input `irq` (0-15) to `level`, for devices outside the registry. Lines of
    /// registered devices are theirs (see the port table).
    pub fn set_irq(&mut self, irq: u8, level: bool) -> Result<(), DevicesError> {
        if irq > 15 {
            return Err(PicError::NoSuchIrq(irq).into());
        }
        crate::IrqSink::set_level(&mut self.pic, irq, level);
        Ok(())
    }

    /// An edge on PIC input `irq` (0-15), for devices outside the registry.
    pub fn pulse_irq(&mut self, irq: u8) -> Result<(), DevicesError> {
        self.set_irq(irq, false)?;
        self.set_irq(irq, true)?;
        self.set_irq(irq, false)
    }

    /// Exit status the guest requested (through port 0xf4), if any (clears the request).
    pub fn take_exit_request(&mut self) -> Option<u8> {
        if !self.poll_exit {
            return None;
        }
        let Self {
            devices,
            requesters,
            ..
        } = self;
        let request = requesters
            .iter()
            .find_map(|&i| devices[i].take_exit_request());
        // Another device may hold one too: look again next time until none is found.
        self.poll_exit = request.is_some();
        request
    }

    /// Whether the guest asked for the ACPI soft power-off (S5 through PM1a control) since
    /// the last call (clears the request). Only a write to PM1a control can raise it.
    pub fn take_power_off_request(&mut self) -> bool {
        self.device_mut::<crate::AcpiPm>(crate::acpi_pm::ACPI_PM_ID)
            .is_some_and(crate::AcpiPm::take_power_off)
    }

    /// Whether the guest asked for a CPU reset (the i8042's reset line) since the last call
    /// (clears the requests).
    pub fn take_reset_request(&mut self) -> bool {
        if !std::mem::take(&mut self.poll_reset) {
            return false;
        }
        let Self {
            devices,
            requesters,
            ..
        } = self;
        requesters
            .iter()
            .fold(false, |any, &i| devices[i].take_reset_request() | any)
    }

    /// Queue host input for COM1; returns how many bytes fit in its FIFO.
    pub fn enqueue_serial_input(&mut self, bytes: &[u8]) -> usize {
        let now = self.now_ns;
        let Self { devices, pic, .. } = self;
        let Some(com1) = devices.iter_mut().find(|d| d.id() == COM1_ID) else {
            return 0;
        };
        let n = match com1.as_mut().as_any_mut().downcast_mut::<Serial>() {
            Some(serial) => serial.enqueue_input(bytes),
            None => return 0,
        };
        // Its interrupt request, if the input raised one.
        com1.advance_to(now, &mut DeviceContext::new(now, pic));
        n
    }

    /// Swap COM1's output writer, returning the previous one (or `out` itself if the
    /// registry has no COM1).
    pub fn replace_serial_output(&mut self, out: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        match self.device_mut::<Serial>(COM1_ID) {
            Some(serial) => serial.replace_writer(out),
            None => out,
        }
    }

    /// Benchmark marks recorded through port 0xf5.
    pub fn bench_marks(&self) -> &[BenchMark] {
        self.device::<BenchMarker>(crate::bench::BENCH_MARKER_ID)
            .map_or(&[], |b| b.marks())
    }

    /// Drain the benchmark marks.
    pub fn take_bench_marks(&mut self) -> Vec<BenchMark> {
        self.device_mut::<BenchMarker>(crate::bench::BENCH_MARKER_ID)
            .map_or_else(Vec::new, |b| b.take_marks())
    }

    /// Unclaimed-port diagnostics.
    pub fn bus_stats(&self) -> BusStats {
        self.bus.stats()
    }

    /// Add a host-side handler at `len` ports from `base`. Its state is not part of
    /// [`DevicesState`]: the VMM saves it. Devices that are part of the VM's state join with
    /// [`Devices::register`].
    pub fn register_device(
        &mut self,
        base: u16,
        len: u32,
        mode: AccessMode,
        device: Box<dyn PortIoDevice>,
    ) -> Result<(), DevicesError> {
        let range = PortRange::new(base, len)?;
        self.bus.insert(range, mode, Slot::Extra(device))?;
        Ok(())
    }

    /// Remove a handler added with [`Devices::register_device`] at `base`.
    pub fn remove_device(
        &mut self,
        base: u16,
    ) -> Result<Option<Box<dyn PortIoDevice>>, DevicesError> {
        match self.bus.target(base) {
            None => Ok(None),
            Some((Slot::Extra(_), 0)) => match self.bus.remove(base) {
                Some(Slot::Extra(dev)) => Ok(Some(dev)),
                _ => Ok(None),
            },
            Some((Slot::Extra(_), _)) => Ok(None),
            Some(_) => Err(DevicesError::BuiltIn(base)),
        }
    }

    /// COM1.
    pub fn serial(&self) -> Option<&Serial> {
        self.device(COM1_ID)
    }

    /// The PIT.
    pub fn pit(&self) -> Option<&Pit> {
        self.device(PIT_ID)
    }

    /// The PIC pair (the interrupt controller).
    pub fn pic(&self) -> &Pic {
        &self.pic.pic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::ticks_to_ns;
    use crate::serial::SharedBuffer;

    fn devices() -> (Devices, SharedBuffer) {
        let buf = SharedBuffer::new();
        (Devices::new(Box::new(buf.clone())), buf)
    }

    fn out(d: &mut Devices, port: u16, v: u8) {
        d.io_write(port, &[v]).unwrap();
    }

    fn inb(d: &mut Devices, port: u16) -> u8 {
        let mut b = [0u8];
        d.io_read(port, &mut b).unwrap();
        b[0]
    }

    fn init_pic(d: &mut Devices) {
        for (p, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            out(d, p, v);
        }
    }

    #[test]
    fn devices_can_move_to_a_vcpu_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Devices>();
        assert_send::<DevicesState>();
    }

    #[test]
    fn builtin_bus_layout() {
        let (d, _buf) = devices();
        let ranges: Vec<String> = d.bus.ranges().map(|(r, _)| r.to_string()).collect();
        assert_eq!(
            ranges,
            [
                "0x0020-0x0021",
                "0x0040-0x0043",
                "0x0060-0x0060",
                "0x0061-0x0061",
                "0x0064-0x0064",
                "0x0070-0x0071",
                "0x0080-0x0080",
                "0x00a0-0x00a1",
                "0x00f4-0x00f4",
                "0x00f5-0x00f5",
                "0x03f8-0x03ff",
                "0x0600-0x0603",
                "0x0604-0x0605",
                "0x0cf8-0x0cff"
            ]
        );
    }

    #[test]
    fn serial_interrupt_reaches_pic_as_irq4() {
        let (mut d, buf) = devices();
        init_pic(&mut d);
        out(&mut d, 0x3f9, 0x02); // IER: THRE
        assert_eq!(d.pending_interrupt(), Some(0x24));
        assert_eq!(d.acknowledge_interrupt(), 0x24);
        assert_eq!(inb(&mut d, 0x3fa) & 0x0f, 0x02, "IIR: THR empty");
        out(&mut d, 0x3f8, b'A');
        out(&mut d, 0x20, 0x20);
        assert_eq!(
            d.pending_interrupt(),
            Some(0x24),
            "next THRE edge after EOI"
        );
        assert_eq!(buf.contents(), b"A");
        // Input from the host raises RX data available.
        out(&mut d, 0x3f9, 0x01);
        d.acknowledge_interrupt();
        out(&mut d, 0x20, 0x20);
        assert_eq!(d.enqueue_serial_input(b"k"), 1);
        assert_eq!(d.acknowledge_interrupt(), 0x24);
        assert_eq!(inb(&mut d, 0x3f8), b'k');
    }

    #[test]
    fn pit_interrupts_arrive_at_deadlines() {
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        out(&mut d, 0x43, 0x34); // ch0 mode 2
        out(&mut d, 0x40, 0xa9); // 1193 = 0x04a9
        out(&mut d, 0x40, 0x04);
        let deadline = d.next_deadline_ns().unwrap();
        assert_eq!(deadline, ticks_to_ns(1 + 1193));
        d.advance_to(deadline - 1);
        assert_eq!(d.pending_interrupt(), None);
        d.advance_to(deadline);
        assert_eq!(d.pending_interrupt(), Some(0x20));
        assert_eq!(d.acknowledge_interrupt(), 0x20);
        // Missed periods coalesce into one latched request (edge-triggered PIC).
        d.advance_to(deadline + 5_000_000);
        assert_eq!(d.pending_interrupt(), None, "IR0 in service until EOI");
        out(&mut d, 0x20, 0x20);
        assert_eq!(d.acknowledge_interrupt(), 0x20);
        out(&mut d, 0x20, 0x20);
        assert_eq!(d.pending_interrupt(), None);
        assert!(d.next_deadline_ns().unwrap() > d.now_ns());
    }

    #[test]
    fn debug_exit_and_bench_marker_ports() {
        let (mut d, _buf) = devices();
        d.advance_to(1234);
        d.io_write(0xf5, &[7, 0, 0, 0]).unwrap();
        d.advance_to(5678);
        d.io_write(0xf5, &[8]).unwrap();
        let marks = d.take_bench_marks();
        assert_eq!(
            marks
                .iter()
                .map(|m| (m.value, m.virtual_ns))
                .collect::<Vec<_>>(),
            vec![(7, 1234), (8, 5678)]
        );
        assert_eq!(d.take_exit_request(), None);
        d.io_write(0xf4, &[0x01, 0x02]).unwrap();
        assert_eq!(d.take_exit_request(), Some(1));
        assert_eq!(d.take_exit_request(), None);
    }

    #[test]
    fn unclaimed_ports_and_bad_widths() {
        let (mut d, _buf) = devices();
        let mut b = [0u8; 2];
        d.io_read(0x2f8, &mut b).unwrap(); // COM2 absent
        assert_eq!(b, [0xff, 0xff]);
        d.io_write(0x84, &[0x55]).unwrap(); // a DMA page register: absent
        let s = d.bus_stats();
        assert_eq!((s.unclaimed_reads, s.unclaimed_writes), (1, 1));
        assert_eq!(s.last_unclaimed_write, Some((0x84, 0x55)));
        assert!(matches!(
            d.io_write(0x3f8, &[1, 2, 3]),
            Err(DevicesError::Bus(BusError::BadAccessSize { .. }))
        ));
    }

    #[test]
    fn extra_devices_and_builtin_protection() {
        struct Const(u8);
        impl PortIoDevice for Const {
            fn read(&mut self, _o: u16, data: &mut [u8]) {
                data.fill(self.0);
            }
            fn write(&mut self, _o: u16, data: &[u8]) {
                self.0 = data[0];
            }
        }
        let (mut d, _buf) = devices();
        assert!(matches!(
            d.register_device(0x3fc, 8, AccessMode::Bytewise, Box::new(Const(1))),
            Err(DevicesError::Bus(BusError::Overlap { .. }))
        ));
        d.register_device(0x510, 2, AccessMode::Whole, Box::new(Const(9)))
            .unwrap();
        d.io_write(0x510, &[0x33]).unwrap();
        assert_eq!(inb(&mut d, 0x511), 0x33);
        assert!(matches!(
            d.remove_device(0x40),
            Err(DevicesError::BuiltIn(0x40))
        ));
        assert!(d.remove_device(0x511).unwrap().is_none());
        assert!(d.remove_device(0x510).unwrap().is_some());
        assert_eq!(inb(&mut d, 0x510), 0xff);
    }

    #[test]
    fn restore_rejects_other_versions_and_keeps_state() {
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        let before = d.save();
        let mut st = before.clone();
        st.version = 99;
        assert!(matches!(
            d.restore(&st),
            Err(DevicesError::UnsupportedVersion { found: 99, .. })
        ));
        let mut st = before.clone();
        let mut pit = st.get::<Pit>(PIT_ID).unwrap();
        pit.channels[0].mode = 7;
        st.set::<Pit>(PIT_ID, &pit);
        assert!(matches!(
            d.restore(&st),
            Err(DevicesError::DeviceState { ref id, .. }) if id == "pit"
        ));
        let mut st = before.clone();
        let mut serial = st.get::<Serial>(COM1_ID).unwrap();
        serial.rx_fifo = vec![0; 100];
        st.set::<Serial>(COM1_ID, &serial);
        let e = d.restore(&st).unwrap_err();
        assert!(
            matches!(e, DevicesError::DeviceState { ref id, .. } if id == "com1"),
            "{e}"
        );
        assert!(e.to_string().contains("FIFO holds at most 64"), "{e}");
        assert_eq!(d.save(), before, "failed restores change nothing");
    }

    /// Program the APICs through MMIO: local APIC enabled with TPR 0x20 and LINT0 masked,
    /// I/O APIC pin 3 (IRQ 3, unused) to vector 0x33.
    fn init_apics(d: &mut Devices) {
        let w32 =
            |d: &mut Devices, addr: u64, v: u32| assert!(d.mmio_write(addr, &v.to_le_bytes()));
        w32(d, LAPIC_ADDR + 0xf0, 0x1ff);
        w32(d, LAPIC_ADDR + 0x80, 0x20);
        w32(d, LAPIC_ADDR + 0x350, 1 << 16);
        w32(d, IOAPIC_ADDR, 0x16);
        w32(d, IOAPIC_ADDR + 0x10, 0x33);
    }

    #[test]
    fn apics_answer_mmio_route_irqs_and_save_their_state() {
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        init_apics(&mut d);
        let mut b = [0u8; 4];
        assert!(d.mmio_read(LAPIC_ADDR + 0x80, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x20);
        assert!(d.mmio_write(IOAPIC_ADDR, &[1]));
        assert!(d.mmio_read(IOAPIC_ADDR + 0x10, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x0017_0020);
        // IRQ 3 arrives through I/O APIC pin 3 at the local APIC; the 8259's copy of it no
        // longer reaches the vCPU (LINT0 masked).
        d.set_irq(3, true).unwrap();
        assert_eq!(d.pending_interrupt(), Some(0x33));
        let st = d.save();
        assert!(st.devices.contains_key(IOAPIC_ID) && st.devices.contains_key(LAPIC_ID));
        let r = Devices::from_state(&st, Box::new(std::io::sink())).unwrap();
        assert_eq!(r.save(), st);
        assert_eq!(r.pending_interrupt(), Some(0x33));
        assert_eq!(d.acknowledge_interrupt(), 0x33);
        assert_eq!(d.pending_interrupt(), None);
    }

    #[test]
    fn the_known_cr8_sets_the_task_priority_and_the_apic_base_gates_the_apic() {
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        init_apics(&mut d);
        d.set_irq(3, true).unwrap();
        assert_eq!(d.pending_interrupt(), Some(0x33));
        // A MOV to CR8 (as tracked for a protected vCPU): TPR = 0x30 masks class 3.
        d.sync_cr8(3);
        assert_eq!(d.intc().lapic(0).tpr(), 0x30);
        assert_eq!(d.pending_interrupt(), None);
        assert!(d.has_interrupt_request(), "held, not lost");
        d.sync_cr8(2);
        assert_eq!(d.pending_interrupt(), Some(0x33));
        // An unchanged CR8 leaves a TPR the guest wrote through MMIO alone.
        assert!(d.mmio_write(LAPIC_ADDR + 0x80, &0x40u32.to_le_bytes()));
        d.sync_cr8(2);
        assert_eq!(d.intc().lapic(0).tpr(), 0x40);
        // With the APIC disabled in IA32_APIC_BASE the 8259 reaches the vCPU directly.
        d.set_apic_base(LAPIC_ADDR | (1 << 8));
        assert_eq!(d.apic_base(), LAPIC_ADDR | (1 << 8));
        assert_eq!(
            d.pending_interrupt(),
            Some(0x23),
            "IRQ 3 through the 8259 (init_pic)"
        );
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_and_all_are_saved() {
        let (mut d, _buf) = devices();
        d.set_vcpus(3);
        assert_eq!(d.apic_base(), LAPIC_ADDR | (1 << 11) | (1 << 8), "BSP");
        let w32 =
            |d: &mut Devices, addr: u64, v: u32| assert!(d.mmio_write(addr, &v.to_le_bytes()));
        let r32 = |d: &mut Devices, addr: u64| {
            let mut b = [0u8; 4];
            assert!(d.mmio_read(addr, &mut b));
            u32::from_le_bytes(b)
        };
        for cpu in 0..3 {
            d.select_vcpu(cpu);
            w32(&mut d, LAPIC_ADDR + 0xf0, 0x1ff);
            assert_eq!(
                r32(&mut d, LAPIC_ADDR + 0x20),
                (cpu as u32) << 24,
                "APIC ID"
            );
        }
        d.select_vcpu(2);
        assert_eq!(d.apic_base(), LAPIC_ADDR | (1 << 11), "an AP: no BSP flag");
        // vCPU 2 sends vector 0x51 to APIC 1 and arms its own timer.
        w32(&mut d, LAPIC_ADDR + 0x310, 1 << 24);
        w32(&mut d, LAPIC_ADDR + 0x300, 0x51);
        w32(&mut d, LAPIC_ADDR + 0x3e0, 0xb);
        w32(&mut d, LAPIC_ADDR + 0x320, 0x61);
        w32(&mut d, LAPIC_ADDR + 0x380, 500);
        assert_eq!(d.pending_interrupt(), None);
        assert_eq!(d.pending_interrupt_of(1), Some(0x51));
        assert!(d.has_interrupt_request_of(1) && !d.has_interrupt_request_of(0));
        assert_eq!(d.next_deadline_ns(), Some(500));
        d.advance_to(500);
        assert_eq!(d.pending_interrupt(), Some(0x61), "vCPU 2's own timer");
        let st = d.save();
        assert!((0..3).all(|i| st.devices.contains_key(&lapic_id(i))));
        assert!(d.state_format().contains(" lapic2/1"));
        let r = Devices::from_state(&st, Box::new(std::io::sink())).unwrap();
        assert_eq!(r.vcpus(), 3);
        assert_eq!(r.save(), st);
        assert_eq!(r.pending_interrupt_of(1), Some(0x51));
        // A state of one vCPU restores into three: the APs' APICs reset.
        let (mut one, _b) = devices();
        init_apics(&mut one);
        d.restore(&one.save()).unwrap();
        assert_eq!(d.pending_interrupt_of(1), None);
        d.select_vcpu(1);
        assert_eq!(r32(&mut d, LAPIC_ADDR + 0xf0), 0xff, "lapic1 reset");
        // A state of three does not restore into one.
        assert!(matches!(
            one.restore(&st),
            Err(DevicesError::UnknownDevice { ref id }) if id == "lapic1"
        ));
    }

    #[test]
    fn states_of_an_esvm_without_the_apics_restore_with_them_reset() {
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        let mut old = d.save();
        for id in ADDED_LATER {
            assert!(old.devices.remove(*id).is_some(), "{id}");
        }
        assert!(added_later("lapic3") && !added_later("lapicx") && !added_later("pit"));
        init_apics(&mut d);
        d.restore(&old).unwrap();
        let fresh = Devices::new(Box::new(std::io::sink())).save();
        for id in ADDED_LATER {
            assert_eq!(d.save().devices[*id], fresh.devices[*id], "{id} is reset");
        }
        // Other devices stay required.
        old.devices.remove(PIT_ID);
        assert!(matches!(
            d.restore(&old),
            Err(DevicesError::MissingDevice { ref id }) if id == PIT_ID
        ));
    }

    #[test]
    fn a_bad_apic_state_is_refused_and_changes_nothing() {
        let (mut d, _buf) = devices();
        init_apics(&mut d);
        let before = d.save();
        let mut st = before.clone();
        let mut lapic: crate::LapicState =
            serde_json::from_value(st.devices[LAPIC_ID].state.clone()).unwrap();
        lapic.tpr = 0x100;
        st.devices.get_mut(LAPIC_ID).unwrap().state = serde_json::to_value(&lapic).unwrap();
        let e = d.restore(&st).unwrap_err();
        assert!(
            matches!(e, DevicesError::DeviceState { ref id, .. } if id == LAPIC_ID),
            "{e}"
        );
        let mut st = before.clone();
        st.devices.get_mut(IOAPIC_ID).unwrap().state = serde_json::json!("nonsense");
        assert!(matches!(
            d.restore(&st),
            Err(DevicesError::DeviceState { ref id, .. }) if id == IOAPIC_ID
        ));
        assert_eq!(d.save(), before, "failed restores change nothing");
    }

    #[test]
    fn restore_reattaches_writer() {
        let (mut d, buf) = devices();
        out(&mut d, 0x3f8, b'a');
        let st = d.save();
        let buf2 = SharedBuffer::new();
        let mut r = Devices::from_state(&st, Box::new(buf2.clone())).unwrap();
        out(&mut r, 0x3f8, b'b');
        d.restore(&st).unwrap();
        out(&mut d, 0x3f8, b'c');
        assert_eq!(buf.contents(), b"ac");
        assert_eq!(buf2.contents(), b"b");
    }
    /// A device only the tests have: a 32-bit latch at ports 0x510-0x511 (whole accesses)
    /// and at MMIO 0xfed0_0000 (16 bytes), driving IRQ 5 while the latch is non-zero.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Latch {
        value: u32,
        reads: u32,
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct LatchState {
        value: u32,
        reads: u32,
    }

    #[derive(Debug, Error)]
    #[error("a latch never holds 0xdead")]
    struct Dead;

    const LATCH_MMIO: u64 = 0xfed0_0000;

    impl Latch {
        fn irq(&self, cx: &mut DeviceContext<'_>) {
            cx.set_irq(5, self.value != 0);
        }
    }

    impl crate::Persist for Latch {
        type State = LatchState;
        type Error = Dead;
        const STATE_VERSION: u32 = 7;
        fn save(&self) -> LatchState {
            LatchState {
                value: self.value,
                reads: self.reads,
            }
        }
        fn restore(&mut self, s: &LatchState) -> Result<(), Dead> {
            if s.value == 0xdead {
                return Err(Dead);
            }
            (self.value, self.reads) = (s.value, s.reads);
            Ok(())
        }
    }

    impl Device for Latch {
        fn id(&self) -> &str {
            "test-latch"
        }
        fn port_regions(&self) -> Vec<crate::PortRegion> {
            vec![crate::PortRegion::whole(0x510, 2)]
        }
        fn mmio_regions(&self) -> Vec<crate::MmioRegion> {
            vec![crate::MmioRegion {
                base: LATCH_MMIO,
                len: 16,
            }]
        }
        fn io_read(&mut self, _: u16, off: u16, d: &mut [u8], cx: &mut DeviceContext) -> Access {
            if off != 0 {
                return Access::NotMine;
            }
            self.reads += 1;
            let v = self.value.to_le_bytes();
            d.copy_from_slice(&v[..d.len()]);
            self.irq(cx);
            Access::Handled
        }
        fn io_write(&mut self, _: u16, off: u16, d: &[u8], cx: &mut DeviceContext) -> Access {
            if off != 0 {
                return Access::NotMine;
            }
            self.value = crate::debug::le_value(d);
            self.irq(cx);
            Access::Handled
        }
        fn mmio_read(
            &mut self,
            base: u64,
            off: u64,
            d: &mut [u8],
            _: &mut DeviceContext,
        ) -> Access {
            assert_eq!(base, LATCH_MMIO);
            if off != 4 || d.len() != 4 {
                return Access::NotMine;
            }
            d.copy_from_slice(&self.value.to_le_bytes());
            Access::Handled
        }
        fn mmio_write(&mut self, _: u64, off: u64, d: &[u8], cx: &mut DeviceContext) -> Access {
            if off != 4 || d.len() != 4 {
                return Access::NotMine;
            }
            self.value = crate::debug::le_value(d);
            self.irq(cx);
            Access::Handled
        }
        fn advance_to(&mut self, _now: u64, cx: &mut DeviceContext) {
            self.irq(cx);
        }
    }

    #[test]
    fn a_device_registered_with_one_line_is_routed_saved_and_restored_by_id() {
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        let without = d.save();
        d.register(Box::new(Latch::default())).unwrap();

        // Routed: ports (whole accesses, "not mine" at offset 1) and MMIO.
        d.io_write(0x510, &[0x34, 0x12]).unwrap();
        assert_eq!(
            d.pending_interrupt(),
            Some(0x25),
            "its IRQ 5 reached the PIC"
        );
        let mut w = [0u8; 2];
        d.io_read(0x510, &mut w).unwrap();
        assert_eq!(w, [0x34, 0x12]);
        assert_eq!(inb(&mut d, 0x511), 0xff, "declined: unclaimed");
        assert_eq!(d.bus_stats().unclaimed_reads, 1);
        let mut m = [0u8; 4];
        assert!(d.mmio_read(LATCH_MMIO + 4, &mut m));
        assert_eq!(u32::from_le_bytes(m), 0x1234);
        assert!(d.mmio_write(LATCH_MMIO + 4, &0xabcd_u32.to_le_bytes()));
        assert!(!d.mmio_read(LATCH_MMIO, &mut m), "declined offset");
        assert!(!d.mmio_read(LATCH_MMIO + 14, &mut m), "straddles the end");
        assert!(!d.mmio_read(0xfeb0_0000, &mut m), "nobody's");
        assert_eq!(
            d.device::<Latch>("test-latch").map(|l| (l.value, l.reads)),
            Some((0xabcd, 1))
        );

        // Saved under its id with its own version.
        let st = d.save();
        assert_eq!(st.devices["test-latch"].version, 7);
        assert_eq!(st.get::<Latch>("test-latch").unwrap().value, 0xabcd);
        let json = serde_json::to_string(&st).unwrap();
        let st: DevicesState = serde_json::from_str(&json).unwrap();

        // Restored into a registry that has it...
        let (mut r, _b) = devices();
        r.register(Box::new(Latch::default())).unwrap();
        r.restore(&st).unwrap();
        assert_eq!(
            r.device::<Latch>("test-latch"),
            d.device::<Latch>("test-latch")
        );
        assert_eq!(r.save(), st);
        assert_eq!(r.acknowledge_interrupt(), 0x25, "the PIC state came along");
        let r_before = r.save();

        // ...and refused, naming it, by one that lacks it or from a state without it.
        let (mut plain, _b) = devices();
        let e = plain.restore(&st).unwrap_err();
        assert!(
            matches!(e, DevicesError::UnknownDevice { ref id } if id == "test-latch"),
            "{e}"
        );
        assert!(e.to_string().contains("`test-latch`"), "{e}");
        let e = r.restore(&without).unwrap_err();
        assert!(
            matches!(e, DevicesError::MissingDevice { ref id } if id == "test-latch"),
            "{e}"
        );
        let mut old = st.clone();
        old.devices.get_mut("test-latch").unwrap().version = 6;
        let e = r.restore(&old).unwrap_err();
        assert!(
            matches!(
                e,
                DevicesError::DeviceVersion {
                    found: 6,
                    expected: 7,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("device `test-latch`: saved state version 6"),
            "{e}"
        );
        let mut dead = st.clone();
        dead.set::<Latch>(
            "test-latch",
            &LatchState {
                value: 0xdead,
                reads: 0,
            },
        );
        let e = r.restore(&dead).unwrap_err();
        assert!(e.to_string().contains("never holds 0xdead"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "the chain is kept");
        assert_eq!(r.save(), r_before, "refused restores change nothing");
    }

    #[test]
    fn registration_conflicts_change_nothing() {
        let (mut d, _buf) = devices();
        d.register(Box::new(Latch::default())).unwrap();
        let before: Vec<String> = d.bus.ranges().map(|(r, _)| r.to_string()).collect();
        assert!(matches!(
            d.register(Box::new(Latch::default())),
            Err(DevicesError::DuplicateId(ref id)) if id == "test-latch"
        ));
        /// The latch again under another id, so only its ranges conflict.
        struct Twin(Latch);
        impl crate::Persist for Twin {
            type State = LatchState;
            type Error = Dead;
            const STATE_VERSION: u32 = 1;
            fn save(&self) -> LatchState {
                crate::Persist::save(&self.0)
            }
            fn restore(&mut self, s: &LatchState) -> Result<(), Dead> {
                crate::Persist::restore(&mut self.0, s)
            }
        }
        impl Device for Twin {
            fn id(&self) -> &str {
                "twin"
            }
            fn port_regions(&self) -> Vec<crate::PortRegion> {
                vec![crate::PortRegion::whole(0x700, 1)]
            }
            fn mmio_regions(&self) -> Vec<crate::MmioRegion> {
                self.0.mmio_regions()
            }
        }
        assert!(matches!(
            d.register(Box::new(Twin(Latch::default()))),
            Err(DevicesError::Bus(BusError::MmioOverlap { .. }))
        ));
        let after: Vec<String> = d.bus.ranges().map(|(r, _)| r.to_string()).collect();
        assert_eq!(
            before, after,
            "the port range of the refused device is gone"
        );
        assert_eq!(d.ids().filter(|i| *i == "twin").count(), 0);
        assert!(
            d.state_format().contains(" test-latch/7"),
            "{}",
            d.state_format()
        );
        assert!(!d.state_format().contains("twin"));
    }

    #[test]
    fn power_on_levels_latch_nothing() {
        /// Drives IRQ 6 high from the start, as a device whose output idles high.
        struct High;
        impl crate::Persist for High {
            type State = ();
            type Error = std::convert::Infallible;
            const STATE_VERSION: u32 = 1;
            fn save(&self) {}
            fn restore(&mut self, _: &()) -> Result<(), Self::Error> {
                Ok(())
            }
        }
        impl Device for High {
            fn id(&self) -> &str {
                "high"
            }
            fn advance_to(&mut self, _now: u64, cx: &mut DeviceContext) {
                cx.set_irq(6, true);
            }
        }
        let (mut d, _buf) = devices();
        init_pic(&mut d);
        d.register(Box::new(High)).unwrap();
        d.advance_to(1000);
        assert_eq!(
            d.pending_interrupt(),
            None,
            "no edge: the line was high from the start"
        );
    }

    #[test]
    fn state_format_names_every_saved_device() {
        let (d, _buf) = devices();
        let f = d.state_format();
        assert!(
            f.starts_with(&format!("devices/{DEVICES_STATE_VERSION} ")),
            "{f}"
        );
        for id in d.ids().chain([PIC_ID]) {
            assert!(f.contains(&format!(" {id}/")), "{id} missing from {f}");
        }
        assert_eq!(f, state_format());
        let st = d.save();
        // The registered devices, the PIC pair, the I/O APIC and the local APIC.
        assert_eq!(st.devices.len(), d.ids().count() + 3);
    }
}
