//! The decoded-code cache across address-space switches: a linear address that two page
//! tables map to different code runs the code of the current one.

use esvm_arch::bits::cr4;
use esvm_cpu::testutil::{Harness, CODE, PML4};
use esvm_cpu::Exit;
use iced_x86::code_asm::*;

/// Where both address spaces put their code: PML4 slot 1, outside the identity map.
const SHARED_LIN: u64 = 0x80_0000_0000;
/// The two physical pages behind it, and the page tables of the second address space.
const CODE_A: u64 = 0x30_0000;
const CODE_B: u64 = 0x30_1000;
const ROOT_B: u64 = 0x31_0000;

fn assemble(at: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}

/// Page tables of a second address space: the harness's identity map (PML4 slot 0, shared)
/// and `SHARED_LIN` -> `CODE_B` (4 KiB, present, writable, not global).
fn second_address_space(h: &Harness) {
    let m = h.mem();
    let (pdpt, pd, pt) = (ROOT_B + 0x1000, ROOT_B + 0x2000, ROOT_B + 0x3000);
    m.write(ROOT_B, &[0u8; 0x4000]).unwrap();
    m.write_u64(ROOT_B, m.read_u64(PML4).unwrap()).unwrap();
    m.write_u64(ROOT_B + 8, pdpt | 3).unwrap();
    m.write_u64(pdpt, pd | 3).unwrap();
    m.write_u64(pd, pt | 3).unwrap();
    m.write_u64(pt, CODE_B | 3).unwrap();
}

/// A lookup cached after a full flush of the linear lookups (INVLPG here) must not survive
/// the next MOV to CR3 with CR4.PGE set when its page is not global. (It did: after a full
/// flush the global and non-global generations were the same number, so the entry passed
/// for a global one; Linux then ran a static binary's code at an address where the next
/// process, after the switch, had other code.)
#[test]
fn mov_cr3_forgets_lookups_cached_after_a_full_flush() {
    let mut h = Harness::new(16 << 20);
    let mut pool = 0x38_0000;
    h.map_4k(SHARED_LIN, CODE_A, 2, &mut pool);
    second_address_space(&h);
    let m = h.mem().clone();
    m.write(
        CODE_A,
        &assemble(SHARED_LIN, |a| {
            a.mov(eax, 0xaaaau32)?;
            a.ret()
        }),
    )
    .unwrap();
    m.write(
        CODE_B,
        &assemble(SHARED_LIN, |a| {
            a.mov(eax, 0xbbbbu32)?;
            a.ret()
        }),
    )
    .unwrap();
    let code = assemble(CODE, |a| {
        a.mov(rbx, SHARED_LIN)?;
        a.call(rbx)?; // cached for address space A
        a.mov(r12, rax)?;
        a.invlpg(byte_ptr(0x5000))?; // an unrelated page: flushes every linear lookup
        a.call(rbx)?; // cached again, after the full flush
        a.mov(r13, rax)?;
        a.mov(rax, ROOT_B)?;
        a.mov(cr3, rax)?; // address space B: non-global lookups are stale
        a.call(rbx)?;
        a.hlt()
    });
    let mut s = h.cpu.sregs();
    s.cr4 |= cr4::PGE;
    h.cpu.set_sregs(&s).unwrap();
    h.load(&code);
    assert_eq!(h.run(), Exit::Hlt);
    let r = h.cpu.regs();
    assert_eq!((r.gpr[12], r.gpr[13]), (0xaaaa, 0xaaaa), "address space A");
    assert_eq!(
        r.gpr[0], 0xbbbb,
        "after MOV to CR3 the code of address space B runs"
    );
}
