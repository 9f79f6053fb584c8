//! Unit tests of the interpreter (programs assembled with iced's code_asm).

use crate::testutil::*;
use crate::Exit;
use iced_x86::code_asm::*;

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

fn run64(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Harness {
    let code = asm(|a| {
        f(a)?;
        a.hlt()
    });
    let mut h = Harness::new(16 << 20);
    h.load(&code);
    let x = h.run();
    assert_eq!(x, Exit::Hlt, "run ended with {x:?}");
    h
}

#[test]
fn basic_alu() {
    let h = run64(|a| {
        a.mov(rax, 5u64)?;
        a.mov(rbx, 7u64)?;
        a.add(rax, rbx)?;
        a.imul_3(rcx, rax, 3)?;
        a.sub(rcx, 1)?;
        Ok(())
    });
    assert!(h.exception().is_none(), "{:?}", h.exception());
    let r = h.cpu.regs();
    assert_eq!(r.gpr[0], 12);
    assert_eq!(r.gpr[1], 35);
}

mod host;
mod mmx_host;
mod x87_host;

fn harness(code: &[u8]) -> Harness {
    let mut h = Harness::new(16 << 20);
    h.load(code);
    h
}

fn expect_exc(h: &mut Harness, vector: u8, ec: Option<u32>) -> Caught {
    let x = h.run();
    assert_eq!(x, Exit::Hlt, "run ended with {x:?}");
    let c = h
        .exception()
        .unwrap_or_else(|| panic!("no exception, rip {:#x}", h.cpu.regs().rip));
    assert_eq!((c.vector, c.error_code), (vector, ec), "{c:x?}");
    c
}

#[test]
fn memory_ops_and_stack() {
    let h = run64(|a| {
        a.mov(rbx, DATA)?;
        a.mov(qword_ptr(rbx + 8), 0x1234_5678)?;
        a.mov(rax, qword_ptr(rbx + 8))?;
        a.add(qword_ptr(rbx + 8), rax)?;
        a.push(rax)?;
        a.push(0x55)?;
        a.pop(rcx)?;
        a.pop(rdx)?;
        a.lea(rsi, qword_ptr(rbx + rcx * 4 + 3))?;
        a.movzx(edi, byte_ptr(rbx + 9))?;
        a.mov(byte_ptr(rbx + 0x0fff), 0xaau32)?;
        a.mov(dword_ptr(rbx + 0x0ffe), 0x1122_3344u32)?; // crosses a page
        a.mov(r8d, dword_ptr(rbx + 0x0ffe))?;
        Ok(())
    });
    assert!(h.exception().is_none());
    let r = h.cpu.regs();
    assert_eq!(r.gpr[0], 0x1234_5678);
    assert_eq!(h.mem().read_u64(DATA + 8).unwrap(), 0x2468_acf0);
    assert_eq!(r.gpr[1], 0x55);
    assert_eq!(r.gpr[2], 0x1234_5678);
    assert_eq!(r.gpr[6], DATA + 0x55 * 4 + 3);
    assert_eq!(r.gpr[7], 0xac);
    assert_eq!(r.gpr[8], 0x1122_3344);
    assert_eq!(r.gpr[4], STACK_TOP);
}

#[test]
fn calls_loops_and_branches() {
    let h = run64(|a| {
        let mut f = a.create_label();
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 10)?;
        a.set_label(&mut lp)?;
        a.call(f)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.jmp(done)?;
        a.set_label(&mut f)?;
        a.add(eax, ecx)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.mov(ecx, 100)?;
        let mut l2 = a.create_label();
        a.set_label(&mut l2)?;
        a.loop_(l2)?;
        Ok(())
    });
    assert!(h.exception().is_none());
    assert_eq!(h.cpu.regs().gpr[0], 55);
}

/// Conditional branches inside blocks: taken ones leave the block, fall-through continues
/// it; the result, RIP at a fault and the retired count are the same when the code runs
/// one instruction per `run` call.
#[test]
fn jcc_inside_blocks() {
    let code = asm(|a| {
        let mut lp = a.create_label();
        let mut skip = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 10)?;
        a.set_label(&mut lp)?;
        a.add(eax, 1)?;
        a.cmp(ecx, 5)?;
        a.je(skip)?;
        a.add(eax, 100)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.cmp(eax, 910)?;
        a.jne(skip)?; // not taken
        a.mov(rbx, 0x8000_0000_0000u64)?;
        a.mov(rdx, qword_ptr(rbx))?; // #GP: non-canonical
        a.hlt()
    });
    let mut free = harness(&code);
    let c = expect_exc(&mut free, 13, Some(0));
    let mut stepped = harness(&code);
    let mut steps = 0;
    while stepped.cpu.run(1) == Exit::BudgetExhausted {
        steps += 1;
        assert!(steps < 1000);
    }
    let c2 = stepped.exception().expect("the #GP");
    assert_eq!(c, c2);
    assert_eq!(c.rip, CODE + code.len() as u64 - 4, "the faulting MOV");
    assert_eq!(free.cpu.regs().gpr[0], 910);
    assert_eq!(stepped.cpu.regs().gpr[0], 910);
    assert_eq!(
        free.cpu.instructions_retired(),
        stepped.cpu.instructions_retired()
    );
}

/// A CMP + Jcc pair (fused into one dispatch in 64-bit mode) whose taken branch leaves the
/// canonical range: #GP at the Jcc, with the CMP retired; and the same pair run one
/// instruction per `run` call.
#[test]
fn fused_cmp_jcc_to_non_canonical_target() {
    const V: u64 = 0x7fff_ffff_f000;
    // At V + 0xff0: cmp eax, eax (39 c0); je rel32 +0x100 (0f 84 ..) -> non-canonical.
    let mut page = vec![0x90u8; 0x1000];
    page[0xff0..0xff8].copy_from_slice(&[0x39, 0xc0, 0x0f, 0x84, 0x00, 0x01, 0x00, 0x00]);
    let mut retired = Vec::new();
    for step in [false, true] {
        let mut h = harness(&[0xf4]);
        let mut pool = 0x80_0000;
        h.map_4k(V, DATA, 2, &mut pool);
        h.mem().write(DATA, &page).unwrap();
        h.restart(V + 0xff0);
        if step {
            assert_eq!(h.cpu.run(1), Exit::BudgetExhausted);
            assert_eq!(h.cpu.regs().rip, V + 0xff2);
        }
        let c = expect_exc(&mut h, 13, Some(0));
        assert_eq!(c.rip, V + 0xff2, "the Jcc faults (step {step})");
        retired.push(h.cpu.instructions_retired());
    }
    // The CMP and the stub's HLT.
    assert_eq!(retired, [2, 2]);
    // Not taken, then taken within range: the pair still works as two instructions.
    let h = run64(|a| {
        let mut l = a.create_label();
        let mut out = a.create_label();
        a.xor(ecx, ecx)?;
        a.mov(eax, 3)?;
        a.set_label(&mut l)?;
        a.inc(ecx)?;
        a.cmp(ecx, eax)?;
        a.jne(l)?;
        a.test(ecx, 4)?;
        a.jnz(out)?;
        a.mov(edx, 7)?;
        a.set_label(&mut out)?;
        Ok(())
    });
    assert_eq!(h.cpu.regs().gpr[1], 3);
    assert_eq!(h.cpu.regs().gpr[2], 7);
}

#[test]
fn string_ops() {
    let h = run64(|a| {
        a.mov(rdi, DATA)?;
        a.mov(eax, 0x41)?;
        a.mov(ecx, 100)?;
        a.rep().stosb()?;
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x1000)?;
        a.mov(ecx, 13)?;
        a.rep().movsq()?;
        a.mov(rdi, DATA)?;
        a.mov(byte_ptr(rdi + 50), 0x42u32)?;
        a.mov(ecx, 100)?;
        a.mov(al, 0x42)?;
        a.repne().scasb()?;
        a.mov(r8, rcx)?;
        a.mov(r9, rdi)?;
        // Backwards copy with DF=1.
        a.std()?;
        a.mov(rsi, DATA + 7)?;
        a.mov(rdi, DATA + 0x2007)?;
        a.mov(ecx, 8)?;
        a.rep().movsb()?;
        a.cld()?;
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x2000)?;
        a.mov(ecx, 8)?;
        a.repe().cmpsb()?;
        a.mov(r10, rcx)?;
        a.mov(rsi, DATA + 48)?;
        a.lodsd()?;
        Ok(())
    });
    assert!(h.exception().is_none());
    let r = h.cpu.regs();
    let mut b = [0u8; 104];
    h.mem().read(DATA + 0x1000, &mut b).unwrap();
    assert!(b[..100].iter().all(|&x| x == 0x41) && b[100..].iter().all(|&x| x == 0));
    assert_eq!(r.gpr[8], 49, "rcx after repne scasb");
    assert_eq!(r.gpr[9], DATA + 51);
    assert_eq!(r.gpr[10], 0, "all 8 bytes equal");
    assert_eq!(r.gpr[0], 0x4142_4141);
    assert_eq!(r.gpr[7], DATA + 0x2008);
}

/// REP MOVS/STOS against an element-by-element reference model: every element size,
/// both directions, overlapping and disjoint runs, runs crossing pages that are not
/// physically contiguous, and a run ending in a page fault (registers and memory as left
/// by the last element before the fault).
#[test]
fn rep_string_runs_match_element_model() {
    const V: u64 = 0x4000_0000;
    // Four virtually contiguous pages on scattered physical pages; the fifth is unmapped.
    const PHYS: [u64; 4] = [DATA + 0x3000, DATA + 0x1000, DATA + 0x7000, DATA + 0x5000];
    let phys = |v: u64| PHYS[((v - V) >> 12) as usize] + (v & 0xfff);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..400 {
        let movs = case % 2 == 0;
        let sz = 1u64 << (rnd() % 4);
        let back = rnd() % 3 == 0;
        let fault = case % 16 == 1;
        // Start addresses near page boundaries or anywhere; the source sometimes a few
        // bytes away from the destination (overlap).
        let pick = |r: u64| {
            let page = r % 4;
            let off = match (r >> 8) % 3 {
                0 => 0x1000 - ((r >> 16) % 24),
                1 => (r >> 16) % 24,
                _ => (r >> 16) % 0x1000,
            };
            V + page * 0x1000 + (off & 0xfff)
        };
        let mut dst0 = pick(rnd());
        let mut src0 = if rnd() % 2 == 0 {
            dst0.wrapping_add((rnd() % 33).wrapping_sub(16))
        } else {
            pick(rnd())
        };
        let (lo, hi) = (V, V + 0x4000);
        src0 = src0.clamp(lo, hi - 8);
        dst0 = dst0.clamp(lo, hi - 8);
        // Elements that stay inside the mapped pages for both pointers.
        let room = |a: u64| {
            if back {
                (a - lo) / sz + 1
            } else {
                (hi - a) / sz
            }
        };
        let max = room(dst0).min(if movs { room(src0) } else { u64::MAX });
        let count = if fault { max + 3 } else { 1 + rnd() % max };
        let fill = rnd();
        let code = asm(|a| {
            a.mov(rsi, src0)?;
            a.mov(rdi, dst0)?;
            a.mov(rcx, count)?;
            a.mov(rax, fill)?;
            if back {
                a.std()?;
            }
            match (movs, sz) {
                (true, 1) => a.rep().movsb()?,
                (true, 2) => a.rep().movsw()?,
                (true, 4) => a.rep().movsd()?,
                (true, _) => a.rep().movsq()?,
                (false, 1) => a.rep().stosb()?,
                (false, 2) => a.rep().stosw()?,
                (false, 4) => a.rep().stosd()?,
                (false, _) => a.rep().stosq()?,
            }
            a.cld()?;
            a.hlt()
        });
        let mut h = harness(&code);
        let mut pool = 0x80_0000;
        for (k, p) in PHYS.iter().enumerate() {
            h.map_4k(V + k as u64 * 0x1000, *p, 2, &mut pool);
        }
        // Random contents, mirrored in the model (physical pages DATA..DATA+0x8000).
        let mut model = vec![0u8; 0x8000];
        for b in model.iter_mut() {
            *b = rnd() as u8;
        }
        h.mem().write(DATA, &model).unwrap();
        let (mut rsi_m, mut rdi_m, mut rcx_m) = (src0, dst0, count);
        let step = if back { sz.wrapping_neg() } else { sz };
        let in_map = |a: u64| a >= lo && a + sz <= hi;
        let mut faulted = false;
        while rcx_m != 0 {
            if movs && !in_map(rsi_m) || !in_map(rdi_m) {
                faulted = true;
                break;
            }
            let v: Vec<u8> = if movs {
                (0..sz)
                    .map(|k| model[(phys(rsi_m + k) - DATA) as usize])
                    .collect()
            } else {
                fill.to_le_bytes()[..sz as usize].to_vec()
            };
            for k in 0..sz {
                model[(phys(rdi_m + k) - DATA) as usize] = v[k as usize];
            }
            rsi_m = rsi_m.wrapping_add(step);
            rdi_m = rdi_m.wrapping_add(step);
            rcx_m -= 1;
        }
        let x = h.run();
        assert_eq!(x, Exit::Hlt, "case {case}");
        assert_eq!(faulted, fault, "case {case}: model");
        let ctx = format!(
            "case {case}: movs={movs} sz={sz} back={back} si={src0:#x} di={dst0:#x} count={count}"
        );
        if fault {
            let c = h.exception().unwrap_or_else(|| panic!("{ctx}: no fault"));
            assert_eq!(c.vector, 14, "{ctx}");
        } else {
            assert!(h.exception().is_none(), "{ctx}: {:?}", h.exception());
        }
        let r = h.cpu.regs();
        assert_eq!(r.gpr[1], rcx_m, "{ctx}: rcx");
        assert_eq!(r.gpr[7], rdi_m, "{ctx}: rdi");
        if movs {
            assert_eq!(r.gpr[6], rsi_m, "{ctx}: rsi");
        }
        let mut got = vec![0u8; 0x8000];
        h.mem().read(DATA, &mut got).unwrap();
        assert!(got == model, "{ctx}: memory differs");
    }
}

#[test]
fn divide_error_and_frame() {
    let code = asm(|a| {
        a.xor(ecx, ecx)?;
        a.mov(eax, 1)?;
        a.div(ecx)?;
        a.hlt()
    });
    let mut h = harness(&code);
    let c = expect_exc(&mut h, 0, None);
    assert_eq!(c.rip, CODE + 7, "faulting instruction");
    // IDIV overflow.
    let code = asm(|a| {
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.cqo()?;
        a.mov(rcx, -1i64)?;
        a.idiv(rcx)?;
        a.hlt()
    });
    let mut h = harness(&code);
    expect_exc(&mut h, 0, None);
}

/// Build a user page mapping and return the harness with `code` at user address 0x4000_0000.
fn user_harness(code: &[u8]) -> Harness {
    let mut h = Harness::new(16 << 20);
    let mut pool = 0x80_0000;
    h.mem().write(0x40_0000, code).unwrap();
    h.map_4k(0x4000_0000, 0x40_0000, 4, &mut pool); // user, read-only, executable
    h.map_4k(0x4000_1000, 0x41_0000, 4 | 2 | (1 << 63), &mut pool); // user RW NX
    h.map_4k(0x4000_2000, 0x42_0000, 4 | (1 << 63), &mut pool); // user RO NX
    h.map_4k(0x4000_3000, 0x43_0000, 2, &mut pool); // supervisor RW
    h.map_4k(0x4000_4000, 0x44_0000 | (1 << 51), 4 | 2, &mut pool); // reserved bit set
    h.enter_user(0x4000_0000, 0x4000_2000, 0x202);
    h
}

fn user_asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(0x4000_0000).unwrap()
}

#[test]
fn page_fault_error_codes() {
    // (code, expected error code, cr2)
    let cases: Vec<(Vec<u8>, u32, u64)> = vec![
        (
            user_asm(|a| a.mov(rax, qword_ptr(0x5000_0000u64))),
            0x4,
            0x5000_0000,
        ),
        (
            user_asm(|a| a.mov(qword_ptr(0x5000_0000u64), rax)),
            0x6,
            0x5000_0000,
        ),
        (
            user_asm(|a| a.mov(qword_ptr(0x4000_2008u64), rax)),
            0x7,
            0x4000_2008,
        ),
        (
            user_asm(|a| a.mov(rax, qword_ptr(0x4000_3000u64))),
            0x5,
            0x4000_3000,
        ),
        (
            user_asm(|a| a.mov(rax, qword_ptr(0x4000_4010u64))),
            0xd,
            0x4000_4010,
        ),
        (
            user_asm(|a| {
                a.mov(rax, 0x4000_1000u64)?;
                a.jmp(rax)
            }),
            0x15,
            0x4000_1000,
        ),
        // Writing the read-only code page.
        (
            user_asm(|a| a.mov(byte_ptr(0x4000_0000u64), 1)),
            0x7,
            0x4000_0000,
        ),
    ];
    for (code, ec, fault_addr) in cases {
        let mut h = user_harness(&code);
        let c = expect_exc(&mut h, 14, Some(ec));
        assert_eq!(c.cr2, fault_addr);
    }
}

#[test]
fn accessed_dirty_bits_and_supervisor_wp() {
    let code = user_asm(|a| {
        a.mov(rax, qword_ptr(0x4000_2000u64))?;
        a.mov(qword_ptr(0x4000_1000u64), rax)?;
        a.int3()
    });
    let mut h = user_harness(&code);
    let c = expect_exc(&mut h, 3, None);
    assert_eq!(c.rip, 0x4000_0000 + code.len() as u64);
    // Find the PTEs: walk from CR3.
    let m = h.mem().clone();
    let pte = |v: u64| {
        let mut t = PML4;
        for s in [39, 30, 21] {
            t = m.read_u64(t + ((v >> s) & 511) * 8).unwrap() & 0xf_ffff_ffff_f000;
        }
        m.read_u64(t + ((v >> 12) & 511) * 8).unwrap()
    };
    assert_eq!(pte(0x4000_2000) & 0x60, 0x20, "read: A only");
    assert_eq!(pte(0x4000_1000) & 0x60, 0x60, "write: A and D");
    assert_eq!(pte(0x4000_3000) & 0x60, 0, "untouched");
    // CR0.WP: a supervisor write to a read-only page faults only with WP set.
    let code = asm(|a| {
        a.mov(qword_ptr(0x4000_2000u64), rax)?;
        a.hlt()
    });
    let mut h = user_harness(&[]);
    let mut s = h.cpu.sregs();
    s.cs = kernel_code64();
    s.ss = kernel_data();
    h.cpu.set_sregs(&s).unwrap();
    h.load(&code);
    let mut r = h.cpu.regs();
    r.gpr[4] = STACK_TOP;
    h.cpu.set_regs(&r);
    expect_exc(&mut h, 14, Some(0x3));
    let mut h = user_harness(&[]);
    let mut s = h.cpu.sregs();
    s.cs = kernel_code64();
    s.ss = kernel_data();
    s.cr0 &= !esvm_arch::bits::cr0::WP;
    h.cpu.set_sregs(&s).unwrap();
    h.load(&code);
    let mut r = h.cpu.regs();
    r.gpr[4] = STACK_TOP;
    h.cpu.set_regs(&r);
    assert_eq!(h.run(), Exit::Hlt);
    assert!(h.exception().is_none());
}

#[test]
fn double_and_triple_fault() {
    // #GP handler gate not present -> #NP while delivering #GP -> #DF (error code 0).
    let code = asm(|a| {
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.mov(rax, qword_ptr(rax))?; // non-canonical: #GP(0)
        a.hlt()
    });
    let mut h = harness(&code);
    let gp = IDT + 16 * 13;
    let lo = h.mem().read_u64(gp).unwrap();
    h.mem().write_u64(gp, lo & !(1 << 47)).unwrap();
    let c = expect_exc(&mut h, 8, Some(0));
    assert_eq!(c.rip, CODE + 10);
    // And with #DF not present either: triple fault -> shutdown.
    let df = IDT + 16 * 8;
    let lo = h.mem().read_u64(df).unwrap();
    let mut h2 = harness(&code);
    h2.mem().write_u64(gp, lo & !(1 << 47)).unwrap();
    h2.mem().write_u64(df, lo & !(1 << 47)).unwrap();
    match h2.run() {
        Exit::Shutdown { .. } => {}
        x => panic!("expected shutdown, got {x:?}"),
    }
    // A #PF during #PF delivery (stack unmapped) -> #DF on the IST... here: no IST, so the
    // #DF push also faults -> triple fault.
    let code = asm(|a| {
        a.mov(rsp, 0x7fff_0000_0000u64)?;
        a.push(rax)?;
        a.hlt()
    });
    let mut h3 = harness(&code);
    assert!(matches!(h3.run(), Exit::Shutdown { .. }));
    // With an IST stack for #DF the double fault is handled.
    let mut h4 = harness(&code);
    let lo = h4.mem().read_u64(df).unwrap();
    h4.mem().write_u64(df, lo | (1 << 32)).unwrap();
    let c = expect_exc(&mut h4, 8, Some(0));
    assert_eq!(c.rip, CODE + 10);
    assert_eq!(h4.cpu.regs().gpr[4], IST1_TOP - 48);
}

#[test]
fn io_exits_and_completion() {
    let h = {
        let code = asm(|a| {
            a.mov(dx, 0x3f8)?;
            a.mov(al, 0x41)?;
            a.out(dx, al)?;
            a.in_(eax, dx)?;
            a.mov(ebx, eax)?;
            a.in_(al, 0x60)?;
            a.hlt()
        });
        let mut h = harness(&code);
        assert_eq!(
            h.run(),
            Exit::IoOut {
                port: 0x3f8,
                size: 1,
                data: 0x41
            }
        );
        assert_eq!(
            h.run(),
            Exit::IoIn {
                port: 0x3f8,
                size: 4
            }
        );
        let before = h.cpu.instructions_retired();
        h.cpu.complete_io_in(0xdead_beef).unwrap();
        assert_eq!(
            h.run(),
            Exit::IoIn {
                port: 0x60,
                size: 1
            }
        );
        assert_eq!(h.cpu.instructions_retired(), before + 2);
        h.cpu.complete_io_in(0x7f).unwrap();
        assert_eq!(h.run(), Exit::Hlt);
        h
    };
    let r = h.cpu.regs();
    assert_eq!(r.gpr[3], 0xdead_beef);
    assert_eq!(r.gpr[0] & 0xff, 0x7f);
    // Ring 3 with IOPL 0: #GP.
    let code = user_asm(|a| a.out(0x80, al));
    let mut h = user_harness(&code);
    expect_exc(&mut h, 13, Some(0));
}

#[test]
fn mmio_exits_and_completion() {
    // RAM is 16 MiB; 0xfee0_0000 is MMIO (identity-mapped via a 1 GiB-page... map it).
    let code = asm(|a| {
        a.mov(rbx, 0x4000_5000u64)?;
        a.mov(dword_ptr(rbx + 0x10), 0x1234_5678u32)?;
        a.mov(rax, qword_ptr(rbx + 0x20))?;
        a.add(eax, 1)?;
        a.mov(qword_ptr(rbx + 0x30), rax)?;
        a.hlt()
    });
    let mut h = harness(&code);
    let mut pool = 0x80_0000;
    h.map_4k(0x4000_5000, 0xfee0_0000, 2, &mut pool);
    match h.run() {
        Exit::MmioWrite { gpa, size, data } => {
            assert_eq!((gpa, size), (0xfee0_0010, 4));
            assert_eq!(&data[..4], &0x1234_5678u32.to_le_bytes());
        }
        x => panic!("{x:?}"),
    }
    assert_eq!(
        h.run(),
        Exit::MmioRead {
            gpa: 0xfee0_0020,
            size: 8
        }
    );
    h.cpu
        .complete_mmio_read(&0x1_0000_00ffu64.to_le_bytes())
        .unwrap();
    match h.run() {
        Exit::MmioWrite { gpa, size, data } => {
            assert_eq!((gpa, size), (0xfee0_0030, 8));
            assert_eq!(u64::from_le_bytes(data[..8].try_into().unwrap()), 0x100);
        }
        x => panic!("{x:?}"),
    }
    assert_eq!(h.run(), Exit::Hlt);
}

#[test]
fn self_modifying_code() {
    // Patch the immediate of a later instruction in the same block, then a loop body.
    let code = asm(|a| {
        let mut target = a.create_label();
        a.lea(rbx, ptr(target))?;
        a.mov(byte_ptr(rbx + 1), 0x42u32)?; // mov al, imm8 -> imm = 0x42
        a.set_label(&mut target)?;
        a.mov(al, 0x11)?;
        a.hlt()
    });
    let mut h = harness(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(h.cpu.regs().gpr[0] & 0xff, 0x42);
    // Run code, rewrite it from the VMM, run again.
    let code = asm(|a| {
        a.mov(eax, 1)?;
        a.hlt()
    });
    let mut h = harness(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(h.cpu.regs().gpr[0], 1);
    h.mem().write(CODE + 1, &[7]).unwrap();
    h.restart(CODE);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(h.cpu.regs().gpr[0], 7);
}

/// Decoding at page ends: an instruction straddling two virtually contiguous pages that are
/// not physically contiguous (and a write to its second half invalidating it), a block
/// running up to the end of a page, and blocks longer than the longest decoded block.
#[test]
fn code_across_pages_and_long_blocks() {
    const V: u64 = 0x4000_0000;
    let (p0, p1) = (DATA + 0x5000, DATA + 0x2000);
    // mov rax, imm64 (10 bytes) at V + 0xffa: 6 bytes on the first page, 4 on the second.
    let mut first = vec![0x90u8; 0x1000];
    let tail = [0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8];
    first[0xffa..].copy_from_slice(&tail[..6]);
    // Then (second page) add rax, 1; hlt.
    let mut second = tail[6..].to_vec();
    second.extend_from_slice(&[0x48, 0x83, 0xc0, 0x01, 0xf4]);
    let mut h = harness(&[0xf4]);
    let mut pool = 0x80_0000;
    h.map_4k(V, p0, 2, &mut pool);
    h.map_4k(V + 0x1000, p1, 2, &mut pool);
    h.mem().write(p0, &first).unwrap();
    h.mem().write(p1, &second).unwrap();
    for start in [V + 0xffa, V + 0xff0, V + 0xe00, V] {
        h.restart(start);
        assert_eq!(h.run(), Exit::Hlt);
        assert!(h.exception().is_none(), "{:?}", h.exception());
        assert_eq!(
            h.cpu.regs().gpr[0],
            0x0807_0605_0403_0202,
            "from {start:#x}"
        );
        assert_eq!(h.cpu.regs().rip, V + 0x1000 + 9);
    }
    // Rewrite the part of the immediate on the second page.
    h.mem().write(p1, &[0x17, 0x18]).unwrap();
    h.restart(V + 0xffa);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(h.cpu.regs().gpr[0], 0x0807_1817_0403_0202);
    // The guest rewrites it itself, from the first page.
    let code = asm(|a| {
        a.mov(rbx, V + 0x1000)?;
        a.mov(byte_ptr(rbx), 0x27u32)?;
        a.mov(rax, V + 0xffa)?;
        a.jmp(rax)
    });
    h.load(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert_eq!(h.cpu.regs().gpr[0], 0x0807_1827_0403_0202);
    // 300 instructions without a branch (several maximal blocks), each 15 bytes long.
    let code = asm(|a| {
        a.xor(eax, eax)?;
        for _ in 0..300 {
            // 11 operand-size prefixes, CS, add ax, 1 (83 c0 01): 15 bytes.
            a.db(&[
                0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x2e,
            ])?;
            a.add(eax, 1)?;
        }
        a.hlt()
    });
    h.load(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert!(h.exception().is_none(), "{:?}", h.exception());
    assert_eq!(h.cpu.regs().gpr[0], 300);
}

/// MOV to CR3 drops non-global translations (code and data) and, with CR4.PGE, keeps
/// global ones; INVLPG drops global ones too. Two roots map V to different pages A and B,
/// each holding `mov eax, [V + 8]; ret` and a different dword at offset 8.
#[test]
fn cr3_switch_global_pages_and_invlpg() {
    const V: u64 = 0x4000_0000;
    for global in [false, true] {
        let mut h = harness(&[0xf4]);
        let m = h.mem().clone();
        let (a, b) = (DATA, DATA + 0x1000);
        // Roots: copies of the harness PML4 and PDPT whose PDPT[1] (1 GiB..2 GiB) leads to
        // a PD and PT mapping V to A or B.
        let mut pml4 = [0u8; 4096];
        let mut pdpt = [0u8; 4096];
        m.read(PML4, &mut pml4).unwrap();
        m.read(PML4 + 0x1000, &mut pdpt).unwrap();
        let mut roots = [0u64; 2];
        for (k, page) in [a, b].into_iter().enumerate() {
            let t = 0x80_0000 + k as u64 * 0x4000; // root, pdpt, pd, pt
            m.write(t, &pml4).unwrap();
            m.write(t + 0x1000, &pdpt).unwrap();
            m.write(t + 0x2000, &[0u8; 4096]).unwrap();
            m.write(t + 0x3000, &[0u8; 4096]).unwrap();
            m.write_u64(t, (t + 0x1000) | 3).unwrap();
            m.write_u64(t + 0x1000 + 8, (t + 0x2000) | 3).unwrap();
            m.write_u64(t + 0x2000, (t + 0x3000) | 3).unwrap();
            let g = if global { 0x100 } else { 0 };
            m.write_u64(t + 0x3000, page | 3 | g).unwrap();
            roots[k] = t;
            // mov eax, [V + 8]; ret; then the data.
            let mut code = vec![0x8b, 0x04, 0x25];
            code.extend_from_slice(&((V + 8) as u32).to_le_bytes());
            code.push(0xc3);
            code.extend_from_slice(&(0x11 * (k as u32 + 1)).to_le_bytes());
            m.write(page, &code).unwrap();
        }
        let mut sr = h.cpu.sregs();
        sr.cr4 |= esvm_arch::bits::cr4::PGE;
        h.cpu.set_sregs(&sr).unwrap();
        let code = asm(|x| {
            x.mov(rax, roots[0])?;
            x.mov(cr3, rax)?;
            x.mov(rbx, V)?;
            x.call(rbx)?;
            x.mov(r8, rax)?;
            x.mov(rax, roots[1])?;
            x.mov(cr3, rax)?;
            x.call(rbx)?;
            x.mov(r9, rax)?;
            x.invlpg(byte_ptr(rbx))?;
            x.call(rbx)?;
            x.mov(r10, rax)?;
            x.hlt()
        });
        h.load(&code);
        assert_eq!(h.run(), Exit::Hlt);
        assert!(h.exception().is_none(), "{:?}", h.exception());
        let r = h.cpu.regs();
        assert_eq!(r.gpr[8], 0x11, "global {global}");
        // A global translation of V (code and data) survives the CR3 switch.
        assert_eq!(
            r.gpr[9],
            if global { 0x11 } else { 0x22 },
            "global {global}"
        );
        assert_eq!(r.gpr[10], 0x22, "global {global}");
    }
}

#[test]
fn dirty_bitmap_marks_guest_writes() {
    let code = asm(|a| {
        a.mov(rbx, DATA + 0x5000)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(rdi, DATA + 0x9000)?;
        a.mov(ecx, 0x2000)?;
        a.rep().stosb()?;
        a.lock().add(qword_ptr(DATA + 0xc008), 1)?;
        a.hlt()
    });
    let mut h = harness(&code);
    h.mem().take_dirty();
    assert_eq!(h.run(), Exit::Hlt);
    let d = h.mem().take_dirty();
    let set: Vec<u64> = (0..4096u64)
        .filter(|p| d[(p / 64) as usize] >> (p % 64) & 1 != 0)
        .collect();
    let dp = DATA / 4096;
    assert!(set.contains(&(dp + 5)));
    assert!(set.contains(&(dp + 9)) && set.contains(&(dp + 10)));
    assert!(set.contains(&(dp + 0xc)));
    assert!(!set.contains(&(dp + 6)));
    // Writes after a take are logged again (the bit was cleared concurrently).
    h.restart(CODE);
    assert_eq!(h.run(), Exit::Hlt);
    let d = h.mem().take_dirty();
    assert!(d[((dp + 5) / 64) as usize] >> ((dp + 5) % 64) & 1 != 0);
}

#[test]
fn interrupts_sti_shadow_and_hlt() {
    let code = asm(|a| {
        a.sti()?;
        a.mov(eax, 1)?; // shadow: the interrupt comes after this one
        a.mov(eax, 2)?;
        a.hlt()
    });
    let mut h = harness(&code);
    h.cpu.queue_interrupt(0x30).unwrap();
    let c = expect_exc(&mut h, 0x30, None);
    assert_eq!(
        c.rip,
        CODE + 6,
        "delivered after the instruction in the STI shadow"
    );
    assert_eq!(h.cpu.regs().gpr[0], 1);
    // HLT with IF=1: exits Hlt, an interrupt wakes it.
    let code = asm(|a| {
        a.sti()?;
        a.hlt()?;
        a.mov(eax, 5)?;
        a.hlt()
    });
    let mut h = harness(&code);
    assert_eq!(h.run(), Exit::Hlt);
    assert!(h.cpu.events().halted);
    assert_eq!(h.run(), Exit::Hlt, "still halted");
    h.cpu.queue_interrupt(0x31).unwrap();
    let c = expect_exc(&mut h, 0x31, None);
    assert_eq!(c.rip, CODE + 2, "return address is after HLT");
    // Injected exception with error code.
    let code = asm(|a| {
        a.nop()?;
        a.hlt()
    });
    let mut h = harness(&code);
    h.cpu.inject_exception(13, Some(0x18));
    expect_exc(&mut h, 13, Some(0x18));
}

#[test]
fn syscall_sysret_and_iretq() {
    use esvm_arch::msr;
    // Kernel: set up STAR/LSTAR, iretq to user code that does syscall.
    let code = asm(|a| {
        let mut user = a.create_label();
        let mut entry = a.create_label();
        a.mov(ecx, msr::IA32_STAR)?;
        a.mov(edx, (KCODE as u32) | ((UCODE32 as u32 | 3) << 16))?;
        a.xor(eax, eax)?;
        a.wrmsr()?;
        a.mov(ecx, msr::IA32_LSTAR)?;
        a.lea(rax, ptr(entry))?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 32)?;
        a.wrmsr()?;
        // iretq frame: SS, RSP, RFLAGS, CS, RIP
        a.push((UDATA | 3) as i32)?;
        a.push(0x4000_2000)?;
        a.push(0x202)?;
        a.push((UCODE64 | 3) as i32)?;
        a.lea(rax, ptr(user))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut user)?;
        a.mov(r12, 77u64)?;
        a.syscall()?;
        a.mov(r13d, 88)?;
        a.int3()?;
        a.set_label(&mut entry)?;
        a.mov(r14, rcx)?;
        a.mov(r15, r11)?;
        a.sysretq()?;
        Ok(())
    });
    let mut h = harness(&code);
    // The user code runs from the identity map: make CODE's 2 MiB page user-accessible.
    let pd = PML4 + 0x2000;
    let e = h.mem().read_u64(pd).unwrap();
    h.mem().write_u64(pd, e | 4).unwrap();
    let p = h.mem().read_u64(PML4).unwrap();
    h.mem().write_u64(PML4, p | 4).unwrap();
    let p = h.mem().read_u64(PML4 + 0x1000).unwrap();
    h.mem().write_u64(PML4 + 0x1000, p | 4).unwrap();
    let c = expect_exc(&mut h, 3, None);
    let r = h.cpu.regs();
    assert_eq!(r.gpr[12], 77);
    assert_eq!(r.gpr[13], 88);
    assert_eq!(r.gpr[15] & 0x200, 0x200, "r11 = user rflags");
    assert_eq!(r.gpr[14], c.rip - 1 - 6, "rcx = return address");
    assert_eq!(h.cpu.sregs().cs.selector, KCODE);
    let frame_cs = h.mem().read_u64(r.gpr[4] + 8).unwrap();
    assert_eq!(frame_cs, (UCODE64 | 3) as u64);
}

/// The AMD model-specific MSRs Linux 6.1 reads with its unchecked accessors on a family 17h
/// part exist (no "unchecked MSR access" warning): patch level, DE_CFG, NB_CFG.
#[test]
fn amd_model_specific_msrs_linux_touches() {
    let code = asm(|a| {
        a.mov(ecx, 0x8bu32)?;
        a.rdmsr()?;
        a.mov(r8, rax)?;
        a.mov(ecx, 0xc001_1029u32)?;
        a.rdmsr()?;
        a.mov(r9, rax)?;
        // Setting LFENCE-serialising again is accepted; NB_CFG takes any write.
        a.wrmsr()?;
        a.mov(ecx, 0xc001_001fu32)?;
        a.mov(edx, 0x4000u32)?;
        a.xor(eax, eax)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        // DE_CFG bits other than LFENCE-serialising: #GP.
        a.mov(ecx, 0xc001_1029u32)?;
        a.mov(eax, 1u32)?;
        a.wrmsr()?;
        a.hlt()
    });
    let mut h = Harness::new(16 << 20);
    h.load(&code);
    let c = expect_exc(&mut h, 13, Some(0));
    assert_eq!(c.rip, CODE + code.len() as u64 - 3);
    let r = h.cpu.regs();
    assert_eq!(
        r.gpr[8],
        esvm_arch::msr::MICROCODE_PATCH_LEVEL & 0xffff_ffff
    );
    assert_eq!(r.gpr[9], 2, "DE_CFG reads LFENCE-serialising");
    assert_eq!(
        (r.gpr[10], r.gpr[11]),
        (0, 0),
        "NB_CFG reads 0 (writes ignored, as KVM)"
    );
}

/// The MTRRs Linux programs (it enables PAT only with MTRRs on): writes kept, reserved
/// memory types and address bits above MAXPHYADDR a #GP, and kept in the vCPU's MSR state.
#[test]
fn mtrrs_hold_what_the_guest_writes() {
    let code = asm(|a| {
        a.mov(ecx, 0xfeu32)?;
        a.rdmsr()?;
        a.mov(r8, rax)?;
        a.mov(ecx, 0x2ffu32)?;
        a.mov(eax, 0x806u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0x201u32)?;
        a.mov(eax, 0xf000_0800u32)?;
        a.mov(edx, 0xffu32)?;
        a.wrmsr()?;
        // A mask bit above MAXPHYADDR (48): #GP.
        a.mov(edx, 0x1_0000u32)?;
        a.wrmsr()?;
        a.hlt()
    });
    let mut h = Harness::new(16 << 20);
    h.load(&code);
    let c = expect_exc(&mut h, 13, Some(0));
    assert_eq!(c.rip, CODE + code.len() as u64 - 3);
    assert_eq!(h.cpu.regs().gpr[8], 0x508, "MTRRCAP");
    let mtrr = h.cpu.msrs().mtrr;
    assert_eq!(mtrr.def_type, 0x806);
    assert_eq!(
        mtrr.var[0].1, 0xff_f000_0800,
        "the refused write left the mask"
    );
}

#[test]
fn cpuid_msr_and_intercepts() {
    let code = asm(|a| {
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(r8d, ebx)?;
        a.xor(ecx, ecx)?;
        a.mov(eax, 0x4000_0000)?;
        a.cpuid()?;
        a.mov(r9d, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.mov(r10d, eax)?;
        a.mov(ecx, 0x1234)?;
        a.rdmsr()?;
        a.mov(r11, rax)?;
        a.mov(ecx, 0x9999)?;
        a.rdmsr()?; // not modelled, not intercepted: #GP
        a.hlt()
    });
    let mut cfg = crate::CpuConfig::default();
    cfg.cpuid_intercepts.push(0x4000_0000);
    cfg.msr_intercepts.push(0x1234);
    let mem = crate::PhysMemory::new_owned(16 << 20).unwrap();
    let mut h = Harness::with_memory(mem, cfg);
    h.load(&code);
    assert_eq!(
        h.run(),
        Exit::Cpuid {
            function: 0x4000_0000,
            index: 0
        }
    );
    h.cpu.complete_cpuid([0x4000_0001, 0, 0, 0]).unwrap();
    assert_eq!(h.run(), Exit::RdMsr { index: 0x1234 });
    h.cpu.complete_rdmsr(Some(0xabcd)).unwrap();
    let c = expect_exc(&mut h, 13, Some(0));
    assert_eq!(c.rip, CODE + code.len() as u64 - 3);
    let r = h.cpu.regs();
    assert_eq!(r.gpr[8] as u32, u32::from_le_bytes(*b"Auth"));
    assert_eq!(r.gpr[9], 0x4000_0001);
    assert_eq!(r.gpr[10] & 0xd01, 0xd01);
    assert_eq!(r.gpr[11], 0xabcd);
}

#[test]
fn locked_ops_are_atomic_across_threads() {
    use std::sync::Arc;
    let mem = crate::PhysMemory::new_owned(16 << 20).unwrap();
    let code = asm(|a| {
        let mut lp = a.create_label();
        a.mov(ecx, 20000)?;
        a.set_label(&mut lp)?;
        a.lock().inc(qword_ptr(DATA))?;
        a.mov(eax, 1)?;
        a.lock().xadd(qword_ptr(DATA + 8), rax)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.hlt()
    });
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mem = mem.clone();
            let code = code.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                let mut h = Harness::with_memory(mem, crate::CpuConfig::default());
                b.wait();
                h.load(&code);
                assert_eq!(h.run(), Exit::Hlt);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(mem.read_u64(DATA).unwrap(), 40000);
    assert_eq!(mem.read_u64(DATA + 8).unwrap(), 40000);
}

#[test]
fn snapshot_roundtrip_and_budget() {
    let code = asm(|a| {
        let mut lp = a.create_label();
        a.xor(eax, eax)?;
        a.set_label(&mut lp)?;
        a.add(rax, 3)?;
        a.jmp(lp)
    });
    let mut h = harness(&code);
    assert_eq!(h.cpu.run(1001), Exit::BudgetExhausted);
    assert_eq!(h.cpu.instructions_retired(), 1001);
    assert_eq!(h.cpu.regs().gpr[0], 3 * 500);
    let snap = h.cpu.snapshot();
    let mut h2 = harness(&code);
    h2.cpu.restore(&snap).unwrap();
    assert_eq!(h2.cpu.snapshot(), snap);
    assert_eq!(h2.cpu.run(10), Exit::BudgetExhausted);
    assert_eq!(h2.cpu.regs().gpr[0], 3 * 505);
    let t0 = h2.cpu.tsc();
    h2.cpu.run(100);
    assert_eq!(h2.cpu.tsc(), t0 + 100, "TSC counts retired instructions");
    // The kick flag.
    h2.cpu.kicker().kick();
    assert_eq!(h2.cpu.run(u64::MAX), Exit::Interrupted);
}

#[test]
fn real_mode_to_long_mode() {
    use esvm_arch::{DescriptorTable, SpecialRegs, VcpuSnapshot};
    let mut h = Harness::new(16 << 20);
    let m = h.mem().clone();
    // GDT at 0x5000: null, 0x08 code64, 0x10 data, 0x18 code32.
    let gdt = [
        0u64,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        m.write_u64(0x5000 + 8 * i as u64, *d).unwrap();
    }
    // GDT pointer (limit, base).
    m.write(0x5100, &[31, 0, 0x00, 0x50, 0, 0]).unwrap();
    // 32-bit IDT at 0x6000 with an interrupt gate for 0x40 -> 0x8800 (selector 0x18).
    let gate = 0x8800u64 | (0x18u64 << 16) | (0x8eu64 << 40);
    m.write_u64(0x6000 + 8 * 0x40, gate).unwrap();
    m.write(0x5110, &[0xff, 0x07, 0x00, 0x60, 0, 0]).unwrap();
    // Real-mode IVT entry 0x20 -> 0000:7e00.
    m.write(0x20 * 4, &[0x00, 0x7e, 0x00, 0x00]).unwrap();
    let a16 = {
        let mut a = CodeAssembler::new(16).unwrap();
        a.cli().unwrap();
        a.xor(ax, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(sp, 0x7000).unwrap();
        a.int(0x20).unwrap();
        a.lgdt(ptr(0x5100)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(al, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(0x18, 0x8000).unwrap();
        a.assemble(0x7c00).unwrap()
    };
    let rm_handler = {
        let mut a = CodeAssembler::new(16).unwrap();
        a.mov(si, 0x1111).unwrap();
        a.iret().unwrap();
        a.assemble(0x7e00).unwrap()
    };
    let a32 = {
        let mut a = CodeAssembler::new(32).unwrap();
        a.mov(ax, 0x10).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, 0x7_0000).unwrap();
        a.lidt(ptr(0x5110)).unwrap();
        a.int(0x40).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 0x20).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PML4 as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0x100).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.jmp_far(0x08, 0x9000).unwrap();
        a.assemble(0x8000).unwrap()
    };
    let pm_handler = {
        let mut a = CodeAssembler::new(32).unwrap();
        a.mov(ebx, 0xabcd).unwrap();
        a.iretd().unwrap();
        a.assemble(0x8800).unwrap()
    };
    let a64 = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
        a.mov(qword_ptr(0x20_0000), rax).unwrap();
        a.hlt().unwrap();
        a.assemble(0x9000).unwrap()
    };
    for (addr, c) in [
        (0x7c00, &a16),
        (0x7e00, &rm_handler),
        (0x8000, &a32),
        (0x8800, &pm_handler),
        (0x9000, &a64),
    ] {
        m.write(addr, c).unwrap();
    }
    // Start from the RESET state, moved to 0000:7C00 (as a boot loader would run).
    let mut s = VcpuSnapshot::reset();
    s.sregs.cs.selector = 0;
    s.sregs.cs.base = 0;
    s.regs.rip = 0x7c00;
    s.sregs.idt = DescriptorTable {
        base: 0,
        limit: 0x3ff,
    };
    h.cpu.restore(&s).unwrap();
    let _: SpecialRegs = h.cpu.sregs();
    assert_eq!(h.run(), Exit::Hlt);
    let r = h.cpu.regs();
    assert_eq!(r.rip, 0x9000 + a64.len() as u64, "{:x?}", h.cpu.sregs());
    assert_eq!(m.read_u64(0x20_0000).unwrap(), 0x1234_5678_9abc_def0);
    assert_eq!(r.gpr[6] & 0xffff, 0x1111, "real-mode interrupt handler ran");
    assert_eq!(r.gpr[3], 0xabcd, "protected-mode interrupt handler ran");
    let s = h.cpu.sregs();
    assert!(s.long_mode() && s.cs.attrib.long());
}

#[test]
fn sse_memory_exceptions_and_fxsave() {
    let h = run64(|a| {
        a.mov(rbx, DATA)?;
        a.mov(rax, 0x4000_0000_0000_0000u64)?; // 2.0
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.movups(xmm1, xmmword_ptr(rbx))?;
        a.movsd_2(xmm2, qword_ptr(rbx))?;
        a.addsd(xmm2, qword_ptr(rbx + 8))?; // 4.0
        a.movsd_2(qword_ptr(rbx + 0x20), xmm2)?;
        a.movdqu(xmmword_ptr(rbx + 0x31), xmm1)?; // unaligned store is fine
        a.fxsave(ptr(rbx + 0x100))?;
        a.pxor(xmm1, xmm1)?;
        a.fxrstor(ptr(rbx + 0x100))?;
        a.stmxcsr(dword_ptr(rbx + 0x40))?;
        Ok(())
    });
    assert!(h.exception().is_none(), "{:?}", h.exception());
    assert_eq!(
        h.mem().read_u64(DATA + 0x20).unwrap(),
        0x4010_0000_0000_0000
    );
    assert_eq!(
        h.mem().read_u64(DATA + 0x31).unwrap(),
        0x4000_0000_0000_0000
    );
    assert_eq!(
        h.cpu.fpu().xmm[1],
        [0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x40]
    );
    assert_eq!(h.mem().read_u64(DATA + 0x40).unwrap() as u32, 0x1f80);
    assert_eq!(
        h.mem().read_u64(DATA + 0x100 + 24).unwrap() as u32,
        0x1f80,
        "FXSAVE MXCSR"
    );

    // MOVAPS from a misaligned address: #GP(0).
    let code = asm(|a| {
        a.movaps(xmm0, xmmword_ptr(DATA + 8))?;
        a.hlt()
    });
    let mut h = harness(&code);
    expect_exc(&mut h, 13, Some(0));
    // Unmasked divide-by-zero: #XM, destination unchanged, flag set.
    let code = asm(|a| {
        a.mov(dword_ptr(DATA), 0x1d80)?; // ZM unmasked
        a.ldmxcsr(dword_ptr(DATA))?;
        a.mov(rax, 0x3ff0_0000_0000_0000u64)?;
        a.movq(xmm0, rax)?;
        a.xorps(xmm1, xmm1)?;
        a.divsd(xmm0, xmm1)?;
        a.hlt()
    });
    let mut h = harness(&code);
    expect_exc(&mut h, 19, None);
    assert_eq!(h.cpu.fpu().mxcsr & 0x3f, 0x4);
    assert_eq!(h.cpu.fpu().xmm[0][7], 0x3f);
    // Reserved MXCSR bits: #GP.
    let code = asm(|a| {
        a.mov(dword_ptr(DATA), 0x1_0000)?;
        a.ldmxcsr(dword_ptr(DATA))?;
        a.hlt()
    });
    let mut h = harness(&code);
    expect_exc(&mut h, 13, Some(0));
    // CR0.TS: #NM; CR4.OSFXSR clear: #UD.
    let code = asm(|a| {
        a.addps(xmm0, xmm1)?;
        a.hlt()
    });
    let mut h = harness(&code);
    let mut s = h.cpu.sregs();
    s.cr0 |= esvm_arch::bits::cr0::TS;
    h.cpu.set_sregs(&s).unwrap();
    expect_exc(&mut h, 7, None);
    let mut h = harness(&code);
    let mut s = h.cpu.sregs();
    s.cr4 &= !esvm_arch::bits::cr4::OSFXSR;
    h.cpu.set_sregs(&s).unwrap();
    expect_exc(&mut h, 6, None);
}

#[test]
fn undefined_opcodes_raise_ud() {
    for code in [
        vec![0x0f, 0x0b],
        vec![0xf0, 0x90],
        vec![0x0f, 0xff],
        vec![0xd9, 0xd1],             // reserved x87 encoding
        vec![0xd9, 0xd8],             // FSTP1: not modelled
        vec![0x0f, 0x0e],             // FEMMS: no 3DNow! on family 17h
        vec![0x0f, 0x0f, 0xc1, 0xb4], // PFMUL mm0, mm1 (3DNow!)
        vec![0x0f, 0x38, 0x00, 0xc1], // PSHUFB mm0, mm1: SSSE3 is not advertised
        vec![0x0f, 0x0d, 0xc0],       // PREFETCH with a register operand
        vec![0xc4, 0xe2, 0x7d, 0x18, 0x00],
    ] {
        let mut c = code.clone();
        c.push(0xf4);
        let mut h = harness(&c);
        expect_exc(&mut h, 6, None);
    }
}

#[test]
fn single_step_trap() {
    let code = asm(|a| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.mov(eax, 1)?; // #DB after this one (TF was set when it started)
        a.mov(eax, 2)?;
        a.hlt()
    });
    let mut h = harness(&code);
    let c = expect_exc(&mut h, 1, None);
    assert_eq!(h.cpu.regs().gpr[0], 1);
    assert_eq!(c.rip, CODE + code.len() as u64 - 6);
    assert_ne!(h.cpu.debug_regs().dr6 & (1 << 14), 0);
}

/// 32-bit protected mode with legacy 2-level paging (4 KiB and 4 MiB pages) and with PAE.
#[test]
fn legacy_paging_modes() {
    use esvm_arch::bits::{cr0, cr4};
    use esvm_arch::{Segment, SegmentAttributes};
    for pae in [false, true] {
        let mut h = Harness::new(16 << 20);
        let m = h.mem().clone();
        let code = {
            let mut a = CodeAssembler::new(32).unwrap();
            a.mov(eax, dword_ptr(0x8000_0010u32)).unwrap();
            a.mov(dword_ptr(0x8000_0020u32), 0x77).unwrap();
            a.mov(ebx, dword_ptr(0x0040_1000u32)).unwrap(); // identity (large page)
            a.mov(ecx, dword_ptr(0x9000_0000u32)).unwrap(); // not present
            a.hlt().unwrap();
            a.assemble(0x10_0000).unwrap()
        };
        m.write(0x10_0000, &code).unwrap();
        m.write_u64(0x30_0010, 0x1122_3344).unwrap();
        m.write_u64(0x40_1000, 0x5566).unwrap();
        let (cr3v, cr4v) = if !pae {
            // PD at 0x50000; PDE 0: 4 MiB page at 0 (PS); PDE 1: 4 MiB at 4 MiB;
            // PDE 0x200 (0x8000_0000): page table at 0x51000 -> PTE 0 -> 0x30_0000.
            m.write(0x50000, &(0x83u32).to_le_bytes()).unwrap();
            m.write(0x50004, &(0x40_0083u32).to_le_bytes()).unwrap();
            m.write(0x50000 + 4 * 0x200, &(0x51003u32).to_le_bytes())
                .unwrap();
            m.write(0x51000, &(0x30_0003u32).to_le_bytes()).unwrap();
            (0x50000u64, cr4::PSE)
        } else {
            // PDPT at 0x50000 (4 entries); PD0 at 0x51000 with 2 MiB pages for 0..8 MiB;
            // PDPTE 2 (0x8000_0000) -> PD at 0x52000 -> PT at 0x53000 -> 0x30_0000.
            m.write_u64(0x50000, 0x51001).unwrap();
            m.write_u64(0x50010, 0x52001).unwrap();
            for i in 0..4u64 {
                m.write_u64(0x51000 + 8 * i, (i << 21) | 0x83).unwrap();
            }
            m.write_u64(0x52000, 0x53003).unwrap();
            m.write_u64(0x53000, 0x30_0003).unwrap();
            (0x50000u64, cr4::PAE)
        };
        let code32 = Segment {
            selector: 0x18,
            base: 0,
            limit: 0xffff_ffff,
            attrib: SegmentAttributes::new(0xb, true, 0, true, false, true, true),
        };
        let data = kernel_data();
        let mut s = h.cpu.sregs();
        s.cs = code32;
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.cr0 = cr0::PE | cr0::PG | cr0::ET | cr0::WP;
        s.cr3 = cr3v;
        s.cr4 = cr4v | cr4::OSFXSR;
        s.efer = 0;
        // 32-bit IDT is not set up: use a 64-bit-free check by looking at the fault state.
        s.idt.limit = 0;
        h.cpu.set_sregs(&s).unwrap();
        h.restart(0x10_0000);
        let mut r = h.cpu.regs();
        r.gpr[4] = 0x8_0000;
        h.cpu.set_regs(&r);
        // The #PF cannot be delivered (empty IDT): #GP, then #DF, then triple fault.
        match h.run() {
            Exit::Shutdown { .. } => {}
            x => panic!("{x:?}"),
        }
        let r = h.cpu.regs();
        assert_eq!(r.gpr[0], 0x1122_3344, "pae={pae}");
        assert_eq!(r.gpr[3], 0x5566, "pae={pae}");
        assert_eq!(m.read_u64(0x30_0020).unwrap(), 0x77);
        assert_eq!(h.cpu.sregs().cr2, 0x9000_0000, "pae={pae}");
    }
}

#[test]
fn completion_runs_before_interrupt_delivery() {
    let code = asm(|a| {
        a.sti()?;
        a.nop()?;
        a.in_(al, 0x60)?;
        a.hlt()
    });
    let mut h = harness(&code);
    assert_eq!(
        h.run(),
        Exit::IoIn {
            port: 0x60,
            size: 1
        }
    );
    h.cpu.queue_interrupt(0x40).unwrap();
    h.cpu.complete_io_in(0x5a).unwrap();
    let c = expect_exc(&mut h, 0x40, None);
    assert_eq!(c.rip, CODE + 4, "the IN retired before the interrupt");
    assert_eq!(h.cpu.regs().gpr[0] & 0xff, 0x5a);
}

#[test]
fn idiv_most_negative_by_minus_one_is_de() {
    let code = asm(|a| {
        a.xor(eax, eax)?;
        a.mov(rdx, 0x8000_0000_0000_0000u64)?;
        a.mov(rcx, -1i64)?;
        a.idiv(rcx)?;
        a.hlt()
    });
    let mut h = harness(&code);
    expect_exc(&mut h, 0, None);
}

/// Random machine code (ring 3 and ring 0) must never panic the interpreter: every outcome is
/// an exception, an exit or a shutdown.
#[test]
fn random_code_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..400 {
        let len = 8 + (next() % 40) as usize;
        let mut code: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Bias towards interesting opcode space: two-byte opcodes and prefixes.
        if round % 3 == 0 {
            code[0] = 0x0f;
        }
        if round % 5 == 0 {
            code[0] = [0x66, 0xf3, 0xf2, 0xf0, 0x48][(next() % 5) as usize];
        }
        if round % 2 == 0 {
            let mut r = esvm_arch::Regs::default();
            for g in r.gpr.iter_mut() {
                *g = if next() & 1 == 0 {
                    next()
                } else {
                    SNIPPET_SCRATCH + (next() & 0xfff)
                };
            }
            let mut scratch = [0u8; 4096];
            let _ = run_snippet(&code, &r, &mut scratch);
        } else {
            let mut h = harness(&code);
            for _ in 0..8 {
                match h.cpu.run(2000) {
                    Exit::IoIn { .. } => h.cpu.complete_io_in(0).unwrap(),
                    Exit::MmioRead { size, .. } => h
                        .cpu
                        .complete_mmio_read(&[0u8; 16][..size as usize])
                        .unwrap(),
                    Exit::Cpuid { .. } => h.cpu.complete_cpuid([0; 4]).unwrap(),
                    Exit::RdMsr { .. } => h.cpu.complete_rdmsr(None).unwrap(),
                    Exit::WrMsr { .. } => h.cpu.complete_wrmsr(false).unwrap(),
                    Exit::Shutdown { .. } | Exit::BudgetExhausted => break,
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn lar_lsl_verr_verw() {
    let h = run64(|a| {
        a.mov(ecx, KDATA as u32)?;
        a.lar(eax, ecx)?;
        a.setz(r8b)?;
        a.lsl(ebx, ecx)?;
        a.mov(ecx, 0x1000)?; // beyond the GDT limit
        a.lar(edx, ecx)?;
        a.setz(r9b)?;
        a.mov(ecx, KCODE as u32)?;
        a.verw(cx)?;
        a.setz(r10b)?;
        a.verr(cx)?;
        a.setz(r11b)?;
        Ok(())
    });
    let r = h.cpu.regs();
    assert_eq!(r.gpr[8] & 0xff, 1);
    assert_eq!(r.gpr[0], 0x00cf_9300);
    assert_eq!(r.gpr[3], 0xffff_ffff);
    assert_eq!(r.gpr[9] & 0xff, 0);
    assert_eq!(r.gpr[10] & 0xff, 0, "code is not writable");
    assert_eq!(r.gpr[11] & 0xff, 1, "code is readable");
}
