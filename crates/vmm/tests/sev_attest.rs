//! The guest owner's attestation flow, QEMU-style, with real processes: `esvm run --sev-es
//! --wait-for-secret` stops after LAUNCH_MEASURE; the owner reads the measurement over the
//! control API (`esvm ctl launch-measurement`), verifies it (`esvm owner verify`), builds a
//! secret packet bound to it (`esvm owner secret`), injects it (`esvm ctl inject-secret`)
//! and starts the guest (`esvm ctl resume`), which finds the secret. Also: `owner verify`
//! takes every launch input, and the refusals.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{ctl, esvm, text, wait_socket, Proc};

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A platform, its exported chain and an owner session for it (policy ES), in `dir`.
struct Owner {
    plat: String,
    session: String,
    dir: PathBuf,
    /// What `owner session` printed (the chain it verified).
    session_out: String,
}

impl Owner {
    fn new(dir: &Path) -> Owner {
        let p = |n: &str| dir.join(n).display().to_string();
        ok(
            esvm(&[
                "platform",
                "init",
                "--dir",
                &p("plat"),
                "--ark-bits",
                "2048",
            ]),
            "platform init",
        );
        ok(
            esvm(&[
                "platform",
                "export",
                "--dir",
                &p("plat"),
                "--out",
                &p("chain.bin"),
            ]),
            "platform export",
        );
        let session_out = ok(
            esvm(&[
                "owner",
                "session",
                "--chain",
                &p("chain.bin"),
                "--policy",
                "0x4",
                "--out",
                &p("owner"),
            ]),
            "owner session",
        );
        Owner {
            plat: p("plat"),
            session: p("owner"),
            dir: dir.to_path_buf(),
            session_out,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// The hex after `prefix` on a line of `text`.
fn hex_after(text: &str, prefix: &str) -> String {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    text[at + prefix.len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `esvm ctl` refused the request: status 1, and its message names `code` and says `what`.
fn refused(o: &Output, code: &str, what: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}{}", text(&o.stdout));
    assert!(err.contains(&format!("({code})")), "{err}");
    assert!(err.contains(what), "{what:?} not in: {err}");
}

/// The README's owner flow, end to end, with the VM and each owner step as separate
/// processes; a corrupted packet is refused and the launch still takes the right one.
#[test]
fn owner_attests_a_waiting_launch_and_its_guest_gets_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let o = Owner::new(dir.path());
    let sock = dir.path().join("vm.sock");
    let mut vm = Proc::spawn(
        None,
        &[
            "run",
            "--sev-es",
            "--platform",
            &o.plat,
            "--session",
            &o.session,
            "--api-socket",
            sock.to_str().unwrap(),
            "--wait-for-secret",
            "--mem",
            "96M",
            "--vcpus",
            "2",
            "sevdemo",
            "--",
            "iterations=3000",
        ],
    );
    wait_socket(&mut vm, &sock);
    let run_err = vm.wait_stderr("waits for its owner", Duration::from_secs(30));
    let run_digest = hex_after(&run_err, "SEV-ES launch digest ");
    assert_eq!(run_digest.len(), 64, "{run_err}");

    // Waiting: `starting`, launch pending, nothing of the guest ran.
    let status: serde_json::Value =
        serde_json::from_str(&ok(ctl(&sock, &["status", "--json"]), "status")).unwrap();
    assert_eq!(status["state"], "starting", "{status}");
    assert_eq!(status["launch_pending"], true, "{status}");
    assert_eq!(status["instructions"], 0, "{status}");
    assert_eq!(vm.stdout(), "");

    // What needs a started guest is refused while the launch waits (not left hanging).
    for args in [
        &["pause"][..],
        &["vcpus"][..],
        &["snapshot", &o.path("snap")][..],
        &["migrate", "tcp:127.0.0.1:9", "--detach"][..],
    ] {
        refused(&ctl(&sock, args), "invalid_state", "waits for its owner");
    }

    // The measurement, as JSON and as the owner's measurement file.
    let m: serde_json::Value = serde_json::from_str(&ok(
        ctl(
            &sock,
            &["launch-measurement", "--json", "--out", &o.path("m.bin")],
        ),
        "launch-measurement",
    ))
    .unwrap();
    assert_eq!(m["launch_digest"], run_digest.as_str());
    assert_eq!(m["policy"], 4);
    assert_eq!(m["secret_injected"], false);
    assert_eq!(
        hex_after(&run_err, "SEV-ES launch measurement "),
        m["measurement"].as_str().unwrap()
    );
    assert_eq!(
        hex_after(&run_err, "(mnonce "),
        m["mnonce"].as_str().unwrap()
    );
    let file = std::fs::read(o.path("m.bin")).unwrap();
    assert_eq!(file.len(), 51);
    assert_eq!(
        file[..32]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        m["measurement"].as_str().unwrap()
    );
    assert_eq!(
        [file[48], file[49], file[50]],
        [
            m["api_major"].as_u64().unwrap() as u8,
            m["api_minor"].as_u64().unwrap() as u8,
            m["build"].as_u64().unwrap() as u8
        ]
    );
    // The platform's identity: the PDH of the chain the owner's session verified, and the
    // chip id `platform status` shows.
    let pdh = m["pdh_fingerprint"].as_str().unwrap();
    assert!(
        o.session_out.contains(&format!("PDH {pdh}")),
        "{pdh} not in:\n{}",
        o.session_out
    );
    let show = ok(
        esvm(&["platform", "status", "--dir", &o.plat]),
        "platform status",
    );
    let chip = m["chip_id"].as_str().unwrap();
    assert_eq!(chip.len(), 128);
    assert!(show.contains(&chip[..32]), "{chip} not in:\n{show}");
    let human = ok(ctl(&sock, &["launch-measurement"]), "launch-measurement");
    assert!(human.contains(&format!("platform PDH    {pdh}")), "{human}");

    // The owner computes the digest from the launch inputs alone, and it verifies.
    let verified = ok(
        esvm(&[
            "owner",
            "verify",
            "--session",
            &o.session,
            "--measurement",
            &o.path("m.bin"),
            "--guest",
            "sevdemo",
            "--mem",
            "96M",
            "--vcpus",
            "2",
            "--",
            "iterations=3000",
        ]),
        "owner verify",
    );
    assert_eq!(hex_after(&verified, "launch digest "), run_digest);
    let secret = b"the owner's disk key: 0123456789abcdef";
    std::fs::write(o.path("secret.txt"), secret).unwrap();
    ok(
        esvm(&[
            "owner",
            "secret",
            "--session",
            &o.session,
            "--measurement",
            &o.path("m.bin"),
            "--in",
            &o.path("secret.txt"),
            "--out",
            &o.path("packet.bin"),
        ]),
        "owner secret",
    );

    // A packet altered on the way is refused; the launch keeps waiting.
    let mut bad = std::fs::read(o.path("packet.bin")).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    std::fs::write(o.path("bad.bin"), &bad).unwrap();
    refused(
        &ctl(&sock, &["inject-secret", &o.path("bad.bin")]),
        "invalid_argument",
        "must be built from this launch's measurement",
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(ctl(&sock, &["status", "--json"]), "status")).unwrap();
    assert_eq!(status["launch_pending"], true, "{status}");

    ok(
        ctl(&sock, &["inject-secret", &o.path("packet.bin")]),
        "inject-secret",
    );
    refused(
        &ctl(&sock, &["inject-secret", &o.path("packet.bin")]),
        "invalid_state",
        "injected into this launch already",
    );
    let m: serde_json::Value = serde_json::from_str(&ok(
        ctl(&sock, &["launch-measurement", "--json"]),
        "launch-measurement",
    ))
    .unwrap();
    assert_eq!(m["secret_injected"], true);
    assert_eq!(vm.stdout(), "", "the guest started before resume");

    ok(ctl(&sock, &["resume"]), "resume");
    assert_eq!(vm.wait(Duration::from_secs(120)), 0, "{}", vm.stderr());
    let out = vm.stdout();
    assert!(out.contains("checksum="), "{out}");
    assert!(
        out.contains(&format!(
            "sevdemo: launch secret {} bytes, fnv1a {:016x}",
            secret.len(),
            fnv1a(secret)
        )),
        "{out}"
    );
}

/// `owner verify` takes every launch input: it accepts the launch it describes and refuses
/// one that differs in memory size, vCPUs or guest arguments; the digest `run` printed is
/// the one `owner verify` computes, and `--digest` with it verifies too.
#[test]
fn owner_verify_takes_every_launch_input() {
    let dir = tempfile::tempdir().unwrap();
    let o = Owner::new(dir.path());
    let run = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        &o.plat,
        "--session",
        &o.session,
        "--measurement-out",
        &o.path("m.bin"),
        "--mem",
        "80M",
        "--vcpus",
        "2",
        "sevdemo",
        "--",
        "iterations=1000",
        "dirty-mib=1",
    ]);
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{err}");
    // No secret was injected: the guest says nothing about one.
    assert!(!text(&run.stdout).contains("launch secret"));
    let digest = hex_after(&err, "SEV-ES launch digest ");
    let mfile = o.path("m.bin");
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "owner",
            "verify",
            "--session",
            &o.session,
            "--measurement",
            &mfile,
        ];
        args.extend_from_slice(extra);
        esvm(&args)
    };
    let good = ok(
        verify(&[
            "--guest",
            "sevdemo",
            "--mem",
            "80M",
            "--vcpus",
            "2",
            "--",
            "iterations=1000",
            "dirty-mib=1",
        ]),
        "owner verify",
    );
    assert_eq!(hex_after(&good, "launch digest "), digest);
    ok(verify(&["--digest", &digest]), "owner verify --digest");
    for (what, args) in [
        (
            "memory",
            &[
                "--guest",
                "sevdemo",
                "--vcpus",
                "2",
                "--",
                "iterations=1000",
                "dirty-mib=1",
            ][..],
        ),
        (
            "vcpus",
            &[
                "--guest",
                "sevdemo",
                "--mem",
                "80M",
                "--",
                "iterations=1000",
                "dirty-mib=1",
            ][..],
        ),
        (
            "arguments",
            &[
                "--guest",
                "sevdemo",
                "--mem",
                "80M",
                "--vcpus",
                "2",
                "--",
                "iterations=1000",
            ][..],
        ),
    ] {
        let o = verify(args);
        assert!(!o.status.success(), "a launch differing in {what} verified");
        assert!(
            text(&o.stderr).contains("does not verify"),
            "{what}: {}",
            text(&o.stderr)
        );
    }
    // Guest arguments without --guest are refused with a message, not ignored.
    let o = verify(&["--digest", &digest, "--", "iterations=1000"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("with --guest"),
        "{}",
        text(&o.stderr)
    );
}

/// The launch requests on VMs that do not wait, and after the launch finished.
#[test]
fn launch_requests_are_refused_where_no_launch_waits() {
    let dir = tempfile::tempdir().unwrap();
    let o = Owner::new(dir.path());
    std::fs::write(o.path("junk.bin"), [0u8; 80]).unwrap();

    // A plain VM has no launch at all.
    let plain_sock = dir.path().join("plain.sock");
    let mut plain = Proc::spawn(
        None,
        &[
            "run",
            "--api-socket",
            plain_sock.to_str().unwrap(),
            "--start-paused",
        ],
    );
    wait_socket(&mut plain, &plain_sock);
    refused(
        &ctl(&plain_sock, &["launch-measurement"]),
        "unsupported",
        "not an SEV-ES guest",
    );
    refused(
        &ctl(&plain_sock, &["inject-secret", &o.path("junk.bin")]),
        "unsupported",
        "not an SEV-ES guest",
    );
    plain.kill();

    // An SEV-ES VM launched without waiting: its launch finished before it started.
    let sev_sock = dir.path().join("sev.sock");
    let mut sev = Proc::spawn(
        None,
        &[
            "run",
            "--sev-es",
            "--platform",
            &o.plat,
            "--api-socket",
            sev_sock.to_str().unwrap(),
            "--start-paused",
        ],
    );
    wait_socket(&mut sev, &sev_sock);
    refused(
        &ctl(&sev_sock, &["launch-measurement"]),
        "invalid_state",
        "--wait-for-secret",
    );
    sev.kill();

    // After `resume` the launch is over: no more secrets; the guest runs.
    let sock = dir.path().join("vm.sock");
    let mut vm = Proc::spawn(
        None,
        &[
            "run",
            "--sev-es",
            "--platform",
            &o.plat,
            "--session",
            &o.session,
            "--api-socket",
            sock.to_str().unwrap(),
            "--wait-for-secret",
            "--",
            "iterations=100000000",
        ],
    );
    wait_socket(&mut vm, &sock);
    // Not a packet at all: refused, and the launch waits on.
    refused(
        &ctl(&sock, &["inject-secret", &o.path("junk.bin")]),
        "invalid_argument",
        "",
    );
    ok(ctl(&sock, &["resume"]), "resume");
    vm.wait_stdout("tick 1", Duration::from_secs(60));
    refused(
        &ctl(&sock, &["inject-secret", &o.path("junk.bin")]),
        "invalid_state",
        "the launch is over",
    );
    refused(
        &ctl(&sock, &["launch-measurement"]),
        "invalid_state",
        "the launch is over",
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(ctl(&sock, &["status", "--json"]), "status")).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    assert!(status.get("launch_pending").is_none(), "{status}");
    vm.kill();
}

/// `--secret` without `--session` is refused before anything runs (not later with a MAC
/// error): here the platform does not even exist.
#[test]
fn a_secret_without_the_owners_session_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let packet = dir.path().join("packet.bin");
    std::fs::write(&packet, [0u8; 80]).unwrap();
    let o = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        dir.path().join("no-such-platform").to_str().unwrap(),
        "--secret",
        packet.to_str().unwrap(),
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(120), "a usage error: {err}");
    assert!(err.contains("--secret needs --session"), "{err}");
    assert!(err.contains("session keys"), "{err}");
    assert!(!err.contains("platform"), "{err}");
    assert_eq!(text(&o.stdout), "");
}

/// `--wait-for-secret` needs the API socket (the owner talks through it) and an SEV-ES
/// launch, and excludes `--secret`: refused by the command line.
#[test]
fn wait_for_secret_needs_an_api_socket_and_sev_es() {
    for args in [
        &["run", "--sev-es", "--platform", "p", "--wait-for-secret"][..],
        &["run", "--api-socket", "s", "--wait-for-secret"][..],
        &[
            "run",
            "--sev-es",
            "--platform",
            "p",
            "--session",
            "o",
            "--api-socket",
            "s",
            "--wait-for-secret",
            "--secret",
            "x",
        ][..],
    ] {
        let o = esvm(args);
        assert!(!o.status.success(), "{args:?}");
        assert!(text(&o.stderr).contains("--"), "{}", text(&o.stderr));
        assert!(!text(&o.stderr).contains("launch measurement"));
    }
}

/// `owner verify --guest ... --vcpus N` predicts the launch of N vCPUs exactly (N = 1, 2,
/// 4: with several, the AP start stub, its jump table and every AP's VMSA, which starts in
/// the stub, are measured) and refuses it with any other count.
#[test]
fn owner_verify_predicts_the_launch_of_1_2_and_4_vcpus_and_no_other_count() {
    let dir = tempfile::tempdir().unwrap();
    let o = Owner::new(dir.path());
    for n in ["1", "2", "4"] {
        let mfile = o.path(&format!("m{n}.bin"));
        let run = esvm(&[
            "run",
            "--sev-es",
            "--platform",
            &o.plat,
            "--session",
            &o.session,
            "--measurement-out",
            &mfile,
            "--vcpus",
            n,
            "sevdemo",
            "--",
            "iterations=100",
        ]);
        assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
        for m in ["1", "2", "4"] {
            let v = esvm(&[
                "owner",
                "verify",
                "--session",
                &o.session,
                "--measurement",
                &mfile,
                "--guest",
                "sevdemo",
                "--vcpus",
                m,
                "--",
                "iterations=100",
            ]);
            if m == n {
                ok(v, &format!("owner verify --vcpus {m} of a {n}-vCPU launch"));
            } else {
                assert!(
                    !v.status.success(),
                    "--vcpus {m} verified a {n}-vCPU launch"
                );
                assert!(
                    text(&v.stderr).contains("does not verify"),
                    "{}",
                    text(&v.stderr)
                );
            }
        }
    }
}
