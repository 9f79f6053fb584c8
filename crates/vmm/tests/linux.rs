//! Scenario tests with a real Linux guest: Debian's cloud kernel (Linux 6.1) and an initramfs
//! of busybox, esvm's init and a static C workload (`scripts/linux-assets.sh` fetches and
//! builds them, cached). The workload's digest is compared with the same binary run natively
//! on this host: the independent oracle for the software vCPU under a real kernel and libc.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{Proc, ESVM};

struct Assets {
    kernel: PathBuf,
    vmlinux: PathBuf,
    initrd: PathBuf,
    workload: PathBuf,
}

/// The kernel, initrd and workload, fetched/built once per test binary.
fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("scripts/linux-assets.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run scripts/linux-assets.sh");
        assert!(
            out.status.success(),
            "scripts/linux-assets.sh failed ({}): the Linux test guest needs Debian's \
             linux-image-cloud-amd64 and busybox-static from the package mirror, gcc and cpio",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| -> PathBuf {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("linux-assets.sh printed no {key}: {text}"))
                .into()
        };
        Assets {
            kernel: get("ESVM_LINUX_KERNEL"),
            vmlinux: get("ESVM_LINUX_VMLINUX"),
            initrd: get("ESVM_LINUX_INITRD"),
            workload: get("ESVM_LINUX_WORKLOAD"),
        }
    })
}

const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 cryptomgr.notests";

fn cmdline(extra: &str) -> String {
    format!("{BASE_CMDLINE} {extra}")
}

/// The workload's output lines (`section=hex`, `workload digest=hex`) run natively, with
/// glibc held to the SSE2 code the guest's CPUID selects.
fn native_workload(scale: u32) -> Vec<String> {
    let out = Command::new(&assets().workload)
        .arg(scale.to_string())
        .env(
            "GLIBC_TUNABLES",
            "glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-FMA4,-AVX512F",
        )
        .output()
        .expect("cannot run the workload natively");
    assert!(out.status.success(), "native workload failed: {out:?}");
    workload_lines(&String::from_utf8_lossy(&out.stdout))
}

fn workload_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            [
                "integer=",
                "string=",
                "double=",
                "x87=",
                "files=",
                "process=",
                "workload digest=",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

/// Lines of a kernel log that must never appear.
fn kernel_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("unchecked MSR access")
                || l.contains("invalid opcode")
                || l.contains("WARNING")
                || l.contains("BUG")
                || l.contains("Call Trace")
                || l.contains("Kernel panic")
        })
        .collect()
}

/// `esvm run --kernel KERNEL --initrd <the test initrd> --cmdline CMDLINE --console none`
/// and `extra`, to its end.
fn boot_to_end(kernel: &Path, cmdline: &str, extra: &[&str]) -> (i32, String, String) {
    let a = assets();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        a.initrd.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--console",
        "none",
    ];
    args.extend_from_slice(extra);
    run_to_end(&args, BOOT_TIMEOUT)
}

fn run_to_end(args: &[&str], timeout: Duration) -> (i32, String, String) {
    let mut p = Proc::spawn(None, args);
    let status = p.wait(timeout);
    (status, p.stdout(), p.stderr())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn linux_boots_runs_the_workload_like_the_host_and_reboots() {
    let a = assets();
    let expected = native_workload(1);
    let cl = cmdline("esvm.run=workload");
    let (status, out, err) = boot_to_end(&a.kernel, &cl, &[]);
    assert_eq!(
        workload_lines(&out),
        expected,
        "the guest's workload differs from the native run\n{}",
        tail(&out)
    );
    assert!(out.contains("Linux version 6.1"), "{}", tail(&out));
    assert!(out.contains("esvm-init: workload exited with status 0"));
    assert_eq!(
        kernel_complaints(&out),
        Vec::<&str>::new(),
        "the kernel complained"
    );
    // The reboot (i8042 reset line) ends the VM with status 0 and a message.
    assert_eq!(status, 0, "stderr: {err}");
    assert!(err.contains("the guest reset itself"), "stderr: {err}");
}

#[test]
fn a_vmlinux_elf_boots_too() {
    let a = assets();
    let expected = native_workload(1);
    let cl = cmdline("esvm.run=workload esvm.then=poweroff");
    let (status, out, err) = boot_to_end(&a.vmlinux, &cl, &[]);
    assert_eq!(workload_lines(&out), expected, "{}", tail(&out));
    // Power-off through ACPI (the FADT's PM1a control): status 0 and a message.
    assert_eq!(status, 0, "stderr: {err}");
    assert!(
        err.contains("the guest powered off (ACPI S5"),
        "stderr: {err}"
    );
}

/// Boot to the end of the workload with `run` options `extra`: the console output and the
/// instruction count esvm logs at the end.
/// `esvm run` of the test kernel and initrd with command line `cl`.
fn kernel_run_args<'a>(a: &'a Assets, cl: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--kernel",
        a.kernel.to_str().unwrap(),
        "--initrd",
        a.initrd.to_str().unwrap(),
        "--cmdline",
        cl,
    ]
}

fn boot_counting_instructions(extra: &[&str]) -> (String, String) {
    let a = assets();
    let cl = cmdline("esvm.run=workload");
    let out = Command::new(ESVM)
        .args(kernel_run_args(a, &cl))
        .args(["--console", "none"])
        .args(extra)
        .env("ESVM_LOG", "esvm=info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let count = err
        .lines()
        .find_map(|l| l.split("instructions=").nth(1))
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|| panic!("no instruction count in stderr: {err}"));
    (String::from_utf8_lossy(&out.stdout).into_owned(), count)
}

/// The initramfs is the same bytes on every build and machine: each newc entry has owner
/// 0:0 and mtime 0 (the files' own build times varied, and with them the SEV-ES launch
/// digest and every boot's instruction count, whenever the cache was rebuilt).
#[test]
fn the_initramfs_has_fixed_owners_and_timestamps() {
    let cpio = std::fs::read(&assets().initrd).unwrap();
    let field = |h: &[u8], i: usize| {
        u64::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
    };
    let pad4 = |n: usize| (n + 3) & !3;
    let (mut at, mut entries) = (0, 0);
    loop {
        let h = &cpio[at..at + 110];
        assert_eq!(&h[..6], b"070701", "newc header at {at}");
        let (namesize, filesize) = (field(h, 11) as usize, field(h, 6) as usize);
        let name = String::from_utf8_lossy(&cpio[at + 110..at + 110 + namesize - 1]).into_owned();
        if name == "TRAILER!!!" {
            break;
        }
        assert_eq!((field(h, 2), field(h, 3)), (0, 0), "{name}: uid/gid");
        assert_eq!(field(h, 5), 0, "{name}: mtime");
        entries += 1;
        at = pad4(at + 110 + namesize) + pad4(filesize);
    }
    assert!(entries >= 9, "only {entries} entries");
}

#[test]
fn two_boots_with_the_same_inputs_are_identical() {
    let (out1, n1) = boot_counting_instructions(&[]);
    let (out2, n2) = boot_counting_instructions(&[]);
    assert_eq!(n1, n2, "instruction counts differ");
    // The console includes the kernel's timestamps (from the virtual TSC): byte-identical.
    assert!(out1 == out2, "console output differs");
}

/// SEV-ES too, though every launch encrypts under a fresh key: one vCPU, and two taking
/// turns. (The kernel reads parts of the first MiB before writing them — the BIOS data
/// area, the iBFT and DMI scans; they read as that launch's decryption of host memory,
/// and instruction counts and timestamps varied, until the load zeroed and measured it.)
#[test]
fn two_sev_es_boots_with_the_same_inputs_are_identical() {
    let plat = platform("sev-replay");
    let p = plat.to_str().unwrap();
    for extra in [&[][..], &["--vcpus", "2", "--deterministic"][..]] {
        let args = [&["--sev-es", "--platform", p][..], extra].concat();
        let (out1, n1) = boot_counting_instructions(&args);
        let (out2, n2) = boot_counting_instructions(&args);
        assert_eq!(n1, n2, "{extra:?}: instruction counts differ");
        assert!(out1 == out2, "{extra:?}: console output differs");
        assert_eq!(workload_lines(&out1), native_workload(1), "{extra:?}");
    }
    let _ = std::fs::remove_dir_all(plat);
}

#[test]
fn an_interactive_shell_answers_over_a_pipe() {
    let a = assets();
    let (mut p, mut stdin) = Proc::spawn_with_stdin(&[
        "run",
        "--kernel",
        a.kernel.to_str().unwrap(),
        "--initrd",
        a.initrd.to_str().unwrap(),
    ]);
    p.wait_stdout("esvm-init: userland up (run=shell)", BOOT_TIMEOUT);
    stdin.write_all(b"echo hello-$((6*7))\n").unwrap();
    p.wait_stdout("hello-42", Duration::from_secs(60));
    // The typed line is echoed too: wait for what only the command's output contains.
    stdin.write_all(b"echo kernel=$(uname -r)\n").unwrap();
    p.wait_stdout("kernel=6.1.", Duration::from_secs(60));
    // The 8250 driver runs interrupt-driven on IRQ 4. (The marker is split in the command so
    // that only the output contains it.)
    stdin
        .write_all(b"awk '/ttyS0/ { print \"serial\" \"-irqs=\" $2 \";\" }' /proc/interrupts\n")
        .unwrap();
    p.wait_stdout("serial-irqs=", Duration::from_secs(60));
    let out = p.stdout();
    let irqs: u64 = out
        .rsplit("serial-irqs=")
        .next()
        .and_then(|s| s.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no IRQ count: {}", tail(&out)));
    assert!(irqs > 0, "COM1 raised no interrupt: {}", tail(&out));
    stdin.write_all(b"poweroff -f\n").unwrap();
    let status = p.wait(Duration::from_secs(60));
    assert_eq!(status, 0, "{}", p.stderr());
    assert!(p.stderr().contains("powered off"), "{}", p.stderr());
}

/// The guest runs on the local APIC and the I/O APIC described by esvm's ACPI tables: the
/// PIT's IRQ 0 arrives on I/O APIC pin 2 (the MADT's override), COM1 and the i8042 on their
/// pins, the tick comes from the local APIC's TSC-deadline timer, the tables pass Linux's
/// checksum checks, and `poweroff` ends the VM through the FADT's PM1a control with status 0.
#[test]
fn linux_runs_on_the_ioapic_and_lapic_timer_and_powers_off_through_acpi() {
    ioapic_lapic_timer_and_acpi(None);
}

/// The same as an SEV-ES guest: its TSC-deadline and x2APIC MSR accesses go through its #VC
/// handler and the GHCB to the VMM's local APIC, so it too finds the TSC-deadline timer
/// (no LAPIC timer calibration against the PIT) and ticks on the `lapic-deadline`
/// clockevent.
#[test]
fn an_sev_es_linux_guest_runs_on_the_ioapic_and_lapic_deadline_timer_too() {
    let plat = platform("sev-lapic");
    ioapic_lapic_timer_and_acpi(Some(&plat));
    let _ = std::fs::remove_dir_all(plat);
}

fn ioapic_lapic_timer_and_acpi(sev_platform: Option<&Path>) {
    let a = assets();
    let mut args = vec![
        "run",
        "--kernel",
        a.kernel.to_str().unwrap(),
        "--initrd",
        a.initrd.to_str().unwrap(),
    ];
    if let Some(plat) = sev_platform {
        args.extend(["--sev-es", "--platform", plat.to_str().unwrap()]);
    }
    let (mut p, mut stdin) = Proc::spawn_with_stdin(&args);
    p.wait_stdout("esvm-init: userland up (run=shell)", BOOT_TIMEOUT);
    // Markers are split in the commands so that only the output contains them.
    stdin
        .write_all(b"echo inter''rupts-begin; cat /proc/interrupts; echo inter''rupts-end\n")
        .unwrap();
    p.wait_stdout("interrupts-end", Duration::from_secs(60));
    stdin
        .write_all(
            b"echo clo''ck=$(cat /sys/devices/system/clockevents/clockevent0/current_device)';'\n",
        )
        .unwrap();
    p.wait_stdout("clock=lapic", Duration::from_secs(60));
    stdin.write_all(b"poweroff -f\n").unwrap();
    let status = p.wait(Duration::from_secs(60));
    let out = p.stdout();
    let err = p.stderr();
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("powered off (ACPI S5"), "{err}");
    assert!(out.contains("clock=lapic-deadline;"), "{}", tail(&out));
    let interrupts = out
        .rsplit("interrupts-begin")
        .next()
        .and_then(|s| s.split("interrupts-end").next())
        .unwrap_or_default();
    let count = |name: &str| -> u64 {
        let line = interrupts
            .lines()
            .find(|l| l.trim_end().ends_with(name) || l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in /proc/interrupts:\n{interrupts}"));
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line:?}"))
    };
    for (irq, chip) in [
        ("timer", "IO-APIC   2-edge"),
        ("ttyS0", "IO-APIC   4-edge"),
        ("i8042", "IO-APIC   1-edge"),
    ] {
        assert!(
            interrupts
                .lines()
                .any(|l| l.contains(chip) && l.contains(irq)),
            "{irq} is not on {chip}:\n{interrupts}"
        );
    }
    assert!(count("ttyS0") > 0, "{interrupts}");
    assert!(
        count("LOC:") > 0,
        "no local APIC timer interrupts:\n{interrupts}"
    );
    // The kernel found and used the tables, without complaint.
    for line in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id 0, version 32, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: PM: (supports S0 S5)",
        "TSC deadline timer available",
    ] {
        assert!(
            out.contains(line),
            "no {line:?} in the kernel log:\n{}",
            tail(&out)
        );
    }
    for bad in [
        "Incorrect checksum",
        "ACPI Error",
        "ACPI BIOS Error",
        "ACPI Warning",
        "ACPI BIOS Warning",
    ] {
        assert!(!out.contains(bad), "the kernel said {bad:?}:\n{out}");
    }
    assert_eq!(kernel_complaints(&out), Vec::<&str>::new());
    if sev_platform.is_some() {
        assert!(
            out.contains("Memory Encryption Features active: AMD SEV SEV-ES"),
            "{}",
            tail(&out)
        );
    }
}

/// Scale of the workload the moving tests interrupt: several seconds of guest work, so a
/// snapshot or migration taken right after userland starts lands in the middle of it.
const MOVE_SCALE: u32 = 8;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("esvm-linux-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A Linux source with an API socket, running the workload and then a shell.
fn linux_source(sock: &Path) -> Proc {
    linux_source_on(sock, None)
}

/// [`linux_source`], as an SEV-ES guest on `sev_platform` if given.
fn linux_source_on(sock: &Path, sev_platform: Option<&Path>) -> Proc {
    linux_guest_with(
        sock,
        sev_platform,
        &format!("esvm.run=workload esvm.scale={MOVE_SCALE} esvm.then=shell"),
    )
}

/// A Linux guest with an API socket, its init told `init_args`.
fn linux_guest_with(sock: &Path, sev_platform: Option<&Path>, init_args: &str) -> Proc {
    let sev_args: Vec<&str> = match sev_platform {
        Some(p) => vec!["--sev-es", "--platform", p.to_str().unwrap()],
        None => vec![],
    };
    linux_guest_args(sock, &sev_args, init_args)
}

/// A Linux guest with an API socket and `run` options `extra`, its init told `init_args`.
fn linux_guest_args(sock: &Path, extra: &[&str], init_args: &str) -> Proc {
    let cl = cmdline(init_args);
    let mut args = kernel_run_args(assets(), &cl);
    args.extend(["--console", "none", "--api-socket", sock.to_str().unwrap()]);
    args.extend(extra);
    Proc::spawn(None, &args)
}

/// The moved guest finishes the workload with the native digest, then its shell answers.
fn check_moved_guest(
    before: &str,
    dest: &mut Proc,
    stdin: &mut std::process::ChildStdin,
    expected: &[String],
) {
    dest.wait_stdout("workload digest=", BOOT_TIMEOUT);
    let all = format!("{before}{}", dest.stdout());
    assert_eq!(
        workload_lines(&all),
        expected,
        "the moved guest's workload differs from the native run\nbefore:\n{}\nafter:\n{}",
        tail(before),
        tail(&dest.stdout())
    );
    dest.wait_stdout("esvm-init: workload exited with status 0", BOOT_TIMEOUT);
    // The shell that follows the workload still answers.
    shell_answers_and_powers_off(dest, stdin);
}

#[test]
fn a_snapshot_taken_mid_workload_restores_and_finishes_it() {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir("snap");
    let sock = dir.join("api.sock");
    let mut src = linux_source(&sock);
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    let snap = dir.join("snapshot");
    common::ctl_ok(&sock, &["snapshot", snap.to_str().unwrap()]);
    let at_snapshot = src.stdout();
    assert!(
        !at_snapshot.contains("workload digest="),
        "the snapshot was not taken mid-workload; raise MOVE_SCALE"
    );
    // The source runs on after a snapshot: it finishes the same workload too.
    src.wait_stdout("workload digest=", BOOT_TIMEOUT);
    assert_eq!(workload_lines(&src.stdout()), expected);
    src.kill();
    let (mut dest, mut stdin) =
        Proc::spawn_with_stdin(&["restore", snap.to_str().unwrap(), "--console", "stdin"]);
    check_moved_guest(&at_snapshot, &mut dest, &mut stdin, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_migration_mid_workload_keeps_the_digest_and_the_shell() {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir("migrate");
    let sock = dir.join("api.sock");
    let (mut dest, mut stdin, port) = receiver(&[]);
    let mut src = linux_source(&sock);
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    let url = format!("tcp:127.0.0.1:{port}");
    common::ctl_ok(&sock, &["migrate", &url]);
    assert_eq!(src.wait(Duration::from_secs(120)), 0, "{}", src.stderr());
    let before = src.stdout();
    assert!(
        !before.contains("workload digest="),
        "the migration was not mid-workload; raise MOVE_SCALE"
    );
    check_moved_guest(&before, &mut dest, &mut stdin, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Linux as an SEV-ES guest ----

/// `esvm platform init --dir DIR`: a software secure processor of its own.
fn platform(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let o = Command::new(ESVM)
        .args(["platform", "init", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
}

/// Debian's kernel, unmodified, entered directly as an SEV-ES guest: its memory encrypted
/// and measured by the software secure processor, its registers in an encrypted VMSA, every
/// port and MSR access through its own #VC handler and the GHCB. It says SEV-ES is active,
/// and its userland computes what the host computes.
#[test]
fn linux_boots_as_an_sev_es_guest_and_runs_the_workload_like_the_host() {
    let a = assets();
    let expected = native_workload(1);
    let plat = platform("sev-boot");
    let cl = cmdline("esvm.run=workload esvm.then=poweroff");
    let (status, out, err) = boot_to_end(
        &a.kernel,
        &cl,
        &["--sev-es", "--platform", plat.to_str().unwrap()],
    );
    assert!(
        out.contains("Memory Encryption Features active: AMD SEV SEV-ES"),
        "{}",
        tail(&out)
    );
    assert_eq!(
        workload_lines(&out),
        expected,
        "the SEV-ES guest's workload differs from the native run\n{}",
        tail(&out)
    );
    assert_eq!(
        kernel_complaints(&out),
        Vec::<&str>::new(),
        "the kernel complained"
    );
    assert!(err.contains("SEV-ES launch measurement"), "stderr: {err}");
    assert_eq!(status, 0, "stderr: {err}");
    // Through ACPI: the DSDT (in encrypted memory, reserved as ACPI tables) was readable.
    assert!(err.contains("powered off (ACPI S5"), "stderr: {err}");
    assert!(out.contains("ACPI: PM: (supports S0 S5)"), "{}", tail(&out));
    assert!(
        out.contains("..TIMER: vector=0x30 apic1=0 pin1=2"),
        "{}",
        tail(&out)
    );
    let _ = std::fs::remove_dir_all(plat);
}

/// Linux bounces an SEV guest's device I/O through at least 64 MiB of shared memory: a
/// smaller VM is refused before anything runs, with a message that says how much to give.
#[test]
fn an_sev_es_linux_guest_too_small_for_its_bounce_buffer_is_refused() {
    let a = assets();
    let plat = platform("sev-small");
    let (status, out, err) = run_to_end(
        &[
            "run",
            "--sev-es",
            "--platform",
            plat.to_str().unwrap(),
            "--kernel",
            a.kernel.to_str().unwrap(),
            "--mem",
            "128M",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(status, 125, "stderr: {err}");
    assert!(out.is_empty(), "nothing ran: {out}");
    assert!(
        err.contains("too small for an SEV-ES Linux guest") && err.contains("--mem 256M"),
        "stderr: {err}"
    );
    let _ = std::fs::remove_dir_all(plat);
}

/// The guest owner checks what booted from the inputs alone: `esvm owner verify --kernel
/// --initrd --cmdline` computes the launch digest the host's secure processor measured
/// (kernel, zero page, command line, initrd, boot page tables, the VMSA), and a changed byte
/// in any of them, or another memory size, is caught.
#[test]
fn the_owner_verifies_an_sev_es_linux_launch_from_kernel_initrd_and_command_line() {
    let a = assets();
    let plat = platform("sev-verify");
    let work = temp_dir("sev-verify-owner");
    let p = |n: &str| work.join(n).to_str().unwrap().to_string();
    let esvm_ok = |args: &[&str]| {
        let o = Command::new(ESVM).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "esvm {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    esvm_ok(&[
        "platform",
        "export",
        "--dir",
        plat.to_str().unwrap(),
        "--out",
        &p("chain.bin"),
    ]);
    esvm_ok(&[
        "owner",
        "session",
        "--chain",
        &p("chain.bin"),
        "--policy",
        "0x5",
        "--out",
        &p("owner"),
    ]);
    let cl = cmdline("esvm.run=workload");
    // The launch is measured before the first instruction; a few million are enough.
    let o = Command::new(ESVM)
        .args(["run", "--sev-es", "--platform", plat.to_str().unwrap()])
        .args(["--session", &p("owner"), "--measurement-out", &p("m.bin")])
        .args(["--kernel", a.kernel.to_str().unwrap()])
        .args(["--initrd", a.initrd.to_str().unwrap(), "--cmdline", &cl])
        .args(["--console", "none", "--max-instructions", "1000000"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(123),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A copy of the kernel and of the initrd with one byte changed in the middle.
    let changed = |from: &Path, name: &str| {
        let mut bytes = std::fs::read(from).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(work.join(name), bytes).unwrap();
        p(name)
    };
    let (kernel, initrd) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let (bad_kernel, bad_initrd) = (changed(&a.kernel, "kernel"), changed(&a.initrd, "initrd"));
    let other_cl = cmdline("esvm.run=workload ");
    let cases: [(&str, &str, &str, &str, bool); 5] = [
        ("the inputs of the launch", kernel, initrd, &cl, true),
        ("a changed kernel byte", &bad_kernel, initrd, &cl, false),
        ("a changed initrd byte", kernel, &bad_initrd, &cl, false),
        ("a changed command line", kernel, initrd, &other_cl, false),
        ("another memory size", kernel, initrd, &cl, false),
    ];
    for (what, k, i, c, expect_ok) in cases {
        let mem = if what == "another memory size" {
            "512M"
        } else {
            "256M"
        };
        let o = Command::new(ESVM)
            .args(["owner", "verify", "--session", &p("owner")])
            .args(["--measurement", &p("m.bin"), "--kernel", k, "--initrd", i])
            .args(["--cmdline", c, "--mem", mem])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.success(), expect_ok, "{what}: {err}");
        if expect_ok {
            assert!(
                String::from_utf8_lossy(&o.stdout).contains("measurement verified"),
                "{what}"
            );
        } else {
            assert_eq!(o.status.code(), Some(125), "{what}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(plat);
    let _ = std::fs::remove_dir_all(work);
}

/// Two platforms under one emulated AMD root (`esvm platform init --amd-ca`), so each can
/// verify the other's certificate chain.
fn sev_hosts(dir: &Path) -> (PathBuf, PathBuf) {
    let ca = dir.join("ca");
    let init = |name: &str| {
        let p = dir.join(name);
        let o = Command::new(ESVM)
            .args(["platform", "init", "--dir", p.to_str().unwrap()])
            .args(["--amd-ca", ca.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        p
    };
    (init("p1"), init("p2"))
}

/// `esvm platform export --dir PLATFORM --out OUT`: the chain a source trusts.
fn export_chain(platform: &Path, out: &Path) -> PathBuf {
    let o = Command::new(ESVM)
        .args(["platform", "export", "--dir", platform.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.to_path_buf()
}

/// A sealed snapshot of an SEV-ES Linux guest mid-workload: restored on its platform, the
/// guest finishes the workload with the native digest and its shell answers.
#[test]
fn a_sealed_snapshot_of_an_sev_es_linux_guest_restores_mid_workload() {
    move_sev_linux("sev-snap", None, MoveBy::SealedSnapshot);
}

/// The same with the snapshot taken at a random point of the kernel's boot.
#[test]
fn a_sealed_snapshot_of_an_sev_es_linux_guest_restores_mid_boot() {
    let delay = Duration::from_millis(common::Rng::new("mid-boot snapshot").below(1500));
    move_sev_linux("sev-snap-boot", Some(delay), MoveBy::SealedSnapshot);
}

/// An SEV-ES Linux guest live-migrated mid-workload to another platform under the same
/// root: the VMSA and memory travel re-encrypted under the transport keys, the guest
/// finishes the workload with the native digest and its shell answers at the destination.
#[test]
fn an_sev_es_linux_guest_migrates_mid_workload_between_platforms() {
    move_sev_linux("sev-migrate", None, MoveBy::Migration);
}

/// The same, at a random point of the kernel's boot (before userland): the guest is moved
/// with its boot half done and finishes it, and the workload after it, at the destination.
#[test]
fn an_sev_es_linux_guest_migrates_mid_boot_between_platforms() {
    let delay = Duration::from_millis(common::Rng::new("mid-boot migration").below(1500));
    move_sev_linux("sev-migrate-boot", Some(delay), MoveBy::Migration);
}

/// Move an SEV-ES Linux guest `by` live migration (to another platform under the same
/// root) or a sealed snapshot (restored on its platform), `delay` after its API socket
/// appears (None: once its userland is up, mid-workload); the moved guest must finish with
/// the native digest and answer at its shell.
fn move_sev_linux(name: &str, delay: Option<Duration>, by: MoveBy) {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir(name);
    let hosts = sev_hosts(&dir);
    let sock = dir.join("api.sock");
    let receiving =
        (by == MoveBy::Migration).then(|| receiver(&["--platform", hosts.1.to_str().unwrap()]));
    let mut src = linux_source_on(&sock, Some(&hosts.0));
    common::wait_socket(&mut src, &sock);
    match delay {
        Some(d) => std::thread::sleep(d),
        None => src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT),
    }
    let (before, mut dest, mut stdin) = move_guest(src, &sock, &dir, &hosts.0, receiving);
    let too_late = if delay.is_some() {
        "esvm-init: userland up"
    } else {
        "workload digest="
    };
    assert!(
        !before.contains(too_late),
        "the move came too late ({too_late:?} already printed)"
    );
    if delay.is_some() {
        dest.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    }
    check_moved_guest(&before, &mut dest, &mut stdin, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Move the SEV-ES guest `src` (API socket `sock`, platform `platform`): live-migrate it to
/// the `receiving` destination if given (which trusts `platform`'s chain), else take a
/// sealed snapshot in `dir`, kill it and restore the snapshot on `platform`. Returns what
/// the source printed and the moved guest with its console.
fn move_guest(
    mut src: Proc,
    sock: &Path,
    dir: &Path,
    platform: &Path,
    receiving: Option<(Proc, std::process::ChildStdin, u16)>,
) -> (String, Proc, std::process::ChildStdin) {
    match receiving {
        Some((dest, stdin, port)) => {
            let chain = export_chain(platform, &dir.join("source.chain"));
            let url = format!("tcp:127.0.0.1:{port}");
            common::ctl_ok(sock, &["migrate", &url, "--trust", chain.to_str().unwrap()]);
            assert_eq!(src.wait(Duration::from_secs(120)), 0, "{}", src.stderr());
            (src.stdout(), dest, stdin)
        }
        None => {
            let snap = dir.join("snapshot");
            common::ctl_ok(sock, &["snapshot", snap.to_str().unwrap()]);
            let before = src.stdout();
            src.kill();
            let (dest, stdin) = Proc::spawn_with_stdin(&[
                "restore",
                snap.to_str().unwrap(),
                "--platform",
                platform.to_str().unwrap(),
                "--console",
                "stdin",
            ]);
            (before, dest, stdin)
        }
    }
}

// ---- Nothing in plain ----

/// What `esvm.run=marker` makes the guest's init compute (busybox sh arithmetic: 64-bit,
/// wrapping): the marker exists only at run time, in guest memory.
fn runtime_marker() -> String {
    let a = 0x5eed_u64.wrapping_mul(2_654_435_761).wrapping_add(40503);
    let b = a.wrapping_mul(a).wrapping_add(0x9e37_79b9);
    format!("esvm-marker-{a:x}-{b:x}")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether any file under `dir` contains `needle`.
fn any_file_contains(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let path = e.unwrap().path();
        if path.is_dir() {
            any_file_contains(&path, needle)
        } else {
            contains(&std::fs::read(&path).unwrap(), needle)
        }
    })
}

/// `esvm receive --listen tcp:127.0.0.1:0 --console stdin EXTRA...` and the port it took.
fn receiver(extra: &[&str]) -> (Proc, std::process::ChildStdin, u16) {
    let mut args = vec![
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--console",
        "stdin",
    ];
    args.extend_from_slice(extra);
    let (mut dest, stdin) = Proc::spawn_with_stdin(&args);
    let err = dest.wait_stderr("listening on ", Duration::from_secs(30));
    let port: u16 = err
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {err}"));
    (dest, stdin, port)
}

/// A TCP relay to `127.0.0.1:to` that records what the first client sends.
fn recording_relay(to: u16) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut server = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut server_rx, mut client_tx) =
            (server.try_clone().unwrap(), client.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut server_rx, &mut client_tx);
            let _ = client_tx.shutdown(std::net::Shutdown::Write);
        });
        let mut recorded = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    recorded.extend_from_slice(&buf[..n]);
                    if server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
        recorded
    });
    (port, handle)
}

/// A secret the guest computes at run time is in plain sight of the host for a plain guest
/// (its snapshot holds it: the positive control) and nowhere the host can see for an SEV-ES
/// guest: not in its sealed snapshot, not in its live-migration stream — while the guest at
/// the destination still has it.
#[test]
fn nothing_an_sev_es_linux_guest_computes_is_in_plain_sight_of_the_host() {
    let marker = runtime_marker();
    let a = assets();
    assert!(
        !contains(&std::fs::read(&a.initrd).unwrap(), marker.as_bytes()),
        "the marker must not be in the initramfs"
    );
    let dir = temp_dir("plain-sight");
    let (p1, p2) = sev_hosts(&dir);

    // Plain: the snapshot's memory image holds the marker.
    let sock = dir.join("plain.sock");
    let mut plain = linux_guest_with(&sock, None, "esvm.run=marker");
    common::wait_socket(&mut plain, &sock);
    plain.wait_stdout("esvm-init: marker ready", BOOT_TIMEOUT);
    let snap = dir.join("plain-snapshot");
    common::ctl_ok(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(
        any_file_contains(&snap, marker.as_bytes()),
        "positive control: a plain guest's snapshot holds the marker"
    );
    // ... and so does its migration stream.
    let (mut plain_dest, _plain_stdin, port) = receiver(&[]);
    let (relay, recorded) = recording_relay(port);
    common::ctl_ok(&sock, &["migrate", &format!("tcp:127.0.0.1:{relay}")]);
    assert_eq!(
        plain.wait(Duration::from_secs(120)),
        0,
        "{}",
        plain.stderr()
    );
    assert!(
        contains(&recorded.join().unwrap(), marker.as_bytes()),
        "positive control: a plain guest's migration stream holds the marker"
    );
    plain_dest.kill();

    // SEV-ES: neither the sealed snapshot nor the migration stream.
    let sock = dir.join("sev.sock");
    let mut src = linux_guest_with(&sock, Some(&p1), "esvm.run=marker");
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: marker ready", BOOT_TIMEOUT);
    let sealed = dir.join("sealed-snapshot");
    common::ctl_ok(&sock, &["snapshot", sealed.to_str().unwrap()]);
    assert!(
        !any_file_contains(&sealed, marker.as_bytes()),
        "the sealed snapshot of an SEV-ES guest holds the marker in plain"
    );
    let chain = export_chain(&p1, &dir.join("p1.chain"));
    let (mut dest, mut stdin, port) = receiver(&["--platform", p2.to_str().unwrap()]);
    let (relay, recorded) = recording_relay(port);
    let url = format!("tcp:127.0.0.1:{relay}");
    common::ctl_ok(
        &sock,
        &["migrate", &url, "--trust", chain.to_str().unwrap()],
    );
    assert_eq!(src.wait(Duration::from_secs(120)), 0, "{}", src.stderr());
    let stream = recorded.join().unwrap();
    assert!(
        stream.len() > 1 << 20,
        "the stream was recorded ({} bytes)",
        stream.len()
    );
    assert!(
        !contains(&stream, marker.as_bytes()),
        "the migration stream of an SEV-ES guest holds the marker in plain"
    );
    use sha2::Digest;
    // The destination has it: its checksum, computed in the guest, matches (the marker
    // itself is never printed, which would put it on the host's console).
    let file: String = format!("{marker}\n").repeat(64);
    let digest: String = sha2::Sha256::digest(file.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"sha256sum /tmp/marker\n").unwrap();
    dest.wait_stdout(&digest, Duration::from_secs(60));
    stdin.write_all(b"poweroff -f\n").unwrap();
    assert_eq!(dest.wait(Duration::from_secs(60)), 0, "{}", dest.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Tracked registers with a real guest ----

/// The hypervisor's tracked view of an SEV-ES Linux guest (CR0, CR4, CR8, EFER, kept only
/// from write-trap exits) equals what the firmware's DBG_DECRYPT finds in the encrypted VMSA,
/// at random points of the boot and the workload, and register reads are refused
/// throughout. With a NODBG policy the firmware refuses the decryption.
#[test]
fn the_tracked_view_of_an_sev_es_linux_guest_matches_its_decrypted_vmsa() {
    let mut rng = common::Rng::new("tracked-view points");
    let dir = temp_dir("tracked");
    let (p1, _) = sev_hosts(&dir);
    let sock = dir.join("api.sock");
    let mut g = linux_guest_with(&sock, Some(&p1), "esvm.run=workload esvm.then=shell");
    common::wait_socket(&mut g, &sock);
    let mut views = Vec::new();
    for point in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        common::ctl_ok(&sock, &["pause"]);
        let vcpus = common::vcpus_of(&sock);
        common::ctl_ok(&sock, &["resume"]);
        let v = &vcpus[0];
        assert_eq!(v["protected"], true, "point {point}: {v}");
        assert!(
            v["registers_refused"]
                .as_str()
                .is_some_and(|r| r.contains("protected")),
            "point {point}: register reads must fail loudly: {v}"
        );
        assert_eq!(
            v["control"], v["debug_vmsa"],
            "point {point}: tracked view and decrypted VMSA differ: {v}"
        );
        views.push(v["control"].clone());
    }
    // The points saw the boot move on (the guest enables paging and long mode early, then
    // its CR4 grows as features are turned on).
    assert!(
        views
            .iter()
            .any(|c| c["cr0"].as_u64().unwrap() & 0x8000_0000 != 0),
        "{views:?}"
    );
    g.wait_stdout("workload digest=", BOOT_TIMEOUT);
    assert_eq!(workload_lines(&g.stdout()), native_workload(1));
    g.kill();

    // NODBG: the firmware refuses to decrypt; the tracked view is still there.
    let o = Command::new(ESVM)
        .args(["run", "--sev-es", "--platform", p1.to_str().unwrap()])
        .args(["--policy", "0x5", "--api-socket"])
        .arg(dir.join("nodbg.sock"))
        .args([
            "--kernel",
            assets().kernel.to_str().unwrap(),
            "--console",
            "none",
        ])
        .args(["--start-paused"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut nodbg = o;
    let nodbg_sock = dir.join("nodbg.sock");
    let start = std::time::Instant::now();
    while !nodbg_sock.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = &common::vcpus_of(&nodbg_sock)[0];
    assert!(v["debug_vmsa"].is_null(), "{v}");
    assert!(
        v["debug_vmsa_refused"]
            .as_str()
            .is_some_and(|r| r.contains("NODBG")),
        "{v}"
    );
    let _ = nodbg.kill();
    let _ = nodbg.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tracked view travels inside the authenticated transfer: a paused SEV-ES Linux guest
/// migrated mid-workload arrives (kept paused) with the tracked CR0/CR4/CR8/EFER the source
/// had at stop-and-copy, and they equal its VMSA's as the destination firmware decrypts it.
#[test]
fn the_tracked_view_arrives_with_an_sev_es_linux_guest_as_it_left() {
    let dir = temp_dir("tracked-move");
    let (p1, p2) = sev_hosts(&dir);
    let chain = export_chain(&p1, &dir.join("p1.chain"));
    let dest_sock = dir.join("dest.sock");
    let (mut dest, _stdin, port) = receiver(&[
        "--platform",
        p2.to_str().unwrap(),
        "--api-socket",
        dest_sock.to_str().unwrap(),
        "--start-paused",
    ]);
    let sock = dir.join("api.sock");
    let mut src = linux_source_on(&sock, Some(&p1));
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    // Paused: stop-and-copy sees exactly this state.
    common::ctl_ok(&sock, &["pause"]);
    let at_source = common::vcpus_of(&sock)[0].clone();
    assert_eq!(at_source["control"], at_source["debug_vmsa"], "{at_source}");
    let url = format!("tcp:127.0.0.1:{port}");
    common::ctl_ok(
        &sock,
        &["migrate", &url, "--trust", chain.to_str().unwrap()],
    );
    assert_eq!(src.wait(Duration::from_secs(120)), 0, "{}", src.stderr());
    common::wait_socket(&mut dest, &dest_sock);
    let arrived = common::vcpus_of(&dest_sock)[0].clone();
    assert_eq!(arrived["protected"], true, "{arrived}");
    assert_eq!(
        arrived["control"], at_source["control"],
        "the tracked view changed in transit"
    );
    assert_eq!(
        arrived["control"], arrived["debug_vmsa"],
        "the destination's tracked view is not its decrypted VMSA's"
    );
    common::ctl_ok(&dest_sock, &["resume"]);
    dest.wait_stdout("workload digest=", BOOT_TIMEOUT);
    assert_eq!(
        workload_lines(&format!("{}{}", src.stdout(), dest.stdout())),
        native_workload(MOVE_SCALE)
    );
    dest.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Cut and tampered migrations of an SEV-ES Linux guest ----

/// `esvm ctl migrate` through `proxy`: the command's output, whether it succeeded.
fn migrate_through(sock: &Path, proxy: &common::proxy::Proxy, chain: &Path) -> (bool, String) {
    let o = Command::new(ESVM)
        .args(["ctl", "--api-socket", sock.to_str().unwrap(), "migrate"])
        .args([&proxy.url(), "--trust", chain.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// An SEV-ES Linux guest mid-workload survives migrations cut at random points of the
/// stream and migrations whose bytes were changed on the way — also with the frame
/// checksums forged, so that only the firmware's transport MACs can notice: each is
/// refused, the source runs on, and a last clean migration brings the guest over with the
/// native digest and an answering shell. CI runs 3 cuts; `ESVM_LINUX_SEV_CUTS=50 cargo
/// test -p esvm --test linux cut_and_tampered` runs the full 50.
#[test]
fn cut_and_tampered_migrations_of_an_sev_es_linux_guest_leave_it_running() {
    use common::proxy::{Mode, Proxy, VCPU_STATE};
    let cuts: u64 = std::env::var("ESVM_LINUX_SEV_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rng = common::Rng::new("cuts and tampering");
    let mut below = |n: u64| rng.below(n);
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir("sev-cuts");
    let (p1, p2) = sev_hosts(&dir);
    let chain = export_chain(&p1, &dir.join("p1.chain"));
    let (mut dest, mut stdin, port) = receiver(&["--platform", p2.to_str().unwrap()]);
    let proxy = Proxy::start(port);
    let sock = dir.join("api.sock");
    let mut src = linux_source_on(&sock, Some(&p1));
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    let status = |sock: &Path| -> serde_json::Value {
        serde_json::from_str(&common::ctl_ok(sock, &["status", "--json"])).unwrap()
    };
    let mut attempts: Vec<(String, Mode)> = (0..cuts)
        // Within the first 4 MiB: well before the stream's end (the guest's memory is
        // tens of MiB), so no cut lands in the final frame (the in-doubt case, covered by
        // the migration tests).
        .map(|i| (format!("cut #{i}"), Mode::Cut(4096 + below(4 << 20))))
        .collect();
    attempts.push((
        "forged private page packet".into(),
        Mode::ForgePacket {
            at: below(1 + 52 + 4096),
        },
    ));
    attempts.push((
        "forged VMSA packet".into(),
        Mode::ForgeFrame {
            frame: VCPU_STATE,
            nth: 0,
            at: 8 + 4 + 52 + 4 + below(4096 + 32),
        },
    ));
    for (what, mode) in attempts {
        proxy.set(mode);
        let (ok, out) = migrate_through(&sock, &proxy, &chain);
        assert!(!ok, "{what}: the migration completed: {out}");
        eprintln!("{what}: {}", out.trim().lines().last().unwrap_or(""));
        if what.starts_with("forged") {
            assert!(
                out.contains("MAC does not verify"),
                "{what}: not refused by the firmware: {out}"
            );
        }
        let st = status(&sock);
        assert_eq!(st["state"], "running", "{what}: {out}\n{st}");
        assert!(src.alive(), "{what}: the source died: {}", src.stderr());
        assert!(dest.alive(), "{what}: the destination must keep listening");
    }
    proxy.set(Mode::Pass);
    let (ok, out) = migrate_through(&sock, &proxy, &chain);
    assert!(ok, "the clean migration failed: {out}");
    assert_eq!(src.wait(Duration::from_secs(120)), 0, "{}", src.stderr());
    // The workload may have finished at the source meanwhile: check the whole output.
    let start = std::time::Instant::now();
    let all = loop {
        let all = format!("{}{}", src.stdout(), dest.stdout());
        if all.contains("esvm-init: workload exited with status 0")
            || start.elapsed() > BOOT_TIMEOUT
        {
            break all;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(workload_lines(&all), expected, "{}", tail(&all));
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"echo moved-$((2+3))\n").unwrap();
    dest.wait_stdout("moved-5", Duration::from_secs(60));
    stdin.write_all(b"poweroff -f\n").unwrap();
    assert_eq!(dest.wait(Duration::from_secs(60)), 0, "{}", dest.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest console kept in memory.
#[derive(Clone, Default)]
struct SharedConsole(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boot the marker guest in this process (plain, or SEV-ES on `platform`) until a fixed
/// instruction count well past "marker ready", then report whether guest RAM as the host
/// maps it holds the marker.
fn host_view_holds_marker(platform: Option<&Path>, marker: &str) -> bool {
    use esvm::machine::{Machine, MachineConfig};
    let a = assets();
    let config = MachineConfig {
        backend: esvm_hv::BackendKind::Emu,
        vm_type: if platform.is_some() {
            esvm_hv::VmType::SevEs
        } else {
            esvm_hv::VmType::Plain
        },
        mem_size: 256 << 20,
        vcpus: 1,
        max_instructions: Some(800_000_000),
    };
    let console = SharedConsole::default();
    let mut m = Machine::new(&config, Box::new(console.clone())).unwrap();
    let kernel = std::fs::read(&a.kernel).unwrap();
    let initrd = std::fs::read(&a.initrd).unwrap();
    let boot = m
        .load_linux(&esvm_loader::linux::LinuxImage {
            name: "test kernel",
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: &cmdline("esvm.run=marker"),
        })
        .unwrap();
    if let Some(dir) = platform {
        let psp = esvm::sev_launch::open_platform(dir).unwrap();
        esvm::sev_launch::launch_on(
            &mut m,
            &boot.written_pages(),
            psp,
            &esvm::sev_launch::SevLaunchArgs {
                platform: dir,
                session: None,
                measurement_out: None,
                secret: None,
                policy: None,
            },
        )
        .unwrap();
    }
    let outcome = m.run().unwrap();
    let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    assert!(
        out.contains("esvm-init: marker ready"),
        "{outcome:?}: {}",
        tail(&out)
    );
    let mem = m.vm().memory();
    let mut chunk = vec![0u8; 4 << 20];
    let mut addr = 0;
    while addr < mem.size() {
        // Overlap by the marker's length so that no occurrence straddles two chunks unseen.
        let n = (mem.size() - addr).min(chunk.len() as u64) as usize;
        mem.read(addr, &mut chunk[..n]).unwrap();
        if contains(&chunk[..n], marker.as_bytes()) {
            return true;
        }
        if addr + n as u64 >= mem.size() {
            break;
        }
        addr += (n - marker.len()) as u64;
    }
    false
}

/// Guest RAM as the host maps it: a plain guest's run-time marker is there (the positive
/// control), an SEV-ES guest's is not — only ciphertext of its private pages is.
#[test]
fn an_sev_es_linux_guests_memory_shows_the_host_no_plaintext() {
    let marker = runtime_marker();
    let dir = temp_dir("host-view");
    let (p1, _) = sev_hosts(&dir);
    assert!(
        host_view_holds_marker(None, &marker),
        "positive control: a plain guest's RAM holds the marker"
    );
    assert!(
        !host_view_holds_marker(Some(&p1), &marker),
        "the host sees an SEV-ES guest's marker in plain"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `esvm run --kernel --sev-es --wait-for-secret`: a Linux launch waits for its owner like an
/// esvm guest does; the owner verifies the measurement from the kernel inputs, injects a
/// secret bound to it, and `resume` starts the kernel.
#[test]
fn an_sev_es_linux_launch_waits_for_its_owners_secret() {
    let a = assets();
    let plat = platform("sev-wait");
    let work = temp_dir("sev-wait-owner");
    let p = |n: &str| work.join(n).to_str().unwrap().to_string();
    let esvm_ok = |args: &[&str]| {
        let o = Command::new(ESVM).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "esvm {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let plat_s = plat.to_str().unwrap();
    esvm_ok(&[
        "platform",
        "export",
        "--dir",
        plat_s,
        "--out",
        &p("chain.bin"),
    ]);
    let (chain, owner) = (p("chain.bin"), p("owner"));
    esvm_ok(&[
        "owner", "session", "--chain", &chain, "--policy", "0x5", "--out", &owner,
    ]);
    let cl = cmdline("esvm.run=workload");
    let sock = work.join("vm.sock");
    let (kernel, initrd) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let mut vm = Proc::spawn(
        None,
        &[
            "run",
            "--sev-es",
            "--platform",
            plat_s,
            "--session",
            &p("owner"),
            "--api-socket",
            sock.to_str().unwrap(),
            "--wait-for-secret",
            "--kernel",
            kernel,
            "--initrd",
            initrd,
            "--cmdline",
            &cl,
            "--console",
            "none",
            "--max-instructions",
            "1000000",
        ],
    );
    common::wait_socket(&mut vm, &sock);
    let ctl = |args: &[&str]| {
        esvm_ok(
            &["ctl", "--api-socket", sock.to_str().unwrap()]
                .into_iter()
                .chain(args.iter().copied())
                .collect::<Vec<_>>(),
        )
    };
    ctl(&["launch-measurement", "--out", &p("m.bin")]);
    let verified = esvm_ok(&[
        "owner",
        "verify",
        "--session",
        &p("owner"),
        "--measurement",
        &p("m.bin"),
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cmdline",
        &cl,
    ]);
    assert!(verified.contains("measurement verified"), "{verified}");
    std::fs::write(p("secret.txt"), b"linux secret").unwrap();
    esvm_ok(&[
        "owner",
        "secret",
        "--session",
        &p("owner"),
        "--measurement",
        &p("m.bin"),
        "--in",
        &p("secret.txt"),
        "--out",
        &p("packet.bin"),
    ]);
    ctl(&["inject-secret", &p("packet.bin")]);
    ctl(&["resume"]);
    // The kernel ran: the instruction limit ends it.
    assert_eq!(vm.wait(Duration::from_secs(120)), 123, "{}", vm.stderr());
    let _ = std::fs::remove_dir_all(plat);
    let _ = std::fs::remove_dir_all(work);
}

// ------------------------------------------------ the multithreaded workload (issue 13)

/// Threads of the multithreaded workload in the guest: more than vCPUs, so the kernel
/// interleaves them and its futex waits really sleep.
const MTLOAD_THREADS: u32 = 4;

/// The static multithreaded workload (guests/linux/mtload.c) linux-assets.sh built beside
/// the single-threaded one.
fn mtload_binary() -> PathBuf {
    let p = assets().workload.with_file_name("mtload");
    assert!(
        p.is_file(),
        "scripts/linux-assets.sh built no {}: is guests/linux/mtload.c there?",
        p.display()
    );
    p
}

/// The lines of mtload's output that must not depend on the thread count or scheduling:
/// the counter totals (`mt.NAME=hex`), its own check and the digest.
fn mtload_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            l.starts_with("mt.")
                || l.starts_with("mtload check=")
                || l.starts_with("mtload digest=")
        })
        .map(str::to_string)
        .collect()
}

fn native_mtload(threads: u32) -> Vec<String> {
    let out = Command::new(mtload_binary())
        .args([threads.to_string(), "1".to_string()])
        .output()
        .expect("cannot run mtload natively");
    assert!(out.status.success(), "native mtload failed: {out:?}");
    mtload_lines(&String::from_utf8_lossy(&out.stdout))
}

/// Boots Linux with `vcpus` vCPUs running mtload in MTLOAD_THREADS threads: the guest
/// prints the totals and digest of the native run (lost atomic updates, a broken futex
/// wake-up or a torn 16-byte compare-exchange would change them), sees `vcpus` CPUs, and
/// powers off cleanly.
fn mtload_matches_the_host(vcpus: u32) {
    let a = assets();
    let expected = native_mtload(MTLOAD_THREADS);
    assert!(
        expected.iter().any(|l| l == "mtload check=ok") && expected.len() == 10,
        "the native run itself is wrong: {expected:?}"
    );
    // The oracle is independent of the thread count (and so of scheduling).
    assert_eq!(native_mtload(1), expected, "native, 1 thread vs 4");
    let cl = cmdline(&format!(
        "esvm.run=mtload esvm.threads={MTLOAD_THREADS} esvm.then=poweroff"
    ));
    let vcpus_arg = vcpus.to_string();
    let (status, out, err) = boot_to_end(&a.kernel, &cl, &["--vcpus", &vcpus_arg]);
    assert_eq!(
        mtload_lines(&out),
        expected,
        "the guest's mtload differs from the native run\n{}",
        tail(&out)
    );
    let seen = format!("mtload threads={MTLOAD_THREADS} cpus={vcpus}");
    assert!(
        out.lines().any(|l| l.trim_end_matches('\r') == seen),
        "the guest does not see {vcpus} CPUs\n{}",
        tail(&out)
    );
    assert!(
        out.contains("esvm-init: mtload exited with status 0"),
        "{}",
        tail(&out)
    );
    assert_eq!(
        kernel_complaints(&out),
        Vec::<&str>::new(),
        "the kernel complained"
    );
    assert_eq!(status, 0, "stderr: {err}");
    assert!(
        err.contains("the guest powered off (ACPI S5"),
        "stderr: {err}"
    );
}

#[test]
fn a_multithreaded_workload_prints_the_native_digest_on_one_vcpu() {
    mtload_matches_the_host(1);
}

#[test]
fn a_multithreaded_workload_prints_the_native_digest_on_two_vcpus() {
    mtload_matches_the_host(2);
}

/// Kernel log lines that say the vCPUs' TSCs or topology disagree.
fn smp_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("TSC synchronization")
                || l.contains("unstable")
                || l.contains("Firmware Bug")
                || l.contains("topology")
                || l.contains("APIC id mismatch")
                || l.contains("not responding")
                || l.contains("failed to boot")
        })
        .collect()
}

/// `--vcpus n`: the kernel starts every AP by INIT-SIPI-SIPI (its real-mode trampoline),
/// sees them all, finds their TSCs in sync and its shell runs on all of them.
#[test]
fn linux_starts_and_sees_2_and_4_vcpus() {
    let a = assets();
    for n in [2, 4] {
        let (mut p, mut stdin) = Proc::spawn_with_stdin(&[
            "run",
            "--vcpus",
            &n.to_string(),
            "--kernel",
            a.kernel.to_str().unwrap(),
            "--initrd",
            a.initrd.to_str().unwrap(),
        ]);
        p.wait_stdout("esvm-init: userland up (run=shell)", BOOT_TIMEOUT);
        // Markers are split in the commands so that only the output contains them.
        stdin
            .write_all(
                b"echo cp''us=$(nproc)/$(grep -c ^processor /proc/cpuinfo)/$(cat /sys/devices/system/cpu/online)';'\n",
            )
            .unwrap();
        p.wait_stdout("cpus=", Duration::from_secs(60));
        stdin.write_all(b"poweroff -f\n").unwrap();
        let status = p.wait(Duration::from_secs(60));
        let out = p.stdout();
        assert_eq!(status, 0, "{}", p.stderr());
        let expected = format!("cpus={n}/{n}/0-{};", n - 1);
        assert!(out.contains(&expected), "no {expected}:\n{}", tail(&out));
        let brought_up = format!("smp: Brought up 1 node, {n} CPUs");
        assert!(out.contains(&brought_up), "{}", tail(&out));
        assert_eq!(smp_complaints(&out), Vec::<&str>::new(), "{n} vCPUs");
        assert_eq!(kernel_complaints(&out), Vec::<&str>::new(), "{n} vCPUs");
    }
}

/// Two vCPUs taking turns (`--deterministic`) replay exactly: the same console (timestamps
/// included) and the same instruction count; the workload's digest is the native one.
#[test]
fn two_boots_with_2_vcpus_are_identical_and_compute_like_the_host() {
    let expected = native_workload(1);
    let (out1, n1) = boot_counting_instructions(&["--vcpus", "2", "--deterministic"]);
    let (out2, n2) = boot_counting_instructions(&["--vcpus", "2", "--deterministic"]);
    assert!(
        out1.contains("smp: Brought up 1 node, 2 CPUs"),
        "{}",
        tail(&out1)
    );
    assert_eq!(workload_lines(&out1), expected, "{}", tail(&out1));
    assert_eq!(n1, n2, "instruction counts differ");
    assert!(out1 == out2, "console output differs");
}

/// A snapshot of a 2-vCPU guest mid-workload restores (both vCPUs, their run states and
/// local APICs) and finishes the workload with the native digest.
#[test]
fn a_snapshot_of_a_2_vcpu_guest_mid_workload_restores_and_finishes_it() {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir("snap-smp");
    let sock = dir.join("api.sock");
    let mut src = linux_smp_source(&sock, 2);
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    let snap = dir.join("snapshot");
    common::ctl_ok(&sock, &["snapshot", snap.to_str().unwrap()]);
    let at_snapshot = src.stdout();
    assert!(
        !at_snapshot.contains("workload digest="),
        "the snapshot was not taken mid-workload; raise MOVE_SCALE"
    );
    assert!(at_snapshot.contains("smp: Brought up 1 node, 2 CPUs"));
    src.kill();
    let (mut dest, mut stdin) =
        Proc::spawn_with_stdin(&["restore", snap.to_str().unwrap(), "--console", "stdin"]);
    check_moved_guest(&at_snapshot, &mut dest, &mut stdin, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Linux source with `vcpus` vCPUs and an API socket, running the workload, then a shell.
fn linux_smp_source(sock: &Path, vcpus: u32) -> Proc {
    linux_guest_args(
        sock,
        &["--vcpus", &vcpus.to_string()],
        &format!("esvm.run=workload esvm.scale={MOVE_SCALE} esvm.then=shell"),
    )
}

/// A 2-vCPU guest moved live mid-workload: both vCPUs' registers, run states and local
/// APICs cross with the memory, and the destination finishes what the source started.
#[test]
fn a_live_migration_of_a_2_vcpu_guest_mid_workload_keeps_the_digest_and_the_shell() {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir("migrate-smp");
    let sock = dir.join("api.sock");
    let (mut dest, mut stdin, port) = receiver(&[]);
    let mut src = linux_smp_source(&sock, 2);
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    let url = format!("tcp:127.0.0.1:{port}");
    common::ctl_ok(&sock, &["migrate", &url]);
    assert_eq!(src.wait(Duration::from_secs(120)), 0, "{}", src.stderr());
    let before = src.stdout();
    assert!(
        !before.contains("workload digest="),
        "the migration was not mid-workload; raise MOVE_SCALE"
    );
    assert!(
        before.contains("smp: Brought up 1 node, 2 CPUs"),
        "{}",
        tail(&before)
    );
    check_moved_guest(&before, &mut dest, &mut stdin, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------ SEV-ES APs (issue 13 point 3)

/// `owner verify --kernel ... --vcpus N` predicts the launch of an SEV-ES Linux guest with
/// N vCPUs exactly (the AP start stub, its jump table and every AP's VMSA are measured) for
/// N = 1, 2, 4, and a wrong count is caught.
#[test]
fn the_owner_verifies_sev_es_linux_launches_of_1_2_and_4_vcpus() {
    let a = assets();
    let plat = platform("sev-verify-vcpus");
    let (kernel, initrd) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let cl = cmdline("esvm.run=workload");
    let run = |args: &[&str]| {
        let o = Command::new(ESVM).args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let work = temp_dir("sev-verify-vcpus-owner");
    let chain = work.join("chain.bin");
    let owner = work.join("owner");
    let (chain, owner) = (chain.to_str().unwrap(), owner.to_str().unwrap());
    let plat_s = plat.to_str().unwrap();
    let (code, err) = run(&["platform", "export", "--dir", plat_s, "--out", chain]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&[
        "owner", "session", "--chain", chain, "--policy", "0x5", "--out", owner,
    ]);
    assert_eq!(code, Some(0), "{err}");
    for n in ["1", "2", "4"] {
        let m = work.join(format!("m{n}.bin"));
        let m = m.to_str().unwrap();
        let (code, err) = run(&[
            "run",
            "--sev-es",
            "--platform",
            plat_s,
            "--session",
            owner,
            "--measurement-out",
            m,
            "--vcpus",
            n,
            "--kernel",
            kernel,
            "--initrd",
            initrd,
            "--cmdline",
            &cl,
            "--console",
            "none",
            "--max-instructions",
            "1000000",
        ]);
        assert_eq!(code, Some(123), "{err}");
        for claimed in ["1", "2", "4"] {
            let (code, err) = run(&[
                "owner",
                "verify",
                "--session",
                owner,
                "--measurement",
                m,
                "--kernel",
                kernel,
                "--initrd",
                initrd,
                "--cmdline",
                &cl,
                "--vcpus",
                claimed,
            ]);
            let expected = if claimed == n { Some(0) } else { Some(125) };
            assert_eq!(
                code, expected,
                "--vcpus {claimed} for a {n}-vCPU launch: {err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(plat);
    let _ = std::fs::remove_dir_all(work);
}

/// The SEV-ES AP start-up with Debian's kernel: `--vcpus 2` and `--vcpus 4` boot to the
/// workload, which computes what the host computes, and the kernel brought up every CPU
/// (each AP released from the AP stub by the kernel's INIT-SIPI-SIPI and sent through the
/// jump table into its trampoline): nproc, /proc/cpuinfo and the online mask show them all,
/// and none failed to boot.
#[test]
fn an_sev_es_linux_guest_starts_and_sees_2_and_4_vcpus() {
    let a = assets();
    let expected = native_workload(1);
    let plat = platform("sev-smp");
    for n in [2, 4] {
        let cl = cmdline("esvm.run=workload esvm.then=shell");
        let (mut p, mut stdin) = Proc::spawn_with_stdin(&[
            "run",
            "--sev-es",
            "--platform",
            plat.to_str().unwrap(),
            "--vcpus",
            &n.to_string(),
            "--kernel",
            a.kernel.to_str().unwrap(),
            "--initrd",
            a.initrd.to_str().unwrap(),
            "--cmdline",
            &cl,
        ]);
        p.wait_stdout("esvm-init: workload exited", BOOT_TIMEOUT);
        // Markers are split in the commands so that only the output contains them.
        stdin
            .write_all(
                b"echo cp''us=$(nproc)/$(grep -c ^processor /proc/cpuinfo)/$(cat /sys/devices/system/cpu/online)';'\n",
            )
            .unwrap();
        p.wait_stdout("cpus=", Duration::from_secs(60));
        stdin.write_all(b"poweroff -f\n").unwrap();
        let status = p.wait(Duration::from_secs(60));
        let out = p.stdout();
        assert_eq!(status, 0, "{n} vCPUs: {}\n{}", p.stderr(), tail(&out));
        assert!(
            out.contains("Memory Encryption Features active: AMD SEV SEV-ES"),
            "{}",
            tail(&out)
        );
        let brought_up = format!("smp: Brought up 1 node, {n} CPUs");
        assert!(out.contains(&brought_up), "{n} vCPUs:\n{}", tail(&out));
        let seen = format!("cpus={n}/{n}/0-{};", n - 1);
        assert!(out.contains(&seen), "no {seen}:\n{}", tail(&out));
        assert_eq!(workload_lines(&out), expected, "{n} vCPUs\n{}", tail(&out));
        assert_eq!(smp_complaints(&out), Vec::<&str>::new(), "{n} vCPUs");
        assert_eq!(kernel_complaints(&out), Vec::<&str>::new(), "{n} vCPUs");
    }
    let _ = std::fs::remove_dir_all(plat);
}

/// A sealed snapshot of a 2-vCPU SEV-ES Linux guest taken early, while its AP is parked in
/// the AP stub's reset hold (the snapshot's scheduler state says so, and the kernel has not
/// brought it up yet): restored, the kernel releases it by INIT-SIPI, brings up both CPUs
/// and finishes the workload with the native digest.
#[test]
fn a_sealed_snapshot_of_a_2_vcpu_sev_es_linux_guest_with_its_ap_held_restores() {
    sealed_snapshot_of_2_vcpu_sev_linux("sev-snap-ap-held", true);
}

/// The same taken mid-workload, both vCPUs running Linux.
#[test]
fn a_sealed_snapshot_of_a_2_vcpu_sev_es_linux_guest_restores_mid_workload() {
    sealed_snapshot_of_2_vcpu_sev_linux("sev-snap-2-vcpus", false);
}

fn sealed_snapshot_of_2_vcpu_sev_linux(name: &str, early: bool) {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir(name);
    let (p1, _) = sev_hosts(&dir);
    let sock = dir.join("api.sock");
    let mut src = linux_guest_args(
        &sock,
        &[
            "--sev-es",
            "--platform",
            p1.to_str().unwrap(),
            "--vcpus",
            "2",
        ],
        &format!("esvm.run=workload esvm.scale={MOVE_SCALE} esvm.then=shell"),
    );
    common::wait_socket(&mut src, &sock);
    if early {
        std::thread::sleep(Duration::from_millis(50));
    } else {
        src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    }
    let snap = dir.join("snapshot");
    common::ctl_ok(&sock, &["snapshot", snap.to_str().unwrap()]);
    let at_snapshot = src.stdout();
    src.kill();
    // The scheduler state (host state, in the clear) says where the AP stood.
    let state =
        String::from_utf8_lossy(&std::fs::read(snap.join("vm.state")).unwrap()).into_owned();
    if early {
        assert!(
            !at_snapshot.contains("Brought up"),
            "the snapshot came too late:\n{}",
            tail(&at_snapshot)
        );
        assert!(
            state.contains("\"ap-reset-hold\""),
            "the AP is not held: {state:.2000}"
        );
    } else {
        assert!(
            !at_snapshot.contains("workload digest="),
            "the snapshot came too late"
        );
        assert!(at_snapshot.contains("smp: Brought up 1 node, 2 CPUs"));
        assert!(!state.contains("\"ap-reset-hold\""), "{state:.2000}");
    }
    let (mut dest, mut stdin) = Proc::spawn_with_stdin(&[
        "restore",
        snap.to_str().unwrap(),
        "--platform",
        p1.to_str().unwrap(),
        "--console",
        "stdin",
    ]);
    if early {
        dest.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
        let all = format!("{at_snapshot}{}", dest.stdout());
        assert!(
            all.contains("smp: Brought up 1 node, 2 CPUs"),
            "{}",
            tail(&all)
        );
        assert_eq!(smp_complaints(&all), Vec::<&str>::new());
    }
    check_moved_guest(&at_snapshot, &mut dest, &mut stdin, &expected);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Moving a 2-vCPU SEV-ES guest with its AP held, running or halted ----

/// Where the AP of a 2-vCPU SEV-ES guest stands when the guest is moved.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ApAt {
    /// Parked in the AP stub's reset hold: the kernel has not started it yet.
    Held,
    /// Running a multithreaded workload beside the BSP.
    Running,
    /// Idle in HLT under a quiet shell.
    Halted,
}

/// How the guest is moved.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MoveBy {
    /// Live migration to another platform under the same root.
    Migration,
    /// Sealed snapshot, restored on the same platform.
    SealedSnapshot,
}

/// The mtload scale of the move tests: long enough that a move lands mid-run.
const MOVE_MTLOAD_SCALE: u32 = 40;

/// mtload's invariant lines from a native run of `threads` threads at `scale`.
fn native_mtload_at(threads: u32, scale: u32) -> Vec<String> {
    let out = Command::new(mtload_binary())
        .args([threads.to_string(), scale.to_string()])
        .output()
        .expect("cannot run mtload natively");
    assert!(out.status.success(), "native mtload failed: {out:?}");
    mtload_lines(&String::from_utf8_lossy(&out.stdout))
}

/// Boot a 2-vCPU SEV-ES Linux guest, move it `by` the chosen way when its AP stands `at`,
/// and check at the destination that the guest carries on: a held AP is still started by
/// the kernel (both CPUs brought up, no SMP complaint), a running workload finishes with
/// the native totals and digest, and a halted AP wakes to run a multithreaded workload
/// after the move; then the shell answers and the guest powers off cleanly.
fn move_2_vcpu_sev_linux(name: &str, at: ApAt, by: MoveBy) {
    let dir = temp_dir(name);
    let (p1, p2) = sev_hosts(&dir);
    let sock = dir.join("api.sock");
    let init_args = match at {
        ApAt::Held => format!("esvm.run=workload esvm.scale={MOVE_SCALE} esvm.then=shell"),
        ApAt::Running => {
            format!("esvm.run=mtload esvm.threads=4 esvm.scale={MOVE_MTLOAD_SCALE} esvm.then=shell")
        }
        ApAt::Halted => "esvm.run=shell".to_string(),
    };
    let receiving = match by {
        MoveBy::Migration => Some(receiver(&["--platform", p2.to_str().unwrap()])),
        MoveBy::SealedSnapshot => None,
    };
    let mut src = linux_guest_args(
        &sock,
        &[
            "--sev-es",
            "--platform",
            p1.to_str().unwrap(),
            "--vcpus",
            "2",
        ],
        &init_args,
    );
    common::wait_socket(&mut src, &sock);
    match at {
        ApAt::Held => common::wait_vcpu_state(&sock, 1, "ap-reset-hold"),
        ApAt::Running => {
            src.wait_stdout("mtload threads=4 cpus=2", BOOT_TIMEOUT);
            common::wait_vcpu_state(&sock, 1, "running");
        }
        ApAt::Halted => {
            src.wait_stdout("esvm-init: userland up (run=shell)", BOOT_TIMEOUT);
            common::wait_vcpu_state(&sock, 1, "halted");
        }
    }
    let (before, mut dest, mut stdin) = move_guest(src, &sock, &dir, &p1, receiving);
    let brought_up = "smp: Brought up 1 node, 2 CPUs";
    match at {
        ApAt::Held => {
            assert!(
                !before.contains(brought_up),
                "the move came after the AP's start-up:\n{}",
                tail(&before)
            );
            check_moved_guest(&before, &mut dest, &mut stdin, &native_workload(MOVE_SCALE));
        }
        ApAt::Running => {
            assert!(
                !before.contains("mtload digest="),
                "the move came after the workload; raise MOVE_MTLOAD_SCALE"
            );
            dest.wait_stdout("esvm-init: mtload exited", BOOT_TIMEOUT);
            let all = format!("{before}{}", dest.stdout());
            assert_eq!(
                mtload_lines(&all),
                native_mtload_at(4, MOVE_MTLOAD_SCALE),
                "{}",
                tail(&all)
            );
            assert!(all.contains("esvm-init: mtload exited with status 0"));
            shell_answers_and_powers_off(&mut dest, &mut stdin);
        }
        ApAt::Halted => {
            std::thread::sleep(Duration::from_millis(500));
            // Both CPUs work after the move: the halted AP wakes for the threads.
            stdin.write_all(b"/bin/mtload 4 1\n").unwrap();
            dest.wait_stdout("mtload digest=", BOOT_TIMEOUT);
            let after = dest.stdout();
            assert!(
                after.contains("mtload threads=4 cpus=2"),
                "{}",
                tail(&after)
            );
            assert_eq!(mtload_lines(&after), native_mtload_at(4, 1));
            shell_answers_and_powers_off(&mut dest, &mut stdin);
        }
    }
    let all = format!("{before}{}", dest.stdout());
    assert!(all.contains(brought_up), "{}", tail(&all));
    assert_eq!(smp_complaints(&all), Vec::<&str>::new());
    assert_eq!(kernel_complaints(&all), Vec::<&str>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The moved guest's shell answers, and `poweroff -f` ends it with status 0.
fn shell_answers_and_powers_off(dest: &mut Proc, stdin: &mut std::process::ChildStdin) {
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"echo moved-$((2+3))\n").unwrap();
    dest.wait_stdout("moved-5", Duration::from_secs(60));
    stdin.write_all(b"poweroff -f\n").unwrap();
    assert_eq!(dest.wait(Duration::from_secs(60)), 0, "{}", dest.stderr());
}

#[test]
fn a_2_vcpu_sev_es_linux_guest_migrates_with_its_ap_held_in_the_stub() {
    move_2_vcpu_sev_linux("sev-mig-ap-held", ApAt::Held, MoveBy::Migration);
}

#[test]
fn a_2_vcpu_sev_es_linux_guest_migrates_mid_multithreaded_workload() {
    move_2_vcpu_sev_linux("sev-mig-ap-running", ApAt::Running, MoveBy::Migration);
}

#[test]
fn a_2_vcpu_sev_es_linux_guest_migrates_with_its_ap_halted() {
    move_2_vcpu_sev_linux("sev-mig-ap-halted", ApAt::Halted, MoveBy::Migration);
}

#[test]
fn a_sealed_snapshot_of_a_2_vcpu_sev_es_linux_guest_with_its_ap_halted_restores() {
    move_2_vcpu_sev_linux("sev-snap-ap-halted", ApAt::Halted, MoveBy::SealedSnapshot);
}

// ------------------------------------------------------------ vCPUs in parallel (issue 13.4)

/// The default with several vCPUs runs each on a host thread: two such boots with 2 vCPUs
/// both compute the native digest (their instruction counts may differ: the vCPUs meet in
/// the host's order), with no TSC or SMP complaint; a 4-vCPU boot too.
#[test]
fn parallel_vcpus_compute_the_native_digest_run_after_run() {
    let expected = native_workload(1);
    for extra in [["--vcpus", "2"], ["--vcpus", "2"], ["--vcpus", "4"]] {
        let (out, _count) = boot_counting_instructions(&extra);
        let n = extra[1];
        assert!(
            out.contains(&format!("smp: Brought up 1 node, {n} CPUs")),
            "{}",
            tail(&out)
        );
        assert_eq!(workload_lines(&out), expected, "{}", tail(&out));
        assert_eq!(smp_complaints(&out), Vec::<&str>::new(), "{n} vCPUs");
        assert_eq!(kernel_complaints(&out), Vec::<&str>::new(), "{n} vCPUs");
    }
}

/// A 2-vCPU guest in parallel paused mid-workload stops (no console output while paused,
/// the instruction count stands still), resumes and finishes with the native digest.
#[test]
fn a_parallel_2_vcpu_guest_pauses_and_resumes_mid_workload() {
    let expected = native_workload(MOVE_SCALE);
    let dir = temp_dir("pause-smp");
    let sock = dir.join("api.sock");
    let mut src = linux_smp_source(&sock, 2);
    common::wait_socket(&mut src, &sock);
    src.wait_stdout("esvm-init: userland up", BOOT_TIMEOUT);
    common::ctl_ok(&sock, &["pause"]);
    let status = |sock: &Path| -> serde_json::Value {
        serde_json::from_str(&common::ctl_ok(sock, &["status", "--json"])).unwrap()
    };
    let first = status(&sock);
    let out_paused = src.stdout();
    std::thread::sleep(Duration::from_millis(500));
    let second = status(&sock);
    assert_eq!(first["instructions"], second["instructions"], "{second}");
    assert_eq!(src.stdout(), out_paused, "console output while paused");
    assert!(
        !out_paused.contains("workload digest="),
        "the pause was not mid-workload; raise MOVE_SCALE"
    );
    common::ctl_ok(&sock, &["resume"]);
    src.wait_stdout("workload digest=", BOOT_TIMEOUT);
    assert_eq!(workload_lines(&src.stdout()), expected);
    src.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `esvm bench smp` boots every mode it reports (one vCPU; two in parallel and with
/// --deterministic), each computing the native mtload digest, and measures them.
#[test]
fn bench_smp_measures_parallel_and_deterministic_vcpus_against_the_native_run() {
    let a = assets();
    let out = Command::new(ESVM)
        .args([
            "bench",
            "smp",
            "--json",
            "--kernel",
            a.kernel.to_str().unwrap(),
            "--initrd",
            a.initrd.to_str().unwrap(),
            "--mtload",
            mtload_binary().to_str().unwrap(),
            "--vcpus",
            "1,2",
            "--scale",
            "1",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let boots = r["boots"].as_array().unwrap();
    let modes: Vec<(u64, bool)> = boots
        .iter()
        .map(|b| {
            (
                b["vcpus"].as_u64().unwrap(),
                b["deterministic"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(modes, [(1, false), (2, false), (2, true)]);
    let native = native_mtload(2);
    for b in boots {
        assert!(
            native.contains(&b["digest"].as_str().unwrap().to_string()),
            "{b}"
        );
        assert!(
            b["workload_instructions"].as_u64().unwrap() > 1_000_000,
            "{b}"
        );
        assert!(
            b["boot_instructions"].as_u64().unwrap() > 100_000_000,
            "{b}"
        );
        assert!(b["workload_ips"].as_f64().unwrap() > 0.0, "{b}");
    }
    assert!(r["native_threads_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_sealed_snapshot_of_a_2_vcpu_sev_es_linux_guest_mid_multithreaded_workload_restores() {
    move_2_vcpu_sev_linux("sev-snap-ap-running", ApAt::Running, MoveBy::SealedSnapshot);
}

/// Linux takes CPU 1 offline and brings it back (`/sys/devices/system/cpu/cpu1/online`), on
/// 2 vCPUs: plain, the dead CPU halts with interrupts off and onlining starts it again by
/// INIT-SIPI-SIPI; SEV-ES, the kernel parks it with the GHCB's AP_HLT_LOOP (the host sees
/// `ap-reset-hold`, not `halted`) and onlining's SIPI releases it back into the kernel.
/// Both ways the CPU works afterwards: a multithreaded workload prints the native digest.
#[test]
fn linux_takes_a_cpu_offline_and_brings_it_back() {
    cpu_offline_and_online("cpu-hotplug", false);
}

#[test]
fn an_sev_es_linux_guest_takes_a_cpu_offline_and_brings_it_back() {
    cpu_offline_and_online("sev-cpu-hotplug", true);
}

fn cpu_offline_and_online(name: &str, sev: bool) {
    let a = assets();
    let dir = temp_dir(name);
    let sock = dir.join("api.sock");
    let plat = sev.then(|| platform(&format!("{name}-platform")));
    let cl = cmdline("esvm.run=shell");
    let mut args = kernel_run_args(a, &cl);
    args.extend(["--vcpus", "2", "--api-socket", sock.to_str().unwrap()]);
    if let Some(plat) = &plat {
        args.extend(["--sev-es", "--platform", plat.to_str().unwrap()]);
    }
    let (mut p, mut stdin) = Proc::spawn_with_stdin(&args);
    p.wait_stdout("esvm-init: userland up (run=shell)", BOOT_TIMEOUT);
    common::wait_vcpu_state(&sock, 1, "halted");
    std::thread::sleep(Duration::from_millis(500));
    // Markers are split in the commands so that only the output contains them.
    stdin
        .write_all(b"echo 0 > /sys/devices/system/cpu/cpu1/online; echo off''line=$(cat /sys/devices/system/cpu/online)';'\n")
        .unwrap();
    p.wait_stdout("offline=", Duration::from_secs(60));
    common::wait_vcpu_state(&sock, 1, if sev { "ap-reset-hold" } else { "halted" });
    // It stays parked: no interrupt wakes a dead CPU.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        common::vcpu_run_state(&sock, 1),
        if sev { "ap-reset-hold" } else { "halted" }
    );
    stdin
        .write_all(b"echo 1 > /sys/devices/system/cpu/cpu1/online; echo on''line=$(cat /sys/devices/system/cpu/online)';'\n")
        .unwrap();
    p.wait_stdout("online=", Duration::from_secs(120));
    stdin.write_all(b"/bin/mtload 4 1\n").unwrap();
    p.wait_stdout("mtload digest=", BOOT_TIMEOUT);
    stdin.write_all(b"poweroff -f\n").unwrap();
    let status = p.wait(Duration::from_secs(60));
    let out = p.stdout();
    assert_eq!(status, 0, "{}\n{}", p.stderr(), tail(&out));
    assert!(out.contains("CPU 1 is now offline"), "{}", tail(&out));
    assert!(out.contains("offline=0;"), "{}", tail(&out));
    assert!(out.contains("online=0-1;"), "{}", tail(&out));
    assert!(out.contains("mtload threads=4 cpus=2"), "{}", tail(&out));
    assert_eq!(mtload_lines(&out), native_mtload_at(4, 1), "{}", tail(&out));
    assert_eq!(smp_complaints(&out), Vec::<&str>::new());
    assert_eq!(kernel_complaints(&out), Vec::<&str>::new());
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(plat) = plat {
        let _ = std::fs::remove_dir_all(plat);
    }
}
