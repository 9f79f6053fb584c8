//! Address translation in SEV-ES mode: the page walk with the C-bit, the TLB fill with the
//! view's backing, and guest-physical accesses to the private view and to MMIO (#VC).
//!
//! `walk_sev` mirrors the plain `walk` (same permission, reserved-bit and A/D rules; the
//! differential test `sev::tests::walk_matches_plain_walk` keeps them in step) and adds the
//! C-bit: stripped from CR3 and every entry (never reserved), choosing the view of the data
//! (the leaf's). Page tables are always read and updated through the private view, whatever
//! the C-bit of the entry (or CR3) that points to them (AMD APM vol. 2, "Secure Encrypted
//! Virtualization": guest page-table accesses are private).
//!
//! A translated guest-physical address carries the C-bit as a *tag* (`gpa | cmask`) when the
//! access goes to the private view; plain addresses at or above the RAM size then never take
//! the RAM fast paths of `phys_read`/`phys_write` and land in [`Cpu::sev_phys_read`] /
//! [`Cpu::sev_phys_write`].

use super::{canonical, Acc, Walk, EMPTY, PF_ID, PF_P, PF_RSVD, PF_U, PF_W, PHYS_MASK};
use crate::mem::{View, PAGE_SHIFT};
use crate::sev::exit_code;
use crate::{Cpu, Exc, Stop, R};
use esvm_arch::bits::{cr0, cr4, efer, vector};

/// A successful SEV walk: the plain walk result and the leaf's C-bit.
struct SevWalk {
    w: Walk,
    /// The data access goes to the private view.
    private: bool,
}

fn view_of(private: bool) -> View {
    if private {
        View::Private
    } else {
        View::Shared
    }
}

impl Cpu {
    /// Translate `lin` in SEV-ES mode (see `translate`): fills the TLB with the data view's
    /// backing and returns the guest-physical address, tagged with the C-bit for a private
    /// access. Fetches are private whatever the leaf says.
    pub(crate) fn translate_sev(&mut self, lin: u64, acc: Acc, user: bool) -> R<u64> {
        let sw = self.walk_sev(lin, acc, user)?;
        let cmask = self.sev_cmask();
        let gpa = sw.w.gpa;
        let private = sw.private || acc == Acc::Exec;
        if gpa < self.ram_size {
            let vpn = lin >> PAGE_SHIFT;
            let gpn = gpa >> PAGE_SHIFT;
            let base = self.sev_view(gpn, view_of(private))?;
            if user == (self.cpl == 3) {
                let i = self.tlb_idx(vpn);
                let e = &mut self.tlb.e[i];
                if private != sw.private {
                    // A fetch through a C-bit-clear mapping: the page is private now, so
                    // the entry must not serve data accesses (they need the shared view).
                    *e = EMPTY;
                    e.gpn = gpn;
                    e.x = vpn;
                } else {
                    if e.r != vpn || e.gpn != gpn {
                        *e = EMPTY;
                    }
                    e.r = vpn;
                    e.host = base as usize + (gpn << PAGE_SHIFT) as usize;
                    e.gpn = gpn;
                    if sw.w.w {
                        e.w = vpn;
                    }
                    if sw.w.x {
                        e.x = vpn;
                    }
                }
            }
        }
        Ok(gpa | (lin & 0xfff) | if private { cmask } else { 0 })
    }

    /// Read a page-table entry through the private view (0 = not present outside RAM).
    fn sev_pt_read(&mut self, gpa: u64, size: usize) -> R<u64> {
        if gpa + size as u64 > self.ram_size {
            return Ok(0);
        }
        let base = self.sev_view(gpa >> PAGE_SHIFT, View::Private)?;
        // SAFETY: in RAM (checked above); `base` is RAM or the private backing, both of RAM's
        // size.
        unsafe {
            let p = base.add(gpa as usize);
            Ok(if size == 8 {
                (p as *const u64).read_unaligned()
            } else {
                (p as *const u32).read_unaligned() as u64
            })
        }
    }

    /// Atomically OR bits into a page-table entry through the private view.
    fn sev_pt_set_bits(&mut self, gpa: u64, size: usize, bits: u64) -> R {
        if gpa + size as u64 > self.ram_size {
            return Ok(());
        }
        let base = self.sev_view(gpa >> PAGE_SHIFT, View::Private)?;
        // SAFETY: in RAM; entries are naturally aligned (see `pt_set_bits`) and both backings
        // are 16-byte aligned.
        unsafe {
            let p = base.add(gpa as usize);
            if size == 8 && (p as usize).is_multiple_of(8) {
                std::sync::atomic::AtomicU64::from_ptr(p as *mut u64)
                    .fetch_or(bits, std::sync::atomic::Ordering::SeqCst);
            } else if (p as usize).is_multiple_of(4) {
                std::sync::atomic::AtomicU32::from_ptr(p as *mut u32)
                    .fetch_or(bits as u32, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.note_write(gpa >> PAGE_SHIFT);
        Ok(())
    }

    /// The page walk of SEV-ES mode (see the module documentation).
    fn walk_sev(&mut self, lin: u64, acc: Acc, user: bool) -> R<SevWalk> {
        let cmask = self.sev_cmask();
        if self.cr0 & cr0::PG == 0 {
            // Without paging every access is private.
            let lin = lin & 0xffff_ffff;
            return Ok(SevWalk {
                w: Walk {
                    gpa: lin & !0xfff,
                    w: true,
                    x: true,
                },
                private: true,
            });
        }
        let long = self.efer & efer::LMA != 0;
        if long && !canonical(lin) {
            return Err(Stop::Exc(Exc::ec(vector::GP, 0)));
        }
        let nxe = self.efer & efer::NXE != 0;
        let wp = self.cr0 & cr0::WP != 0;
        let mut code = 0;
        if acc == Acc::Write {
            code |= PF_W;
        }
        if user {
            code |= PF_U;
        }
        if acc == Acc::Exec && nxe {
            code |= PF_ID;
        }
        let pae = self.cr4 & cr4::PAE != 0;
        let pmask = PHYS_MASK & !cmask;
        // The first table (CR3's C-bit is stripped; tables are private whatever it says).
        let (levels, mut table): (u32, u64) = if long {
            (4, self.cr3 & pmask)
        } else if pae {
            (3, self.cr3 & 0xffff_ffe0)
        } else {
            (2, self.cr3 & 0xffff_f000)
        };
        let esz: u64 = if long || pae { 8 } else { 4 };
        let mut user_ok = true;
        let mut write_ok = true;
        let mut nx = false;
        // Entries touched (address, leaf), to set A (and D) bits once allowed.
        let mut touched: [(u64, bool); 4] = [(0, false); 4];
        let mut ntouched = 0;
        let mut level = levels;
        loop {
            let (shift, bits) = if esz == 8 {
                (12 + 9 * (level - 1), 9)
            } else {
                (12 + 10 * (level - 1), 10)
            };
            let idx = if level == 3 && !long {
                (lin >> 30) & 3
            } else {
                (lin >> shift) & ((1 << bits) - 1)
            };
            let ea = table + idx * esz;
            let ent = self.sev_pt_read(ea, esz as usize)?;
            if ent & 1 == 0 {
                return Err(Stop::Exc(self.pf(lin, code)));
            }
            let pdpte_legacy = level == 3 && !long;
            let mut rsvd = false;
            if esz == 8 {
                if ent & !PHYS_MASK & !cmask & 0x000f_ffff_ffff_f000 != 0 {
                    rsvd = true;
                }
                if ent >> 63 != 0 && !nxe {
                    rsvd = true;
                }
                if pdpte_legacy && ent & 0x1e6 != 0 {
                    rsvd = true;
                }
                if long && level == 4 && ent & 0x80 != 0 {
                    rsvd = true;
                }
            }
            let is_leaf = level == 1
                || (ent & 0x80 != 0
                    && (level == 2 || (level == 3 && long))
                    && (esz == 8 || self.cr4 & cr4::PSE != 0));
            if is_leaf && level > 1 {
                if esz == 8 {
                    let low = ent & ((1u64 << shift) - 1) & !0x1fff;
                    if low != 0 {
                        rsvd = true;
                    }
                } else if (ent >> 13) & 0x1ff != 0 {
                    rsvd = true;
                }
            }
            if rsvd {
                return Err(Stop::Exc(self.pf(lin, code | PF_P | PF_RSVD)));
            }
            if !pdpte_legacy {
                user_ok &= ent & 4 != 0;
                write_ok &= ent & 2 != 0;
                if esz == 8 && nxe {
                    nx |= ent >> 63 != 0;
                }
                touched[ntouched] = (ea, is_leaf);
                ntouched += 1;
            }
            if is_leaf {
                let page = if level > 1 {
                    let base = if esz == 8 {
                        ent & pmask & !((1u64 << shift) - 1)
                    } else {
                        ent & 0xffc0_0000
                    };
                    base | (lin & ((1u64 << shift) - 1) & !0xfff)
                } else if esz == 8 {
                    ent & pmask
                } else {
                    ent & 0xffff_f000
                };
                if user && !user_ok {
                    return Err(Stop::Exc(self.pf(lin, code | PF_P)));
                }
                let may_write = if user { write_ok } else { write_ok || !wp };
                if acc == Acc::Write && !may_write {
                    return Err(Stop::Exc(self.pf(lin, code | PF_P)));
                }
                if acc == Acc::Exec && nx {
                    return Err(Stop::Exc(self.pf(lin, code | PF_P)));
                }
                let mut dirty = ent & 0x40 != 0;
                for &(a, leaf) in &touched[..ntouched] {
                    let set = if leaf && acc == Acc::Write {
                        0x60
                    } else {
                        0x20
                    };
                    let cur = if leaf {
                        ent
                    } else {
                        self.sev_pt_read(a, esz as usize)?
                    };
                    if cur & set != set {
                        self.sev_pt_set_bits(a, esz as usize, set)?;
                    }
                }
                if acc == Acc::Write {
                    dirty = true;
                }
                return Ok(SevWalk {
                    w: Walk {
                        gpa: page,
                        w: may_write && dirty,
                        x: !nx,
                    },
                    // The leaf's C-bit: the view of the data.
                    private: esz == 8 && ent & cmask != 0,
                });
            }
            table = if esz == 8 {
                ent & pmask
            } else {
                ent & 0xffff_f000
            };
            level -= 1;
        }
    }

    /// `phys_read` of an address that is not a plain RAM address in SEV-ES mode: a private
    /// (tagged) RAM access, a fatal private access outside RAM, or MMIO (#VC NPF).
    pub(crate) fn sev_phys_read(&mut self, gpa: u64, size: usize) -> R<u128> {
        let g = self.sev_phys_check(gpa, size)?;
        let base = self.sev_view(g >> PAGE_SHIFT, View::Private)?;
        let mut b = [0u8; 16];
        // SAFETY: `g..g+size` is inside RAM and one page (checked by `sev_phys_check`).
        unsafe { std::ptr::copy_nonoverlapping(base.add(g as usize), b.as_mut_ptr(), size) };
        Ok(u128::from_le_bytes(b))
    }

    /// `phys_write` counterpart of [`Cpu::sev_phys_read`].
    pub(crate) fn sev_phys_write(&mut self, gpa: u64, size: usize, v: u128) -> R {
        let g = self.sev_phys_check(gpa, size)?;
        let base = self.sev_view(g >> PAGE_SHIFT, View::Private)?;
        let b = v.to_le_bytes();
        // SAFETY: as in `sev_phys_read`.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(g as usize), size) };
        self.note_write(g >> PAGE_SHIFT);
        Ok(())
    }

    /// For a private access: the plain RAM address. Otherwise the access is fatal (private
    /// outside RAM) or MMIO (#VC with NPF).
    fn sev_phys_check(&mut self, gpa: u64, size: usize) -> R<u64> {
        let cmask = self.sev_cmask();
        if gpa & cmask == 0 {
            return Cpu::vc(exit_code::NPF);
        }
        let g = gpa & !cmask;
        if g + size as u64 > self.ram_size {
            return Err(self.sev_fatal(format!(
                "SEV-ES guest accessed guest-physical address {g:#x} (outside RAM, {:#x} bytes) \
                 through a mapping with the C-bit set (rip {:#x})",
                self.ram_size, self.rip
            )));
        }
        Ok(g)
    }

    /// `host_rmw_ptr` in SEV-ES mode, from the translated (possibly tagged) address.
    pub(crate) fn sev_rmw_ptr(&mut self, gpa: u64, size: usize) -> R<Option<(*mut u8, u64)>> {
        let cmask = self.sev_cmask();
        let private = gpa & cmask != 0;
        let g = gpa & !cmask;
        if g + size as u64 > self.ram_size {
            // The plain read/write path reports it (shutdown or #VC).
            return Ok(None);
        }
        let base = self.sev_view(g >> PAGE_SHIFT, view_of(private))?;
        // SAFETY: inside RAM-sized backing (checked).
        Ok(Some((unsafe { base.add(g as usize) }, g >> PAGE_SHIFT)))
    }
}

#[cfg(test)]
impl Cpu {
    /// Test hook: a page walk (plain, or SEV-ES in SEV-ES mode) without a TLB fill, as
    /// (guest-physical page, writable, executable, private view).
    pub(crate) fn test_walk(
        &mut self,
        lin: u64,
        write: bool,
        exec: bool,
        user: bool,
    ) -> Result<(u64, bool, bool, bool), Stop> {
        let acc = if write {
            Acc::Write
        } else if exec {
            Acc::Exec
        } else {
            Acc::Read
        };
        if self.sev.is_some() {
            let s = self.walk_sev(lin, acc, user)?;
            Ok((s.w.gpa, s.w.w, s.w.x, s.private))
        } else {
            let w = self.walk(lin, acc, user).map_err(Stop::Exc)?;
            Ok((w.gpa, w.w, w.x, false))
        }
    }
}
