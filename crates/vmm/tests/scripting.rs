//! Scenario tests of what scripts use: `--json` on the reporting commands, `--api-socket`
//! anywhere on `esvm ctl` and from ESVM_API_SOCKET, `--log-level`/ESVM_LOG, shell
//! completions and `esvm guests --export`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{text, wait_socket, Proc, ESVM};
use serde_json::Value;

/// `esvm ARGS` with neither ESVM_API_SOCKET nor ESVM_LOG from the caller's environment.
fn esvm(args: &[&str]) -> Output {
    esvm_env(args, &[])
}

fn esvm_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(ESVM)
        .args(args)
        .env_remove("ESVM_API_SOCKET")
        .env_remove("ESVM_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("cannot start esvm")
}

fn ok(o: &Output, what: &str) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn json(o: &Output, what: &str) -> Value {
    let out = ok(o, what);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}):\n{out}"))
}

fn is_json(s: &str) -> bool {
    serde_json::from_str::<Value>(s).is_ok()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn guests_lists_as_text_by_default_and_as_json_before_or_after_the_command() {
    let plain = ok(&esvm(&["guests"]), "guests");
    assert!(!is_json(&plain), "{plain}");
    for argv in [&["--json", "guests"], &["guests", "--json"]] {
        let v = json(&esvm(argv), "guests --json");
        let list = v.as_array().expect("a list");
        assert_eq!(list.len(), esvm_guests::list().len());
        for g in esvm_guests::list() {
            let entry = list
                .iter()
                .find(|e| e["name"] == g.name)
                .unwrap_or_else(|| panic!("{} missing from {v}", g.name));
            assert_eq!(entry["description"], g.description);
            assert_eq!(entry["bytes"], g.elf.len());
            assert!(plain.lines().any(|l| l.starts_with(g.name)), "{plain}");
        }
    }
}

#[test]
fn an_exported_guest_runs_like_the_builtin_and_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.elf");
    let out = ok(
        &esvm(&["guests", "--export", "demo", s(&file)]),
        "guests --export",
    );
    assert!(out.contains(s(&file)), "{out}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        esvm_guests::builtin("demo").unwrap().elf
    );
    let args = ["--", "iterations=3000", "dirty-mib=1"];
    let builtin = esvm(&[&["run", "demo"][..], &args].concat());
    let exported = esvm(&[&["run", s(&file)][..], &args].concat());
    let want = ok(&builtin, "run demo");
    assert!(want.contains("checksum="), "{want}");
    assert_eq!(ok(&exported, "run FILE"), want);

    // An existing file stays as it is without --force, whatever the guest.
    let o = esvm(&["guests", "--export", "hello", s(&file)]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--force"), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty());
    assert_eq!(
        std::fs::read(&file).unwrap(),
        esvm_guests::builtin("demo").unwrap().elf
    );
    let v = json(
        &esvm(&["--json", "guests", "--export", "hello", s(&file), "--force"]),
        "export --force",
    );
    assert_eq!(v["guest"], "hello");
    assert_eq!(v["file"], s(&file));
    let o = esvm(&["run", s(&file), "--", "exit=9"]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o.stderr));

    let o = esvm(&[
        "guests",
        "--export",
        "no-such-guest",
        s(&dir.path().join("x")),
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o.stderr).contains("demo"), "{}", text(&o.stderr));
    let o = esvm(&["guests", "--force"]);
    assert_eq!(
        o.status.code(),
        Some(i32::from(esvm::outcome::EXIT_USAGE)),
        "--force needs --export"
    );
}

/// `esvm run` paused on an API socket; the guest runs long enough for the commands.
fn paused_vm(sock: &Path) -> Proc {
    let mut p = Proc::spawn(
        None,
        &[
            "run",
            "--api-socket",
            s(sock),
            "--start-paused",
            "--mem",
            "32M",
            "demo",
            "--",
            "iterations=200000000",
        ],
    );
    wait_socket(&mut p, sock);
    p
}

#[test]
fn ctl_reports_as_text_or_json_and_finds_its_socket_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = paused_vm(&sock);

    // Text by default, with the socket before or after the subcommand.
    let before = ok(
        &esvm(&["ctl", "--api-socket", s(&sock), "status"]),
        "status",
    );
    let after = ok(
        &esvm(&["ctl", "status", "--api-socket", s(&sock)]),
        "status",
    );
    for t in [&before, &after] {
        assert!(!is_json(t), "{t}");
        assert!(t.starts_with("state         paused\n"), "{t}");
        assert!(t.contains("32.00 MiB memory, 1 vCPU(s)"), "{t}");
    }
    // JSON with --json anywhere, the socket from the environment.
    let env = [("ESVM_API_SOCKET", s(&sock))];
    for argv in [
        &["--json", "ctl", "status"][..],
        &["ctl", "status", "--json"],
    ] {
        let v = json(&esvm_env(argv, &env), "status --json");
        assert_eq!(v["state"], "paused");
        assert_eq!(v["memory_bytes"], 32 << 20);
        assert_eq!(v["vm_type"], "plain");
    }
    // The command line wins over the environment.
    let o = esvm_env(
        &["ctl", "status", "--api-socket", s(&sock)],
        &[("ESVM_API_SOCKET", "/nonexistent/vm.sock")],
    );
    ok(&o, "--api-socket over ESVM_API_SOCKET");

    let v = json(&esvm_env(&["ctl", "--json", "vcpus"], &env), "vcpus");
    assert_eq!(v[0]["id"], 0);
    assert_eq!(v[0]["protected"], false);
    let state = v[0]["run_state"]
        .as_str()
        .expect("vcpus reports the run state");
    assert!(["running", "halted"].contains(&state), "{v}");
    let t = ok(&esvm_env(&["ctl", "vcpus"], &env), "vcpus");
    assert!(
        !is_json(&t) && t.starts_with(&format!("vCPU 0 (plain, {state}): cr0 0x")),
        "{t}"
    );

    let v = json(&esvm_env(&["ctl", "resume", "--json"], &env), "resume");
    assert_eq!(v["kind"], "resumed");
    let v = json(&esvm_env(&["ctl", "pause", "--json"], &env), "pause");
    assert_eq!(v["kind"], "paused");
    assert_eq!(
        ok(&esvm_env(&["ctl", "resume"], &env), "resume"),
        "resumed\n"
    );
    let snap = dir.path().join("snap");
    let v = json(
        &esvm_env(&["ctl", "snapshot", s(&snap), "--json"], &env),
        "snapshot",
    );
    assert_eq!(v["kind"], "snapshot_saved");
    assert_eq!(v["dir"], s(&snap));
    assert!(v["bytes_written"].as_u64().unwrap() > 0, "{v}");
    let t = json(&esvm_env(&["ctl", "status", "--json"], &env), "status");
    assert_eq!(t["state"], "running");
    assert!(t["instructions"].as_u64().unwrap() > 0, "{t}");

    // A refusal is text on stderr and status 1, also with --json.
    let o = esvm_env(&["ctl", "cancel", "--json"], &env);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    assert!(
        text(&o.stderr).contains("invalid_state"),
        "{}",
        text(&o.stderr)
    );

    // A migration that fails: its final status as JSON, no progress lines, status 1.
    let o = esvm_env(
        &[
            "ctl",
            "migrate",
            "tcp://127.0.0.1:1",
            "--json",
            "--timeout-s",
            "5",
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("migrate --json prints JSON");
    assert_eq!(v["phase"], "failed", "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert!(!text(&o.stderr).contains(" pass "), "{}", text(&o.stderr));
    vm.kill();
}

#[test]
fn migrate_json_prints_the_completed_status_and_no_progress() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("src.sock");
    let mut dest = Proc::spawn(None, &["receive", "--listen", "tcp:127.0.0.1:0"]);
    let err = dest.wait_stderr("listening on ", Duration::from_secs(30));
    let port: u16 = err
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {err}"));
    let mut src = paused_vm(&sock);
    let o = esvm(&[
        "--json",
        "ctl",
        "migrate",
        &format!("tcp://127.0.0.1:{port}"),
        "--api-socket",
        s(&sock),
    ]);
    let v = json(&o, "migrate --json");
    assert_eq!(v["phase"], "completed", "{v}");
    assert!(v["bytes_sent"].as_u64().unwrap() > 0, "{v}");
    assert!(v["downtime_ms"].is_number(), "{v}");
    assert!(o.stderr.is_empty(), "no progress: {}", text(&o.stderr));
    assert_eq!(src.wait(Duration::from_secs(30)), 0, "{}", src.stderr());
    dest.kill();
}

#[test]
fn ctl_without_a_socket_is_a_usage_error_that_says_how_to_give_one() {
    let o = esvm(&["ctl", "status"]);
    assert_eq!(o.status.code(), Some(i32::from(esvm::outcome::EXIT_USAGE)));
    let err = text(&o.stderr);
    assert!(
        err.contains("--api-socket") && err.contains("ESVM_API_SOCKET"),
        "{err}"
    );
}

#[test]
fn json_is_refused_where_nothing_is_reported() {
    let o = esvm(&["run", "--json", "hello"]);
    assert_eq!(o.status.code(), Some(i32::from(esvm::outcome::EXIT_USAGE)));
    assert!(text(&o.stderr).contains("--json"), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty());
}

#[test]
fn log_level_overrides_esvm_log_and_logs_plain_text_into_a_pipe() {
    let run = ["run", "--max-instructions", "1000", "hello"];
    // `esvm run` logs "starting" at info.
    let o = esvm_env(&run, &[("ESVM_LOG", "info")]);
    let err = text(&o.stderr);
    assert!(err.contains("starting"), "{err}");
    assert!(!err.contains('\x1b'), "no colours into a pipe: {err:?}");
    let o = esvm_env(
        &[&["--log-level", "error"][..], &run].concat(),
        &[("ESVM_LOG", "info")],
    );
    assert!(!text(&o.stderr).contains("starting"), "{}", text(&o.stderr));
    let o = esvm(&[&run[..], &["--log-level", "esvm=info"]].concat());
    assert!(text(&o.stderr).contains("starting"), "{}", text(&o.stderr));
    let o = esvm(&[&["--log-level", "loud"][..], &run].concat());
    assert_eq!(o.status.code(), Some(i32::from(esvm::outcome::EXIT_USAGE)));
    assert!(
        text(&o.stderr).contains("not a level"),
        "{}",
        text(&o.stderr)
    );
    let help = ok(&esvm(&["--help"]), "--help");
    assert!(
        help.contains("--log-level") && help.contains("ESVM_LOG"),
        "{help}"
    );
}

#[test]
fn completions_name_the_commands_and_options() {
    let bash = ok(&esvm(&["completions", "bash"]), "completions bash");
    for word in [
        "complete",
        "guests",
        "ctl",
        "migrate",
        "completions",
        "--api-socket",
        "--export",
        "--json",
    ] {
        assert!(bash.contains(word), "{word} missing from the bash script");
    }
    let zsh = ok(&esvm(&["completions", "zsh"]), "completions zsh");
    assert!(zsh.starts_with("#compdef esvm"), "{}", &zsh[..80]);
    let fish = ok(&esvm(&["completions", "fish"]), "completions fish");
    assert!(fish.contains("complete -c esvm"), "fish");
    assert_eq!(
        esvm(&["completions", "cmd.exe"]).status.code(),
        Some(i32::from(esvm::outcome::EXIT_USAGE))
    );
}

/// The SEV-ES flow's reports as JSON: `platform status`, `owner session`, and `owner verify`
/// of an exported built-in guest against a real launch.
#[test]
fn platform_and_owner_report_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let init = json(
        &esvm(&["platform", "init", "--dir", s(&d("plat")), "--json"]),
        "platform init",
    );
    assert_eq!(init["dir"], s(&d("plat")));
    assert_eq!(init["amd_ca_new"], true);
    let status = ok(
        &esvm(&["platform", "status", "--dir", s(&d("plat"))]),
        "platform status",
    );
    assert!(!is_json(&status) && status.contains("state"), "{status}");
    let st = json(
        &esvm(&["--json", "platform", "status", "--dir", s(&d("plat"))]),
        "platform status --json",
    );
    assert_eq!(st["state"], "UNINIT", "{st}");
    assert_eq!(st["es_capable"], true);
    assert_eq!(st["chain_verifies"], true);
    assert_eq!(st["fingerprints"]["pdh"], init["pdh"]);
    let chip = st["chip_id"].as_str().unwrap();
    assert!(
        chip.len() >= 32 && chip.chars().all(|c| c.is_ascii_hexdigit()),
        "{st}"
    );

    let ex = json(
        &esvm(&[
            "platform",
            "export",
            "--dir",
            s(&d("plat")),
            "--out",
            s(&d("chain")),
            "--json",
        ]),
        "platform export",
    );
    assert_eq!(ex["bytes"], std::fs::metadata(d("chain")).unwrap().len());
    let sess = json(
        &esvm(&[
            "owner",
            "session",
            "--chain",
            s(&d("chain")),
            "--policy",
            "0x4",
            "--out",
            s(&d("owner")),
            "--json",
        ]),
        "owner session",
    );
    assert_eq!(sess["policy_bits"], 4);
    assert_eq!(sess["ark_given"], false);

    ok(
        &esvm(&["guests", "--export", "sevdemo", s(&d("sevdemo.elf"))]),
        "export sevdemo",
    );
    // The digest is computed from the exported file (and `run`'s default memory, no guest
    // arguments).
    let o = esvm(&[
        "run",
        "--sev-es",
        "--platform",
        s(&d("plat")),
        "--session",
        s(&d("owner")),
        "--measurement-out",
        s(&d("m.bin")),
        s(&d("sevdemo.elf")),
    ]);
    ok(&o, "run --sev-es FILE");
    let v = json(
        &esvm(&[
            "owner",
            "verify",
            "--session",
            s(&d("owner")),
            "--measurement",
            s(&d("m.bin")),
            "--guest",
            s(&d("sevdemo.elf")),
            "--json",
        ]),
        "owner verify",
    );
    assert_eq!(v["verified"], true);
    assert_eq!(v["policy_bits"], 4);
    assert_eq!(v["digest"].as_str().unwrap().len(), 64);
    let t = ok(
        &esvm(&[
            "owner",
            "verify",
            "--session",
            s(&d("owner")),
            "--measurement",
            s(&d("m.bin")),
            "--digest",
            v["digest"].as_str().unwrap(),
        ]),
        "owner verify --digest",
    );
    assert!(t.starts_with("measurement verified") && !is_json(&t), "{t}");
    std::fs::write(d("secret"), b"the owner's secret").unwrap();
    let p = json(
        &esvm(&[
            "--json",
            "owner",
            "secret",
            "--session",
            s(&d("owner")),
            "--measurement",
            s(&d("m.bin")),
            "--in",
            s(&d("secret")),
            "--out",
            s(&d("packet")),
        ]),
        "owner secret",
    );
    assert_eq!(p["bytes"], std::fs::metadata(d("packet")).unwrap().len());
}
