//! The decoded-instruction cache: guest code is decoded once per guest-physical location
//! into blocks of [`Insn`]s (each with its handler), looked up through a small jump cache
//! keyed by linear RIP and a map keyed by guest-physical address and code size.

use crate::exec::{self, Insn};
use crate::mem::{PAGE_SHIFT, PAGE_SIZE};
use crate::{Cpu, Exit, Mode, Stop, CS, R};
use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction};
use std::collections::HashMap;

const JC_SIZE: usize = 4096;
const JC_MASK: usize = JC_SIZE - 1;
/// Longest block (instructions).
const MAX_BLOCK: usize = 64;
/// Total decoded instructions after which the whole cache is dropped.
const MAX_CACHED: usize = 1 << 18;
const NO_PAGE: u64 = u64::MAX;

pub(crate) struct Block {
    pub insns: Vec<Insn>,
    pub page: u64,
    pub epoch: u32,
    pub page2: u64,
    pub epoch2: u32,
}

/// Jump-cache entry: a linear RIP and, valid while `gen` matches the cache generation, the
/// block's instruction array and the code pages (with epochs) it was decoded from.
#[derive(Clone, Copy)]
struct JcEntry {
    lin: u64,
    gen: u32,
    sel: u8,
    epoch: u32,
    epoch2: u32,
    len: u32,
    page: u64,
    page2: u64,
    ptr: *const Insn,
}

pub(crate) struct CodeCache {
    blocks: Vec<Block>,
    map: HashMap<u64, u32>,
    jc: Box<[JcEntry]>,
    gen: u32,
    total: usize,
}

impl CodeCache {
    pub fn new() -> Self {
        CodeCache {
            blocks: Vec::new(),
            map: HashMap::new(),
            jc: vec![
                JcEntry {
                    lin: u64::MAX,
                    gen: 0,
                    sel: 0,
                    epoch: 0,
                    epoch2: 0,
                    len: 0,
                    page: 0,
                    page2: NO_PAGE,
                    ptr: std::ptr::null(),
                };
                JC_SIZE
            ]
            .into_boxed_slice(),
            gen: 1,
            total: 0,
        }
    }

    /// Forget linear-address lookups (after TLB flushes and mode changes). Blocks stay.
    pub fn flush_lookup(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.gen = 1;
            for e in self.jc.iter_mut() {
                e.lin = u64::MAX;
            }
        }
    }

    fn clear(&mut self) {
        self.blocks.clear();
        self.map.clear();
        self.total = 0;
        self.flush_lookup();
    }
}

fn mode_key(m: Mode) -> u64 {
    match m.bits() {
        16 => 0,
        32 => 1,
        _ => 2,
    }
}

/// Mnemonics after which a block ends (control transfers and anything that may change the
/// mode, paging, privilege, interrupt flag or that exits).
fn ends_block(i: &Instruction) -> bool {
    use iced_x86::FlowControl;
    !matches!(i.flow_control(), FlowControl::Next) || exec::is_system(i)
}

impl Cpu {
    /// Linear address of RIP.
    #[inline(always)]
    fn rip_lin(&self) -> u64 {
        if self.legacy {
            self.seg[CS].base.wrapping_add(self.rip) & 0xffff_ffff
        } else {
            self.rip
        }
    }

    /// Find (or build) the block at RIP; returns its instruction array.
    #[inline(always)]
    pub(crate) fn lookup_block(&mut self) -> R<(*const Insn, usize)> {
        let lin = self.rip_lin();
        let sel = (self.tlb_off != 0) as u8;
        let j = (lin as usize ^ (lin >> 10) as usize) & JC_MASK;
        let e = &self.cache.jc[j];
        if e.lin == lin
            && e.gen == self.cache.gen
            && e.sel == sel
            // SAFETY: jump-cache entries copy `page`/`page2` from blocks, which are only
            // built from RAM pages, or are the initial entries (page 0, which every RAM
            // has); `page2` is NO_PAGE (tested first) or a RAM page.
            && unsafe {
                self.code_epoch(e.page) == e.epoch
                    && (e.page2 == NO_PAGE || self.code_epoch(e.page2) == e.epoch2)
            }
        {
            return Ok((e.ptr, e.len as usize));
        }
        self.lookup_slow(lin, sel, j)
    }

    #[inline(never)]
    fn lookup_slow(&mut self, lin: u64, sel: u8, j: usize) -> R<(*const Insn, usize)> {
        if self.legacy && self.mode != Mode::Real && self.rip > self.seg[CS].limit as u64 {
            return crate::gp0();
        }
        let gpa = self.translate_exec(lin)?;
        // SEV-ES: code is always fetched through the private view.
        let gpa = if self.sev.is_some() {
            self.sev_fetch(gpa)?
        } else {
            gpa
        };
        if gpa >= self.ram_size {
            self.exit = Some(Exit::Shutdown {
                reason: format!(
                    "instruction fetch from unbacked guest-physical address {gpa:#x} (rip {:#x})",
                    self.rip
                ),
            });
            return Err(Stop::Exit);
        }
        let key = gpa | (mode_key(self.mode) << 60);
        let mut id = None;
        if let Some(&b) = self.cache.map.get(&key) {
            let blk = &self.cache.blocks[b as usize];
            // SAFETY: blocks are only built from RAM pages (`build_block`); `page2` is
            // NO_PAGE (tested first) or a RAM page.
            let fresh = unsafe {
                self.code_epoch(blk.page) == blk.epoch
                    && (blk.page2 == NO_PAGE || self.code_epoch(blk.page2) == blk.epoch2)
            };
            if fresh {
                id = Some(b);
            }
        }
        let id = match id {
            Some(b) => b,
            None => {
                if self.cache.total > MAX_CACHED {
                    self.cache.clear();
                }
                // SAFETY: `gpa < ram_size` (checked above).
                let blk = unsafe { self.build_block(lin, gpa) }?;
                self.cache.total += blk.insns.len();
                let id = if let Some(&old) = self.cache.map.get(&key) {
                    // The old instruction array is freed: forget jump-cache entries to it.
                    self.cache.blocks[old as usize] = blk;
                    self.cache.flush_lookup();
                    old
                } else {
                    let id = self.cache.blocks.len() as u32;
                    self.cache.blocks.push(blk);
                    self.cache.map.insert(key, id);
                    id
                };
                id
            }
        };
        let b = &self.cache.blocks[id as usize];
        let (ptr, len) = (b.insns.as_ptr(), b.insns.len());
        self.cache.jc[j] = JcEntry {
            lin,
            gen: self.cache.gen,
            sel,
            epoch: b.epoch,
            epoch2: b.epoch2,
            len: len as u32,
            page: b.page,
            page2: b.page2,
            ptr,
        };
        Ok((ptr, len))
    }

    /// Decodes the block at `lin` (guest-physical `gpa`), up to the end of its page.
    ///
    /// # Safety
    /// `gpa` must be inside guest RAM (`gpa < ram_size`): the code bytes are copied from
    /// its page unchecked.
    unsafe fn build_block(&mut self, lin: u64, gpa: u64) -> R<Block> {
        let page = gpa >> PAGE_SHIFT;
        let epoch = self.mem.mark_code(page);
        let off = (gpa & 0xfff) as usize;
        let avail = PAGE_SIZE as usize - off;
        let mut buf = [0u8; 4096 + 16];
        // SAFETY: `gpa..gpa+avail` lies within one RAM page (gpa < ram_size by the caller's
        // contract, RAM is a whole number of pages).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.code_src().add(gpa as usize),
                buf.as_mut_ptr(),
                avail,
            )
        };
        let bits = self.mode.bits();
        let mut insns = Vec::new();
        let mut page2 = NO_PAGE;
        let mut epoch2 = 0;
        let mut ip = self.rip;
        let mut pos = 0usize;
        let cs_mask = if bits == 64 { u64::MAX } else { 0xffff_ffff };
        loop {
            let mut dec = Decoder::with_ip(bits, &buf[pos..avail], ip, DecoderOptions::AMD);
            let ins = dec.decode();
            let crosses =
                ins.code() == Code::INVALID && dec.last_error() == DecoderError::NoMoreBytes;
            if crosses {
                if !insns.is_empty() {
                    break;
                }
                // The first instruction crosses into the next page: fetch up to 15 more bytes.
                let lin2 = (lin & !0xfff).wrapping_add(PAGE_SIZE) & cs_mask;
                let g2 = self.translate_exec(lin2)?;
                let g2 = if self.sev.is_some() {
                    self.sev_fetch(g2)?
                } else {
                    g2
                };
                if g2 >= self.ram_size {
                    self.exit = Some(Exit::Shutdown {
                        reason: format!("instruction fetch from unbacked address {g2:#x}"),
                    });
                    return Err(Stop::Exit);
                }
                let p2 = g2 >> PAGE_SHIFT;
                epoch2 = self.mem.mark_code(p2);
                page2 = p2;
                // SAFETY: 16 bytes at the start of a RAM page.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.code_src().add(g2 as usize),
                        buf.as_mut_ptr().add(avail),
                        16,
                    )
                };
                let mut dec = Decoder::with_ip(bits, &buf[..avail + 16], ip, DecoderOptions::AMD);
                let ins = dec.decode();
                let bytes = &buf[..ins.len().max(1)];
                insns.push(exec::make(&ins, self.mode, bytes));
                break;
            }
            let n = ins.len().max(1);
            let bytes = &buf[pos..pos + n];
            let end = ins.code() == Code::INVALID || ends_block(&ins);
            insns.push(exec::make(&ins, self.mode, bytes));
            pos += n;
            ip = ip.wrapping_add(n as u64);
            if end || pos >= avail || insns.len() >= MAX_BLOCK {
                break;
            }
        }
        if self.sev.is_some() {
            exec::system::sev_es::patch(&mut insns);
        }
        Ok(Block {
            insns,
            page,
            epoch,
            page2,
            epoch2,
        })
    }
}
