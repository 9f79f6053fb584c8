//! A migration-stream proxy for the failure tests: cuts, stalls and byte flips at chosen
//! points of the source -> destination stream.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A TCP proxy for one migration at a time. The source → destination stream is parsed
/// frame by frame (32-byte headers: type at byte 6, payload length at byte 12) as it is
/// forwarded, so that it can be cut at a byte offset — never after the last byte of the
/// `Complete` frame, so the destination cannot commit — or have one byte flipped, at a
/// stream offset or inside a chosen frame.
pub struct Proxy {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    /// Source → destination bytes forwarded in the last connection, and the offset where
    /// its `Complete` frame ends (0 if none was seen).
    seen: Arc<Mutex<(u64, u64)>>,
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Pass,
    /// Close both connections after this many source bytes.
    Cut(u64),
    /// From the first frame boundary at or after this offset, forward nothing more (the
    /// source's bytes are read and dropped; the destination waits).
    Stall(u64),
    /// Flip (invert) the source byte at this offset.
    Flip(u64),
    /// Flip the byte `at` bytes into the `nth` (0-based) frame of type `frame`.
    FlipFrame {
        frame: u16,
        nth: u32,
        at: u64,
    },
    /// Flip the byte `at` bytes into the payload of the `nth` frame of type `frame` and
    /// recompute the frame's checksums, as an attacker on the path can: only authentication
    /// (the SEV transport MACs) can catch it.
    ForgeFrame {
        frame: u16,
        nth: u32,
        at: u64,
    },
    /// [`Mode::ForgeFrame`] at byte `at` of the first packet of the first `SevPages` frame
    /// (past its table).
    ForgePacket {
        at: u64,
    },
}

pub const HEADER: usize = 32;
pub const HELLO: u16 = 0x0001;
pub const CONFIG: u16 = 0x0002;
pub const PAGES: u16 = 0x0004;
pub const PASS_END: u16 = 0x0006;
pub const DEVICE_STATE: u16 = 0x0007;
pub const VCPU_STATE: u16 = 0x0008;
pub const COMPLETE: u16 = 0x0009;
pub const SEV_SESSION: u16 = 0x0003;
pub const SEV_PAGES: u16 = 0x0005;

/// Read until `buf` is full or the stream ends; returns the bytes read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

impl Proxy {
    pub fn start(dest_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let seen = Arc::new(Mutex::new((0, 0)));
        let (m, s) = (mode.clone(), seen.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", dest_port)) else {
                    continue;
                };
                let mode = *m.lock().unwrap();
                *s.lock().unwrap() = (0, 0);
                serve(client, server, mode, &s);
            }
        });
        Proxy { port, mode, seen }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn seen(&self) -> (u64, u64) {
        *self.seen.lock().unwrap()
    }
}

/// Forward one connection, both directions, until it ends or is cut.
fn serve(client: TcpStream, server: TcpStream, mode: Mode, seen: &Arc<Mutex<(u64, u64)>>) {
    let (mut c_r, mut s_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (mut s_r, mut c_w) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    let down = std::thread::spawn(move || {
        let mut buf = [0u8; 64 << 10];
        loop {
            match s_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if c_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = c_w.shutdown(Shutdown::Write);
    });
    if pump(&mut c_r, &mut s_w, mode, seen) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    } else {
        let _ = s_w.shutdown(Shutdown::Write);
    }
    let _ = down.join();
}

/// Source → destination, frame by frame. Returns true if it cut the connection.
fn pump(r: &mut TcpStream, w: &mut TcpStream, mode: Mode, seen: &Arc<Mutex<(u64, u64)>>) -> bool {
    let mut counts = std::collections::HashMap::<u16, u32>::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if matches!(mode, Mode::Stall(at) if pos >= at) {
            while read_full(r, &mut buf) > 0 {}
            return false;
        }
        let mut h = [0u8; HEADER];
        let got = read_full(r, &mut h);
        let ty = u16::from_le_bytes([h[6], h[7]]);
        let len = u64::from(u32::from_le_bytes([h[12], h[13], h[14], h[15]]));
        let nth = {
            let c = counts.entry(ty).or_insert(0);
            *c += 1;
            *c - 1
        };
        let start = pos;
        let end = start + HEADER as u64 + len;
        if ty == COMPLETE && got == HEADER {
            seen.lock().unwrap().1 = end;
        }
        let cut_at = match mode {
            Mode::Cut(at) if ty == COMPLETE => Some(at.min(end - 1)),
            Mode::Cut(at) => Some(at),
            _ => None,
        };
        // Forward `data` (stream offsets pos..), flipping and cutting as the mode says.
        let mut forward = |data: &mut [u8], pos: &mut u64| -> Option<bool> {
            for (i, b) in data.iter_mut().enumerate() {
                let p = *pos + i as u64;
                let flip = match mode {
                    Mode::Flip(at) => p == at,
                    Mode::FlipFrame { frame, nth: n, at } => {
                        ty == frame && nth == n && p == start + at
                    }
                    _ => false,
                };
                if flip {
                    *b ^= 0xff;
                }
            }
            let n = data.len() as u64;
            if let Some(c) = cut_at.filter(|c| *c < *pos + n) {
                let keep = c.saturating_sub(*pos) as usize;
                let _ = w.write_all(&data[..keep]);
                return Some(true);
            }
            if w.write_all(data).is_err() {
                return Some(false);
            }
            *pos += n;
            seen.lock().unwrap().0 = *pos;
            None
        };
        let forge = match mode {
            Mode::ForgeFrame { frame, nth: n, at } => (ty == frame && nth == n).then_some(at),
            Mode::ForgePacket { at } => (ty == SEV_PAGES && nth == 0).then_some(at),
            _ => None,
        };
        if let Some(mut at) = forge {
            if got == HEADER && at < len {
                // Take the whole frame, change it and make its checksums match again.
                let mut payload = vec![0u8; len as usize];
                if read_full(r, &mut payload) < payload.len() {
                    return false;
                }
                if matches!(mode, Mode::ForgePacket { .. }) {
                    let entries = u32::from_le_bytes(payload[4..8].try_into().unwrap());
                    at += 8 + 16 * u64::from(entries);
                }
                payload[at.min(len - 1) as usize] ^= 0xff;
                h[24..28].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
                let header_crc = crc32c::crc32c(&h[..28]);
                h[28..32].copy_from_slice(&header_crc.to_le_bytes());
                if let Some(cut) = forward(&mut h[..], &mut pos) {
                    return cut;
                }
                if let Some(cut) = forward(&mut payload[..], &mut pos) {
                    return cut;
                }
                continue;
            }
        }
        if let Some(cut) = forward(&mut h[..got], &mut pos) {
            return cut;
        }
        if got < HEADER {
            return false;
        }
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match r.read(&mut buf[..want]) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if let Some(cut) = forward(&mut buf[..n], &mut pos) {
                return cut;
            }
            left -= n as u64;
        }
    }
}
