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

#[cfg(test)]
thread_local! {
    /// Elements REP MOVS/STOS moved through host pointers ([`bulk`]) on this thread: tests
    /// check that the fast path ran (or did not).
    pub(crate) static BULK_ELEMENTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

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
    // REP MOVS/STOS with 64-bit addresses in 64-bit mode go through host pointers a page
    // run at a time (`bulk`); anything it declines takes the per-element path below.
    let fast = rep != 0 && matches!(op, Op::Movs | Op::Stos) && !c.legacy && asz == 8;
    let mut n = 0u32;
    loop {
        if rep != 0 && idx_get(c, 1, asz) == 0 {
            return Ok(());
        }
        if fast {
            let back = c.rflags & DF != 0;
            if let Some(k) = bulk(c, op == Op::Movs, sz, src_seg, (CHUNK - n) as u64, back)? {
                n += k as u32;
                if c.gpr[1] == 0 {
                    return Ok(());
                }
                if n >= CHUNK || c.pending & P_SMC != 0 {
                    return Err(Stop::Yield);
                }
                continue;
            }
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

/// Elements of `sz` bytes from `lin` on (downwards with `back`) that lie inside the page of
/// `lin`; 0 if the first one crosses into the next page.
#[inline(always)]
fn run_len(lin: u64, sz: usize, back: bool) -> u64 {
    let off = lin & 0xfff;
    if off + sz as u64 > 0x1000 {
        0
    } else if back {
        off / sz as u64 + 1
    } else {
        (0x1000 - off) / sz as u64
    }
}

/// Up to `max` iterations of REP MOVS (`movs`) or REP STOS with 64-bit addresses in 64-bit
/// mode, all inside one source and one destination RAM page, through host pointers: the
/// pages are translated once (faulting, setting A/D bits and filling the TLB exactly as the
/// first element's accesses would, source first), the elements are moved in the order the
/// per-element loop would move them (a block copy when source and destination do not
/// overlap), then RCX/RSI/RDI are advanced and the destination page is logged. Returns the
/// number of iterations done, or None when the next element needs the per-element path (it
/// crosses a page, either page is not RAM, or the destination page holds decoded code).
///
/// In SEV-ES mode the host pointers are those of the views the per-element accesses take
/// (see [`Cpu::host_page`]): the private backing for a C-bit-set leaf, RAM for a clear one,
/// each page converted by its translation as an element's access would convert it; the
/// dirty and code bookkeeping goes to the guest-physical page. The source pointer is only
/// used if translating the destination converted no page: a conversion of the source's page
/// (source and destination are aliases of one page with the C-bit set in one and clear in
/// the other) moves its content to the other backing, and element by element the views
/// then alternate. The per-element path takes over for that element and makes the same
/// conversions.
fn bulk(
    c: &mut Cpu,
    movs: bool,
    sz: usize,
    src_seg: usize,
    max: u64,
    back: bool,
) -> R<Option<u64>> {
    let dlin = c.seg_base[ES].wrapping_add(c.gpr[7]);
    let mut n = c.gpr[1].min(max).min(run_len(dlin, sz, back));
    if n == 0 {
        return Ok(None);
    }
    let mut src = 0usize;
    if movs {
        let slin = c.seg_base[src_seg].wrapping_add(c.gpr[6]);
        n = n.min(run_len(slin, sz, back));
        if n == 0 {
            return Ok(None);
        }
        let Some((sp, _)) = c.host_page(slin, false)? else {
            return Ok(None);
        };
        src = sp + (slin & 0xfff) as usize;
    }
    let conversions = c.sev_conversions();
    let Some((dp, dgpn)) = c.host_page(dlin, true)? else {
        return Ok(None);
    };
    if movs && c.sev_conversions() != conversions {
        return Ok(None);
    }
    if c.is_code_page(dgpn) {
        return Ok(None);
    }
    let dst = dp + (dlin & 0xfff) as usize;
    let bytes = n as usize * sz;
    // Lowest address of each run (runs go down from the first element with DF=1).
    let low = |a: usize| if back { a + sz - bytes } else { a };
    if movs {
        let (s0, d0) = (low(src), low(dst));
        if d0 + bytes <= s0 || s0 + bytes <= d0 {
            // SAFETY: both runs lie inside pages of RAM or the private backing (host_page,
            // run_len; no conversion since the source was translated, so the source page is
            // still where its content lives) and do not overlap; guest memory is only
            // accessed through raw pointers.
            unsafe { std::ptr::copy_nonoverlapping(s0 as *const u8, d0 as *mut u8, bytes) };
        } else {
            // Overlapping runs: element by element in guest order (the result can depend on
            // it, e.g. a pattern fill with RDI = RSI + 1).
            for k in 0..n as usize {
                let off = if back {
                    (k * sz).wrapping_neg()
                } else {
                    k * sz
                };
                let (s, d) = (src.wrapping_add(off), dst.wrapping_add(off));
                // SAFETY: element k of each run lies inside its page (see above).
                unsafe {
                    match sz {
                        1 => *(d as *mut u8) = *(s as *const u8),
                        2 => (d as *mut u16).write_unaligned((s as *const u16).read_unaligned()),
                        4 => (d as *mut u32).write_unaligned((s as *const u32).read_unaligned()),
                        _ => (d as *mut u64).write_unaligned((s as *const u64).read_unaligned()),
                    }
                }
            }
        }
    } else {
        let v = c.gpr[0];
        let d0 = low(dst);
        // SAFETY: the run lies inside a page of RAM or the private backing (host_page,
        // run_len).
        unsafe {
            match sz {
                1 => std::ptr::write_bytes(d0 as *mut u8, v as u8, bytes),
                2 => {
                    (0..n as usize).for_each(|k| (d0 as *mut u16).add(k).write_unaligned(v as u16))
                }
                4 => {
                    (0..n as usize).for_each(|k| (d0 as *mut u32).add(k).write_unaligned(v as u32))
                }
                _ => (0..n as usize).for_each(|k| (d0 as *mut u64).add(k).write_unaligned(v)),
            }
        }
    }
    let step = if back {
        (sz as u64).wrapping_neg()
    } else {
        sz as u64
    };
    let adv = step.wrapping_mul(n);
    c.gpr[1] -= n;
    c.gpr[7] = c.gpr[7].wrapping_add(adv);
    if movs {
        c.gpr[6] = c.gpr[6].wrapping_add(adv);
    }
    // SAFETY: `dgpn` is the RAM page `host_page` returned for the destination.
    unsafe { c.note_write(dgpn) };
    #[cfg(test)]
    BULK_ELEMENTS.with(|b| b.set(b.get() + n));
    Ok(Some(n))
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
