//! The page walk: one walker for every paging mode (32-bit, PAE, 4-level long mode), generic
//! over the memory-encryption policy ([`EncPolicy`]) and monomorphised per policy:
//!
//! - [`Plain`] (zero-sized): no encryption. Its methods are constants and plain RAM accesses,
//!   so `walk::<Plain>` compiles to the walk without any encryption logic.
//! - [`SevCbit`]: an SEV(-ES) guest. The C-bit is stripped from CR3 and from every address
//!   taken from an entry and is never a reserved bit, while the other bits above the
//!   physical-address width reduced by [`SEV_PHYS_ADDR_REDUCTION`] are; page tables are
//!   always read and updated (A/D bits) as *private* memory, whatever the C-bit of the entry
//!   (or CR3) that points to them (AMD APM vol. 2, "Secure Encrypted Virtualization": guest
//!   page-table accesses are private); the C-bit of the leaf entry selects the view of the
//!   data access; with paging off every access is private.
//!
//! The differential tests `sev::tests::walk_matches_plain_walk` and
//! `table_c_bits_do_not_change_the_walk` compare the two instances.

use super::Acc;
use crate::mem::{View, PAGE_SHIFT};
use crate::sev::SEV_PHYS_ADDR_REDUCTION;
use crate::{Cpu, Exc, Stop, R};
use esvm_arch::bits::{cr0, cr4, efer, vector};

/// Page-fault error code bits.
const PF_P: u32 = 1;
const PF_W: u32 = 2;
const PF_U: u32 = 4;
const PF_RSVD: u32 = 8;
const PF_ID: u32 = 16;

/// Physical address width (CPUID 0x8000_0008: 48 bits).
pub(crate) const MAXPHY: u32 = 48;
/// The address bits of an 8-byte entry (bits 12..MAXPHY).
const PHYS_MASK: u64 = ((1u64 << MAXPHY) - 1) & !0xfff;
/// The address bits of an 8-byte entry of an SEV guest (bits 12..47; [`SevCbit`] also takes
/// out the C-bit, should it be below bit 47).
const SEV_PHYS_MASK: u64 = ((1u64 << (MAXPHY - SEV_PHYS_ADDR_REDUCTION)) - 1) & !0xfff;
/// Bits 12..51 of an 8-byte entry: address bits, or reserved where above MAXPHYADDR.
const ENTRY_ADDR_BITS: u64 = 0x000f_ffff_ffff_f000;

/// Result of a successful walk.
pub(super) struct Walk {
    /// Guest-physical page (C-bit stripped).
    pub gpa: u64,
    /// Writable at this privilege (and D already set, or set by this walk).
    pub w: bool,
    pub x: bool,
    /// A global translation (leaf G bit with CR4.PGE): MOV to CR3 keeps it.
    pub global: bool,
    /// The data access goes to the private view (the leaf's C-bit; never under [`Plain`]).
    pub private: bool,
}

/// What memory encryption changes in a page walk (see the module documentation). The
/// methods take `self` by value: policies are small `Copy` values, and [`Plain`]'s are
/// constants the optimiser folds away.
pub(super) trait EncPolicy: Copy {
    /// The C-bit of an 8-byte entry or of CR3 (0: none).
    fn cmask(self) -> u64;
    /// The address bits of an 8-byte entry (bits 12 up to the physical-address width, C-bit
    /// excluded). Bits 12..51 that are neither address bits nor the C-bit are reserved.
    fn addr_mask(self) -> u64;
    /// Whether accesses with paging off go to the private view.
    fn unpaged_private(self) -> bool;
    /// Host base of the backing through which the page-table page `gpa` (inside RAM) is read
    /// and updated: `cpu.ram`, or the private backing (converting the page if needed).
    fn table_base(self, cpu: &mut Cpu, gpa: u64) -> R<*mut u8>;
}

/// No memory encryption: the plain walk.
#[derive(Clone, Copy)]
pub(super) struct Plain;

impl EncPolicy for Plain {
    #[inline(always)]
    fn cmask(self) -> u64 {
        0
    }
    #[inline(always)]
    fn addr_mask(self) -> u64 {
        PHYS_MASK
    }
    #[inline(always)]
    fn unpaged_private(self) -> bool {
        false
    }
    #[inline(always)]
    fn table_base(self, cpu: &mut Cpu, gpa: u64) -> R<*mut u8> {
        // Post-copy: a page-table page that has not arrived is waited for.
        cpu.wait_present(gpa >> PAGE_SHIFT)?;
        Ok(cpu.ram)
    }
}

/// An SEV(-ES) guest's walk with its C-bit (`cmask = 1 << c_bit`).
#[derive(Clone, Copy)]
pub(super) struct SevCbit {
    cmask: u64,
}

impl SevCbit {
    pub(super) fn new(cmask: u64) -> Self {
        SevCbit { cmask }
    }
}

impl EncPolicy for SevCbit {
    #[inline(always)]
    fn cmask(self) -> u64 {
        self.cmask
    }
    #[inline(always)]
    fn addr_mask(self) -> u64 {
        SEV_PHYS_MASK & !self.cmask
    }
    #[inline(always)]
    fn unpaged_private(self) -> bool {
        true
    }
    #[inline(always)]
    fn table_base(self, cpu: &mut Cpu, gpa: u64) -> R<*mut u8> {
        // Page tables are private whatever the C-bit of the entry that points to them.
        cpu.sev_view(gpa >> PAGE_SHIFT, View::Private)
    }
}

fn canonical(lin: u64) -> bool {
    ((lin as i64) << 16 >> 16) as u64 == lin
}

impl Cpu {
    fn pf(&mut self, lin: u64, code: u32) -> Exc {
        self.cr2 = lin;
        Exc::ec(vector::PF, code)
    }

    /// Walk the page tables (or not, without paging) under encryption policy `p`.
    pub(super) fn walk<P: EncPolicy>(&mut self, p: P, lin: u64, acc: Acc, user: bool) -> R<Walk> {
        if self.cr0 & cr0::PG == 0 {
            let lin = lin & 0xffff_ffff;
            return Ok(Walk {
                gpa: lin & !0xfff,
                w: true,
                x: true,
                global: false,
                private: p.unpaged_private(),
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
        let cmask = p.cmask();
        let amask = p.addr_mask();
        // Reserved bits 12..51 of an 8-byte entry: above the physical-address width, except
        // the C-bit.
        let rsvd_addr = ENTRY_ADDR_BITS & !amask & !cmask;
        // Levels and the first table (CR3's C-bit is stripped; it does not select a view).
        let (levels, mut table): (u32, u64) = if long {
            (4, self.cr3 & amask)
        } else if pae {
            (3, self.cr3 & 0xffff_ffe0)
        } else {
            (2, self.cr3 & 0xffff_f000)
        };
        let esz: u64 = if long || pae { 8 } else { 4 };
        let mut user_ok = true;
        let mut write_ok = true;
        let mut nx = false;
        // Entry addresses touched, to set A (and D) bits once the walk succeeded.
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
            let ent = self.pt_read(p, ea, esz as usize)?;
            if ent & 1 == 0 {
                return Err(Stop::Exc(self.pf(lin, code)));
            }
            let pdpte_legacy = level == 3 && !long;
            // Reserved bits.
            let mut rsvd = false;
            if esz == 8 {
                if ent & rsvd_addr != 0 {
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
                    // Large page: bits 12..(shift-1) reserved except PAT (bit 12).
                    let low = ent & ((1u64 << shift) - 1) & !0x1fff;
                    if low != 0 {
                        rsvd = true;
                    }
                } else if (ent >> 13) & 0x1ff != 0 {
                    // Bits 21:13 of a 4 MiB PDE: no PSE-36, so they must be 0.
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
                        ent & amask & !((1u64 << shift) - 1)
                    } else {
                        ent & 0xffc0_0000
                    };
                    base | (lin & ((1u64 << shift) - 1) & !0xfff)
                } else if esz == 8 {
                    ent & amask
                } else {
                    ent & 0xffff_f000
                };
                // Permission checks.
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
                // Set accessed bits (and dirty on write) now that the access is allowed.
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
                        self.pt_read(p, a, esz as usize)?
                    };
                    if cur & set != set {
                        self.pt_set_bits(p, a, esz as usize, set)?;
                    }
                }
                if acc == Acc::Write {
                    dirty = true;
                }
                return Ok(Walk {
                    gpa: page,
                    w: may_write && dirty,
                    x: !nx,
                    global: ent & 0x100 != 0 && self.cr4 & cr4::PGE != 0,
                    // The leaf's C-bit selects the data view (4-byte entries have none).
                    private: esz == 8 && ent & cmask != 0,
                });
            }
            table = if esz == 8 {
                ent & amask
            } else {
                ent & 0xffff_f000
            };
            level -= 1;
        }
    }

    /// Read a `size`-byte (4 or 8) page-table entry at guest-physical `gpa` through `p`'s
    /// table view. Outside RAM (page tables in MMIO) it reads as 0: not present.
    #[inline(always)]
    fn pt_read<P: EncPolicy>(&mut self, p: P, gpa: u64, size: usize) -> R<u64> {
        if gpa + size as u64 > self.ram_size {
            return Ok(0);
        }
        let base = p.table_base(self, gpa)?;
        // SAFETY: `gpa..gpa+size` is inside RAM (checked above) and `base` is the base of a
        // RAM-sized backing (guest RAM or the private backing). Guest memory is shared with
        // other threads, so the entry is read as a raw unaligned copy.
        unsafe {
            let p = base.add(gpa as usize);
            Ok(if size == 8 {
                (p as *const u64).read_unaligned()
            } else {
                (p as *const u32).read_unaligned() as u64
            })
        }
    }

    /// Atomically OR bits into a page-table entry (A/D updates) through `p`'s table view and
    /// log the write.
    #[inline(always)]
    fn pt_set_bits<P: EncPolicy>(&mut self, p: P, gpa: u64, size: usize, bits: u64) -> R {
        if gpa + size as u64 > self.ram_size {
            return Ok(());
        }
        let base = p.table_base(self, gpa)?;
        // SAFETY: in a RAM-sized backing (checked above; both backings are at least 8-byte
        // aligned); page-table entries are naturally aligned (their addresses are table base
        // + index * size with 4 KiB- or 32-byte-aligned tables), and the alignment is checked
        // before the atomic types are used.
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
        // SAFETY: `gpa` is inside RAM (checked above).
        unsafe { self.note_write(gpa >> PAGE_SHIFT) };
        Ok(())
    }
}
