//! Where a live migration travels: the migration URL ([`MigrationUrl`]: `tcp://HOST:PORT`,
//! `unix:PATH` or `fd:N`), the destination's listener ([`Listener`]), the source's
//! connection ([`connect`]) and a connection inherited from a parent process
//! ([`inherited_stream`]). All of them yield an [`esvm_migration::MigrationStream`].
//!
//! * `tcp://HOST:PORT` (`tcp:HOST:PORT` is read the same): between hosts.
//! * `unix:PATH`: a Unix stream socket, for moves on one host (no network stack, file
//!   permissions decide who may connect). The destination creates the socket file and
//!   removes it when it stops listening.
//! * `fd:N`: a socket that is already connected, inherited by `esvm receive` from the
//!   process that started it (a management process, or a VMM live update that connected
//!   both sides itself). The source VMM cannot take a descriptor from `esvm ctl`, so
//!   `migrate` refuses `fd:`.

use std::fmt;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use esvm_migration::MigrationStream;
use thiserror::Error;

/// The forms a migration URL may take, for error messages.
const FORMS: &str = "use tcp://HOST:PORT (tcp:HOST:PORT is read the same, e.g. \
                     tcp://127.0.0.1:7000 or tcp://[::1]:7000; the port is 0..=65535), \
                     unix:PATH (a Unix socket, e.g. unix:/run/esvm/mig.sock) or fd:N (an \
                     inherited connected socket, `esvm receive` only)";

/// A migration URL this VMM cannot use.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum UrlError {
    #[error("unsupported migration URL {0:?}: {FORMS}")]
    Unsupported(String),
    #[error("migration URL {0:?}: unix:PATH needs a path, e.g. unix:/run/esvm/mig.sock")]
    NoUnixPath(String),
    #[error(
        "migration URL {0:?}: fd:N needs a descriptor number of 3 or more (0, 1 and 2 are \
         esvm's stdin, stdout and stderr), e.g. fd:3"
    )]
    BadFd(String),
    #[error(
        "fd:{0} cannot be a migration destination: fd:N hands `esvm receive --listen fd:N` a \
         connection its parent made, but the source VMM cannot take a descriptor from `esvm \
         ctl`; migrate to tcp://HOST:PORT or unix:PATH instead"
    )]
    FdNotForMigrate(RawFd),
    #[error(
        "migration URL unix:{}: the control API needs an absolute socket path (the VMM's \
         working directory is not the client's)",
        .0.display()
    )]
    RelativeUnixPath(PathBuf),
    #[error("cannot make unix:{} absolute: {source}", .path.display())]
    Absolute {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A migration URL: one parser ([`FromStr`]) and one canonical printed form
/// ([`fmt::Display`]: `tcp://HOST:PORT`, `unix:PATH`, `fd:N`) that parses back to the same
/// value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// `HOST:PORT`, as `TcpStream::connect` and `TcpListener::bind` take it.
    Tcp(String),
    /// The path of a Unix stream socket.
    Unix(PathBuf),
    /// An inherited, connected socket (`esvm receive` only).
    Fd(RawFd),
}

impl FromStr for MigrationUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        if let Some(path) = url.strip_prefix("unix:") {
            // `unix://x` would be a path "//x": almost certainly not what was meant.
            if path.is_empty() || path.starts_with("//") {
                return Err(UrlError::NoUnixPath(url.to_string()));
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        if let Some(n) = url.strip_prefix("fd:") {
            let bad = || UrlError::BadFd(url.to_string());
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let fd: RawFd = n.parse().map_err(|_| bad())?;
            if fd < 3 {
                return Err(bad());
            }
            return Ok(MigrationUrl::Fd(fd));
        }
        let rest = url
            .strip_prefix("tcp://")
            .or_else(|| url.strip_prefix("tcp:"))
            .ok_or_else(|| UrlError::Unsupported(url.to_string()))?;
        let bad = || UrlError::Unsupported(url.to_string());
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || rest.contains('/') {
            return Err(bad());
        }
        if host.starts_with('[') != host.ends_with(']') {
            return Err(bad());
        }
        Ok(MigrationUrl::Tcp(rest.to_string()))
    }
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUrl::Tcp(addr) => write!(f, "tcp://{addr}"),
            MigrationUrl::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUrl::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

impl MigrationUrl {
    /// A `unix:` path made absolute against the current directory (what a command line
    /// means by a relative path); other URLs unchanged.
    pub fn absolute(self) -> Result<Self, UrlError> {
        match self {
            MigrationUrl::Unix(p) if !p.is_absolute() => std::path::absolute(&p)
                .map(MigrationUrl::Unix)
                .map_err(|source| UrlError::Absolute { path: p, source }),
            other => Ok(other),
        }
    }

    /// Refused unless the source VMM can connect to it: `fd:` is for `esvm receive` only,
    /// and a `unix:` path must be absolute (the VMM's working directory is not the
    /// client's).
    pub fn for_migrate(self) -> Result<Self, UrlError> {
        match self {
            MigrationUrl::Fd(fd) => Err(UrlError::FdNotForMigrate(fd)),
            MigrationUrl::Unix(p) if !p.is_absolute() => Err(UrlError::RelativeUnixPath(p)),
            other => Ok(other),
        }
    }
}

/// The canonical form of a TCP migration address `HOST:PORT`: `tcp://HOST:PORT`.
pub fn tcp_url(addr: impl fmt::Display) -> String {
    MigrationUrl::Tcp(addr.to_string()).to_string()
}

/// Why the destination cannot listen.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum ListenError {
    #[error("cannot listen on {url}: {source}")]
    Bind {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot listen on unix:{}: the file exists and is not a socket; choose another path \
         (esvm does not remove files it did not create)",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error(
        "cannot listen on unix:{}: another process is listening on this socket; stop it or \
         choose another path",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("fd:{0} is a connection, not a place to listen: use it with `inherited_stream`")]
    Fd(RawFd),
}

/// The destination's listening socket. A Unix socket's file is removed when the listener
/// is dropped (if it is still the one this listener created).
#[derive(Debug)]
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a Unix socket at `path`; `id` is the socket file's (device, inode).
    Unix {
        /// The listening socket.
        listener: UnixListener,
        /// Its file.
        path: PathBuf,
        /// The file's (device, inode) when it was created.
        id: (u64, u64),
    },
}

impl Listener {
    /// Listen on `url` (`tcp:` or `unix:`). A `unix:` path that exists is refused unless it
    /// is a stale socket nobody listens on (left by a killed esvm), which is replaced.
    pub fn bind(url: &MigrationUrl) -> Result<Self, ListenError> {
        let bind_err = |source| ListenError::Bind {
            url: url.to_string(),
            source,
        };
        match url {
            MigrationUrl::Tcp(addr) => TcpListener::bind(addr).map(Listener::Tcp).map_err(bind_err),
            MigrationUrl::Fd(fd) => Err(ListenError::Fd(*fd)),
            MigrationUrl::Unix(path) => {
                match std::fs::symlink_metadata(path) {
                    Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
                        Ok(_) => return Err(ListenError::InUse(path.clone())),
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            std::fs::remove_file(path).map_err(bind_err)?;
                        }
                        Err(e) => return Err(bind_err(e)),
                    },
                    Ok(_) => return Err(ListenError::NotASocket(path.clone())),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(bind_err(e)),
                }
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                    id: (md.dev(), md.ino()),
                })
            }
        }
    }

    /// The URL this listener accepts on, in canonical form (for TCP with the port the
    /// system chose for port 0).
    pub fn local_url(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(tcp_url),
            Listener::Unix { path, .. } => Ok(MigrationUrl::Unix(path.clone()).to_string()),
        }
    }

    /// Wait for a connection: the stream and a description of the peer for messages (its
    /// address for TCP; Unix peers are unnamed, so the socket's URL and the peer's process
    /// id if the system tells it).
    pub fn accept(&self) -> io::Result<(MigrationStream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                Ok((s.into(), peer.to_string()))
            }
            Listener::Unix { listener, path, .. } => {
                let (s, _) = listener.accept()?;
                let peer = unix_peer(&s, path);
                Ok((s.into(), peer))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, id, .. } = self {
            // Only our own socket: another esvm may have replaced a file it found stale.
            let ours = std::fs::symlink_metadata(&*path)
                .map(|md| (md.dev(), md.ino()) == *id)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(&*path);
            }
        }
    }
}

/// A Unix peer for messages: `unix:PATH (pid N)` when the system tells the peer's pid.
fn unix_peer(s: &UnixStream, path: &Path) -> String {
    let url = MigrationUrl::Unix(path.to_path_buf());
    match peer_pid(s) {
        Some(pid) => format!("{url} (pid {pid})"),
        None => url.to_string(),
    }
}

/// The process id of a Unix socket's peer (SO_PEERCRED), if known.
fn peer_pid(s: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is the open socket `s` borrows; `cred` and `len` are valid,
    // writable and `len` is `cred`'s size, so the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// How long the source waits for a TCP connection to one address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect the source to the destination at `url` (`tcp:` or `unix:`); `cancelled` is
/// asked between the addresses a host name resolves to. The error says what failed.
pub fn connect(
    url: &MigrationUrl,
    cancelled: &dyn Fn() -> bool,
) -> Result<MigrationStream, String> {
    match url {
        MigrationUrl::Tcp(addr) => {
            let addrs: Vec<_> = addr
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {addr}: {e}"))?
                .collect();
            let mut last = format!("{addr} resolves to no address");
            for a in addrs {
                if cancelled() {
                    return Err("cancelled before connecting".into());
                }
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(s) => return Ok(s.into()),
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            Err(last)
        }
        MigrationUrl::Unix(path) => UnixStream::connect(path)
            .map(Into::into)
            .map_err(|e| format!("{}: {e}", path.display())),
        MigrationUrl::Fd(fd) => Err(UrlError::FdNotForMigrate(*fd).to_string()),
    }
}

/// Why `fd:N` cannot be used.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum FdError {
    #[error(
        "fd:{fd} is not an open file descriptor in this process ({source}); the parent must \
         leave descriptor {fd} open (not close-on-exec) when it starts esvm"
    )]
    NotOpen {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error(
        "fd:{0} was opened by esvm itself (it is close-on-exec), not inherited from the \
         parent; pass the number of a descriptor the parent left open for esvm"
    )]
    NotInherited(RawFd),
    #[error("fd:{fd} is {what}, not a socket: fd:N takes a connected stream socket")]
    NotASocket { fd: RawFd, what: &'static str },
    #[error(
        "fd:{0} is not a stream socket (datagram or other): fd:N takes a connected TCP or Unix \
         stream socket"
    )]
    NotAStream(RawFd),
    #[error(
        "fd:{0} is a socket of a family esvm cannot migrate over: fd:N takes a TCP (IPv4/IPv6) \
         or Unix stream socket"
    )]
    Family(RawFd),
    #[error(
        "fd:{0} is a socket that is not connected (a listening socket?): fd:N takes a \
         connection; to accept connections, listen with tcp://HOST:PORT or unix:PATH"
    )]
    NotConnected(RawFd),
    #[error("fd:{fd}: {what} failed: {source}")]
    Query {
        fd: RawFd,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What kind of file a `st_mode` describes, for messages.
fn file_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a pipe",
        libc::S_IFCHR => "a character device (a terminal?)",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "not a socket",
    }
}

/// Take the connected stream socket on descriptor `fd`, inherited from the parent process
/// (`fd:N`). Checked first, each with its own error: open, inherited (not close-on-exec:
/// every descriptor Rust's standard library opens is close-on-exec, so one without the
/// flag was not opened by esvm and nothing in esvm owns it), a socket, a stream, TCP or
/// Unix, connected. The descriptor is then owned by the returned stream (closed with it)
/// and made close-on-exec, so it does not leak into processes esvm starts.
///
/// Call it at most once per descriptor: a second call finds it close-on-exec and refuses.
pub fn inherited_stream(fd: RawFd) -> Result<MigrationStream, FdError> {
    if fd < 3 {
        return Err(FdError::NotInherited(fd));
    }
    // SAFETY: F_GETFD reads the descriptor flags of any integer; an invalid one gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 {
        return Err(FdError::NotOpen {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(FdError::NotInherited(fd));
    }
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (checked above) and `st` is a valid, writable `stat`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(FdError::Query {
            fd,
            what: "fstat",
            source: io::Error::last_os_error(),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(FdError::NotASocket {
            fd,
            what: file_kind(st.st_mode),
        });
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; `ty` and `len` are valid and `len` is `ty`'s size.
    if unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(FdError::Query {
            fd,
            what: "getsockopt(SO_TYPE)",
            source: io::Error::last_os_error(),
        });
    }
    if ty != libc::SOCK_STREAM {
        return Err(FdError::NotAStream(fd));
    }
    // SAFETY: an all-zero `sockaddr_storage` is a valid value of this plain C struct.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; `addr` is writable for `len` bytes (its whole size).
    if unsafe {
        libc::getpeername(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return Err(FdError::NotConnected(fd));
        }
        return Err(FdError::Query {
            fd,
            what: "getpeername",
            source: e,
        });
    }
    let family = libc::c_int::from(addr.ss_family);
    if ![libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].contains(&family) {
        return Err(FdError::Family(fd));
    }
    // SAFETY: `fd` is open and was inherited from the parent (not close-on-exec, which
    // every descriptor opened in this process through Rust's standard library is), so no
    // other owner exists in this process; from here the returned stream owns it, and the
    // close-on-exec flag set next makes a second `inherited_stream(fd)` refuse it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `fd` is open (owned just above); F_SETFD only changes its flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } == -1 {
        return Err(FdError::Query {
            fd,
            what: "fcntl(F_SETFD)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(if family == libc::AF_UNIX {
        UnixStream::from(owned).into()
    } else {
        TcpStream::from(owned).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, IntoRawFd};

    fn url(s: &str) -> Result<MigrationUrl, UrlError> {
        s.parse()
    }

    #[test]
    fn urls_parse_and_print_canonically() {
        assert_eq!(
            url("tcp://127.0.0.1:7000").unwrap(),
            MigrationUrl::Tcp("127.0.0.1:7000".into())
        );
        assert_eq!(
            url("tcp:localhost:1").unwrap(),
            MigrationUrl::Tcp("localhost:1".into())
        );
        assert_eq!(
            url("tcp://[::1]:9").unwrap(),
            MigrationUrl::Tcp("[::1]:9".into())
        );
        assert_eq!(
            url("unix:/run/m.sock").unwrap(),
            MigrationUrl::Unix("/run/m.sock".into())
        );
        assert_eq!(url("fd:3").unwrap(), MigrationUrl::Fd(3));
        // Every accepted spelling prints in one canonical form that parses back to itself.
        for (given, canonical) in [
            ("tcp:127.0.0.1:7000", "tcp://127.0.0.1:7000"),
            ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7000"),
            ("tcp:[::1]:9", "tcp://[::1]:9"),
            ("unix:/tmp/a b.sock", "unix:/tmp/a b.sock"),
            ("fd:42", "fd:42"),
        ] {
            let u = url(given).unwrap();
            assert_eq!(u.to_string(), canonical);
            assert_eq!(url(canonical).unwrap(), u);
        }
        let listened: std::net::SocketAddr = "127.0.0.1:41234".parse().unwrap();
        assert_eq!(
            url(&tcp_url(listened)).unwrap(),
            MigrationUrl::Tcp(listened.to_string())
        );
        let e = url("http://h:1").unwrap_err().to_string();
        assert!(
            e.contains("use tcp://HOST:PORT") && e.contains("unix:PATH"),
            "{e}"
        );
        for bad in [
            "udp://h:1",
            "tcp://h",
            "tcp://:1",
            "tcp://h:99999",
            "tcp://h:1/x",
            "h:1",
            "tcp://[::1:9",
            "unix:",
            "unix:///tmp/x",
            "fd:",
            "fd:-1",
            "fd:+3",
            "fd:2",
            "fd:x",
            "fd:99999999999",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert!(url("fd:1").unwrap_err().to_string().contains("3 or more"));
        assert!(url("unix:")
            .unwrap_err()
            .to_string()
            .contains("needs a path"));
    }

    #[test]
    fn relative_unix_paths_and_fd_in_migrate() {
        let rel = url("unix:m.sock").unwrap();
        let e = rel.clone().for_migrate().unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let abs = rel.absolute().unwrap();
        assert_eq!(
            abs,
            MigrationUrl::Unix(std::env::current_dir().unwrap().join("m.sock"))
        );
        assert_eq!(abs.clone().for_migrate().unwrap(), abs);
        let e = url("fd:3").unwrap().for_migrate().unwrap_err().to_string();
        assert!(e.contains("esvm receive --listen fd:N"), "{e}");
        let tcp = url("tcp:h:1").unwrap();
        assert_eq!(tcp.clone().absolute().unwrap().for_migrate().unwrap(), tcp);
    }

    #[test]
    fn unix_listener_refuses_files_replaces_stale_sockets_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        let e = Listener::bind(&MigrationUrl::Unix(file.clone())).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let sock = dir.path().join("m.sock");
        let u = MigrationUrl::Unix(sock.clone());
        let l = Listener::bind(&u).unwrap();
        assert_eq!(l.local_url().unwrap(), u.to_string());
        let client = std::thread::spawn({
            let u = u.clone();
            move || {
                let mut s = connect(&u, &|| false).unwrap();
                s.write_all(b"hi").unwrap();
            }
        });
        let (mut s, peer) = l.accept().unwrap();
        assert!(peer.starts_with(&u.to_string()), "{peer}");
        assert!(
            peer.contains(&format!("pid {}", std::process::id())),
            "{peer}"
        );
        let mut buf = [0; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        client.join().unwrap();
        // A live socket is not taken over.
        let e = Listener::bind(&u).unwrap_err();
        assert!(
            e.to_string().contains("another process is listening"),
            "{e}"
        );
        drop(l);
        assert!(!sock.exists(), "the socket file is removed");
        // A stale socket (its listener gone without removing it) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop(stale);
        assert!(sock.exists());
        let l = Listener::bind(&u).unwrap();
        drop(l);
        assert!(!sock.exists());
        let e = connect(&u, &|| false).unwrap_err();
        assert!(e.contains("m.sock"), "{e}");
    }

    /// A descriptor without close-on-exec, as if inherited.
    fn inheritable(fd: OwnedFd) -> RawFd {
        let raw = fd.into_raw_fd();
        // SAFETY: `raw` is open (just released from its owner); only its flags change.
        assert_eq!(unsafe { libc::fcntl(raw, libc::F_SETFD, 0) }, 0);
        raw
    }

    #[test]
    fn inherited_streams_are_checked_and_owned() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = inheritable(a.into());
        let mut s = inherited_stream(fd).unwrap();
        assert!(matches!(s, MigrationStream::Unix(_)));
        // Owned now (close-on-exec): a second take is refused.
        let e = inherited_stream(fd).unwrap_err();
        assert!(matches!(e, FdError::NotInherited(_)), "{e}");
        (&b).write_all(b"x").unwrap();
        let mut buf = [0; 1];
        s.read_exact(&mut buf).unwrap();
        drop(s);
        // The stream closed the descriptor.
        let mut rest = Vec::new();
        (&b).read_to_end(&mut rest).unwrap();

        // A connected TCP socket becomes a TCP stream.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = inheritable(c.into());
        assert!(matches!(
            inherited_stream(fd).unwrap(),
            MigrationStream::Tcp(_)
        ));

        // A descriptor esvm opened itself (close-on-exec) is refused, and left alone.
        let f = tempfile::tempfile().unwrap();
        let e = inherited_stream(f.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("opened by esvm itself"), "{e}");
        // A regular file, a listening socket, a datagram socket.
        let fd = inheritable(tempfile::tempfile().unwrap().into());
        let e = inherited_stream(fd).unwrap_err().to_string();
        assert!(e.contains("a regular file, not a socket"), "{e}");
        // SAFETY: `fd` is open and owned by nobody (the refused take did not own it).
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        let fd = inheritable(l.into());
        let e = inherited_stream(fd).unwrap_err().to_string();
        assert!(e.contains("not connected"), "{e}");
        // SAFETY: as above.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        let (d, _d2) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let fd = inheritable(d.into());
        let e = inherited_stream(fd).unwrap_err().to_string();
        assert!(e.contains("not a stream socket"), "{e}");
        // SAFETY: as above.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        // A closed descriptor: a high number nothing uses.
        let e = inherited_stream(4000).unwrap_err().to_string();
        assert!(e.contains("not an open file descriptor"), "{e}");
    }
}
