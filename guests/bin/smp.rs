//! smp: every CPU hammers shared counters with atomic read-modify-write instructions; the
//! boot CPU checks that not one update was lost.
//!
//! The BSP counts the CPUs (CPUID, see `esvm_rt::smp`), starts the APs by INIT-SIPI-SIPI
//! (real -> protected -> long mode onto the BSP's page tables, each on its own stack),
//! and then every CPU, the BSP included, waits at a LOCK'd counter barrier and runs
//! `iterations=N` rounds (default 10000) of:
//! - `LOCK INC` of a shared counter (+1),
//! - `LOCK XADD` of `k = (i % 7) + cpu + 1` to a shared sum,
//! - a `CMPXCHG` retry loop adding `(i ^ cpu) & 0xff` to another sum,
//! - an `XCHG` spinlock around plain (non-atomic) updates of two words,
//! - a `LOCK CMPXCHG16B` retry loop on a 16-byte pair (low word +1, high word + cpu + 1).
//!
//! The BSP waits until every CPU is done (another LOCK'd counter), compares each total with
//! its exact expected value and prints
//! ```text
//! smp: cpus=N iterations=I
//! smp: inc=... xadd=... cas=... locked=.../... pair=...:...
//! smp: contention cas-retries=R pair-retries=P spin-waits=S
//! smp: cpus=N ok            (or: smp: cpus=N FAILED, each wrong total on a line; exit 1)
//! checksum=<16 hex digits>  (of the totals only: the same for every interleaving)
//! ```
//! The contention line varies between parallel runs.
//!
//! `mode=plain-inc` (for tests only) replaces the `LOCK INC` by a plain load, add and
//! store: on 2+ CPUs running in parallel it loses updates and the guest reports FAILED —
//! the evidence that the check can fail. `mode=locked` is the default.
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use esvm_rt::checksum::Fnv1a;
use esvm_rt::{arg, arg_u64_or_exit, entry, println, smp, BootInfo, Dec, Hex16};

// SEV-ES capable: under --sev-es it runs on the boot vCPU (its APs start through the
// GHCB AP jump table, which esvm_rt::smp does not do yet).
entry!(main, sev_es);

/// One cache line per shared word, so the words do not share a line by accident.
#[repr(C, align(64))]
struct Line(AtomicU64);

#[repr(C, align(16))]
struct Pair([u64; 2]);

static INC: Line = Line(AtomicU64::new(0));
static XADD: Line = Line(AtomicU64::new(0));
static CAS: Line = Line(AtomicU64::new(0));
static SPIN: Line = Line(AtomicU64::new(0));
static LOCKED_A: Line = Line(AtomicU64::new(0));
static LOCKED_B: Line = Line(AtomicU64::new(0));
static PAIR: esvm_rt::Racy<Pair> = esvm_rt::Racy::new(Pair([0, 0]));
static CAS_RETRIES: Line = Line(AtomicU64::new(0));
static PAIR_RETRIES: Line = Line(AtomicU64::new(0));
static SPIN_WAITS: Line = Line(AtomicU64::new(0));
/// Barrier: CPUs that arrived at the start / finished.
static ARRIVED: Line = Line(AtomicU64::new(0));
static DONE: Line = Line(AtomicU64::new(0));
/// Settings the BSP publishes before starting the APs.
static ITERATIONS: AtomicU64 = AtomicU64::new(0);
static CPUS: AtomicU64 = AtomicU64::new(1);
static PLAIN_INC: AtomicU64 = AtomicU64::new(0);

fn p(l: &Line) -> *mut u64 {
    l.0.as_ptr()
}

fn lock_inc(l: &Line) {
    // SAFETY: an aligned static u64; LOCK INC is an atomic read-modify-write.
    unsafe { asm!("lock inc qword ptr [{p}]", p = in(reg) p(l), options(nostack)) }
}

/// The deliberately broken variant: load, add, store — not atomic across CPUs.
fn plain_inc(l: &Line) {
    // SAFETY: an aligned static u64; racy on purpose (mode=plain-inc), never UB for the
    // hardware: each access is an aligned 8-byte load or store.
    unsafe {
        asm!(
            "mov {t}, qword ptr [{p}]",
            "add {t}, 1",
            "mov qword ptr [{p}], {t}",
            p = in(reg) p(l), t = out(reg) _, options(nostack)
        )
    }
}

fn lock_xadd(l: &Line, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: an aligned static u64; LOCK XADD is atomic.
    unsafe {
        asm!("lock xadd qword ptr [{p}], {r}", p = in(reg) p(l), r = inout(reg) r,
             options(nostack))
    }
    r
}

/// Adds `v` with a CMPXCHG retry loop; returns the number of failed attempts.
fn cas_add(l: &Line, v: u64) -> u64 {
    let mut retries = 0;
    // SAFETY: plain aligned read of a static u64 (the first guess; CMPXCHG checks it).
    let mut old = unsafe { p(l).read_volatile() };
    loop {
        let new = old.wrapping_add(v);
        let seen: u64;
        let ok: u8;
        // SAFETY: an aligned static u64; LOCK CMPXCHG is atomic.
        unsafe {
            asm!("lock cmpxchg qword ptr [{p}], {n}", "sete {ok}",
                 p = in(reg) p(l), n = in(reg) new, ok = out(reg_byte) ok,
                 inout("rax") old => seen, options(nostack))
        }
        if ok != 0 {
            return retries;
        }
        retries += 1;
        old = seen;
    }
}

/// Acquires the XCHG spinlock; returns how many times it had to wait.
fn spin_lock(l: &Line) -> u64 {
    let mut waits = 0;
    loop {
        let mut v: u64 = 1;
        // SAFETY: an aligned static u64; XCHG with memory is implicitly locked.
        unsafe {
            asm!("xchg qword ptr [{p}], {v}", p = in(reg) p(l), v = inout(reg) v,
                 options(nostack))
        }
        if v == 0 {
            return waits;
        }
        // SAFETY: plain aligned read of the lock word.
        while unsafe { p(l).read_volatile() } != 0 {
            waits += 1;
            core::hint::spin_loop();
        }
    }
}

fn spin_unlock(l: &Line) {
    // SAFETY: a plain store releases the lock under x86-TSO (stores are not reordered
    // with earlier loads or stores); the compiler barrier is the asm itself.
    unsafe { asm!("mov qword ptr [{p}], 0", p = in(reg) p(l), options(nostack)) }
}

/// Adds (1, v) to the 128-bit pair with a LOCK CMPXCHG16B retry loop; returns retries.
fn pair_add(v: u64) -> u64 {
    let pair = PAIR.get() as *mut u64;
    let mut retries = 0;
    // SAFETY: plain reads of the 16-byte-aligned static (a guess that CMPXCHG16B checks).
    let (mut lo, mut hi) = unsafe { (pair.read_volatile(), pair.add(1).read_volatile()) };
    loop {
        let (new_lo, new_hi) = (lo.wrapping_add(1), hi.wrapping_add(v));
        let ok: u8;
        // SAFETY: PAIR is 16-byte aligned as CMPXCHG16B requires; RBX (reserved by LLVM)
        // is swapped in and restored around the instruction.
        unsafe {
            asm!(
                "xchg {nl}, rbx",
                "lock cmpxchg16b xmmword ptr [{p}]",
                "sete {ok}",
                "mov rbx, {nl}",
                p = in(reg) pair,
                nl = inout(reg) new_lo => _,
                ok = out(reg_byte) ok,
                inout("rax") lo, inout("rdx") hi,
                in("rcx") new_hi,
                options(nostack)
            )
        }
        if ok != 0 {
            return retries;
        }
        retries += 1;
    }
}

/// The work of one CPU (the BSP and every AP run it).
fn work(cpu: u32) {
    let n = CPUS.load(Ordering::SeqCst);
    let iterations = ITERATIONS.load(Ordering::SeqCst);
    let plain = PLAIN_INC.load(Ordering::SeqCst) != 0;
    let cpu = u64::from(cpu);
    // The start barrier: everybody begins together.
    lock_inc(&ARRIVED);
    // SAFETY: plain aligned read of a static u64 written by LOCK INC.
    while unsafe { p(&ARRIVED).read_volatile() } < n {
        core::hint::spin_loop();
    }
    let (mut cas_retries, mut pair_retries, mut waits) = (0, 0, 0);
    for i in 0..iterations {
        if plain {
            plain_inc(&INC);
        } else {
            lock_inc(&INC);
        }
        lock_xadd(&XADD, (i % 7) + cpu + 1);
        cas_retries += cas_add(&CAS, (i ^ cpu) & 0xff);
        waits += spin_lock(&SPIN);
        // SAFETY: the spinlock is held: no other CPU touches LOCKED_A/B now. Plain loads
        // and stores (volatile so that they stay separate instructions).
        unsafe {
            let a = p(&LOCKED_A).read_volatile();
            p(&LOCKED_A).write_volatile(a + 1);
            let b = p(&LOCKED_B).read_volatile();
            p(&LOCKED_B).write_volatile(b + (a & 3) + cpu);
        }
        spin_unlock(&SPIN);
        pair_retries += pair_add(cpu + 1);
    }
    lock_xadd(&CAS_RETRIES, cas_retries);
    lock_xadd(&PAIR_RETRIES, pair_retries);
    lock_xadd(&SPIN_WAITS, waits);
    lock_inc(&DONE);
}

fn ap_main(cpu: u32) {
    work(cpu);
}

fn main(bi: &'static BootInfo) -> u32 {
    let iterations = arg_u64_or_exit("iterations", 10_000);
    let plain = match arg("mode") {
        None | Some("locked") => false,
        Some("plain-inc") => true,
        Some(other) => {
            println!(
                "smp: unknown mode={} (use mode=locked or mode=plain-inc)",
                other
            );
            return 2;
        }
    };
    let cpus = smp::cpu_count();
    println!(
        "smp: cpus={} iterations={}",
        Dec(u64::from(cpus)),
        Dec(iterations)
    );
    if u64::from(cpus) != u64::from(bi.vcpus) {
        println!(
            "smp: note: the boot info counts {} vCPUs, CPUID advertises {}: the others stay parked",
            Dec(u64::from(bi.vcpus)),
            Dec(u64::from(cpus))
        );
    }
    if plain {
        println!("smp: mode=plain-inc: the first counter uses non-atomic increments");
    }
    ITERATIONS.store(iterations, Ordering::SeqCst);
    CPUS.store(u64::from(cpus), Ordering::SeqCst);
    PLAIN_INC.store(u64::from(plain), Ordering::SeqCst);
    if let Err(e) = smp::start_aps(cpus, ap_main) {
        println!(
            "smp: cpus={} FAILED: starting the APs: {} ({} checked in)",
            Dec(u64::from(cpus)),
            e,
            Dec(u64::from(smp::checked_in()))
        );
        return 1;
    }
    work(0);
    let n = u64::from(cpus);
    // SAFETY: plain aligned read of a static u64 written by LOCK INC.
    while unsafe { p(&DONE).read_volatile() } < n {
        core::hint::spin_loop();
    }

    // The exact expected totals.
    let mut want_xadd = 0u64;
    let mut want_cas = 0u64;
    let mut want_b = 0u64;
    for cpu in 0..n {
        for i in 0..iterations {
            want_xadd = want_xadd.wrapping_add((i % 7) + cpu + 1);
            want_cas = want_cas.wrapping_add((i ^ cpu) & 0xff);
        }
        want_b = want_b.wrapping_add(cpu * iterations);
    }
    let total = n * iterations;
    // LOCKED_B also adds (a & 3) for a = 0..total in whatever order the CPUs took the lock.
    for a in 0..total {
        want_b = want_b.wrapping_add(a & 3);
    }
    let want_pair_hi: u64 = (1..=n).map(|c| c * iterations).sum();
    let pair = PAIR.get() as *const u64;
    // SAFETY: every CPU is done: nothing writes the pair any more.
    let (pair_lo, pair_hi) = unsafe { (pair.read_volatile(), pair.add(1).read_volatile()) };
    let got = [
        ("inc", INC.0.load(Ordering::SeqCst), total),
        ("xadd", XADD.0.load(Ordering::SeqCst), want_xadd),
        ("cas", CAS.0.load(Ordering::SeqCst), want_cas),
        ("locked-a", LOCKED_A.0.load(Ordering::SeqCst), total),
        ("locked-b", LOCKED_B.0.load(Ordering::SeqCst), want_b),
        ("pair-lo", pair_lo, total),
        ("pair-hi", pair_hi, want_pair_hi),
    ];
    println!(
        "smp: inc={} xadd={} cas={} locked={}/{} pair={}:{}",
        Dec(got[0].1),
        Dec(got[1].1),
        Dec(got[2].1),
        Dec(got[3].1),
        Dec(got[4].1),
        Dec(got[5].1),
        Dec(got[6].1)
    );
    println!(
        "smp: contention cas-retries={} pair-retries={} spin-waits={}",
        Dec(CAS_RETRIES.0.load(Ordering::SeqCst)),
        Dec(PAIR_RETRIES.0.load(Ordering::SeqCst)),
        Dec(SPIN_WAITS.0.load(Ordering::SeqCst))
    );
    let mut h = Fnv1a::new();
    h.u64(n);
    h.u64(iterations);
    let mut failed = false;
    for (name, value, want) in got {
        h.u64(value);
        if value != want {
            failed = true;
            let lost = want.wrapping_sub(value) as i64;
            println!(
                "smp: {}={} expected {} (lost {})",
                name,
                Dec(value),
                Dec(want),
                esvm_rt::SDec(lost)
            );
        }
    }
    if failed {
        println!("smp: cpus={} FAILED", Dec(n));
    } else {
        println!("smp: cpus={} ok", Dec(n));
    }
    println!("checksum={}", Hex16(h.finish()));
    u32::from(failed)
}
