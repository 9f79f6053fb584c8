//! Guest RAM seen in place, as slices of its host mapping, and given back to the system.
//!
//! Guest RAM is one anonymous mapping ([`GuestMemory::host_base`], [`GuestMemory::size`])
//! that lives as long as the VM. The vCPUs write it behind the VMM's back, so a `&[u8]` or
//! `&mut [u8]` over it is sound only while nothing else writes (resp. touches) the bytes: the
//! functions here are `unsafe` and say exactly what their callers must ensure. The library
//! calls them only through safe wrappers that hold the proof:
//! [`MachineHandle::stopped_ram`](crate::machine::MachineHandle::stopped_ram) takes a
//! [`StoppedGuard`](crate::machine::StoppedGuard) (no vCPU runs), and
//! [`Machine::exclusive_ram`](crate::machine::Machine::exclusive_ram) a machine that no
//! handle, guard or VM clone shares.

use esvm_hv::GuestMemory;
use thiserror::Error;

/// Guest pages are 4 KiB.
pub const PAGE_SIZE: u64 = 4096;

/// Why guest RAM cannot be seen in place.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RamError {
    #[error("guest pages {first_page:#x}+{count} lie outside the guest's {pages} pages of memory")]
    OutOfRange {
        first_page: u64,
        count: u64,
        pages: u64,
    },
    #[error("the stopped-guest guard belongs to another VM; stop this VM to read its memory")]
    OtherVm,
    #[error(
        "the machine's memory is shared ({what}); drop the other holders (handles, guards, VM \
         clones) before writing or discarding it in place"
    )]
    Shared { what: String },
}

/// The byte range of guest pages `first_page..first_page + count`, if it lies inside `mem`.
pub fn page_range(
    mem: &GuestMemory,
    first_page: u64,
    count: u64,
) -> Result<std::ops::Range<usize>, RamError> {
    let out = || RamError::OutOfRange {
        first_page,
        count,
        pages: mem.pages(),
    };
    let start = first_page.checked_mul(PAGE_SIZE).ok_or_else(out)?;
    let len = count.checked_mul(PAGE_SIZE).ok_or_else(out)?;
    let end = start.checked_add(len).ok_or_else(out)?;
    if end > mem.size() {
        return Err(out());
    }
    Ok(start as usize..end as usize)
}

/// Guest pages `first_page..first_page + count` in place, read-only.
///
/// # Safety
///
/// For as long as the returned slice lives, nothing may write these bytes: no vCPU of the VM
/// runs, no VMM code writes guest memory (through [`GuestMemory::write`], a vm-memory view or
/// another slice from here) and the memory is not discarded ([`discard`]). Reads through
/// other shared views are fine.
pub unsafe fn pages(mem: &GuestMemory, first_page: u64, count: u64) -> Result<&[u8], RamError> {
    let r = page_range(mem, first_page, count)?;
    // SAFETY: the range lies inside guest RAM's single mapping of `mem.size()` bytes at
    // `host_base()` (checked above), which lives as long as `mem` is borrowed; the bytes are
    // initialised (anonymous memory reads as zero until written); the caller guarantees that
    // nothing writes them while the slice lives.
    Ok(unsafe { std::slice::from_raw_parts(mem.host_base().add(r.start), r.len()) })
}

/// Guest pages `first_page..first_page + count` in place, writable.
///
/// # Safety
///
/// For as long as the returned slice lives, nothing else may read or write these bytes: no
/// vCPU of the VM runs, no other thread uses the VM's memory, and no other slice from here
/// overlaps it.
#[allow(clippy::mut_from_ref)] // The caller's contract makes the slice exclusive.
pub unsafe fn pages_mut(
    mem: &GuestMemory,
    first_page: u64,
    count: u64,
) -> Result<&mut [u8], RamError> {
    let r = page_range(mem, first_page, count)?;
    // SAFETY: the range lies inside guest RAM's single mapping (checked above), alive while
    // `mem` is borrowed, and initialised; the caller guarantees that nothing else touches it
    // while the slice lives.
    Ok(unsafe { std::slice::from_raw_parts_mut(mem.host_base().add(r.start), r.len()) })
}

/// Give guest RAM back to the system (`MADV_DONTNEED`): afterwards it reads as zero.
///
/// # Safety
///
/// No reference into guest RAM may be alive (from [`pages`] or [`pages_mut`]) and no other
/// thread may use the memory: its contents change under them.
pub unsafe fn discard(mem: &GuestMemory) {
    // SAFETY: the range is exactly guest RAM's single private anonymous mapping, alive while
    // `mem` is borrowed; MADV_DONTNEED only drops its pages (later reads see zeroes), and the
    // caller guarantees that nothing holds or uses them.
    let r = unsafe {
        libc::madvise(
            mem.host_base().cast::<libc::c_void>(),
            mem.size() as libc::size_t,
            libc::MADV_DONTNEED,
        )
    };
    if r != 0 {
        tracing::debug!(
            "madvise(MADV_DONTNEED) on discarded guest memory failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Fault in all of guest RAM without changing it (`MADV_POPULATE_WRITE`); a kernel without it
/// (before Linux 5.14) just leaves memory to be faulted in on first touch.
pub fn prealloc(mem: &GuestMemory) {
    // SAFETY: the range is exactly guest RAM's single anonymous mapping (host_base, size),
    // alive while `mem` is borrowed; MADV_POPULATE_WRITE allocates its pages without reading
    // or changing their contents, so whoever reads or writes them meanwhile sees no
    // difference.
    let r = unsafe {
        libc::madvise(
            mem.host_base().cast::<libc::c_void>(),
            mem.size() as libc::size_t,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if r != 0 {
        tracing::warn!(
            "cannot preallocate guest memory (madvise MADV_POPULATE_WRITE): {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        let mem = GuestMemory::new(16 * PAGE_SIZE).unwrap();
        assert_eq!(page_range(&mem, 2, 3).unwrap(), 0x2000..0x5000);
        assert_eq!(page_range(&mem, 0, 16).unwrap(), 0..0x10000);
        for (first, count) in [(15, 2), (16, 1), (u64::MAX, 1), (1, u64::MAX)] {
            assert!(
                matches!(
                    page_range(&mem, first, count),
                    Err(RamError::OutOfRange { pages: 16, .. })
                ),
                "{first}+{count}"
            );
        }
    }

    #[test]
    fn in_place_views_see_the_memory() {
        let mem = GuestMemory::new(4 * PAGE_SIZE).unwrap();
        mem.write(PAGE_SIZE + 7, &[0xab]).unwrap();
        // SAFETY: nothing else uses `mem` while the slices live (no VM, one thread).
        unsafe {
            assert_eq!(pages(&mem, 1, 1).unwrap()[7], 0xab);
            pages_mut(&mem, 3, 1).unwrap()[0] = 0xcd;
        }
        let mut b = [0u8];
        mem.read(3 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0xcd]);
        // SAFETY: no slice is alive and no other thread uses `mem`.
        unsafe { discard(&mem) };
        mem.read(PAGE_SIZE + 7, &mut b).unwrap();
        assert_eq!(b, [0], "discarded memory reads as zero");
        prealloc(&mem);
    }
}
