//! TLS for esvm's migration transport: TLS 1.3 only (rustls with the `ring` provider),
//! mutual authentication by certificates from one CA.
//!
//! * [`TlsServer`] (the destination, `esvm receive --tls-*`) requires a client certificate
//!   chaining to its CA; [`TlsClient`] (the source, `esvm ctl migrate --tls-*`) checks the
//!   destination's certificate against its CA and the destination's name (the URL's host,
//!   an IP address checked against the certificate's IP SANs, or `--tls-name`).
//! * [`TlsServer::accept`] and [`TlsClient::connect`] run the handshake on a connected TCP
//!   socket and return a [`TlsStream`], which the migration engine reads and writes from
//!   two threads like a socket.
//! * Every refusal is a [`HandshakeError`] that says which end refused what and what to do.
//!
//! One application byte ends the handshake: the destination sends [`ACCEPTED`] once it
//! has verified the source's certificate. In TLS 1.3 the client finishes its handshake
//! before the server has checked the client's certificate, so without this byte a refused
//! source would learn it only at its first read, in the middle of the migration protocol.

pub mod certs;
mod config;
mod error;
mod record;
mod stream;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

pub use certs::{CertsError, Validity};
pub use config::{load_certs, load_key, ConfigError, TlsClient, TlsServer};
pub use error::{map_handshake_error, utc, HandshakeError, Role};
pub use stream::TlsStream;

/// The byte the destination sends once the handshake has verified the source.
pub const ACCEPTED: u8 = 0x01;

/// The first four bytes of a plain esvm migration frame (its magic).
const MIGRATION_MAGIC: &[u8; 4] = b"EMIG";

/// How long a handshake may take by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsServer {
    /// Run the destination's side of the handshake on `tcp` (read and write timeouts set to
    /// `timeout`; the engine sets its own afterwards). A peer that sends a plain esvm
    /// migration stream is refused with [`HandshakeError::PlainMigration`].
    pub fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<TlsStream, HandshakeError> {
        let conn =
            ServerConnection::new(self.config.clone()).map_err(|source| HandshakeError::Tls {
                peer: Role::Source,
                source,
            })?;
        handshake(tcp, conn.into(), Role::Source, timeout)
    }
}

impl TlsClient {
    /// Run the source's side of the handshake on `tcp`, checking the destination's
    /// certificate against `host` (the URL's host; `--tls-name` overrides it).
    pub fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<TlsStream, HandshakeError> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => {
                // `[::1]` in a URL is the address ::1.
                let bare = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                ServerName::try_from(bare.to_string()).map_err(|e| HandshakeError::Tls {
                    peer: Role::Destination,
                    source: rustls::Error::General(format!(
                        "{host:?} is not a DNS name or IP address to check the destination's \
                         certificate against ({e}); give one with --tls-name"
                    )),
                })?
            }
        };
        let conn = ClientConnection::new(self.config.clone(), name).map_err(|source| {
            HandshakeError::Tls {
                peer: Role::Destination,
                source,
            }
        })?;
        handshake(tcp, conn.into(), Role::Destination, timeout)
    }
}

/// Bytes per second one core seals with AES-128-GCM (ring, as rustls uses it), over
/// `total` bytes in 16 KiB records (TLS's largest): the ceiling of a TLS migration stream's
/// sender on this machine.
pub fn aes_128_gcm_rate(total: usize) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let Ok(key) = UnboundKey::new(&AES_128_GCM, &[7u8; 16]) else {
        return 0.0;
    };
    let key = LessSafeKey::new(key);
    let mut rec = vec![0x5au8; 16 * 1024];
    let n = (total / rec.len()).max(1);
    let start = std::time::Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let nonce = Nonce::assume_unique_for_key(nonce);
        if key
            .seal_in_place_separate_tag(nonce, Aad::from([0x17u8, 3, 3, 0, 0]), &mut rec)
            .is_err()
        {
            return 0.0;
        }
    }
    (n * rec.len()) as f64 / start.elapsed().as_secs_f64()
}

fn io_err(peer: Role, e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HandshakeError::Timeout { peer, secs: 0 }
        }
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => HandshakeError::ClosedInHandshake { peer },
        _ => HandshakeError::Io { peer, source: e },
    }
}

/// Refuse a peer whose first bytes are not a TLS record (handshake 0x16 or alert 0x15,
/// version 0x03): a plain esvm migration stream gets its own error.
fn check_first_bytes(peer: Role, b: &[u8]) -> Result<(), HandshakeError> {
    if b.starts_with(MIGRATION_MAGIC) || MIGRATION_MAGIC.starts_with(b) {
        return Err(HandshakeError::PlainMigration { peer });
    }
    if matches!(b, [0x15 | 0x16, 0x03, ..] | [0x15 | 0x16]) {
        return Ok(());
    }
    let hex: String = b.iter().take(8).map(|x| format!("{x:02x}")).collect();
    Err(HandshakeError::NotTls {
        peer,
        what: format!("its first bytes are 0x{hex}, not a TLS record"),
    })
}

fn handshake(
    tcp: TcpStream,
    mut conn: Connection,
    peer: Role,
    timeout: Duration,
) -> Result<TlsStream, HandshakeError> {
    let secs = timeout.as_secs().max(1);
    let set = tcp
        .set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)));
    set.map_err(|source| HandshakeError::Io { peer, source })?;
    let timed = |e: HandshakeError| match e {
        HandshakeError::Timeout { peer, .. } => HandshakeError::Timeout { peer, secs },
        e => e,
    };
    let is_client = matches!(conn, Connection::Client(_));
    let mut buf = Vec::with_capacity(record::MAX_RECORD);
    let mut first = true;
    // The client waits for the destination's ACCEPTED byte after the TLS handshake.
    let mut confirmed = !is_client;
    // The destination sends it once the handshake has verified the source.
    let mut accepted_sent = is_client;
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut &tcp)
                .map_err(|e| timed(io_err(peer, e)))?;
        }
        if !conn.is_handshaking() {
            if !accepted_sent {
                conn.writer()
                    .write_all(&[ACCEPTED])
                    .map_err(|e| io_err(peer, e))?;
                accepted_sent = true;
                continue;
            }
            if confirmed {
                break;
            }
            let mut b = [0u8; 1];
            match conn.reader().read(&mut b) {
                Ok(1) if b[0] == ACCEPTED => {
                    confirmed = true;
                    continue;
                }
                Ok(1) => {
                    return Err(HandshakeError::NotTls {
                        peer,
                        what: format!(
                            "after the TLS handshake it sent 0x{:02x}, not the esvm \
                             acceptance byte",
                            b[0]
                        ),
                    })
                }
                Ok(_) => return Err(HandshakeError::ClosedInHandshake { peer }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err(peer, e)),
            }
        }
        read_record(&tcp, &mut buf, &mut first, peer).map_err(timed)?;
        let mut data = &buf[..];
        while !data.is_empty() {
            conn.read_tls(&mut data).map_err(|e| io_err(peer, e))?;
            if let Err(e) = conn.process_new_packets() {
                // Send the alert rustls queued, so the peer learns why (best effort).
                while conn.wants_write() {
                    if conn.write_tls(&mut &tcp).is_err() {
                        break;
                    }
                }
                return Err(map_handshake_error(peer, e));
            }
        }
    }
    // The handshake read whole records only, so the socket holds everything after them;
    // rustls may still hold plaintext that came with the last one (and the peer's end).
    let mut early = Vec::new();
    let mut eof = false;
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => early.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // The peer cut the connection after its last record: the next read says so.
            Err(_) => break,
        }
    }
    let tls = |source| HandshakeError::Tls { peer, source };
    let secrets = conn.dangerous_extract_secrets().map_err(tls)?;
    let sealer = record::Sealer::new(secrets.tx.0, secrets.tx.1).map_err(tls)?;
    let mut opener =
        record::Opener::new(secrets.rx.0, secrets.rx.1, peer, stream::READ_BUFFER).map_err(tls)?;
    opener.preload(&early, eof);
    Ok(TlsStream::new(tcp, sealer, opener, peer))
}

/// Read exactly one TLS record (header and body) from `tcp` into `buf`, so that the
/// handshake takes nothing from the socket beyond its own records: what follows belongs to
/// esvm's record layer. The first bytes from the peer are checked to be TLS.
fn read_record(
    tcp: &TcpStream,
    buf: &mut Vec<u8>,
    first: &mut bool,
    peer: Role,
) -> Result<(), HandshakeError> {
    let mut hdr = [0u8; 5];
    let mut got = 0;
    while got < hdr.len() {
        let n = match (&*tcp).read(&mut hdr[got..]) {
            Ok(0) => return Err(HandshakeError::ClosedInHandshake { peer }),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(peer, e)),
        };
        got += n;
        if std::mem::take(first) {
            check_first_bytes(peer, &hdr[..got])?;
        }
    }
    let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
    buf.clear();
    buf.extend_from_slice(&hdr);
    buf.resize(hdr.len() + len, 0);
    (&*tcp)
        .read_exact(&mut buf[hdr.len()..])
        .map_err(|e| io_err(peer, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};
    use std::path::{Path, PathBuf};

    const T: Duration = Duration::from_secs(10);

    /// A CA in `dir` with hosts `dst` (names dst, 127.0.0.1) and `src`.
    fn lab(dir: &Path) {
        certs::make(
            dir,
            &["dst,127.0.0.1".into(), "src".into()],
            Validity::Days(2),
            false,
        )
        .unwrap();
    }

    fn p(dir: &Path, f: &str) -> PathBuf {
        dir.join(f)
    }

    fn server(dir: &Path, host: &str) -> TlsServer {
        TlsServer::build(
            &p(dir, &format!("{host}.pem")),
            &p(dir, &format!("{host}-key.pem")),
            &p(dir, "ca.pem"),
            false,
        )
        .unwrap()
    }

    fn client(dir: &Path, host: Option<&str>, ca: &Path, name: Option<&str>) -> TlsClient {
        let id = host.map(|h| (p(dir, &format!("{h}.pem")), p(dir, &format!("{h}-key.pem"))));
        TlsClient::build(
            id.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            ca,
            name,
            false,
        )
        .unwrap()
    }

    /// Run a handshake between `s` and `c` (connecting to `host`); both results.
    fn pair(
        s: &TlsServer,
        c: &TlsClient,
        host: &str,
    ) -> (
        Result<TlsStream, HandshakeError>,
        Result<TlsStream, HandshakeError>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = s.clone();
        let t = std::thread::spawn(move || s.accept(l.accept().unwrap().0, T));
        let c = c.connect(TcpStream::connect(addr).unwrap(), host, T);
        (t.join().unwrap(), c)
    }

    fn errs(
        r: (
            Result<TlsStream, HandshakeError>,
            Result<TlsStream, HandshakeError>,
        ),
    ) -> (String, String) {
        let (s, c) = r;
        (
            s.expect_err("the destination must refuse").to_string(),
            c.expect_err("the source must fail").to_string(),
        )
    }

    #[test]
    fn mutual_tls_carries_both_directions_and_half_closes() {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let ca = p(d.path(), "ca.pem");
        let (s, c) = pair(
            &server(d.path(), "dst"),
            &client(d.path(), Some("src"), &ca, None),
            "127.0.0.1",
        );
        let (s, c) = (s.unwrap(), c.unwrap());
        // A read times out like a socket's (the engine polls for cancel this way), and the
        // stream works on afterwards.
        c.configure(Duration::from_millis(20), T).unwrap();
        let mut b = [0u8; 4];
        let e = (&c).read(&mut b).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        (&s).write_all(b"ping").unwrap();
        (&c).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        s.configure(T, T).unwrap();
        c.configure(T, T).unwrap();
        // The source writes a large stream on one handle while reading on a clone.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let c = c.try_clone().unwrap();
            let big = big.clone();
            std::thread::spawn(move || {
                (&c).write_all(&big).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
            })
        };
        let echo = std::thread::spawn({
            let s = s.try_clone().unwrap();
            move || {
                let mut got = Vec::new();
                (&s).read_to_end(&mut got).unwrap();
                (&s).write_all(b"ack").unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                got
            }
        });
        let mut reply = Vec::new();
        (&c).read_to_end(&mut reply).unwrap();
        writer.join().unwrap();
        assert_eq!(echo.join().unwrap(), big);
        assert_eq!(reply, b"ack");
    }

    fn sha256(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .to_vec()
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

    /// A connected source (client) and destination (server) stream.
    fn established() -> (TlsStream, TlsStream) {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let ca = p(d.path(), "ca.pem");
        let (s, c) = pair(
            &server(d.path(), "dst"),
            &client(d.path(), Some("src"), &ca, None),
            "127.0.0.1",
        );
        let (s, c) = (s.unwrap(), c.unwrap());
        s.configure(T, T).unwrap();
        c.configure(T, T).unwrap();
        (c, s)
    }

    #[test]
    fn both_directions_carry_large_streams_at_once() {
        let (c, s) = established();
        // Each end writes on one thread while reading on another, in writes of odd sizes
        // (some vectored), both directions at once.
        let run = |me: TlsStream, seed: u32| {
            let data = pattern(24_000_017 + seed as usize, seed);
            let digest = sha256(&data);
            let w = me.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                let mut at = 0;
                let mut step = 1;
                while at < data.len() {
                    step = (step * 13 + 7) % 300_000 + 1;
                    let end = (at + step).min(data.len());
                    let mid = (at + end) / 2;
                    let bufs = [
                        io::IoSlice::new(&data[at..mid]),
                        io::IoSlice::new(&data[mid..end]),
                    ];
                    at += (&w).write_vectored(&bufs).unwrap();
                }
                w.shutdown(Shutdown::Write).unwrap();
            });
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                (&me).read_to_end(&mut got).unwrap();
                sha256(&got)
            });
            (writer, reader, digest)
        };
        let (cw, cr, c_sent) = run(c, 11);
        let (sw, sr, s_sent) = run(s, 12);
        cw.join().unwrap();
        sw.join().unwrap();
        assert_eq!(
            sr.join().unwrap(),
            c_sent,
            "the destination read what the source sent"
        );
        assert_eq!(
            cr.join().unwrap(),
            s_sent,
            "the source read what the destination sent"
        );
    }

    #[test]
    fn dropping_the_last_handle_ends_tls_cleanly() {
        let (c, s) = established();
        let c2 = c.try_clone().unwrap();
        (&c).write_all(b"bye").unwrap();
        drop(c);
        // Another handle keeps the connection open.
        (&c2).write_all(b"!").unwrap();
        drop(c2);
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye!");
        // The end stays the end.
        assert_eq!((&s).read(&mut [0u8; 4]).unwrap(), 0);
    }

    /// A relay between a source and a destination that passes the first `pass` bytes from
    /// the source, then flips one bit (`flip`) or cuts the connection (not `flip`).
    fn meddler(pass: usize, flip: bool) -> (TlsStream, TlsStream) {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let ca = p(d.path(), "ca.pem");
        let srv = server(d.path(), "dst");
        let cli = client(d.path(), Some("src"), &ca, None);
        let real = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let real_addr = real.local_addr().unwrap();
        let relay_addr = relay.local_addr().unwrap();
        std::thread::spawn(move || {
            let (from_src, _) = relay.accept().unwrap();
            let to_dst = TcpStream::connect(real_addr).unwrap();
            let (mut a, mut b) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
            // The destination's answers go back unchanged.
            std::thread::spawn(move || {
                let _ = io::copy(&mut a, &mut b);
                let _ = b.shutdown(Shutdown::Write);
            });
            let (mut r, mut w) = (from_src, to_dst);
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen = 0;
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if seen + n > pass {
                    let i = pass - seen;
                    if !flip {
                        let _ = w.write_all(&buf[..i]);
                        let _ = w.shutdown(Shutdown::Both);
                        let _ = r.shutdown(Shutdown::Both);
                        return;
                    }
                    buf[i] ^= 0x04;
                }
                seen += n;
                if w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(Shutdown::Write);
        });
        let t = std::thread::spawn(move || srv.accept(real.accept().unwrap().0, T));
        let c = cli
            .connect(TcpStream::connect(relay_addr).unwrap(), "127.0.0.1", T)
            .unwrap();
        let s = t.join().unwrap().unwrap();
        (c, s)
    }

    #[test]
    fn a_record_altered_in_transit_is_refused() {
        let (c, s) = meddler(200_000, true);
        let w = std::thread::spawn(move || {
            let _ = (&c).write_all(&pattern(1 << 20, 7));
            c
        });
        let mut got = Vec::new();
        let e = (&s).read_to_end(&mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .contains("a TLS record from the source failed authentication"),
            "{e}"
        );
        assert!(
            got.len() < 200_000,
            "nothing after the altered record is handed out"
        );
        drop(s);
        drop(w.join().unwrap());
    }

    #[test]
    fn a_connection_cut_without_close_notify_is_an_error() {
        let (c, s) = meddler(300_000, false);
        let w = std::thread::spawn(move || {
            let _ = (&c).write_all(&pattern(1 << 20, 8));
            c
        });
        let mut got = Vec::new();
        let e = (&s).read_to_end(&mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("the connection was cut"), "{e}");
        assert!(got.len() < 300_000);
        drop(s);
        drop(w.join().unwrap());
    }

    #[test]
    fn the_source_checks_the_destination() {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let ca = p(d.path(), "ca.pem");
        let good = client(d.path(), Some("src"), &ca, None);
        // Wrong name: the certificate holds dst and 127.0.0.1.
        let (s, c) = errs(pair(&server(d.path(), "dst"), &good, "localhost"));
        assert!(
            c.contains("certificate is for dst, 127.0.0.1, not for localhost"),
            "{c}"
        );
        assert!(c.contains("--tls-name"), "{c}");
        assert!(s.contains("refused this end's certificate"), "{s}");
        // --tls-name overrides the URL's host.
        let named = client(d.path(), Some("src"), &ca, Some("dst"));
        let (s, c) = pair(&server(d.path(), "dst"), &named, "localhost");
        assert!(s.is_ok() && c.is_ok());
        // Expired.
        certs::make(
            d.path(),
            &["old,127.0.0.1".into()],
            Validity::Expired,
            false,
        )
        .unwrap();
        let (s, c) = errs(pair(&server(d.path(), "old"), &good, "127.0.0.1"));
        assert!(
            c.contains("the destination's certificate expired at"),
            "{c}"
        );
        assert!(c.contains("renew it"), "{c}");
        assert!(
            s.contains("the source refused this end's certificate: it expired"),
            "{s}"
        );
        // Self-signed.
        certs::make(
            d.path(),
            &["selfie,127.0.0.1".into()],
            Validity::Days(1),
            true,
        )
        .unwrap();
        let (s, c) = errs(pair(&server(d.path(), "selfie"), &good, "127.0.0.1"));
        assert!(
            c.contains("does not chain to the CA given with --tls-ca"),
            "{c}"
        );
        assert!(
            s.contains("does not chain to the CA the source trusts"),
            "{s}"
        );
        // From another CA.
        let other = tempfile::tempdir().unwrap();
        lab(other.path());
        let (s, c) = errs(pair(&server(other.path(), "dst"), &good, "127.0.0.1"));
        assert!(c.contains("self-signed or issued by another CA"), "{c}");
        assert!(
            s.contains("does not chain to the CA the source trusts"),
            "{s}"
        );
    }

    #[test]
    fn the_destination_checks_the_source() {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let ca = p(d.path(), "ca.pem");
        let srv = server(d.path(), "dst");
        // No client certificate.
        let (s, c) = errs(pair(&srv, &client(d.path(), None, &ca, None), "127.0.0.1"));
        assert!(
            s.contains("the source presented no client certificate"),
            "{s}"
        );
        assert!(
            c.contains("requires a certificate and this end presented none"),
            "{c}"
        );
        // A client certificate from another CA (trusting the right one).
        let other = tempfile::tempdir().unwrap();
        lab(other.path());
        let foreign = TlsClient::build(
            Some((&p(other.path(), "src.pem"), &p(other.path(), "src-key.pem"))),
            &ca,
            None,
            false,
        )
        .unwrap();
        let (s, c) = errs(pair(&srv, &foreign, "127.0.0.1"));
        assert!(s.contains("the source's certificate does not chain"), "{s}");
        assert!(
            c.contains("does not chain to the CA the destination trusts"),
            "{c}"
        );
        // An expired client certificate.
        certs::make(d.path(), &["oldsrc".into()], Validity::Expired, false).unwrap();
        let (s, c) = errs(pair(
            &srv,
            &client(d.path(), Some("oldsrc"), &ca, None),
            "127.0.0.1",
        ));
        assert!(s.contains("the source's certificate expired at"), "{s}");
        assert!(
            c.contains("the destination refused this end's certificate: it expired"),
            "{c}"
        );
    }

    #[test]
    fn a_plain_peer_is_named_as_such() {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let srv = server(d.path(), "dst");
        // A plain migration stream to a TLS destination.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut plain = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        plain.write_all(b"EMIG\x01\x00 plain hello").unwrap();
        let e = srv
            .accept(l.accept().unwrap().0, T)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("plain (unencrypted, unauthenticated) migration stream"),
            "{e}"
        );
        // A TLS source to a plain destination answering with a migration frame.
        let ca = p(d.path(), "ca.pem");
        let c = client(d.path(), Some("src"), &ca, None);
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"EMIG\x01\x00 error frame").unwrap();
        });
        let e = c
            .connect(TcpStream::connect(addr).unwrap(), "127.0.0.1", T)
            .unwrap_err()
            .to_string();
        t.join().unwrap();
        assert!(e.contains("the destination answered without TLS"), "{e}");
    }

    #[test]
    fn files_are_checked_up_front() {
        let d = tempfile::tempdir().unwrap();
        lab(d.path());
        let (ca, cert, key) = (
            p(d.path(), "ca.pem"),
            p(d.path(), "dst.pem"),
            p(d.path(), "dst-key.pem"),
        );
        let e = |r: Result<TlsServer, ConfigError>| r.unwrap_err().to_string();
        let missing = p(d.path(), "nope.pem");
        let m = e(TlsServer::load(&missing, &key, &ca));
        assert!(
            m.contains("cannot read the TLS certificate file") && m.contains("nope.pem"),
            "{m}"
        );
        let m = e(TlsServer::load(&key, &key, &ca));
        assert!(m.contains("holds no certificate"), "{m}");
        let m = e(TlsServer::load(&cert, &cert, &ca));
        assert!(m.contains("holds no private key"), "{m}");
        let m = e(TlsServer::load(&cert, &p(d.path(), "src-key.pem"), &ca));
        assert!(m.contains("does not belong to the certificate"), "{m}");
        let junk = p(d.path(), "junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let m = e(TlsServer::load(&cert, &key, &junk));
        assert!(m.contains("junk.pem is not valid PEM"), "{m}");
        certs::make(d.path(), &["old".into()], Validity::Expired, false).unwrap();
        let m = e(TlsServer::load(
            &p(d.path(), "old.pem"),
            &p(d.path(), "old-key.pem"),
            &ca,
        ));
        assert!(m.contains("old.pem expired at"), "{m}");
        let other = tempfile::tempdir().unwrap();
        lab(other.path());
        let m = e(TlsServer::load(&cert, &key, &p(other.path(), "ca.pem")));
        assert!(m.contains("does not chain to the CA in"), "{m}");
        TlsServer::load(&cert, &key, &ca).unwrap();
        TlsClient::load(
            Some((&p(d.path(), "src.pem"), &p(d.path(), "src-key.pem"))),
            &ca,
            Some("dst"),
        )
        .unwrap();
        let m = TlsClient::load(None, &ca, Some("bad name!"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("--tls-name"), "{m}");
    }
}
