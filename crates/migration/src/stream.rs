//! The connection a migration runs over: a TCP or a Unix stream socket.
//!
//! [`Sender::run_stream`](crate::Sender::run_stream) and
//! [`Receiver::run_stream`](crate::Receiver::run_stream) need only what both socket types
//! offer: timeouts (how a waiting sender checks for cancel, how a receiver gives up on a
//! silent peer), a second handle for the reading direction, and shutdown (half-closing so
//! that a last `Abort` or `Error` frame is read before the connection goes).
//!
//! A TLS connection ([`esvm_tls::TlsStream`], TCP underneath) offers the same: its handles
//! share one TLS session (rustls's handshake, then esvm-tls's record layer with one lock per
//! direction), and shutting down the writing side sends TLS close_notify
//! before the TCP half-close.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected stream socket carrying a migration.
#[derive(Debug)]
pub enum MigrationStream {
    /// A TCP connection (`tcp://HOST:PORT`); TCP_NODELAY is set when a migration starts.
    Tcp(TcpStream),
    /// A Unix-domain stream socket (`unix:PATH`, or a connected socket handed over as
    /// `fd:N`).
    Unix(UnixStream),
    /// TLS 1.3 over TCP, handshake done and peer verified (`esvm receive --tls-*`, `esvm ctl
    /// migrate --tls-*`).
    Tls(esvm_tls::TlsStream),
}

impl From<esvm_tls::TlsStream> for MigrationStream {
    fn from(s: esvm_tls::TlsStream) -> Self {
        MigrationStream::Tls(s)
    }
}

impl From<TcpStream> for MigrationStream {
    fn from(s: TcpStream) -> Self {
        MigrationStream::Tcp(s)
    }
}

impl From<UnixStream> for MigrationStream {
    fn from(s: UnixStream) -> Self {
        MigrationStream::Unix(s)
    }
}

impl MigrationStream {
    /// Prepare for a migration: TCP_NODELAY on TCP (frames are written whole, Nagle only
    /// delays the small acknowledgements), and the read and write timeouts.
    pub fn configure(&self, read: Duration, write: Duration) -> io::Result<()> {
        match self {
            MigrationStream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            MigrationStream::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            MigrationStream::Tls(s) => s.configure(read, write),
        }
    }

    /// A second handle to the same connection (for the reading direction).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            MigrationStream::Tcp(s) => MigrationStream::Tcp(s.try_clone()?),
            MigrationStream::Unix(s) => MigrationStream::Unix(s.try_clone()?),
            MigrationStream::Tls(s) => MigrationStream::Tls(s.try_clone()?),
        })
    }

    /// Shut down the reading, writing or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            MigrationStream::Tcp(s) => s.shutdown(how),
            MigrationStream::Unix(s) => s.shutdown(how),
            MigrationStream::Tls(s) => s.shutdown(how),
        }
    }
}

impl Read for &MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            MigrationStream::Tcp(s) => (&*s).read(buf),
            MigrationStream::Unix(s) => (&*s).read(buf),
            MigrationStream::Tls(s) => (&*s).read(buf),
        }
    }
}

impl Write for &MigrationStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            MigrationStream::Tcp(s) => (&*s).write(buf),
            MigrationStream::Unix(s) => (&*s).write(buf),
            MigrationStream::Tls(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            MigrationStream::Tcp(s) => (&*s).write_vectored(bufs),
            MigrationStream::Unix(s) => (&*s).write_vectored(bufs),
            MigrationStream::Tls(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for MigrationStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds carry bytes both ways through the clone, honour the read timeout and
    /// half-close.
    #[test]
    fn tcp_and_unix_streams_behave_alike() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp_peer, _) = listener.accept().unwrap();
        let (unix, unix_peer) = UnixStream::pair().unwrap();
        let pairs: [(MigrationStream, MigrationStream); 2] = [
            (tcp.into(), tcp_peer.into()),
            (unix.into(), unix_peer.into()),
        ];
        for (a, b) in pairs {
            a.configure(Duration::from_millis(20), Duration::from_secs(5))
                .unwrap();
            let mut reader = a.try_clone().unwrap();
            let mut buf = [0u8; 8];
            let e = reader.read(&mut buf).unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{e}"
            );
            (&b).write_all(b"ping").unwrap();
            reader.read_exact(&mut buf[..4]).unwrap();
            assert_eq!(&buf[..4], b"ping");
            (&a).write_all(b"pong").unwrap();
            a.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            (&b).read_to_end(&mut got).unwrap();
            assert_eq!(got, b"pong");
        }
    }
}
