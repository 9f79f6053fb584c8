//! The receiver against a hand-driven source over TCP: out-of-order frames, inconsistent
//! streams and oversize lengths. An allocator that records the largest allocation shows that
//! oversize lengths are refused before anything of that size is allocated.

use esvm_migration::mock::MockTarget;
use esvm_migration::protocol::{
    decode_error, encode_config, encode_header_raw, encode_page_table, encode_seq,
    encode_vcpu_prefix, ErrorCode, Frame, FrameType, FrameWriter, Hello, PageRun, PassEnd,
    PollReader, ProtocolError, MAX_DEVICE_STATE_LEN, PROTOCOL_VERSION,
};
use esvm_migration::{
    GuestType, MigrationConfig, ReceiveError, ReceiveOutcome, Receiver, ReceiverConfig,
    ReceiverState, PAGE_SIZE,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

struct Recording;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only records sizes.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Recording = Recording;

/// Tests in this binary run one at a time (the allocation record is global).
static SERIAL: Mutex<()> = Mutex::new(());

const PAGES: u64 = 32;

fn config() -> MigrationConfig {
    MigrationConfig {
        mem_size: PAGES * PAGE_SIZE,
        vcpus: 2,
        vm_type: GuestType::Plain,
        features: 0,
        extra: Vec::new(),
    }
}

type Outcome = (
    Result<ReceiveOutcome, ReceiveError>,
    MockTarget,
    ReceiverState,
);

fn start_receiver() -> (SocketAddr, JoinHandle<Outcome>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let target = MockTarget::new(config());
    let h = std::thread::spawn(move || {
        let mut target = target;
        let (s, _) = l.accept().unwrap();
        let mut rx = Receiver::new(ReceiverConfig {
            io_timeout: Duration::from_secs(20),
            ..ReceiverConfig::default()
        });
        let r = rx.run_tcp(&mut target, s);
        (r, target, rx.state())
    });
    (addr, h)
}

struct Client {
    w: FrameWriter<TcpStream>,
    r: PollReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            r: PollReader::responses(s.try_clone().unwrap()),
            w: FrameWriter::new(s),
        }
    }

    fn send(&mut self, t: FrameType, parts: &[&[u8]]) {
        self.w.send(t, parts).unwrap();
    }

    fn raw(&mut self, bytes: &[u8]) {
        let mut s = self.w.get_ref();
        s.write_all(bytes).unwrap();
    }

    fn recv(&mut self) -> Frame {
        loop {
            match self.r.poll() {
                Ok(Some(f)) => return f,
                Ok(None) => continue,
                Err(e) => panic!("no response: {e}"),
            }
        }
    }

    fn expect(&mut self, t: FrameType) -> Frame {
        let f = self.recv();
        assert_eq!(f.header.frame_type, t, "payload {:?}", f.payload);
        f
    }

    fn handshake(&mut self) {
        self.send(FrameType::Hello, &[&Hello::ours().encode()]);
        self.expect(FrameType::HelloAck);
        self.send(FrameType::Config, &[&encode_config(&config())]);
        self.expect(FrameType::ConfigAck);
    }

    fn page_frame(&mut self, pass: u32, first: u64, count: u32) {
        let mut table = Vec::new();
        encode_page_table(pass, &[PageRun { first, count }], &mut table);
        let data = vec![0xabu8; count as usize * PAGE_SIZE as usize];
        self.send(FrameType::Pages, &[&table, &data]);
    }

    /// Read the receiver's Error frame, hang up, and return the receiver's outcome.
    fn refused(mut self, h: JoinHandle<Outcome>, code: ErrorCode) -> Outcome {
        let f = self.expect(FrameType::Error);
        let (got, msg) = decode_error(&f.payload).unwrap();
        assert_eq!(got, code, "{msg}");
        drop(self);
        let out = h.join().unwrap();
        assert!(out.0.is_err());
        assert!(out.1.aborted && !out.1.committed, "target aborted");
        assert_eq!(out.2, ReceiverState::Aborted);
        out
    }
}

#[test]
fn out_of_order_frames_are_refused() {
    let _l = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    // Config before Hello.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.send(FrameType::Config, &[&encode_config(&config())]);
    let (r, ..) = c.refused(h, ErrorCode::OutOfOrder);
    assert!(matches!(
        r,
        Err(ReceiveError::OutOfOrder {
            frame: FrameType::Config,
            state: ReceiverState::AwaitHello,
            ..
        })
    ));

    // Hello twice.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.send(FrameType::Hello, &[&Hello::ours().encode()]);
    c.expect(FrameType::HelloAck);
    c.send(FrameType::Hello, &[&Hello::ours().encode()]);
    let _ = c.refused(h, ErrorCode::OutOfOrder);

    // Device state while memory is still expected.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    c.page_frame(1, 0, 2);
    c.expect(FrameType::Ack);
    c.send(FrameType::DeviceState, &[b"devices"]);
    let (r, ..) = c.refused(h, ErrorCode::OutOfOrder);
    assert!(matches!(
        r,
        Err(ReceiveError::OutOfOrder {
            frame: FrameType::DeviceState,
            state: ReceiverState::ReceivingMemory,
            ..
        })
    ));

    // Complete before the states.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    let pe = PassEnd {
        pass: 1,
        final_pass: true,
        pages: 0,
    };
    c.send(FrameType::PassEnd, &[&pe.encode()]);
    c.expect(FrameType::Ack);
    c.send(FrameType::DeviceState, &[b"devices"]);
    c.expect(FrameType::Ack);
    c.send(FrameType::VcpuState, &[&encode_vcpu_prefix(0), b"cpu0"]);
    c.expect(FrameType::Ack);
    c.send(FrameType::Complete, &[]);
    let (r, t, _) = c.refused(h, ErrorCode::Protocol);
    assert!(matches!(r, Err(ReceiveError::Invalid(ref m)) if m.contains("vCPU 1")));
    assert!(
        t.device_state.is_none(),
        "aborted target discarded the state"
    );

    // A response type from the source.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.send(FrameType::Ack, &[&encode_seq(0)]);
    let _ = c.refused(h, ErrorCode::OutOfOrder);
}

#[test]
fn inconsistent_streams_are_refused() {
    let _l = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

    // Pages of the wrong pass.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    c.page_frame(2, 0, 1);
    let _ = c.refused(h, ErrorCode::Protocol);

    // A pass end that does not match what arrived.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    c.page_frame(1, 0, 3);
    c.expect(FrameType::Ack);
    let pe = PassEnd {
        pass: 1,
        final_pass: false,
        pages: 4,
    };
    c.send(FrameType::PassEnd, &[&pe.encode()]);
    let _ = c.refused(h, ErrorCode::Protocol);

    // Pages beyond guest memory.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    c.page_frame(1, PAGES - 1, 2);
    let (r, ..) = c.refused(h, ErrorCode::Protocol);
    assert!(
        matches!(
            r,
            Err(ReceiveError::Protocol(ProtocolError::Malformed { .. }))
        ),
        "{r:?}"
    );

    // SEV-ES packets for a plain guest.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    let mut table = Vec::new();
    esvm_migration::protocol::encode_packet_table(
        1,
        &[esvm_migration::protocol::PacketEntry { page: 0, len: 10 }],
        &mut table,
    );
    c.send(FrameType::SevPages, &[&table, &[0u8; 10]]);
    let _ = c.refused(h, ErrorCode::Protocol);

    // Sequence gap.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    let hello = Hello::ours().encode();
    let crc = crc(&hello);
    c.raw(&encode_header_raw(
        PROTOCOL_VERSION,
        FrameType::Hello as u16,
        0,
        16,
        5,
        crc,
    ));
    c.raw(&hello);
    let (r, ..) = c.refused(h, ErrorCode::Protocol);
    assert!(matches!(
        r,
        Err(ReceiveError::Protocol(ProtocolError::Sequence {
            expected: 0,
            got: 5
        }))
    ));

    // Duplicate vCPU state, and an unknown vCPU.
    for vcpus in [[0u32, 0], [1, 7]] {
        let (addr, h) = start_receiver();
        let mut c = Client::connect(addr);
        c.handshake();
        c.send(
            FrameType::PassEnd,
            &[&PassEnd {
                pass: 1,
                final_pass: true,
                pages: 0,
            }
            .encode()],
        );
        c.expect(FrameType::Ack);
        c.send(FrameType::VcpuState, &[&encode_vcpu_prefix(vcpus[0]), b"x"]);
        c.expect(FrameType::Ack);
        c.send(FrameType::VcpuState, &[&encode_vcpu_prefix(vcpus[1]), b"y"]);
        let _ = c.refused(h, ErrorCode::Protocol);
    }

    // A version the destination does not speak.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.raw(&encode_header_raw(
        PROTOCOL_VERSION + 1,
        FrameType::Hello as u16,
        0,
        16,
        0,
        0,
    ));
    let (r, ..) = c.refused(h, ErrorCode::Protocol);
    assert!(matches!(
        r,
        Err(ReceiveError::Protocol(ProtocolError::Version { .. }))
    ));
}

fn crc(b: &[u8]) -> u32 {
    // CRC32C, bitwise (the test does not depend on the crate's implementation).
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Send `prelude` frames, then a raw header claiming `len` bytes; the receiver must refuse
/// it without allocating anything close to `len`.
fn refuse_without_allocating(handshake: bool, t: FrameType, len: u32, code: ErrorCode) {
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    let mut seq = 0;
    if handshake {
        c.handshake();
        seq = 2;
    }
    LARGEST.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    c.raw(&encode_header_raw(
        PROTOCOL_VERSION,
        t as u16,
        0,
        len,
        seq,
        0,
    ));
    let f = c.expect(FrameType::Error);
    ARMED.store(false, Ordering::SeqCst);
    let (got, msg) = decode_error(&f.payload).unwrap();
    assert_eq!(got, code, "{t} of {len} bytes: {msg}");
    drop(c);
    let (r, target, state) = h.join().unwrap();
    assert!(r.is_err() && target.aborted && state == ReceiverState::Aborted);
    let largest = LARGEST.load(Ordering::SeqCst);
    assert!(
        largest < (1 << 20),
        "{t} claiming {len} bytes made the receiver allocate {largest} bytes"
    );
}

#[test]
fn oversize_lengths_are_refused_before_allocation() {
    let _l = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    refuse_without_allocating(false, FrameType::Hello, u32::MAX, ErrorCode::Protocol);
    refuse_without_allocating(false, FrameType::DeviceState, u32::MAX, ErrorCode::Protocol);
    refuse_without_allocating(
        true,
        FrameType::DeviceState,
        MAX_DEVICE_STATE_LEN + 1,
        ErrorCode::Protocol,
    );
    refuse_without_allocating(true, FrameType::Pages, 1 << 31, ErrorCode::Protocol);
    refuse_without_allocating(true, FrameType::SevPages, u32::MAX, ErrorCode::Protocol);
    refuse_without_allocating(true, FrameType::VcpuState, 64 << 20, ErrorCode::Protocol);
    refuse_without_allocating(true, FrameType::Abort, 1 << 20, ErrorCode::Protocol);
    // A length within the type's limit, but in a state that does not admit the type: refused
    // on the header, before the 60 MiB payload is read or allocated.
    refuse_without_allocating(
        false,
        FrameType::DeviceState,
        60 << 20,
        ErrorCode::OutOfOrder,
    );
    refuse_without_allocating(true, FrameType::Config, 1000, ErrorCode::OutOfOrder);

    // A Pages frame whose table claims a million entries.
    let (addr, h) = start_receiver();
    let mut c = Client::connect(addr);
    c.handshake();
    LARGEST.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    let mut prefix = [0u8; 8];
    prefix[0..4].copy_from_slice(&1u32.to_le_bytes());
    prefix[4..8].copy_from_slice(&1_000_000u32.to_le_bytes());
    let len = 8 + 16 + PAGE_SIZE as u32;
    c.raw(&encode_header_raw(
        PROTOCOL_VERSION,
        FrameType::Pages as u16,
        0,
        len,
        2,
        0,
    ));
    c.raw(&prefix);
    let f = c.expect(FrameType::Error);
    ARMED.store(false, Ordering::SeqCst);
    assert!(decode_error(&f.payload)
        .unwrap()
        .1
        .contains("table entries"));
    drop(c);
    let (r, ..) = h.join().unwrap();
    assert!(r.is_err());
    assert!(LARGEST.load(Ordering::SeqCst) < (1 << 20));
}
