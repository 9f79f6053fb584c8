//! The API server and client over real Unix sockets in a temporary directory.

use esvm_control::mock::MockTarget;
use esvm_control::{
    ApiClient, ApiServer, ClientError, ControlTarget, ErrorCode, MigrateRequest, MigrationPhase,
    OnTimeout, Reply, Request, Response, ServerConfig, ServerError, VmState, VmType,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn setup() -> (tempfile::TempDir, PathBuf, Arc<MockTarget>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    (dir, path, Arc::new(MockTarget::new(VmType::SevEs)))
}

fn serve(path: &Path, target: &Arc<MockTarget>) -> ApiServer {
    ApiServer::spawn(path, target.clone() as Arc<dyn ControlTarget + Send + Sync>).unwrap()
}

fn code_of(r: Result<Reply, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api(e)) => {
            assert!(!e.message.is_empty());
            e.code
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A raw connection: writes lines, reads response lines as JSON values.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    fn send(&mut self, line: &[u8]) {
        self.w.write_all(line).unwrap();
        self.w.write_all(b"\n").unwrap();
    }
    fn recv(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("response is JSON")),
        }
    }
    fn error_code(&mut self) -> String {
        let v = self.recv().expect("a response");
        assert_eq!(v["version"], 1, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        v["error"]["code"]
            .as_str()
            .expect("an error response")
            .to_string()
    }
}

#[test]
fn every_request_round_trips() {
    let (dir, path, target) = setup();
    let _server = serve(&path, &target);
    let mut c = ApiClient::connect(&path).unwrap();

    let s = c.status().unwrap();
    assert_eq!(s.state, VmState::Running);
    assert_eq!(s.vm_type, VmType::SevEs);
    assert_eq!(s.backend, "mock");
    assert!(s.instructions.is_some());
    assert_eq!(s.migration, None);

    assert_eq!(c.call(&Request::Pause).unwrap(), Reply::Paused);
    assert_eq!(c.status().unwrap().state, VmState::Paused);
    assert_eq!(code_of(c.call(&Request::Pause)), ErrorCode::InvalidState);
    assert_eq!(c.call(&Request::Resume).unwrap(), Reply::Resumed);
    assert_eq!(code_of(c.call(&Request::Resume)), ErrorCode::InvalidState);

    let snap = dir.path().join("snap1");
    match c
        .call(&Request::Snapshot {
            dir: snap.clone(),
            force: false,
        })
        .unwrap()
    {
        Reply::SnapshotSaved(info) => {
            assert_eq!(info.dir, snap);
            let written = std::fs::metadata(snap.join("mock-snapshot.json")).unwrap();
            assert_eq!(info.bytes_written, Some(written.len()));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(target.snapshots(), vec![snap.clone()]);
    // The directory holds a snapshot now: a second one there is refused, unless forced.
    let again = |force| Request::Snapshot {
        dir: snap.clone(),
        force,
    };
    match c.call(&again(false)) {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.message.contains("not empty") && e.message.contains("--force"));
        }
        other => panic!("a non-empty directory was not refused: {other:?}"),
    }
    assert_eq!(target.snapshots().len(), 1, "the target was not asked");
    assert!(matches!(c.call(&again(true)), Ok(Reply::SnapshotSaved(_))));
    assert_eq!(target.snapshots().len(), 2);
    // An existing empty directory is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(
        c.call(&Request::Snapshot {
            dir: empty,
            force: false
        }),
        Ok(Reply::SnapshotSaved(_))
    ));
    // Relative paths would resolve against the VM's working directory: refused.
    let rel = Request::Snapshot {
        dir: "snap".into(),
        force: false,
    };
    assert_eq!(code_of(c.call(&rel)), ErrorCode::InvalidArgument);

    assert_eq!(code_of(c.call(&Request::Cancel)), ErrorCode::InvalidState);
    let req = MigrateRequest {
        url: "tcp://127.0.0.1:1".into(),
        downtime_ms: 42,
        timeout_s: 7,
        max_passes: Some(3),
        on_timeout: OnTimeout::Force,
        trust: None,
        max_bandwidth_bytes_per_sec: Some(8 << 20),
        tls: None,
        postcopy_after: None,
    };
    assert_eq!(
        c.call(&Request::Migrate(req.clone())).unwrap(),
        Reply::MigrationStarted {
            url: req.url.clone()
        }
    );
    assert_eq!(target.migrate_requests(), vec![req.clone()]);
    assert_eq!(
        code_of(c.call(&Request::Migrate(req.clone()))),
        ErrorCode::InvalidState
    );
    let mut phases = Vec::new();
    loop {
        let s = c.status().unwrap();
        let m = s.migration.expect("migration status");
        assert_eq!(m.url, req.url);
        assert_eq!(m.downtime_limit_ms, 42);
        assert_eq!(m.max_bandwidth_bytes_per_sec, Some(8 << 20));
        phases.push(m.phase);
        if m.phase.is_terminal() {
            assert_eq!(m.phase, MigrationPhase::Completed);
            assert_eq!(s.state, VmState::Migrated);
            assert!(m.bytes_sent > 0);
            break;
        }
        assert!(phases.len() < 20, "migration never ended: {phases:?}");
    }
    assert!(phases.contains(&MigrationPhase::StopAndCopy));

    // Invalid arguments are refused before they reach the VM.
    let bad = MigrateRequest {
        downtime_ms: 0,
        ..MigrateRequest::new("tcp://x:1")
    };
    assert_eq!(
        code_of(c.call(&Request::Migrate(bad))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(target.migrate_requests().len(), 1);
}

#[test]
fn cancel_and_failure_are_reported() {
    let (_dir, path, target) = setup();
    let _server = serve(&path, &target);
    let mut c = ApiClient::connect(&path).unwrap();
    c.call(&Request::Migrate(MigrateRequest::new("tcp://hang:1")))
        .unwrap();
    let m = c.status().unwrap().migration.unwrap();
    assert_eq!(m.phase, MigrationPhase::PreCopy);
    // Cancel from a second client while the first stays connected.
    let mut c2 = ApiClient::connect(&path).unwrap();
    assert_eq!(
        c2.call(&Request::Cancel).unwrap(),
        Reply::MigrationCancelled
    );
    let s = c.status().unwrap();
    assert_eq!(s.migration.unwrap().phase, MigrationPhase::Cancelled);
    assert_eq!(s.state, VmState::Running);

    c.call(&Request::Migrate(MigrateRequest::new("tcp://fail:1")))
        .unwrap();
    let m = loop {
        let m = c.status().unwrap().migration.unwrap();
        if m.phase.is_terminal() {
            break m;
        }
    };
    assert_eq!(m.phase, MigrationPhase::Failed);
    assert!(m.error.unwrap().contains("closed the connection"));
}

#[test]
fn migrate_set_changes_the_running_migrations_limits() {
    use esvm_control::{MigrateSetRequest, MigrationLimits};
    let (_dir, path, target) = setup();
    let _server = serve(&path, &target);
    let mut c = ApiClient::connect(&path).unwrap();
    let set = |bw: Option<u64>, ms: Option<u64>| {
        Request::MigrateSet(MigrateSetRequest {
            max_bandwidth_bytes_per_sec: bw,
            downtime_ms: ms,
        })
    };
    // No migration: nothing to change.
    assert_eq!(
        code_of(c.call(&set(Some(1 << 20), None))),
        ErrorCode::InvalidState
    );
    c.call(&Request::Migrate(MigrateRequest::new("tcp://hang:1")))
        .unwrap();
    assert_eq!(
        c.call(&set(Some(32 << 20), None)).unwrap(),
        Reply::MigrationLimitsSet(MigrationLimits {
            max_bandwidth_bytes_per_sec: Some(32 << 20),
            downtime_limit_ms: 300,
        })
    );
    assert_eq!(
        c.call(&set(None, Some(25))).unwrap(),
        Reply::MigrationLimitsSet(MigrationLimits {
            max_bandwidth_bytes_per_sec: Some(32 << 20),
            downtime_limit_ms: 25,
        })
    );
    let m = c.status().unwrap().migration.unwrap();
    assert_eq!(m.max_bandwidth_bytes_per_sec, Some(32 << 20));
    assert_eq!(m.downtime_limit_ms, 25);
    // Out of range or empty: refused before the VM sees it, the limits stay.
    for bad in [set(None, None), set(Some(1), None), set(None, Some(0))] {
        assert_eq!(code_of(c.call(&bad)), ErrorCode::InvalidArgument, "{bad:?}");
    }
    // 0 lifts the cap.
    c.call(&set(Some(0), None)).unwrap();
    let m = c.status().unwrap().migration.unwrap();
    assert_eq!(m.max_bandwidth_bytes_per_sec, None);
    assert_eq!(m.downtime_limit_ms, 25);
    c.call(&Request::Cancel).unwrap();
    assert_eq!(
        code_of(c.call(&set(None, Some(10)))),
        ErrorCode::InvalidState
    );
}

#[test]
fn malformed_requests_get_errors_and_the_connection_goes_on() {
    let (_dir, path, target) = setup();
    let _server = serve(&path, &target);
    let mut raw = Raw::connect(&path);
    let cases: &[(&[u8], &str)] = &[
        (b"{\"version\":1,", "bad_json"),
        (b"\xc3\x28 not utf-8", "bad_json"),
        (b"42", "bad_request"),
        (b"{\"command\":\"status\"}", "bad_request"),
        (
            b"{\"version\":9,\"command\":\"status\"}",
            "unsupported_version",
        ),
        (b"{\"version\":1,\"command\":\"reboot\"}", "bad_request"),
        (
            b"{\"version\":1,\"command\":\"pause\",\"now\":1}",
            "bad_request",
        ),
        (
            b"{\"version\":1,\"command\":\"migrate\",\"url\":\"u\",\"fast\":true}",
            "bad_request",
        ),
        (
            b"{\"version\":1,\"command\":\"migrate\",\"url\":\"\"}",
            "invalid_argument",
        ),
    ];
    for (line, code) in cases {
        raw.send(line);
        assert_eq!(raw.error_code(), *code, "{}", String::from_utf8_lossy(line));
    }
    // Blank lines are skipped without an answer; CRLF is accepted.
    raw.w
        .write_all(b"\n  \n{\"version\":1,\"command\":\"status\"}\r\n")
        .unwrap();
    let v = raw.recv().unwrap();
    assert_eq!(v["ok"]["kind"], "status", "{v}");
    assert_eq!(v["ok"]["state"], "running", "{v}");
    // Nothing reached the VM.
    assert_eq!(target.state(), VmState::Running);
    assert!(target.migrate_requests().is_empty());
}

#[test]
fn oversize_lines_are_refused_and_the_server_keeps_serving() {
    let (_dir, path, target) = setup();
    let config = ServerConfig {
        max_line_bytes: 1024,
        ..ServerConfig::default()
    };
    let _server = ApiServer::spawn_with_config(
        &path,
        target.clone() as Arc<dyn ControlTarget + Send + Sync>,
        config,
    )
    .unwrap();

    // A long line that ends: refused, and the same connection goes on.
    let mut raw = Raw::connect(&path);
    let mut long = b"{\"version\":1,\"command\":\"status\",\"pad\":\"".to_vec();
    long.resize(5000, b'x');
    long.extend_from_slice(b"\"}");
    raw.send(&long);
    assert_eq!(raw.error_code(), "line_too_long");
    raw.send(b"{\"version\":1,\"command\":\"status\"}");
    assert_eq!(raw.recv().unwrap()["ok"]["kind"], "status");

    // A line that never ends: refused and the connection closed.
    let mut raw = Raw::connect(&path);
    let mut w = raw.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'y'; 64 * 1024];
        for _ in 0..64 {
            if w.write_all(&chunk).is_err() {
                break; // the server hung up: expected
            }
        }
    });
    assert_eq!(raw.error_code(), "line_too_long");
    assert_eq!(raw.recv(), None, "the connection should be closed");
    writer.join().unwrap();

    // New clients are still served.
    let mut c = ApiClient::connect(&path).unwrap();
    assert_eq!(c.status().unwrap().state, VmState::Running);
}

#[test]
fn a_panicking_target_gets_an_internal_error_and_the_server_survives() {
    let (dir, path, target) = setup();
    let _server = serve(&path, &target);
    target.set_panic_on_snapshot(true);
    let mut c = ApiClient::connect(&path).unwrap();
    let req = Request::Snapshot {
        dir: dir.path().join("s"),
        force: false,
    };
    assert_eq!(code_of(c.call(&req)), ErrorCode::Internal);
    assert_eq!(c.status().unwrap().state, VmState::Running);
}

#[test]
fn several_clients_at_once_and_a_connection_cap() {
    let (_dir, path, target) = setup();
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let server = ApiServer::spawn_with_config(
        &path,
        target.clone() as Arc<dyn ControlTarget + Send + Sync>,
        config,
    )
    .unwrap();
    assert_eq!(server.connections(), 0);
    let mut a = ApiClient::connect(&path).unwrap();
    let mut b = ApiClient::connect(&path).unwrap();
    a.status().unwrap();
    b.call(&Request::Pause).unwrap();
    assert_eq!(server.connections(), 2);
    assert_eq!(a.status().unwrap().state, VmState::Paused);
    // A third concurrent client is told the server is busy.
    let mut c = ApiClient::connect(&path).unwrap();
    match c.request(&Request::Status) {
        Ok(Response::Error(e)) => assert_eq!(e.code, ErrorCode::Busy),
        // The server may close before our request is written.
        Err(ClientError::Closed) => {}
        other => panic!("expected busy, got {other:?}"),
    }
    // Once one leaves, a new client gets in.
    drop(a);
    let mut served = false;
    for _ in 0..200 {
        let mut d = ApiClient::connect(&path).unwrap();
        if let Ok(Response::Ok(_)) = d.request(&Request::Status) {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(served, "a slot never became free");
}

#[test]
fn idle_connections_are_closed() {
    let (_dir, path, target) = setup();
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(50),
        ..ServerConfig::default()
    };
    let _server = ApiServer::spawn_with_config(
        &path,
        target.clone() as Arc<dyn ControlTarget + Send + Sync>,
        config,
    )
    .unwrap();
    let mut raw = Raw::connect(&path);
    let mut buf = [0u8; 1];
    // The server hangs up (EOF), rather than our 20 s read timeout firing.
    assert_eq!(raw.r.read(&mut buf).unwrap(), 0);
}

#[test]
fn a_second_server_on_the_same_path_is_refused() {
    let (_dir, path, target) = setup();
    let server = serve(&path, &target);
    let err = ApiServer::spawn(
        &path,
        target.clone() as Arc<dyn ControlTarget + Send + Sync>,
    )
    .err()
    .expect("the second server must be refused");
    assert!(matches!(err, ServerError::AlreadyInUse { .. }), "{err}");
    assert!(err.to_string().contains("already listening"));
    // The first one is unharmed.
    assert_eq!(
        ApiClient::connect(server.path())
            .unwrap()
            .status()
            .unwrap()
            .state,
        VmState::Running
    );
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let (_dir, path, target) = setup();
    drop(UnixListener::bind(&path).unwrap()); // leaves the file, nobody listening
    assert!(path.exists());
    assert!(matches!(
        ApiClient::connect(&path).err().unwrap(),
        ClientError::ConnectionRefused { .. }
    ));
    let _server = serve(&path, &target);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        ApiClient::connect(&path).unwrap().status().unwrap().state,
        VmState::Running
    );
}

#[test]
fn other_files_are_never_replaced() {
    let (dir, path, target) = setup();
    std::fs::write(&path, b"precious").unwrap();
    let t = || target.clone() as Arc<dyn ControlTarget + Send + Sync>;
    let err = ApiServer::spawn(&path, t()).err().unwrap();
    assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    assert!(matches!(
        ApiClient::connect(&path).err().unwrap(),
        ClientError::NotASocket { .. }
    ));

    let err = ApiServer::spawn(dir.path().join("no/such/dir.sock"), t())
        .err()
        .unwrap();
    assert!(matches!(err, ServerError::NoDirectory { .. }), "{err}");
    let long = dir.path().join("x".repeat(120));
    let err = ApiServer::spawn(&long, t()).err().unwrap();
    assert!(matches!(err, ServerError::PathTooLong { .. }), "{err}");
    let err = ApiServer::spawn("", t()).err().unwrap();
    assert!(matches!(err, ServerError::EmptyPath), "{err}");
}

#[test]
fn shutdown_and_drop_remove_the_socket_and_close_clients() {
    let (_dir, path, target) = setup();
    let mut server = serve(&path, &target);
    let mut c = ApiClient::connect(&path).unwrap();
    c.status().unwrap();
    server.shutdown();
    assert!(!path.exists());
    assert!(matches!(c.status(), Err(ClientError::Closed)));
    assert!(matches!(c.status(), Err(ClientError::Broken)));
    assert!(matches!(
        ApiClient::connect(&path).err().unwrap(),
        ClientError::NoServer { .. }
    ));
    server.shutdown(); // idempotent
    drop(server);

    let server = serve(&path, &target);
    assert!(path.exists());
    drop(server);
    assert!(!path.exists());
}

#[test]
fn shutdown_does_not_remove_a_socket_that_is_not_ours() {
    let (_dir, path, target) = setup();
    let server = serve(&path, &target);
    // Someone removes our socket and another server takes the path.
    std::fs::remove_file(&path).unwrap();
    let other = serve(&path, &target);
    drop(server);
    assert!(path.exists());
    ApiClient::connect(&path).unwrap().status().unwrap();
    drop(other);
    assert!(!path.exists());
}

#[test]
fn client_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let err = ApiClient::connect(&missing).err().unwrap();
    assert!(matches!(err, ClientError::NoServer { .. }), "{err}");
    assert!(err.to_string().contains("--api-socket"));

    // A server that accepts but never answers: the request times out.
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut c = ApiClient::connect_with_timeout(&path, Duration::from_millis(100)).unwrap();
    let err = c.status().err().unwrap();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(matches!(c.status(), Err(ClientError::Broken)));
    drop(listener);

    // A server speaking another protocol version.
    let fake = |reply: &'static [u8]| {
        let path = dir.path().join(format!("fake{}.sock", reply.len()));
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            (&s).write_all(reply).unwrap();
        });
        let mut c = ApiClient::connect(&path).unwrap();
        let res = c.request(&Request::Status);
        t.join().unwrap();
        res
    };
    let err = fake(b"{\"version\":2,\"ok\":{\"kind\":\"paused\"}}\n")
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::VersionMismatch { ours: 1, theirs: 2 }),
        "{err}"
    );
    assert!(err.to_string().contains("same esvm release"));
    let err = fake(b"hello\n").err().unwrap();
    assert!(matches!(err, ClientError::BadResponse(_)), "{err}");
    let err = fake(b"").err().unwrap();
    assert!(matches!(err, ClientError::Closed), "{err}");
}

/// A mock whose `shutdown` takes a while, as a real VM's does (it waits for the run loop
/// to end, and the VMM shuts the API server down right after).
struct SlowShutdown(MockTarget);

impl ControlTarget for SlowShutdown {
    fn status(&self) -> esvm_control::VmStatus {
        self.0.status()
    }
    fn pause(&self) -> Result<(), esvm_control::ApiError> {
        self.0.pause()
    }
    fn resume(&self) -> Result<(), esvm_control::ApiError> {
        self.0.resume()
    }
    fn snapshot(&self, dir: &Path) -> Result<esvm_control::SnapshotInfo, esvm_control::ApiError> {
        self.0.snapshot(dir)
    }
    fn start_migration(&self, req: MigrateRequest) -> Result<(), esvm_control::ApiError> {
        self.0.start_migration(req)
    }
    fn cancel_migration(&self) -> Result<(), esvm_control::ApiError> {
        self.0.cancel_migration()
    }
    fn shutdown(&self) -> Result<esvm_control::VmStatus, esvm_control::ApiError> {
        std::thread::sleep(Duration::from_millis(300));
        self.0.shutdown()
    }
}

#[test]
fn shutdown_answers_with_the_end_even_while_the_server_stops() {
    let (_dir, path, _) = setup();
    let target = Arc::new(SlowShutdown(MockTarget::default()));
    let mut server = ApiServer::spawn(
        &path,
        target.clone() as Arc<dyn ControlTarget + Send + Sync>,
    )
    .unwrap();
    let mut c = ApiClient::connect(&path).unwrap();
    let waiting = std::thread::spawn(move || c.shutdown());
    // The request is being served when the server shuts down: its answer still goes out.
    std::thread::sleep(Duration::from_millis(100));
    server.shutdown();
    let end = waiting.join().unwrap().unwrap();
    assert_eq!(end.state, VmState::Exited);
    assert_eq!(end.exit_status, Some(0));
    assert_eq!(
        end.end_reason.as_deref(),
        Some("the VM was stopped by `esvm ctl shutdown`")
    );
    assert!(!path.exists());
}

/// The owner's side of a launch that waits: the measurement, a refused packet (the launch
/// keeps waiting), the right one, a second one refused, and `resume` starting the VM.
#[test]
fn a_waiting_launch_takes_one_secret_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let target = Arc::new(MockTarget::launch_pending());
    let _server = serve(&path, &target);
    let mut c = ApiClient::connect(&path).unwrap();
    let s = c.status().unwrap();
    assert_eq!(s.state, VmState::Starting);
    assert!(s.launch_pending);
    let m = c.launch_measurement().unwrap();
    assert_eq!(m.measurement.len(), 64);
    assert!(!m.secret_injected);

    assert_eq!(
        code_of(
            c.inject_secret(b"bad packet")
                .map(|_| Reply::SecretInjected)
        ),
        ErrorCode::InvalidArgument
    );
    let mut c = ApiClient::connect(&path).unwrap();
    c.inject_secret(&[0x00, 0xff, 0x10]).unwrap();
    assert!(c.launch_measurement().unwrap().secret_injected);
    assert_eq!(target.injected_secrets(), vec![vec![0x00, 0xff, 0x10]]);
    assert_eq!(
        code_of(c.inject_secret(b"again").map(|_| Reply::SecretInjected)),
        ErrorCode::InvalidState
    );
    let mut c = ApiClient::connect(&path).unwrap();
    assert_eq!(c.call(&Request::Resume).unwrap(), Reply::Resumed);
    let s = c.status().unwrap();
    assert_eq!(s.state, VmState::Running);
    assert!(!s.launch_pending);
    assert_eq!(
        code_of(c.launch_measurement().map(Reply::LaunchMeasurement)),
        ErrorCode::InvalidState
    );
}

/// A packet that is not hex, or too large, is refused before it reaches the VM.
#[test]
fn secret_packets_are_checked_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let target = Arc::new(MockTarget::launch_pending());
    let _server = serve(&path, &target);
    let mut raw = Raw::connect(&path);
    raw.send(br#"{"version":1,"command":"inject_secret","packet_hex":"0g"}"#);
    assert_eq!(raw.error_code(), "invalid_argument");
    raw.send(br#"{"version":1,"command":"inject_secret","packet_hex":""}"#);
    assert_eq!(raw.error_code(), "invalid_argument");
    let big = format!(
        r#"{{"version":1,"command":"inject_secret","packet_hex":"{}"}}"#,
        "00".repeat(esvm_control::protocol::MAX_SECRET_PACKET_BYTES + 1)
    );
    raw.send(big.as_bytes());
    assert_eq!(raw.error_code(), "invalid_argument");
    assert!(target.injected_secrets().is_empty());
    // A plain mock VM has no launch waiting.
    let (_d2, p2, plain) = setup();
    let _s2 = serve(&p2, &plain);
    let mut c = ApiClient::connect(&p2).unwrap();
    assert_eq!(
        code_of(c.launch_measurement().map(Reply::LaunchMeasurement)),
        ErrorCode::InvalidState
    );
}
