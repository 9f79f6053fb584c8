//! String instructions with REP/REPE/REPNE prefixes.
//!
//! Each iteration commits its register updates, so a fault, an MMIO/I/O exit or a yield
//! (every `CHUNK` iterations, to keep kicks and interrupts responsive) leaves the
//! instruction restartable with RIP still pointing at it.

use super::{Handler, Insn};
use crate::flags::{mask, F_SUB};
use crate::{Cpu, Exit, Stop, ES, P_MMIO, P_SMC, R};
use esvm_arch::bits::rflags::DF;
use iced_x86::{Instruction, Mnemonic};

const CHUNK: u32 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Movs,
    Stos,
    Lods,
    Scas,
    Cmps,
    Ins,
    Outs,
}

#[inline(always)]
fn idx_get(c: &Cpu, r: usize, asz: u8) -> u64 {
    c.gpr[r] & mask(asz)
}

#[inline(always)]
fn idx_set(c: &mut Cpu, r: usize, asz: u8, v: u64) {
    let m = mask(asz);
    c.gpr[r] = if asz == 4 {
        v & m
    } else {
        (c.gpr[r] & !m) | (v & m)
    };
}

fn string<const OP: u8>(c: &mut Cpu, d: &Insn) -> R {
    let op = match OP {
        0 => Op::Movs,
        1 => Op::Stos,
        2 => Op::Lods,
        3 => Op::Scas,
        4 => Op::Cmps,
        5 => Op::Ins,
        _ => Op::Outs,
    };
    let sz = d.sz as usize;
    let asz = d.asz;
    // cc: 0 = no REP, 1 = REP/REPE, 2 = REPNE.
    let rep = d.cc;
    let step = if c.rflags & DF != 0 {
        (sz as u64).wrapping_neg()
    } else {
        sz as u64
    };
    let src_seg = d.seg as usize;
    if matches!(op, Op::Ins | Op::Outs) {
        super::system::io_allowed(c)?;
    }
    let mut n = 0u32;
    loop {
        if rep != 0 && idx_get(c, 1, asz) == 0 {
            return Ok(());
        }
        let si = idx_get(c, 6, asz);
        let di = idx_get(c, 7, asz);
        let mut stop_cond = false;
        match op {
            Op::Movs => {
                let v = c.rd_sz(src_seg, si, sz as u8)?;
                c.wr_sz(ES, di, sz as u8, v)?;
                idx_set(c, 6, asz, si.wrapping_add(step));
                idx_set(c, 7, asz, di.wrapping_add(step));
            }
            Op::Stos => {
                let v = c.rr(0, sz);
                c.wr_sz(ES, di, sz as u8, v)?;
                idx_set(c, 7, asz, di.wrapping_add(step));
            }
            Op::Lods => {
                let v = c.rd_sz(src_seg, si, sz as u8)?;
                c.rw(0, sz, v);
                idx_set(c, 6, asz, si.wrapping_add(step));
            }
            Op::Scas => {
                let b = c.rd_sz(ES, di, sz as u8)?;
                let a = c.rr(0, sz);
                c.lazy(F_SUB, sz as u8, a, b, a.wrapping_sub(b) & mask(sz as u8));
                idx_set(c, 7, asz, di.wrapping_add(step));
                stop_cond = true;
            }
            Op::Cmps => {
                let a = c.rd_sz(src_seg, si, sz as u8)?;
                let b = c.rd_sz(ES, di, sz as u8)?;
                c.lazy(F_SUB, sz as u8, a, b, a.wrapping_sub(b) & mask(sz as u8));
                idx_set(c, 6, asz, si.wrapping_add(step));
                idx_set(c, 7, asz, di.wrapping_add(step));
                stop_cond = true;
            }
            Op::Ins => {
                let port = c.gpr[2] as u16;
                // Check the destination before asking the VMM for data.
                let lin = c.lin(ES, di, sz, true)?;
                c.probe_write(lin, sz)?;
                match c.compl.io_in.take() {
                    Some(v) => {
                        c.wr_sz(ES, di, sz as u8, v as u64)?;
                        idx_set(c, 7, asz, di.wrapping_add(step));
                    }
                    None => {
                        c.compl.io_awaiting = true;
                        c.exit = Some(Exit::IoIn {
                            port,
                            size: sz as u8,
                        });
                        return Err(Stop::Exit);
                    }
                }
            }
            Op::Outs => {
                let port = c.gpr[2] as u16;
                let v = c.rd_sz(src_seg, si, sz as u8)?;
                idx_set(c, 6, asz, si.wrapping_add(step));
                c.exit = Some(Exit::IoOut {
                    port,
                    size: sz as u8,
                    data: v as u32,
                });
                if rep != 0 {
                    let cnt = idx_get(c, 1, asz).wrapping_sub(1);
                    idx_set(c, 1, asz, cnt);
                    if cnt != 0 {
                        return Err(Stop::Exit);
                    }
                }
                return Err(Stop::ExitRetire);
            }
        }
        if rep == 0 {
            return Ok(());
        }
        let cnt = idx_get(c, 1, asz).wrapping_sub(1);
        idx_set(c, 1, asz, cnt);
        if stop_cond {
            let zf = c.zf();
            if (rep == 1 && !zf) || (rep == 2 && zf) {
                return Ok(());
            }
        }
        if cnt == 0 {
            return Ok(());
        }
        if op == Op::Ins {
            // One port read per exit.
            c.compl.io_awaiting = true;
            c.exit = Some(Exit::IoIn {
                port: c.gpr[2] as u16,
                size: sz as u8,
            });
            return Err(Stop::Exit);
        }
        n += 1;
        if n >= CHUNK || c.pending & (P_MMIO | P_SMC) != 0 {
            return Err(Stop::Yield);
        }
    }
}

pub(crate) fn select(m: Mnemonic, i: &Instruction, d: &mut Insn) -> Option<Handler> {
    use Mnemonic as M;
    let (op, sz): (u8, u8) = match m {
        M::Movsb => (0, 1),
        M::Movsw => (0, 2),
        M::Movsd if i.op_count() == 2 && i.is_string_instruction() => (0, 4),
        M::Movsq => (0, 8),
        M::Stosb => (1, 1),
        M::Stosw => (1, 2),
        M::Stosd => (1, 4),
        M::Stosq => (1, 8),
        M::Lodsb => (2, 1),
        M::Lodsw => (2, 2),
        M::Lodsd => (2, 4),
        M::Lodsq => (2, 8),
        M::Scasb => (3, 1),
        M::Scasw => (3, 2),
        M::Scasd => (3, 4),
        M::Scasq => (3, 8),
        M::Cmpsb => (4, 1),
        M::Cmpsw => (4, 2),
        M::Cmpsd if i.is_string_instruction() => (4, 4),
        M::Cmpsq => (4, 8),
        M::Insb => (5, 1),
        M::Insw => (5, 2),
        M::Insd => (5, 4),
        M::Outsb => (6, 1),
        M::Outsw => (6, 2),
        M::Outsd => (6, 4),
        _ => return None,
    };
    d.sz = sz;
    d.cc = if i.has_repne_prefix() && (op == 3 || op == 4) {
        2
    } else if i.has_rep_prefix() || i.has_repe_prefix() || i.has_repne_prefix() {
        1
    } else {
        0
    };
    // Source segment (overridable); the destination is always ES.
    d.seg = match i.memory_segment() {
        iced_x86::Register::ES => 0,
        iced_x86::Register::CS => 1,
        iced_x86::Register::SS => 2,
        iced_x86::Register::FS => 4,
        iced_x86::Register::GS => 5,
        _ => 3,
    };
    Some(match op {
        0 => string::<0>,
        1 => string::<1>,
        2 => string::<2>,
        3 => string::<3>,
        4 => string::<4>,
        5 => string::<5>,
        _ => string::<6>,
    })
}
