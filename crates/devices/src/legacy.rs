//! [`Devices`]: the legacy PC devices of an esvm guest, wired together on one port-I/O bus.
//!
//! | ports         | device                      | interrupt |
//! |---------------|-----------------------------|-----------|
//! | 0x20-0x21     | master 8259A PIC            |           |
//! | 0x40-0x43     | 8254 PIT                    | IRQ 0     |
//! | 0x61          | PIT gate 2 / OUT2 / refresh |           |
//! | 0xa0-0xa1     | slave 8259A PIC (on IR2)    |           |
//! | 0xf4          | debug exit (any width)      |           |
//! | 0xf5          | benchmark marker            |           |
//! | 0x3f8-0x3ff   | COM1 16550A UART            | IRQ 4     |
//!
//! Every other port is unclaimed (reads all-ones, writes dropped and counted), unless the VMM
//! registers more devices with [`Devices::register_device`].

use std::fmt;
use std::io::Write;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::{AccessMode, BusError, BusStats, IoBus, PortIoDevice, PortRange};
use crate::debug::{
    BenchMark, BenchMarker, DebugExit, DebugExitState, BENCH_MARKER_PORT, DEBUG_EXIT_PORT,
};
use crate::irq::IrqLine;
use crate::pic::{Pic, PicError, PicState, PIC_MASTER_CMD, PIC_SLAVE_CMD};
use crate::pit::{Pit, PitError, PitState, PIT_BASE, PIT_IRQ, PIT_PORTS, PORT_61};
use crate::serial::{Serial, SerialDeviceState, SerialError, COM1_BASE, COM1_IRQ, UART_PORTS};

/// Version of [`DevicesState`] written by this build.
pub const DEVICES_STATE_VERSION: u32 = 1;

/// Errors of the device aggregate.
#[derive(Debug, Error)]
pub enum DevicesError {
    /// A bad access or a port conflict on the bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A saved state from another format version.
    #[error("devices state version {found} is not supported by this build (it reads version {expected}); restore it with the esvm version that saved it")]
    UnsupportedVersion {
        /// Version in the state.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// Invalid saved serial state.
    #[error("serial device: {0}")]
    Serial(#[from] SerialError),
    /// Invalid saved PIT state.
    #[error("PIT: {0}")]
    Pit(#[from] PitError),
    /// Invalid saved PIC state or IRQ number.
    #[error("PIC: {0}")]
    Pic(#[from] PicError),
    /// Removing a built-in device.
    #[error("port {0:#06x} belongs to a built-in device, which cannot be removed")]
    BuiltIn(u16),
}

/// Saved state of all built-in devices (serde, versioned). The serial output writer, the
/// benchmark marks and the bus diagnostics are host-side and not part of it; devices added
/// with [`Devices::register_device`] are the VMM's to save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// Format version, [`DEVICES_STATE_VERSION`].
    pub version: u32,
    /// Virtual time the devices were last advanced to, in ns.
    pub now_ns: u64,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The 8254.
    pub pit: PitState,
    /// The 8259A pair.
    pub pic: PicState,
    /// Port 0xf4.
    pub debug_exit: DebugExitState,
}

enum Route {
    Serial,
    Pit,
    Port61,
    PicMaster,
    PicSlave,
    DebugExit,
    BenchMarker,
    Extra(Box<dyn PortIoDevice>),
}

/// The legacy devices of one VM. See the crate documentation for how the VMM drives it.
pub struct Devices {
    bus: IoBus<Route>,
    serial: Serial,
    serial_irq: IrqLine,
    pit: Pit,
    pic: Pic,
    debug_exit: DebugExit,
    bench: BenchMarker,
    now_ns: u64,
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Devices")
            .field("now_ns", &self.now_ns)
            .field("bus", &self.bus)
            .field("serial", &self.serial)
            .field("pit", &self.pit)
            .field("pic", &self.pic)
            .field("debug_exit", &self.debug_exit)
            .finish()
    }
}

fn builtin_bus() -> Result<IoBus<Route>, BusError> {
    let mut bus = IoBus::new();
    let byte = AccessMode::Bytewise;
    bus.insert(PortRange::new(PIC_MASTER_CMD, 2)?, byte, Route::PicMaster)?;
    bus.insert(
        PortRange::new(PIT_BASE, u32::from(PIT_PORTS))?,
        byte,
        Route::Pit,
    )?;
    bus.insert(PortRange::new(PORT_61, 1)?, byte, Route::Port61)?;
    bus.insert(PortRange::new(PIC_SLAVE_CMD, 2)?, byte, Route::PicSlave)?;
    bus.insert(
        PortRange::new(DEBUG_EXIT_PORT, 1)?,
        AccessMode::Whole,
        Route::DebugExit,
    )?;
    bus.insert(
        PortRange::new(BENCH_MARKER_PORT, 1)?,
        AccessMode::Whole,
        Route::BenchMarker,
    )?;
    bus.insert(
        PortRange::new(COM1_BASE, u32::from(UART_PORTS))?,
        byte,
        Route::Serial,
    )?;
    Ok(bus)
}

fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

impl Devices {
    /// All devices in their reset state at virtual time 0, COM1 writing to `serial_out`.
    pub fn new(serial_out: Box<dyn Write + Send>) -> Self {
        let serial_irq = IrqLine::new();
        let pit = Pit::new();
        // OUT0 idles high: start the PIC's IR0 input high so that no edge is latched.
        let pic = Pic::with_line_levels(u16::from(pit.irq0_level()) << PIT_IRQ);
        Self {
            // The built-in ranges are constants and disjoint; the unit tests build this bus.
            bus: builtin_bus().expect("built-in port ranges are valid and disjoint"),
            serial: Serial::new(serial_out, serial_irq.clone()),
            serial_irq,
            pit,
            pic,
            debug_exit: DebugExit::new(),
            bench: BenchMarker::new(),
            now_ns: 0,
        }
    }

    /// Devices rebuilt from `state`, COM1 writing to `serial_out`.
    pub fn from_state(
        state: &DevicesState,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Self, DevicesError> {
        let mut d = Self::new(serial_out);
        d.restore(state)?;
        Ok(d)
    }

    /// Snapshot of every built-in device.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            version: DEVICES_STATE_VERSION,
            now_ns: self.now_ns,
            serial: self.serial.state(),
            pit: self.pit.state(),
            pic: self.pic.state(),
            debug_exit: self.debug_exit.state(),
        }
    }

    /// Put every built-in device in the saved `state`, keeping the current serial output
    /// writer, benchmark marks and extra devices. On error nothing is changed.
    pub fn restore(&mut self, state: &DevicesState) -> Result<(), DevicesError> {
        if state.version != DEVICES_STATE_VERSION {
            return Err(DevicesError::UnsupportedVersion {
                found: state.version,
                expected: DEVICES_STATE_VERSION,
            });
        }
        let pit = Pit::from_state(&state.pit)?;
        let pic = Pic::from_state(&state.pic)?;
        self.serial.restore(&state.serial)?;
        self.pit = pit;
        self.pic = pic;
        self.debug_exit = DebugExit::from_state(&state.debug_exit);
        self.now_ns = state.now_ns;
        self.bench.advance_to(state.now_ns);
        Ok(())
    }

    /// Current virtual time in ns.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Move virtual time forward to `now_ns` (an earlier time is ignored), delivering timer
    /// edges to the PIC. Call it with the vCPU's virtual time before every port access and
    /// before checking for interrupts.
    pub fn advance_to(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        let edges = self.pit.advance_to(self.now_ns);
        self.bench.advance_to(self.now_ns);
        if edges > 0 {
            // At least one rising edge of OUT0 since the last sync: latch it in the PIC even
            // if OUT0 is low again by now. The final level is set by sync_irq_lines.
            let _ = self.pic.set_irq(PIT_IRQ, false);
            let _ = self.pic.set_irq(PIT_IRQ, true);
        }
        self.sync_irq_lines();
    }

    /// Virtual time (ns) of the next timer interrupt edge, if one is scheduled: run the vCPU
    /// no further than this before calling [`Devices::advance_to`] again.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.pit.next_deadline_ns()
    }

    fn sync_irq_lines(&mut self) {
        if self.serial_irq.take() {
            let _ = self.pic.pulse_irq(COM1_IRQ);
        }
        let _ = self.pic.set_irq(PIT_IRQ, self.pit.irq0_level());
    }

    /// Guest `IN` of `data.len()` (1, 2 or 4) bytes from `port`, at the current virtual time.
    pub fn io_read(&mut self, port: u16, data: &mut [u8]) -> Result<(), DevicesError> {
        let Self {
            bus,
            serial,
            pit,
            pic,
            debug_exit,
            bench,
            ..
        } = self;
        bus.read_with(port, data, |route, offset, bytes| match route {
            Route::Serial => serial.read(offset, bytes),
            Route::Pit => pit.read(offset, bytes),
            Route::Port61 => bytes.fill(pit.read_port61()),
            Route::PicMaster | Route::PicSlave => {
                let base = if matches!(route, Route::PicMaster) {
                    PIC_MASTER_CMD
                } else {
                    PIC_SLAVE_CMD
                };
                let v = pic.read_port(base + offset).unwrap_or(0xff);
                bytes.fill(v);
            }
            Route::DebugExit => debug_exit.read(offset, bytes),
            Route::BenchMarker => bench.read(offset, bytes),
            Route::Extra(dev) => dev.read(offset, bytes),
        })?;
        self.sync_irq_lines();
        Ok(())
    }

    /// Guest `OUT` of `data` (1, 2 or 4 bytes, little-endian) to `port`, at the current
    /// virtual time.
    pub fn io_write(&mut self, port: u16, data: &[u8]) -> Result<(), DevicesError> {
        let now = self.now_ns;
        let Self {
            bus,
            serial,
            pit,
            pic,
            debug_exit,
            bench,
            ..
        } = self;
        bus.write_with(port, data, |route, offset, bytes| match route {
            Route::Serial => serial.write(offset, bytes),
            Route::Pit => pit.write(offset, bytes),
            Route::Port61 => {
                if let Some(v) = bytes.first() {
                    pit.write_port61(*v);
                }
            }
            Route::PicMaster | Route::PicSlave => {
                let base = if matches!(route, Route::PicMaster) {
                    PIC_MASTER_CMD
                } else {
                    PIC_SLAVE_CMD
                };
                if let Some(v) = bytes.first() {
                    let _ = pic.write_port(base + offset, *v);
                }
            }
            Route::DebugExit => debug_exit.write(offset, bytes),
            Route::BenchMarker => {
                // A full log is counted by the marker; the guest is not disturbed.
                let _ = bench.mark(le_value(bytes), now);
            }
            Route::Extra(dev) => dev.write(offset, bytes),
        })?;
        self.sync_irq_lines();
        Ok(())
    }

    /// Vector of the interrupt the PIC would deliver now, if any. Hand it to the vCPU only when
    /// its interrupt window is open (RFLAGS.IF set, no interrupt shadow), via
    /// [`Devices::acknowledge_interrupt`].
    pub fn pending_interrupt(&self) -> Option<u8> {
        self.pic.pending_vector()
    }

    /// The interrupt-acknowledge cycle: returns the vector to inject (possibly a spurious
    /// IRQ 7 / 15 vector, which the guest must see as well) and marks it in service.
    pub fn acknowledge_interrupt(&mut self) -> u8 {
        self.pic.acknowledge()
    }

    /// Drive PIC input `irq` (0-15) to `level`, for devices outside this crate. IRQ 0 and 4
    /// are driven by the PIT and COM1.
    pub fn set_irq(&mut self, irq: u8, level: bool) -> Result<(), DevicesError> {
        Ok(self.pic.set_irq(irq, level)?)
    }

    /// An edge on PIC input `irq` (0-15), for devices outside this crate.
    pub fn pulse_irq(&mut self, irq: u8) -> Result<(), DevicesError> {
        Ok(self.pic.pulse_irq(irq)?)
    }

    /// Exit status the guest requested through port 0xf4, if any (clears the request).
    pub fn take_exit_request(&mut self) -> Option<u8> {
        self.debug_exit.take_exit_request()
    }

    /// Queue host input for COM1; returns how many bytes fit in its FIFO.
    pub fn enqueue_serial_input(&mut self, bytes: &[u8]) -> usize {
        let n = self.serial.enqueue_input(bytes);
        self.sync_irq_lines();
        n
    }

    /// Swap COM1's output writer, returning the previous one.
    pub fn replace_serial_output(&mut self, out: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        self.serial.replace_writer(out)
    }

    /// Benchmark marks recorded through port 0xf5.
    pub fn bench_marks(&self) -> &[BenchMark] {
        self.bench.marks()
    }

    /// Drain the benchmark marks.
    pub fn take_bench_marks(&mut self) -> Vec<BenchMark> {
        self.bench.take_marks()
    }

    /// Unclaimed-port diagnostics.
    pub fn bus_stats(&self) -> BusStats {
        self.bus.stats()
    }

    /// Add a device at `len` ports from `base` (its state is not part of [`DevicesState`]).
    pub fn register_device(
        &mut self,
        base: u16,
        len: u32,
        mode: AccessMode,
        device: Box<dyn PortIoDevice>,
    ) -> Result<(), DevicesError> {
        let range = PortRange::new(base, len)?;
        self.bus.insert(range, mode, Route::Extra(device))?;
        Ok(())
    }

    /// Remove a device added with [`Devices::register_device`] at `base`.
    pub fn remove_device(
        &mut self,
        base: u16,
    ) -> Result<Option<Box<dyn PortIoDevice>>, DevicesError> {
        match self.bus.target(base) {
            None => Ok(None),
            Some((Route::Extra(_), 0)) => match self.bus.remove(base) {
                Some(Route::Extra(dev)) => Ok(Some(dev)),
                _ => Ok(None),
            },
            Some((Route::Extra(_), _)) => Ok(None),
            Some(_) => Err(DevicesError::BuiltIn(base)),
        }
    }

    /// COM1.
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// The PIT.
    pub fn pit(&self) -> &Pit {
        &self.pit
    }

    /// The PIC pair.
    pub fn pic(&self) -> &Pic {
        &self.pic
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
        let bus = builtin_bus().unwrap();
        let ranges: Vec<String> = bus.ranges().map(|(r, _)| r.to_string()).collect();
        assert_eq!(
            ranges,
            [
                "0x0020-0x0021",
                "0x0040-0x0043",
                "0x0061-0x0061",
                "0x00a0-0x00a1",
                "0x00f4-0x00f4",
                "0x00f5-0x00f5",
                "0x03f8-0x03ff"
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
        d.io_write(0x80, &[0x55]).unwrap(); // POST port
        let s = d.bus_stats();
        assert_eq!((s.unclaimed_reads, s.unclaimed_writes), (1, 1));
        assert_eq!(s.last_unclaimed_write, Some((0x80, 0x55)));
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
        st.pit.channels[0].mode = 7;
        assert!(matches!(d.restore(&st), Err(DevicesError::Pit(_))));
        let mut st = before.clone();
        st.serial.rx_fifo = vec![0; 100];
        assert!(matches!(d.restore(&st), Err(DevicesError::Serial(_))));
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
}
