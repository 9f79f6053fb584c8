//! Address translation: segmentation, the page walk, the software TLB, and guest memory
//! accesses (RAM fast paths, MMIO, page-crossing accesses, host atomics for LOCKed RMW).

use crate::mem::{PAGE_SHIFT, PAGE_SIZE};
use crate::{Cpu, Exc, Exit, Mode, Stop, P_MMIO, R, SS};
use esvm_arch::bits::vector;

mod sev;
pub(crate) mod walk;

use walk::Plain;

pub(crate) const TLB_BITS: u32 = 10;
pub(crate) const TLB_SIZE: usize = 1 << TLB_BITS;
pub(crate) const TLB_MASK: usize = TLB_SIZE - 1;
const INVALID: u64 = u64::MAX;
/// Non-global fills remembered for [`Tlb::flush_nonglobal`]; beyond that it scans.
const NG_LOG: usize = 128;
/// Marks an instruction-TLB index in the non-global log.
const NG_ITLB: u16 = 0x8000;

/// One data TLB entry: the virtual page number for which reads/writes are allowed (INVALID
/// if not), the host address of the page and its guest-physical page number.
#[derive(Clone, Copy)]
pub(crate) struct TlbEntry {
    pub r: u64,
    pub w: u64,
    pub host: usize,
    pub gpn: u64,
}

pub(crate) const EMPTY: TlbEntry = TlbEntry {
    r: INVALID,
    w: INVALID,
    host: 0,
    gpn: 0,
};

/// One instruction TLB entry: a virtual page number allowed for instruction fetch and its
/// guest-physical page number. Decoded blocks found through the jump cache are checked
/// against it, so dropping a translation also stops its blocks from being reached.
#[derive(Clone, Copy)]
pub(crate) struct ItlbEntry {
    pub vpn: u64,
    pub gpn: u64,
}

const IEMPTY: ItlbEntry = ItlbEntry {
    vpn: INVALID,
    gpn: 0,
};

/// Two sets (supervisor, user) of TLB_SIZE direct-mapped data entries and as many
/// instruction entries, with the global (PTE.G with CR4.PGE) flag of each entry, which
/// keeps it across CR3 writes.
pub(crate) struct Tlb {
    pub e: [TlbEntry; 2 * TLB_SIZE],
    pub i: [ItlbEntry; 2 * TLB_SIZE],
    ge: [bool; 2 * TLB_SIZE],
    gi: [bool; 2 * TLB_SIZE],
    /// Entries filled with non-global translations since the last flush (NG_ITLB marks
    /// instruction entries), unless `ng_full`.
    ng: Vec<u16>,
    ng_full: bool,
}

impl Tlb {
    pub fn new_boxed() -> Box<Tlb> {
        Box::new(Tlb {
            e: [EMPTY; 2 * TLB_SIZE],
            i: [IEMPTY; 2 * TLB_SIZE],
            ge: [false; 2 * TLB_SIZE],
            gi: [false; 2 * TLB_SIZE],
            ng: Vec::with_capacity(NG_LOG),
            ng_full: false,
        })
    }

    /// Drop every entry.
    pub fn flush(&mut self) {
        self.e.fill(EMPTY);
        self.i.fill(IEMPTY);
        self.ge.fill(false);
        self.gi.fill(false);
        self.ng.clear();
        self.ng_full = false;
    }

    /// Drop the entries of non-global translations (MOV to CR3 with CR4.PGE set).
    pub fn flush_nonglobal(&mut self) {
        if self.ng_full {
            for k in 0..2 * TLB_SIZE {
                if !self.ge[k] {
                    self.e[k] = EMPTY;
                }
                if !self.gi[k] {
                    self.i[k] = IEMPTY;
                }
            }
        } else {
            for &k in &self.ng {
                let idx = (k & !NG_ITLB) as usize & (2 * TLB_SIZE - 1);
                if k & NG_ITLB != 0 {
                    if !self.gi[idx] {
                        self.i[idx] = IEMPTY;
                    }
                } else if !self.ge[idx] {
                    self.e[idx] = EMPTY;
                }
            }
        }
        self.ng.clear();
        self.ng_full = false;
    }

    /// Drop the data translations to guest-physical page `gpn` (both privilege sets, global
    /// or not): after an SEV-ES page conversion, their host addresses point at the view the
    /// page left.
    pub fn flush_gpn(&mut self, gpn: u64) {
        for e in self.e.iter_mut() {
            if e.gpn == gpn {
                *e = EMPTY;
            }
        }
    }

    /// Drop the translations of the page of `lin` (both privilege sets, global or not).
    pub fn flush_page(&mut self, lin: u64) {
        let vpn = lin >> PAGE_SHIFT;
        let i = vpn as usize & TLB_MASK;
        for k in [i, i + TLB_SIZE] {
            self.e[k] = EMPTY;
            self.i[k] = IEMPTY;
        }
    }

    #[inline]
    fn log_nonglobal(&mut self, k: u16) {
        if self.ng.len() < NG_LOG {
            self.ng.push(k);
        } else {
            self.ng_full = true;
        }
    }

    /// Fill data entry `k` (index with set) for `vpn` -> `gpn` at host address `host`:
    /// readable, and writable if `w`.
    #[inline]
    pub fn fill_data(&mut self, k: usize, vpn: u64, host: usize, gpn: u64, w: bool, g: bool) {
        let k = k & (2 * TLB_SIZE - 1);
        let e = &mut self.e[k];
        if e.r != vpn || e.gpn != gpn {
            *e = EMPTY;
        }
        e.r = vpn;
        e.host = host;
        e.gpn = gpn;
        if w {
            e.w = vpn;
        }
        self.ge[k] = g;
        if !g {
            self.log_nonglobal(k as u16);
        }
    }

    /// Whether instruction entry `k` (index with set) holds a global translation of `vpn`.
    #[inline]
    pub fn exec_global(&self, k: usize, vpn: u64) -> bool {
        let k = k & (2 * TLB_SIZE - 1);
        self.i[k].vpn == vpn && self.gi[k]
    }

    /// Fill instruction entry `k` (index with set) for `vpn` -> `gpn`.
    #[inline]
    pub fn fill_exec(&mut self, k: usize, vpn: u64, gpn: u64, g: bool) {
        let k = k & (2 * TLB_SIZE - 1);
        self.i[k] = ItlbEntry { vpn, gpn };
        self.gi[k] = g;
        if !g {
            self.log_nonglobal(k as u16 | NG_ITLB);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Acc {
    Read,
    Write,
    Exec,
}

/// Reads `S` (1, 2, 4 or 8) bytes at `p`, little-endian, any alignment.
///
/// # Safety
/// `p..p + S` must be readable host memory: a range inside guest RAM or the private backing,
/// which the vCPU's `PhysMemory` keeps mapped. (Guest memory is shared with other threads,
/// so it is read with a raw copy, never through a reference.)
#[inline(always)]
unsafe fn rd_host<const S: usize>(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees `S` readable bytes at `p`; unaligned reads are fine.
    unsafe {
        match S {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Writes the low `S` (1, 2, 4 or 8) bytes of `v` at `p`, little-endian, any alignment.
///
/// # Safety
/// `p..p + S` must be writable host memory inside guest RAM or the private backing (see
/// [`rd_host`]).
#[inline(always)]
unsafe fn wr_host<const S: usize>(p: *mut u8, v: u64) {
    // SAFETY: the caller guarantees `S` writable bytes at `p`; unaligned writes are fine.
    unsafe {
        match S {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}

impl Cpu {
    // ------------------------------------------------------------------ segmentation

    /// Linear address of `seg:off` for an access of `size` bytes (segment limit checks in
    /// legacy modes). `write` selects the write checks.
    #[inline(always)]
    pub(crate) fn lin(&self, seg: usize, off: u64, size: usize, write: bool) -> R<u64> {
        if !self.legacy {
            return Ok(self.seg_base[seg].wrapping_add(off));
        }
        self.lin_legacy(seg, off, size, write)
    }

    #[cold]
    fn lin_legacy(&self, seg: usize, off: u64, size: usize, write: bool) -> R<u64> {
        let s = &self.seg[seg];
        if self.mode != Mode::Real && self.mode != Mode::Compat16 && self.mode != Mode::Compat32 {
            // Protected mode: null/unusable segment, type and limit checks.
            let a = s.attrib;
            let fault = || {
                if seg == SS {
                    Stop::Exc(Exc::ec(vector::SS, 0))
                } else {
                    Stop::Exc(Exc::ec(vector::GP, 0))
                }
            };
            if !a.present() {
                return Err(fault());
            }
            if write && (a.is_code() || a.seg_type() & 2 == 0) {
                return Err(fault());
            }
            let end = off.wrapping_add(size as u64 - 1);
            if a.s() && !a.is_code() && a.seg_type() & 4 != 0 {
                // Expand-down.
                let upper = if a.db() { 0xffff_ffff } else { 0xffff };
                if off <= s.limit as u64 || end > upper {
                    return Err(fault());
                }
            } else if end > s.limit as u64 || end < off {
                return Err(fault());
            }
        } else if self.mode == Mode::Real {
            let end = off.wrapping_add(size as u64 - 1);
            if end > s.limit as u64 {
                return Err(if seg == SS {
                    Stop::Exc(Exc::ec(vector::SS, 0))
                } else {
                    Stop::Exc(Exc::ec(vector::GP, 0))
                });
            }
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    // ------------------------------------------------------------------ TLB fast paths

    #[inline(always)]
    pub(crate) fn tlb_idx(&self, vpn: u64) -> usize {
        (self.tlb_off | (vpn as usize & TLB_MASK)) & (2 * TLB_SIZE - 1)
    }

    /// Read `S` bytes at linear address `lin`.
    #[inline(always)]
    pub(crate) fn rd_lin<const S: usize>(&mut self, lin: u64) -> R<u64> {
        let vpn = lin >> PAGE_SHIFT;
        let off = (lin & 0xfff) as usize;
        let e = &self.tlb.e[self.tlb_idx(vpn)];
        if e.r == vpn && off <= 4096 - S {
            // SAFETY: a TLB entry matching `vpn` holds the host address of a whole 4 KiB
            // page of guest RAM or the private backing (entries are flushed whenever a page
            // changes backing), and `off + S` stays inside that page.
            return Ok(unsafe { rd_host::<S>((e.host + off) as *const u8) });
        }
        self.rd_slow(lin, S, false).map(|v| v as u64)
    }

    /// Write `S` bytes at linear address `lin`.
    #[inline(always)]
    pub(crate) fn wr_lin<const S: usize>(&mut self, lin: u64, v: u64) -> R {
        let vpn = lin >> PAGE_SHIFT;
        let off = (lin & 0xfff) as usize;
        let e = &self.tlb.e[self.tlb_idx(vpn)];
        if e.w == vpn && off <= 4096 - S {
            let gpn = e.gpn;
            // SAFETY: as in `rd_lin`: a page of RAM or the private backing, whose number
            // `gpn` the writable entry also holds (so it is a RAM page).
            unsafe {
                wr_host::<S>((e.host + off) as *mut u8, v);
                self.note_write(gpn);
            }
            return Ok(());
        }
        self.wr_slow(lin, S, v as u128, false)
    }

    /// Read through a segment.
    #[inline(always)]
    pub(crate) fn rd<const S: usize>(&mut self, seg: usize, off: u64) -> R<u64> {
        let l = self.lin(seg, off, S, false)?;
        self.rd_lin::<S>(l)
    }

    #[inline(always)]
    pub(crate) fn wr<const S: usize>(&mut self, seg: usize, off: u64, v: u64) -> R {
        let l = self.lin(seg, off, S, true)?;
        self.wr_lin::<S>(l, v)
    }

    /// Read with a run-time size (1, 2, 4, 8).
    pub(crate) fn rd_sz(&mut self, seg: usize, off: u64, sz: u8) -> R<u64> {
        match sz {
            1 => self.rd::<1>(seg, off),
            2 => self.rd::<2>(seg, off),
            4 => self.rd::<4>(seg, off),
            _ => self.rd::<8>(seg, off),
        }
    }

    pub(crate) fn wr_sz(&mut self, seg: usize, off: u64, sz: u8, v: u64) -> R {
        match sz {
            1 => self.wr::<1>(seg, off, v),
            2 => self.wr::<2>(seg, off, v),
            4 => self.wr::<4>(seg, off, v),
            _ => self.wr::<8>(seg, off, v),
        }
    }

    /// Check that `size` bytes at `lin` are writable (translating and setting D) without
    /// writing, so a multi-part operation faults before changing anything.
    pub(crate) fn probe_write(&mut self, lin: u64, size: usize) -> R {
        let first = lin & !0xfff;
        let last = lin.wrapping_add(size as u64 - 1) & !0xfff;
        let user = self.cpl == 3;
        self.translate(first | (lin & 0xfff), Acc::Write, user)?;
        if last != first {
            self.translate(last, Acc::Write, user)?;
        }
        Ok(())
    }

    /// Host address of the start of the RAM page holding `lin` with read (or, with `write`,
    /// write) permission at the current privilege, and its guest-physical page number: from
    /// the TLB, or by translating (faults as an access would, and fills the TLB). None if the
    /// page is not RAM (the callers then take the per-access path, which makes the MMIO exit,
    /// the #VC or the SEV-ES shutdown).
    ///
    /// In SEV-ES mode the address is in the backing the data access goes to, as the TLB holds
    /// it: the private backing through a C-bit-set leaf (the page converted to Private, if it
    /// was not), guest RAM through a C-bit-clear one (the page converted to Shared). It stays
    /// where the page's content lives until the next conversion of that page
    /// ([`Cpu::sev_conversions`] tells a caller whether this vCPU made one since).
    #[inline]
    pub(crate) fn host_page(&mut self, lin: u64, write: bool) -> R<Option<(usize, u64)>> {
        let vpn = lin >> PAGE_SHIFT;
        let k = self.tlb_idx(vpn);
        let hit = |e: &TlbEntry| (if write { e.w } else { e.r }) == vpn;
        if hit(&self.tlb.e[k]) {
            let e = &self.tlb.e[k];
            return Ok(Some((e.host, e.gpn)));
        }
        let acc = if write { Acc::Write } else { Acc::Read };
        self.translate(lin, acc, self.cpl == 3)?;
        // `translate` fills entry `k` (the set of the current privilege) exactly when the
        // page is RAM, with the view's backing in SEV-ES mode; a successful write
        // translation makes the entry writable (D is set).
        let e = &self.tlb.e[k];
        Ok(hit(e).then_some((e.host, e.gpn)))
    }

    // ------------------------------------------------------------------ slow paths

    /// Read `size` (1..=16) bytes at `lin`; `sys` makes it a supervisor (implicit) access.
    #[inline(never)]
    pub(crate) fn rd_slow(&mut self, lin: u64, size: usize, sys: bool) -> R<u128> {
        let user = self.cpl == 3 && !sys;
        let off = (lin & 0xfff) as usize;
        if off + size <= PAGE_SIZE as usize {
            let gpa = self.translate(lin, Acc::Read, user)?;
            return self.phys_read(gpa, size);
        }
        // Page-crossing: translate both pages first.
        let n1 = PAGE_SIZE as usize - off;
        let lin2 = self.wrap_lin(lin.wrapping_add(n1 as u64));
        let g1 = self.translate(lin, Acc::Read, user)?;
        let g2 = self.translate(lin2, Acc::Read, user)?;
        let lo = self.phys_read(g1, n1)?;
        let hi = self.phys_read(g2, size - n1)?;
        Ok(lo | (hi << (8 * n1)))
    }

    #[inline(never)]
    pub(crate) fn wr_slow(&mut self, lin: u64, size: usize, v: u128, sys: bool) -> R {
        let user = self.cpl == 3 && !sys;
        let off = (lin & 0xfff) as usize;
        if off + size <= PAGE_SIZE as usize {
            let gpa = self.translate(lin, Acc::Write, user)?;
            return self.phys_write(gpa, size, v);
        }
        let n1 = PAGE_SIZE as usize - off;
        let lin2 = self.wrap_lin(lin.wrapping_add(n1 as u64));
        let g1 = self.translate(lin, Acc::Write, user)?;
        let g2 = self.translate(lin2, Acc::Write, user)?;
        self.phys_write(g1, n1, v)?;
        self.phys_write(g2, size - n1, v >> (8 * n1))
    }

    fn wrap_lin(&self, lin: u64) -> u64 {
        if self.mode == Mode::Long64 {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }

    /// Supervisor-privilege (implicit) accesses of 1, 2, 4 or 8 bytes: descriptor tables,
    /// TSS, IDT, delivery. They hit in the supervisor TLB set whatever the CPL.
    pub(crate) fn rd_sys(&mut self, lin: u64, size: usize) -> R<u64> {
        let vpn = lin >> PAGE_SHIFT;
        let off = (lin & 0xfff) as usize;
        let e = &self.tlb.e[vpn as usize & TLB_MASK];
        if e.r == vpn && off + size <= PAGE_SIZE as usize {
            let p = (e.host + off) as *const u8;
            // SAFETY: as in `rd_lin`: the entry holds a whole page of RAM or the private
            // backing, and `off + size` stays inside it.
            return Ok(unsafe {
                match size {
                    1 => rd_host::<1>(p),
                    2 => rd_host::<2>(p),
                    4 => rd_host::<4>(p),
                    _ => rd_host::<8>(p),
                }
            });
        }
        self.rd_slow(lin, size, true).map(|v| v as u64)
    }

    pub(crate) fn wr_sys(&mut self, lin: u64, size: usize, v: u64) -> R {
        let vpn = lin >> PAGE_SHIFT;
        let off = (lin & 0xfff) as usize;
        let e = &self.tlb.e[vpn as usize & TLB_MASK];
        if e.w == vpn && off + size <= PAGE_SIZE as usize {
            let (p, gpn) = ((e.host + off) as *mut u8, e.gpn);
            // SAFETY: as in `wr_lin`: a page of RAM or the private backing, whose number
            // `gpn` the writable entry also holds (so it is a RAM page).
            unsafe {
                match size {
                    1 => wr_host::<1>(p, v),
                    2 => wr_host::<2>(p, v),
                    4 => wr_host::<4>(p, v),
                    _ => wr_host::<8>(p, v),
                }
                self.note_write(gpn);
            }
            return Ok(());
        }
        self.wr_slow(lin, size, v as u128, true)
    }

    /// Read `size` bytes of guest-physical memory (RAM or MMIO); never crosses a page.
    pub(crate) fn phys_read(&mut self, gpa: u64, size: usize) -> R<u128> {
        if gpa + size as u64 <= self.ram_size {
            let mut b = [0u8; 16];
            // SAFETY: `gpa..gpa+size` is inside RAM (checked above); raw copy from shared
            // guest memory.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ram.add(gpa as usize), b.as_mut_ptr(), size)
            };
            return Ok(u128::from_le_bytes(b));
        }
        if self.sev.is_some() {
            return self.sev_phys_read(gpa, size);
        }
        self.mmio_read(gpa, size)
    }

    pub(crate) fn phys_write(&mut self, gpa: u64, size: usize, v: u128) -> R {
        if gpa + size as u64 <= self.ram_size {
            let b = v.to_le_bytes();
            // SAFETY: `gpa..gpa+size` is inside RAM (checked above), so is its page.
            unsafe {
                std::ptr::copy_nonoverlapping(b.as_ptr(), self.ram.add(gpa as usize), size);
                self.note_write(gpa >> PAGE_SHIFT);
            }
            return Ok(());
        }
        if self.sev.is_some() {
            return self.sev_phys_write(gpa, size, v);
        }
        self.mmio_write(gpa, size, v);
        Ok(())
    }

    fn mmio_read(&mut self, gpa: u64, size: usize) -> R<u128> {
        self.pending |= P_MMIO;
        if self.mmio.cursor < self.mmio.reads.len() {
            let b = self.mmio.reads[self.mmio.cursor];
            self.mmio.cursor += 1;
            let mut v = u128::from_le_bytes(b);
            if size < 16 {
                v &= (1u128 << (8 * size)) - 1;
            }
            return Ok(v);
        }
        self.mmio.awaiting = true;
        self.exit = Some(Exit::MmioRead {
            gpa,
            size: size as u8,
        });
        Err(Stop::Exit)
    }

    fn mmio_write(&mut self, gpa: u64, size: usize, v: u128) {
        self.pending |= P_MMIO;
        let mut data = [0u8; 16];
        data[..size].copy_from_slice(&v.to_le_bytes()[..size]);
        self.mmio.writes.push_back((gpa, size as u8, data));
    }

    // ------------------------------------------------------------------ translation

    /// Translate `lin` for `acc` at user (`user`) or supervisor privilege; fills the TLB.
    pub(crate) fn translate(&mut self, lin: u64, acc: Acc, user: bool) -> R<u64> {
        if self.sev.is_some() {
            return self.translate_sev(lin, acc, user);
        }
        let w = self.walk(Plain, lin, acc, user)?;
        let vpn = lin >> PAGE_SHIFT;
        let gpn = w.gpa >> PAGE_SHIFT;
        if w.gpa < self.ram_size {
            // Post-copy: a missing page is waited for before the TLB gets its host pointer
            // and before the caller touches it (`mem::postcopy`).
            self.wait_present(gpn)?;
        }
        // Fill the set of the access's privilege (user: only ever at CPL 3; supervisor: the
        // CPL 0-2 set, also for implicit supervisor accesses at CPL 3). Fetches fill the
        // instruction TLB only, data accesses the data TLB only.
        if w.gpa < self.ram_size {
            let k = (vpn as usize & TLB_MASK) | if user { TLB_SIZE } else { 0 };
            if acc == Acc::Exec {
                if w.x {
                    self.tlb.fill_exec(k, vpn, gpn, w.global);
                }
            } else {
                let host = self.ram as usize + (gpn << PAGE_SHIFT) as usize;
                self.tlb.fill_data(k, vpn, host, gpn, w.w, w.global);
            }
        }
        Ok(w.gpa | (lin & 0xfff))
    }

    /// Post-copy: wait until RAM page `gpn` arrived (at once unless it is missing). If the
    /// migration fails first, the vCPU stops with a shutdown exit naming the failure: a
    /// guest never runs on with a page missing.
    #[inline(always)]
    pub(crate) fn wait_present(&mut self, gpn: u64) -> R {
        match self.mem.wait_present(gpn) {
            Ok(()) => Ok(()),
            Err(reason) => self.missing_page_stop(gpn, reason),
        }
    }

    #[cold]
    fn missing_page_stop(&mut self, gpn: u64, reason: String) -> R {
        self.exit = Some(Exit::Shutdown {
            reason: format!(
                "guest page {:#x} never arrived from the migration source: {reason}",
                gpn << PAGE_SHIFT
            ),
        });
        Err(Stop::Exit)
    }

    /// Translate for instruction fetch: returns the guest-physical address of `lin`.
    pub(crate) fn translate_exec(&mut self, lin: u64) -> R<u64> {
        let vpn = lin >> PAGE_SHIFT;
        let e = &self.tlb.i[self.tlb_idx(vpn)];
        if e.vpn == vpn {
            return Ok((e.gpn << PAGE_SHIFT) | (lin & 0xfff));
        }
        let user = self.cpl == 3;
        self.translate(lin, Acc::Exec, user)
    }

    /// Host pointer for a RAM access of `size` bytes at `lin` with write permission, for
    /// LOCKed read-modify-write (None if it crosses a page or is MMIO).
    pub(crate) fn host_rmw_ptr(&mut self, lin: u64, size: usize) -> R<Option<(*mut u8, u64)>> {
        if (lin & 0xfff) as usize + size > PAGE_SIZE as usize {
            return Ok(None);
        }
        let user = self.cpl == 3;
        let gpa = self.translate(lin, Acc::Write, user)?;
        if self.sev.is_some() {
            return self.sev_rmw_ptr(gpa, size);
        }
        if gpa + size as u64 > self.ram_size {
            return Ok(None);
        }
        // SAFETY: inside RAM (checked).
        Ok(Some((
            unsafe { self.ram.add(gpa as usize) },
            gpa >> PAGE_SHIFT,
        )))
    }

    /// Logs a LOCKed read-modify-write through [`Cpu::host_rmw_ptr`]'s pointer.
    ///
    /// # Safety
    /// `gpn` is the page number `host_rmw_ptr` returned with the pointer (a RAM page).
    pub(crate) unsafe fn note_rmw(&mut self, gpn: u64) {
        // SAFETY: `gpn` is a RAM page (the caller's contract).
        unsafe { self.note_write(gpn) };
    }
}

/// The bus lock of LOCKed operations that cannot be one host atomic (their operand crosses
/// a page, so its two halves may be far apart on the host, or lies in MMIO): they run as a
/// read and a write while holding this process-wide mutex. Every LOCKed access to such an
/// operand (same address and size) takes it too, so they are atomic with respect to each
/// other across all vCPUs, as a split lock is on hardware. (A LOCKed access of a different
/// size overlapping part of such an operand does not take it; software does not mix those.)
static SPLIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Hold the bus lock of [`SPLIT_LOCK`] for one split LOCKed operation.
pub(crate) fn split_lock() -> std::sync::MutexGuard<'static, ()> {
    // Nothing is protected by the unit value: a panic while held leaves nothing torn.
    SPLIT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Atomic compare-exchange on guest RAM of any alignment: returns the value found.
///
/// # Safety
/// `p..p + size` (`size` 1, 2, 4 or 8) must be writable host memory inside guest RAM or the
/// private backing, as [`Cpu::host_rmw_ptr`] returns it.
pub(crate) unsafe fn cmpxchg_host(p: *mut u8, size: usize, old: u64, new: u64) -> u64 {
    let prev: u64;
    // SAFETY: `p` points to `size` writable bytes of guest memory (the caller's contract);
    // LOCK CMPXCHG works on any alignment on x86-64 (split locks are slow but atomic).
    unsafe {
        match size {
            1 => {
                let mut a = old as u8;
                std::arch::asm!("lock cmpxchg byte ptr [{p}], {n}", p = in(reg) p, n = in(reg_byte) new as u8, inout("al") a);
                prev = a as u64;
            }
            2 => {
                let mut a = old as u16;
                std::arch::asm!("lock cmpxchg word ptr [{p}], {n:x}", p = in(reg) p, n = in(reg) new as u16, inout("ax") a);
                prev = a as u64;
            }
            4 => {
                let mut a = old as u32;
                std::arch::asm!("lock cmpxchg dword ptr [{p}], {n:e}", p = in(reg) p, n = in(reg) new as u32, inout("eax") a);
                prev = a as u64;
            }
            _ => {
                let mut a = old;
                std::arch::asm!("lock cmpxchg qword ptr [{p}], {n}", p = in(reg) p, n = in(reg) new, inout("rax") a);
                prev = a;
            }
        }
    }
    prev
}

/// Atomic 16-byte compare-exchange (guest checked 16-byte alignment).
///
/// # Safety
/// `p..p + 16` must be writable host memory inside guest RAM or the private backing, as
/// [`Cpu::host_rmw_ptr`] returns it, and `p` must be 16-byte aligned.
pub(crate) unsafe fn cmpxchg16_host(p: *mut u8, old: u128, new: u128) -> u128 {
    let lo: u64;
    let hi: u64;
    // SAFETY: `p` is 16 writable, 16-byte aligned bytes of guest memory (the caller's
    // contract; CMPXCHG16B raised #GP otherwise). rbx is reserved by LLVM, so it is swapped
    // in and out around the instruction.
    unsafe {
        std::arch::asm!(
            "xchg {nlo}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "mov rbx, {nlo}",
            p = in(reg) p,
            nlo = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") old as u64 => lo,
            inout("rdx") (old >> 64) as u64 => hi,
        );
    }
    (lo as u128) | ((hi as u128) << 64)
}
