//! The decoded-instruction cache: guest code is decoded once per guest-physical location
//! into blocks of [`Insn`]s (each with its handler), looked up through a small jump cache
//! keyed by linear RIP and a map keyed by guest-physical address and code size.

use crate::exec::{self, Insn};
use crate::mem::{PAGE_SHIFT, PAGE_SIZE};
use crate::{Cpu, Exit, Mode, Stop, CS, R};
use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const JC_SIZE: usize = 4096;
const JC_MASK: usize = JC_SIZE - 1;
/// Longest block (instructions).
const MAX_BLOCK: usize = 64;
/// Total decoded instructions after which the whole cache is dropped.
const MAX_CACHED: usize = 1 << 18;
const NO_PAGE: u64 = u64::MAX;

/// Hasher of the block map's keys (guest-physical address | mode): one folded multiply
/// instead of SipHash (the keys are not attacker-chosen in a way that matters: a guest can
/// only slow down its own lookups).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        let p = ((self.0 ^ v) as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }
}

type BlockMap = HashMap<u64, u32, BuildHasherDefault<KeyHasher>>;

pub(crate) struct Block {
    pub insns: Vec<Insn>,
    pub page: u64,
    pub epoch: u32,
    pub page2: u64,
    pub epoch2: u32,
}

/// Jump-cache entry: a linear RIP and, valid while `gen` is the cache's current generation
/// (or its current global generation), for the privilege `sel`, the block's instruction
/// array and the code page (with its epoch) it was decoded from. Blocks decoded from two
/// pages (their only instruction crosses a page) are never entered: they are found through
/// the block map, which checks the second page's translation.
#[derive(Clone, Copy)]
struct JcEntry {
    lin: u64,
    page: u64,
    ptr: *const Insn,
    gen: u32,
    epoch: u32,
    len: u32,
    sel: u8,
}

pub(crate) struct CodeCache {
    blocks: Vec<Block>,
    map: BlockMap,
    jc: Box<[JcEntry; JC_SIZE]>,
    /// Generation of entries whose code pages have non-global translations: bumped by
    /// every lookup flush, including MOV to CR3.
    gen: u32,
    /// Generation of entries whose code pages all have global translations (CR4.PGE): kept
    /// across MOV to CR3, like the TLB entries of those pages.
    ggen: u32,
    /// Last generation number handed out (`gen` and `ggen` never take a value twice).
    last: u32,
    total: usize,
}

impl CodeCache {
    pub fn new() -> Self {
        CodeCache {
            blocks: Vec::new(),
            map: BlockMap::default(),
            jc: vec![
                JcEntry {
                    lin: u64::MAX,
                    page: 0,
                    ptr: std::ptr::null(),
                    gen: 0,
                    epoch: 0,
                    len: 0,
                    sel: 0,
                };
                JC_SIZE
            ]
            .into_boxed_slice()
            .try_into()
            .unwrap_or_else(|_| unreachable!("JC_SIZE entries")),
            gen: 2,
            ggen: 1,
            last: 2,
            total: 0,
        }
    }

    /// Forget linear-address lookups (after TLB flushes and mode changes, and when
    /// instruction arrays are freed). Blocks stay.
    pub fn flush_lookup(&mut self) {
        // Two fresh numbers: were `gen` and `ggen` equal, the entries cached from now on
        // for non-global pages would pass for global ones and survive MOV to CR3.
        self.ggen = self.next_gen();
        self.gen = self.next_gen();
    }

    /// Forget the lookups of code on pages with non-global translations (MOV to CR3 with
    /// CR4.PGE set).
    pub fn flush_lookup_nonglobal(&mut self) {
        self.gen = self.next_gen();
    }

    /// A generation number never handed out before (nor equal to `ggen`).
    fn next_gen(&mut self) -> u32 {
        self.last = self.last.wrapping_add(1);
        if self.last == 0 {
            // Numbers are about to repeat: forget every lookup and start over.
            for e in self.jc.iter_mut() {
                e.lin = u64::MAX;
            }
            self.ggen = 1;
            self.last = 2;
        }
        self.last
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

/// Instructions after which a block ends: control transfers and anything that may change
/// the mode, paging, privilege, interrupt flag or that exits. Conditional near jumps (Jcc)
/// do not end blocks: the rest of the block is their fall-through path, and a taken Jcc
/// leaves the block with [`Stop::Branch`].
fn ends_block(i: &Instruction) -> bool {
    use iced_x86::FlowControl;
    match i.flow_control() {
        FlowControl::Next => exec::is_system(i),
        FlowControl::ConditionalBranch => !i.is_jcc_short_or_near(),
        _ => true,
    }
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
            && (e.gen == self.cache.gen || e.gen == self.cache.ggen)
            && e.sel == sel
            // SAFETY: jump-cache entries copy `page` from blocks, which are only built from
            // RAM pages, or are the initial entries (page 0, which every RAM has).
            && unsafe { self.code_epoch(e.page) == e.epoch }
        {
            return Ok((e.ptr, e.len as usize));
        }
        self.lookup_slow(lin, sel, j)
    }

    /// Linear address of the page after the one of `lin` (wrapping at 4 GiB outside
    /// 64-bit mode).
    fn next_page_lin(&self, lin: u64) -> u64 {
        let cs_mask = if self.legacy { 0xffff_ffff } else { u64::MAX };
        (lin & !0xfff).wrapping_add(PAGE_SIZE) & cs_mask
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
            let (page2, epoch2) = (blk.page2, blk.epoch2);
            // SAFETY: blocks are only built from RAM pages (`build_block`); `page2` is
            // NO_PAGE (tested first) or a RAM page.
            let fresh = unsafe {
                self.code_epoch(blk.page) == blk.epoch
                    && (page2 == NO_PAGE || self.code_epoch(page2) == epoch2)
            };
            if fresh
                && (page2 == NO_PAGE || self.fetch_page(self.next_page_lin(lin))? == Some(page2))
            {
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
        if b.page2 != NO_PAGE {
            // Found through the block map every time (see JcEntry).
            return Ok((ptr, len));
        }
        // A global translation makes the entry survive MOV to CR3.
        let vpn = lin >> PAGE_SHIFT;
        let global = self.tlb.exec_global(self.tlb_idx(vpn), vpn);
        self.cache.jc[j] = JcEntry {
            lin,
            page: b.page,
            ptr,
            gen: if global {
                self.cache.ggen
            } else {
                self.cache.gen
            },
            epoch: b.epoch,
            len: len as u32,
            sel,
        };
        Ok((ptr, len))
    }

    /// The RAM page instruction fetch at `lin` reads (None: not RAM).
    fn fetch_page(&mut self, lin: u64) -> R<Option<u64>> {
        let g = self.translate_exec(lin)?;
        // SEV-ES: code is always fetched through the private view.
        let g = if self.sev.is_some() {
            self.sev_fetch(g)?
        } else {
            g
        };
        Ok((g < self.ram_size).then_some(g >> PAGE_SHIFT))
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
        // A block is at most MAX_BLOCK instructions of at most 15 bytes: copy no more.
        let len = avail.min(MAX_BLOCK * 15);
        let mut buf = [0u8; MAX_BLOCK * 15];
        // SAFETY: `gpa..gpa+len` lies within one RAM page (gpa < ram_size, RAM is a whole
        // number of pages, len <= avail).
        unsafe {
            std::ptr::copy_nonoverlapping(self.code_src().add(gpa as usize), buf.as_mut_ptr(), len)
        };
        let bits = self.mode.bits();
        let mut insns = Vec::new();
        let mut page2 = NO_PAGE;
        let mut epoch2 = 0;
        let mut dec = Decoder::with_ip(bits, &buf[..len], self.rip, DecoderOptions::AMD);
        loop {
            let pos = dec.position();
            let ins = dec.decode();
            if ins.code() == Code::INVALID && dec.last_error() == DecoderError::NoMoreBytes {
                // Only possible when `len == avail`: the instruction crosses into the next
                // page.
                if !insns.is_empty() {
                    break;
                }
                // The first instruction crosses: fetch up to 15 more bytes.
                let lin2 = self.next_page_lin(lin);
                let Some(p2) = self.fetch_page(lin2)? else {
                    self.exit = Some(Exit::Shutdown {
                        reason: format!("instruction fetch from unbacked linear address {lin2:#x}"),
                    });
                    return Err(Stop::Exit);
                };
                let g2 = p2 << PAGE_SHIFT;
                epoch2 = self.mem.mark_code(p2);
                page2 = p2;
                // `avail` < 15 here: the rest of this page, then 16 bytes of the next.
                let mut b2 = [0u8; 32];
                b2[..avail].copy_from_slice(&buf[..avail]);
                // SAFETY: 16 bytes at the start of a RAM page.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.code_src().add(g2 as usize),
                        b2.as_mut_ptr().add(avail),
                        16,
                    )
                };
                let mut dec =
                    Decoder::with_ip(bits, &b2[..avail + 16], self.rip, DecoderOptions::AMD);
                let ins = dec.decode();
                let bytes = &b2[..ins.len().max(1)];
                insns.push(exec::make(&ins, self.mode, bytes));
                break;
            }
            let n = ins.len().max(1);
            let end = ins.code() == Code::INVALID || ends_block(&ins);
            insns.push(exec::make(&ins, self.mode, &buf[pos..pos + n]));
            if end || pos + n >= len || insns.len() >= MAX_BLOCK {
                break;
            }
        }
        if let Some(sev) = &self.sev {
            exec::system::sev_es::patch(&mut insns, &sev.intercepts);
        }
        if self.mode == Mode::Long64 {
            exec::alu::fuse_cmp_jcc(&mut insns);
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
