//! Intel 8042 keyboard controller with a PS/2 keyboard and no aux (mouse) port: ports 0x60
//! (data) and 0x64 (status / command), IRQ 1; bit 0 of its output port is the CPU reset line.
//!
//! What it answers is what Linux's i8042 and atkbd drivers ask at boot, as Firecracker's
//! i8042 does plus what a clean probe needs:
//!
//! | command (0x64) | effect                                                              |
//! |----------------|---------------------------------------------------------------------|
//! | 0x20 / 0x60    | read / write the controller configuration byte (CTR)                |
//! | 0x21-0x3f      | read controller RAM: 0x00 (0x61-0x7f writes are dropped)              |
//! | 0xa7 / 0xa8    | disable / enable the aux interface (CTR bit 5)                      |
//! | 0xa9           | aux interface test: 0x02 (clock line stuck high: no aux port)       |
//! | 0xaa           | controller self-test: 0x55                                          |
//! | 0xab           | keyboard interface test: 0x00 (no error)                            |
//! | 0xad / 0xae    | disable / enable the keyboard interface (CTR bit 4)                 |
//! | 0xd0 / 0xd1    | read / write the output port (bit 0 low: CPU reset)                 |
//! | 0xd2           | the next data byte appears as keyboard data                         |
//! | 0xd3           | aux loopback: the byte comes back at once, but on the keyboard channel (no aux) |
//! | 0xd4           | the next data byte goes to the aux device: there is none, dropped   |
//! | 0xf0-0xff      | pulse output-port bits 3:0 where the command's bit is 0: 0xfe resets |
//!
//! Other commands are ignored. Data written to port 0x60 without a pending command goes to
//! the keyboard (and enables its interface, as on QEMU's controller), which acknowledges
//! with 0xfa: reset 0xff (0xfa, then 0xaa, BAT passed), identify 0xf2 (0xab 0x83, or 0xab 0x41
//! with translation on), LEDs 0xed, scancode set 0xf0 (0 queries: the set, translated when
//! translation is on), typematic 0xf3, enable 0xf4, disable 0xf5, defaults 0xf6, echo 0xee
//! (0xee), the set-3 key modes 0xf7-0xfd and resend 0xfe; anything else is answered 0xfe. The
//! keyboard has no keys here: nothing sends scancodes.
//!
//! The status register has OBF, the system flag (CTR bit 2, set: POST passed), the
//! command/data flag, and bit 4 set (keyboard not inhibited by a key lock); the input buffer
//! is never full and the aux, timeout and parity bits stay clear. IRQ 1 is high while the
//! output buffer holds a byte and CTR bit 0 is set; every byte that fills the buffer is an
//! edge, even when it follows a read at once.
//!
//! # No aux port
//! Linux 6.1's `i8042_check_aux` sends the aux loopback (0xd3 0x5a): the answer arrives at
//! once without the aux-data status bit, so the loop test fails; it then asks the aux
//! interface test (0xa9), gets 0x02 ("clock line stuck"), and concludes quietly that there
//! is no aux port (both checks are debug messages only). A controller that ignored 0xd3
//! would cost the guest a 0.5 s busy-wait per command. The reset state's CTR is 0x05
//! (keyboard interrupt, system flag, no translation), as on Firecracker: Linux then runs the
//! keyboard untranslated ("AT Raw Set 2 keyboard").
//!
//! # Reset line
//! Command 0xfe (or any 0xf0-0xff pulse with bit 0 clear) and an output-port write with bit
//! 0 clear request a CPU reset, which the VMM takes with [`I8042::take_reset_request`]
//! (through `Devices::take_reset_request`). Bit 1 (A20) is stored: the platform's A20 line
//! is always on.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ISA IRQ of the keyboard channel.
pub const I8042_KBD_IRQ: u8 = 1;
/// Registry id of the controller.
pub const I8042_ID: &str = "i8042";
/// Bytes the keyboard buffers while the output buffer is full.
pub const KBD_QUEUE_LEN: usize = 16;

const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
const STR_CMD: u8 = 0x08;
const STR_UNLOCKED: u8 = 0x10;

const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const OUT_RESET: u8 = 0x01;
const OUT_KBD_OBF: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_BUF: u8 = 0xd2;
const CMD_WRITE_AUX_BUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;

/// Answer to the aux interface test: clock line stuck high (nothing is wired there).
const AUX_TEST_NO_PORT: u8 = 0x02;

const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;

/// Errors of the i8042.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum I8042Error {
    /// A saved state the device cannot be in.
    #[error("saved i8042 state is invalid: {0}; the state is corrupt or from an incompatible build")]
    InvalidState(String),
}

/// The keyboard behind the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyboardState {
    /// Scanning enabled (0xf4 / 0xf5).
    pub scanning: bool,
    /// LED bits (0xed).
    pub leds: u8,
    /// Scancode set, 1-3 (0xf0).
    pub scancode_set: u8,
    /// Typematic rate and delay (0xf3).
    pub typematic: u8,
    /// A command (0xed, 0xf0, 0xf3) waiting for its parameter byte.
    pub awaiting: Option<u8>,
    /// Bytes sent to the controller and not yet in its output buffer, oldest first.
    pub queue: Vec<u8>,
}

impl KeyboardState {
    fn reset() -> Self {
        Self {
            scanning: true,
            leds: 0,
            scancode_set: 2,
            typematic: 0x2b,
            awaiting: None,
            queue: Vec::new(),
        }
    }
}

/// Saved state of the i8042.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller configuration byte.
    pub ctr: u8,
    /// The output port.
    pub output_port: u8,
    /// The output buffer (OBF while it holds a byte).
    pub output: Option<u8>,
    /// What port 0x60 reads when the output buffer is empty (the last byte read).
    pub last_output: u8,
    /// The last write went to the command port (status bit 3).
    pub last_write_was_command: bool,
    /// A controller command waiting for its parameter byte on port 0x60.
    pub awaiting: Option<u8>,
    /// A CPU reset requested and not yet taken by the VMM.
    pub reset_requested: bool,
    /// The keyboard.
    pub keyboard: KeyboardState,
}

/// The 8042 and its keyboard. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8042 {
    s: I8042State,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// The controller as a BIOS leaves it: CTR 0x05, output port 0xcf, keyboard reset.
    pub fn new() -> Self {
        Self {
            s: I8042State {
                ctr: CTR_KBDINT | CTR_SYS,
                output_port: 0xcf,
                output: None,
                last_output: 0,
                last_write_was_command: false,
                awaiting: None,
                reset_requested: false,
                keyboard: KeyboardState::reset(),
            },
        }
    }

    /// Whether the guest asked for a CPU reset since the last call (clears the request).
    pub fn take_reset_request(&mut self) -> bool {
        std::mem::take(&mut self.s.reset_requested)
    }

    /// The controller configuration byte.
    pub fn ctr(&self) -> u8 {
        self.s.ctr
    }

    /// The keyboard's state.
    pub fn keyboard(&self) -> &KeyboardState {
        &self.s.keyboard
    }

    /// Level of IRQ 1.
    pub fn irq_level(&self) -> bool {
        self.s.output.is_some() && self.s.ctr & CTR_KBDINT != 0
    }

    /// Guest read of the status register (port 0x64).
    pub fn read_status(&self) -> u8 {
        let mut v = STR_UNLOCKED;
        if self.s.output.is_some() {
            v |= STR_OBF;
        }
        if self.s.ctr & CTR_SYS != 0 {
            v |= STR_SYS;
        }
        if self.s.last_write_was_command {
            v |= STR_CMD;
        }
        v
    }

    /// Guest read of the data port (port 0x60): the output buffer, which then takes the
    /// keyboard's next byte if it has one.
    pub fn read_data(&mut self) -> u8 {
        if let Some(v) = self.s.output.take() {
            self.s.last_output = v;
            self.refill();
        }
        self.s.last_output
    }

    /// Move the keyboard's next byte into the empty output buffer, if its interface is on.
    fn refill(&mut self) {
        if self.s.output.is_none()
            && self.s.ctr & CTR_KBDDIS == 0
            && !self.s.keyboard.queue.is_empty()
        {
            self.s.output = Some(self.s.keyboard.queue.remove(0));
        }
    }

    /// A byte from the controller itself into the output buffer (replacing what is there).
    fn respond(&mut self, v: u8) {
        self.s.output = Some(v);
    }

    fn kbd_send(&mut self, bytes: &[u8]) {
        let q = &mut self.s.keyboard.queue;
        for &b in bytes {
            // An overrun keyboard drops what does not fit.
            if q.len() < KBD_QUEUE_LEN {
                q.push(b);
            }
        }
        self.refill();
    }

    fn reset_line(&mut self) {
        self.s.reset_requested = true;
    }

    /// Guest write of a command (port 0x64).
    pub fn write_command(&mut self, cmd: u8) {
        self.s.last_write_was_command = true;
        self.s.awaiting = None;
        match cmd {
            CMD_READ_CTR => self.respond(self.s.ctr),
            0x21..=0x3f => self.respond(0),
            CMD_WRITE_CTR..=0x7f | CMD_WRITE_OUTPUT | CMD_WRITE_KBD_BUF | CMD_WRITE_AUX_BUF
            | CMD_WRITE_AUX => self.s.awaiting = Some(cmd),
            CMD_AUX_DISABLE => self.s.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.s.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.respond(AUX_TEST_NO_PORT),
            CMD_SELF_TEST => {
                self.s.ctr |= CTR_SYS;
                self.respond(0x55);
            }
            CMD_KBD_TEST => self.respond(0x00),
            CMD_KBD_DISABLE => self.s.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => {
                self.s.ctr &= !CTR_KBDDIS;
                self.refill();
            }
            CMD_READ_OUTPUT => {
                let obf = if self.s.output.is_some() {
                    OUT_KBD_OBF
                } else {
                    0
                };
                self.respond((self.s.output_port & !0x30) | obf);
            }
            // Pulse the output-port bits whose command bit is 0; bit 0 is the reset line.
            0xf0..=0xff if cmd & OUT_RESET == 0 => self.reset_line(),
            _ => {}
        }
    }

    /// Guest write of a data byte (port 0x60): a pending command's parameter, or a byte for
    /// the keyboard.
    pub fn write_data(&mut self, v: u8) {
        self.s.last_write_was_command = false;
        match self.s.awaiting.take() {
            Some(CMD_WRITE_CTR) => {
                self.s.ctr = v;
                self.refill();
            }
            Some(CMD_WRITE_OUTPUT) => {
                self.s.output_port = v;
                if v & OUT_RESET == 0 {
                    self.reset_line();
                }
            }
            // No aux channel: the loopback answers on the keyboard channel (see the docs).
            Some(CMD_WRITE_KBD_BUF | CMD_WRITE_AUX_BUF) => self.respond(v),
            Some(_) => {} // RAM bytes, the absent aux device
            None => {
                // Sending to the keyboard enables its interface.
                self.s.ctr &= !CTR_KBDDIS;
                self.keyboard_write(v);
            }
        }
    }

    fn keyboard_write(&mut self, v: u8) {
        let translated = self.s.ctr & CTR_XLATE != 0;
        let kbd = &mut self.s.keyboard;
        if let Some(cmd) = kbd.awaiting.take() {
            let reply: &[u8] = match cmd {
                0xed => {
                    kbd.leds = v & 0x07;
                    &[KBD_ACK]
                }
                0xf0 if v == 0 => {
                    let set = match (translated, kbd.scancode_set) {
                        (false, s) => s,
                        (true, 1) => 0x43,
                        (true, 3) => 0x3f,
                        (true, _) => 0x41,
                    };
                    return self.kbd_send(&[KBD_ACK, set]);
                }
                0xf0 => {
                    if (1..=3).contains(&v) {
                        kbd.scancode_set = v;
                    }
                    &[KBD_ACK]
                }
                _ => {
                    kbd.typematic = v & 0x7f;
                    &[KBD_ACK]
                }
            };
            return self.kbd_send(reply);
        }
        let reply: &[u8] = match v {
            0xed | 0xf0 | 0xf3 => {
                kbd.awaiting = Some(v);
                &[KBD_ACK]
            }
            0xee => &[0xee],
            0xf2 => {
                if translated {
                    &[KBD_ACK, 0xab, 0x41]
                } else {
                    &[KBD_ACK, 0xab, 0x83]
                }
            }
            0xf4 => {
                kbd.scanning = true;
                &[KBD_ACK]
            }
            0xf5 | 0xf6 => {
                kbd.scanning = v == 0xf6;
                kbd.typematic = 0x2b;
                &[KBD_ACK]
            }
            0xf7..=0xfe => &[KBD_ACK],
            0xff => {
                let queue = std::mem::take(&mut kbd.queue);
                *kbd = KeyboardState {
                    queue,
                    ..KeyboardState::reset()
                };
                &[KBD_ACK, KBD_BAT_OK]
            }
            _ => &[KBD_RESEND],
        };
        self.kbd_send(reply);
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type Error = I8042Error;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> I8042State {
        self.s.clone()
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), I8042Error> {
        if state.keyboard.queue.len() > KBD_QUEUE_LEN {
            return Err(I8042Error::InvalidState(format!(
                "the keyboard holds {} bytes, it buffers at most {KBD_QUEUE_LEN}",
                state.keyboard.queue.len()
            )));
        }
        self.s = state.clone();
        Ok(())
    }
}

/// The i8042 on the platform: ports 0x60 and 0x64 (byte-wide), IRQ 1.
impl Device for I8042 {
    fn id(&self) -> &str {
        I8042_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![
            PortRegion::bytewise(I8042_DATA_PORT, 1),
            PortRegion::bytewise(I8042_COMMAND_PORT, 1),
        ]
    }

    fn hooks(&self) -> Hooks {
        // IRQ 1 moves only on its own accesses: no clock.
        Hooks::REQUESTS
    }

    fn io_read(
        &mut self,
        base: u16,
        _offset: u16,
        data: &mut [u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        let v = if base == I8042_DATA_PORT {
            let v = self.read_data();
            // The buffer emptied: a byte that refilled it is a new edge.
            cx.set_irq(I8042_KBD_IRQ, false);
            v
        } else {
            self.read_status()
        };
        data.fill(v);
        cx.set_irq(I8042_KBD_IRQ, self.irq_level());
        Access::Handled
    }

    fn io_write(
        &mut self,
        base: u16,
        _offset: u16,
        data: &[u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        if let Some(&v) = data.first() {
            if base == I8042_DATA_PORT {
                self.write_data(v);
            } else {
                self.write_command(v);
            }
        }
        cx.set_irq(I8042_KBD_IRQ, self.irq_level());
        Access::Handled
    }

    fn take_reset_request(&mut self) -> bool {
        I8042::take_reset_request(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::IrqSink;

    #[derive(Default)]
    struct Line {
        level: bool,
        edges: u32,
    }
    impl IrqSink for Line {
        fn set_level(&mut self, irq: u8, level: bool) {
            assert_eq!(irq, I8042_KBD_IRQ);
            if level && !self.level {
                self.edges += 1;
            }
            self.level = level;
        }
    }

    struct Bench {
        kbc: I8042,
        line: Line,
    }

    impl Bench {
        fn new() -> Self {
            Self {
                kbc: I8042::new(),
                line: Line::default(),
            }
        }
        fn inb(&mut self, port: u16) -> u8 {
            let mut b = [0u8];
            let mut cx = DeviceContext::new(0, &mut self.line);
            self.kbc.io_read(port, 0, &mut b, &mut cx);
            b[0]
        }
        fn outb(&mut self, port: u16, v: u8) {
            let mut cx = DeviceContext::new(0, &mut self.line);
            self.kbc.io_write(port, 0, &[v], &mut cx);
        }
        /// Linux's `__i8042_command`: wait for IBF clear, command, parameters, then wait
        /// for OBF for each result (the aux loop also requires AUXDATA). `None` where Linux
        /// would time out or give up.
        fn command(&mut self, cmd: u8, params: &[u8], results: usize) -> Option<Vec<u8>> {
            assert_eq!(self.inb(0x64) & 0x02, 0, "input buffer never full");
            self.outb(0x64, cmd);
            for &p in params {
                self.outb(0x60, p);
            }
            let mut out = Vec::new();
            for _ in 0..results {
                let status = self.inb(0x64);
                if status & STR_OBF == 0 {
                    return None; // would spin 0.5 s and time out
                }
                if cmd == CMD_WRITE_AUX_BUF && status & 0x20 == 0 {
                    return None; // "auxerr": the byte is left in the buffer
                }
                out.push(self.inb(0x60));
            }
            Some(out)
        }
        /// i8042_flush: read while OBF, at most 16 bytes.
        fn flush(&mut self) -> usize {
            let mut n = 0;
            while self.inb(0x64) & STR_OBF != 0 {
                self.inb(0x60);
                n += 1;
                assert!(n <= 16, "i8042_flush would report no controller");
            }
            n
        }
        /// libps2 `ps2_command` to the keyboard: write the byte, then take one byte per
        /// interrupt (i8042_interrupt reads status, then data).
        fn kbd_command(&mut self, bytes: &[u8], replies: usize) -> Vec<u8> {
            let mut got = Vec::new();
            for &b in bytes {
                let edges = self.line.edges;
                self.outb(0x60, b);
                assert!(self.line.edges > edges, "IRQ 1 for the answer to {b:#x}");
                got.push(self.interrupt());
            }
            for _ in 0..replies {
                got.push(self.interrupt());
            }
            got
        }
        /// i8042_interrupt: one byte per IRQ 1.
        fn interrupt(&mut self) -> u8 {
            assert!(self.line.level, "IRQ 1 asserted");
            let str = self.inb(0x64);
            assert_eq!(str & (STR_OBF | 0x20), STR_OBF, "keyboard data");
            self.inb(0x60)
        }
    }

    /// The Linux 6.1 probe: controller check, self-test, init, aux check, keyboard setup,
    /// then atkbd's probe and set-up. Every answer is what the driver accepts, no step
    /// waits for a timeout, and nothing Linux reports as an error or warning happens.
    #[test]
    fn linux_probe_sequence() {
        let mut b = Bench::new();
        // i8042_controller_check: nothing to flush.
        assert_eq!(b.flush(), 0);
        // i8042_controller_selftest (i8042.reset): 0xaa -> 0x55.
        assert_eq!(b.command(CMD_SELF_TEST, &[], 1), Some(vec![0x55]));
        // i8042_controller_init: a stable CTR read, no key lock, then the CTR write.
        let ctr = b.command(CMD_READ_CTR, &[], 1).unwrap()[0];
        assert_eq!(b.command(CMD_READ_CTR, &[], 1).unwrap()[0], ctr);
        assert_eq!(ctr, 0x05);
        assert_ne!(b.inb(0x64) & STR_UNLOCKED, 0, "no 'Keylock active' warning");
        assert_ne!(b.inb(0x64) & STR_SYS, 0);
        let mut ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        assert_eq!(ctr & CTR_XLATE, 0, "untranslated: i8042_direct");
        assert_eq!(b.command(CMD_WRITE_CTR, &[ctr], 0), Some(vec![]));
        b.flush();
        // i8042_check_aux: the loop fails at once, the aux test reports a stuck line.
        b.flush();
        assert_eq!(b.command(CMD_WRITE_AUX_BUF, &[0x5a], 1), None, "auxerr, no wait");
        let test = b.command(CMD_AUX_TEST, &[], 1).unwrap()[0];
        assert!(test != 0 && test != 0xfa && test != 0xff, "aux absent: {test:#x}");
        assert_eq!(b.flush(), 0);
        // i8042_setup_kbd / i8042_enable_kbd_port.
        ctr = (ctr & !CTR_KBDDIS) | CTR_KBDINT;
        assert_eq!(b.command(CMD_WRITE_CTR, &[ctr], 0), Some(vec![]));
        let edges = b.line.edges;
        assert_eq!(b.command(CMD_READ_CTR, &[], 1), Some(vec![ctr]));
        assert_eq!(b.line.edges, edges + 1, "controller answers interrupt too");
        assert!(!b.line.level, "and reading them lowers IRQ 1");
        // atkbd_probe: GETID, deactivate; then LEDs, typematic, activate.
        assert_eq!(b.kbd_command(&[0xf2], 2), [0xfa, 0xab, 0x83]);
        assert_eq!(b.kbd_command(&[0xf5], 0), [0xfa]);
        assert!(!b.kbc.keyboard().scanning);
        assert_eq!(b.kbd_command(&[0xed, 0x02], 0), [0xfa, 0xfa]);
        assert_eq!(b.kbd_command(&[0xf3, 0x20], 0), [0xfa, 0xfa]);
        assert_eq!(b.kbd_command(&[0xf4], 0), [0xfa]);
        let k = b.kbc.keyboard();
        assert_eq!((k.scanning, k.leds, k.typematic), (true, 0x02, 0x20));
        assert!(!b.line.level);
        assert!(!b.kbc.take_reset_request());
    }

    #[test]
    fn keyboard_commands() {
        let mut b = Bench::new();
        assert_eq!(b.kbd_command(&[0xff], 1), [0xfa, 0xaa], "reset: ack, BAT passed");
        assert_eq!(b.kbd_command(&[0xf0, 0x00], 1), [0xfa, 0xfa, 2]);
        assert_eq!(b.kbd_command(&[0xf0, 0x03], 0), [0xfa, 0xfa]);
        assert_eq!(b.kbc.keyboard().scancode_set, 3);
        assert_eq!(b.kbd_command(&[0xee], 0), [0xee]);
        assert_eq!(b.kbd_command(&[0x12], 0), [0xfe], "unknown: resend");
        // Translation on: identify and the set query come back translated.
        b.outb(0x64, CMD_WRITE_CTR);
        b.outb(0x60, 0x45);
        assert_eq!(b.kbd_command(&[0xf2], 2), [0xfa, 0xab, 0x41]);
        assert_eq!(b.kbd_command(&[0xf0, 0x00], 1), [0xfa, 0xfa, 0x3f]);
        // Port disabled: the keyboard's bytes wait, then come one per interrupt.
        b.outb(0x64, CMD_KBD_DISABLE);
        b.kbc.keyboard_write(0xf2);
        assert_eq!(b.inb(0x64) & STR_OBF, 0);
        b.outb(0x64, CMD_KBD_ENABLE);
        assert_eq!(b.interrupt(), 0xfa);
        assert_eq!(b.interrupt(), 0xab);
        assert_eq!(b.interrupt(), 0x41);
        // Interrupt disabled in the CTR: the data is there, the line is low.
        b.outb(0x64, CMD_WRITE_CTR);
        b.outb(0x60, 0x44);
        b.outb(0x60, 0xf4);
        assert!(!b.line.level);
        assert_eq!(b.inb(0x64) & STR_OBF, STR_OBF);
        assert_eq!(b.inb(0x60), 0xfa);
        assert_eq!(b.inb(0x60), 0xfa, "an empty buffer reads the last byte");
        // An overrun keyboard drops what does not fit.
        for _ in 0..40 {
            b.kbc.keyboard_write(0xee);
        }
        assert_eq!(b.kbc.keyboard().queue.len(), KBD_QUEUE_LEN);
    }

    #[test]
    fn controller_commands() {
        let mut b = Bench::new();
        assert_eq!(b.command(CMD_KBD_TEST, &[], 1), Some(vec![0x00]));
        assert_eq!(b.command(0x3f, &[], 1), Some(vec![0x00]), "controller RAM");
        b.command(CMD_AUX_DISABLE, &[], 0);
        assert_eq!(b.kbc.ctr() & CTR_AUXDIS, CTR_AUXDIS);
        b.command(CMD_AUX_ENABLE, &[], 0);
        assert_eq!(b.kbc.ctr() & CTR_AUXDIS, 0);
        assert_ne!(b.inb(0x64) & STR_CMD, 0, "last write was a command");
        b.command(CMD_WRITE_KBD_BUF, &[0x9c], 0);
        assert_eq!(b.inb(0x64) & STR_CMD, 0);
        assert_eq!(b.interrupt(), 0x9c, "0xd2: as if from the keyboard");
        b.command(CMD_WRITE_AUX, &[0xff], 0);
        assert_eq!(b.inb(0x64) & STR_OBF, 0, "no aux device answers");
        assert_eq!(b.kbc.keyboard().queue.len(), 0, "nor does the keyboard see it");
        // Output port: read back with the OBF bit.
        b.command(CMD_WRITE_OUTPUT, &[0xdf], 0);
        assert!(!b.kbc.take_reset_request(), "bit 0 set: no reset");
        assert_eq!(b.command(CMD_READ_OUTPUT, &[], 1), Some(vec![0xcf]));
        // Unknown commands are ignored; a command cancels a pending parameter.
        b.outb(0x64, 0xc8);
        assert_eq!(b.inb(0x64) & STR_OBF, 0);
        b.outb(0x64, CMD_WRITE_CTR);
        b.outb(0x64, CMD_KBD_TEST);
        assert_eq!(b.inb(0x60), 0x00);
        b.outb(0x60, 0x00);
        assert_eq!(b.kbc.ctr(), 0x05, "the CTR write was cancelled");
    }

    #[test]
    fn reset_line_requests() {
        let mut b = Bench::new();
        b.outb(0x64, 0xfe);
        assert!(b.kbc.take_reset_request());
        assert!(!b.kbc.take_reset_request(), "taken once");
        b.outb(0x64, 0xff);
        b.outb(0x64, 0xf1);
        assert!(!b.kbc.take_reset_request(), "bit 0 not pulsed");
        b.outb(0x64, 0xf0);
        assert!(b.kbc.take_reset_request(), "pulse of bits 3:0");
        b.command(CMD_WRITE_OUTPUT, &[0xfe], 0);
        assert!(b.kbc.take_reset_request(), "output port bit 0 low");
    }

    #[test]
    fn save_restore_mid_command_continues_identically() {
        let mut a = Bench::new();
        a.outb(0x64, CMD_KBD_DISABLE);
        a.kbc.keyboard_write(0xf2);
        a.kbc.keyboard_write(0xed);
        a.outb(0x64, CMD_WRITE_CTR);
        let json = serde_json::to_string(&Persist::save(&a.kbc)).unwrap();
        let mut b = Bench::new();
        Persist::restore(&mut b.kbc, &serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(a.kbc, b.kbc);
        for bench in [&mut a, &mut b] {
            bench.outb(0x60, 0x05); // the CTR parameter: enables the port and IRQ 1
        }
        // The identify answer, the LED command's ack, then the LED parameter's ack.
        let run = |bench: &mut Bench| {
            let mut got: Vec<u8> = (0..4).map(|_| bench.interrupt()).collect();
            got.extend(bench.kbd_command(&[0x07], 0));
            got.push(bench.inb(0x64));
            got.push(bench.kbc.keyboard().leds);
            got
        };
        let expected = [0xfa, 0xab, 0x83, 0xfa, 0xfa, 0x14, 0x07];
        assert_eq!(run(&mut a), expected);
        assert_eq!(run(&mut b), expected);
        assert_eq!(a.kbc, b.kbc);
        let mut st = Persist::save(&a.kbc);
        st.keyboard.queue = vec![0; 17];
        assert!(Persist::restore(&mut b.kbc, &st).is_err());
    }
}
