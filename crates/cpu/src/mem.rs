//! Guest-physical memory as the software vCPU sees it.
//!
//! Guest RAM is one contiguous host mapping at guest-physical 0 (`size` bytes); every
//! guest-physical address at or above `size` is MMIO and exits to the VMM. Besides RAM the
//! type holds:
//! - the vm-memory [`AtomicBitmap`] dirty log, which the vCPU marks on every guest write
//!   (store first, then a relaxed check of the bit and an atomic set only when it is clear);
//! - a shared *code-page* bitmap plus a per-page *code epoch*: a vCPU that decodes code from a
//!   page sets its bit; any write to such a page (by any vCPU sharing this object, or by the
//!   VMM through [`PhysMemory::write`] / [`PhysMemory::invalidate_code`]) bumps the page's
//!   epoch, which every cached block checks before it runs. That is how self-modifying and
//!   cross-modifying code and VMM-loaded code stay coherent with the decoded-instruction
//!   cache.
//!
//! `PhysMemory` is cheap to clone (an `Arc`); all vCPUs of a VM share one.

use std::alloc::Layout;
use std::any::Any;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;

mod encrypt;
mod postcopy;
pub use encrypt::PageCipher;
pub(crate) use encrypt::View;
pub use postcopy::{MissingPages, MissingStats};

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemError {
    #[error("guest RAM size {0:#x} is not a non-zero multiple of 4 KiB below 2^46")]
    BadSize(u64),
    #[error("guest-physical range {addr:#x}+{len:#x} is not inside guest RAM ({size:#x} bytes)")]
    OutOfRange { addr: u64, len: u64, size: u64 },
    #[error("the dirty bitmap covers {bitmap_pages} pages but RAM has {ram_pages}; pass the bitmap of this RAM region")]
    BitmapSize { bitmap_pages: u64, ram_pages: u64 },
    #[error("cannot allocate {0} bytes of guest RAM")]
    Alloc(u64),
    #[error("guest memory encryption is not enabled; call PhysMemory::enable_encryption (LAUNCH_START) first")]
    EncryptionOff,
    #[error("guest memory encryption is already enabled for this memory (one key per guest)")]
    EncryptionOn,
    #[error("post-copy was already started on this guest memory (once per VM)")]
    PostcopyStarted,
    #[error("guest page {page} is not missing: post-copy fills only pages that have not arrived")]
    NotMissing { page: u64 },
    #[error("the post-copy migration failed: {0}")]
    Postcopy(String),
}

/// Memory this object allocated itself (tests, benchmarks).
struct OwnedRam {
    ptr: *mut u8,
    layout: Layout,
}

impl Drop for OwnedRam {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(layout)` in `PhysMemory::new_owned` and
        // is freed exactly once, here.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

enum Bitmap {
    Borrowed(*const AtomicBitmap),
    Owned(Box<AtomicBitmap>),
}

struct Inner {
    base: *mut u8,
    size: u64,
    bitmap: Bitmap,
    code: Box<[AtomicU64]>,
    epoch: Box<[AtomicU32]>,
    _owned: Option<OwnedRam>,
    _keepalive: Option<Arc<dyn Any + Send + Sync>>,
    /// SEV memory encryption (inert until enabled): see `encrypt`.
    sev: encrypt::SevMem,
    /// Post-copy: pages not yet arrived (see `postcopy`).
    missing: std::sync::OnceLock<Arc<MissingPages>>,
    /// vCPUs on several host threads write this memory ([`PhysMemory::set_parallel`]).
    parallel: std::sync::atomic::AtomicBool,
}

// SAFETY: the raw pointers refer to guest RAM and a dirty bitmap that, per the contract of
// `PhysMemory::from_raw` (or by ownership in `new_owned`), stay valid for the lifetime of
// `Inner`. Guest RAM is shared memory by design (like KVM's memslots): concurrent accesses
// from several vCPU threads and the VMM are the guest's own business and only ever go through
// raw-pointer reads/writes and atomics, never through Rust references to the bytes.
unsafe impl Send for Inner {}
// SAFETY: see `Send`; `AtomicBitmap`, the code bitmap and the epochs are atomics.
unsafe impl Sync for Inner {}

/// A full memory barrier on every thread of this process that runs at the moment (Linux
/// `membarrier`, private expedited: an IPI to the CPUs running its threads; registered on
/// first use), then one on this thread. Stores still in another vCPU thread's store buffer
/// are visible afterwards. Needed where a thread reads what vCPUs wrote and the vCPUs'
/// own bookkeeping (dirty bit, code bit) was checked with a plain load after their store:
/// taking the dirty log for a migration pass (see the crate documentation) and decoding a
/// page for the first time. Without membarrier (an old kernel) it falls back to the slower
/// global command, then to a local fence only.
pub fn process_barrier() {
    // linux/membarrier.h
    const CMD_GLOBAL: libc::c_long = 1;
    const CMD_PRIVATE_EXPEDITED: libc::c_long = 8;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 16;
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let expedited = *REGISTERED.get_or_init(|| {
        // SAFETY: membarrier takes no pointers; registering has no effect on memory.
        unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0 }
    });
    let cmd = if expedited {
        CMD_PRIVATE_EXPEDITED
    } else {
        CMD_GLOBAL
    };
    // SAFETY: as above; a failure (no membarrier at all) leaves the local fence below.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) };
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Raw views of a [`PhysMemory`]'s dirty bitmap, code bitmap and code epochs.
#[derive(Clone, Copy)]
pub(crate) struct RawMem {
    pub dirty: *const AtomicBitmap,
    pub code: *const AtomicU64,
    pub epoch: *const AtomicU32,
}

/// Guest-physical memory shared by the vCPUs of one VM. See the module documentation.
#[derive(Clone)]
pub struct PhysMemory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PhysMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysMemory")
            .field("size", &self.inner.size)
            .finish()
    }
}

fn check_size(size: u64) -> Result<(), MemError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) || size >= (1 << 46) {
        return Err(MemError::BadSize(size));
    }
    Ok(())
}

impl PhysMemory {
    fn build(
        base: *mut u8,
        size: u64,
        bitmap: Bitmap,
        owned: Option<OwnedRam>,
        keepalive: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Self {
        let pages = (size / PAGE_SIZE) as usize;
        let code = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let epoch = (0..pages).map(|_| AtomicU32::new(0)).collect();
        PhysMemory {
            inner: Arc::new(Inner {
                base,
                size,
                bitmap,
                code,
                epoch,
                _owned: owned,
                _keepalive: keepalive,
                sev: encrypt::SevMem::new(),
                missing: std::sync::OnceLock::new(),
                parallel: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Guest RAM owned by this object (zeroed), with its own dirty bitmap. For tests,
    /// benchmarks and tools that do not go through the hypervisor layer.
    pub fn new_owned(size: u64) -> Result<Self, MemError> {
        check_size(size)?;
        // 16-byte alignment keeps the allocation on the calloc path (fresh zero pages from the
        // kernel for large sizes, no memset) while keeping 16-byte guest alignment intact.
        let layout =
            Layout::from_size_align(size as usize, 16).map_err(|_| MemError::Alloc(size))?;
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(MemError::Alloc(size));
        }
        let bitmap = AtomicBitmap::new(
            size as usize,
            NonZeroUsize::new(PAGE_SIZE as usize).unwrap(),
        );
        Ok(Self::build(
            ptr,
            size,
            Bitmap::Owned(Box::new(bitmap)),
            Some(OwnedRam { ptr, layout }),
            None,
        ))
    }

    /// Wrap guest RAM owned elsewhere (the hypervisor layer's `GuestMemory`).
    ///
    /// # Safety
    /// - `base` must point to `size` bytes of readable and writable memory, and `bitmap` to
    ///   the dirty bitmap of exactly that region (4 KiB pages, bit `i` = page `i`);
    /// - both must stay valid (not unmapped, not freed, not moved) for as long as this
    ///   `PhysMemory` or any clone of it (including the vCPUs holding one) exists. Pass the
    ///   owner as `keepalive` to tie their lifetimes together;
    /// - the memory may be read and written concurrently by other threads (other vCPUs, the
    ///   VMM) but must never be accessed through Rust `&`/`&mut` references to its bytes
    ///   while this object exists (use raw pointers, vm-memory's volatile accessors or atomics).
    pub unsafe fn from_raw(
        base: *mut u8,
        size: u64,
        bitmap: *const AtomicBitmap,
        keepalive: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<Self, MemError> {
        check_size(size)?;
        // SAFETY: the caller guarantees `bitmap` is valid.
        let bm = unsafe { &*bitmap };
        let pages = size / PAGE_SIZE;
        if (bm.len() as u64) < pages {
            return Err(MemError::BitmapSize {
                bitmap_pages: bm.len() as u64,
                ram_pages: pages,
            });
        }
        Ok(Self::build(
            base,
            size,
            Bitmap::Borrowed(bitmap),
            None,
            keepalive,
        ))
    }

    /// Size of guest RAM in bytes.
    #[inline(always)]
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    #[inline(always)]
    pub(crate) fn base(&self) -> *mut u8 {
        self.inner.base
    }

    /// The dirty bitmap.
    #[inline(always)]
    pub fn bitmap(&self) -> &AtomicBitmap {
        match &self.inner.bitmap {
            // SAFETY: valid per the `from_raw` contract.
            Bitmap::Borrowed(p) => unsafe { &**p },
            Bitmap::Owned(b) => b,
        }
    }

    /// Take and clear the dirty bits (one bit per 4 KiB page, bit `i` of word `i / 64`).
    pub fn take_dirty(&self) -> Vec<u64> {
        self.bitmap().get_and_reset()
    }

    /// Whether `gpa` is backed by RAM.
    #[inline(always)]
    pub fn is_ram(&self, gpa: u64) -> bool {
        gpa < self.inner.size
    }

    /// Record a write to RAM page `page` in the dirty log and invalidate decoded code on it.
    /// Called after the bytes were stored.
    #[inline(always)]
    pub(crate) fn note_write(&self, page: u64) -> bool {
        let bm = self.bitmap();
        if !bm.is_bit_set(page as usize) {
            bm.set_bit(page as usize);
        }
        self.note_code_write(page)
    }

    /// Returns true if `page` held decoded code (which is now invalid).
    #[inline(always)]
    pub(crate) fn note_code_write(&self, page: u64) -> bool {
        let w = &self.inner.code[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        if w.load(Ordering::Relaxed) & bit != 0 {
            self.invalidate_page(page);
            true
        } else {
            false
        }
    }

    /// Raw pointers to the shared tracking structures, for the vCPU's hot paths. They stay
    /// valid as long as this `PhysMemory` (or a clone) is alive.
    pub(crate) fn raw(&self) -> RawMem {
        RawMem {
            dirty: self.bitmap() as *const AtomicBitmap,
            code: self.inner.code.as_ptr(),
            epoch: self.inner.epoch.as_ptr(),
        }
    }

    #[cold]
    pub(crate) fn invalidate_page(&self, page: u64) {
        let bit = 1u64 << (page % 64);
        self.inner.code[(page / 64) as usize].fetch_and(!bit, Ordering::SeqCst);
        self.inner.epoch[page as usize].fetch_add(1, Ordering::SeqCst);
    }

    /// Mark `page` as holding decoded code and return its current epoch. The caller reads
    /// the code bytes afterwards.
    ///
    /// With vCPUs on several threads ([`PhysMemory::set_parallel`]) a newly set bit is
    /// followed by a process-wide barrier. A writing vCPU stores its bytes and then checks
    /// the bit with a plain load, which x86 lets pass its own buffered store (store-load
    /// reordering): it could see the bit still clear while this vCPU, having set it, reads
    /// the page before the store is visible — and the stale decode would never be
    /// invalidated. The barrier ([`process_barrier`]) runs a full fence on every other
    /// thread: either the writer's check comes after it and sees the bit (it bumps the
    /// epoch), or the store came before it and the bytes read here include it. Pages stay
    /// marked while they hold code, so this costs one barrier per page (re)decoded after a
    /// write, not per write.
    pub(crate) fn mark_code(&self, page: u64) -> u32 {
        let bit = 1u64 << (page % 64);
        let old = self.inner.code[(page / 64) as usize].fetch_or(bit, Ordering::SeqCst);
        if old & bit == 0 && self.inner.parallel.load(Ordering::Relaxed) {
            process_barrier();
        }
        self.inner.epoch[page as usize].load(Ordering::SeqCst)
    }

    /// Say whether vCPUs on several host threads run over this memory (a VMM running a
    /// VM's vCPUs in parallel sets it before they run): first decodes of a page then pay
    /// for the barrier [`PhysMemory::mark_code`] explains.
    pub fn set_parallel(&self, on: bool) {
        self.inner.parallel.store(on, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn epoch(&self, page: u64) -> u32 {
        self.inner.epoch[page as usize].load(Ordering::Relaxed)
    }

    /// Drop decoded code for every page of `[gpa, gpa+len)` in every vCPU sharing this
    /// memory. The VMM must call this after writing guest code by other means than
    /// [`PhysMemory::write`] (e.g. through vm-memory directly or device DMA).
    pub fn invalidate_code(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        // With SEV encryption on, a host write makes Private pages Shared (see `encrypt`).
        self.host_wrote(gpa, len);
        let first = gpa / PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / PAGE_SIZE;
        let pages = self.inner.size / PAGE_SIZE;
        for p in first..=last.min(pages.saturating_sub(1)) {
            self.note_code_write(p);
        }
    }

    /// Start post-copy: the pages set in `missing` (dirty-log layout) have not arrived and
    /// are unreadable and unwritable (see the `postcopy` module) until published through the
    /// returned set. Once per memory.
    pub fn begin_postcopy(&self, missing: &[u64]) -> Result<Arc<MissingPages>, MemError> {
        let set = Arc::new(MissingPages::new(self.inner.size / PAGE_SIZE, missing));
        self.inner
            .missing
            .set(set.clone())
            .map_err(|_| MemError::PostcopyStarted)?;
        Ok(set)
    }

    /// The post-copy set, if post-copy was started.
    pub fn missing_pages(&self) -> Option<&Arc<MissingPages>> {
        self.inner.missing.get()
    }

    /// Wait until page `page` is present (at once unless post-copy runs and it is missing);
    /// `Err(reason)` if the post-copy migration failed first.
    #[inline(always)]
    pub fn wait_present(&self, page: u64) -> Result<(), String> {
        match self.inner.missing.get() {
            Some(m) if m.active() => m.wait(page),
            _ => Ok(()),
        }
    }

    /// [`PhysMemory::wait_present`] for every page of `[gpa, gpa+len)`, as a `MemError`.
    fn wait_range(&self, gpa: u64, len: usize) -> Result<(), MemError> {
        if len == 0 || !self.inner.missing.get().is_some_and(|m| m.active()) {
            return Ok(());
        }
        let first = gpa / PAGE_SIZE;
        let last = gpa.saturating_add(len as u64 - 1) / PAGE_SIZE;
        for p in first..=last {
            self.wait_present(p).map_err(MemError::Postcopy)?;
        }
        Ok(())
    }

    /// Guest RAM of missing pages `first..first + count`, for the migration layer to fill
    /// before it publishes them (plain guests).
    ///
    /// # Safety
    /// No other slice of these pages may exist while the returned one lives (one filler per
    /// page). Missing pages are accessed by nobody else: every vCPU and VMM access waits
    /// until they are published, which the caller does only after it dropped the slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn missing_pages_mut(&self, first: u64, count: u64) -> Result<&mut [u8], MemError> {
        let m = self
            .inner
            .missing
            .get()
            .ok_or(MemError::NotMissing { page: first })?;
        let len = count.saturating_mul(PAGE_SIZE);
        let gpa = first.saturating_mul(PAGE_SIZE);
        self.check(gpa, len as usize)?;
        if let Some(page) = (first..first + count).find(|p| !m.is_missing(*p)) {
            return Err(MemError::NotMissing { page });
        }
        // SAFETY: inside RAM (checked); the pages are missing, so no vCPU or VMM accessor
        // touches them, and the caller guarantees no other slice of them exists.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.inner.base.add(gpa as usize), len as usize)
        })
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), MemError> {
        if gpa
            .checked_add(len as u64)
            .is_none_or(|e| e > self.inner.size)
        {
            return Err(MemError::OutOfRange {
                addr: gpa,
                len: len as u64,
                size: self.inner.size,
            });
        }
        Ok(())
    }

    /// Read guest RAM (with SEV encryption on: as [`PhysMemory::read_host`]).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if self.encryption_enabled() {
            return self.read_host(gpa, buf);
        }
        self.check(gpa, buf.len())?;
        self.wait_range(gpa, buf.len())?;
        // SAFETY: range checked against RAM; raw copy from shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.inner.base.add(gpa as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Write guest RAM: marks the pages dirty and invalidates decoded code on them (with SEV
    /// encryption on: as [`PhysMemory::write_host`]).
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        if self.encryption_enabled() {
            return self.write_host(gpa, buf);
        }
        self.check(gpa, buf.len())?;
        self.wait_range(gpa, buf.len())?;
        // SAFETY: range checked against RAM; raw copy into shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.inner.base.add(gpa as usize),
                buf.len(),
            )
        };
        if !buf.is_empty() {
            let first = gpa / PAGE_SIZE;
            let last = (gpa + buf.len() as u64 - 1) / PAGE_SIZE;
            for p in first..=last {
                self.note_write(p);
            }
        }
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_rw_and_dirty() {
        let m = PhysMemory::new_owned(16 * PAGE_SIZE).unwrap();
        m.write(3 * PAGE_SIZE - 2, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        m.read(3 * PAGE_SIZE - 2, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        let d = m.take_dirty();
        assert_eq!(d[0], 0b1100);
        assert_eq!(m.take_dirty()[0], 0);
        assert!(m.write(16 * PAGE_SIZE - 1, &[0, 0]).is_err());
        assert!(PhysMemory::new_owned(100).is_err());
    }

    #[test]
    fn code_epochs() {
        let m = PhysMemory::new_owned(4 * PAGE_SIZE).unwrap();
        let e = m.mark_code(1);
        assert_eq!(m.epoch(1), e);
        m.write(PAGE_SIZE + 5, &[0x90]).unwrap();
        assert_ne!(m.epoch(1), e);
        let e2 = m.mark_code(2);
        m.invalidate_code(2 * PAGE_SIZE + 100, 1);
        assert_ne!(m.epoch(2), e2);
        // Not code any more: further writes leave the epoch alone.
        let e3 = m.epoch(2);
        m.write(2 * PAGE_SIZE, &[1]).unwrap();
        assert_eq!(m.epoch(2), e3);
    }
}
