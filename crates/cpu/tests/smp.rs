//! Several software vCPUs on one guest memory, each on its own host thread (issue 13):
//! LOCK-prefixed read-modify-writes, XCHG and the compare-exchange instructions are atomic
//! across vCPUs (the shared counters come out exact), code one vCPU patches reaches the
//! vCPU that runs it, and the dirty log holds every vCPU's writes.
//!
//! The vCPUs are [`Harness`] machines (64-bit, CPL 0, identity-mapped) over clones of one
//! [`PhysMemory`]; they start together through a spin barrier in guest memory so that they
//! really run side by side.

use esvm_cpu::mem::{PhysMemory, PAGE_SIZE};
use esvm_cpu::testutil::{Harness, CODE, DATA, STACK_TOP};
use esvm_cpu::{CpuConfig, Exit};
use iced_x86::code_asm::*;
use std::time::{Duration, Instant};

/// Guest memory of every test here (the harness identity-maps all of it).
const MEM: u64 = 32 << 20;
/// How long a vCPU may run before the test gives up on it (a hang is a failure, not a stall).
const DEADLINE: Duration = Duration::from_secs(120);

// Shared words, one 64-byte line each, in the harness's data page.
const BARRIER: u64 = DATA;
const C_INC: u64 = DATA + 0x40;
const C_ADD: u64 = DATA + 0x80;
const C_XADD: u64 = DATA + 0xc0;
const LOCK: u64 = DATA + 0x100;
const C_PLAIN: u64 = DATA + 0x140;
const C_LCG: u64 = DATA + 0x180;
const PAIR: u64 = DATA + 0x1c0; // 16 bytes, 16-aligned: LOCK CMPXCHG16B
const QUAD: u64 = DATA + 0x200; // 8 bytes: LOCK CMPXCHG8B
const C_D32: u64 = DATA + 0x240;
const C_W16: u64 = DATA + 0x280;
const C_B8: u64 = DATA + 0x2c0;

/// The compare-exchange loop's update: applied T times in any order it gives the same
/// value, and T - 1 times another one, so a lost update shows.
const LCG_MUL: u32 = 0x5851_f42d;
const LCG_ADD: i32 = 12345;

fn lcg(x: u64) -> u64 {
    x.wrapping_mul(LCG_MUL as u64).wrapping_add(LCG_ADD as u64)
}

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// `n` vCPUs over one fresh memory holding `code` at `CODE`; vCPU `i` starts there with
/// RDI = i, RSI = `arg`, RDX = n and its own stack.
fn machines(n: usize, code: &[u8], arg: u64) -> Vec<Harness> {
    machines_with(n, code, arg, CpuConfig::default())
}

/// [`machines`] whose vCPUs are configured as `config` (with their own `vcpu_id`).
fn machines_with(n: usize, code: &[u8], arg: u64, config: CpuConfig) -> Vec<Harness> {
    let mem = PhysMemory::new_owned(MEM).unwrap();
    // The vCPUs run on threads of their own: first decodes fence (PhysMemory::mark_code).
    mem.set_parallel(true);
    let mut hs: Vec<Harness> = (0..n)
        .map(|i| {
            let config = CpuConfig {
                vcpu_id: i as u32,
                ..config.clone()
            };
            Harness::with_memory(mem.clone(), config)
        })
        .collect();
    mem.write(CODE, code).unwrap();
    for (i, h) in hs.iter_mut().enumerate() {
        h.restart(CODE);
        let mut r = h.cpu.regs();
        r.gpr[7] = i as u64; // rdi
        r.gpr[6] = arg; // rsi
        r.gpr[2] = n as u64; // rdx
        r.gpr[4] = STACK_TOP - 0x2000 * i as u64; // rsp
        h.cpu.set_regs(&r);
    }
    hs
}

/// Runs one vCPU to its HLT (or fails past DEADLINE / on any other exit).
fn run_to_hlt(h: &mut Harness) {
    let start = Instant::now();
    loop {
        match h.cpu.run(1 << 20) {
            Exit::BudgetExhausted => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "vCPU still running after {DEADLINE:?} at rip {:#x}",
                    h.cpu.regs().rip
                );
            }
            Exit::Hlt => {
                assert!(h.exception().is_none(), "{:x?}", h.exception());
                return;
            }
            x => panic!("unexpected exit {x:?} at rip {:#x}", h.cpu.regs().rip),
        }
    }
}

/// Runs every vCPU on its own thread to its HLT; returns them (for their registers).
fn run_parallel(hs: Vec<Harness>) -> Vec<Harness> {
    let threads: Vec<_> = hs
        .into_iter()
        .map(|mut h| {
            std::thread::spawn(move || {
                run_to_hlt(&mut h);
                h
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Guest code: LOCK INC, then spin until `[BARRIER]` reaches RDX (all vCPUs arrived).
fn barrier(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut spin = a.create_label();
    a.lock().inc(qword_ptr(BARRIER))?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.cmp(qword_ptr(BARRIER), rdx)?;
    a.jne(spin)
}

/// The stress loop: RSI iterations of every atomic kind on the shared counters. R14 sums
/// the values LOCK XADD returned (the tickets), R13 counts failed compare-exchanges.
fn stress_code() -> Vec<u8> {
    assemble(|a| {
        let mut top = a.create_label();
        let mut acquire = a.create_label();
        let mut locked = a.create_label();
        let mut cas = a.create_label();
        let mut cas_ok = a.create_label();
        let mut cas16 = a.create_label();
        let mut cas16_ok = a.create_label();
        let mut cas8 = a.create_label();
        let mut cas8_ok = a.create_label();
        barrier(a)?;
        a.mov(r11, rsi)?; // iterations left
        a.lea(r12, qword_ptr(rdi + 1))?; // this vCPU's weight
        a.xor(r13d, r13d)?;
        a.xor(r14d, r14d)?;
        a.set_label(&mut top)?;
        // LOCK INC / LOCK ADD / LOCK XADD.
        a.lock().inc(qword_ptr(C_INC))?;
        a.lock().add(qword_ptr(C_ADD), r12)?;
        a.mov(eax, 1)?;
        a.lock().xadd(qword_ptr(C_XADD), rax)?;
        a.add(r14, rax)?;
        // An XCHG spinlock around a plain (non-atomic) increment.
        a.set_label(&mut acquire)?;
        a.mov(eax, 1)?;
        a.xchg(dword_ptr(LOCK), eax)?;
        a.test(eax, eax)?;
        a.jz(locked)?;
        a.pause()?;
        a.jmp(acquire)?;
        a.set_label(&mut locked)?;
        a.mov(rax, qword_ptr(C_PLAIN))?;
        a.add(rax, 1)?;
        a.mov(qword_ptr(C_PLAIN), rax)?;
        a.mov(dword_ptr(LOCK), 0)?;
        // LOCK CMPXCHG retry loop: x = x * LCG_MUL + LCG_ADD.
        a.mov(rax, qword_ptr(C_LCG))?;
        a.set_label(&mut cas)?;
        a.imul_3(rbx, rax, LCG_MUL as i32)?;
        a.add(rbx, LCG_ADD)?;
        a.lock().cmpxchg(qword_ptr(C_LCG), rbx)?;
        a.jz(cas_ok)?;
        a.inc(r13)?;
        a.jmp(cas)?;
        a.set_label(&mut cas_ok)?;
        // LOCK CMPXCHG16B retry loop: (lo + 1, hi + weight).
        a.mov(rax, qword_ptr(PAIR))?;
        a.mov(rdx, qword_ptr(PAIR + 8))?;
        a.set_label(&mut cas16)?;
        a.lea(rbx, qword_ptr(rax + 1))?;
        a.lea(rcx, qword_ptr(rdx + r12))?;
        a.lock().cmpxchg16b(xmmword_ptr(PAIR))?;
        a.jz(cas16_ok)?;
        a.inc(r13)?;
        a.jmp(cas16)?;
        a.set_label(&mut cas16_ok)?;
        // LOCK CMPXCHG8B retry loop: (lo32 + 1, hi32 + 2).
        a.mov(eax, dword_ptr(QUAD))?;
        a.mov(edx, dword_ptr(QUAD + 4))?;
        a.set_label(&mut cas8)?;
        a.lea(ebx, dword_ptr(rax + 1))?;
        a.lea(ecx, dword_ptr(rdx + 2))?;
        a.lock().cmpxchg8b(qword_ptr(QUAD))?;
        a.jz(cas8_ok)?;
        a.inc(r13)?;
        a.jmp(cas8)?;
        a.set_label(&mut cas8_ok)?;
        // Narrow operands: 32, 16 and 8 bits.
        a.lock().inc(dword_ptr(C_D32))?;
        a.lock().add(word_ptr(C_W16), 3)?;
        a.lock().sub(byte_ptr(C_B8), 1)?;
        a.dec(r11)?;
        a.jnz(top)?;
        a.hlt()
    })
}

#[test]
fn lock_prefixed_operations_lose_no_update_across_vcpus() {
    const VCPUS: u64 = 4;
    const ITERS: u64 = 200_000;
    let hs = run_parallel(machines(VCPUS as usize, &stress_code(), ITERS));
    let m = hs[0].mem();
    let total = VCPUS * ITERS;
    let weights: u64 = (1..=VCPUS).sum::<u64>() * ITERS;
    let rd = |gpa| m.read_u64(gpa).unwrap();
    assert_eq!(rd(C_INC), total, "LOCK INC");
    assert_eq!(rd(C_ADD), weights, "LOCK ADD");
    assert_eq!(rd(C_XADD), total, "LOCK XADD");
    // Every ticket LOCK XADD handed out was different: they are 0..total.
    let tickets: u64 = hs.iter().map(|h| h.cpu.regs().gpr[14]).sum();
    assert_eq!(tickets, total * (total - 1) / 2, "LOCK XADD tickets");
    assert_eq!(rd(C_PLAIN), total, "increments under an XCHG spinlock");
    assert_eq!(rd(C_LCG), (0..total).fold(0, |x, _| lcg(x)), "LOCK CMPXCHG");
    assert_eq!(
        (rd(PAIR), rd(PAIR + 8)),
        (total, weights),
        "LOCK CMPXCHG16B"
    );
    assert_eq!(
        rd(QUAD),
        (total as u32 as u64) | ((2 * total) as u32 as u64) << 32,
        "LOCK CMPXCHG8B"
    );
    assert_eq!(rd(C_D32) as u32 as u64, total, "LOCK INC dword");
    assert_eq!(
        rd(C_W16) as u16,
        (3 * total) as u16,
        "LOCK ADD word (wraps at 16 bits)"
    );
    assert_eq!(
        rd(C_B8) as u8,
        0u8.wrapping_sub(total as u8),
        "LOCK SUB byte (wraps at 8 bits)"
    );
    let retries: u64 = hs.iter().map(|h| h.cpu.regs().gpr[13]).sum();
    eprintln!("{VCPUS} vCPUs x {ITERS} iterations: {retries} compare-exchange retries");
}

// ------------------------------------------------------------------ cross-modifying code

/// The patched function: `mov eax, imm32; ret` on a page of its own.
const TARGET: u64 = 0x30_0000;
const OLD: u32 = 0x0bad_c0de;
const NEW: u32 = 0x600d_c0de;
const FLAG: u64 = DATA + 0x400;
const A_COUNT: u64 = DATA + 0x440;
/// R10 at vCPU 0's HLT.
const SAW_NEW: u64 = 1;
const STALE_AFTER_FLAG: u64 = 2;

/// vCPU 0 calls TARGET in a loop until it returns NEW, reading FLAG before each call;
/// vCPU 1 waits until vCPU 0 has called it 1000 times, patches the immediate, then sets
/// FLAG. x86 orders the patch before the flag, so a call made after FLAG was seen set must
/// run the new code.
fn xmc_code() -> Vec<u8> {
    assemble(|a| {
        let mut top = a.create_label();
        let mut saw = a.create_label();
        let mut stale = a.create_label();
        let mut wait = a.create_label();
        a.test(edi, edi)?;
        a.jnz(wait)?;
        // vCPU 0: the runner.
        a.mov(rbx, TARGET)?;
        a.set_label(&mut top)?;
        a.mov(r9, qword_ptr(FLAG))?;
        a.call(rbx)?;
        a.inc(qword_ptr(A_COUNT))?;
        a.cmp(eax, NEW)?;
        a.je(saw)?;
        a.test(r9, r9)?;
        a.jnz(stale)?;
        a.jmp(top)?;
        a.set_label(&mut saw)?;
        a.mov(r10d, SAW_NEW as u32)?;
        a.hlt()?;
        a.set_label(&mut stale)?;
        a.mov(r10d, STALE_AFTER_FLAG as u32)?;
        a.hlt()?;
        // vCPU 1: the patcher.
        a.set_label(&mut wait)?;
        a.pause()?;
        a.cmp(qword_ptr(A_COUNT), 1000)?;
        a.jb(wait)?;
        a.mov(dword_ptr(TARGET + 1), NEW)?;
        a.mov(qword_ptr(FLAG), 1)?;
        a.hlt()
    })
}

#[test]
fn code_patched_by_one_vcpu_reaches_the_vcpu_running_it() {
    let hs = machines(2, &xmc_code(), 0);
    let mut target = vec![0xb8];
    target.extend_from_slice(&OLD.to_le_bytes());
    target.push(0xc3);
    hs[0].mem().write(TARGET, &target).unwrap();
    let hs = run_parallel(hs);
    let runs = hs[0].mem().read_u64(A_COUNT).unwrap();
    assert_eq!(
        hs[0].cpu.regs().gpr[10],
        SAW_NEW,
        "the runner ran the old code after it saw the patcher's flag ({runs} calls)"
    );
    assert!(runs > 1000, "{runs} calls: the patch came too early");
    eprintln!("the runner saw the new code after {runs} calls");
}

// ------------------------------------------------------------------ dirty log

/// Pages each vCPU writes, interleaved with the other vCPUs' (vCPU i writes pages
/// REGION/4K + i, + i + n, + i + 2n ...), so that every dirty-bitmap word is set from
/// several threads at once.
const DIRTY_EACH: u64 = 512;
const REGION: u64 = 0x40_0000;

/// Every vCPU writes its pages with a mix of store kinds (plain MOV, LOCK ADD, XCHG, an SSE
/// store, REP STOSB, LOCK CMPXCHG16B, PUSH) chosen by page number.
fn dirty_code() -> Vec<u8> {
    assemble(|a| {
        let mut top = a.create_label();
        let mut kinds: Vec<CodeLabel> = (0..7).map(|_| a.create_label()).collect();
        let mut next = a.create_label();
        barrier(a)?;
        a.mov(r15, rdx)?; // vCPUs
        a.mov(r8, rdi)?; // page index k * n + i
        a.mov(r11, rsi)?; // pages left
        a.set_label(&mut top)?;
        a.mov(r9, r8)?;
        a.shl(r9, 12)?;
        a.add(r9, REGION as i32)?; // the page's address
        a.mov(rax, r8)?;
        a.xor(edx, edx)?;
        a.mov(ecx, 7)?;
        a.div(rcx)?; // rdx = kind
        for (k, l) in kinds.iter().enumerate() {
            a.cmp(rdx, k as i32)?;
            a.je(*l)?;
        }
        a.set_label(&mut kinds[0])?;
        a.mov(qword_ptr(r9 + 8), r8)?;
        a.jmp(next)?;
        a.set_label(&mut kinds[1])?;
        a.lock().add(qword_ptr(r9 + 16), r8)?;
        a.jmp(next)?;
        a.set_label(&mut kinds[2])?;
        a.mov(rax, r8)?;
        a.xchg(qword_ptr(r9 + 24), rax)?;
        a.jmp(next)?;
        a.set_label(&mut kinds[3])?;
        a.movq(xmm0, r8)?;
        a.movdqu(xmmword_ptr(r9 + 32), xmm0)?;
        a.jmp(next)?;
        a.set_label(&mut kinds[4])?;
        a.mov(rdi, r9)?;
        a.mov(ecx, 100)?;
        a.mov(eax, 0x5a)?;
        a.rep().stosb()?;
        a.jmp(next)?;
        a.set_label(&mut kinds[5])?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.mov(rbx, r8)?;
        a.mov(rcx, r8)?;
        a.lock().cmpxchg16b(xmmword_ptr(r9 + 48))?;
        a.jmp(next)?;
        a.set_label(&mut kinds[6])?;
        a.mov(r10, rsp)?;
        a.lea(rsp, qword_ptr(r9 + 0x800))?;
        a.push(r8)?;
        a.mov(rsp, r10)?;
        a.set_label(&mut next)?;
        a.add(r8, r15)?;
        a.dec(r11)?;
        a.jnz(top)?;
        a.hlt()
    })
}

#[test]
fn the_dirty_log_holds_every_vcpus_writes_while_it_is_taken() {
    const VCPUS: u64 = 4;
    let hs = machines(VCPUS as usize, &dirty_code(), DIRTY_EACH);
    let mem = hs[0].mem().clone();
    mem.take_dirty();
    let first = REGION / PAGE_SIZE;
    let pages = VCPUS * DIRTY_EACH;
    // A migration thread takes (and clears) the log while the vCPUs write.
    let collector = {
        let mem = mem.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut union = vec![0u64; (MEM / PAGE_SIZE / 64) as usize];
            let mut takes = 0u64;
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                for (u, w) in union.iter_mut().zip(mem.take_dirty()) {
                    *u |= w;
                }
                takes += 1;
            }
            (union, takes)
        });
        (t, stop)
    };
    let hs = run_parallel(hs);
    collector
        .1
        .store(true, std::sync::atomic::Ordering::Release);
    let (mut union, takes) = collector.0.join().unwrap();
    for (u, w) in union.iter_mut().zip(mem.take_dirty()) {
        *u |= w;
    }
    let dirty = |p: u64| union[(p / 64) as usize] & (1 << (p % 64)) != 0;
    let missing: Vec<u64> = (first..first + pages).filter(|&p| !dirty(p)).collect();
    assert!(
        missing.is_empty(),
        "written pages not in the dirty log: {missing:x?}"
    );
    // The pages after the region were not written: the log is not simply full.
    assert!((first + pages..first + pages + 64).all(|p| !dirty(p)));
    // And what the vCPUs wrote is there (one probe per store kind).
    let m = hs[0].mem();
    assert_eq!(m.read_u64(REGION + 8).unwrap(), 0, "page 0: MOV of index 0");
    assert_eq!(
        m.read_u64(REGION + 7 * PAGE_SIZE + 8).unwrap(),
        7,
        "page 7: MOV"
    );
    assert_eq!(
        m.read_u64(REGION + PAGE_SIZE + 16).unwrap(),
        1,
        "page 1: LOCK ADD"
    );
    assert_eq!(
        m.read_u64(REGION + 6 * PAGE_SIZE + 0x7f8).unwrap(),
        6,
        "page 6: PUSH"
    );
    eprintln!("{takes} concurrent takes of the dirty log");
}

// ------------------------------------------------------------------ throughput (report only)

/// LOCK INC throughput of 1 and 2 vCPUs on one shared counter and on private counters.
/// Prints figures only (timings on a shared machine are noise for asserts).
#[test]
#[ignore = "benchmark: prints LOCK-op throughput; run with --ignored --nocapture"]
fn lock_inc_throughput_with_one_and_two_vcpus() {
    const ITERS: u64 = 2_000_000;
    for shared in [true, false] {
        let code = assemble(|a| {
            let mut top = a.create_label();
            barrier(a)?;
            a.mov(rbx, C_INC)?;
            if !shared {
                // One cache line (and page) per vCPU.
                a.mov(rax, rdi)?;
                a.shl(rax, 12)?;
                a.add(rbx, rax)?;
                a.add(rbx, 0x1000)?;
            }
            a.set_label(&mut top)?;
            a.lock().inc(qword_ptr(rbx))?;
            a.dec(rsi)?;
            a.jnz(top)?;
            a.hlt()
        });
        for n in [1usize, 2] {
            let hs = machines(n, &code, ITERS);
            let t = Instant::now();
            run_parallel(hs);
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "{} counter, {n} vCPU(s): {:.1} M LOCK INC/s in all ({:.3} s)",
                if shared { "shared" } else { "private" },
                (n as u64 * ITERS) as f64 / s / 1e6,
                s
            );
        }
    }
}

// ------------------------------------------------------------------ split locks and the TSC

/// A dword counter that straddles a page boundary (its halves are on two pages).
const SPLIT: u64 = 0x20_0ffe;

/// RSI times LOCK ADD dword [SPLIT], 1 and LOCK XADD on it; HLT.
fn split_lock_code() -> Vec<u8> {
    assemble(|a| {
        let mut top = a.create_label();
        barrier(a)?;
        a.mov(r11, rsi)?;
        a.set_label(&mut top)?;
        a.lock().add(dword_ptr(SPLIT), 1)?;
        a.mov(eax, 1)?;
        a.lock().xadd(dword_ptr(SPLIT), eax)?;
        a.dec(r11)?;
        a.jnz(top)?;
        a.hlt()
    })
}

/// Page-crossing LOCKed operands are one host read and write each, under the emulator's
/// bus lock: two vCPUs hammering one such counter lose no update.
#[test]
fn page_crossing_lock_operations_lose_no_update_across_vcpus() {
    const ITERS: u64 = 200_000;
    let hs = run_parallel(machines(2, &split_lock_code(), ITERS));
    let m = hs[0].mem();
    let mut b = [0u8; 4];
    m.read(SPLIT, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b) as u64, 2 * 2 * ITERS);
}

/// The last TSC value read, and whose turn it is (vCPU 0 or 1).
const LAST_TSC: u64 = DATA + 0x500;
const TURN: u64 = DATA + 0x540;

/// Linux's TSC warp check, in strict turns between two vCPUs: RSI times, wait for this
/// vCPU's turn (RDI), read the TSC, count in R13 a value below the last one read (by the
/// other vCPU), store it, hand the turn over. HLT.
fn tsc_warp_code() -> Vec<u8> {
    assemble(|a| {
        let mut top = a.create_label();
        let mut ok = a.create_label();
        barrier(a)?;
        a.mov(r11, rsi)?;
        a.xor(r13, r13)?;
        a.set_label(&mut top)?;
        a.pause()?;
        a.cmp(qword_ptr(TURN), rdi)?;
        a.jne(top)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.cmp(rax, qword_ptr(LAST_TSC))?;
        a.jae(ok)?;
        a.inc(r13)?;
        a.set_label(&mut ok)?;
        a.mov(qword_ptr(LAST_TSC), rax)?;
        a.mov(rax, rdi)?;
        a.xor(rax, 1)?;
        a.mov(qword_ptr(TURN), rax)?;
        a.dec(r11)?;
        a.jnz(top)?;
        a.hlt()
    })
}

/// Two vCPUs whose TSCs disagree (one starts 10^9 ticks behind, as parallel vCPUs drift
/// apart within their slices) take turns reading the TSC: with
/// the shared high-water mark no read is below one made before it on the other vCPU;
/// without it the check sees the warp.
#[test]
fn a_shared_tsc_mark_keeps_reads_monotonic_across_vcpus() {
    const ITERS: u64 = 20_000;
    let warps = |config: CpuConfig| -> u64 {
        let mut hs = machines_with(2, &tsc_warp_code(), ITERS, config);
        hs[0].cpu.set_tsc(1_000_000_000);
        let hs = run_parallel(hs);
        hs.iter().map(|h| h.cpu.regs().gpr[13]).sum()
    };
    let mark = CpuConfig {
        tsc_mark: Some(std::sync::Arc::default()),
        ..CpuConfig::default()
    };
    assert_eq!(warps(mark), 0, "TSC warps with the shared mark");
    assert!(
        warps(CpuConfig::default()) > 0,
        "without the mark the TSCs 10^9 apart must show a warp (the test would prove nothing)"
    );
}
