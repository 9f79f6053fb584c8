//! Shared harness for the migration scenario tests: a receiver thread on a real loopback
//! socket, an optional fault-injecting proxy between sender and receiver, and the
//! "nothing lost" check.

#![allow(dead_code)]

use esvm_migration::mock::{MockGuest, MockSource, MockTarget};
use esvm_migration::protocol::{FrameType, HEADER_LEN};
use esvm_migration::{
    ReceiveError, ReceiveOutcome, Receiver, ReceiverConfig, ReceiverState, SendError, SendOutcome,
    Sender, SenderConfig, PAGE_SIZE,
};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// What the proxy does to the source -> destination byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Sender connects straight to the receiver.
    Direct,
    /// Forward everything.
    None,
    /// Forward this many bytes, then cut both directions.
    CutAfter(u64),
    /// Flip one bit of the byte at this offset.
    Flip(u64),
    /// Forward everything except the destination's `Committed` frame (the commit
    /// acknowledgement is lost).
    SwallowCommitted,
}

pub struct Run {
    pub send: Result<SendOutcome, SendError>,
    pub recv: Result<ReceiveOutcome, ReceiveError>,
    pub target: MockTarget,
    pub state: ReceiverState,
    /// Source -> destination bytes the proxy forwarded, and (if recorded) the bytes.
    pub forwarded: u64,
    pub stream: Vec<u8>,
}

pub fn sender_config() -> SenderConfig {
    SenderConfig {
        io_timeout: Duration::from_secs(20),
        poll_interval: Duration::from_millis(5),
        ..SenderConfig::default()
    }
}

pub fn receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        io_timeout: Duration::from_secs(20),
        drain_timeout: Duration::from_secs(5),
        ..ReceiverConfig::default()
    }
}

/// A guest of `pages` random pages and its source.
pub fn guest(pages: u64, vcpus: u32, seed: u64) -> (Arc<MockGuest>, MockSource) {
    let g = MockGuest::new(pages);
    g.fill_random(seed);
    let s = MockSource::new(Arc::clone(&g), vcpus).expect("one source per guest");
    (g, s)
}

/// Migrate `source` into `target` over loopback TCP, through the proxy unless `Direct`.
pub fn migrate_with(
    source: &mut MockSource,
    target: Option<MockTarget>,
    sender: &mut Sender,
    fault: Fault,
    record: bool,
) -> Run {
    let target = target.unwrap_or_else(|| MockTarget::new(source.matching_target_config()));
    let dest = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    let dest_addr = dest.local_addr().expect("receiver address");
    let recv_thread = thread::spawn(move || {
        let mut target = target;
        let (stream, _) = dest.accept().expect("accept");
        let mut rx = Receiver::new(receiver_config());
        let r = rx.run_tcp(&mut target, stream);
        (r, target, rx.state())
    });
    let (connect_to, proxy) = if fault == Fault::Direct {
        (dest_addr, None)
    } else {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let a = l.local_addr().expect("proxy address");
        (
            a,
            Some(thread::spawn(move || proxy(l, dest_addr, fault, record))),
        )
    };
    let stream = TcpStream::connect(connect_to).expect("connect");
    let send = sender.run_tcp(source, stream);
    let (recv, target, state) = recv_thread.join().expect("receiver thread");
    let (forwarded, stream) = match proxy {
        Some(p) => p.join().expect("proxy thread"),
        None => (0, Vec::new()),
    };
    Run {
        send,
        recv,
        target,
        state,
        forwarded,
        stream,
    }
}

pub fn migrate(
    source: &mut MockSource,
    target: Option<MockTarget>,
    cfg: SenderConfig,
    fault: Fault,
) -> Run {
    let mut sender = Sender::new(cfg);
    migrate_with(source, target, &mut sender, fault, false)
}

fn proxy(l: TcpListener, dest: SocketAddr, fault: Fault, record: bool) -> (u64, Vec<u8>) {
    let (client, _) = l.accept().expect("proxy accept");
    let server = TcpStream::connect(dest).expect("proxy connect");
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut c_back, mut s_back) = (
        client.try_clone().expect("clone"),
        server.try_clone().expect("clone"),
    );
    let back = thread::spawn(move || {
        if fault == Fault::SwallowCommitted {
            forward_frames_except_committed(&mut s_back, &mut c_back);
        } else {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s_back.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if c_back.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        let _ = c_back.shutdown(Shutdown::Write);
    });
    let (mut client, mut server) = (client, server);
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    let mut rec = Vec::new();
    let cut = |c: &TcpStream, s: &TcpStream| {
        let _ = c.shutdown(Shutdown::Both);
        let _ = s.shutdown(Shutdown::Both);
    };
    loop {
        let mut max = buf.len();
        if let Fault::CutAfter(n) = fault {
            if total >= n {
                cut(&client, &server);
                break;
            }
            max = max.min((n - total) as usize);
        }
        let k = match client.read(&mut buf[..max]) {
            Ok(0) | Err(_) => {
                let _ = server.shutdown(Shutdown::Write);
                break;
            }
            Ok(k) => k,
        };
        if let Fault::Flip(off) = fault {
            if off >= total && off < total + k as u64 {
                buf[(off - total) as usize] ^= 0x10;
            }
        }
        if server.write_all(&buf[..k]).is_err() {
            cut(&client, &server);
            break;
        }
        if record {
            rec.extend_from_slice(&buf[..k]);
        }
        total += k as u64;
    }
    let _ = back.join();
    (total, rec)
}

fn forward_frames_except_committed(from: &mut TcpStream, to: &mut TcpStream) {
    let mut header = [0u8; HEADER_LEN];
    while from.read_exact(&mut header).is_ok() {
        let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        let frame_type = u16::from_le_bytes([header[6], header[7]]);
        if frame_type == FrameType::Committed as u16 {
            continue;
        }
        if to.write_all(&header).is_err() || to.write_all(&payload).is_err() {
            break;
        }
    }
}

/// Offsets where frames start in a recorded source -> destination stream.
pub fn frame_starts(stream: &[u8]) -> Vec<u64> {
    let mut v = Vec::new();
    let mut off = 0usize;
    while off + HEADER_LEN <= stream.len() {
        v.push(off as u64);
        let len = u32::from_le_bytes(stream[off + 12..off + 16].try_into().expect("4 bytes"));
        off += HEADER_LEN + len as usize;
    }
    v
}

/// After a failed migration: every page written since dirty logging started whose content
/// the destination does not hold must be back in the source's dirty log.
pub fn assert_nothing_lost(source: &MockSource, target_mem: &[u8]) {
    let g = source.guest();
    let mem = g.snapshot();
    let log = g.peek_dirty_log();
    let ps = PAGE_SIZE as usize;
    for p in g.written_since_log_start().iter() {
        let r = p as usize * ps..(p as usize + 1) * ps;
        if mem[r.clone()] != target_mem[r] {
            assert!(
                log.is_set(p),
                "page {p} was written during the migration, the destination lacks it, and it \
                 is not in the source's dirty log: lost"
            );
        }
    }
}

/// Assert a complete, byte-identical migration.
pub fn assert_migrated(run: &Run, source: &MockSource) {
    let out = run.send.as_ref().expect("migration succeeds");
    let rx = run.recv.as_ref().expect("receiver succeeds");
    assert!(rx.commit_ack_sent);
    assert_eq!(run.state, ReceiverState::Committed);
    assert!(run.target.committed && !run.target.aborted);
    assert!(source.dead, "source marked dead after the commit");
    assert!(source.is_paused(), "a dead source stays stopped");
    assert!(
        run.target.memory() == source.guest().snapshot().as_slice(),
        "destination memory differs from the source"
    );
    assert_eq!(
        run.target.device_state.as_deref(),
        Some(source.device_state.as_slice())
    );
    for (v, st) in source.vcpu_states.iter().enumerate() {
        assert_eq!(run.target.vcpu_states[v].as_deref(), Some(st.as_slice()));
    }
    assert_eq!(rx.passes, out.passes);
    let last = run.target.passes.last().copied();
    assert_eq!(last, Some((out.passes, true)), "last pass is the final one");
}
