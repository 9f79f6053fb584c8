//! Sealed SEV-ES snapshots (issue 4 item 7) with real processes: `esvm run --sev-es
//! --api-socket`, `esvm ctl snapshot`, `esvm restore --platform`.
//!
//! The guest is `sevdemo`, whose complete serial output is predicted on the host
//! (`esvm_guests::demo::expected_output_sev`): what a source printed before a snapshot and
//! what the restored guest prints after it must be one uninterrupted run. Only the platform
//! the guest ran on can open its snapshot; damaged or altered snapshots are refused, by the
//! checksums or, for a consistently rewritten snapshot, by the secure processor.

mod common;

use common::{ctl, ctl_ok, esvm, text, wait_socket, Proc, Rng, ESVM};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use esvm_hv::sev::{PRIVATE_PACKET_LEN, SHARED_PACKET_LEN};

const MEM: &str = "16M";
const MEM_BYTES: u64 = 16 << 20;
const DIRTY_MIB: u64 = 1;
const TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------- helpers

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn snapshot(sock: &Path, dir: &Path) {
    let out = ctl_ok(sock, &["snapshot", s(dir)]);
    assert!(out.contains("snapshot written"), "{out}");
}

/// `esvm platform init` under the shared emulated AMD CA in `dir/ca`.
fn platform(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let o = esvm(&[
        "platform",
        "init",
        "--dir",
        s(&p),
        "--amd-ca",
        s(&dir.join("ca")),
        "--ark-bits",
        "2048",
    ]);
    assert!(o.status.success(), "platform init: {}", text(&o.stderr));
    p
}

fn guest_args(iterations: u64) -> String {
    format!("iterations={iterations} dirty-mib={DIRTY_MIB}")
}

fn expected(iterations: u64) -> String {
    esvm_guests::demo::expected_output_sev(
        MEM_BYTES,
        1,
        &guest_args(iterations),
        iterations,
        DIRTY_MIB,
    )
}

/// `esvm run --sev-es --platform P --api-socket SOCK --start-paused [EXTRA] sevdemo`.
fn sev_vm(plat: &Path, sock: &Path, iterations: u64, extra: &[&str]) -> Proc {
    let args = guest_args(iterations);
    let mut a = vec![
        "run",
        "--sev-es",
        "--platform",
        s(plat),
        "--api-socket",
        s(sock),
        "--start-paused",
        "--mem",
        MEM,
    ];
    a.extend_from_slice(extra);
    a.extend(["sevdemo", "--"]);
    a.extend(args.split(' '));
    let mut p = Proc::spawn(None, &a);
    wait_socket(&mut p, sock);
    p
}

/// `esvm restore DIR --platform P` (+ `extra`), run to its end.
fn restore(snap: &Path, plat: &Path, extra: &[&str]) -> Output {
    Command::new(ESVM)
        .args(["restore", s(snap), "--platform", s(plat)])
        .args(extra)
        .output()
        .expect("cannot run esvm restore")
}

/// `before` (what a VM printed until it was snapshotted) and `after` (what the restored VM
/// printed) make up the whole run: nothing repeated, nothing lost but at most the part of
/// a line the source still buffered (its stdout is line-buffered).
fn assert_continues(expected: &str, before: &str, after: &str) {
    assert!(
        expected.starts_with(before),
        "not the start of the run:\n{before}"
    );
    assert!(
        expected.ends_with(after),
        "not a continuation of the run:\n{after}"
    );
    assert!(
        before.len() + after.len() <= expected.len(),
        "output repeated:\nbefore:\n{before}\nafter:\n{after}"
    );
    let gap = &expected[before.len()..expected.len() - after.len()];
    assert!(
        !gap.contains('\n'),
        "output lost between the snapshot and the restore: {gap:?}"
    );
    assert!(after.lines().any(|l| l.starts_with("checksum=")), "{after}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A snapshot's `vm.state`, split into its JSON.
fn read_state(snap: &Path) -> serde_json::Value {
    let state = std::fs::read(snap.join("vm.state")).unwrap();
    let nl = state.iter().position(|&b| b == b'\n').unwrap();
    // Sealed snapshots are format version 4 (2 before the devices were saved by id).
    assert!(state.starts_with(b"ESVM-SNAPSHOT 4 "), "sealed version");
    serde_json::from_slice(&state[nl + 1..]).unwrap()
}

/// Write `vm.state` with a correct header for `json` (as a consistent forger would).
fn write_state(snap: &Path, json: &serde_json::Value) {
    let body = serde_json::to_vec(json).unwrap();
    let header = format!(
        "ESVM-SNAPSHOT 4 crc32c={:08x} len={}\n",
        crc32c::crc32c(&body),
        body.len()
    );
    std::fs::write(snap.join("vm.state"), [header.as_bytes(), &body].concat()).unwrap();
}

/// The sealed memory index: (first page, count, private, byte offset in memory.sev).
fn sealed_runs(json: &serde_json::Value) -> Vec<(u64, u64, bool, usize)> {
    let mut offset = 0;
    json["sev"]["memory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let count = r["count"].as_u64().unwrap();
            let private = r["kind"] == "private";
            let at = offset;
            offset += count as usize
                * if private {
                    PRIVATE_PACKET_LEN
                } else {
                    SHARED_PACKET_LEN
                };
            (r["first"].as_u64().unwrap(), count, private, at)
        })
        .collect()
}

/// Recompute every run's checksum from `mem` and write both files consistently.
fn forge(snap: &Path, json: &mut serde_json::Value, mem: &[u8]) {
    let runs = sealed_runs(json);
    for (i, (_, count, private, at)) in runs.into_iter().enumerate() {
        let len = count as usize
            * if private {
                PRIVATE_PACKET_LEN
            } else {
                SHARED_PACKET_LEN
            };
        json["sev"]["memory"][i]["crc32c"] = crc32c::crc32c(&mem[at..at + len]).into();
    }
    std::fs::write(snap.join("memory.sev"), mem).unwrap();
    write_state(snap, json);
}

/// A sealed snapshot of a sevdemo guest of `iterations`, taken before its first
/// instruction on `plat`; the source then runs to its end with the full output.
fn snapshot_at_start(dir: &Path, plat: &Path, iterations: u64) -> PathBuf {
    let sock = dir.join("start.sock");
    let snap = dir.join("snap");
    let mut vm = sev_vm(plat, &sock, iterations, &[]);
    snapshot(&sock, &snap);
    ctl_ok(&sock, &["resume"]);
    assert_eq!(vm.wait(TIMEOUT), 0, "{}", vm.stderr());
    assert_eq!(vm.stdout(), expected(iterations));
    snap
}

// ------------------------------------------------------------------------------------ tests

/// A running SEV-ES guest is snapshotted twice (before its first instruction and mid-run)
/// and runs on to its end; each snapshot restored on its platform continues exactly where
/// it was taken. A restored guest can be snapshotted and restored again.
#[test]
fn sealed_snapshots_restore_exactly_on_their_platform() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path(), "platform");
    let iters = 400_000;
    let expected = expected(iters);
    let (s0, s1, s2) = (
        dir.path().join("s0"),
        dir.path().join("s1"),
        dir.path().join("s2"),
    );

    let sock_a = dir.path().join("a.sock");
    let mut a = sev_vm(&plat, &sock_a, iters, &[]);
    snapshot(&sock_a, &s0);
    ctl_ok(&sock_a, &["resume"]);
    a.wait_stdout("tick 2\n", TIMEOUT);
    ctl_ok(&sock_a, &["pause"]);
    std::thread::sleep(Duration::from_millis(100));
    let a_before = a.stdout();
    snapshot(&sock_a, &s1);
    assert_eq!(a.stdout(), a_before, "the guest ran while paused");
    ctl_ok(&sock_a, &["resume"]);
    // And once while it runs (the snapshot holds it meanwhile).
    let s3 = dir.path().join("s3");
    a.wait_stdout("tick 4\n", TIMEOUT);
    snapshot(&sock_a, &s3);

    // The snapshot taken at the start, restored with the API: snapshotted again mid-run.
    let sock_b = dir.path().join("b.sock");
    let mut b = Proc::spawn(
        None,
        &[
            "restore",
            s(&s0),
            "--platform",
            s(&plat),
            "--api-socket",
            s(&sock_b),
            "--start-paused",
        ],
    );
    wait_socket(&mut b, &sock_b);
    let st = ctl_ok(&sock_b, &["status", "--json"]);
    assert!(st.contains("sev_es"), "{st}");
    ctl_ok(&sock_b, &["resume"]);
    b.wait_stdout("tick 5\n", TIMEOUT);
    ctl_ok(&sock_b, &["pause"]);
    std::thread::sleep(Duration::from_millis(100));
    let b_before = b.stdout();
    snapshot(&sock_b, &s2);
    ctl_ok(&sock_b, &["resume"]);

    assert_eq!(a.wait(TIMEOUT), 0, "{}", a.stderr());
    assert_eq!(
        a.stdout(),
        expected,
        "the source runs on after its snapshots"
    );
    assert_eq!(b.wait(TIMEOUT), 0, "{}", b.stderr());
    assert_eq!(
        b.stdout(),
        expected,
        "restored from before the first instruction"
    );

    let o = restore(&s1, &plat, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_continues(&expected, &a_before, &text(&o.stdout));
    assert!(a_before.contains("tick 2\n"), "snapshotted mid-run");
    let o = restore(&s2, &plat, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_continues(&expected, &b_before, &text(&o.stdout));
    let o = restore(&s3, &plat, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let rest = text(&o.stdout);
    assert!(expected.ends_with(&rest), "not a continuation:\n{rest}");
    assert!(
        rest.contains("checksum=") && !rest.contains("tick 4\n"),
        "{rest}"
    );

    // Private pages are stored sealed: the guest's image (private, with its strings) does
    // not appear in the clear, and there are no plain vCPU states. (Shared pages, e.g. the
    // buffer the guest hands its console output through, are stored as the host sees them.)
    let json = read_state(&s1);
    let runs = sealed_runs(&json);
    assert!(runs.iter().any(|r| r.2), "private pages");
    assert!(json["vcpu_states"].as_array().unwrap().is_empty());
    let mem = std::fs::read(s1.join("memory.sev")).unwrap();
    let needle = b"sevdemo";
    for &(first, count, private, at) in &runs {
        let len = count as usize * PRIVATE_PACKET_LEN;
        if private {
            assert!(
                !mem[at..at + len].windows(needle.len()).any(|w| w == needle),
                "a private page of {first}+{count} holds plaintext"
            );
        }
    }
}

/// Only the platform the guest ran on can open its snapshot: not another platform under
/// the same emulated AMD root, not the same platform after its PDH was regenerated, and
/// not without a platform at all.
#[test]
fn sealed_snapshots_open_only_on_their_platform() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path(), "platform");
    let other = platform(dir.path(), "other");
    let iters = 20_000;
    let snap = snapshot_at_start(dir.path(), &plat, iters);

    let rotated = dir.path().join("rotated");
    copy_dir(&plat, &rotated);
    let o = esvm(&["platform", "rotate-pdh", "--dir", s(&rotated)]);
    assert!(o.status.success(), "rotate-pdh: {}", text(&o.stderr));

    let refused = |o: Output, what: &str, needle: &str| {
        let e = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{what}: {e}");
        assert!(e.contains(needle), "{what}: expected {needle:?} in {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(
            o.stdout.is_empty(),
            "{what}: a refused snapshot must not run"
        );
    };
    refused(
        esvm(&["restore", s(&snap)]),
        "no platform",
        "this snapshot is of an SEV-ES guest sealed to its platform; give that platform with \
         --platform DIR",
    );
    let sealed_elsewhere = "sealed to another platform (or its PDH was regenerated";
    refused(
        restore(&snap, &other, &[]),
        "other platform",
        sealed_elsewhere,
    );
    refused(
        restore(&snap, &rotated, &[]),
        "rotated PDH",
        sealed_elsewhere,
    );
    refused(
        restore(&snap, &dir.path().join("missing"), &[]),
        "missing platform",
        "does not exist",
    );
    refused(
        restore(&snap, &plat, &["--backend", "kvm"]),
        "kvm",
        "emu backend",
    );

    // Its own platform opens it.
    let o = restore(&snap, &plat, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), expected(iters));
}

/// Damaged snapshots are refused by their checksums; snapshots rewritten consistently
/// (checksums fixed) are refused by the secure processor: an altered page, a page moved
/// to another address, an altered vCPU, a dropped page.
#[test]
fn damaged_and_altered_sealed_snapshots_are_refused() {
    let mut rng = Rng::new("sealed damage");
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path(), "platform");
    let snap = snapshot_at_start(dir.path(), &plat, 20_000);
    let json = read_state(&snap);
    let mem = std::fs::read(snap.join("memory.sev")).unwrap();
    let state = std::fs::read(snap.join("vm.state")).unwrap();
    let runs = sealed_runs(&json);
    // A private page that is not the last in its run, and the run's offset.
    let private: Vec<_> = runs.iter().filter(|r| r.2 && r.1 >= 2).collect();
    assert!(!private.is_empty(), "{runs:?}");
    let &&(_, count, _, run_at) = &private[rng.below(private.len() as u64) as usize];
    let k = rng.below(count - 1) as usize;
    let packet_at = run_at + k * PRIVATE_PACKET_LEN;

    let n = std::cell::Cell::new(0);
    let copy = || -> PathBuf {
        n.set(n.get() + 1);
        let d = dir.path().join(format!("damaged{}", n.get()));
        copy_dir(&snap, &d);
        d
    };
    // (snapshot, expected message, rewritten consistently: passes every checksum)
    let mut cases: Vec<(PathBuf, &str, bool)> = Vec::new();

    // Checksums.
    let d = copy();
    let mut m = mem.clone();
    m[rng.below(mem.len() as u64) as usize] ^= 0x5a;
    std::fs::write(d.join("memory.sev"), m).unwrap();
    cases.push((d, "memory.sev is corrupt", false));
    let d = copy();
    std::fs::write(
        d.join("memory.sev"),
        &mem[..rng.below(mem.len() as u64) as usize],
    )
    .unwrap();
    cases.push((d, "memory.sev is truncated", false));
    let nl = state.iter().position(|&b| b == b'\n').unwrap();
    let d = copy();
    std::fs::write(
        d.join("vm.state"),
        &state[..nl + 1 + rng.below((state.len() - nl - 1) as u64) as usize],
    )
    .unwrap();
    cases.push((d, "vm.state is truncated", false));
    let d = copy();
    let mut st = state.clone();
    st[nl + 1 + rng.below((state.len() - nl - 1) as u64) as usize] ^= 0x01;
    std::fs::write(d.join("vm.state"), st).unwrap();
    cases.push((d, "vm.state is corrupt", false));
    let d = copy();
    std::fs::remove_file(d.join("memory.sev")).unwrap();
    cases.push((d, "memory.sev", false));

    // Consistent rewrites: a flipped bit in a sealed page's IV, MAC or ciphertext (after
    // its kind byte and the header's 4 bytes of flags).
    let d = copy();
    let mut m = mem.clone();
    let at = packet_at + 5 + rng.below((PRIVATE_PACKET_LEN - 5) as u64) as usize;
    m[at] ^= 1 << rng.below(8);
    forge(&d, &mut json.clone(), &m);
    cases.push((d, "MAC does not verify", true));
    // Two sealed pages exchanged: each MAC binds its page's address.
    let d = copy();
    let mut m = mem.clone();
    let (x, y) = m[packet_at..packet_at + 2 * PRIVATE_PACKET_LEN].split_at_mut(PRIVATE_PACKET_LEN);
    x.swap_with_slice(y);
    forge(&d, &mut json.clone(), &m);
    cases.push((d, "MAC does not verify", true));
    // A flipped byte in a vCPU's sealed VMSA.
    let d = copy();
    let mut j = json.clone();
    let vmsa = j["sev"]["vcpus"][0]["vmsa_ciphertext"]
        .as_array_mut()
        .unwrap();
    let i = rng.below(vmsa.len() as u64) as usize;
    vmsa[i] = (vmsa[i].as_u64().unwrap() ^ 0x10).into();
    forge(&d, &mut j, &mem);
    cases.push((d, "vCPU 0", true));
    // The last page of the last private run dropped: the transcript no longer matches.
    let d = copy();
    let mut j = json.clone();
    let (ri, &(_, count, _, at)) = runs.iter().enumerate().rfind(|r| r.1 .2).unwrap();
    let end = at + count as usize * PRIVATE_PACKET_LEN;
    let m = [&mem[..end - PRIVATE_PACKET_LEN], &mem[end..]].concat();
    if count == 1 {
        j["sev"]["memory"].as_array_mut().unwrap().remove(ri);
    } else {
        j["sev"]["memory"][ri]["count"] = (count - 1).into();
    }
    forge(&d, &mut j, &m);
    cases.push((d, "RECEIVE_FINISH", true));

    for (d, expect, forged) in &cases {
        let o = restore(d, &plat, &[]);
        let e = text(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{}: {e}", d.display());
        assert!(
            e.contains(expect),
            "{}: expected {expect:?} in {e}",
            d.display()
        );
        // What passed every checksum was refused by the firmware.
        assert_eq!(
            e.contains("the secure processor refused the sealed guest"),
            *forged,
            "{}: {e}",
            d.display()
        );
        assert!(!e.contains("panicked"), "{e}");
        assert!(o.stdout.is_empty(), "a refused snapshot must not run");
    }
}

/// A guest whose policy has NOSEND may never leave its platform, not even sealed to it:
/// the snapshot is refused, nothing is written, and the guest runs on.
#[test]
fn nosend_guests_cannot_be_snapshotted() {
    let dir = tempfile::tempdir().unwrap();
    let plat = platform(dir.path(), "platform");
    let sock = dir.path().join("vm.sock");
    let snap = dir.path().join("snap");
    let iters = 20_000;
    let mut vm = sev_vm(&plat, &sock, iters, &["--policy", "0xc"]);
    let o = ctl(&sock, &["snapshot", s(&snap)]);
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("NOSEND"), "{e}");
    assert!(!snap.exists(), "nothing is written");
    // Still paused as the user left it; it resumes and runs to its end.
    let st = ctl_ok(&sock, &["status"]);
    assert!(st.contains("paused"), "{st}");
    ctl_ok(&sock, &["resume"]);
    assert_eq!(vm.wait(TIMEOUT), 0, "{}", vm.stderr());
    assert_eq!(vm.stdout(), expected(iters));
}
