//! The TLS 1.3 record layer of an established connection (RFC 8446 §5), run by esvm itself
//! with ring's AEADs once rustls has finished the handshake and handed over the traffic
//! keys (`dangerous_extract_secrets`).
//!
//! Why not rustls's own record layer: its buffered API copies every byte five times and
//! allocates twice per 16 KiB record (plaintext into its queue, into a fresh record, into
//! the caller's buffer; on receipt, into its deframer, out of its plaintext queue), and its
//! unbuffered API still seals each record into a fresh allocation before copying it out.
//! Both keep the two directions in one object, so a reading and a writing thread share a
//! lock. The kernel's TLS offload (kTLS), which takes the same keys, is not available on
//! the hosts esvm runs on. Here each direction is its own object ([`Sealer`], [`Opener`]):
//! plaintext is copied once into the outgoing buffer and sealed in place, many records per
//! socket write; received records are opened in place in a large buffer and copied once
//! into the caller's.
//!
//! What this layer does not do: key updates (rustls's extracted secrets cannot derive the
//! next keys). A direction refuses to seal past its AEAD key's confidentiality limit
//! (2^24 records, 256 GiB, for AES-GCM) and a peer's KeyUpdate ends the connection with an
//! error; esvm's peers never send one. Records are the largest TLS allows (16 KiB of
//! plaintext) and carry no padding.

use std::io::{self, IoSlice, Read};
use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{AlertDescription, ConnectionTrafficSecrets};

use crate::error::{explain_stream_error, Role};

/// Largest plaintext of one record (RFC 8446 §5.1).
pub(crate) const MAX_PLAIN: usize = 16 * 1024;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// The AEAD tag (all TLS 1.3 suites).
const TAG: usize = 16;
/// Largest ciphertext a record may carry (RFC 8446 §5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// Largest record on the wire.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_CIPHER;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Handshake message types that may follow a TLS 1.3 handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// One direction's AEAD key, static IV and next sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    /// Records this key may protect (the suite's confidentiality limit).
    limit: u64,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, rustls::Error> {
        let (alg, key, iv, limit) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, key, iv, 1 << 24)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, key, iv, 1 << 24)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv, u64::MAX)
            }
            _ => {
                return Err(rustls::Error::General(
                    "the negotiated cipher suite has no record layer here".into(),
                ))
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| rustls::Error::General("a traffic key of the wrong length".into()))?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| rustls::Error::General("a traffic IV of the wrong length".into()))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The next record's nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// The sending direction: seals plaintext into records in [`Sealer::out`].
pub(crate) struct Sealer {
    keys: Keys,
    /// Sealed records waiting for the socket.
    pub(crate) out: Vec<u8>,
    /// close_notify was sealed, or a write failed: nothing may follow.
    pub(crate) closed: bool,
}

impl Sealer {
    pub(crate) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, rustls::Error> {
        Ok(Sealer {
            keys: Keys::new(seq, secrets)?,
            out: Vec::new(),
            closed: false,
        })
    }

    /// Seal up to `max` bytes of `bufs` into full-size records in `out` (cleared first);
    /// returns the plaintext bytes taken.
    pub(crate) fn seal(&mut self, bufs: &[IoSlice<'_>], max: usize) -> io::Result<usize> {
        self.out.clear();
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection was closed for writing (close_notify sent)",
            ));
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(max);
        let records = total.div_ceil(MAX_PLAIN);
        // One record stays for close_notify.
        if self.keys.seq.saturating_add(records as u64) >= self.keys.limit {
            return Err(io::Error::other(
                "this TLS connection has used its key for as many records as is safe \
                 (256 GiB with AES-GCM) and cannot renew it: migrate again on a new connection",
            ));
        }
        self.out.reserve(total + records * (HEADER + 1 + TAG));
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = slices.next().unwrap_or(&[]);
        let mut left = total;
        while left > 0 {
            let len = left.min(MAX_PLAIN);
            let at = self.begin(len);
            let mut need = len;
            while need > 0 {
                if cur.is_empty() {
                    cur = slices.next().unwrap_or(&[]);
                    continue;
                }
                let k = need.min(cur.len());
                self.out.extend_from_slice(&cur[..k]);
                cur = &cur[k..];
                need -= k;
            }
            self.finish(APPLICATION_DATA, at)?;
            left -= len;
        }
        Ok(total)
    }

    /// Seal a close_notify alert into `out` (cleared first) and refuse writes from now on.
    pub(crate) fn seal_close_notify(&mut self) -> io::Result<()> {
        self.out.clear();
        self.closed = true;
        let at = self.begin(2);
        // Level warning (1), close_notify (0).
        self.out.extend_from_slice(&[1, 0]);
        self.finish(ALERT, at)
    }

    /// Start a record whose plaintext is `len` bytes: the header; returns where it starts.
    fn begin(&mut self, len: usize) -> usize {
        let at = self.out.len();
        let clen = (len + 1 + TAG) as u16;
        let [hi, lo] = clen.to_be_bytes();
        // All TLS 1.3 records look like application data in TLS 1.2 (RFC 8446 §5.2).
        self.out
            .extend_from_slice(&[APPLICATION_DATA, 0x03, 0x03, hi, lo]);
        at
    }

    /// Append the inner content type and seal the record started at `at` in place.
    fn finish(&mut self, typ: u8, at: usize) -> io::Result<()> {
        self.out.push(typ);
        let nonce = self.keys.next_nonce();
        let mut hdr = [0u8; HEADER];
        hdr.copy_from_slice(&self.out[at..at + HEADER]);
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), &mut self.out[at + HEADER..])
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The receiving direction: reads records from the socket into a buffer and opens them in
/// place.
pub(crate) struct Opener {
    keys: Keys,
    /// Who sends the records (for messages).
    peer: Role,
    buf: Box<[u8]>,
    /// Ciphertext read but not yet opened.
    raw: Range<usize>,
    /// Opened plaintext not yet delivered.
    plain: Range<usize>,
    /// The peer's close_notify arrived: a clean end of stream.
    eof: bool,
    /// A failure that ends the connection, repeated to every later read.
    failed: Option<(io::ErrorKind, String)>,
}

impl Opener {
    /// `capacity`: how much ciphertext one socket read may take in (at least one record).
    pub(crate) fn new(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        peer: Role,
        capacity: usize,
    ) -> Result<Self, rustls::Error> {
        Ok(Opener {
            keys: Keys::new(seq, secrets)?,
            peer,
            buf: vec![0u8; capacity.max(MAX_RECORD)].into_boxed_slice(),
            raw: 0..0,
            plain: 0..0,
            eof: false,
            failed: None,
        })
    }

    /// Plaintext (and the end of stream) rustls had already opened during the handshake.
    pub(crate) fn preload(&mut self, plaintext: &[u8], eof: bool) {
        let n = plaintext.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&plaintext[..n]);
        self.plain = 0..n;
        self.raw = n..n;
        self.eof = eof;
    }

    /// Read plaintext into `out`, reading the socket only when no whole record is buffered.
    /// `Ok(0)`: the peer's close_notify. A socket error (a read timeout) leaves the state as
    /// it was, so the next call goes on.
    pub(crate) fn read(&mut self, sock: &mut impl Read, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        loop {
            if !self.plain.is_empty() {
                let k = self.plain.len().min(out.len() - n);
                out[n..n + k].copy_from_slice(&self.buf[self.plain.start..self.plain.start + k]);
                self.plain.start += k;
                n += k;
                if n == out.len() {
                    return Ok(n);
                }
                continue;
            }
            if let Some((kind, msg)) = &self.failed {
                return if n > 0 {
                    Ok(n)
                } else {
                    Err(io::Error::new(*kind, msg.clone()))
                };
            }
            if self.eof {
                return Ok(n);
            }
            if let Some(len) = self.whole_record()? {
                self.open(len);
                continue;
            }
            if n > 0 {
                return Ok(n);
            }
            self.fill(sock)?;
        }
    }

    /// The ciphertext length of the record at the front of `raw`, if it is all there.
    fn whole_record(&mut self) -> io::Result<Option<usize>> {
        if self.raw.len() < HEADER {
            return Ok(None);
        }
        let h = &self.buf[self.raw.start..self.raw.start + HEADER];
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if h[0] != APPLICATION_DATA || !(TAG + 1..=MAX_CIPHER).contains(&len) {
            let what = format!(
                "{} sent a malformed TLS record (type {}, length {len}): the connection was \
                 altered in transit",
                self.peer, h[0]
            );
            return Err(self.fail(io::ErrorKind::InvalidData, what));
        }
        Ok((self.raw.len() >= HEADER + len).then_some(len))
    }

    /// Open the record at the front of `raw` (ciphertext `len` bytes) in place.
    fn open(&mut self, len: usize) {
        let at = self.raw.start;
        self.raw.start += HEADER + len;
        let mut hdr = [0u8; HEADER];
        hdr.copy_from_slice(&self.buf[at..at + HEADER]);
        let nonce = self.keys.next_nonce();
        let body = &mut self.buf[at + HEADER..at + HEADER + len];
        let opened = match self.keys.key.open_in_place(nonce, Aad::from(hdr), body) {
            // The content type is the last non-zero byte; zeros after it are padding.
            Ok(plain) => plain
                .iter()
                .rposition(|&b| b != 0)
                .map(|end| (plain[end], end, plain[0], plain.get(1).copied())),
            Err(_) => {
                let what = explain_stream_error(self.peer, &rustls::Error::DecryptError);
                self.fail(io::ErrorKind::InvalidData, what);
                return;
            }
        };
        let Some((typ, end, first, second)) = opened else {
            let what = format!("{} sent a TLS record with no content type", self.peer);
            self.fail(io::ErrorKind::InvalidData, what);
            return;
        };
        match (typ, second) {
            (APPLICATION_DATA, _) if end <= MAX_PLAIN => {
                self.plain = at + HEADER..at + HEADER + end;
            }
            (ALERT, Some(desc)) if end == 2 => {
                let desc = AlertDescription::from(desc);
                if desc == AlertDescription::CloseNotify {
                    self.eof = true;
                } else {
                    let what = explain_stream_error(self.peer, &rustls::Error::AlertReceived(desc));
                    self.fail(io::ErrorKind::ConnectionAborted, what);
                }
            }
            // A session ticket is of no use to a connection that is never resumed.
            (HANDSHAKE, _) if first == NEW_SESSION_TICKET => {}
            (HANDSHAKE, _) if first == KEY_UPDATE => {
                let what = format!(
                    "{} asked for a TLS key update, which esvm's migration transport does not \
                     do: upgrade both ends to the same esvm version",
                    self.peer
                );
                self.fail(io::ErrorKind::InvalidData, what);
            }
            (t, _) => {
                let what = format!(
                    "{} sent an unexpected TLS record (content type {t}, {end} bytes)",
                    self.peer
                );
                self.fail(io::ErrorKind::InvalidData, what);
            }
        }
    }

    /// Read more ciphertext from the socket (moving a partial record to the front first
    /// when a whole one would not fit behind it).
    fn fill(&mut self, sock: &mut impl Read) -> io::Result<()> {
        if self.buf.len() - self.raw.start < MAX_RECORD {
            let len = self.raw.len();
            self.buf.copy_within(self.raw.clone(), 0);
            self.raw = 0..len;
        }
        let n = sock.read(&mut self.buf[self.raw.end..])?;
        if n == 0 {
            let what = if self.raw.is_empty() {
                format!(
                    "{} closed the connection without ending TLS (no close_notify): the \
                     connection was cut",
                    self.peer
                )
            } else {
                format!(
                    "{} closed the connection in the middle of a TLS record: the connection \
                     was cut",
                    self.peer
                )
            };
            return Err(self.fail(io::ErrorKind::UnexpectedEof, what));
        }
        self.raw.end += n;
        Ok(())
    }

    /// Remember a failure that ends the connection; the error to return now.
    fn fail(&mut self, kind: io::ErrorKind, what: String) -> io::Error {
        self.failed = Some((kind, what.clone()));
        io::Error::new(kind, what)
    }
}

#[cfg(test)]
mod tests {
    //! Differential tests: records this layer seals are read by rustls, and records rustls
    //! seals are read by this layer, over a handshake rustls ran in memory.
    use super::*;
    use crate::{certs, TlsClient, TlsServer, Validity};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, Connection, ServerConnection};
    use std::io::Write;

    /// rustls client and server, handshake done, one application byte (`x`) already
    /// carried from the server to the client (so the client's receiving sequence number
    /// is not 0 when its keys are taken).
    fn connected() -> (Connection, Connection) {
        let d = tempfile::tempdir().unwrap();
        certs::make(
            d.path(),
            &["dst,127.0.0.1".into(), "src".into()],
            Validity::Days(1),
            false,
        )
        .unwrap();
        let f = |n: &str| d.path().join(n);
        let srv = TlsServer::build(&f("dst.pem"), &f("dst-key.pem"), &f("ca.pem"), false).unwrap();
        let cli = TlsClient::build(
            Some((&f("src.pem"), &f("src-key.pem"))),
            &f("ca.pem"),
            None,
            false,
        )
        .unwrap();
        let name = ServerName::try_from("dst").unwrap();
        let mut c: Connection = ClientConnection::new(cli.config, name).unwrap().into();
        let mut s: Connection = ServerConnection::new(srv.config).unwrap().into();
        while c.is_handshaking() || s.is_handshaking() {
            let to_s = drain(&mut c);
            feed(&mut s, &to_s);
            let to_c = drain(&mut s);
            feed(&mut c, &to_c);
        }
        s.writer().write_all(b"x").unwrap();
        let to_c = drain(&mut s);
        assert_eq!(feed(&mut c, &to_c), b"x");
        (c, s)
    }

    /// Everything `conn` wants to send.
    fn drain(conn: &mut Connection) -> Vec<u8> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Feed `data` to `conn`; the plaintext it yields.
    fn feed(conn: &mut Connection, mut data: &[u8]) -> Vec<u8> {
        try_feed(conn, &mut data).unwrap().0
    }

    /// Feed `data` to `conn`: the plaintext, and whether close_notify arrived.
    fn try_feed(conn: &mut Connection, data: &mut &[u8]) -> Result<(Vec<u8>, bool), rustls::Error> {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if !data.is_empty() {
                conn.read_tls(data).unwrap();
            }
            conn.process_new_packets()?;
            loop {
                match conn.reader().read(&mut chunk) {
                    Ok(0) => return Ok((got, true)),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            if data.is_empty() {
                return Ok((got, false));
            }
        }
    }

    /// The client's record layer, from its extracted keys.
    fn ours(c: Connection) -> (Sealer, Opener) {
        let secrets = c.dangerous_extract_secrets().unwrap();
        assert_eq!(
            secrets.rx.0, 1,
            "the `x` record was read with the first key"
        );
        (
            Sealer::new(secrets.tx.0, secrets.tx.1).unwrap(),
            Opener::new(
                secrets.rx.0,
                secrets.rx.1,
                Role::Destination,
                3 * MAX_RECORD,
            )
            .unwrap(),
        )
    }

    fn pattern(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// A socket that hands out at most a few bytes per read, varying.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.step = (self.step * 7 + 3) % 9001 + 1;
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// Read from `sock` through `o` in reads of varying size until the end or an error.
    fn read_all(o: &mut Opener, sock: &mut impl Read) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        let mut size = 1;
        loop {
            size = (size * 31 + 17) % buf.len() + 1;
            match o.read(sock, &mut buf[..size]) {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    #[test]
    fn rustls_reads_our_records_and_close_notify() {
        let (c, mut s) = connected();
        let (mut sealer, _) = ours(c);
        let data = pattern(1_000_003, 1);
        let parts = [&data[..7], &data[7..7], &data[7..70_000], &data[70_000..]];
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        // A limit cuts the plaintext taken.
        assert_eq!(sealer.seal(&slices, 5000).unwrap(), 5000);
        let mut got = feed(&mut s, &sealer.out.clone());
        let mut at = 5000;
        while at < data.len() {
            let rest = [IoSlice::new(&data[at..])];
            let n = sealer.seal(&rest, 300_000).unwrap();
            // Full-size records only, but for the last.
            let records = n.div_ceil(MAX_PLAIN);
            assert_eq!(sealer.out.len(), n + records * (HEADER + 1 + TAG));
            got.extend(feed(&mut s, &sealer.out.clone()));
            at += n;
        }
        assert_eq!(got, data);
        // Vectored writes gather into full records.
        assert_eq!(sealer.seal(&slices, usize::MAX).unwrap(), data.len());
        assert_eq!(feed(&mut s, &sealer.out.clone()), data);
        sealer.seal_close_notify().unwrap();
        let mut wire = &sealer.out[..];
        assert_eq!(try_feed(&mut s, &mut wire).unwrap(), (vec![], true));
        let e = sealer.seal(&slices, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[test]
    fn we_read_rustls_records_and_close_notify() {
        let (c, mut s) = connected();
        let (_, mut opener) = ours(c);
        let data = pattern(777_777, 2);
        let mut wire = Vec::new();
        for part in data.chunks(50_001) {
            s.writer().write_all(part).unwrap();
            wire.extend(drain(&mut s));
        }
        s.send_close_notify();
        wire.extend(drain(&mut s));
        let mut sock = Trickle {
            data: &wire,
            step: 0,
        };
        let (got, end) = read_all(&mut opener, &mut sock);
        end.unwrap();
        assert_eq!(got, data);
        // The end stays the end.
        assert_eq!(opener.read(&mut sock, &mut [0u8; 9]).unwrap(), 0);
    }

    #[test]
    fn tampered_records_are_refused_both_ways() {
        let (c, mut s) = connected();
        let (mut sealer, mut opener) = ours(c);
        // rustls's records, one byte of the second record flipped.
        let data = pattern(3 * MAX_PLAIN, 3);
        s.writer().write_all(&data).unwrap();
        let mut wire = drain(&mut s);
        wire[MAX_RECORD + 100] ^= 0x20;
        let mut sock = &wire[..];
        let (got, end) = read_all(&mut opener, &mut sock);
        assert_eq!(got, data[..MAX_PLAIN]);
        let e = end.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("failed authentication"), "{e}");
        // And every read after it.
        let e = opener.read(&mut sock, &mut [0u8; 9]).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        // Our records, one byte flipped: rustls refuses them.
        sealer.seal(&[IoSlice::new(&data)], usize::MAX).unwrap();
        let mut out = sealer.out.clone();
        out[HEADER + 9] ^= 1;
        let mut wire = &out[..];
        assert_eq!(
            try_feed(&mut s, &mut wire).unwrap_err(),
            rustls::Error::DecryptError
        );
    }

    #[test]
    fn a_cut_stream_is_not_an_end() {
        for cut_inside_a_record in [false, true] {
            let (c, mut s) = connected();
            let (_, mut opener) = ours(c);
            let data = pattern(2 * MAX_PLAIN + 10, 4);
            s.writer().write_all(&data).unwrap();
            let mut wire = drain(&mut s);
            if cut_inside_a_record {
                wire.truncate(wire.len() - 10);
            }
            let (got, end) = read_all(&mut opener, &mut &wire[..]);
            let e = end.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            if cut_inside_a_record {
                assert_eq!(got, data[..2 * MAX_PLAIN]);
                assert!(
                    e.to_string().contains("in the middle of a TLS record"),
                    "{e}"
                );
            } else {
                assert_eq!(got, data);
                assert!(e.to_string().contains("without ending TLS"), "{e}");
            }
        }
    }

    #[test]
    fn key_updates_and_alerts_end_the_connection_with_their_reason() {
        let (c, mut s) = connected();
        let (_, mut opener) = ours(c);
        s.writer().write_all(b"before").unwrap();
        s.refresh_traffic_keys().unwrap();
        s.writer().write_all(b"after").unwrap();
        let wire = drain(&mut s);
        let (got, end) = read_all(&mut opener, &mut &wire[..]);
        assert_eq!(got, b"before");
        let e = end.unwrap_err();
        assert!(e.to_string().contains("asked for a TLS key update"), "{e}");

        // A fatal alert, sealed with the server's keys taken from rustls.
        let (c, s) = connected();
        let (_, mut opener) = ours(c);
        let keys = s.dangerous_extract_secrets().unwrap();
        let mut server = Sealer::new(keys.tx.0, keys.tx.1).unwrap();
        server.seal(&[IoSlice::new(b"data")], usize::MAX).unwrap();
        let mut wire = server.out.clone();
        server.out.clear();
        let at = server.begin(2);
        // Fatal (2), internal_error (80).
        server.out.extend_from_slice(&[2, 80]);
        server.finish(ALERT, at).unwrap();
        wire.extend_from_slice(&server.out);
        let (got, end) = read_all(&mut opener, &mut &wire[..]);
        assert_eq!(got, b"data");
        let e = end.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(
            e.to_string()
                .contains("the destination ended the TLS connection with the alert InternalError"),
            "{e}"
        );
    }

    #[test]
    fn a_key_is_not_used_past_its_limit() {
        let (c, mut s) = connected();
        let keys = c.dangerous_extract_secrets().unwrap();
        // Three records below AES-GCM's limit: two for data, one kept for close_notify.
        let mut sealer = Sealer::new((1 << 24) - 3, keys.tx.1).unwrap();
        let data = pattern(2 * MAX_PLAIN + 1, 6);
        let e = sealer.seal(&[IoSlice::new(&data)], usize::MAX).unwrap_err();
        assert!(e.to_string().contains("cannot renew it"), "{e}");
        assert_eq!(
            sealer.seal(&[IoSlice::new(&data)], 2 * MAX_PLAIN).unwrap(),
            2 * MAX_PLAIN
        );
        let e = sealer.seal(&[IoSlice::new(b"x")], 1).unwrap_err();
        assert!(e.to_string().contains("as many records as is safe"), "{e}");
        sealer.seal_close_notify().unwrap();
        // The peer, still at sequence number 0, cannot open these: the nonces moved on.
        let mut wire = &sealer.out[..];
        assert_eq!(
            try_feed(&mut s, &mut wire).unwrap_err(),
            rustls::Error::DecryptError
        );
    }

    #[test]
    fn a_read_timeout_loses_nothing() {
        let (c, mut s) = connected();
        let (_, mut opener) = ours(c);
        let data = pattern(MAX_PLAIN + 5, 5);
        s.writer().write_all(&data).unwrap();
        let wire = drain(&mut s);
        // The socket gives the first record and part of the second, then times out, then
        // gives the rest.
        struct Stutter<'a>(&'a [u8], usize, bool);
        impl Read for Stutter<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.1 == 0 && !self.2 {
                    self.2 = true;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = buf.len().min(self.0.len()).min(self.1.max(1));
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                self.1 = self.1.saturating_sub(n);
                Ok(n)
            }
        }
        let mut sock = Stutter(&wire, HEADER + MAX_PLAIN + 1 + TAG + 10, false);
        let mut got = vec![0u8; data.len()];
        let n = opener.read(&mut sock, &mut got).unwrap();
        assert_eq!(n, MAX_PLAIN);
        let e = opener.read(&mut sock, &mut got[n..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let mut n2 = 0;
        while n + n2 < data.len() {
            n2 += opener.read(&mut sock, &mut got[n + n2..]).unwrap();
        }
        assert_eq!(got, data);
    }
}
