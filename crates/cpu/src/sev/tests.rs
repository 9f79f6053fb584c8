//! Tests of SEV-ES mode: encrypted memory and its two views, the C-bit page walk, #VC
//! events, VMGEXIT, write traps, and the VMSA.

use crate::mem::PAGE_SIZE;
use crate::testutil::*;
use crate::{
    exit_code as ec, vmsa_layout, Cpu, CpuConfig, Exit, PageCipher, PhysMemory, SevEsConfig,
    TrapReg, VcIntercepts,
};
use esvm_arch::bits::{cr0, cr4, efer, rflags, vector};
use esvm_arch::vmsa::offset;
use esvm_arch::{PendingEvents, PendingException, Regs, Vmsa};
use proptest::prelude::*;
use std::sync::Arc;

const C: u64 = 1 << 47;
const MEM: u64 = 16 << 20;
/// Private identity map everywhere below 16 MiB except this 2 MiB window (C-bit clear).
const SHARED: u64 = 0x80_0000;
/// Private data page(s), identity mapped.
const PRIV: u64 = 0x60_0000;
/// A C-bit-clear alias of the 2 MiB region at `PRIV`.
const ALIAS: u64 = 0x140_0000;
/// Linear addresses mapping the guest-physical address just above RAM (16 MiB) with the
/// C-bit clear (MMIO) and set (fatal).
const MMIO_C0: u64 = 0x100_0000;
const MMIO_C1: u64 = 0x120_0000;

/// A test memory key: per byte, add a key stream byte (from the 16-byte block's address)
/// and rotate. Not an involution, so mixing up encrypt and decrypt shows.
struct TestCipher(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl TestCipher {
    fn key(&self, addr: u64) -> u8 {
        let k = mix(self.0 ^ (addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (k >> (8 * (addr % 8))) as u8 ^ if addr % 16 >= 8 { 0xa5 } else { 0 }
    }
}

impl PageCipher for TestCipher {
    fn encrypt_page(&self, gpa: u64, page: &mut [u8; 4096]) {
        for (i, b) in page.iter_mut().enumerate() {
            *b = b.wrapping_add(self.key(gpa + i as u64)).rotate_left(3);
        }
    }
    fn decrypt_page(&self, gpa: u64, page: &mut [u8; 4096]) {
        for (i, b) in page.iter_mut().enumerate() {
            *b = b.rotate_right(3).wrapping_sub(self.key(gpa + i as u64));
        }
    }
}

const KEY: u64 = 0x5eb5_eb5e_0123_4567;

fn cipher() -> Arc<TestCipher> {
    Arc::new(TestCipher(KEY))
}

fn encrypt(gpa: u64, mut page: [u8; 4096]) -> [u8; 4096] {
    TestCipher(KEY).encrypt_page(gpa, &mut page);
    page
}

fn decrypt(gpa: u64, mut page: [u8; 4096]) -> [u8; 4096] {
    TestCipher(KEY).decrypt_page(gpa, &mut page);
    page
}

/// Every optional event intercepted, so the #VC tests see all of them.
fn sev_config() -> CpuConfig {
    sev_config_with(VcIntercepts::ALL)
}

fn sev_config_with(intercepts: VcIntercepts) -> CpuConfig {
    CpuConfig {
        sev_es: Some(SevEsConfig {
            c_bit: 47,
            intercepts,
        }),
        ..CpuConfig::default()
    }
}

fn page_of(mem: &PhysMemory, gpa: u64, private: bool) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    if private {
        mem.read_private(gpa, &mut b).unwrap();
    } else {
        mem.read_host(gpa, &mut b).unwrap();
    }
    b
}

fn rd_private_u64(mem: &PhysMemory, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read_private(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Build the identity-mapped harness, turn its page tables into C-bit tables (see the
/// constants), place `code` at `CODE`, enable encryption and "LAUNCH_UPDATE_DATA"
/// everything below the shared window.
fn sev_harness_on(mem: PhysMemory, code: &[u8]) -> Harness {
    sev_harness_with(mem, code, sev_config())
}

fn sev_harness_with(mem: PhysMemory, code: &[u8], config: CpuConfig) -> Harness {
    let mut h = Harness::with_memory(mem.clone(), config);
    let pdpt = PML4 + 0x1000;
    let pd = PML4 + 0x2000;
    // User-accessible too, for the CPL 3 tests.
    mem.write_u64(PML4, mem.read_u64(PML4).unwrap() | C | 4)
        .unwrap();
    mem.write_u64(pdpt, mem.read_u64(pdpt).unwrap() | C | 4)
        .unwrap();
    for i in 0..MEM >> 21 {
        let c = if i << 21 == SHARED { 0 } else { C };
        mem.write_u64(pd + 8 * i, (i << 21) | 0x87 | c).unwrap();
    }
    mem.write_u64(pd + 8 * (MMIO_C0 >> 21), MEM | 0x83).unwrap();
    mem.write_u64(pd + 8 * (MMIO_C1 >> 21), MEM | 0x83 | C)
        .unwrap();
    mem.write_u64(pd + 8 * (ALIAS >> 21), PRIV | 0x83).unwrap();
    mem.write(CODE, code).unwrap();
    let mut s = h.cpu.sregs();
    s.cr3 = PML4 | C;
    h.cpu.set_sregs(&s).unwrap();
    mem.enable_encryption(cipher()).unwrap();
    mem.encrypt_in_place(0, SHARED).unwrap();
    h.restart(CODE);
    h
}

fn sev_harness(code: &[u8]) -> Harness {
    sev_harness_on(PhysMemory::new_owned(MEM).unwrap(), code)
}

/// Replace the code at `CODE` (through the private view) and restart there.
fn reload(h: &mut Harness, code: &[u8]) {
    h.mem().write_private(CODE, code).unwrap();
    h.restart(CODE);
}

/// The exception a run ended with on a harness stub: (vector, error code, pushed RIP),
/// read from the private stack.
fn caught(h: &Harness) -> Option<(u8, Option<u64>, u64)> {
    let r = h.cpu.regs();
    if !(STUBS + 1..STUBS + 1 + 4 * 256).contains(&r.rip) {
        return None;
    }
    let v = ((r.rip - 1 - STUBS) / 4) as u8;
    let m = h.mem();
    let sp = r.gpr[4];
    Some(if vector::has_error_code(v) {
        (v, Some(rd_private_u64(m, sp)), rd_private_u64(m, sp + 8))
    } else {
        (v, None, rd_private_u64(m, sp))
    })
}

/// Raw bytes: `mov ecx, imm32`.
fn mov_ecx(v: u32) -> Vec<u8> {
    let mut b = vec![0xb9];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// Raw bytes: `mov eax, imm32`.
fn mov_eax(v: u32) -> Vec<u8> {
    let mut b = vec![0xb8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// Raw bytes: `mov rax, [abs32]` / `mov [abs32], rax` (SIB absolute, sign-extended disp32).
fn load_rax(addr: u64) -> Vec<u8> {
    let mut b = vec![0x48, 0x8b, 0x04, 0x25];
    b.extend_from_slice(&(addr as u32).to_le_bytes());
    b
}
fn store_rax(addr: u64) -> Vec<u8> {
    let mut b = vec![0x48, 0x89, 0x04, 0x25];
    b.extend_from_slice(&(addr as u32).to_le_bytes());
    b
}
/// `mov rax, imm64`.
fn mov_rax(v: u64) -> Vec<u8> {
    let mut b = vec![0x48, 0xb8];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

const HLT: u8 = 0xf4;
const NOP: u8 = 0x90;

fn prog(parts: &[&[u8]]) -> Vec<u8> {
    let mut v: Vec<u8> = parts.concat();
    v.push(HLT);
    v
}

// ---------------------------------------------------------------------- memory model

#[test]
fn test_cipher_is_a_tweaked_non_involution() {
    let mut p = [0u8; 4096];
    for (i, b) in p.iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = encrypt(0x1000, p);
    assert_ne!(c, p);
    assert_ne!(c, encrypt(0x2000, p), "address tweak");
    assert_ne!(decrypt(0x1000, p), c, "not an involution");
    assert_eq!(decrypt(0x1000, c), p);
}

#[test]
fn host_and_private_views_of_encrypted_memory() {
    let m = PhysMemory::new_owned(16 * PAGE_SIZE).unwrap();
    assert_eq!(
        m.read_private(0, &mut [0u8; 4]),
        Err(crate::MemError::EncryptionOff)
    );
    let mut plain = [0u8; 4096];
    for (i, b) in plain.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let gpa = 3 * PAGE_SIZE;
    m.write(gpa, &plain).unwrap();
    m.enable_encryption(cipher()).unwrap();
    assert_eq!(
        m.enable_encryption(cipher()),
        Err(crate::MemError::EncryptionOn)
    );
    assert!(!m.is_private(3));
    m.take_dirty();
    // LAUNCH_UPDATE_DATA: plaintext = what RAM held; the host now sees ciphertext.
    m.encrypt_in_place(gpa, PAGE_SIZE).unwrap();
    assert!(m.is_private(3) && !m.is_private(2) && !m.is_private(4));
    assert_eq!(m.private_bitmap()[0], 1 << 3);
    assert_eq!(page_of(&m, gpa, true), plain);
    let host = page_of(&m, gpa, false);
    assert_ne!(host, plain, "the host must not see plaintext");
    assert_eq!(host, encrypt(gpa, plain));
    let mut raw = [0u8; 4096];
    m.read(gpa, &mut raw).unwrap();
    assert_eq!(raw, host, "PhysMemory::read is the host view");
    assert_eq!(m.take_dirty()[0], 1 << 3);
    // Trusted write: plaintext changes, the host sees the new ciphertext.
    m.write_private(gpa + 10, &[0xee; 3]).unwrap();
    plain[10..13].fill(0xee);
    assert_eq!(page_of(&m, gpa, true), plain);
    assert_eq!(page_of(&m, gpa, false), encrypt(gpa, plain));
    // A host write to a private page: Shared with the host's bytes; a C-bit read decrypts
    // the DRAM bytes (the current ciphertext with the host's bytes spliced in).
    m.write_host(gpa + 100, &[1, 2, 3, 4]).unwrap();
    assert!(!m.is_private(3));
    let mut dram = encrypt(gpa, plain);
    dram[100..104].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(page_of(&m, gpa, false), dram);
    let seen = page_of(&m, gpa, true);
    assert_eq!(seen, decrypt(gpa, dram));
    assert_eq!(&seen[..100], &plain[..100], "untouched bytes still decrypt");
    assert_ne!(&seen[100..104], &[1, 2, 3, 4]);
    // read_private does not convert.
    assert!(!m.is_private(3));
    // write_private on a Shared page converts it first (other bytes keep what a C-bit read
    // saw).
    m.write_private(gpa, &[9]).unwrap();
    assert!(m.is_private(3));
    let mut expect = decrypt(gpa, dram);
    expect[0] = 9;
    assert_eq!(page_of(&m, gpa, true), expect);
    // A host write through other means, reported with invalidate_code.
    m.invalidate_code(gpa, 1);
    assert!(!m.is_private(3));
    // Out of range.
    assert!(m.read_host(15 * PAGE_SIZE, &mut [0u8; 4097]).is_err());
    assert!(m.write_private(16 * PAGE_SIZE, &[0]).is_err());
}

#[test]
fn encrypt_in_place_of_part_of_a_page() {
    let m = PhysMemory::new_owned(4 * PAGE_SIZE).unwrap();
    let plain: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    m.write(PAGE_SIZE, &plain).unwrap();
    m.enable_encryption(cipher()).unwrap();
    // Bytes 0x100..0x200 are encrypted; the rest of the page stays as plaintext DRAM bytes,
    // which a C-bit read decrypts (as hardware would).
    m.encrypt_in_place(PAGE_SIZE + 0x100, 0x100).unwrap();
    let mut dram: [u8; 4096] = plain.clone().try_into().unwrap();
    let enc = encrypt(PAGE_SIZE, dram);
    dram[0x100..0x200].copy_from_slice(&enc[0x100..0x200]);
    assert_eq!(page_of(&m, PAGE_SIZE, false), dram);
    let view = page_of(&m, PAGE_SIZE, true);
    assert_eq!(&view[0x100..0x200], &plain[0x100..0x200]);
    assert_eq!(view, decrypt(PAGE_SIZE, dram));
}

// ---------------------------------------------------------------------- guest accesses

#[test]
fn guest_private_and_shared_accesses() {
    let v = 0x1122_3344_5566_7788u64;
    let w = 0x0102_0304_0506_0708u64;
    let code = prog(&[
        &mov_rax(v),
        &store_rax(PRIV + 8),
        &mov_rax(w),
        &store_rax(SHARED + 16),
        &load_rax(SHARED + 0x1000),
        &[0x48, 0x89, 0xc3], // mov rbx, rax
        &load_rax(DATA),
    ]);
    let mut h = sev_harness(&code);
    let m = h.mem().clone();
    m.write_host(SHARED + 0x1000, &0xabcdu64.to_le_bytes())
        .unwrap();
    m.write_private(DATA, &0x77u64.to_le_bytes()).unwrap();
    m.take_dirty();
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
    let r = h.cpu.regs();
    assert_eq!(r.gpr[3], 0xabcd, "shared read sees the host's bytes");
    assert_eq!(r.gpr[0], 0x77, "private read sees the plaintext");
    // Private write: plaintext in the private view, ciphertext for the host.
    assert_eq!(rd_private_u64(&m, PRIV + 8), v);
    assert!(m.is_private(PRIV >> 12));
    let host = page_of(&m, PRIV, false);
    assert_ne!(u64::from_le_bytes(host[8..16].try_into().unwrap()), v);
    assert_eq!(host, encrypt(PRIV, page_of(&m, PRIV, true)));
    // Shared write: plaintext for the host.
    assert_eq!(m.read_u64(SHARED + 16).unwrap(), w);
    assert!(!m.is_private(SHARED >> 12));
    let dirty = m.take_dirty();
    for p in [PRIV >> 12, SHARED >> 12] {
        assert_ne!(
            dirty[(p / 64) as usize] & (1 << (p % 64)),
            0,
            "page {p:#x} dirty"
        );
    }
}

/// Writing through the C-bit and reading through a C-bit-clear alias of the same page shows
/// the DRAM bytes (ciphertext); writing through the alias and reading through the C-bit
/// decrypts them — what hardware does with one DRAM page.
#[test]
fn conversions_give_hardware_bytes() {
    let v = 0x8877_6655_4433_2211u64;
    let code = prog(&[
        &mov_rax(v),
        &store_rax(PRIV),
        &load_rax(ALIAS),
        &[0x48, 0x89, 0xc3], // mov rbx, rax
        &mov_rax(0x42),
        &store_rax(ALIAS + 8),
        &load_rax(PRIV + 8),
    ]);
    let mut h = sev_harness(&code);
    let m = h.mem().clone();
    let before = page_of(&m, PRIV, true);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
    let mut plain = before;
    plain[..8].copy_from_slice(&v.to_le_bytes());
    let dram = encrypt(PRIV, plain);
    let r = h.cpu.regs();
    assert_eq!(r.gpr[3], u64::from_le_bytes(dram[..8].try_into().unwrap()));
    let mut dram2 = dram;
    dram2[8..16].copy_from_slice(&0x42u64.to_le_bytes());
    let seen = decrypt(PRIV, dram2);
    assert_eq!(
        r.gpr[0],
        u64::from_le_bytes(seen[8..16].try_into().unwrap())
    );
    assert_ne!(r.gpr[0], 0x42);
    assert!(m.is_private(PRIV >> 12));
}

/// Another vCPU's conversion of a page this vCPU has in its TLB takes effect at this vCPU's
/// next run (its TLB is flushed on the new conversion generation).
#[test]
fn conversions_flush_other_vcpus_tlbs() {
    let reader = prog(&[&load_rax(PRIV)]);
    let mut a = sev_harness(&reader);
    let m = a.mem().clone();
    m.write_private(PRIV, &5u64.to_le_bytes()).unwrap();
    assert_eq!(a.run(), Exit::Hlt);
    assert_eq!(a.cpu.regs().gpr[0], 5);
    // vCPU B writes the page through the C-bit-clear alias.
    let mut b = Cpu::new(sev_config(), m.clone());
    b.set_sregs(&a.cpu.sregs()).unwrap();
    let writer = prog(&[&mov_rax(0x99), &store_rax(ALIAS)]);
    m.write_private(CODE + 0x800, &writer).unwrap();
    let mut r = a.cpu.regs();
    r.rip = CODE + 0x800;
    b.set_regs(&r);
    assert_eq!(b.run(1000), Exit::Hlt);
    assert!(!m.is_private(PRIV >> 12));
    let expect = decrypt(PRIV, page_of(&m, PRIV, false));
    a.restart(CODE);
    assert_eq!(a.run(), Exit::Hlt);
    assert_eq!(
        a.cpu.regs().gpr[0],
        u64::from_le_bytes(expect[..8].try_into().unwrap()),
        "vCPU A read through a stale TLB entry"
    );
}

/// A running vCPU notices a conversion made by another thread (here the host writing the
/// page) at its next block boundary: the loop below only ends once the guest's C-bit read
/// sees the decrypted host bytes instead of its stale plaintext.
#[test]
fn running_vcpu_sees_conversions_by_other_threads() {
    // loop: mov rax, [PRIV]; cmp rax, 5; je loop; hlt
    let mut code = load_rax(PRIV);
    code.extend_from_slice(&[0x48, 0x83, 0xf8, 0x05, 0x74, 0xf2]);
    let mut h = sev_harness(&prog(&[&code]));
    let m = h.mem().clone();
    m.write_private(PRIV, &5u64.to_le_bytes()).unwrap();
    let before = page_of(&m, PRIV, true);
    let runner = std::thread::spawn(move || {
        let x = h.cpu.run(500_000_000);
        (x, h.cpu.regs().gpr[0], h.cpu.regs().rip)
    });
    // Let the guest spin for a moment (if the write lands first, the guest simply never
    // loops; the outcome is the same).
    std::thread::sleep(std::time::Duration::from_millis(20));
    m.write_host(PRIV + 2, &[0xaa]).unwrap();
    let (x, rax, rip) = runner.join().unwrap();
    assert_eq!(x, Exit::Hlt, "the guest kept reading its stale plaintext");
    assert_eq!(rip, CODE + 15, "ended on the program's HLT");
    let mut dram = encrypt(PRIV, before);
    dram[2] = 0xaa;
    let seen = decrypt(PRIV, dram);
    assert_eq!(rax, u64::from_le_bytes(seen[..8].try_into().unwrap()));
}

#[test]
fn fetch_is_private_even_through_a_shared_mapping() {
    let mut h = sev_harness(&[]);
    let m = h.mem().clone();
    // Code in the private page at PRIV + 0x1000, executed through its C-bit-clear alias.
    m.write_private(PRIV + 0x1000, &prog(&[&mov_eax(0x1234)]))
        .unwrap();
    let jmp = {
        let mut b = mov_rax(ALIAS + 0x1000);
        b.extend_from_slice(&[0xff, 0xe0]); // jmp rax
        b
    };
    reload(&mut h, &jmp);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
    assert_eq!(h.cpu.regs().gpr[0], 0x1234);
    assert_eq!(h.cpu.regs().rip, ALIAS + 0x1000 + 6);
}

#[test]
fn locked_rmw_on_private_memory() {
    let mut code = vec![0xf0, 0x48, 0x83, 0x04, 0x25]; // lock add qword [PRIV], 3
    code.extend_from_slice(&(PRIV as u32).to_le_bytes());
    code.push(3);
    let mut h = sev_harness(&prog(&[&code]));
    h.mem().write_private(PRIV, &10u64.to_le_bytes()).unwrap();
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
    assert_eq!(rd_private_u64(h.mem(), PRIV), 13);
}

#[test]
fn mmio_through_a_shared_mapping_raises_vc_npf() {
    let load = load_rax(MMIO_C0 + 0x10);
    let mut h = sev_harness(&prog(&[&[NOP], &load]));
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), Some((vector::VC, Some(ec::NPF), CODE + 1)));
    reload(&mut h, &prog(&[&[NOP, NOP], &store_rax(MMIO_C0 + 8)]));
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), Some((vector::VC, Some(ec::NPF), CODE + 2)));
}

#[test]
fn private_access_outside_ram_shuts_down() {
    let mut h = sev_harness(&prog(&[&load_rax(MMIO_C1)]));
    match h.run() {
        Exit::Shutdown { reason } => assert!(reason.contains("C-bit"), "{reason}"),
        x => panic!("expected a shutdown, got {x:?}"),
    }
    assert!(
        matches!(h.run(), Exit::Shutdown { .. }),
        "shutdown is final"
    );
}

#[test]
fn private_access_without_encryption_shuts_down() {
    let mem = PhysMemory::new_owned(MEM).unwrap();
    let mut h = Harness::with_memory(mem, sev_config());
    h.load(&[HLT]);
    match h.run() {
        Exit::Shutdown { reason } => assert!(reason.contains("enable_encryption"), "{reason}"),
        x => panic!("expected a shutdown, got {x:?}"),
    }
}

#[test]
fn bad_c_bit_is_a_shutdown() {
    for bit in [20u8, 31, 52] {
        let mem = PhysMemory::new_owned(MEM).unwrap();
        let cfg = CpuConfig {
            sev_es: Some(SevEsConfig::new(bit)),
            ..CpuConfig::default()
        };
        let mut cpu = Cpu::new(cfg, mem);
        assert!(
            matches!(cpu.run(10), Exit::Shutdown { ref reason } if reason.contains("C-bit")),
            "bit {bit}"
        );
    }
}

// ---------------------------------------------------------------------- REP MOVS/STOS

/// A C-bit-clear alias (one 2 MiB page) of guest-physical 0..2 MiB: the page tables, the
/// code and the stack through the shared view.
const LOW_ALIAS: u64 = 0x180_0000;
/// Pages mapped with the C-bit that are still Shared (above the launch-encrypted range):
/// their first access converts them.
const FRESH: u64 = 0xc0_0000;

const STOSB: &[u8] = &[0xf3, 0xaa];
const STOSW: &[u8] = &[0x66, 0xf3, 0xab];
const STOSQ: &[u8] = &[0xf3, 0x48, 0xab];
const MOVSB: &[u8] = &[0xf3, 0xa4];
const MOVSW: &[u8] = &[0x66, 0xf3, 0xa5];
const MOVSD: &[u8] = &[0xf3, 0xa5];
const MOVSQ: &[u8] = &[0xf3, 0x48, 0xa5];

/// One REP MOVS/STOS: its registers, DF and its bytes.
#[derive(Clone, Copy)]
struct Rep {
    rsi: u64,
    rdi: u64,
    rcx: u64,
    rax: u64,
    back: bool,
    op: &'static [u8],
}

fn rep(op: &'static [u8], rsi: u64, rdi: u64, rcx: u64) -> Rep {
    Rep {
        rsi,
        rdi,
        rcx,
        rax: 0x5aa5_0123_4567_89cd,
        back: false,
        op,
    }
}

fn rep_back(op: &'static [u8], rsi: u64, rdi: u64, rcx: u64) -> Rep {
    Rep {
        back: true,
        ..rep(op, rsi, rdi, rcx)
    }
}

/// `mov r64, imm64` (registers 0..7).
fn mov_r64(reg: u8, v: u64) -> Vec<u8> {
    let mut b = vec![0x48, 0xb8 + reg];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// The REP instructions after their register set-up, then HLT. With `reference` each one
/// has an address-size prefix: 32-bit addresses, which the page-at-a-time path declines,
/// so every element goes through the per-access path (the same elements: every address
/// here is below 4 GiB and nothing wraps); otherwise a DS override (the default source
/// segment: no effect) keeps the code and the instruction the same length.
fn rep_program(reps: &[Rep], reference: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for r in reps {
        v.extend(mov_r64(6, r.rsi));
        v.extend(mov_r64(7, r.rdi));
        v.extend(mov_r64(1, r.rcx));
        v.extend(mov_r64(0, r.rax));
        if r.back {
            v.push(0xfd); // std
        }
        v.push(if reference { 0x67 } else { 0x3e });
        v.extend_from_slice(r.op);
        v.push(0xfc); // cld
    }
    v.push(HLT);
    v
}

/// Guest-physical windows whose two views the REP tests compare: page tables, code,
/// stack, the private pages, the shared window, fresh pages, the last RAM page.
const REP_WINDOWS: [(u64, u64); 7] = [
    (PML4, 0x3000),
    (CODE, 0x2000),
    (STACK_TOP - 0x1000, 0x1000),
    (PRIV, 0x8000),
    (SHARED, 0x4000),
    (FRESH, 0x4000),
    (MEM - 0x1000, 0x1000),
];

/// Everything a REP test compares between the fast and the reference run.
struct RepOutcome {
    exit: Exit,
    regs: Regs,
    caught: Option<(u8, Option<u64>, u64)>,
    private_pages: Vec<u64>,
    dirty: Vec<u64>,
    /// Per window: the private view (plaintext a C-bit read sees) and the host's view.
    views: Vec<(Vec<u8>, Vec<u8>)>,
    /// Elements moved through host pointers.
    bulk: u64,
}

/// Run `code` on a fresh SEV-ES harness with patterned private and shared pages and the
/// `LOW_ALIAS` mapping.
fn rep_outcome_of(code: &[u8], setup: &dyn Fn(&PhysMemory)) -> RepOutcome {
    let mut h = sev_harness(code);
    let m = h.mem().clone();
    let pattern =
        |seed: u64, n: usize| -> Vec<u8> { (0..n as u64).map(|i| mix(seed ^ i) as u8).collect() };
    m.write_private(PRIV, &pattern(1, 0x8000)).unwrap();
    m.write_host(SHARED, &pattern(2, 0x4000)).unwrap();
    wr_private_u64(&m, PML4 + 0x2000 + 8 * (LOW_ALIAS >> 21), 0x83);
    setup(&m);
    m.take_dirty();
    crate::exec::string::BULK_ELEMENTS.with(|b| b.set(0));
    let exit = h.run();
    let bulk = crate::exec::string::BULK_ELEMENTS.with(|b| b.get());
    let views = REP_WINDOWS
        .iter()
        .map(|&(gpa, len)| {
            let (mut p, mut s) = (vec![0u8; len as usize], vec![0u8; len as usize]);
            m.read_private(gpa, &mut p).unwrap();
            m.read_host(gpa, &mut s).unwrap();
            (p, s)
        })
        .collect();
    RepOutcome {
        exit,
        regs: h.cpu.regs(),
        caught: caught(&h),
        private_pages: m.private_bitmap(),
        dirty: m.take_dirty(),
        views,
        bulk,
    }
}

/// Run `fast` (REP MOVS/STOS that may take the page-at-a-time path) and `reference` (the
/// same program whose REP instructions go element by element) and require the same
/// registers, exception, exit, page states, dirty pages and memory in both views. Returns
/// the fast run.
fn same_as_per_element(
    name: &str,
    fast: &[u8],
    reference: &[u8],
    setup: &dyn Fn(&PhysMemory),
) -> RepOutcome {
    let f = rep_outcome_of(fast, setup);
    let r = rep_outcome_of(reference, setup);
    assert_eq!(r.bulk, 0, "{name}: the reference run took the fast path");
    assert_eq!(f.exit, r.exit, "{name}: exit");
    assert_eq!(f.caught, r.caught, "{name}: exception");
    assert_eq!(f.regs, r.regs, "{name}: registers");
    assert!(
        f.private_pages == r.private_pages,
        "{name}: page states differ"
    );
    assert!(f.dirty == r.dirty, "{name}: dirty pages differ");
    // The programs differ in their prefixes (and so in the ciphertext of those bytes'
    // 16-byte blocks); everything else must match.
    let program = CODE & !15..(CODE + fast.len() as u64).next_multiple_of(16);
    for (k, ((fp, fs), (rp, rs))) in f.views.iter().zip(&r.views).enumerate() {
        let (gpa, _) = REP_WINDOWS[k];
        let differs = |a: &[u8], b: &[u8]| {
            (0..a.len()).find(|&i| a[i] != b[i] && !program.contains(&(gpa + i as u64)))
        };
        if let Some(i) = differs(fp, rp) {
            panic!("{name}: private view differs at {:#x}", gpa + i as u64);
        }
        if let Some(i) = differs(fs, rs) {
            panic!("{name}: host view differs at {:#x}", gpa + i as u64);
        }
    }
    f
}

fn same_reps(name: &str, reps: &[Rep]) -> RepOutcome {
    same_as_per_element(
        name,
        &rep_program(reps, false),
        &rep_program(reps, true),
        &|_| {},
    )
}

fn window(o: &RepOutcome, gpa: u64, len: usize, private: bool) -> &[u8] {
    let (k, &(base, _)) = REP_WINDOWS
        .iter()
        .enumerate()
        .find(|(_, w)| (w.0..w.0 + w.1).contains(&gpa))
        .expect("a compared window");
    let v = if private {
        &o.views[k].0
    } else {
        &o.views[k].1
    };
    &v[(gpa - base) as usize..(gpa - base) as usize + len]
}

/// REP STOS/MOVS in SEV-ES mode run a page at a time through the backing of the view each
/// element's access would use (the private backing through C-bit-set mappings, RAM through
/// clear ones), converting pages as those accesses would: the same registers, memory (both
/// views), page states and dirty pages as element by element, forwards and with DF=1,
/// across page boundaries, overlapping, between private and shared memory.
#[test]
fn rep_string_fast_path_uses_the_views_of_the_per_element_path() {
    // Forwards and backwards within private memory, across pages.
    let o = same_reps("stosb", &[rep(STOSB, 0, PRIV + 0xff0, 0x2020)]);
    assert!(o.bulk > 0x1000, "stosb: the fast path did not run");
    assert!(window(&o, PRIV + 0xff0, 0x2020, true)
        .iter()
        .all(|&b| b == 0xcd));
    assert_eq!(
        window(&o, PRIV + 0x1000, 0x1000, false),
        &encrypt(PRIV + 0x1000, [0xcd; 4096])[..],
        "the host sees the ciphertext of a private page"
    );
    let o = same_reps("stosq back", &[rep_back(STOSQ, 0, PRIV + 0x3008, 0x500)]);
    assert!(o.bulk > 0x400, "stosq back: the fast path did not run");
    assert_eq!(o.regs.gpr[7], PRIV + 0x3008 - 8 * 0x500);

    // Private to shared and back; the shared copy is plaintext for the host.
    let o = same_reps(
        "movsq to shared",
        &[rep(MOVSQ, PRIV + 0x100, SHARED + 0xf80, 0x400)],
    );
    assert!(o.bulk > 0x200, "movsq to shared: the fast path did not run");
    assert_eq!(
        window(&o, SHARED + 0xf80, 0x2000, false),
        window(&o, PRIV + 0x100, 0x2000, true),
        "the shared copy is the plaintext in RAM"
    );
    let o = same_reps(
        "movsb shared to private, back",
        &[rep_back(MOVSB, SHARED + 0x2ff0, PRIV + 0x5008, 0x1800)],
    );
    assert!(o.bulk > 0x1000);
    assert_eq!(
        window(&o, PRIV + 0x5009 - 0x1800, 0x1800, true),
        window(&o, SHARED + 0x2ff1 - 0x1800, 0x1800, false),
    );

    // Overlapping runs: the pattern fill of RDI = RSI + 1, and a backwards overlap.
    let o = same_reps(
        "overlap",
        &[rep(MOVSB, PRIV + 0x1000, PRIV + 0x1001, 0x1800)],
    );
    assert!(o.bulk > 0x1000);
    let first = window(&o, PRIV + 0x1000, 1, true)[0];
    assert!(window(&o, PRIV + 0x1000, 0x1801, true)
        .iter()
        .all(|&b| b == first));
    same_reps(
        "overlap back",
        &[rep_back(MOVSD, PRIV + 0x2ffc, PRIV + 0x2fff, 0x300)],
    );

    // First accesses through the C-bit to pages still Shared convert them (destination
    // and source), including a conversion while the destination is translated.
    let o = same_reps(
        "fresh pages",
        &[
            rep(STOSW, 0, FRESH + 0xff0, 0x900),
            rep(MOVSD, PRIV, FRESH + 0x2ffc, 0x401),
            rep(MOVSQ, FRESH + 0x8, PRIV + 0x7000, 0x200),
        ],
    );
    for p in [FRESH, FRESH + 0x1000, FRESH + 0x2000, FRESH + 0x3000] {
        assert!(o.private_pages[(p >> 18) as usize] & (1 << ((p >> 12) % 64)) != 0);
    }
    // A C-bit-clear alias of private pages: the other page converts to Shared; the same
    // page read and written through its two views converts back and forth per element, so
    // an element read after an overlapping one was written through the other view sees its
    // decryption.
    let o = same_reps(
        "aliases",
        &[
            rep(MOVSQ, ALIAS + 0x7000, PRIV + 0x4000, 0x180),
            rep(MOVSW, PRIV + 0x6000, ALIAS + 0x6800, 0x300),
            rep(MOVSB, PRIV + 0x5000, ALIAS + 0x5010, 0x100),
            rep_back(MOVSB, ALIAS + 0x6100, PRIV + 0x6f00, 0x40),
        ],
    );
    assert!(o.bulk > 0);
    assert_eq!(
        window(&o, PRIV + 0x4000, 0xc00, true),
        window(&o, PRIV + 0x7000, 0xc00, false),
        "a copy from the shared alias gets the ciphertext"
    );

    // The page tables through a C-bit-clear alias, as destination (a conversion while the
    // destination is translated, of a table the source's walk reads) and as source.
    same_reps(
        "tables",
        &[
            rep(MOVSQ, PRIV + 0x100, LOW_ALIAS + PML4 + 0x2000 + 0x800, 0x40),
            rep(MOVSB, LOW_ALIAS + PML4, PRIV + 0x100, 0x1000),
            rep(STOSQ, 0, PRIV + 0x2000, 0x10),
        ],
    );

    // MMIO through a C-bit-clear mapping: #VC at the first element there, after the RAM
    // elements before it; a C-bit access outside RAM shuts down; an MMIO source.
    let o = same_reps("stos into mmio", &[rep(STOSB, 0, MMIO_C0 - 0x10, 0x40)]);
    assert_eq!(
        o.caught.map(|c| (c.0, c.1)),
        Some((vector::VC, Some(ec::NPF)))
    );
    assert_eq!(o.regs.gpr[1], 0x30);
    let o = same_reps("movs from mmio", &[rep(MOVSQ, MMIO_C0, PRIV, 4)]);
    assert_eq!(
        o.caught.map(|c| (c.0, c.1)),
        Some((vector::VC, Some(ec::NPF)))
    );
    let o = same_reps("stos outside ram", &[rep(STOSQ, 0, MMIO_C1, 4)]);
    assert!(matches!(o.exit, Exit::Shutdown { .. }), "{:?}", o.exit);
}

/// REP MOVS over code that ran (the destination page holds decoded code): the new code
/// runs, as element by element; and the page is dirty.
#[test]
fn rep_movs_over_executed_code() {
    const FUNC: u64 = CODE + 0x1000;
    const NEW: u64 = PRIV + 0x200;
    let program = |reference: bool| {
        let mut v = vec![0xe8]; // call FUNC
        v.extend_from_slice(&((FUNC - (CODE + 5)) as u32).to_le_bytes());
        v.extend_from_slice(&[0x89, 0xc3]); // mov ebx, eax
        let body = rep_program(&[rep(MOVSB, NEW, FUNC, 6)], reference);
        v.extend_from_slice(&body[..body.len() - 1]);
        let at = CODE + v.len() as u64;
        v.push(0xe8); // call FUNC
        v.extend_from_slice(&((FUNC.wrapping_sub(at + 5)) as u32).to_le_bytes());
        v.push(HLT);
        v
    };
    let setup = |m: &PhysMemory| {
        m.write_private(FUNC, &[0xb8, 1, 0, 0, 0, 0xc3]).unwrap(); // mov eax, 1; ret
        m.write_private(NEW, &[0xb8, 2, 0, 0, 0, 0xc3]).unwrap(); // mov eax, 2; ret
    };
    let o = same_as_per_element("code", &program(false), &program(true), &setup);
    assert_eq!(o.exit, Exit::Hlt);
    assert_eq!(
        (o.regs.gpr[3], o.regs.gpr[0]),
        (1, 2),
        "the old code, then the new"
    );
    let p = FUNC >> 12;
    assert!(o.dirty[(p / 64) as usize] & (1 << (p % 64)) != 0);
}

/// A conversion by this vCPU drops the data TLB entries of that page (an entry of another
/// alias points at the view the page left) and keeps the others; after a conversion it has
/// not caught up with (the host's, here), it drops them all.
#[test]
fn own_conversion_drops_the_tlb_entries_of_its_page() {
    let code = prog(&[
        &load_rax(PRIV),
        &load_rax(ALIAS + 0x1000),
        &load_rax(SHARED),
    ]);
    let mut h = sev_harness(&code);
    assert_eq!(h.run(), Exit::Hlt);
    let cached = |c: &Cpu, lin: u64| {
        let vpn = lin >> 12;
        c.tlb.e[c.tlb_idx(vpn)].r == vpn
    };
    for lin in [PRIV, ALIAS + 0x1000, SHARED] {
        assert!(cached(&h.cpu, lin), "{lin:#x} not in the TLB");
    }
    assert!(!h.mem().is_private((PRIV + 0x1000) >> 12));
    // A C-bit access makes PRIV + 0x1000 private again.
    h.cpu
        .sev_view((PRIV + 0x1000) >> 12, crate::mem::View::Private)
        .unwrap();
    assert!(
        !cached(&h.cpu, ALIAS + 0x1000),
        "stale entry of the alias kept"
    );
    assert!(cached(&h.cpu, PRIV) && cached(&h.cpu, SHARED));
    // The host converts a page; before this vCPU has looked, it converts another one.
    h.mem().write_host(PRIV + 0x2000, &[1]).unwrap();
    h.cpu
        .sev_view((PRIV + 0x3000) >> 12, crate::mem::View::Shared)
        .unwrap();
    assert!(!cached(&h.cpu, PRIV) && !cached(&h.cpu, SHARED));
}

// ---------------------------------------------------------------------- page walk

#[test]
fn c_bit_is_not_an_address_bit_nor_reserved() {
    let mut h = sev_harness(&[]);
    // PML4 is private, so the C-bit in CR3 worked; the leaves carry it too.
    let (gpa, w, x, private) = h.cpu.test_walk(DATA + 0x123, true, false, false).unwrap();
    assert_eq!((gpa, w, x, private), (DATA, true, true, true));
    let (gpa, _, _, private) = h
        .cpu
        .test_walk(SHARED + 0x5000, false, false, false)
        .unwrap();
    assert_eq!((gpa, private), (SHARED + 0x5000, false));
    let (gpa, _, _, private) = h
        .cpu
        .test_walk(ALIAS + 0x3000, false, false, false)
        .unwrap();
    assert_eq!((gpa, private), (PRIV + 0x3000, false));
    // Without SEV-ES the same tables' bit 47 is an address bit (to guest-physical 2^47).
    let mem = PhysMemory::new_owned(MEM).unwrap();
    let mut plain = Harness::with_memory(mem.clone(), CpuConfig::default());
    let pd = PML4 + 0x2000;
    mem.write_u64(pd + 8, (1 << 21) | 0x83 | C).unwrap();
    let (gpa, _, _, _) = plain.cpu.test_walk(0x20_0000, false, false, false).unwrap();
    assert_eq!(gpa, C | 0x20_0000);
}

/// Entry bits 47..51 above the physical-address width reduced by CPUID 0x8000_001F
/// `EBX[11:6]` are reserved, except the C-bit; bits below it are address bits even with the
/// C-bit elsewhere (here also at 40: small RAM allows it).
#[test]
fn reserved_bits_follow_the_physical_address_reduction() {
    assert_eq!(crate::SEV_PHYS_ADDR_REDUCTION, 1);
    let rsvd = Err(crate::Stop::Exc(crate::Exc::ec(vector::PF, 9)));
    for c_bit in [47u8, 40] {
        let mem = PhysMemory::new_owned(MEM).unwrap();
        let cfg = CpuConfig {
            sev_es: Some(SevEsConfig::new(c_bit)),
            ..CpuConfig::default()
        };
        let mut h = Harness::with_memory(mem.clone(), cfg);
        mem.enable_encryption(cipher()).unwrap();
        mem.encrypt_in_place(PML4, 3 * PAGE_SIZE).unwrap();
        let pd = PML4 + 0x2000;
        let c = 1u64 << c_bit;
        let pde = |i: u64, hi: u64| wr_private_u64(&mem, pd + 8 * i, (i << 21) | 0x83 | hi);
        pde(1, 1 << 46);
        pde(2, 1 << 47);
        pde(3, c);
        pde(4, 1 << 48);
        pde(5, 1 << 51);
        let mut walk = |i: u64| h.cpu.test_walk(i << 21, false, false, false);
        assert_eq!(walk(1), Ok(((1 << 46) | 1 << 21, false, true, false)));
        if c_bit == 47 {
            assert_eq!(walk(2), Ok((2 << 21, false, true, true)));
        } else {
            assert_eq!(walk(2), rsvd, "bit 47 with the C-bit at {c_bit}");
            assert_eq!(walk(3), Ok((3 << 21, false, true, true)));
        }
        assert_eq!(walk(4), rsvd);
        assert_eq!(walk(5), rsvd);
    }
}

#[test]
fn paging_off_accesses_are_private() {
    let mut h = sev_harness(&[]);
    let mut s = h.cpu.sregs();
    s.cr0 &= !cr0::PG;
    s.efer &= !(efer::LME | efer::LMA);
    s.cs.attrib = esvm_arch::SegmentAttributes::new(0xb, true, 0, true, false, true, true);
    h.cpu.set_sregs(&s).unwrap();
    assert_eq!(
        h.cpu.test_walk(0x1234, false, false, false).unwrap(),
        (0x1000, true, true, true)
    );
}

/// A 4 KiB page table for the linear 2 MiB region at `PT_REGION`, in private memory.
const PT: u64 = PML4 + 0x3000;
const PT_REGION: u64 = 0x160_0000;

fn wr_private_u64(mem: &PhysMemory, gpa: u64, v: u64) {
    mem.write_private(gpa, &v.to_le_bytes()).unwrap();
}

/// Rebuild the harness's path to `PT_REGION` with the C-bit clear in CR3 and in every
/// non-leaf entry (A/D bits clear): PML4[0] -> PDPT -> PD[11] -> `PT`, whose entry 0 maps
/// `PRIV` (C-bit set) and entry 1 maps `SHARED` (C-bit clear), both writable. The tables
/// stay in private memory, as an SEV guest's page tables always are.
fn tables_behind_c_bit_clear_entries(h: &mut Harness) {
    let m = h.mem().clone();
    let (pdpt, pd) = (PML4 + 0x1000, PML4 + 0x2000);
    wr_private_u64(&m, PML4, pdpt | 7);
    wr_private_u64(&m, pdpt, pd | 7);
    wr_private_u64(&m, pd + 8 * (PT_REGION >> 21), PT | 7);
    m.write_private(PT, &[0u8; 4096]).unwrap();
    wr_private_u64(&m, PT, PRIV | 3 | C);
    wr_private_u64(&m, PT + 8, SHARED | 3);
    let mut s = h.cpu.sregs();
    s.cr3 = PML4;
    h.cpu.set_sregs(&s).unwrap();
}

/// The page-table pages of the harness (PML4, PDPT, PD, `PT`).
const TABLES: [u64; 4] = [PML4, PML4 + 0x1000, PML4 + 0x2000, PT];

/// The tables are still private and the host sees only their ciphertext.
fn assert_tables_private(m: &PhysMemory) {
    for t in TABLES {
        assert!(m.is_private(t >> 12), "table {t:#x} turned shared");
        assert_eq!(
            page_of(m, t, false),
            encrypt(t, page_of(m, t, true)),
            "the host's view of table {t:#x} is not the ciphertext of its private content"
        );
    }
}

/// AMD: an SEV guest's page tables are always accessed as private memory, whatever the
/// C-bit of the entry (or CR3) that points to them; the leaf's C-bit still selects the view
/// of the data. The walk through C-bit-clear CR3 and non-leaf entries reads the tables'
/// plaintext and sets their A/D bits in the private view.
#[test]
fn page_tables_are_private_whatever_the_parent_c_bit() {
    let mut h = sev_harness(&[]);
    let m = h.mem().clone();
    tables_behind_c_bit_clear_entries(&mut h);
    let (pdpt, pd) = (PML4 + 0x1000, PML4 + 0x2000);
    let pde = pd + 8 * (PT_REGION >> 21);
    // A write through the C-bit leaf: private data.
    assert_eq!(
        h.cpu
            .test_walk(PT_REGION + 0x10, true, false, false)
            .unwrap(),
        (PRIV, true, true, true)
    );
    // A read through the C-bit-clear leaf: shared data (not writable yet: D is clear).
    assert_eq!(
        h.cpu
            .test_walk(PT_REGION + 0x1008, false, false, false)
            .unwrap(),
        (SHARED, false, true, false)
    );
    // A/D updates landed in the private view.
    assert_eq!(rd_private_u64(&m, PML4), pdpt | 7 | 0x20);
    assert_eq!(rd_private_u64(&m, pdpt), pd | 7 | 0x20);
    assert_eq!(rd_private_u64(&m, pde), PT | 7 | 0x20);
    assert_eq!(rd_private_u64(&m, PT), PRIV | 3 | C | 0x60);
    assert_eq!(rd_private_u64(&m, PT + 8), SHARED | 3 | 0x20);
    assert_tables_private(&m);
    // The host's bytes of a table are not its entries.
    assert_ne!(m.read_u64(PT).unwrap(), PRIV | 3 | C | 0x60);
}

/// The same tables used by a running guest: its C-bit leaf writes private data, its
/// C-bit-clear leaf writes data the host reads as plaintext, and the tables stay private.
#[test]
fn guest_runs_on_tables_behind_c_bit_clear_entries() {
    let v = 0x1122_3344_5566_7788u64;
    let w = 0x0102_0304_0506_0708u64;
    let code = prog(&[
        &mov_rax(v),
        &store_rax(PT_REGION + 8),
        &mov_rax(w),
        &store_rax(PT_REGION + 0x1010),
        &load_rax(PT_REGION + 0x1018),
        &[0x48, 0x89, 0xc3], // mov rbx, rax
        &load_rax(PT_REGION + 8),
    ]);
    let mut h = sev_harness(&code);
    let m = h.mem().clone();
    tables_behind_c_bit_clear_entries(&mut h);
    m.write_host(SHARED + 0x18, &0xabcdu64.to_le_bytes())
        .unwrap();
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
    let r = h.cpu.regs();
    assert_eq!(r.gpr[3], 0xabcd, "shared read sees the host's bytes");
    assert_eq!(r.gpr[0], v, "private read sees the plaintext");
    assert_eq!(rd_private_u64(&m, PRIV + 8), v);
    assert_ne!(m.read_u64(PRIV + 8).unwrap(), v);
    assert_eq!(m.read_u64(SHARED + 0x10).unwrap(), w);
    assert_eq!(rd_private_u64(&m, PT) & 0x60, 0x60);
    assert_eq!(rd_private_u64(&m, PT + 8) & 0x60, 0x60);
    assert_tables_private(&m);
}

/// Deterministic page-table contents for the differential walk test: mostly present
/// entries pointing at the other tables, with random permission, A/D and PS bits and now and
/// then a reserved or out-of-RAM address bit.
fn fill_tables(mem: &PhysMemory, seed: u64, legacy32: bool) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(s)
    };
    let per_page = if legacy32 { 1024 } else { 512 };
    for page in 1..=6u64 {
        for i in 0..per_page {
            let r = next();
            let target = 1 + (r >> 20) % 7; // tables 1..=6, or page 7 (zeros)
            let mut flags = (r & 0xffe) | u64::from((r >> 50) % 8 != 0);
            if (r >> 56) % 4 != 0 {
                flags |= 6; // RW and US more often
            }
            if (r >> 53) % 4 != 0 {
                flags &= !0x80; // PS less often
            }
            let hi = match (r >> 40) % 32 {
                0 => 1u64 << 63,
                1 => 1 << 51,
                2 => 1 << 40,
                3 => (r >> 12) & (0x1ff << 13),
                _ => 0,
            };
            let e = (target << 12) | flags | hi;
            if legacy32 {
                mem.write(page * PAGE_SIZE + 4 * i, &(e as u32).to_le_bytes())
                    .unwrap();
            } else {
                mem.write_u64(page * PAGE_SIZE + 8 * i, e).unwrap();
            }
        }
    }
}

/// `Cpu::test_walk`'s result.
type WalkResult = Result<(u64, bool, bool, bool), crate::Stop>;

/// One differential walk case: build the tables of `seed`, run one walk, and return its
/// result, CR2 and the memory afterwards (the private view for SEV-ES, whose page tables are
/// private memory: launched encrypted). With `cbits`, the C-bit is added at random to CR3
/// (long mode) and to the 8-byte entries after filling; the memory returned then has it
/// stripped again.
#[allow(clippy::too_many_arguments)]
fn walk_case(
    sev: bool,
    cbits: bool,
    seed: u64,
    lin: u64,
    mode: u8,
    acc: u8,
    user: bool,
    wp: bool,
    nxe: bool,
    pse: bool,
    cr3_page: u64,
) -> (WalkResult, u64, Vec<u8>) {
    let size = 32 * PAGE_SIZE;
    let mem = PhysMemory::new_owned(size).unwrap();
    fill_tables(&mem, seed, mode == 2);
    let esz = if mode == 2 { 4 } else { 8 };
    if cbits && esz == 8 {
        for a in (PAGE_SIZE..7 * PAGE_SIZE).step_by(8) {
            if mix(seed ^ a) & 1 != 0 {
                mem.write_u64(a, mem.read_u64(a).unwrap() | C).unwrap();
            }
        }
    }
    if sev {
        mem.enable_encryption(cipher()).unwrap();
        mem.encrypt_in_place(0, size).unwrap();
    }
    let cfg = if sev {
        sev_config()
    } else {
        CpuConfig::default()
    };
    let mut cpu = Cpu::new(cfg, mem.clone());
    let mut s = cpu.sregs();
    s.cr0 = cr0::PE | cr0::PG | cr0::ET | if wp { cr0::WP } else { 0 };
    s.cr3 = cr3_page * PAGE_SIZE + if mode == 1 { 0x20 } else { 0 };
    if cbits && mode == 0 && mix(seed) & 2 != 0 {
        s.cr3 |= C;
    }
    s.cr4 = match mode {
        0 | 1 => cr4::PAE,
        _ => {
            if pse {
                cr4::PSE
            } else {
                0
            }
        }
    };
    s.efer = if nxe { efer::NXE } else { 0 } | if mode == 0 { efer::LME } else { 0 };
    cpu.set_sregs(&s).unwrap();
    // Mostly canonical addresses in long mode.
    let l = match mode {
        0 if !lin.is_multiple_of(8) => ((lin << 16) as i64 >> 16) as u64,
        0 => lin,
        _ => lin & 0xffff_ffff,
    };
    let r = cpu.test_walk(l, acc == 1, acc == 2, user);
    let mut bytes = vec![0u8; size as usize];
    if sev {
        mem.read_private(0, &mut bytes).unwrap();
        for p in 0..size / PAGE_SIZE {
            assert!(mem.is_private(p), "page {p} turned shared");
        }
    } else {
        mem.read(0, &mut bytes).unwrap();
    }
    if cbits && esz == 8 {
        for q in bytes.chunks_exact_mut(8) {
            let e = u64::from_le_bytes(q.try_into().unwrap()) & !C;
            q.copy_from_slice(&e.to_le_bytes());
        }
    }
    (r, cpu.sregs().cr2, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The SEV-ES walk without C-bits (over page tables in private memory) gives exactly the
    /// plain walk's results (addresses, permissions, faults, CR2 and A/D updates) in every
    /// paging mode.
    #[test]
    fn walk_matches_plain_walk(
        seed in any::<u64>(),
        lin in any::<u64>(),
        mode in 0u8..3,
        acc in 0u8..3,
        user: bool,
        wp: bool,
        nxe: bool,
        pse: bool,
        cr3_page in 1u64..4,
    ) {
        let mut results = Vec::new();
        for sev in [false, true] {
            results.push(walk_case(
                sev, false, seed, lin, mode, acc, user, wp, nxe, pse, cr3_page,
            ));
        }
        let plain = &results[0];
        let sev = &results[1];
        prop_assert_eq!(&plain.0, &sev.0);
        prop_assert_eq!(plain.1, sev.1);
        prop_assert!(plain.2 == sev.2, "A/D updates differ");
    }

    /// C-bits in CR3 and in the non-leaf entries change nothing in an SEV-ES walk (tables
    /// are private whatever they say): the walk gives the plain walk's results over the
    /// same tables without C-bits, and a leaf's C-bit only selects the data view.
    #[test]
    fn table_c_bits_do_not_change_the_walk(
        seed in any::<u64>(),
        lin in any::<u64>(),
        mode in 0u8..2,
        acc in 0u8..3,
        user: bool,
        wp: bool,
        nxe: bool,
        cr3_page in 1u64..4,
    ) {
        let plain = walk_case(false, false, seed, lin, mode, acc, user, wp, nxe, false, cr3_page);
        let sev = walk_case(true, true, seed, lin, mode, acc, user, wp, nxe, false, cr3_page);
        let strip = |r: WalkResult| {
            r.map(|(g, w, x, _)| (g, w, x))
        };
        prop_assert_eq!(strip(plain.0), strip(sev.0));
        prop_assert_eq!(plain.1, sev.1);
        prop_assert!(plain.2 == sev.2, "A/D updates differ");
    }
}

// ---------------------------------------------------------------------- #VC events

#[test]
fn non_automatic_events_raise_vc() {
    use esvm_arch::msr::*;
    let none = Vec::new;
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, u64)> = vec![
        ("cpuid", none(), vec![0x0f, 0xa2], ec::CPUID),
        ("in al, dx", none(), vec![0xec], ec::IOIO),
        ("in eax, 0x80", none(), vec![0xe5, 0x80], ec::IOIO),
        ("out dx, al", none(), vec![0xee], ec::IOIO),
        ("out 0x80, al", none(), vec![0xe6, 0x80], ec::IOIO),
        ("rep insb", none(), vec![0xf3, 0x6c], ec::IOIO),
        ("outsw", none(), vec![0x66, 0x6f], ec::IOIO),
        ("rdtsc", none(), vec![0x0f, 0x31], ec::RDTSC),
        ("rdtscp", none(), vec![0x0f, 0x01, 0xf9], ec::RDTSCP),
        ("rdpmc", none(), vec![0x0f, 0x33], ec::RDPMC),
        ("invd", none(), vec![0x0f, 0x08], ec::INVD),
        ("wbinvd", none(), vec![0x0f, 0x09], ec::WBINVD),
        ("monitor", none(), vec![0x0f, 0x01, 0xc8], ec::MONITOR),
        ("mwait", none(), vec![0x0f, 0x01, 0xc9], ec::MWAIT),
        ("mov rax, dr7", none(), vec![0x0f, 0x21, 0xf8], ec::DR7_READ),
        (
            "mov dr7, rax",
            none(),
            vec![0x0f, 0x23, 0xf8],
            ec::DR7_WRITE,
        ),
        (
            "mov rax, dr5 (DR7 alias)",
            none(),
            vec![0x0f, 0x21, 0xe8],
            ec::DR7_READ,
        ),
        ("vmmcall", none(), vec![0x0f, 0x01, 0xd9], ec::VMMCALL),
        (
            "rdmsr APIC_BASE",
            mov_ecx(IA32_APIC_BASE),
            vec![0x0f, 0x32],
            ec::MSR,
        ),
        (
            "rdmsr TSC",
            mov_ecx(IA32_TIME_STAMP_COUNTER),
            vec![0x0f, 0x32],
            ec::MSR,
        ),
        (
            "wrmsr TSC",
            mov_ecx(IA32_TIME_STAMP_COUNTER),
            vec![0x0f, 0x30],
            ec::MSR,
        ),
        (
            "wrmsr APIC_BASE",
            mov_ecx(IA32_APIC_BASE),
            vec![0x0f, 0x30],
            ec::MSR,
        ),
        ("rdmsr unknown", mov_ecx(0x1234), vec![0x0f, 0x32], ec::MSR),
        (
            "wrmsr unknown",
            mov_ecx(0xc001_1234),
            vec![0x0f, 0x30],
            ec::MSR,
        ),
    ];
    let mut h = sev_harness(&[HLT]);
    for (name, setup, insn, code) in cases {
        // Two NOPs and the setup run first, so RIP must point at the instruction itself,
        // not at the block start.
        reload(&mut h, &prog(&[&[NOP, NOP], &setup, &insn]));
        let before = h.cpu.instructions_retired();
        assert_eq!(h.run(), Exit::Hlt, "{name}");
        let rip = CODE + 2 + setup.len() as u64;
        assert_eq!(caught(&h), Some((vector::VC, Some(code), rip)), "{name}");
        // Retired: the NOPs, the setup and the stub's HLT, not the #VC instruction.
        let setup_insns = !setup.is_empty() as u64;
        assert_eq!(
            h.cpu.instructions_retired() - before,
            2 + setup_insns + 1,
            "{name}"
        );
    }
}

/// The optional events are the hypervisor's choice (the VMCB intercept set): with KVM's
/// SEV-ES defaults RDTSC and RDTSCP execute in the guest (the TSC, TSC_AUX from the VMSA)
/// while WBINVD and DR7 still raise #VC; with nothing intercepted DR7 is accessed directly.
#[test]
fn the_hypervisors_intercept_set_decides_which_events_raise_vc() {
    let mem = PhysMemory::new_owned(MEM).unwrap();
    let mut h = sev_harness_with(mem, &[HLT], sev_config_with(VcIntercepts::KVM_SEV_ES));
    let mut msrs = h.cpu.msrs();
    msrs.tsc_aux = 0x1234;
    h.cpu.set_msrs(&msrs);
    // RDTSC; MOV R8, RAX; RDTSCP; HLT
    reload(
        &mut h,
        &prog(&[
            &[0x0f, 0x31],
            &[0x49, 0x89, 0xc0],
            &[0x0f, 0x01, 0xf9],
            &[HLT],
        ]),
    );
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None, "no #VC for RDTSC/RDTSCP");
    let r = h.cpu.regs();
    let tsc = (r.gpr[2] << 32) | (r.gpr[0] & 0xffff_ffff);
    assert!(tsc > r.gpr[8], "{tsc:#x} after {:#x}", r.gpr[8]);
    assert_eq!(r.gpr[1], 0x1234, "RDTSCP's ECX is TSC_AUX");
    for (name, insn, code) in [
        ("wbinvd", vec![0x0f, 0x09], ec::WBINVD),
        ("mov rax, dr7", vec![0x0f, 0x21, 0xf8], ec::DR7_READ),
    ] {
        reload(&mut h, &prog(&[&insn]));
        assert_eq!(h.run(), Exit::Hlt, "{name}");
        assert_eq!(caught(&h), Some((vector::VC, Some(code), CODE)), "{name}");
    }
    let none = VcIntercepts {
        rdtsc: false,
        rdtscp: false,
        invd: false,
        wbinvd: false,
        dr7_read: false,
        dr7_write: false,
    };
    let mem = PhysMemory::new_owned(MEM).unwrap();
    let mut h = sev_harness_with(mem, &[HLT], sev_config_with(none));
    // MOV RAX, 0x455; MOV DR7, RAX; MOV RBX, DR7; WBINVD; HLT
    reload(
        &mut h,
        &prog(&[
            &[0x48, 0xc7, 0xc0, 0x55, 0x04, 0x00, 0x00],
            &[0x0f, 0x23, 0xf8],
            &[0x0f, 0x21, 0xfb],
            &[0x0f, 0x09],
            &[HLT],
        ]),
    );
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None, "nothing intercepted: no #VC");
    assert_eq!(h.cpu.regs().gpr[3], 0x455, "DR7 written and read directly");
}

#[test]
fn vc_checks_come_after_the_usual_faults() {
    // At CPL 3 (IOPL 0, CR4.TSD set) these fault as on a plain vCPU instead of raising #VC.
    let mut h = sev_harness(&[HLT]);
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("in al, dx", vec![0xec], vector::GP),
        ("rdmsr", vec![0x0f, 0x32], vector::GP),
        ("rdtsc", vec![0x0f, 0x31], vector::GP),
        ("rdpmc", vec![0x0f, 0x33], vector::GP),
        ("monitor", vec![0x0f, 0x01, 0xc8], vector::UD),
        ("wbinvd", vec![0x0f, 0x09], vector::GP),
        ("mov rax, dr7", vec![0x0f, 0x21, 0xf8], vector::GP),
    ];
    for (name, insn, v) in cases {
        reload(&mut h, &prog(&[&insn]));
        let mut s = h.cpu.sregs();
        s.cr4 |= cr4::TSD;
        h.cpu.set_sregs(&s).unwrap();
        h.enter_user(CODE, STACK_TOP - 0x1000, rflags::FIXED);
        assert_eq!(h.run(), Exit::Hlt, "{name}");
        let c = caught(&h).expect("an exception");
        assert_eq!((c.0, c.2), (v, CODE), "{name}");
    }
    // VMMCALL raises #VC at any CPL.
    reload(&mut h, &prog(&[&[0x0f, 0x01, 0xd9]]));
    h.enter_user(CODE, STACK_TOP - 0x1000, rflags::FIXED);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), Some((vector::VC, Some(ec::VMMCALL), CODE)));
}

#[test]
fn vmsa_msrs_ghcb_msr_and_sev_status_are_direct() {
    use esvm_arch::msr::*;
    let code = prog(&[
        // GHCB MSR := 0x1234_5000_0000_0002 and read back into RBX.
        &mov_ecx(SEV_GHCB),
        &mov_eax(0x0000_0002),
        &[0xba],
        &0x1234_5000u32.to_le_bytes(), // mov edx, imm32
        &[0x0f, 0x30],
        &[0x31, 0xc0, 0x31, 0xd2], // xor eax, eax; xor edx, edx
        &[0x0f, 0x32],
        &[0x48, 0xc1, 0xe2, 0x20], // shl rdx, 32
        &[0x48, 0x09, 0xd0],       // or rax, rdx
        &[0x48, 0x89, 0xc3],       // mov rbx, rax
        // SEV_STATUS into RSI.
        &mov_ecx(SEV_STATUS),
        &[0x0f, 0x32],
        &[0x48, 0x89, 0xc6], // mov rsi, rax
        // LSTAR := 0xffff_8000_0000_1000 and back into RDI (high half).
        &mov_ecx(IA32_LSTAR),
        &mov_eax(0x1000),
        &[0xba],
        &0xffff_8000u32.to_le_bytes(),
        &[0x0f, 0x30],
        &[0x31, 0xd2],
        &[0x0f, 0x32],
        &[0x48, 0x89, 0xd7], // mov rdi, rdx
        // EFER into R8.
        &mov_ecx(IA32_EFER),
        &[0x0f, 0x32],
        &[0x49, 0x89, 0xc0], // mov r8, rax
    ]);
    let mut h = sev_harness(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
    let r = h.cpu.regs();
    assert_eq!(r.gpr[3], 0x1234_5000_0000_0002);
    assert_eq!(h.cpu.ghcb_msr(), 0x1234_5000_0000_0002);
    assert_eq!(r.gpr[6], 3);
    assert_eq!(r.gpr[7], 0xffff_8000);
    assert_eq!(h.cpu.msrs().lstar, 0xffff_8000_0000_1000);
    assert_eq!(r.gpr[8], h.cpu.sregs().efer);
    // Writing SEV_STATUS is #GP.
    reload(&mut h, &prog(&[&mov_ecx(SEV_STATUS), &[0x0f, 0x30]]));
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), Some((vector::GP, Some(0), CODE + 5)));
}

#[test]
fn cpuid_and_msr_intercepts_do_not_apply() {
    let mem = PhysMemory::new_owned(MEM).unwrap();
    let mut h = sev_harness_on(mem, &prog(&[&[0x0f, 0xa2]]));
    h.cpu.config.cpuid_intercepts = vec![0];
    h.cpu.config.msr_intercepts = vec![esvm_arch::msr::IA32_EFER];
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), Some((vector::VC, Some(ec::CPUID), CODE)));
}

#[test]
fn plain_mode_keeps_ud_for_sev_instructions() {
    for insn in [
        &[0xf3, 0x0f, 0x01, 0xd9][..],
        &[0x0f, 0x01, 0xd9],
        &[0x0f, 0x01, 0xc8],
        &[0x0f, 0x33],
    ] {
        let mut h = Harness::new(MEM);
        h.load(&prog(&[insn]));
        assert_eq!(h.run(), Exit::Hlt);
        let c = h.exception().expect("an exception");
        assert_eq!((c.vector, c.rip), (vector::UD, CODE), "{insn:02x?}");
    }
}

// ---------------------------------------------------------------------- VMGEXIT, traps

#[test]
fn vmgexit_exits_after_retiring_and_resumes() {
    use esvm_arch::msr::SEV_GHCB;
    for vmgexit in [[0xf3u8, 0x0f, 0x01, 0xd9], [0xf2, 0x0f, 0x01, 0xd9]] {
        let code = prog(&[
            &mov_ecx(SEV_GHCB),
            &mov_eax(0x0000_0004),
            &[0x31, 0xd2],
            &[0x0f, 0x30],
            &vmgexit,
            &[0x0f, 0x32], // rdmsr GHCB
            &[0x48, 0x89, 0xc3],
        ]);
        let mut h = sev_harness(&code);
        let at = CODE + 5 + 5 + 2 + 2;
        assert_eq!(h.run(), Exit::Vmgexit { ghcb_msr: 4 });
        assert_eq!(h.cpu.regs().rip, at + 4, "VMGEXIT retired");
        h.cpu.set_ghcb_msr(0x5);
        assert_eq!(h.run(), Exit::Hlt);
        assert_eq!(caught(&h), None);
        assert_eq!(
            h.cpu.regs().gpr[3],
            5,
            "the guest sees the hypervisor's response"
        );
    }
}

#[test]
fn write_traps_carry_new_values_after_retirement() {
    use esvm_arch::msr::IA32_EFER;
    let mov_cr0 = [0x0f, 0x22, 0xc0];
    let mov_cr4 = [0x0f, 0x22, 0xe0];
    let mov_cr8 = [0x44, 0x0f, 0x22, 0xc0];
    let rd_cr0 = [0x0f, 0x20, 0xc0];
    let rd_cr4 = [0x0f, 0x20, 0xe0];
    let code = prog(&[
        &rd_cr0,
        &[0x48, 0x0d],
        &(cr0::AM as u32).to_le_bytes(), // or rax, AM
        &mov_cr0,
        &rd_cr4,
        &[0x48, 0x0d],
        &(cr4::PGE as u32).to_le_bytes(),
        &mov_cr4,
        &mov_eax(9),
        &mov_cr8,
        &mov_ecx(IA32_EFER),
        &[0x0f, 0x32],
        &[0x48, 0x83, 0xe0, 0xfe], // and rax, ~1 (clear SCE)
        &[0x0f, 0x30],
        &[0x0f, 0x06], // clts
        &mov_eax(9),
        &[0x0f, 0x01, 0xf0], // lmsw ax
        &mov_cr8,            // same value again: still a trap
    ]);
    let mut h = sev_harness(&code);
    let s0 = h.cpu.sregs();
    let efer0 = s0.efer;
    let x = h.run();
    assert_eq!(
        x,
        Exit::WriteTrap {
            reg: TrapReg::Cr0,
            value: s0.cr0 | cr0::AM,
            efer: efer0
        }
    );
    assert_eq!(h.cpu.sregs().cr0, s0.cr0 | cr0::AM, "retired");
    assert_eq!(h.cpu.regs().rip, CODE + 3 + 6 + 3);
    assert_eq!(
        h.run(),
        Exit::WriteTrap {
            reg: TrapReg::Cr4,
            value: s0.cr4 | cr4::PGE,
            efer: efer0
        }
    );
    assert_eq!(
        h.run(),
        Exit::WriteTrap {
            reg: TrapReg::Cr8,
            value: 9,
            efer: efer0
        }
    );
    assert_eq!(h.cpu.sregs().cr8, 9);
    let efer1 = efer0 & !efer::SCE;
    assert_eq!(
        h.run(),
        Exit::WriteTrap {
            reg: TrapReg::Efer,
            value: efer1,
            efer: efer1
        }
    );
    let cr0_now = h.cpu.sregs().cr0;
    assert_eq!(
        h.run(),
        Exit::WriteTrap {
            reg: TrapReg::Cr0,
            value: cr0_now & !cr0::TS,
            efer: efer1
        }
    );
    // LMSW AX with AX = 9: CR0[3:0] = TS | PE.
    let x = h.run();
    let cr0_after = h.cpu.sregs().cr0;
    assert_eq!(
        x,
        Exit::WriteTrap {
            reg: TrapReg::Cr0,
            value: cr0_after,
            efer: efer1
        }
    );
    assert_eq!(cr0_after & 0xf, 0x9);
    assert_eq!(
        h.run(),
        Exit::WriteTrap {
            reg: TrapReg::Cr8,
            value: 9,
            efer: efer1
        }
    );
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), None);
}

#[test]
fn faulting_cr_writes_do_not_trap() {
    // MOV CR4 with an unsupported bit: #GP, no trap.
    let code = prog(&[&mov_rax(1 << 22), &[0x0f, 0x22, 0xe0]]);
    let mut h = sev_harness(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(caught(&h), Some((vector::GP, Some(0), CODE + 10)));
}

#[test]
fn vc_with_no_idt_is_a_shutdown() {
    let mut h = sev_harness(&prog(&[&[0x0f, 0xa2]]));
    let mut s = h.cpu.sregs();
    s.idt.limit = 0;
    h.cpu.set_sregs(&s).unwrap();
    assert!(matches!(h.run(), Exit::Shutdown { .. }));
}

// ---------------------------------------------------------------------- VMSA

#[test]
fn vmsa_layout_of_state_and_pending_events() {
    let mut h = sev_harness(&[HLT]);
    let cpu = &mut h.cpu;
    let mut r = cpu.regs();
    r.gpr[0] = 0xaaaa;
    r.gpr[4] = 0x8_0000;
    r.gpr[15] = 0xffff;
    r.rip = 0x10_0042;
    cpu.set_regs(&r);
    let mut s = cpu.sregs();
    s.cr8 = 7;
    s.cr2 = 0x1111;
    cpu.set_sregs(&s).unwrap();
    cpu.set_events(&PendingEvents {
        exception: Some(PendingException {
            vector: 14,
            error_code: Some(6),
            cr2: Some(0xdead_b000),
        }),
        interrupt: Some(0x41),
        nmi_pending: true,
        nmi_masked: false,
        interrupt_shadow: true,
        halted: true,
    });
    let v = cpu.to_vmsa();
    assert_eq!(v.u64_at(offset::RAX), 0xaaaa);
    assert_eq!(v.u64_at(offset::RSP), 0x8_0000);
    assert_eq!(v.u64_at(offset::R15), 0xffff);
    assert_eq!(v.u64_at(offset::RIP), 0x10_0042);
    assert_eq!(v.u64_at(offset::CR3), PML4 | C);
    assert_eq!(v.u8_at(offset::CPL), 0);
    assert_eq!(v.cr8(), 7);
    assert_eq!(v.sev_features(), 1 << esvm_arch::vmsa::SEV_FEATURE_ES);
    assert_eq!(v.u64_at(offset::CR2), 0xdead_b000, "the pending #PF's CR2");
    assert_eq!(
        v.u64_at(vmsa_layout::EVENT_INJ),
        (1 << 31) | (3 << 8) | (1 << 11) | 14 | (6 << 32)
    );
    assert_eq!(
        v.u64_at(vmsa_layout::VINTR_CTRL),
        7 | (1 << 8) | (1 << 11) | (0x41 << 32)
    );
    assert_eq!(v.u64_at(vmsa_layout::RUN_STATE), 3);
    // Loading it back into another vCPU resumes the same pending state.
    let mut other = Cpu::new(sev_config(), PhysMemory::new_owned(MEM).unwrap());
    other.load_vmsa(&v).unwrap();
    let e = other.events();
    assert_eq!(
        e.exception,
        Some(PendingException {
            vector: 14,
            error_code: Some(6),
            cr2: None
        })
    );
    assert_eq!(other.sregs().cr2, 0xdead_b000);
    assert_eq!(e.interrupt, Some(0x41));
    assert!(e.nmi_pending && !e.nmi_masked && e.interrupt_shadow && e.halted);
    assert_eq!(other.to_vmsa(), v);
}

#[test]
fn load_vmsa_refuses_what_it_cannot_represent() {
    let mut h = sev_harness(&[HLT]);
    let good = h.cpu.to_vmsa();
    let before = h.cpu.to_vmsa();
    let bad: Vec<(usize, u64)> = vec![
        (offset::SEV_FEATURES, 0),
        (offset::SEV_FEATURES, 3),
        (vmsa_layout::EVENT_INJ, 5),
        (
            vmsa_layout::EVENT_INJ,
            (1 << 31) | (3 << 8) | 14 | (2 << 32),
        ),
        (vmsa_layout::EVENT_INJ, (1 << 31) | (4 << 8) | 14),
        (vmsa_layout::VINTR_CTRL, 0x10),
        (vmsa_layout::VINTR_CTRL, 0x41 << 32),
        (vmsa_layout::RUN_STATE, 4),
        (offset::XCR0, 2),
        (offset::MXCSR, 1 << 20),
    ];
    for (off, val) in bad {
        let mut v: Vmsa = good.clone();
        if off == offset::MXCSR {
            v.set_u32(off, val as u32);
        } else {
            v.set_u64(off, val);
        }
        let mut cpu = Cpu::new(sev_config(), PhysMemory::new_owned(MEM).unwrap());
        let orig = cpu.to_vmsa();
        assert!(cpu.load_vmsa(&v).is_err(), "offset {off:#x} = {val:#x}");
        assert_eq!(cpu.to_vmsa(), orig, "a refused VMSA changes nothing");
    }
    // Long-mode paging without PAE.
    let mut v = good.clone();
    v.set_u64(offset::CR4, 0);
    assert!(h.cpu.load_vmsa(&v).is_err());
    assert_eq!(h.cpu.to_vmsa(), before);
}

fn arb_regs() -> impl Strategy<Value = Regs> {
    (
        prop::array::uniform16(any::<u64>()),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(gpr, rip, fl)| Regs {
            gpr,
            rip,
            rflags: (fl & (rflags::ARITH | rflags::DF | rflags::IF | rflags::TF | rflags::AC))
                | rflags::FIXED,
        })
}

fn arb_fpu() -> impl Strategy<Value = esvm_arch::FpuState> {
    (
        (any::<u16>(), any::<u16>(), any::<u8>(), any::<u16>()),
        (any::<u64>(), any::<u64>(), any::<u16>()),
        prop::array::uniform8(prop::array::uniform10(any::<u8>())),
        prop::array::uniform16(any::<u128>()),
    )
        .prop_map(|((fcw, fsw, ftw, fop), (fip, fdp, mxcsr), st, xmm)| {
            let mut f = esvm_arch::FpuState {
                fcw,
                fsw,
                ftw,
                fop,
                fip,
                fdp,
                mxcsr: mxcsr as u32,
                ..esvm_arch::FpuState::default()
            };
            for (slot, v) in f.st.iter_mut().zip(st.iter()) {
                slot[..10].copy_from_slice(v);
            }
            for (slot, v) in f.xmm.iter_mut().zip(xmm.iter()) {
                *slot = v.to_le_bytes();
            }
            f
        })
}

fn arb_events() -> impl Strategy<Value = PendingEvents> {
    (
        prop::option::of((
            0u8..32,
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u64>()),
        )),
        prop::option::of(32u8..=255),
        any::<[bool; 4]>(),
    )
        .prop_map(|(exc, interrupt, [a, b, c, d])| PendingEvents {
            exception: exc.map(|(vector, error_code, cr2)| PendingException {
                vector,
                error_code,
                cr2,
            }),
            interrupt,
            nmi_pending: a,
            nmi_masked: b,
            interrupt_shadow: c,
            halted: d,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// to_vmsa(load_vmsa(to_vmsa(cpu))) == to_vmsa(cpu), and the loaded vCPU has the same
    /// state (up to the documented CR2 normalisation of a pending exception).
    #[test]
    fn vmsa_roundtrip(
        regs in arb_regs(),
        fpu in arb_fpu(),
        events in arb_events(),
        msrs in prop::array::uniform10(any::<u64>()),
        dbg in prop::array::uniform6(any::<u64>()),
        mode in 0u8..3,
        cr2: u64,
        cr8 in 0u64..16,
        efer_bits in 0u64..4,
        sse: bool,
    ) {
        let mem = PhysMemory::new_owned(1 << 20).unwrap();
        let mut h = Harness::with_memory(mem, sev_config());
        match mode {
            0 => {}
            1 => h.enter_user(0x40_0000, 0x50_0000, rflags::FIXED),
            _ => {
                h.cpu.restore(&esvm_arch::VcpuSnapshot::reset()).unwrap();
            }
        }
        let cpu = &mut h.cpu;
        cpu.set_regs(&regs);
        let mut s = cpu.sregs();
        s.cr2 = cr2;
        s.cr8 = cr8;
        if mode != 2 {
            s.efer = (s.efer & !(efer::SCE | efer::NXE))
                | if efer_bits & 1 != 0 { efer::SCE } else { 0 }
                | if efer_bits & 2 != 0 { efer::NXE } else { 0 };
        }
        cpu.set_sregs(&s).unwrap();
        let mut f = fpu;
        f.mxcsr &= crate::exec::sse::MXCSR_MASK;
        cpu.set_fpu(&f);
        cpu.set_xcr0(if sse { 3 } else { 1 }).unwrap();
        let m = esvm_arch::MsrState {
            star: msrs[0],
            lstar: msrs[1],
            cstar: msrs[2],
            sfmask: msrs[3],
            kernel_gs_base: msrs[4],
            sysenter_cs: msrs[5],
            sysenter_esp: msrs[6],
            sysenter_eip: msrs[7],
            pat: msrs[8],
            tsc_aux: msrs[9] & 0xffff_ffff,
            mtrr: Default::default(),
        };
        cpu.set_msrs(&m);
        cpu.set_debug_regs(&esvm_arch::DebugRegs {
            db: [dbg[0], dbg[1], dbg[2], dbg[3]],
            dr6: dbg[4],
            dr7: dbg[5],
        });
        cpu.set_events(&events);
        let v1 = cpu.to_vmsa();
        let mut other = Cpu::new(sev_config(), PhysMemory::new_owned(1 << 20).unwrap());
        other.load_vmsa(&v1).unwrap();
        let v2 = other.to_vmsa();
        prop_assert_eq!(&v1, &v2);
        prop_assert!(v1.as_bytes() == v2.as_bytes());
        // The loaded vCPU's state.
        prop_assert_eq!(other.regs(), cpu.regs());
        let mut s1 = cpu.sregs();
        if let Some(c) = events.exception.and_then(|e| e.cr2) {
            s1.cr2 = c;
        }
        s1.apic_base = other.sregs().apic_base;
        prop_assert_eq!(other.sregs(), s1);
        prop_assert_eq!(other.msrs(), cpu.msrs());
        prop_assert_eq!(other.debug_regs(), cpu.debug_regs());
        prop_assert_eq!(other.xcr0(), cpu.xcr0());
        prop_assert_eq!(other.fpu(), cpu.fpu());
        prop_assert_eq!(other.cpl, cpu.cpl);
        let mut e1 = events;
        if let Some(e) = &mut e1.exception {
            e.cr2 = None;
        }
        prop_assert_eq!(other.events(), e1);
    }
}
