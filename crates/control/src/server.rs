//! The API server: a Unix socket listener serving each client on its own thread.

use crate::framing::{read_line_capped, LineRead};
use crate::protocol::{
    decode_request, encode_response, from_hex, ApiError, ErrorCode, Reply, Request, Response,
    MAX_SECRET_PACKET_BYTES,
};
use crate::target::ControlTarget;
use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;
use thiserror::Error;
use tracing::{debug, warn};

/// Longest Unix socket path (`sun_path` holds 108 bytes including the terminating NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest accepted request line in bytes (default 64 KiB). A longer line is answered
    /// with `line_too_long`.
    pub max_line_bytes: usize,
    /// Most clients connected at once (default 16); one more is answered `busy` and closed.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed (default 10 minutes).
    pub idle_timeout: Duration,
    /// A client that does not read its response within this time is dropped (default 10 s).
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_line_bytes: 64 * 1024,
            max_connections: 16,
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("the API socket path is empty; give a file path such as /run/esvm/vm1.sock")]
    EmptyPath,
    #[error(
        "the API socket path {path:?} is {len} bytes long; Unix socket paths may be at most \
         {MAX_SOCKET_PATH_BYTES} bytes — use a shorter path"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error(
        "another server is already listening on {path:?} (another esvm VM?); stop it or use \
         a different --api-socket path"
    )]
    AlreadyInUse { path: PathBuf },
    #[error(
        "{path:?} exists and is not a socket; refusing to replace it — remove it or use a \
         different --api-socket path"
    )]
    NotASocket { path: PathBuf },
    #[error("cannot inspect the existing API socket {path:?}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale API socket {path:?}: {source}; remove it by hand")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("the directory of the API socket {path:?} does not exist; create it first")]
    NoDirectory { path: PathBuf },
    #[error("cannot create the API socket {path:?}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up the API server for {path:?}: {source}")]
    Setup { path: PathBuf, source: io::Error },
}

/// A running API server. [`ApiServer::shutdown`] (or dropping it) stops it, closes its
/// connections and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    /// (device, inode) of the socket file we created, so we never remove someone else's.
    file_id: (u64, u64),
    stop: Arc<AtomicBool>,
    wake: Option<UnixStream>,
    accept_thread: Option<JoinHandle<()>>,
    conns: Connections,
}

impl ApiServer {
    /// Binds `path` with the default [`ServerConfig`] and serves `target` on a thread.
    pub fn spawn(
        path: impl AsRef<Path>,
        target: Arc<dyn ControlTarget + Send + Sync>,
    ) -> Result<ApiServer, ServerError> {
        Self::spawn_with_config(path, target, ServerConfig::default())
    }

    /// Binds `path` and serves `target` on a thread.
    ///
    /// Refuses if a server already listens on `path` or if `path` is something other than a
    /// socket; a stale socket file (nothing listening) is replaced. The socket file is
    /// made accessible to its owner only (mode 0600).
    pub fn spawn_with_config(
        path: impl AsRef<Path>,
        target: Arc<dyn ControlTarget + Send + Sync>,
        config: ServerConfig,
    ) -> Result<ApiServer, ServerError> {
        let path = path.as_ref().to_path_buf();
        check_path(&path)?;
        remove_if_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => ServerError::AlreadyInUse { path: path.clone() },
            io::ErrorKind::NotFound => ServerError::NoDirectory { path: path.clone() },
            _ => ServerError::Bind {
                path: path.clone(),
                source: e,
            },
        })?;
        // From here on, a failure must not leave our socket file behind.
        let cleanup = |source: io::Error| {
            let _ = fs::remove_file(&path);
            ServerError::Setup {
                path: path.clone(),
                source,
            }
        };
        let meta = fs::symlink_metadata(&path).map_err(cleanup)?;
        let file_id = (meta.dev(), meta.ino());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
        listener.set_nonblocking(true).map_err(cleanup)?;
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(cleanup)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Connections = Arc::new(Mutex::new(HashMap::new()));
        let accept = Acceptor {
            listener,
            wake: wake_rx,
            stop: stop.clone(),
            target,
            config: Arc::new(config),
            conns: conns.clone(),
            handles: Vec::new(),
            next_id: 0,
        };
        let accept_thread = thread::Builder::new()
            .name("esvm-api".into())
            .spawn(move || accept.run())
            .map_err(cleanup)?;
        debug!(path = %path.display(), "control API listening");
        Ok(ApiServer {
            path,
            file_id,
            stop,
            wake: Some(wake_tx),
            accept_thread: Some(accept_thread),
            conns,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many clients are connected now.
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Stops accepting, closes every connection (a request being served finishes first),
    /// waits for the server's threads and removes the socket file. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(thread) = self.accept_thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut wake) = self.wake.take() {
            // Dropping it would wake the acceptor too (hang-up); the byte is belt and braces.
            let _ = wake.write_all(&[1]);
        }
        if thread.join().is_err() {
            warn!("the control API's accept thread panicked");
        }
        // Remove the socket file only if it is still the one we created.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                if let Err(e) = fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), "cannot remove the API socket: {e}");
                }
            }
        }
        debug!(path = %self.path.display(), "control API stopped");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check_path(path: &Path) -> Result<(), ServerError> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(ServerError::EmptyPath);
    }
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(ServerError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

/// If `path` exists: refuse unless it is a socket nobody listens on, which is removed.
fn remove_if_stale(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ServerError::Inspect {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::AlreadyInUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!(path = %path.display(), "removing a stale API socket");
            fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(e) => Err(ServerError::Inspect {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

type Connections = Arc<Mutex<HashMap<u64, UnixStream>>>;

struct Acceptor {
    listener: UnixListener,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    target: Arc<dyn ControlTarget + Send + Sync>,
    config: Arc<ServerConfig>,
    conns: Connections,
    handles: Vec<JoinHandle<()>>,
    next_id: u64,
}

impl Acceptor {
    fn run(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            match self.wait() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    warn!("control API: poll failed: {e}");
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            match self.listener.accept() {
                Ok((stream, _)) => self.start_connection(stream),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!("control API: accept failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
            // Forget threads that have finished.
            self.handles.retain(|h| !h.is_finished());
        }
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        for s in conns.values() {
            // Reading only: an idle connection sees the end at once, and a request being
            // served still gets its answer (e.g. `shutdown`'s, which is the VM's end).
            let _ = s.shutdown(Shutdown::Read);
        }
        drop(conns);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }

    /// Waits until a client connects (false) or the server is told to stop (true).
    fn wait(&self) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfd structs and the length
        // passed is its length; both descriptors are owned by `self` and stay open for the
        // duration of the call. poll only writes the `revents` fields.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(fds[1].revents != 0)
    }

    fn start_connection(&mut self, stream: UnixStream) {
        let id = self.next_id;
        self.next_id += 1;
        // Accepted sockets do not inherit O_NONBLOCK on Linux, but make sure.
        let setup = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(self.config.idle_timeout)))
            .and_then(|_| stream.set_write_timeout(Some(self.config.write_timeout)))
            .and_then(|_| stream.try_clone());
        let registered = match setup {
            Ok(s) => s,
            Err(e) => {
                warn!("control API: cannot set up a connection: {e}");
                return;
            }
        };
        {
            let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
            if conns.len() >= self.config.max_connections {
                drop(conns);
                let err = ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "the VM already serves {} API connections; close one and retry",
                        self.config.max_connections
                    ),
                );
                let mut stream = stream;
                let _ = write_response(&mut stream, &Response::Error(err));
                return;
            }
            conns.insert(id, registered);
        }
        let target = self.target.clone();
        let config = self.config.clone();
        let conns = self.conns.clone();
        let spawned = thread::Builder::new()
            .name(format!("esvm-api-{id}"))
            .spawn(move || {
                serve_connection(stream, &*target, &config);
                conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            });
        match spawned {
            Ok(h) => self.handles.push(h),
            Err(e) => {
                warn!("control API: cannot start a connection thread: {e}");
                self.conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            }
        }
    }
}

fn write_response(w: &mut impl Write, resp: &Response) -> io::Result<()> {
    let mut line = encode_response(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Serves one client: a request line in, a response line out, until the client hangs up,
/// idles past the timeout, or sends a line too long to resynchronise.
fn serve_connection(stream: UnixStream, target: &dyn ControlTarget, config: &ServerConfig) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("control API: cannot clone a connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    // A too-long line is skipped up to its newline if that comes within this many bytes.
    let discard_cap = config.max_line_bytes.saturating_mul(16);
    loop {
        let read = read_line_capped(&mut reader, &mut line, config.max_line_bytes, discard_cap);
        let response = match read {
            Ok(LineRead::Eof) => return,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    debug!("control API: closing an idle connection");
                } else {
                    debug!("control API: connection read failed: {e}");
                }
                return;
            }
            Ok(LineRead::TooLong { resynced }) => {
                let resp = Response::Error(ApiError::new(
                    ErrorCode::LineTooLong,
                    format!(
                        "the request line is longer than {} bytes; requests are small JSON \
                         objects, one per line",
                        config.max_line_bytes
                    ),
                ));
                if !resynced {
                    let _ = write_response(&mut writer, &resp);
                    return;
                }
                resp
            }
            Ok(LineRead::Line) => {
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                handle_request(target, text)
            }
        };
        if let Err(e) = write_response(&mut writer, &response) {
            debug!("control API: cannot answer a client: {e}");
            return;
        }
    }
}

/// Decodes a request line, runs it against the target and returns the response.
pub(crate) fn handle_request(target: &dyn ControlTarget, line: &[u8]) -> Response {
    let req = match decode_request(line) {
        Ok(r) => r,
        Err(e) => {
            debug!("control API: bad request: {}", e.message);
            return Response::Error(e);
        }
    };
    let name = req.command_name();
    debug!("control API: {name}");
    match catch_unwind(AssertUnwindSafe(|| dispatch(target, req))) {
        Ok(result) => {
            if let Err(e) = &result {
                debug!("control API: {name} refused: {e}");
            }
            result.into()
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            warn!("control API: the VMM panicked serving {name}: {msg}");
            Response::Error(ApiError::new(
                ErrorCode::Internal,
                format!(
                    "the VMM failed while serving `{name}` (a bug; it panicked: {msg}); check \
                     the VM's log"
                ),
            ))
        }
    }
}

/// A snapshot into `dir` without `force`: refused if `dir` exists and is not an empty
/// directory (its files would be overwritten or mixed with the snapshot's).
fn refuse_non_empty(dir: &std::path::Path) -> Option<ApiError> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory || dir.is_file() => {
            return Some(ApiError::invalid_argument(format!(
                "snapshot: {} exists and is not a directory; give a new or empty directory",
                dir.display()
            )))
        }
        // Let the snapshot itself report what is wrong with it.
        Err(_) => return None,
    };
    entries.next().is_some().then(|| {
        ApiError::invalid_argument(format!(
            "snapshot: {} already exists and is not empty; give a new or empty directory, \
             or overwrite it with --force (`\"force\": true`)",
            dir.display()
        ))
    })
}

fn dispatch(target: &dyn ControlTarget, req: Request) -> Result<Reply, ApiError> {
    match req {
        Request::Status => {
            let mut s = target.status();
            s.sanitize();
            Ok(Reply::Status(s))
        }
        Request::Pause => target.pause().map(|_| Reply::Paused),
        Request::Resume => target.resume().map(|_| Reply::Resumed),
        Request::Snapshot { dir, force } => {
            if dir.as_os_str().is_empty() || !dir.is_absolute() {
                return Err(ApiError::invalid_argument(format!(
                    "snapshot: the directory must be an absolute path (the VM's working \
                     directory is not yours), got {dir:?}"
                )));
            }
            if !force {
                if let Some(e) = refuse_non_empty(&dir) {
                    return Err(e);
                }
            }
            target.snapshot(&dir).map(Reply::SnapshotSaved)
        }
        Request::Migrate(req) => {
            req.validate()?;
            let url = req.url.clone();
            target
                .start_migration(req)
                .map(|_| Reply::MigrationStarted { url })
        }
        Request::MigrateSet(req) => {
            req.validate()?;
            target
                .set_migration_limits(&req)
                .map(Reply::MigrationLimitsSet)
        }
        Request::Cancel => target.cancel_migration().map(|_| Reply::MigrationCancelled),
        Request::MigratePostcopy => target
            .switch_to_postcopy()
            .map(|_| Reply::PostcopyRequested),
        Request::Vcpus => target.vcpus().map(|vcpus| Reply::Vcpus { vcpus }),
        Request::Shutdown => target.shutdown().map(|mut s| {
            s.sanitize();
            Reply::ShutDown(s)
        }),
        Request::LaunchMeasurement => target.launch_measurement().map(Reply::LaunchMeasurement),
        Request::InjectSecret { packet_hex } => {
            let packet = from_hex(packet_hex.trim()).map_err(|e| {
                ApiError::invalid_argument(format!(
                    "inject_secret: packet_hex is not hex ({e}); send the packet file of \
                     `esvm owner secret` hex-encoded"
                ))
            })?;
            if packet.is_empty() || packet.len() > MAX_SECRET_PACKET_BYTES {
                return Err(ApiError::invalid_argument(format!(
                    "inject_secret: the packet is {} bytes; a secret packet is 1 to \
                     {MAX_SECRET_PACKET_BYTES} bytes (`esvm owner secret` writes one)",
                    packet.len()
                )));
            }
            target.inject_secret(&packet).map(|_| Reply::SecretInjected)
        }
    }
}
