//! TLS on the migration transport (`esvm receive --tls-*`, `esvm ctl migrate --tls-*`):
//! the handshake of [`esvm_tls`] run on a `tcp://` connection, yielding a
//! [`MigrationStream::Tls`] the engine uses like a socket.
//!
//! TLS runs over TCP only: `unix:` and `fd:` connections stay on one host (or come from a
//! parent that made them), where file permissions or the parent decide who connects.

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use esvm_control::MigrateTls;
use esvm_migration::protocol::{encode_error, ErrorCode, FrameType, FrameWriter};
use esvm_migration::MigrationStream;
pub use esvm_tls::{ConfigError, HandshakeError, TlsClient, TlsServer, HANDSHAKE_TIMEOUT};
use thiserror::Error;

use crate::transport::{self, MigrationUrl};

/// Why a TLS connection could not be made or accepted.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum TlsTransportError {
    #[error(
        "TLS runs over tcp://HOST:PORT only, not {0}: a unix: or fd: connection stays on this \
         host (file permissions or the parent process decide who connects); drop the --tls-* \
         options or use tcp://"
    )]
    NotTcp(String),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("cannot connect to the destination {url}: {message}")]
    Connect { url: String, message: String },
}

/// Load and check the files of a migration's TLS request (before connecting).
pub fn load_client(t: &MigrateTls) -> Result<TlsClient, ConfigError> {
    let id = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    TlsClient::load(id, &t.ca, t.name.as_deref())
}

/// Refuse TLS on a URL that is not `tcp://`.
pub fn check_url(url: &MigrationUrl) -> Result<(), TlsTransportError> {
    match url {
        MigrationUrl::Tcp(_) => Ok(()),
        other => Err(TlsTransportError::NotTcp(other.to_string())),
    }
}

/// Connect the source to `url`, over TLS if `tls` is given (the destination's certificate
/// is checked against the URL's host unless the client names another).
pub fn connect(
    url: &MigrationUrl,
    tls: Option<&TlsClient>,
    cancelled: &dyn Fn() -> bool,
) -> Result<MigrationStream, TlsTransportError> {
    let conn_err = |message| TlsTransportError::Connect {
        url: url.to_string(),
        message,
    };
    let Some(tls) = tls else {
        return transport::connect(url, cancelled).map_err(conn_err);
    };
    let MigrationUrl::Tcp(addr) = url else {
        return Err(TlsTransportError::NotTcp(url.to_string()));
    };
    let tcp = match transport::connect(url, cancelled).map_err(conn_err)? {
        MigrationStream::Tcp(s) => s,
        _ => return Err(TlsTransportError::NotTcp(url.to_string())),
    };
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
    Ok(tls.connect(tcp, host, HANDSHAKE_TIMEOUT)?.into())
}

/// Run the destination's handshake on an accepted connection. A source that sent a plain
/// migration stream gets a plain `Error` frame saying this destination wants TLS, so its
/// operator reads the reason rather than a cut connection.
pub fn accept(
    server: &TlsServer,
    stream: MigrationStream,
    timeout: Duration,
) -> Result<MigrationStream, TlsTransportError> {
    let tcp: TcpStream = match stream {
        MigrationStream::Tcp(s) => s,
        MigrationStream::Unix(_) => return Err(TlsTransportError::NotTcp("unix:".into())),
        MigrationStream::Tls(_) => return Err(TlsTransportError::NotTcp("tls".into())),
    };
    let reply = tcp.try_clone();
    match server.accept(tcp, timeout) {
        Ok(s) => Ok(s.into()),
        Err(e @ HandshakeError::PlainMigration { .. }) => {
            if let Ok(sock) = reply {
                let msg = "the destination accepts only TLS migrations: migrate with `esvm ctl \
                           migrate --tls-ca FILE --tls-cert FILE --tls-key FILE`";
                let mut w = FrameWriter::new(&sock);
                let _ = w.send(FrameType::Error, &[&encode_error(ErrorCode::Refused, msg)]);
                let _ = w.flush();
                let _ = sock.shutdown(Shutdown::Write);
                // Read until the source hangs up (briefly): closing with its frames unread
                // would reset the connection and could destroy the Error frame.
                let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 4096];
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while std::time::Instant::now() < deadline {
                    match (&sock).read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}
