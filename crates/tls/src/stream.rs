//! [`TlsStream`]: an established TLS connection over TCP that two threads can use at once,
//! one reading and one writing, like a `TcpStream` and its `try_clone`.
//!
//! rustls keeps a connection's state in one object (`rustls::Connection`), while the
//! migration engine reads acknowledgements on one handle while it writes pages on another.
//! The design: the connection sits behind a mutex that is held only while rustls encrypts
//! or decrypts, never while a thread waits on the socket.
//!
//! * Writing locks `write` (the socket's sending side, so that records leave in the order
//!   they were sealed), then the connection just long enough to seal the plaintext into
//!   records, then writes the records to the socket with only `write` held.
//! * Reading takes buffered plaintext if there is some; otherwise it reads the socket with
//!   no lock held (the socket's read timeout applies, as on plain TCP), then locks the
//!   connection to feed and open the records.
//!
//! The reader never waits on the writer: a message rustls wants to send in answer to
//! something it read (a TLS 1.3 KeyUpdate response; esvm's peers never request one, and
//! the server sends no session tickets) goes out with the next write.
//! A relay thread with a socket pair would have kept the engine's two plain handles, but
//! costs two more copies of every byte and a thread switch per chunk; measured throughput
//! is in BENCHMARKS.md.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::Connection;

use crate::error::{explain_stream_error, Role};

/// How much ciphertext one socket read takes in (four full TLS records).
const READ_CHUNK: usize = 4 * 16 * 1024 + 256;

/// An established TLS 1.3 connection (handshake done, peer verified). Clones share the
/// connection: one may read while another writes.
#[derive(Clone)]
pub struct TlsStream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.inner.tcp)
            .field("peer", &self.inner.peer)
            .finish_non_exhaustive()
    }
}

struct Inner {
    tcp: TcpStream,
    /// Who the other end is (for messages).
    peer: Role,
    conn: Mutex<Connection>,
    /// Held while records go to the socket; the buffer they are sealed into.
    write: Mutex<WriteSide>,
    /// Only the reading thread uses it; a mutex because handles are shared.
    read_buf: Mutex<RawBuf>,
}

struct WriteSide {
    out: Vec<u8>,
    /// close_notify was sent: nothing may follow it.
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding a lock leaves a connection no worse than a
    // cut one: the next record either seals/opens or fails with a TLS error.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TlsStream {
    /// Wrap a connection whose handshake is complete. `peer` names the other end.
    pub(crate) fn new(tcp: TcpStream, mut conn: Connection, peer: Role) -> Self {
        // Writes seal whole buffers at once (the records go out right after).
        conn.set_buffer_limit(None);
        TlsStream {
            inner: Arc::new(Inner {
                tcp,
                peer,
                conn: Mutex::new(conn),
                write: Mutex::new(WriteSide {
                    out: Vec::new(),
                    closed: false,
                }),
                read_buf: Mutex::new(RawBuf {
                    buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
            }),
        }
    }

    /// The TCP socket underneath (addresses, options).
    pub fn tcp(&self) -> &TcpStream {
        &self.inner.tcp
    }

    /// TCP_NODELAY and the read and write timeouts of the socket.
    pub fn configure(&self, read: Duration, write: Duration) -> io::Result<()> {
        let s = &self.inner.tcp;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(read))?;
        s.set_write_timeout(Some(write))
    }

    /// Another handle to the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }

    /// Half-close like a socket: shutting down writing first sends TLS close_notify (the
    /// peer then reads a clean end of stream), then shuts the socket's direction(s).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            // Best effort: a socket that is already gone cannot carry the alert.
            let _ = self.inner.close_notify();
        }
        self.inner.tcp.shutdown(how)
    }

    /// Seal `bufs` into records and send them; returns the plaintext bytes taken.
    fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut w = lock(&self.inner.write);
        if w.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection was closed for writing (close_notify sent)",
            ));
        }
        let n = {
            let mut conn = lock(&self.inner.conn);
            let mut n = 0;
            for b in bufs {
                n += conn.writer().write(b)?;
            }
            w.out.clear();
            while conn.wants_write() {
                conn.write_tls(&mut w.out)?;
            }
            n
        };
        let res = (&self.inner.tcp).write_all(&w.out);
        if res.is_err() {
            // Part of a record may have left: nothing after it could be opened.
            w.closed = true;
        }
        res.map(|()| n)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut raw = lock(&self.inner.read_buf);
        loop {
            let mut conn = lock(&self.inner.conn);
            match conn.reader().read(buf) {
                // n == 0: the peer's close_notify, a clean end of stream.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} closed the connection without ending TLS (no close_notify): \
                             the connection was cut",
                            self.inner.peer
                        ),
                    ))
                }
                Err(e) => return Err(e),
            }
            if raw.start == raw.end {
                // No plaintext and no ciphertext left: wait on the socket without holding
                // the connection (the writer seals meanwhile).
                drop(conn);
                let RawBuf { buf: b, .. } = &mut *raw;
                let n = (&self.inner.tcp).read(b)?;
                raw.start = 0;
                raw.end = n;
                conn = lock(&self.inner.conn);
            }
            // Feed what rustls takes (it refuses more while its plaintext buffer is full,
            // hence the offsets); at end of stream (nothing read) this records the end.
            let RawBuf { buf: b, start, end } = &mut *raw;
            let mut data = &b[*start..*end];
            let took = conn.read_tls(&mut data)?;
            *start += took;
            if let Err(e) = conn.process_new_packets() {
                let msg = explain_stream_error(self.inner.peer, &e);
                return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
            }
        }
    }
}

/// Ciphertext read from the socket that rustls has not taken yet: `buf[start..end]`.
struct RawBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Inner {
    fn close_notify(&self) -> io::Result<()> {
        let mut w = lock(&self.write);
        if w.closed {
            return Ok(());
        }
        w.closed = true;
        {
            let mut conn = lock(&self.conn);
            conn.send_close_notify();
            w.out.clear();
            while conn.wants_write() {
                conn.write_tls(&mut w.out)?;
            }
        }
        // Nothing is written after close_notify, so the socket's write timeout can shrink:
        // a peer that stopped reading must not hold up the end of a failed migration (a
        // plain socket's shutdown does not wait either).
        let _ = self.tcp.set_write_timeout(Some(CLOSE_TIMEOUT));
        (&self.tcp).write_all(&w.out)
    }
}

/// How long sending close_notify may wait for room in the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle: end TLS cleanly so the peer reads an end of stream rather than
        // a cut (as dropping a TcpStream sends FIN).
        let _ = self.close_notify();
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.send(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.send(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
