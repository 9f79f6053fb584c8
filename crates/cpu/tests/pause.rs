//! PAUSE and the instruction budget: a VMM interleaving vCPUs on one thread asks PAUSE to
//! end the budget (`CpuConfig::pause_ends_budget`) so a spin-wait loop gives up its turn
//! after `PAUSES_PER_YIELD` PAUSEs in one run.

use esvm_cpu::mem::PhysMemory;
use esvm_cpu::testutil::{Harness, CODE};
use esvm_cpu::{CpuConfig, Exit, PAUSES_PER_YIELD};
use iced_x86::code_asm::*;

/// `inc rcx; pause; jmp` forever: how many instructions one `run(budget)` retires.
fn spin(pause_ends_budget: bool, budget: u64) -> (Exit, u64, u64) {
    let mem = PhysMemory::new_owned(16 << 20).unwrap();
    let mut h = Harness::with_memory(
        mem,
        CpuConfig {
            pause_ends_budget,
            ..CpuConfig::default()
        },
    );
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.inc(rcx).unwrap();
    a.pause().unwrap();
    a.jmp(top).unwrap();
    h.load(&a.assemble(CODE).unwrap());
    let before = h.cpu.instructions_retired();
    let exit = h.cpu.run(budget);
    (
        exit,
        h.cpu.instructions_retired() - before,
        h.cpu.regs().gpr[1],
    )
}

#[test]
fn pause_ends_the_budget_only_when_asked() {
    // By default PAUSE is a NOP: the loop runs out the whole budget.
    let (exit, retired, count) = spin(false, 3_000);
    assert_eq!(exit, Exit::BudgetExhausted);
    assert_eq!((retired, count), (3_000, 1_000));
    // Asked to, the PAUSES_PER_YIELD-th PAUSE gives up the rest: nothing after it retires.
    let n = u64::from(PAUSES_PER_YIELD);
    let (exit, retired, count) = spin(true, 3_000);
    assert_eq!(exit, Exit::BudgetExhausted);
    assert_eq!((retired, count), (3 * (n - 1) + 2, n));
}

#[test]
fn a_yielded_vcpu_resumes_after_its_pause() {
    let mem = PhysMemory::new_owned(16 << 20).unwrap();
    let mut h = Harness::with_memory(
        mem,
        CpuConfig {
            pause_ends_budget: true,
            ..CpuConfig::default()
        },
    );
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.inc(rcx).unwrap();
    a.pause().unwrap();
    a.cmp(rcx, 2 * PAUSES_PER_YIELD as i32 + 3).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    h.load(&a.assemble(CODE).unwrap());
    // Each run retires up to and including its PAUSES_PER_YIELD-th PAUSE (the count starts
    // again with every run); after two yields the loop ends three passes later at HLT.
    let mut yields = 0;
    loop {
        match h.cpu.run(1_000) {
            Exit::BudgetExhausted => yields += 1,
            Exit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
        assert!(yields <= 2, "PAUSE ended the budget too often");
    }
    let passes = 2 * u64::from(PAUSES_PER_YIELD) + 3;
    assert_eq!((yields, h.cpu.regs().gpr[1]), (2, passes));
}
