//! Page-table helpers on the live tables (CR3): look up, map, unmap and change the flags
//! of a 4 KiB page, splitting the loader's 2 MiB (or 1 GiB) pages on demand. New tables
//! come from [`crate::mem::alloc_pages`]. Memory is identity-mapped, so a table's
//! physical address is also its virtual address.

use crate::mem::alloc_pages;
use crate::x86::{invlpg, read_cr3, write_cr3};

/// Present.
pub const PRESENT: u64 = 1 << 0;
/// Writable.
pub const WRITABLE: u64 = 1 << 1;
/// User-accessible.
pub const USER: u64 = 1 << 2;
/// Write-through.
pub const WRITE_THROUGH: u64 = 1 << 3;
/// Cache disable.
pub const CACHE_DISABLE: u64 = 1 << 4;
/// Accessed.
pub const ACCESSED: u64 = 1 << 5;
/// Dirty.
pub const DIRTY: u64 = 1 << 6;
/// Page size (in PDPT/PD entries).
pub const HUGE: u64 = 1 << 7;
/// Global.
pub const GLOBAL: u64 = 1 << 8;
/// No-execute.
pub const NO_EXECUTE: u64 = 1 << 63;
/// Physical-address bits of an entry.
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Page-fault error-code bits.
pub mod pf {
    /// The fault was a protection violation (the page was present).
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// The access came from CPL 3.
    pub const USER: u64 = 1 << 2;
    /// A reserved bit was set in a paging entry.
    pub const RESERVED: u64 = 1 << 3;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 4;
}

/// Errors of the mapping helpers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingError {
    /// No memory left for a new page table.
    OutOfMemory,
    /// The address is not mapped at all (no table to modify).
    NotMapped,
    /// The address is not canonical / outside the 48-bit space.
    BadAddress,
}

fn table(phys: u64) -> *mut u64 {
    (phys & ADDR_MASK) as *mut u64
}

fn index(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * level)) & 0x1FF) as usize
}

fn canonical(virt: u64) -> bool {
    let top = (virt as i64) >> 47;
    top == 0 || top == -1
}

/// Splits the huge entry `*entry` (mapping `1 << shift` bytes) into a table of 512
/// entries mapping the same memory with the same flags.
///
/// # Safety
/// `entry` must point at a live paging entry with HUGE set, at a level where
/// `shift` is 30 (PDPT) or 21 (PD).
unsafe fn split(entry: *mut u64, shift: u32) -> Result<(), PagingError> {
    // SAFETY: the caller guarantees `entry` is a live entry.
    let old = unsafe { entry.read_volatile() };
    let new_table = alloc_pages(1).ok_or(PagingError::OutOfMemory)?;
    let child_size = 1u64 << (shift - 9);
    // A 4 KiB PTE has no PS bit; a 2 MiB PDE child keeps it. The PAT bit of a huge entry
    // (bit 12) moves to bit 7 in a PTE; the loader never sets it, so drop it.
    let flags = old & !ADDR_MASK & !(1 << 12);
    let child_flags = if shift == 21 {
        flags & !HUGE
    } else {
        flags | HUGE
    };
    let base = old & ADDR_MASK & !((1u64 << shift) - 1);
    let t = new_table as *mut u64;
    for i in 0..512u64 {
        // SAFETY: `t` is a freshly allocated, identity-mapped 4 KiB page.
        unsafe {
            t.add(i as usize)
                .write_volatile((base + i * child_size) | child_flags)
        };
    }
    // Non-leaf entries get the most permissive rights; leaves decide.
    let parent = new_table | PRESENT | WRITABLE | USER | (old & ACCESSED);
    // SAFETY: as above; the new table maps exactly what the huge entry mapped, so the
    // switch is invisible to running code. Flush the whole TLB (CR3 reload) since the
    // huge translation may be cached for any address inside it.
    unsafe {
        entry.write_volatile(parent);
        write_cr3(read_cr3());
    }
    Ok(())
}

/// Returns a pointer to the 4 KiB PTE for `virt`, splitting huge pages and creating
/// missing tables as needed.
pub fn pte_for(virt: u64) -> Result<*mut u64, PagingError> {
    if !canonical(virt) {
        return Err(PagingError::BadAddress);
    }
    let mut t = table(read_cr3());
    for level in (1..=3u32).rev() {
        // SAFETY: `t` is a live page table (reached from CR3) and the index is < 512.
        let e = unsafe { t.add(index(virt, level)) };
        // SAFETY: as above.
        let v = unsafe { e.read_volatile() };
        if v & PRESENT == 0 {
            let new_table = alloc_pages(1).ok_or(PagingError::OutOfMemory)?;
            // SAFETY: installing a zeroed table into a non-present entry.
            unsafe { e.write_volatile(new_table | PRESENT | WRITABLE | USER) };
        } else if v & HUGE != 0 && level < 3 {
            // SAFETY: `e` is a live huge entry at PDPT (level 2) or PD (level 1).
            unsafe { split(e, 12 + 9 * level)? };
        }
        // SAFETY: as above.
        t = table(unsafe { e.read_volatile() });
    }
    // SAFETY: `t` is now the page table for `virt`.
    Ok(unsafe { t.add(index(virt, 0)) })
}

/// Walks the tables for `virt`; returns (physical address, effective leaf flags, page
/// size) without modifying anything. The flags are the leaf's; U/S and R/W of the upper
/// levels are ANDed in, NX ORed.
pub fn translate(virt: u64) -> Option<(u64, u64, u64)> {
    if !canonical(virt) {
        return None;
    }
    let mut t = table(read_cr3());
    let mut and_bits = WRITABLE | USER;
    let mut nx = 0;
    for level in (0..=3u32).rev() {
        // SAFETY: `t` is a live table reached from CR3; index < 512.
        let v = unsafe { t.add(index(virt, level)).read_volatile() };
        if v & PRESENT == 0 {
            return None;
        }
        and_bits &= v;
        nx |= v & NO_EXECUTE;
        if level == 0 || (v & HUGE != 0 && level <= 2) {
            let size = 1u64 << (12 + 9 * level);
            let phys = (v & ADDR_MASK & !(size - 1)) | (virt & (size - 1));
            let flags = (v & !ADDR_MASK & !(WRITABLE | USER)) | and_bits | nx;
            return Some((phys, flags, size));
        }
        t = table(v);
    }
    None
}

/// Maps the 4 KiB page at `virt` to `phys` with `flags` (PRESENT is not implied).
pub fn map_4k(virt: u64, phys: u64, flags: u64) -> Result<(), PagingError> {
    let pte = pte_for(virt)?;
    // SAFETY: `pte` is the live PTE for `virt`.
    unsafe { pte.write_volatile((phys & ADDR_MASK) | (flags & !ADDR_MASK)) };
    invlpg(virt);
    Ok(())
}

/// Rewrites the flags of the 4 KiB page at `virt`: `new = (old & !clear) | set`.
/// Returns the old PTE.
pub fn update_flags(virt: u64, set: u64, clear: u64) -> Result<u64, PagingError> {
    let pte = pte_for(virt)?;
    // SAFETY: `pte` is the live PTE for `virt`.
    let old = unsafe { pte.read_volatile() };
    if old == 0 {
        return Err(PagingError::NotMapped);
    }
    let new = (old & ADDR_MASK) | (((old & !clear) | set) & !ADDR_MASK);
    // SAFETY: as above.
    unsafe { pte.write_volatile(new) };
    invlpg(virt);
    Ok(old)
}

/// Marks the 4 KiB page at `virt` not present (keeping its address for [`map_present`]).
pub fn unmap(virt: u64) -> Result<u64, PagingError> {
    update_flags(virt, 0, PRESENT)
}

/// Marks the 4 KiB page at `virt` present again.
pub fn map_present(virt: u64) -> Result<u64, PagingError> {
    update_flags(virt, PRESENT, 0)
}
