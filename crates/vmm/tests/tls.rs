//! Scenario tests of migrations over TLS 1.3 with mutual authentication, with real
//! processes and real sockets: `esvm certs` makes the CA and host certificates, the demo
//! (and the SEV-ES demo) moves from `esvm run` to `esvm receive --tls-*` and finishes
//! exactly, and every refused peer is refused with a message on both sides that says what
//! is wrong, while the source guest keeps running and the destination keeps listening.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ctl, ctl_ok, esvm, text, wait_socket, Proc};

const MEM: &str = "32M";
const MEM_BYTES: u64 = 32 << 20;
const ITERATIONS: u64 = 3_000_000;

fn demo_args() -> String {
    format!("iterations={ITERATIONS} dirty-mib=2")
}

/// `esvm certs DIR --host H..` (extra flags after).
fn certs(dir: &Path, hosts: &[&str], extra: &[&str]) {
    let mut args = vec!["certs", dir.to_str().unwrap()];
    for h in hosts {
        args.extend(["--host", h]);
    }
    args.extend(extra);
    let o = esvm(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

/// The files of host `name` in `dir`: (cert, key).
fn host(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `esvm receive --listen tcp://127.0.0.1:0` with TLS from `pki` (host `dst`, unless
/// `tls` is false), plus `extra`; returns it and the URL it printed.
fn receiver(pki: &Path, tls: bool, extra: &[&str]) -> (Proc, String) {
    let (cert, key) = host(pki, "dst");
    let ca = pki.join("ca.pem");
    let mut args = vec!["receive", "--listen", "tcp://127.0.0.1:0"];
    if tls {
        args.extend([
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-ca",
            s(&ca),
        ]);
    }
    args.extend(extra);
    let mut p = Proc::spawn(None, &args);
    let err = p.wait_stderr(" for an incoming VM", Duration::from_secs(30));
    let url = err
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_string();
    (p, url)
}

/// The source: `esvm run --api-socket SOCK --start-paused` of the demo (or the SEV-ES
/// demo on `platform`), resumed.
fn source(sock: &Path, platform: Option<&Path>) -> Proc {
    let args = demo_args();
    let mut argv = vec![
        "run",
        "--api-socket",
        s(sock),
        "--start-paused",
        "--mem",
        MEM,
    ];
    if let Some(p) = platform {
        argv.extend(["--sev-es", "--platform", s(p), "sevdemo"]);
    } else {
        argv.push("demo");
    }
    argv.push("--");
    argv.extend(args.split(' '));
    let mut p = Proc::spawn(None, &argv);
    wait_socket(&mut p, sock);
    ctl_ok(sock, &["resume"]);
    p
}

/// `esvm ctl migrate URL` with the source's TLS flags from `pki` (host `src`).
fn tls_flags(pki: &Path, name: &str) -> Vec<String> {
    let (cert, key) = host(pki, name);
    vec![
        "--tls-ca".into(),
        s(&pki.join("ca.pem")).into(),
        "--tls-cert".into(),
        s(&cert).into(),
        "--tls-key".into(),
        s(&key).into(),
    ]
}

fn migrate(sock: &Path, url: &str, flags: &[String]) -> (i32, String) {
    let mut args = vec!["migrate", url];
    args.extend(flags.iter().map(String::as_str));
    let o = ctl(sock, &args);
    (
        o.status.code().unwrap_or(-1),
        text(&o.stdout) + &text(&o.stderr),
    )
}

/// Migrate over TLS and check that the guest finishes exactly.
fn move_and_finish(
    src: &mut Proc,
    sock: &Path,
    url: &str,
    flags: &[String],
    dst: &mut Proc,
    expected: &str,
) {
    let (code, out) = migrate(sock, url, flags);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("migration to {url} completed")),
        "{out}"
    );
    common::assert_halves_make_the_whole(src, dst, expected);
}

/// The demo moves over TLS (certificates from `esvm certs`, the destination's name checked
/// as the URL's IP address against its IP SAN) and finishes exactly; a TLS receiver prints
/// no plain-TCP warning.
#[test]
fn a_plain_guest_moves_over_tls_and_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["src", "dst,127.0.0.1"], &[]);
    let (mut dst, url) = receiver(&pki, true, &["--once"]);
    assert!(!dst.stderr().contains("plain TCP"), "{}", dst.stderr());
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, None);
    std::thread::sleep(Duration::from_millis(100));
    let expected = esvm_guests::demo::expected_output(MEM_BYTES, 1, &demo_args(), ITERATIONS, 2);
    move_and_finish(
        &mut src,
        &sock,
        &url,
        &tls_flags(&pki, "src"),
        &mut dst,
        &expected,
    );
}

/// An SEV-ES guest moves over TLS between two platforms and finishes exactly.
#[test]
fn an_sev_es_guest_moves_over_tls_and_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["src", "dst,127.0.0.1"], &[]);
    let ca = dir.path().join("amd");
    for p in ["p1", "p2"] {
        let o = esvm(&[
            "platform",
            "init",
            "--dir",
            s(&dir.path().join(p)),
            "--amd-ca",
            s(&ca),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    let p2 = dir.path().join("p2");
    let (mut dst, url) = receiver(&pki, true, &["--once", "--platform", s(&p2)]);
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, Some(&dir.path().join("p1")));
    let expected =
        esvm_guests::demo::expected_output_sev(MEM_BYTES, 1, &demo_args(), ITERATIONS, 2);
    move_and_finish(
        &mut src,
        &sock,
        &url,
        &tls_flags(&pki, "src"),
        &mut dst,
        &expected,
    );
}

/// A refused migration: what, to which URL, with which flags, what the source says, what
/// the destination says (None: refused before connecting).
type Case<'a> = (&'a str, String, Vec<String>, &'a str, Option<&'a str>);

/// Every refused peer: the source's `ctl migrate` fails with a message naming the cause,
/// the destination prints its side and keeps listening, the source guest keeps running;
/// at the end a correct migration to the same destination succeeds.
#[test]
fn refused_peers_are_named_on_both_sides_and_nothing_moves() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["src", "dst,127.0.0.1"], &[]);
    certs(&pki, &["oldsrc"], &["--expired"]);
    let other = dir.path().join("other");
    certs(&other, &["src"], &[]);
    let (mut dst, url) = receiver(&pki, true, &[]);
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, None);
    let ca = s(&pki.join("ca.pem")).to_string();
    let (cert, key) = host(&pki, "src");
    let localhost_url = url.replace("127.0.0.1", "localhost");
    let cases: Vec<Case> = vec![
        (
            "plain TCP to a TLS destination",
            url.clone(),
            vec![],
            "the destination accepts only TLS migrations",
            Some("the source sent a plain (unencrypted, unauthenticated) migration stream"),
        ),
        (
            "no client certificate",
            url.clone(),
            vec!["--tls-ca".into(), ca.clone()],
            "the destination requires a certificate and this end presented none",
            Some("the source presented no client certificate"),
        ),
        (
            "a source from another CA",
            url.clone(),
            tls_flags(&other, "src"),
            "the destination's certificate does not chain to the CA given with --tls-ca",
            Some("the source refused this end's certificate: it does not chain to the CA"),
        ),
        (
            "the destination's certificate is for another name",
            localhost_url.clone(),
            tls_flags(&pki, "src"),
            "the destination's certificate is for dst, 127.0.0.1, not for localhost",
            Some("the source refused this end's certificate"),
        ),
        (
            "an expired client certificate (checked before connecting)",
            url.clone(),
            tls_flags(&pki, "oldsrc"),
            "oldsrc.pem expired at",
            None,
        ),
        (
            "a CA file that is missing",
            url.clone(),
            vec!["--tls-ca".into(), s(&pki.join("nope.pem")).into()],
            "cannot read the TLS CA file",
            None,
        ),
        (
            "a key that is not the certificate's",
            url.clone(),
            vec![
                "--tls-ca".into(),
                ca.clone(),
                "--tls-cert".into(),
                s(&cert).into(),
                "--tls-key".into(),
                s(&host(&pki, "dst").1).into(),
            ],
            "does not belong to the certificate",
            None,
        ),
    ];
    let mut refusals = 0;
    for (what, to, flags, source_says, dest_says) in cases {
        let (code, out) = migrate(&sock, &to, &flags);
        assert_ne!(code, 0, "{what}: {out}");
        assert!(out.contains(source_says), "{what}: the source said:\n{out}");
        if let Some(d) = dest_says {
            refusals += 1;
            let err = dst.wait_stderr(d, Duration::from_secs(30));
            assert_eq!(
                err.matches("refused the connection from").count(),
                refusals,
                "{what}: {err}"
            );
            assert!(err.contains("waiting for another"), "{what}: {err}");
        }
        let status = ctl_ok(&sock, &["status"]);
        assert!(status.contains("running"), "{what}: {status}");
        assert!(src.alive(), "{what}");
    }
    assert!(!dst.stderr().contains("received the VM"));
    let _ = (cert, key);
    // --tls-name makes the certificate's name match a URL with another host.
    let mut flags = tls_flags(&pki, "src");
    flags.extend(["--tls-name".into(), "dst".into()]);
    let expected = esvm_guests::demo::expected_output(MEM_BYTES, 1, &demo_args(), ITERATIONS, 2);
    move_and_finish(&mut src, &sock, &localhost_url, &flags, &mut dst, &expected);
}

/// A TLS source to a plain destination: both say that the other end speaks TLS / does not;
/// the plain tcp:// listener warns that it is unauthenticated.
#[test]
fn a_tls_source_and_a_plain_destination_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["src", "dst,127.0.0.1"], &[]);
    let (mut dst, url) = receiver(&pki, false, &[]);
    let err = dst.stderr();
    assert!(
        err.contains("is plain TCP: unauthenticated and unencrypted") && err.contains("--tls-cert"),
        "{err}"
    );
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, None);
    let (code, out) = migrate(&sock, &url, &tls_flags(&pki, "src"));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("the destination answered without TLS"),
        "{out}"
    );
    dst.wait_stderr(
        "the peer speaks TLS and this end does not",
        Duration::from_secs(30),
    );
    assert!(ctl_ok(&sock, &["status"]).contains("running"));
    // A receiver given a certificate that expired, or one the CA did not issue, refuses to
    // start, naming the file.
    certs(&pki, &["old"], &["--expired"]);
    certs(&pki, &["selfie"], &["--self-signed"]);
    for (name, says) in [
        ("old", "old.pem expired at"),
        ("selfie", "does not chain to the CA in"),
    ] {
        let (c, k) = host(&pki, name);
        let o = esvm(&[
            "receive",
            "--listen",
            "tcp://127.0.0.1:0",
            "--tls-cert",
            s(&c),
            "--tls-key",
            s(&k),
            "--tls-ca",
            s(&pki.join("ca.pem")),
        ]);
        assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
        assert!(text(&o.stderr).contains(says), "{}", text(&o.stderr));
        assert!(
            !text(&o.stderr).contains("listening"),
            "{}",
            text(&o.stderr)
        );
    }
    // TLS needs tcp://.
    let o = esvm(&[
        "receive",
        "--listen",
        &format!("unix:{}", s(&dir.path().join("m.sock"))),
        "--tls-cert",
        s(&host(&pki, "dst").0),
        "--tls-key",
        s(&host(&pki, "dst").1),
        "--tls-ca",
        s(&pki.join("ca.pem")),
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("TLS runs over tcp://HOST:PORT only"),
        "{}",
        text(&o.stderr)
    );
    // --tls-cert without --tls-key is a usage error.
    let o = esvm(&[
        "receive",
        "--listen",
        "tcp://127.0.0.1:0",
        "--tls-cert",
        "x.pem",
    ]);
    assert_eq!(o.status.code(), Some(120), "{}", text(&o.stderr));
    ctl_ok(&sock, &["shutdown"]);
    src.wait(Duration::from_secs(30));
    dst.kill();
}

/// A TLS migration cancelled mid-way (bandwidth-capped so it is still running): the Abort
/// frame and TLS's close_notify reach the destination, which reports the source's abort
/// (not a cut connection) and keeps listening; the source guest runs on.
#[test]
fn a_cancelled_tls_migration_delivers_its_abort() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs(&pki, &["src", "dst,127.0.0.1"], &[]);
    let (mut dst, url) = receiver(&pki, true, &[]);
    let sock = dir.path().join("src.sock");
    let mut src = source(&sock, None);
    let mut args = vec![
        "migrate".to_string(),
        url,
        "--detach".into(),
        "--max-bandwidth".into(),
        "1M".into(),
    ];
    args.extend(tls_flags(&pki, "src"));
    let o = ctl(&sock, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // Wait until pages flow (the handshake is done), then cancel.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = ctl_ok(&sock, &["--json", "status"]);
        let v: serde_json::Value = serde_json::from_str(&st).unwrap();
        if v["migration"]["bytes_sent"].as_u64().unwrap_or(0) > 64 << 10 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    ctl_ok(&sock, &["cancel"]);
    let err = dst.wait_stderr("waiting for another", Duration::from_secs(30));
    assert!(
        err.contains("the source aborted the migration"),
        "the destination did not read the Abort frame: {err}"
    );
    assert!(ctl_ok(&sock, &["status"]).contains("running"));
    ctl_ok(&sock, &["shutdown"]);
    src.wait(Duration::from_secs(30));
    dst.kill();
}
