//! Helpers shared by the scenario tests that drive real `esvm` processes.

#![allow(dead_code)]

pub mod proxy;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use esvm_control::ApiClient;

pub const ESVM: &str = env!("CARGO_BIN_EXE_esvm");

/// A running esvm process whose stdout and stderr are collected in the background.
pub struct Proc {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

pub fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    })
}

impl Proc {
    pub fn spawn(netns: Option<&str>, args: &[&str]) -> Proc {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ESVM]);
                c
            }
            None => Command::new(ESVM),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start esvm");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), err.clone()),
        ];
        Proc {
            child,
            out,
            err,
            readers,
        }
    }

    /// Like [`Proc::spawn`] (no network namespace) with stdin a pipe the caller writes.
    pub fn spawn_with_stdin(args: &[&str]) -> (Proc, std::process::ChildStdin) {
        let mut child = Command::new(ESVM)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start esvm");
        let stdin = child.stdin.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), err.clone()),
        ];
        (
            Proc {
                child,
                out,
                err,
                readers,
            },
            stdin,
        )
    }

    /// Start a prepared esvm command (e.g. one handed a descriptor), stdin null, stdout and
    /// stderr collected.
    pub fn spawn_command(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start esvm");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), err.clone()),
        ];
        Proc {
            child,
            out,
            err,
            readers,
        }
    }

    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// The process id (e.g. to send it a signal).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Wait for the process to exit (at most `timeout`), then for its output.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "esvm did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        status.code().unwrap_or(-1)
    }

    /// Wait until stdout contains `what`.
    pub fn wait_stdout(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stdout().contains(what) {
            if Instant::now() > deadline || !self.alive() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "no {what:?} on esvm's stdout\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait until stderr contains `what`; returns the stderr so far.
    pub fn wait_stderr(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self.stderr();
            if e.contains(what) {
                return e;
            }
            if Instant::now() > deadline || !self.alive() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "no {what:?} on esvm's stderr\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Proc {
    /// Kill the process (if it still runs) and reap it.
    pub fn kill(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until the VM's API answers on `sock`.
pub fn wait_socket(p: &mut Proc, sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ApiClient::connect(sock).is_err() {
        assert!(
            p.alive() && Instant::now() < deadline,
            "the API socket {} did not appear\nstderr:\n{}",
            sock.display(),
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `esvm ARGS`, run to its end.
pub fn esvm(args: &[&str]) -> Output {
    Command::new(ESVM)
        .args(args)
        .output()
        .expect("cannot run esvm")
}

pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(ESVM)
        .args(["ctl", "--api-socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .expect("cannot run esvm ctl")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn ctl_ok(sock: &Path, args: &[&str]) -> String {
    let o = ctl(sock, args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "esvm ctl {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// `esvm ctl vcpus` as JSON.
pub fn vcpus_of(sock: &Path) -> serde_json::Value {
    serde_json::from_str(&ctl_ok(sock, &["--json", "vcpus"])).expect("vcpus prints JSON")
}

/// vCPU `cpu`'s run state as `esvm ctl vcpus` reports it.
pub fn vcpu_run_state(sock: &Path, cpu: usize) -> String {
    vcpus_of(sock)[cpu]["run_state"]
        .as_str()
        .unwrap_or("(none)")
        .to_string()
}

/// Ask until vCPU `cpu` reports `want` (a running guest's vCPUs move between states), for
/// at most a minute.
pub fn wait_vcpu_state(sock: &Path, cpu: usize, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = vcpu_run_state(sock, cpu);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vCPU {cpu} never reported {want:?} (last: {got:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small deterministic RNG (xorshift64*), seeded per test.
pub struct Rng(u64);

impl Rng {
    pub fn new(test: &str) -> Rng {
        let seed = std::env::var("ESVM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: seed {seed} (set ESVM_TEST_SEED={seed} to replay)");
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A migrated guest's two halves: the source ends (0) after the move, the destination
/// finishes the guest (0), and the source's output followed by the destination's is the
/// output of a run that never moved.
#[allow(dead_code)] // not every test file migrates
pub fn assert_halves_make_the_whole(src: &mut Proc, dst: &mut Proc, expected: &str) {
    assert_eq!(src.wait(Duration::from_secs(30)), 0, "{}", src.stderr());
    assert_eq!(dst.wait(Duration::from_secs(120)), 0, "{}", dst.stderr());
    assert_eq!(
        src.stdout() + &dst.stdout(),
        expected,
        "source:\n{}\ndestination:\n{}",
        src.stdout(),
        dst.stdout()
    );
}

/// `esvm run --api-socket SOCK --start-paused --mem MEM demo -- ARGS` (in network namespace
/// `netns` if given), or with `sev = Some(PLATFORM)` the SEV-ES demo
/// (`--sev-es --platform PLATFORM ... sevdemo`); returns once the API socket is up.
#[allow(dead_code)] // not every test file migrates
pub fn paused_demo(
    netns: Option<&str>,
    sock: &Path,
    mem: &str,
    guest_args: &str,
    sev: Option<&Path>,
) -> Proc {
    let mut args = vec![
        "run",
        "--api-socket",
        sock.to_str().unwrap(),
        "--start-paused",
        "--mem",
        mem,
    ];
    if let Some(p) = sev {
        args.extend(["--sev-es", "--platform", p.to_str().unwrap(), "sevdemo"]);
    } else {
        args.push("demo");
    }
    args.push("--");
    args.extend(guest_args.split(' '));
    let mut p = Proc::spawn(netns, &args);
    wait_socket(&mut p, sock);
    p
}
