//! Builds every guest in `guests/` (at the repository root) as a bare-metal ELF64
//! executable by invoking `$RUSTC` directly (a nested `cargo` would deadlock on the build
//! directory lock): first the guest ABI `crates/abi` (`esvm-abi`, the same source the host
//! crates use) and the runtime `guests/rt` as rlibs, then each `guests/bin/*.rs` against
//! them, linked with `guests/link.ld` at 0x200000. The ELFs land in `$OUT_DIR/guests/` and
//! `src/lib.rs` embeds them with `include_bytes!`. Cargo reruns this script when anything
//! under `guests/` or `crates/abi/src` changes.
//!
//! Guests use the host target (x86_64-unknown-linux-gnu, whose `core` is installed) with
//! `#![no_std]`, `panic=abort`, no red zone (interrupt handlers run on the interrupted
//! stack) and no startup files or libc.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (binary name, one-line description). Each is `guests/bin/<name>.rs`.
const GUESTS: &[(&str, &str)] = &[
    (
        "demo",
        "built-in demo: banner, deterministic integer workload (iterations=N, dirty-mib=M), tick lines, checksum=<hex>; single-threaded (smp is the SMP demo)",
    ),
    (
        "smp",
        "SMP stress: starts every AP by INIT-SIPI-SIPI, all CPUs run LOCK INC/XADD, CMPXCHG and CMPXCHG16B loops and an XCHG spinlock (iterations=N; mode=plain-inc loses updates on purpose), checks exact totals, checksum=<hex>",
    ),
    (
        "hello",
        "minimal guest: prints its boot info and arguments, exits with status exit=N (default 0)",
    ),
    (
        "pagefault",
        "#PF: not-present read/write, read-only page with CR0.WP, ring-3 access to a supervisor page, NX fetch; CR2 and error codes",
    ),
    (
        "exceptions",
        "#DE, #UD, #BP, #GP (non-canonical), #DF on IST (bad gate / bad stack), INT 0x80 through a DPL-3 gate; frame contents",
    ),
    (
        "usermode",
        "ring 0 -> 3 via IRETQ, back via INT 0x80 and SYSCALL/SYSRET (STAR/LSTAR/SFMASK), TSS.RSP0 stack switch, SWAPGS",
    ),
    (
        "triplefault",
        "loads an empty IDT and executes UD2: the VMM must report a shutdown (triple fault)",
    ),
    (
        "timer",
        "PIT channel 0 + remapped 8259 PIC: waits in HLT for ticks=N timer interrupts, with EOIs",
    ),
    (
        "sse",
        "SSE2 moves and integer/double arithmetic, MXCSR rounding and flags, FXSAVE/FXRSTOR round trip",
    ),
    (
        "cpubench",
        "benchmark loop=alu|mem|branch for n=N iterations (ring=0|3) between markers on port 0xF5",
    ),
    (
        "iobench",
        "port-I/O round trips: n=N writes to the null port 0x80 between markers on 0xF5; plain OUT exits, or GHCB IOIO VMGEXITs when run with --sev-es",
    ),
    (
        "sevdemo",
        "SEV-ES demo: the demo workload (iterations=N, dirty-mib=M, same checksum) with all I/O through the GHCB",
    ),
    (
        "sev-smoke",
        "SEV-ES smoke test: SEV_STATUS, CPUID 0x8000001f via #VC and MSR protocol, private/shared pages; ends with a termination request (reason-set=S reason-code=C term=msr|ghcb)",
    ),
    (
        "sev-idt",
        "SEV-ES guest that loads an empty IDT and executes UD2: the VMM must report a shutdown",
    ),
    (
        "sev-fpu",
        "SEV-ES guest comparing the x87/SSE state of its first instruction with esvm_abi::testing::fpu_pattern",
    ),
    (
        "sev-cr",
        "SEV-ES guest writing CR0/CR4/CR8/EFER in 11 steps, a checkpoint on port 0xF6 after each",
    ),
    (
        "sev-pf",
        "SEV-ES guest that halts after a ready checkpoint on port 0xF6 and checks the frame of an injected #PF (ec=N)",
    ),
    (
        "sev-novc",
        "SEV-ES guest without a #VC handler: empty IDT, then CPUID (insn=cpuid|out) -> shutdown",
    ),
    (
        "sev-mmio",
        "SEV-ES MMIO through #VC/GHCB: every decoded MOV/MOVZX form against a RAM-like device at addr=GPA",
    ),
    (
        "sev-apic",
        "Local APIC through MSRs (plain, or SEV-ES via #VC/GHCB): x2APIC registers, #GP for refused accesses, TSC-deadline timer on time (delta=N slack=N timers=N)",
    ),
];

fn common_flags() -> Vec<String> {
    [
        "--edition=2021",
        "--target=x86_64-unknown-linux-gnu",
        "-Cpanic=abort",
        "-Crelocation-model=static",
        "-Copt-level=2",
        "-Ctarget-cpu=x86-64",
        "-Ccodegen-units=1",
        "-Cno-redzone=yes",
        "-Cno-vectorize-loops",
        "-Cno-vectorize-slp",
        "-Cforce-frame-pointers=yes",
        "-Cdebuginfo=0",
        "-Cstrip=debuginfo",
        "-Cdebug-assertions=off",
        "-Coverflow-checks=off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(mut cmd: Command, what: &str) {
    // The nested compiler must not see flags meant for the host crates.
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS");
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run the Rust compiler to build {what}: {e} ({cmd:?})"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "building {what} failed ({}):\n{stderr}\ncommand: {cmd:?}",
            out.status
        );
    }
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning={what}: {line}");
    }
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../../guests");
    let root = root.canonicalize().unwrap_or(root);
    let abi = manifest.join("../abi");
    let abi = abi.canonicalize().unwrap_or(abi);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("guests");
    std::fs::create_dir_all(&out).expect("create $OUT_DIR/guests");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-changed={}", abi.join("src").display());
    println!("cargo:rerun-if-changed=build.rs");

    // 1. The guest ABI (the same source the host crates use), then the runtime.
    let abi_rlib = out.join("libesvm_abi.rlib");
    let mut cmd = Command::new(&rustc);
    cmd.args(common_flags())
        .args(["--crate-type=rlib", "--crate-name=esvm_abi"])
        .arg("--out-dir")
        .arg(&out)
        .arg(abi.join("src/lib.rs"));
    run(cmd, "guest ABI crates/abi");

    let mut cmd = Command::new(&rustc);
    cmd.args(common_flags())
        .args(["--crate-type=rlib", "--crate-name=esvm_rt"])
        .arg("--extern")
        .arg(format!("esvm_abi={}", abi_rlib.display()))
        .arg("--out-dir")
        .arg(&out)
        .arg(root.join("rt/src/lib.rs"));
    run(cmd, "guest runtime guests/rt");

    // 2. The guests, two compilers at a time.
    let rlib = out.join("libesvm_rt.rlib");
    let script = root.join("link.ld");
    let build_one = |name: &str| {
        let mut cmd = Command::new(&rustc);
        cmd.args(common_flags())
            .arg("--crate-type=bin")
            .arg(format!("--crate-name={}", name.replace('-', "_")))
            .arg("--extern")
            .arg(format!("esvm_rt={}", rlib.display()))
            .arg("--extern")
            .arg(format!("esvm_abi={}", abi_rlib.display()))
            .arg("-L")
            .arg(format!("dependency={}", out.display()))
            .args([
                "-Crelro-level=off",
                "-Clink-arg=-nostartfiles",
                "-Clink-arg=-nostdlib",
                "-Clink-arg=-static",
                "-Clink-arg=-Wl,--build-id=none",
                "-Clink-arg=-Wl,-z,max-page-size=4096",
            ])
            .arg(format!("-Clink-arg=-Wl,-T,{}", script.display()))
            .arg("-o")
            .arg(out.join(name))
            .arg(root.join(format!("bin/{name}.rs")));
        run(cmd, &format!("guest {name}"));
    };
    std::thread::scope(|s| {
        let (a, b): (Vec<_>, Vec<_>) = GUESTS.iter().enumerate().partition(|(i, _)| i % 2 == 0);
        let build_one = &build_one;
        s.spawn(move || a.iter().for_each(|(_, (n, _))| build_one(n)));
        s.spawn(move || b.iter().for_each(|(_, (n, _))| build_one(n)));
    });

    // 3. The table the library embeds.
    let mut src = String::new();
    writeln!(src, "/// Every built-in guest, in a fixed order.").unwrap();
    writeln!(src, "pub static GUESTS: [Guest; {}] = [", GUESTS.len()).unwrap();
    for (name, desc) in GUESTS {
        let path = out.join(name);
        writeln!(
            src,
            "    Guest {{ name: {name:?}, description: {desc:?}, elf: include_bytes!({:?}) }},",
            path_str(&path)
        )
        .unwrap();
    }
    writeln!(src, "];").unwrap();
    std::fs::write(out.join("guests.rs"), src).expect("write guests.rs");
}

fn path_str(p: &Path) -> String {
    p.to_str()
        .expect("OUT_DIR must be valid UTF-8 to embed the guest images")
        .to_string()
}
