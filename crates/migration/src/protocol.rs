//! The migration wire format: fixed 32-byte frame headers followed by a typed payload.
//!
//! ```text
//! offset size field
//!  0     4    magic "EMIG"
//!  4     2    protocol version (1)
//!  6     2    frame type
//!  8     4    flags (none defined in version 1: must be 0)
//! 12     4    payload length in bytes
//! 16     8    sequence number (each direction counts its own frames from 0)
//! 24     4    CRC32C of the payload
//! 28     4    CRC32C of bytes 0..28 of this header
//! ```
//! All integers are little-endian. A reader validates magic, version, header checksum, type,
//! flags and the length against the type's limits ([`FrameType::payload_limits`]) before it
//! allocates or reads any payload byte, and checks that sequence numbers increase by one.
//!
//! Why checksums: TCP's 16-bit checksum lets corrupted segments through at a low but real
//! rate on long transfers, and a flipped byte in a plain guest page would otherwise be applied
//! silently. CRC32C (hardware-accelerated with SSE4.2) detects every error burst up to 32 bits
//! and costs about 0.1 CPU-second per GiB on each side. It is an integrity check, not
//! authentication: an attacker on the path can recompute it. SEV-ES pages and VMSAs are
//! authenticated by the transport MAC inside their packets; plain guests need a trusted
//! network or a secure tunnel.
//!
//! The full protocol (frame payloads, the conversation, the state machine) is documented in
//! `docs/migration-protocol.md`.

use crate::{GuestType, MigrationConfig, PAGE_SIZE};
use std::io::{self, IoSlice, Read, Write};
use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"EMIG";
/// The protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this implementation accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;

/// Most pages one `Pages`/`SevPages` frame may carry.
pub const MAX_PAGES_PER_FRAME: u32 = 1024;
/// Largest SEV-ES transport packet for one page (packet header + ciphertext).
pub const MAX_PACKET_LEN: u32 = 8192;
/// Largest opaque blob: certificate chain, session start blob, Config extra data.
pub const MAX_BLOB_LEN: u32 = 64 * 1024;
/// Largest device/VM state.
pub const MAX_DEVICE_STATE_LEN: u32 = 64 << 20;
/// Largest state of one vCPU.
pub const MAX_VCPU_STATE_LEN: u32 = 1 << 20;
/// Largest finish blob of a `Complete` frame (SEV-ES: the send transcript tag).
pub const MAX_FINISH_LEN: u32 = 256;
/// Largest abort reason or error message.
pub const MAX_TEXT_LEN: u32 = 4096;
/// Most vCPUs a Config may announce.
pub const MAX_VCPUS: u32 = 4096;
/// Largest guest memory a Config may announce (1 TiB).
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// `Pages`/`SevPages` payload prefix: pass u32, entry count u32.
pub const PAGES_PREFIX_LEN: usize = 8;
/// One run (`Pages`) or packet (`SevPages`) table entry.
pub const TABLE_ENTRY_LEN: usize = 16;
/// Fixed part of the `Config` payload.
pub const CONFIG_FIXED_LEN: usize = 32;

/// Page data is copied and checksummed in pieces of this size, so the checksum reads data
/// that is still in the cache.
pub const CRC_CHUNK: usize = 128 << 10;

/// Capability bit: the peer can carry SEV-ES guests (transport packets, session blobs).
pub const CAP_SEV_ES: u64 = 1 << 0;
/// Capability bit: the peer speaks post-copy (`PostcopySwitch`, `PostcopyRun`,
/// `PageRequest`). A source switches to post-copy only if the destination's `HelloAck`
/// carries it, so an older destination (which knows neither the bit nor the frames) is never
/// sent a frame it would refuse; a destination clears it when its VM cannot run with pages
/// missing (the KVM backend).
pub const CAP_POSTCOPY: u64 = 1 << 1;
/// Capabilities this implementation has.
pub const CAPABILITIES: u64 = CAP_SEV_ES | CAP_POSTCOPY;
/// Most pages one `PageRequest` frame may name.
pub const MAX_PAGES_PER_REQUEST: u32 = 1024;
/// Fixed part of the `PostcopySwitch` payload: pass u32, reserved u32, pending count u64.
pub const SWITCH_FIXED_LEN: usize = 16;
/// Largest `PostcopySwitch` payload: the fixed part and a bitmap of [`MAX_MEM_SIZE`].
pub const MAX_SWITCH_LEN: u32 = SWITCH_FIXED_LEN as u32 + (MAX_MEM_SIZE / PAGE_SIZE / 8) as u32;

/// Four magic bytes in hex as they appear on the wire, with their text where printable:
/// `0x454d4947 ("EMIG")`.
pub fn magic_hex(m: &[u8; 4]) -> String {
    let hex: String = m.iter().map(|b| format!("{b:02x}")).collect();
    if m.iter().all(|b| b.is_ascii_graphic()) {
        format!("0x{hex} ({:?})", String::from_utf8_lossy(m))
    } else {
        format!("0x{hex}")
    }
}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error(
        "not an esvm migration stream (magic {}, expected {}); check that the peer is an \
         esvm migration endpoint and nothing else listens on that port",
        magic_hex(.0),
        magic_hex(&MAGIC)
    )]
    BadMagic([u8; 4]),
    #[error(
        "the peer speaks TLS and this end does not: the destination must run `esvm receive` \
         with --tls-cert, --tls-key and --tls-ca when the source migrates with them (or \
         neither uses TLS, on a trusted network only)"
    )]
    PeerSpeaksTls,
    #[error(
        "the peer speaks migration protocol version {got}, this esvm speaks {min}..={max}; \
         run compatible esvm versions on both hosts"
    )]
    Version { got: u16, min: u16, max: u16 },
    #[error("frame header checksum mismatch: the stream was corrupted in transit")]
    HeaderChecksum,
    #[error("{frame} frame payload checksum mismatch: the stream was corrupted in transit")]
    PayloadChecksum { frame: &'static str },
    #[error("unknown frame type {0:#06x}: the stream is corrupt or the peer is incompatible")]
    UnknownType(u16),
    #[error("unknown flags {flags:#x} on a {frame} frame")]
    UnknownFlags { frame: &'static str, flags: u32 },
    #[error("{frame} frame of {len} bytes exceeds the limit of {max} bytes; refused")]
    TooLong {
        frame: &'static str,
        len: u64,
        max: u32,
    },
    #[error("{frame} frame of {len} bytes is shorter than its minimum of {min} bytes")]
    TooShort {
        frame: &'static str,
        len: u32,
        min: u32,
    },
    #[error(
        "frame out of sequence: expected #{expected}, got #{got} (frames lost, replayed or \
         reordered)"
    )]
    Sequence { expected: u64, got: u64 },
    #[error("malformed {frame} frame: {reason}")]
    Malformed { frame: &'static str, reason: String },
    #[error("a {frame} frame arrived from the wrong side of the migration")]
    WrongDirection { frame: &'static str },
    #[error("the peer closed the migration connection")]
    Closed,
    #[error("the migration connection ended in the middle of a frame")]
    Truncated,
    #[error("I/O error on the migration connection: {0}")]
    Io(#[from] io::Error),
}

fn malformed(frame: FrameType, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        frame: frame.name(),
        reason: reason.into(),
    }
}

/// Frame types. Values below 0x8000 travel from the source to the destination, values from
/// 0x8000 up are the destination's responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameType {
    Hello = 0x0001,
    Config = 0x0002,
    SevSession = 0x0003,
    Pages = 0x0004,
    SevPages = 0x0005,
    PassEnd = 0x0006,
    DeviceState = 0x0007,
    VcpuState = 0x0008,
    Complete = 0x0009,
    Abort = 0x000A,
    PostcopySwitch = 0x000B,
    PostcopyRun = 0x000C,
    HelloAck = 0x8001,
    ConfigAck = 0x8002,
    Ack = 0x8003,
    Committed = 0x8004,
    Error = 0x8005,
    PageRequest = 0x8006,
}

impl FrameType {
    pub const ALL: [FrameType; 18] = [
        FrameType::Hello,
        FrameType::Config,
        FrameType::SevSession,
        FrameType::Pages,
        FrameType::SevPages,
        FrameType::PassEnd,
        FrameType::DeviceState,
        FrameType::VcpuState,
        FrameType::Complete,
        FrameType::Abort,
        FrameType::PostcopySwitch,
        FrameType::PostcopyRun,
        FrameType::HelloAck,
        FrameType::ConfigAck,
        FrameType::Ack,
        FrameType::Committed,
        FrameType::Error,
        FrameType::PageRequest,
    ];

    pub fn from_u16(v: u16) -> Option<FrameType> {
        FrameType::ALL.iter().copied().find(|t| *t as u16 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "Hello",
            FrameType::Config => "Config",
            FrameType::SevSession => "SevSession",
            FrameType::Pages => "Pages",
            FrameType::SevPages => "SevPages",
            FrameType::PassEnd => "PassEnd",
            FrameType::DeviceState => "DeviceState",
            FrameType::VcpuState => "VcpuState",
            FrameType::Complete => "Complete",
            FrameType::Abort => "Abort",
            FrameType::PostcopySwitch => "PostcopySwitch",
            FrameType::PostcopyRun => "PostcopyRun",
            FrameType::PageRequest => "PageRequest",
            FrameType::HelloAck => "HelloAck",
            FrameType::ConfigAck => "ConfigAck",
            FrameType::Ack => "Ack",
            FrameType::Committed => "Committed",
            FrameType::Error => "Error",
        }
    }

    /// Whether the source sends this type (otherwise the destination does).
    pub fn from_source(self) -> bool {
        (self as u16) < 0x8000
    }

    /// Inclusive (minimum, maximum) payload length.
    pub fn payload_limits(self) -> (u32, u32) {
        let table = TABLE_ENTRY_LEN as u32;
        let prefix = PAGES_PREFIX_LEN as u32;
        match self {
            FrameType::Hello | FrameType::HelloAck => (16, 16),
            FrameType::Config => (
                CONFIG_FIXED_LEN as u32,
                CONFIG_FIXED_LEN as u32 + MAX_BLOB_LEN,
            ),
            FrameType::SevSession => (1, MAX_BLOB_LEN),
            FrameType::Pages => (
                prefix + table + PAGE_SIZE as u32,
                prefix + MAX_PAGES_PER_FRAME * (table + PAGE_SIZE as u32),
            ),
            FrameType::SevPages => (
                prefix + table + 1,
                prefix + MAX_PAGES_PER_FRAME * (table + MAX_PACKET_LEN),
            ),
            FrameType::PassEnd => (16, 16),
            FrameType::DeviceState => (0, MAX_DEVICE_STATE_LEN),
            FrameType::VcpuState => (8, 8 + MAX_VCPU_STATE_LEN),
            FrameType::Complete => (0, MAX_FINISH_LEN),
            FrameType::Abort => (0, MAX_TEXT_LEN),
            FrameType::ConfigAck => (0, MAX_BLOB_LEN),
            FrameType::Ack | FrameType::Committed => (8, 8),
            FrameType::Error => (8, 8 + MAX_TEXT_LEN),
            FrameType::PostcopySwitch => (SWITCH_FIXED_LEN as u32 + 8, MAX_SWITCH_LEN),
            FrameType::PostcopyRun => (0, 0),
            FrameType::PageRequest => (16, 8 + 8 * MAX_PAGES_PER_REQUEST),
        }
    }

    /// Check a payload length against this type's limits.
    pub fn check_len(self, len: u64) -> Result<(), ProtocolError> {
        let (min, max) = self.payload_limits();
        if len > max as u64 {
            return Err(ProtocolError::TooLong {
                frame: self.name(),
                len,
                max,
            });
        }
        if len < min as u64 {
            return Err(ProtocolError::TooShort {
                frame: self.name(),
                len: len as u32,
                min,
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: FrameType,
    pub flags: u32,
    pub len: u32,
    pub seq: u64,
    pub payload_crc: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        encode_header_raw(
            PROTOCOL_VERSION,
            self.frame_type as u16,
            self.flags,
            self.len,
            self.seq,
            self.payload_crc,
        )
    }

    /// Decode and validate a header: magic, version, checksum, type, flags, length limits.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, ProtocolError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            // A TLS record: a handshake (0x16) or an alert (0x15), version 3.x.
            if matches!(magic, [0x15 | 0x16, 0x03, ..]) {
                return Err(ProtocolError::PeerSpeaksTls);
            }
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(ProtocolError::Version {
                got: version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        if crc32c::crc32c(&b[..28]) != le32(&b[28..32]) {
            return Err(ProtocolError::HeaderChecksum);
        }
        let raw_type = u16::from_le_bytes([b[6], b[7]]);
        let frame_type =
            FrameType::from_u16(raw_type).ok_or(ProtocolError::UnknownType(raw_type))?;
        let flags = le32(&b[8..12]);
        if flags != 0 {
            return Err(ProtocolError::UnknownFlags {
                frame: frame_type.name(),
                flags,
            });
        }
        let len = le32(&b[12..16]);
        frame_type.check_len(len as u64)?;
        Ok(FrameHeader {
            frame_type,
            flags,
            len,
            seq: le64(&b[16..24]),
            payload_crc: le32(&b[24..28]),
        })
    }
}

/// Encode a header with arbitrary field values (tests use it to forge bad frames).
pub fn encode_header_raw(
    version: u16,
    frame_type: u16,
    flags: u32,
    len: u32,
    seq: u64,
    payload_crc: u32,
) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&frame_type.to_le_bytes());
    b[8..12].copy_from_slice(&flags.to_le_bytes());
    b[12..16].copy_from_slice(&len.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&hcrc.to_le_bytes());
    b
}

pub(crate) fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes frames with consecutive sequence numbers; payload parts go out with one vectored
/// write per frame, straight from the caller's buffers.
pub struct FrameWriter<W: Write> {
    inner: W,
    next_seq: u64,
    bytes: u64,
    poisoned: bool,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            next_seq: 0,
            bytes: 0,
            poisoned: false,
        }
    }

    /// Sequence number the next frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes written so far (headers included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Whether a write failed part-way: the stream is no longer at a frame boundary.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Send one frame whose payload is the concatenation of `parts`; returns its sequence
    /// number. The length is checked against the type's limits before anything is written.
    pub fn send(&mut self, frame_type: FrameType, parts: &[&[u8]]) -> Result<u64, ProtocolError> {
        let mut crc = 0u32;
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        self.send_with_crc(frame_type, parts, crc)
    }

    /// [`FrameWriter::send`] with the payload's CRC32C already computed by the caller (who
    /// folded it in while producing the bytes, when they were hot in cache).
    pub fn send_with_crc(
        &mut self,
        frame_type: FrameType,
        parts: &[&[u8]],
        crc: u32,
    ) -> Result<u64, ProtocolError> {
        if self.poisoned {
            return Err(ProtocolError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write on this connection failed",
            )));
        }
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        frame_type.check_len(len)?;
        let seq = self.next_seq;
        let header = FrameHeader {
            frame_type,
            flags: 0,
            len: len as u32,
            seq,
            payload_crc: crc,
        }
        .encode();
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(&header));
        slices.extend(
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| IoSlice::new(p)),
        );
        if let Err(e) = write_all_vectored(&mut self.inner, &mut slices) {
            self.poisoned = true;
            return Err(ProtocolError::Io(e));
        }
        self.next_seq += 1;
        self.bytes += HEADER_LEN as u64 + len;
        Ok(seq)
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush().map_err(|e| {
            self.poisoned = true;
            ProtocolError::Io(e)
        })
    }
}

/// `write_all` for a list of buffers, with `writev` underneath.
pub fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the migration connection accepted no more data",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads frames with blocking reads (the destination's side). Payloads can be read piecewise
/// straight into their final place ([`FrameReader::read_exact_crc`]).
pub struct FrameReader<R: Read> {
    inner: R,
    next_seq: u64,
    bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            next_seq: 0,
            bytes: 0,
        }
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Read and validate the next header. A clean end of stream before the first header byte
    /// is [`ProtocolError::Closed`], one inside the header [`ProtocolError::Truncated`].
    pub fn read_header(&mut self) -> Result<FrameHeader, ProtocolError> {
        let mut b = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Err(ProtocolError::Closed),
                Ok(0) => return Err(ProtocolError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
        self.bytes += HEADER_LEN as u64;
        let h = FrameHeader::decode(&b)?;
        if h.seq != self.next_seq {
            return Err(ProtocolError::Sequence {
                expected: self.next_seq,
                got: h.seq,
            });
        }
        self.next_seq += 1;
        Ok(h)
    }

    /// Fill `buf` from the stream and fold it into `crc`.
    pub fn read_exact_crc(&mut self, buf: &mut [u8], crc: &mut u32) -> Result<(), ProtocolError> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Truncated
            } else {
                ProtocolError::Io(e)
            }
        })?;
        self.bytes += buf.len() as u64;
        *crc = crc32c::crc32c_append(*crc, buf);
        Ok(())
    }

    /// Read a whole payload (its length was already checked against the type's limit by
    /// [`FrameReader::read_header`]) and verify its checksum.
    pub fn read_payload(&mut self, h: &FrameHeader) -> Result<Vec<u8>, ProtocolError> {
        let mut buf = vec![0u8; h.len as usize];
        let mut crc = 0;
        self.read_exact_crc(&mut buf, &mut crc)?;
        check_payload_crc(h, crc)?;
        Ok(buf)
    }
}

/// Compare a computed payload checksum with the header's.
pub fn check_payload_crc(h: &FrameHeader, crc: u32) -> Result<(), ProtocolError> {
    if crc != h.payload_crc {
        return Err(ProtocolError::PayloadChecksum {
            frame: h.frame_type.name(),
        });
    }
    Ok(())
}

/// A received frame with its whole payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

/// Reads frames from a stream with a read timeout (the source's side, for responses): a
/// timeout returns `Ok(None)` and keeps the partial frame, so the caller can check for
/// cancellation and deadlines between polls without losing bytes.
pub struct PollReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    filled: usize,
    header: Option<FrameHeader>,
    next_seq: u64,
    responses_only: bool,
}

impl<R: Read> PollReader<R> {
    /// A reader for frames of any type.
    pub fn new(inner: R) -> Self {
        PollReader {
            inner,
            buf: vec![0; HEADER_LEN],
            filled: 0,
            header: None,
            next_seq: 0,
            responses_only: false,
        }
    }

    /// A reader for the destination's responses: a source-direction type is refused on its
    /// header, so its (larger) length limit never applies.
    pub fn responses(inner: R) -> Self {
        PollReader {
            responses_only: true,
            ..Self::new(inner)
        }
    }

    /// Return the next complete frame, or `None` if the read timed out first.
    pub fn poll(&mut self) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let need = match &self.header {
                None => HEADER_LEN,
                Some(h) => HEADER_LEN + h.len as usize,
            };
            if self.filled == need {
                match self.header {
                    None => {
                        let mut hb = [0u8; HEADER_LEN];
                        hb.copy_from_slice(&self.buf[..HEADER_LEN]);
                        let h = FrameHeader::decode(&hb)?;
                        if self.responses_only && h.frame_type.from_source() {
                            return Err(ProtocolError::WrongDirection {
                                frame: h.frame_type.name(),
                            });
                        }
                        if h.seq != self.next_seq {
                            return Err(ProtocolError::Sequence {
                                expected: self.next_seq,
                                got: h.seq,
                            });
                        }
                        self.next_seq += 1;
                        // The length was checked against the type's limit by decode().
                        self.buf.resize(HEADER_LEN + h.len as usize, 0);
                        self.header = Some(h);
                        continue;
                    }
                    Some(h) => {
                        let payload = self.buf[HEADER_LEN..need].to_vec();
                        check_payload_crc(&h, crc32c::crc32c(&payload))?;
                        self.header = None;
                        self.filled = 0;
                        self.buf.truncate(HEADER_LEN);
                        return Ok(Some(Frame { header: h, payload }));
                    }
                }
            }
            match self.inner.read(&mut self.buf[self.filled..need]) {
                Ok(0) if self.filled == 0 => return Err(ProtocolError::Closed),
                Ok(0) => return Err(ProtocolError::Truncated),
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------

/// `Hello` (source -> destination): the protocol versions the source speaks and its
/// capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub capabilities: u64,
}

impl Hello {
    pub fn ours() -> Hello {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: CAPABILITIES,
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.min_version.to_le_bytes());
        b[2..4].copy_from_slice(&self.max_version.to_le_bytes());
        b[8..16].copy_from_slice(&self.capabilities.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<Hello, ProtocolError> {
        exact_len(FrameType::Hello, p, 16)?;
        if le32(&p[4..8]) != 0 {
            return Err(malformed(FrameType::Hello, "reserved bytes are not zero"));
        }
        let h = Hello {
            min_version: u16::from_le_bytes([p[0], p[1]]),
            max_version: u16::from_le_bytes([p[2], p[3]]),
            capabilities: le64(&p[8..16]),
        };
        if h.min_version > h.max_version {
            return Err(malformed(
                FrameType::Hello,
                format!(
                    "version range {}..={} is empty",
                    h.min_version, h.max_version
                ),
            ));
        }
        Ok(h)
    }
}

/// `HelloAck` (destination -> source): the version chosen and the destination's capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u16,
    pub capabilities: u64,
}

impl HelloAck {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.version.to_le_bytes());
        b[8..16].copy_from_slice(&self.capabilities.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<HelloAck, ProtocolError> {
        exact_len(FrameType::HelloAck, p, 16)?;
        if p[2..8].iter().any(|b| *b != 0) {
            return Err(malformed(
                FrameType::HelloAck,
                "reserved bytes are not zero",
            ));
        }
        Ok(HelloAck {
            version: u16::from_le_bytes([p[0], p[1]]),
            capabilities: le64(&p[8..16]),
        })
    }
}

fn exact_len(t: FrameType, p: &[u8], n: usize) -> Result<(), ProtocolError> {
    if p.len() != n {
        return Err(malformed(
            t,
            format!("payload is {} bytes, expected {n}", p.len()),
        ));
    }
    Ok(())
}

fn vm_type_code(t: GuestType) -> u32 {
    match t {
        GuestType::Plain => 0,
        GuestType::SevEs => 1,
    }
}

/// Encode a `Config` payload:
/// `mem_size u64, page_size u32, vcpus u32, vm_type u32 (0 plain, 1 SEV-ES), extra_len u32,
/// features u64, extra[extra_len]`.
pub fn encode_config(c: &MigrationConfig) -> Vec<u8> {
    let mut b = Vec::with_capacity(CONFIG_FIXED_LEN + c.extra.len());
    b.extend_from_slice(&c.mem_size.to_le_bytes());
    b.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    b.extend_from_slice(&c.vcpus.to_le_bytes());
    b.extend_from_slice(&vm_type_code(c.vm_type).to_le_bytes());
    b.extend_from_slice(&(c.extra.len() as u32).to_le_bytes());
    b.extend_from_slice(&c.features.to_le_bytes());
    b.extend_from_slice(&c.extra);
    b
}

/// Decode and validate a `Config` payload.
pub fn decode_config(p: &[u8]) -> Result<MigrationConfig, ProtocolError> {
    let t = FrameType::Config;
    if p.len() < CONFIG_FIXED_LEN {
        return Err(malformed(t, "shorter than its fixed part"));
    }
    let mem_size = le64(&p[0..8]);
    let page_size = le32(&p[8..12]);
    let vcpus = le32(&p[12..16]);
    let vm_type = match le32(&p[16..20]) {
        0 => GuestType::Plain,
        1 => GuestType::SevEs,
        other => return Err(malformed(t, format!("unknown VM type {other}"))),
    };
    let extra_len = le32(&p[20..24]) as usize;
    let features = le64(&p[24..32]);
    if page_size as u64 != PAGE_SIZE {
        return Err(malformed(
            t,
            format!("page size {page_size} is not supported (only 4096)"),
        ));
    }
    if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE) || mem_size > MAX_MEM_SIZE {
        return Err(malformed(
            t,
            format!(
                "memory size {mem_size:#x} must be a non-zero multiple of 4 KiB and at most \
                 {MAX_MEM_SIZE:#x}"
            ),
        ));
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(malformed(
            t,
            format!("vCPU count {vcpus} must be 1..={MAX_VCPUS}"),
        ));
    }
    if extra_len != p.len() - CONFIG_FIXED_LEN {
        return Err(malformed(
            t,
            format!(
                "extra data length {extra_len} does not match the payload ({} bytes)",
                p.len() - CONFIG_FIXED_LEN
            ),
        ));
    }
    Ok(MigrationConfig {
        mem_size,
        vcpus,
        vm_type,
        features,
        extra: p[CONFIG_FIXED_LEN..].to_vec(),
    })
}

/// `PassEnd`: `pass u32, flags u32 (bit 0: final pass), pages u64` — the number of pages the
/// pass carried, which the destination cross-checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassEnd {
    pub pass: u32,
    pub final_pass: bool,
    pub pages: u64,
}

impl PassEnd {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.pass.to_le_bytes());
        b[4..8].copy_from_slice(&(self.final_pass as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.pages.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<PassEnd, ProtocolError> {
        exact_len(FrameType::PassEnd, p, 16)?;
        let flags = le32(&p[4..8]);
        if flags & !1 != 0 {
            return Err(malformed(
                FrameType::PassEnd,
                format!("unknown flags {flags:#x}"),
            ));
        }
        Ok(PassEnd {
            pass: le32(&p[0..4]),
            final_pass: flags & 1 != 0,
            pages: le64(&p[8..16]),
        })
    }
}

/// Payload of `Ack` and `Committed`: the sequence number of the newest source frame the
/// destination has fully processed (cumulative).
pub fn encode_seq(seq: u64) -> [u8; 8] {
    seq.to_le_bytes()
}

pub fn decode_seq(t: FrameType, p: &[u8]) -> Result<u64, ProtocolError> {
    exact_len(t, p, 8)?;
    Ok(le64(p))
}

/// Why the destination refused a migration (the `Error` frame's code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The stream broke the protocol (bad frame, checksum, limit, sequence).
    Protocol,
    /// A frame arrived in a state that does not admit it.
    OutOfOrder,
    /// The configuration is not compatible with the destination.
    Incompatible,
    /// The destination refused data or state (e.g. a transport MAC failed).
    Refused,
    /// The destination failed internally.
    Internal,
    /// The destination's operator cancelled.
    Cancelled,
    Unknown(u32),
}

impl ErrorCode {
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::OutOfOrder => 2,
            ErrorCode::Incompatible => 3,
            ErrorCode::Refused => 4,
            ErrorCode::Internal => 5,
            ErrorCode::Cancelled => 6,
            ErrorCode::Unknown(v) => v,
        }
    }

    pub fn from_u32(v: u32) -> ErrorCode {
        match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::OutOfOrder,
            3 => ErrorCode::Incompatible,
            4 => ErrorCode::Refused,
            5 => ErrorCode::Internal,
            6 => ErrorCode::Cancelled,
            v => ErrorCode::Unknown(v),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Protocol => f.write_str("protocol violation"),
            ErrorCode::OutOfOrder => f.write_str("frame out of order"),
            ErrorCode::Incompatible => f.write_str("incompatible configuration"),
            ErrorCode::Refused => f.write_str("data refused"),
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::Cancelled => f.write_str("cancelled"),
            ErrorCode::Unknown(v) => write!(f, "error code {v}"),
        }
    }
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_text(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `Error` payload: `code u32, reserved u32, message (UTF-8)`.
pub fn encode_error(code: ErrorCode, message: &str) -> Vec<u8> {
    let msg = truncate_text(message, MAX_TEXT_LEN as usize);
    let mut b = Vec::with_capacity(8 + msg.len());
    b.extend_from_slice(&code.to_u32().to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

pub fn decode_error(p: &[u8]) -> Result<(ErrorCode, String), ProtocolError> {
    if p.len() < 8 {
        return Err(malformed(FrameType::Error, "shorter than 8 bytes"));
    }
    Ok((
        ErrorCode::from_u32(le32(&p[0..4])),
        String::from_utf8_lossy(&p[8..]).into_owned(),
    ))
}

/// One run of a `Pages` frame: `first u64, count u32, reserved u32`; the run's
/// `count * 4096` data bytes follow the table in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub first: u64,
    pub count: u32,
}

/// One entry of a `SevPages` frame: `page u64, len u32, reserved u32`; the packets follow
/// the table in entry order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketEntry {
    pub page: u64,
    pub len: u32,
}

/// Encode the prefix and table of a `Pages` frame.
pub fn encode_page_table(pass: u32, runs: &[PageRun], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&pass.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

/// Encode the prefix and table of a `SevPages` frame.
pub fn encode_packet_table(pass: u32, entries: &[PacketEntry], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&pass.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.page.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

/// Decode the 8-byte prefix of a `Pages`/`SevPages` payload of `payload_len` bytes: the pass
/// number and the entry count, checked against [`MAX_PAGES_PER_FRAME`] and the payload length
/// before the caller allocates the table.
pub fn decode_table_prefix(
    t: FrameType,
    prefix: &[u8; PAGES_PREFIX_LEN],
    payload_len: u32,
) -> Result<(u32, u32), ProtocolError> {
    let pass = le32(&prefix[0..4]);
    let entries = le32(&prefix[4..8]);
    if entries == 0 || entries > MAX_PAGES_PER_FRAME {
        return Err(malformed(
            t,
            format!("{entries} table entries (must be 1..={MAX_PAGES_PER_FRAME})"),
        ));
    }
    let table_end = PAGES_PREFIX_LEN as u64 + entries as u64 * TABLE_ENTRY_LEN as u64;
    if table_end > payload_len as u64 {
        return Err(malformed(
            t,
            format!("a table of {entries} entries does not fit a {payload_len}-byte payload"),
        ));
    }
    Ok((pass, entries))
}

/// Decode and validate a `Pages` run table against guest memory of `mem_pages` pages and the
/// payload length: runs ascending, non-overlapping, non-empty, inside memory, at most
/// [`MAX_PAGES_PER_FRAME`] pages in all, and table + data exactly filling the payload.
/// Returns the runs and the total number of pages.
pub fn decode_page_table(
    table: &[u8],
    mem_pages: u64,
    payload_len: u32,
) -> Result<(Vec<PageRun>, u64), ProtocolError> {
    let t = FrameType::Pages;
    let mut runs = Vec::with_capacity(table.len() / TABLE_ENTRY_LEN);
    let mut total = 0u64;
    let mut next_free = 0u64;
    for e in table.chunks_exact(TABLE_ENTRY_LEN) {
        let first = le64(&e[0..8]);
        let count = le32(&e[8..12]);
        if le32(&e[12..16]) != 0 {
            return Err(malformed(t, "reserved table bytes are not zero"));
        }
        if count == 0 {
            return Err(malformed(t, format!("empty run at page {first}")));
        }
        let end = first.checked_add(count as u64).filter(|e| *e <= mem_pages);
        let Some(end) = end else {
            return Err(malformed(
                t,
                format!(
                    "run of {count} pages at page {first} lies outside guest memory \
                     ({mem_pages} pages)"
                ),
            ));
        };
        if !runs.is_empty() && first < next_free {
            return Err(malformed(
                t,
                format!("run at page {first} overlaps or precedes the previous run"),
            ));
        }
        total += count as u64;
        if total > MAX_PAGES_PER_FRAME as u64 {
            return Err(malformed(
                t,
                format!("more than {MAX_PAGES_PER_FRAME} pages in one frame"),
            ));
        }
        next_free = end;
        runs.push(PageRun { first, count });
    }
    let expected = PAGES_PREFIX_LEN as u64 + table.len() as u64 + total * PAGE_SIZE;
    if expected != payload_len as u64 {
        return Err(malformed(
            t,
            format!("payload is {payload_len} bytes but its table describes {expected}"),
        ));
    }
    Ok((runs, total))
}

/// Decode and validate a `SevPages` packet table: pages strictly ascending and inside memory,
/// packet lengths 1..=[`MAX_PACKET_LEN`], table + packets exactly filling the payload.
pub fn decode_packet_table(
    table: &[u8],
    mem_pages: u64,
    payload_len: u32,
) -> Result<Vec<PacketEntry>, ProtocolError> {
    let t = FrameType::SevPages;
    let mut entries = Vec::with_capacity(table.len() / TABLE_ENTRY_LEN);
    let mut data = 0u64;
    for e in table.chunks_exact(TABLE_ENTRY_LEN) {
        let page = le64(&e[0..8]);
        let len = le32(&e[8..12]);
        if le32(&e[12..16]) != 0 {
            return Err(malformed(t, "reserved table bytes are not zero"));
        }
        if page >= mem_pages {
            return Err(malformed(
                t,
                format!("page {page} lies outside guest memory ({mem_pages} pages)"),
            ));
        }
        if let Some(prev) = entries.last() {
            let prev: &PacketEntry = prev;
            if page <= prev.page {
                return Err(malformed(
                    t,
                    format!("page {page} is not in ascending order"),
                ));
            }
        }
        if len == 0 || len > MAX_PACKET_LEN {
            return Err(malformed(
                t,
                format!("packet of {len} bytes for page {page} (must be 1..={MAX_PACKET_LEN})"),
            ));
        }
        data += len as u64;
        entries.push(PacketEntry { page, len });
    }
    let expected = PAGES_PREFIX_LEN as u64 + table.len() as u64 + data;
    if expected != payload_len as u64 {
        return Err(malformed(
            t,
            format!("payload is {payload_len} bytes but its table describes {expected}"),
        ));
    }
    Ok(entries)
}

/// `PostcopySwitch` (source -> destination, the source is paused): `pass u32, reserved u32,
/// pending u64, bitmap` — the pages the destination has not received with their final
/// content (one bit per guest page, LSB first, in little-endian u64 words covering every
/// guest page, bits past the last page zero), and the pass number their frames will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostcopySwitch {
    pub pass: u32,
    pub pending: crate::PageSet,
}

impl PostcopySwitch {
    pub fn encode(&self) -> Vec<u8> {
        let words = self.pending.words();
        let mut b = Vec::with_capacity(SWITCH_FIXED_LEN + words.len() * 8);
        b.extend_from_slice(&self.pass.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.pending.count().to_le_bytes());
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decode and validate against guest memory of `mem_pages` pages: the bitmap covers
    /// exactly the guest's pages and its population matches the announced count.
    pub fn decode(p: &[u8], mem_pages: u64) -> Result<PostcopySwitch, ProtocolError> {
        let t = FrameType::PostcopySwitch;
        if p.len() < SWITCH_FIXED_LEN {
            return Err(malformed(t, "shorter than its fixed part"));
        }
        if le32(&p[4..8]) != 0 {
            return Err(malformed(t, "reserved bytes are not zero"));
        }
        let words_len = mem_pages.div_ceil(64) as usize;
        if p.len() - SWITCH_FIXED_LEN != words_len * 8 {
            return Err(malformed(
                t,
                format!(
                    "bitmap of {} bytes for a guest of {mem_pages} pages (expected {})",
                    p.len() - SWITCH_FIXED_LEN,
                    words_len * 8
                ),
            ));
        }
        let words: Vec<u64> = p[SWITCH_FIXED_LEN..].chunks_exact(8).map(le64).collect();
        if !mem_pages.is_multiple_of(64) {
            if let Some(last) = words.last() {
                if last >> (mem_pages % 64) != 0 {
                    return Err(malformed(t, "bits set past the last guest page"));
                }
            }
        }
        let pending = crate::PageSet::from_words(mem_pages, &words);
        let announced = le64(&p[8..16]);
        if pending.count() != announced {
            return Err(malformed(
                t,
                format!(
                    "announces {announced} pending pages but its bitmap names {}",
                    pending.count()
                ),
            ));
        }
        Ok(PostcopySwitch {
            pass: le32(&p[0..4]),
            pending,
        })
    }
}

/// `PageRequest` (destination -> source, during post-copy): `count u32, reserved u32,
/// page u64 x count` — pages a vCPU or the VMM faulted on; the source sends them before its
/// background order.
pub fn encode_page_request(pages: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 8 * pages.len());
    b.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for p in pages {
        b.extend_from_slice(&p.to_le_bytes());
    }
    b
}

/// Decode a `PageRequest`, each page checked against guest memory of `mem_pages` pages.
pub fn decode_page_request(p: &[u8], mem_pages: u64) -> Result<Vec<u64>, ProtocolError> {
    let t = FrameType::PageRequest;
    if p.len() < 8 {
        return Err(malformed(t, "shorter than 8 bytes"));
    }
    let count = le32(&p[0..4]) as usize;
    if le32(&p[4..8]) != 0 {
        return Err(malformed(t, "reserved bytes are not zero"));
    }
    if count == 0 || p.len() != 8 + 8 * count {
        return Err(malformed(
            t,
            format!("{count} pages announced in a {}-byte payload", p.len()),
        ));
    }
    let pages: Vec<u64> = p[8..].chunks_exact(8).map(le64).collect();
    if let Some(bad) = pages.iter().find(|pg| **pg >= mem_pages) {
        return Err(malformed(
            t,
            format!("page {bad} lies outside guest memory ({mem_pages} pages)"),
        ));
    }
    Ok(pages)
}

/// `VcpuState` prefix: `vcpu u32, reserved u32`; the opaque state follows.
pub fn encode_vcpu_prefix(vcpu: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..4].copy_from_slice(&vcpu.to_le_bytes());
    b
}

pub fn decode_vcpu_prefix(p: &[u8]) -> Result<u32, ProtocolError> {
    if p.len() < 8 {
        return Err(malformed(FrameType::VcpuState, "shorter than 8 bytes"));
    }
    if le32(&p[4..8]) != 0 {
        return Err(malformed(
            FrameType::VcpuState,
            "reserved bytes are not zero",
        ));
    }
    Ok(le32(&p[0..4]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(t: FrameType, payload: &[u8]) -> Frame {
        let mut w = FrameWriter::new(Vec::new());
        w.send(t, &[payload]).unwrap();
        let bytes = w.inner;
        let mut r = PollReader::new(&bytes[..]);
        r.poll().unwrap().unwrap()
    }

    #[test]
    fn header_round_trip() {
        let h = FrameHeader {
            frame_type: FrameType::Ack,
            flags: 0,
            len: 8,
            seq: 77,
            payload_crc: 0xdead_beef,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn every_header_byte_flip_is_detected() {
        let h = FrameHeader {
            frame_type: FrameType::Pages,
            flags: 0,
            len: 8 + 16 + 4096,
            seq: 3,
            payload_crc: 1,
        }
        .encode();
        for i in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut b = h;
                b[i] ^= 1 << bit;
                assert!(FrameHeader::decode(&b).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn header_checks_name_the_problem() {
        let mut b = FrameHeader {
            frame_type: FrameType::Hello,
            flags: 0,
            len: 16,
            seq: 0,
            payload_crc: 0,
        }
        .encode();
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtocolError::BadMagic(_))
        ));
        // Printed in hex, as the bytes are on the wire.
        let e = FrameHeader::decode(&b).unwrap_err().to_string();
        assert!(
            e.contains(r#"magic 0x584d4947 ("XMIG"), expected 0x454d4947 ("EMIG")"#),
            "{e}"
        );
        b[..4].copy_from_slice(&[0x17, 0x02, 0x01, 0x00]);
        let e = FrameHeader::decode(&b).unwrap_err().to_string();
        assert!(e.contains("magic 0x17020100,"), "{e}");
        // A TLS record (a ClientHello, an alert) where a frame belongs: the peer speaks TLS.
        for tls in [[0x16, 0x03, 0x01, 0x00], [0x15, 0x03, 0x03, 0x00]] {
            b[..4].copy_from_slice(&tls);
            let e = FrameHeader::decode(&b).unwrap_err();
            assert!(matches!(e, ProtocolError::PeerSpeaksTls), "{e}");
            assert!(e.to_string().contains("--tls-cert"), "{e}");
        }
        let v = encode_header_raw(2, FrameType::Hello as u16, 0, 16, 0, 0);
        assert!(matches!(
            FrameHeader::decode(&v),
            Err(ProtocolError::Version { got: 2, .. })
        ));
        let t = encode_header_raw(1, 0x4242, 0, 16, 0, 0);
        assert!(matches!(
            FrameHeader::decode(&t),
            Err(ProtocolError::UnknownType(0x4242))
        ));
        let f = encode_header_raw(1, FrameType::Hello as u16, 4, 16, 0, 0);
        assert!(matches!(
            FrameHeader::decode(&f),
            Err(ProtocolError::UnknownFlags { flags: 4, .. })
        ));
        let l = encode_header_raw(1, FrameType::DeviceState as u16, 0, u32::MAX, 0, 0);
        assert!(matches!(
            FrameHeader::decode(&l),
            Err(ProtocolError::TooLong { .. })
        ));
        let s = encode_header_raw(1, FrameType::Ack as u16, 0, 7, 0, 0);
        assert!(matches!(
            FrameHeader::decode(&s),
            Err(ProtocolError::TooShort { .. })
        ));
    }

    #[test]
    fn writer_refuses_oversize_frames_before_writing() {
        let mut w = FrameWriter::new(Vec::new());
        let big = vec![0u8; MAX_TEXT_LEN as usize + 1];
        assert!(matches!(
            w.send(FrameType::Abort, &[&big]),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(w.inner.is_empty());
        assert_eq!(w.next_seq(), 0);
    }

    #[test]
    fn payload_checksum_is_verified() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(FrameType::Abort, &[b"because"]).unwrap();
        let mut bytes = w.inner;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        let mut r = PollReader::new(&bytes[..]);
        assert!(matches!(
            r.poll(),
            Err(ProtocolError::PayloadChecksum { .. })
        ));
    }

    #[test]
    fn sequence_gaps_are_refused() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(FrameType::Complete, &[]).unwrap();
        w.next_seq += 1; // skip one
        w.send(FrameType::Complete, &[]).unwrap();
        let bytes = w.inner;
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.read_header().unwrap().seq, 0);
        assert!(matches!(
            r.read_header(),
            Err(ProtocolError::Sequence {
                expected: 1,
                got: 2
            })
        ));
    }

    #[test]
    fn poll_reader_keeps_partial_frames_across_timeouts() {
        struct Trickle {
            data: Vec<u8>,
            pos: usize,
            tick: bool,
        }
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.tick = !self.tick;
                if self.tick {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "later"));
                }
                if self.pos == self.data.len() {
                    return Ok(0);
                }
                buf[0] = self.data[self.pos];
                self.pos += 1;
                Ok(1)
            }
        }
        let mut w = FrameWriter::new(Vec::new());
        w.send(FrameType::Error, &[&encode_error(ErrorCode::Refused, "no")])
            .unwrap();
        w.send(FrameType::Ack, &[&encode_seq(5)]).unwrap();
        let mut r = PollReader::new(Trickle {
            data: w.inner,
            pos: 0,
            tick: false,
        });
        let mut frames = Vec::new();
        let mut nones = 0;
        while frames.len() < 2 {
            match r.poll().unwrap() {
                Some(f) => frames.push(f),
                None => nones += 1,
            }
        }
        assert!(nones > 10);
        assert_eq!(
            decode_error(&frames[0].payload).unwrap(),
            (ErrorCode::Refused, "no".to_string())
        );
        assert_eq!(decode_seq(FrameType::Ack, &frames[1].payload).unwrap(), 5);
        let end = loop {
            match r.poll() {
                Ok(None) => continue,
                other => break other,
            }
        };
        assert!(matches!(end, Err(ProtocolError::Closed)));
    }

    #[test]
    fn response_reader_refuses_source_frames_on_the_header() {
        let h = encode_header_raw(
            PROTOCOL_VERSION,
            FrameType::DeviceState as u16,
            0,
            MAX_DEVICE_STATE_LEN,
            0,
            0,
        );
        let mut r = PollReader::responses(&h[..]);
        assert!(matches!(
            r.poll(),
            Err(ProtocolError::WrongDirection {
                frame: "DeviceState"
            })
        ));
        assert!(
            r.buf.len() <= HEADER_LEN,
            "nothing allocated for the payload"
        );
    }

    #[test]
    fn config_round_trip_and_validation() {
        let c = MigrationConfig {
            mem_size: 64 << 20,
            vcpus: 4,
            vm_type: GuestType::SevEs,
            features: 0x55,
            extra: b"cpuid-digest".to_vec(),
        };
        let f = roundtrip(FrameType::Config, &encode_config(&c));
        assert_eq!(decode_config(&f.payload).unwrap(), c);
        let mut bad = encode_config(&c);
        bad[0] = 1; // size not a page multiple
        assert!(decode_config(&bad).is_err());
        let mut bad = encode_config(&c);
        bad[9] = 0; // page size
        assert!(decode_config(&bad).is_err());
        let mut bad = encode_config(&c);
        bad[12..16].copy_from_slice(&0u32.to_le_bytes()); // no vCPUs
        assert!(decode_config(&bad).is_err());
        let mut bad = encode_config(&c);
        bad[16] = 9; // VM type
        assert!(decode_config(&bad).is_err());
        let mut bad = encode_config(&c);
        bad.push(0); // extra length mismatch
        assert!(decode_config(&bad).is_err());
    }

    #[test]
    fn page_table_validation() {
        let mut t = Vec::new();
        let runs = [
            PageRun { first: 0, count: 2 },
            PageRun { first: 5, count: 1 },
        ];
        encode_page_table(7, &runs, &mut t);
        let len = (t.len() as u64 + 3 * PAGE_SIZE) as u32;
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&t[..8]);
        assert_eq!(
            decode_table_prefix(FrameType::Pages, &prefix, len).unwrap(),
            (7, 2)
        );
        let (r, total) = decode_page_table(&t[8..], 6, len).unwrap();
        assert_eq!((r.as_slice(), total), (&runs[..], 3));
        // outside memory
        assert!(decode_page_table(&t[8..], 5, len).is_err());
        // wrong payload length
        assert!(decode_page_table(&t[8..], 6, len + 1).is_err());
        // overlapping
        encode_page_table(
            7,
            &[
                PageRun { first: 0, count: 2 },
                PageRun { first: 1, count: 1 },
            ],
            &mut t,
        );
        assert!(decode_page_table(&t[8..], 6, len).is_err());
        // too many entries for the payload
        let mut p = [0u8; 8];
        p[4..8].copy_from_slice(&100u32.to_le_bytes());
        assert!(decode_table_prefix(FrameType::Pages, &p, 200).is_err());
        p[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_table_prefix(FrameType::Pages, &p, 200).is_err());
        // overflow
        encode_page_table(
            0,
            &[PageRun {
                first: u64::MAX,
                count: 2,
            }],
            &mut t,
        );
        assert!(decode_page_table(&t[8..], u64::MAX, 8 + 16 + 8192).is_err());
    }

    #[test]
    fn packet_table_validation() {
        let mut t = Vec::new();
        let e = [
            PacketEntry { page: 1, len: 100 },
            PacketEntry { page: 4, len: 50 },
        ];
        encode_packet_table(1, &e, &mut t);
        let len = (t.len() + 150) as u32;
        assert_eq!(decode_packet_table(&t[8..], 5, len).unwrap(), e.to_vec());
        assert!(decode_packet_table(&t[8..], 4, len).is_err());
        assert!(decode_packet_table(&t[8..], 5, len - 1).is_err());
        encode_packet_table(
            1,
            &[
                PacketEntry { page: 4, len: 100 },
                PacketEntry { page: 4, len: 50 },
            ],
            &mut t,
        );
        assert!(decode_packet_table(&t[8..], 5, len).is_err());
        encode_packet_table(
            1,
            &[PacketEntry {
                page: 0,
                len: MAX_PACKET_LEN + 1,
            }],
            &mut t,
        );
        assert!(decode_packet_table(&t[8..], 5, 8 + 16 + MAX_PACKET_LEN + 1).is_err());
    }

    #[test]
    fn small_payloads_round_trip() {
        let h = Hello::ours();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let a = HelloAck {
            version: 1,
            capabilities: 3,
        };
        assert_eq!(HelloAck::decode(&a.encode()).unwrap(), a);
        let p = PassEnd {
            pass: 3,
            final_pass: true,
            pages: 99,
        };
        assert_eq!(PassEnd::decode(&p.encode()).unwrap(), p);
        let mut bad = p.encode();
        bad[4] = 2;
        assert!(PassEnd::decode(&bad).is_err());
        assert_eq!(decode_vcpu_prefix(&encode_vcpu_prefix(9)).unwrap(), 9);
        let long = "é".repeat(5000);
        let e = encode_error(ErrorCode::Internal, &long);
        assert!(e.len() <= 8 + MAX_TEXT_LEN as usize);
        assert_eq!(decode_error(&e).unwrap().0, ErrorCode::Internal);
        for v in 0..10 {
            assert_eq!(ErrorCode::from_u32(v).to_u32(), v);
        }
    }

    proptest! {
        #[test]
        fn random_headers_never_panic(bytes in proptest::array::uniform32(any::<u8>())) {
            let _ = FrameHeader::decode(&bytes);
        }

        #[test]
        fn random_tables_never_panic(table in proptest::collection::vec(any::<u8>(), 0..200),
                                     mem in 0u64..100, len in any::<u32>()) {
            let t = &table[..table.len() / 16 * 16];
            let _ = decode_page_table(t, mem, len);
            let _ = decode_packet_table(t, mem, len);
        }

        #[test]
        fn random_payloads_never_panic(p in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_config(&p);
            let _ = Hello::decode(&p);
            let _ = HelloAck::decode(&p);
            let _ = PassEnd::decode(&p);
            let _ = decode_error(&p);
            let _ = decode_vcpu_prefix(&p);
        }
    }
}
