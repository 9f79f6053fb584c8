//! [`TlsStream`]: an established TLS connection over TCP that two threads can use at once,
//! one reading and one writing, like a `TcpStream` and its `try_clone`.
//!
//! After the handshake rustls hands over the traffic keys and esvm runs the record layer
//! itself ([`crate::record`]: why, and what it leaves out). The two directions are
//! independent objects, each behind its own mutex, so a thread reading acknowledgements
//! never waits for one sealing pages, and neither lock is shared between directions:
//!
//! * Writing locks the [`Sealer`] (so that records leave in the order they were sealed),
//!   seals up to [`WRITE_BATCH`] bytes of plaintext in place into full-size records and
//!   sends them with one socket write.
//! * Reading locks the [`Opener`], which hands out plaintext it already opened, opens the
//!   whole records it holds in place, or reads the socket (its read timeout applies, as on
//!   plain TCP) up to [`READ_BUFFER`] bytes at a time.
//!
//! A relay thread with a socket pair would have kept the engine's two plain handles, but
//! costs two more copies of every byte and a thread switch per chunk; measured throughput
//! is in BENCHMARKS.md.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::error::Role;
use crate::record::{Opener, Sealer, MAX_RECORD};

/// How much plaintext one write seals before sending it (sixteen full TLS records).
pub(crate) const WRITE_BATCH: usize = 16 * 16 * 1024;

/// How much ciphertext one socket read may take in (about sixteen full TLS records).
pub(crate) const READ_BUFFER: usize = 16 * MAX_RECORD;

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
    /// The sending direction; held while its records go to the socket.
    write: Mutex<Sealer>,
    /// The receiving direction; held while its reader waits on the socket.
    read: Mutex<Opener>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding a lock leaves a connection no worse than a
    // cut one: the next record either seals/opens or fails with a TLS error.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TlsStream {
    /// Wrap a connection whose handshake is complete: the two directions' record layers,
    /// and `peer` names the other end.
    pub(crate) fn new(tcp: TcpStream, sealer: Sealer, opener: Opener, peer: Role) -> Self {
        TlsStream {
            inner: Arc::new(Inner {
                tcp,
                peer,
                write: Mutex::new(sealer),
                read: Mutex::new(opener),
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
        let n = w.seal(bufs, WRITE_BATCH)?;
        let res = (&self.inner.tcp).write_all(&w.out);
        if res.is_err() {
            // Part of a record may have left: nothing after it could be opened.
            w.closed = true;
        }
        res.map(|()| n)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        lock(&self.inner.read).read(&mut &self.inner.tcp, buf)
    }
}

impl Inner {
    fn close_notify(&self) -> io::Result<()> {
        let mut w = lock(&self.write);
        if w.closed {
            return Ok(());
        }
        w.seal_close_notify()?;
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
