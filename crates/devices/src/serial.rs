//! 16550A UART (COM1 at 0x3f8-0x3ff, IRQ 4) on top of vm-superio's `Serial`.
//!
//! Transmitted bytes go to a `Box<dyn Write + Send>` (stdout in the VMM, a [`SharedBuffer`] in
//! tests). Interrupts are signalled through an [`IrqLine`] (vm-superio's `Trigger`), which the
//! owner turns into an edge on PIC input 4. The saved state is vm-superio's `SerialState`
//! mirrored into a serde type, plus the not-yet-delivered interrupt request.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::{Serial as Uart, SerialState};

use crate::bus::PortIoDevice;
use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};
use crate::irq::IrqLine;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of UART registers (ports).
pub const UART_PORTS: u16 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u8 = 4;
/// Registry id of COM1.
pub const COM1_ID: &str = "com1";
/// Receive FIFO depth of the emulated 16550A.
pub const RX_FIFO_SIZE: usize = 64;

/// Errors of the serial device.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SerialError {
    /// A saved state whose receive FIFO holds more than the UART can.
    #[error("saved serial state holds {len} received bytes but the 16550A FIFO holds at most {RX_FIFO_SIZE}; the state is corrupt or from another device model")]
    FifoOverflow {
        /// Bytes in the saved FIFO.
        len: usize,
    },
}

type Writer = Box<dyn Write + Send>;

/// Saved state of the UART: its registers, the receive FIFO, and whether an interrupt request
/// was raised but not yet delivered to the interrupt controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest, oldest first.
    pub rx_fifo: Vec<u8>,
    /// An interrupt request raised but not yet taken by the interrupt router.
    pub irq_pending: bool,
}

impl Default for SerialDeviceState {
    fn default() -> Self {
        Self::from_uart(&SerialState::default(), false)
    }
}

impl SerialDeviceState {
    fn from_uart(s: &SerialState, irq_pending: bool) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer.clone(),
            irq_pending,
        }
    }

    fn to_uart(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.rx_fifo.clone(),
        }
    }
}

/// The COM1 UART.
pub struct Serial {
    uart: Uart<IrqLine, NoEvents, Writer>,
    irq: IrqLine,
    lost_tx_bytes: u64,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state())
            .field("lost_tx_bytes", &self.lost_tx_bytes)
            .finish()
    }
}

impl Serial {
    /// A UART in its reset state writing to `out` and raising `irq`.
    pub fn new(out: Writer, irq: IrqLine) -> Self {
        Self {
            uart: Uart::new(irq.clone(), out),
            irq,
            lost_tx_bytes: 0,
        }
    }

    /// COM1 in its reset state writing to `out`, with its own interrupt line (which the
    /// registry turns into edges on IRQ 4).
    pub fn com1(out: Writer) -> Self {
        Self::new(out, IrqLine::new())
    }

    /// Rebuild a UART from saved state, writing to `out` and raising `irq`. The interrupt line
    /// is left exactly as saved (raised iff `state.irq_pending`).
    pub fn from_state(
        state: &SerialDeviceState,
        out: Writer,
        irq: IrqLine,
    ) -> Result<Self, SerialError> {
        if state.rx_fifo.len() > RX_FIFO_SIZE {
            return Err(SerialError::FifoOverflow {
                len: state.rx_fifo.len(),
            });
        }
        let uart =
            Uart::from_state(&state.to_uart(), irq.clone(), NoEvents, out).map_err(
                |e| match e {
                    // The only error from_state can report for an IrqLine trigger (whose error type is
                    // uninhabited) is an oversized FIFO, checked above already.
                    UartError::FullFifo | UartError::IOError(_) => SerialError::FifoOverflow {
                        len: state.rx_fifo.len(),
                    },
                    UartError::Trigger(never) => match never {},
                },
            )?;
        // from_state re-triggers pending enabled interrupts; the saved flag is the truth
        // (the interrupt controller state already reflects delivered requests).
        irq.set(state.irq_pending);
        Ok(Self {
            uart,
            irq,
            lost_tx_bytes: 0,
        })
    }

    /// Put the UART in the saved `state`, keeping its output writer and interrupt line.
    /// On error nothing is changed.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        if state.rx_fifo.len() > RX_FIFO_SIZE {
            return Err(SerialError::FifoOverflow {
                len: state.rx_fifo.len(),
            });
        }
        let out = self.replace_writer(Box::new(io::sink()));
        let restored = Self::from_state(state, out, self.irq.clone())?;
        *self = restored;
        Ok(())
    }

    /// Current state.
    pub fn state(&self) -> SerialDeviceState {
        SerialDeviceState::from_uart(&self.uart.state(), self.irq.is_raised())
    }

    /// Guest read of register `offset` (0..=7).
    pub fn read_reg(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Guest write of `value` to register `offset` (0..=7). A failed write to the output
    /// does not stop the guest: the byte is counted in [`Serial::lost_tx_bytes`].
    pub fn write_reg(&mut self, offset: u8, value: u8) {
        match self.uart.write(offset, value) {
            Ok(()) => {}
            Err(UartError::IOError(_)) | Err(UartError::FullFifo) => self.lost_tx_bytes += 1,
            Err(UartError::Trigger(never)) => match never {},
        }
    }

    /// Queue bytes for the guest to receive; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn rx_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Bytes the guest transmitted that the output writer failed to take.
    pub fn lost_tx_bytes(&self) -> u64 {
        self.lost_tx_bytes
    }

    /// The interrupt line this UART raises.
    pub fn irq_line(&self) -> &IrqLine {
        &self.irq
    }

    /// Swap the output writer, returning the old one.
    pub fn replace_writer(&mut self, out: Writer) -> Writer {
        std::mem::replace(self.uart.writer_mut(), out)
    }

    /// Flush the output writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl PortIoDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let reg = usize::from(offset) + i;
            *b = if reg < usize::from(UART_PORTS) {
                self.read_reg(reg as u8)
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let reg = usize::from(offset) + i;
            if reg < usize::from(UART_PORTS) {
                self.write_reg(reg as u8, *b);
            }
        }
    }
}

impl Persist for Serial {
    type State = SerialDeviceState;
    type Error = SerialError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> SerialDeviceState {
        self.state()
    }

    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        Serial::restore(self, state)
    }
}

impl Serial {
    /// Deliver a raised interrupt request as an edge on IRQ 4.
    fn report_irq(&self, cx: &mut DeviceContext<'_>) {
        if self.irq.is_raised() && self.irq.take() {
            cx.pulse_irq(COM1_IRQ);
        }
    }
}

/// COM1 on the platform: ports 0x3f8-0x3ff; an interrupt request is an edge on IRQ 4.
impl Device for Serial {
    fn id(&self) -> &str {
        COM1_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![PortRegion::bytewise(COM1_BASE, u32::from(UART_PORTS))]
    }

    fn hooks(&self) -> Hooks {
        // advance_to delivers requests raised outside an access (host input, a restore).
        Hooks::CLOCK
    }

    fn io_read(
        &mut self,
        _base: u16,
        offset: u16,
        data: &mut [u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        PortIoDevice::read(self, offset, data);
        self.report_irq(cx);
        Access::Handled
    }

    fn io_write(
        &mut self,
        _base: u16,
        offset: u16,
        data: &[u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        PortIoDevice::write(self, offset, data);
        self.report_irq(cx);
        Access::Handled
    }

    fn advance_to(&mut self, _now_ns: u64, cx: &mut DeviceContext<'_>) {
        // Requests raised outside an access (host input, a restored pending request).
        self.report_irq(cx);
    }
}

/// A cloneable in-memory writer (clones share the buffer), for tests and for capturing guest
/// output.
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Take everything written so far, leaving the buffer empty.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const MCR: u8 = 4;
    const LSR: u8 = 5;
    const MSR: u8 = 6;
    const SCR: u8 = 7;

    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;

    fn serial() -> (Serial, SharedBuffer, IrqLine) {
        let buf = SharedBuffer::new();
        let irq = IrqLine::new();
        (Serial::new(Box::new(buf.clone()), irq.clone()), buf, irq)
    }

    struct FailingWriter;
    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("sink closed"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_output_reaches_writer() {
        let (mut s, buf, irq) = serial();
        for b in b"hello\n" {
            s.write_reg(THR, *b);
        }
        assert_eq!(buf.contents(), b"hello\n");
        // No interrupts enabled: line stays low.
        assert!(!irq.is_raised());
        assert_eq!(s.lost_tx_bytes(), 0);
    }

    #[test]
    fn lsr_reports_thr_empty_and_data_ready() {
        let (mut s, _buf, _irq) = serial();
        let lsr = s.read_reg(LSR);
        assert_eq!(lsr & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(lsr & LSR_DR, 0);
        s.write_reg(THR, b'x');
        assert_ne!(
            s.read_reg(LSR) & LSR_THRE,
            0,
            "THR stays empty after a write"
        );
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_ne!(s.read_reg(LSR) & LSR_DR, 0);
        assert_eq!(s.read_reg(THR), b'a');
        assert_eq!(s.read_reg(THR), b'b');
        assert_eq!(s.read_reg(LSR) & LSR_DR, 0);
    }

    #[test]
    fn enabling_thre_interrupt_raises_line() {
        let (mut s, _buf, irq) = serial();
        s.write_reg(IER, 0x02);
        assert!(irq.take(), "THRE interrupt on enable");
        // IIR reports THR empty (id 0b001 << 1) with FIFO bits; reading acknowledges it.
        assert_eq!(s.read_reg(IIR), 0xc2);
        assert_eq!(s.read_reg(IIR), 0xc1, "no interrupt pending after IIR read");
        s.write_reg(THR, b'z');
        assert!(irq.take(), "THRE interrupt after transmitting");
    }

    #[test]
    fn rx_interrupt_when_enabled() {
        let (mut s, _buf, irq) = serial();
        s.enqueue_input(b"q");
        assert!(!irq.is_raised(), "RDA not enabled yet");
        s.write_reg(IER, 0x01);
        assert!(irq.take(), "pending RX data asserts the line once enabled");
        assert_eq!(s.read_reg(IIR) & 0x0f, 0x04);
        assert_eq!(s.read_reg(THR), b'q');
    }

    #[test]
    fn ier_masks_reserved_bits() {
        let (mut s, _buf, _irq) = serial();
        s.write_reg(IER, 0xff);
        assert_eq!(s.read_reg(IER), 0x0f);
    }

    #[test]
    fn divisor_latch_and_plain_registers() {
        let (mut s, buf, _irq) = serial();
        s.write_reg(LCR, 0x80); // DLAB
        s.write_reg(0, 0x01);
        s.write_reg(1, 0x02);
        assert_eq!(s.read_reg(0), 0x01);
        assert_eq!(s.read_reg(1), 0x02);
        s.write_reg(LCR, 0x03);
        assert_eq!(s.read_reg(LCR), 0x03);
        assert_eq!(s.read_reg(IER), 0, "IER untouched by DLAB writes");
        assert!(buf.contents().is_empty(), "DLAB writes are not data");
        s.write_reg(SCR, 0x5a);
        assert_eq!(s.read_reg(SCR), 0x5a);
        s.write_reg(MCR, 0x0b);
        assert_eq!(s.read_reg(MCR), 0x0b);
        // DCD | DSR | CTS by default.
        assert_eq!(s.read_reg(MSR) & 0xf0, 0xb0);
    }

    #[test]
    fn loopback_mode_echoes_into_rx() {
        let (mut s, buf, _irq) = serial();
        s.write_reg(MCR, 0x10 | 0x03);
        s.write_reg(THR, 0x42);
        assert!(buf.contents().is_empty());
        assert_ne!(s.read_reg(LSR) & LSR_DR, 0);
        assert_eq!(s.read_reg(THR), 0x42);
        // Loopback maps DTR->DSR, RTS->CTS.
        assert_eq!(s.read_reg(MSR) & 0x30, 0x30);
    }

    #[test]
    fn fifo_capacity_limits_input() {
        let (mut s, _buf, _irq) = serial();
        let data = vec![7u8; RX_FIFO_SIZE + 10];
        assert_eq!(s.enqueue_input(&data), RX_FIFO_SIZE);
        assert_eq!(s.rx_capacity(), 0);
        assert_eq!(s.enqueue_input(b"x"), 0);
    }

    #[test]
    fn failing_writer_counts_lost_bytes_and_still_interrupts() {
        let irq = IrqLine::new();
        let mut s = Serial::new(Box::new(FailingWriter), irq.clone());
        s.write_reg(IER, 0x02);
        irq.take();
        s.read_reg(IIR);
        s.write_reg(THR, b'a');
        assert_eq!(s.lost_tx_bytes(), 1);
        assert!(irq.take());
    }

    #[test]
    fn save_restore_with_pending_interrupt_and_rx_data() {
        let (mut s, buf, irq) = serial();
        s.write_reg(LCR, 0x80);
        s.write_reg(0, 0x03);
        s.write_reg(LCR, 0x03);
        s.write_reg(SCR, 0x99);
        s.enqueue_input(b"xyz");
        s.write_reg(IER, 0x03);
        assert!(irq.is_raised());
        let st = s.state();
        assert!(st.irq_pending);
        let json = serde_json::to_string(&st).unwrap();
        let st2: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(st, st2);

        let buf2 = SharedBuffer::new();
        let irq2 = IrqLine::new();
        let mut r = Serial::from_state(&st2, Box::new(buf2.clone()), irq2.clone()).unwrap();
        assert_eq!(r.state(), st);
        // Same behaviour from here on.
        for dev in [&mut s, &mut r] {
            // vm-superio keeps IIR as a set of bits (RDA | THRE here), not priority-encoded.
            assert_eq!(dev.read_reg(IIR), 0xc6);
            assert_eq!(dev.read_reg(THR), b'x');
            dev.write_reg(THR, b'!');
        }
        assert_eq!(s.state(), r.state());
        assert_eq!(irq.take(), irq2.take());
        assert_eq!(buf.contents(), b"!");
        assert_eq!(buf2.contents(), b"!");
    }

    #[test]
    fn restore_keeps_saved_irq_flag_even_when_taken() {
        let (mut s, _buf, irq) = serial();
        s.write_reg(IER, 0x02);
        assert!(irq.take()); // router delivered it
        let st = s.state();
        assert!(!st.irq_pending);
        let irq2 = IrqLine::new();
        let _r = Serial::from_state(&st, Box::new(io::sink()), irq2.clone()).unwrap();
        assert!(
            !irq2.is_raised(),
            "already-delivered request must not be re-raised"
        );
    }

    #[test]
    fn oversized_fifo_is_rejected() {
        let st = SerialDeviceState {
            rx_fifo: vec![0; RX_FIFO_SIZE + 1],
            ..SerialDeviceState::default()
        };
        let err = Serial::from_state(&st, Box::new(io::sink()), IrqLine::new()).unwrap_err();
        assert_eq!(err, SerialError::FifoOverflow { len: 65 });
    }

    #[test]
    fn replace_writer_redirects_output() {
        let (mut s, buf, _irq) = serial();
        s.write_reg(THR, b'1');
        let other = SharedBuffer::new();
        let _old = s.replace_writer(Box::new(other.clone()));
        s.write_reg(THR, b'2');
        assert_eq!(buf.contents(), b"1");
        assert_eq!(other.contents(), b"2");
    }

    #[test]
    fn port_io_trait_offsets() {
        let (mut s, buf, _irq) = serial();
        PortIoDevice::write(&mut s, 7, &[0x11]);
        let mut d = [0u8; 1];
        PortIoDevice::read(&mut s, 7, &mut d);
        assert_eq!(d[0], 0x11);
        PortIoDevice::write(&mut s, 0, b"k");
        assert_eq!(buf.contents(), b"k");
        let mut d2 = [0u8; 2];
        PortIoDevice::read(&mut s, 7, &mut d2);
        assert_eq!(d2, [0x11, 0xff]);
    }
}
