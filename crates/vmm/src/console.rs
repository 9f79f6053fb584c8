//! The host end of the guest's serial console: esvm's stdin feeds COM1's receiver.
//!
//! A reader thread takes stdin in chunks and hands them to the run loop through a channel;
//! the run loop moves them into the UART's receive FIFO as it has room
//! ([`ConsoleInput::pump`]), so input is never lost to a full FIFO. When stdin is a terminal
//! it is put in raw mode while the guest runs (keys go to the guest unprocessed, Ctrl-C
//! included) and restored when the [`RawTerminal`] guard drops, and an escape sequence like
//! QEMU's reaches esvm itself: Ctrl-A x quits, Ctrl-A h prints help, Ctrl-A Ctrl-A sends one
//! Ctrl-A. With stdin a pipe or /dev/null the bytes go through untouched (no escape) and the
//! end of the input is remembered, so a halted guest is not waited on for input that cannot
//! come.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The escape key (Ctrl-A), as in QEMU.
pub const ESCAPE: u8 = 0x01;

/// Help printed for Ctrl-A h.
pub const ESCAPE_HELP: &str = "\r\nesvm console: C-a x  quit (stop the VM)\r\n              C-a h  this help\r\n              C-a C-a  send C-a to the guest\r\n";

/// What the reader thread passes on.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Bytes for the guest.
    Data(Vec<u8>),
    /// The user asked to quit (Ctrl-A x).
    Quit,
    /// Stdin ended (or failed): no more input will come.
    Eof,
}

/// Splits terminal input into guest bytes and escape commands.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_escape: bool,
}

impl EscapeParser {
    /// Feed `input`; returns the events it makes, in order. Ctrl-A h prints the help on
    /// stderr at once.
    pub fn feed(&mut self, input: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        let mut data = Vec::new();
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => {
                        if !data.is_empty() {
                            events.push(ConsoleEvent::Data(std::mem::take(&mut data)));
                        }
                        events.push(ConsoleEvent::Quit);
                        return events;
                    }
                    ESCAPE => data.push(ESCAPE),
                    b'h' | b'H' | b'?' => eprint!("{ESCAPE_HELP}"),
                    // Anything else after the escape is dropped, as QEMU does.
                    _ => {}
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                data.push(b);
            }
        }
        if !data.is_empty() {
            events.push(ConsoleEvent::Data(data));
        }
        events
    }
}

/// The run loop's end of the console.
#[derive(Debug)]
pub struct ConsoleInput {
    rx: Receiver<ConsoleEvent>,
    /// Bytes received but not yet taken by the UART.
    pending: VecDeque<u8>,
    eof: bool,
    quit: bool,
}

impl ConsoleInput {
    /// A console fed by `rx` (and a sender for tests or other sources).
    pub fn channel() -> (Sender<ConsoleEvent>, ConsoleInput) {
        let (tx, rx) = mpsc::channel();
        (
            tx,
            ConsoleInput {
                rx,
                pending: VecDeque::new(),
                eof: false,
                quit: false,
            },
        )
    }

    /// Read this process's stdin on a thread. Escape sequences are honoured only when
    /// `escapes` is set (stdin is a terminal).
    pub fn stdin(escapes: bool) -> ConsoleInput {
        let (tx, input) = Self::channel();
        let spawned = std::thread::Builder::new()
            .name("esvm-stdin".into())
            .spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut parser = EscapeParser::default();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match stdin.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(ConsoleEvent::Eof);
                            return;
                        }
                        Ok(n) => n,
                    };
                    let events = if escapes {
                        parser.feed(&buf[..n])
                    } else {
                        vec![ConsoleEvent::Data(buf[..n].to_vec())]
                    };
                    for e in events {
                        let quit = e == ConsoleEvent::Quit;
                        if tx.send(e).is_err() || quit {
                            return;
                        }
                    }
                }
            });
        if spawned.is_err() {
            // No thread, no input: the guest runs without a keyboard.
            return ConsoleInput {
                eof: true,
                ..Self::channel().1
            };
        }
        input
    }

    fn absorb(&mut self, e: ConsoleEvent) {
        match e {
            ConsoleEvent::Data(d) => self.pending.extend(d),
            ConsoleEvent::Quit => self.quit = true,
            ConsoleEvent::Eof => self.eof = true,
        }
    }

    /// Take what arrived (without waiting) and offer it to `sink`, which returns how many
    /// bytes it took; the rest waits for the next call.
    pub fn pump(&mut self, sink: impl FnOnce(&[u8]) -> usize) {
        while let Ok(e) = self.rx.try_recv() {
            self.absorb(e);
        }
        if self.pending.is_empty() {
            return;
        }
        let (a, _) = self.pending.as_slices();
        let n = sink(a).min(a.len());
        self.pending.drain(..n);
    }

    /// Wait up to `timeout` for input (or the end of it). Returns whether anything arrived.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        if self.eof || self.quit {
            return false;
        }
        match self.rx.recv_timeout(timeout) {
            Ok(e) => {
                self.absorb(e);
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                false
            }
        }
    }

    /// Whether more input may still come (stdin not at its end).
    pub fn open(&self) -> bool {
        !self.eof && !self.quit
    }

    /// Whether bytes wait for room in the UART.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the user asked to quit.
    pub fn quit_requested(&self) -> bool {
        self.quit
    }
}

/// Raw mode on a terminal stdin for as long as this lives.
pub struct RawTerminal {
    saved: libc::termios,
}

/// The attributes of the terminal while a [`RawTerminal`] lives, for [`restore_terminal`].
static SAVED_TERMINAL: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Put the terminal back as a [`RawTerminal`] found it, if one lives: for a process that
/// exits at once (a second stop signal) without dropping its guard.
pub fn restore_terminal() {
    let saved = SAVED_TERMINAL
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(t) = saved.as_ref() {
        // SAFETY: restores attributes read by tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

impl RawTerminal {
    /// Put stdin in raw mode if it is a terminal; None when it is not (or on failure).
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor and we
        // check its result before using the value.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: see above; `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing: the guest's console output stays readable even if it
        // writes bare LFs before its tty driver is up.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: a valid descriptor and a fully initialised termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        *SAVED_TERMINAL
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(saved);
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        *SAVED_TERMINAL
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        // SAFETY: restores the attributes read in `enter` on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"ls\r"), vec![ConsoleEvent::Data(b"ls\r".to_vec())]);
        // Ctrl-A Ctrl-A sends one Ctrl-A; an unknown key after Ctrl-A is dropped.
        assert_eq!(
            p.feed(&[b'a', ESCAPE, ESCAPE, b'b', ESCAPE, b'z', b'c']),
            vec![ConsoleEvent::Data(vec![b'a', ESCAPE, b'b', b'c'])]
        );
        // The escape may be split across reads.
        assert_eq!(
            p.feed(&[b'q', ESCAPE]),
            vec![ConsoleEvent::Data(b"q".to_vec())]
        );
        assert_eq!(p.feed(b"x-ignored"), vec![ConsoleEvent::Quit]);
    }

    #[test]
    fn pump_keeps_what_does_not_fit() {
        let (tx, mut c) = ConsoleInput::channel();
        tx.send(ConsoleEvent::Data(b"hello world".to_vec()))
            .unwrap();
        let mut got = Vec::new();
        c.pump(|b| {
            got.extend_from_slice(&b[..4]);
            4
        });
        assert!(c.has_pending());
        c.pump(|b| {
            got.extend_from_slice(b);
            b.len()
        });
        assert_eq!(got, b"hello world");
        assert!(!c.has_pending());
        assert!(c.open());
        tx.send(ConsoleEvent::Eof).unwrap();
        c.pump(|_| 0);
        assert!(!c.open());
        assert!(!c.wait(Duration::from_millis(1)));
    }

    #[test]
    fn wait_sees_input_and_disconnects() {
        let (tx, mut c) = ConsoleInput::channel();
        assert!(!c.wait(Duration::from_millis(1)));
        tx.send(ConsoleEvent::Data(vec![1])).unwrap();
        assert!(c.wait(Duration::from_millis(100)));
        drop(tx);
        assert!(!c.wait(Duration::from_millis(100)));
        assert!(!c.open());
    }
}
