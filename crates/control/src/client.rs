//! The API client used by `esvm ctl`.

use crate::framing::{read_line_capped, LineRead};
use crate::protocol::{
    decode_response, encode_request, to_hex, ApiError, DecodeResponseError, LaunchMeasurement,
    MalformedResponse, Reply, Request, Response, VmStatus,
};
use std::fs;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// How long [`ApiClient::connect`]'s requests wait for an answer by default.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest response line the client accepts.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Why a request could not be made or answered.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "no API socket at {path:?}: is the VM running with `esvm run --api-socket {}`?",
        path.display()
    )]
    NoServer { path: PathBuf },
    #[error(
        "nothing is listening on {path:?} (connection refused): the VM has exited and left a \
         stale socket behind, or the path is wrong"
    )]
    ConnectionRefused { path: PathBuf },
    #[error("{path:?} is not a socket; give the path passed to `esvm run --api-socket`")]
    NotASocket { path: PathBuf },
    #[error("permission denied connecting to {path:?}: run as the user that started the VM")]
    PermissionDenied { path: PathBuf },
    #[error("cannot connect to the API socket {path:?}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "the VM at {path:?} did not answer within {:.1} s (it may be hung or very busy)",
        after.as_secs_f64()
    )]
    Timeout { path: PathBuf, after: Duration },
    #[error("the VM closed the connection without answering (did it exit?)")]
    Closed,
    #[error("cannot send the request: {0}")]
    Send(#[source] io::Error),
    #[error("cannot read the response: {0}")]
    Receive(#[source] io::Error),
    #[error("cannot encode the request: {0} (paths must be valid UTF-8)")]
    Encode(#[source] serde_json::Error),
    #[error(
        "control protocol version mismatch: this esvm speaks version {ours}, the VM speaks \
         version {theirs}; use the same esvm release for `esvm ctl` and `esvm run`"
    )]
    VersionMismatch { ours: u32, theirs: u64 },
    #[error("the VM sent a malformed response: {0}")]
    BadResponse(#[source] MalformedResponse),
    #[error("the VM refused the request: {0}")]
    Api(#[source] ApiError),
    #[error("the VM answered `{command}` with an unexpected reply: {got}")]
    UnexpectedReply { command: &'static str, got: String },
    #[error("this connection failed earlier and cannot be used again; reconnect")]
    Broken,
}

impl ClientError {
    /// The API error, if the VM refused the request.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// A connection to an esvm API server.
pub struct ApiClient {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    broken: bool,
    line: Vec<u8>,
}

impl ApiClient {
    /// Connects to the server at `path`; each request then waits at most
    /// [`DEFAULT_CLIENT_TIMEOUT`] for its answer.
    pub fn connect(path: impl AsRef<Path>) -> Result<ApiClient, ClientError> {
        Self::connect_with_timeout(path, DEFAULT_CLIENT_TIMEOUT)
    }

    /// Connects to the server at `path`. `timeout` bounds sending each request and waiting
    /// for its answer. (Connecting to a Unix socket itself does not wait for the server: the
    /// kernel queues the connection, so a hung server shows up as a request timeout.)
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<ApiClient, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|e| classify_connect_error(&path, e))?;
        let reader = stream.try_clone().map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
        let mut client = ApiClient {
            path,
            writer: stream,
            reader: BufReader::new(reader),
            timeout,
            broken: false,
            line: Vec::new(),
        };
        client.set_timeout(timeout)?;
        Ok(client)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes how long requests wait (e.g. longer for a snapshot of a large VM). A zero
    /// duration is taken as 1 ms.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.writer
            .set_write_timeout(Some(timeout))
            .and_then(|_| self.writer.set_read_timeout(Some(timeout)))
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends `req` and waits for its response. An error response from the VM is a
    /// successful `Ok(Response::Error(..))` here; see [`ApiClient::call`]. After any
    /// `Err`, the connection is unusable.
    pub fn request(&mut self, req: &Request) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let result = self.exchange(req);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Like [`ApiClient::request`], with an error response turned into
    /// [`ClientError::Api`].
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        match self.request(req)? {
            Response::Ok(reply) => Ok(reply),
            Response::Error(e) => Err(ClientError::Api(e)),
        }
    }

    /// Asks for the VM's status.
    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        match self.call(&Request::Status)? {
            Reply::Status(s) => Ok(s),
            other => Err(ClientError::UnexpectedReply {
                command: "status",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Stops the VM and returns its final status (once it has ended).
    pub fn shutdown(&mut self) -> Result<VmStatus, ClientError> {
        match self.call(&Request::Shutdown)? {
            Reply::ShutDown(s) => Ok(s),
            other => Err(ClientError::UnexpectedReply {
                command: "shutdown",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Asks for the measurement of an SEV-ES launch that waits for its owner.
    pub fn launch_measurement(&mut self) -> Result<LaunchMeasurement, ClientError> {
        match self.call(&Request::LaunchMeasurement)? {
            Reply::LaunchMeasurement(m) => Ok(m),
            other => Err(ClientError::UnexpectedReply {
                command: "launch_measurement",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Sends the owner's secret packet (`esvm owner secret`) for LAUNCH_SECRET.
    pub fn inject_secret(&mut self, packet: &[u8]) -> Result<(), ClientError> {
        let req = Request::InjectSecret {
            packet_hex: to_hex(packet),
        };
        match self.call(&req)? {
            Reply::SecretInjected => Ok(()),
            other => Err(ClientError::UnexpectedReply {
                command: "inject_secret",
                got: format!("{other:?}"),
            }),
        }
    }

    fn exchange(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = encode_request(req).map_err(ClientError::Encode)?;
        line.push(b'\n');
        if let Err(e) = self
            .writer
            .write_all(&line)
            .and_then(|_| self.writer.flush())
        {
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timeout_error(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Closed,
                _ => ClientError::Send(e),
            });
        }
        match read_line_capped(&mut self.reader, &mut self.line, MAX_RESPONSE_BYTES, 0) {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) => return Err(ClientError::Closed),
            Ok(LineRead::TooLong { .. }) => {
                return Err(ClientError::BadResponse(MalformedResponse::new(format!(
                    "the response is longer than {MAX_RESPONSE_BYTES} bytes"
                ))))
            }
            Err(e) => {
                return Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.timeout_error(),
                    io::ErrorKind::ConnectionReset => ClientError::Closed,
                    _ => ClientError::Receive(e),
                })
            }
        }
        decode_response(&self.line).map_err(|e| match e {
            DecodeResponseError::VersionMismatch { ours, theirs } => {
                ClientError::VersionMismatch { ours, theirs }
            }
            DecodeResponseError::Malformed(m) => ClientError::BadResponse(m),
        })
    }

    fn timeout_error(&self) -> ClientError {
        ClientError::Timeout {
            path: self.path.clone(),
            after: self.timeout,
        }
    }
}

fn classify_connect_error(path: &Path, e: io::Error) -> ClientError {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::NotFound => ClientError::NoServer { path },
        io::ErrorKind::ConnectionRefused => match fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_socket() && !m.file_type().is_symlink() => {
                ClientError::NotASocket { path }
            }
            _ => ClientError::ConnectionRefused { path },
        },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path },
        _ => ClientError::Connect { path, source: e },
    }
}
