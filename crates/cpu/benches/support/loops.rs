//! The three interpreter throughput loops (register ALU, memory load/store, call/branch),
//! shared by the criterion bench (`benches/interp.rs`) and `examples/mips.rs`.

use esvm_cpu::testutil::{CODE, DATA};
use iced_x86::code_asm::*;

/// The machine code of loop `kind` ("alu", "mem" or anything else for call/branch), run
/// `iters` times, then HLT; assembled at [`CODE`].
pub fn program(kind: &str, iters: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lp = a.create_label();
    let mut f = a.create_label();
    a.mov(ecx, iters).unwrap();
    a.mov(rsi, DATA).unwrap();
    a.mov(rbx, 7u64).unwrap();
    a.set_label(&mut lp).unwrap();
    match kind {
        "alu" => {
            a.add(rax, rbx).unwrap();
            a.xor(rdx, rax).unwrap();
            a.sub(rbx, 3).unwrap();
            a.shl(rdi, 1).unwrap();
            a.or(rdi, rdx).unwrap();
            a.and(r8, rax).unwrap();
            a.lea(r9, qword_ptr(rax + rbx * 2 + 8)).unwrap();
            a.cmp(r9, rdx).unwrap();
        }
        "mem" => {
            a.mov(rax, qword_ptr(rsi)).unwrap();
            a.add(rax, 1).unwrap();
            a.mov(qword_ptr(rsi + 8), rax).unwrap();
            a.mov(rdx, qword_ptr(rsi + 16)).unwrap();
            a.mov(qword_ptr(rsi + 24), rdx).unwrap();
            a.mov(r8d, dword_ptr(rsi + rbx * 8 + 64)).unwrap();
            a.mov(dword_ptr(rsi + 32), r8d).unwrap();
            a.mov(qword_ptr(rsi), rax).unwrap();
        }
        _ => {
            let mut skip = a.create_label();
            a.call(f).unwrap();
            a.test(ecx, 1).unwrap();
            a.je(skip).unwrap();
            a.inc(rdx).unwrap();
            a.set_label(&mut skip).unwrap();
            a.call(f).unwrap();
        }
    }
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut f).unwrap();
    a.add(rax, 1).unwrap();
    a.ret().unwrap();
    a.assemble(CODE).unwrap()
}
