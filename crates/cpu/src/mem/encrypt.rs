//! SEV memory encryption: the memory controller's view of guest RAM in an SEV-ES VM.
//!
//! Once [`PhysMemory::enable_encryption`] ran, every 4 KiB page of guest RAM is in one of two
//! states, and its content has exactly one home (the single source of truth):
//! - **Shared**: the content is the bytes in RAM (the host-visible mapping). A guest access
//!   through a mapping with the C-bit clear reads and writes them as they are.
//! - **Private**: the content is the *plaintext* in a second, trusted backing of the same
//!   size that only the "hardware" (the vCPU model and the secure processor) can reach. The
//!   bytes in RAM are ciphertext the host may look at; they are not kept up to date with
//!   guest writes (the host reads the current ciphertext through [`PhysMemory::read_host`]).
//!
//! All pages start Shared. A guest access through a C-bit-set mapping to a Shared page turns
//! it Private with plaintext = `decrypt(gpa, RAM page)` — exactly what hardware's
//! decrypt-on-read of those DRAM bytes yields; an access through a C-bit-clear mapping to a
//! Private page turns it Shared with RAM = `encrypt(gpa, plaintext)` — the DRAM bytes hardware
//! would hold. So both views behave as on hardware, where one DRAM page is read with or
//! without the memory key. Each conversion bumps a VM-wide *conversion generation* and flags
//! every SEV-ES vCPU on the memory (through the attention flags its block chaining already
//! polls, so plain vCPUs pay nothing); a vCPU flushes its TLB when it sees a new generation,
//! at its next block boundary; the converting vCPU drops at once the TLB entries of the page
//! it converted (all of them if other conversions happened since it last looked). A
//! conversion also drops decoded code on the page and marks it dirty.
//!
//! Who may call what:
//! - **host (untrusted) API** — [`PhysMemory::read_host`], [`PhysMemory::write_host`],
//!   [`PhysMemory::is_private`], [`PhysMemory::private_bitmap`] and the plain
//!   [`PhysMemory::read`]/[`PhysMemory::write`] (which behave like `read_host`/`write_host`
//!   once encryption is on): private pages read as ciphertext, and a host write to a private
//!   page makes it Shared with the host's bytes (the guest's next C-bit access decrypts them
//!   into garbage, as on hardware). A host write through other means followed by
//!   [`PhysMemory::invalidate_code`] does the same, except that the rest of such a page keeps
//!   the ciphertext of its last conversion instead of the page's current content.
//! - **trusted API** (the secure processor's firmware model and the vCPU model only; the
//!   hypervisor must never call it, since it hands out or plants plaintext):
//!   [`PhysMemory::encrypt_in_place`] (LAUNCH_UPDATE_DATA), [`PhysMemory::read_private`] and
//!   [`PhysMemory::write_private`].

use super::{MemError, OwnedRam, PhysMemory, PAGE_SIZE};
use std::alloc::Layout;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

/// The guest's memory key as the memory controller applies it: a per-page cipher tweaked by
/// the guest-physical address (the secure processor's XTS-AES key in esvm).
///
/// `decrypt_page(gpa, encrypt_page(gpa, p)) == p` must hold for every page; ciphertext of the
/// same plaintext at different addresses should differ.
pub trait PageCipher: Send + Sync {
    /// Encrypt the 4 KiB page at guest-physical `gpa` (page-aligned) in place.
    fn encrypt_page(&self, gpa: u64, page: &mut [u8; 4096]);
    /// Decrypt the 4 KiB page at guest-physical `gpa` (page-aligned) in place.
    fn decrypt_page(&self, gpa: u64, page: &mut [u8; 4096]);
}

type Page = [u8; PAGE_SIZE as usize];

/// Per-VM encryption state kept in every [`PhysMemory`] (inert until encryption is enabled).
pub(crate) struct SevMem {
    /// Conversion generation: bumped by every Shared <-> Private conversion.
    gen: AtomicU64,
    enc: OnceLock<Encryption>,
    /// The attention flags of the SEV-ES vCPUs on this memory: a conversion sets
    /// `KICK_SEV` in each, so they stop chaining blocks and compare generations.
    watchers: Mutex<Vec<Weak<AtomicU8>>>,
}

impl SevMem {
    pub(crate) fn new() -> Self {
        SevMem {
            gen: AtomicU64::new(0),
            enc: OnceLock::new(),
            watchers: Mutex::new(Vec::new()),
        }
    }

    fn watchers(&self) -> MutexGuard<'_, Vec<Weak<AtomicU8>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which view a conversion produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    Shared,
    Private,
}

struct Encryption {
    cipher: Arc<dyn PageCipher>,
    /// The private (plaintext) backing: `size` bytes, zeroed at first.
    private: OwnedRam,
    /// One bit per page: 1 = Private.
    state: Box<[AtomicU64]>,
    /// Serialises conversions and the multi-step host/firmware operations.
    lock: Mutex<()>,
}

// SAFETY: `private` is a heap allocation owned by this object and only accessed through raw
// pointers (copies and atomics), like guest RAM; the cipher is `Send + Sync`.
unsafe impl Send for Encryption {}
// SAFETY: see `Send`.
unsafe impl Sync for Encryption {}

impl Encryption {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_private(&self, page: u64) -> bool {
        self.state
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn set_state(&self, page: u64, view: View) {
        let w = &self.state[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        match view {
            View::Private => w.fetch_or(bit, Ordering::AcqRel),
            View::Shared => w.fetch_and(!bit, Ordering::AcqRel),
        };
    }

    /// Host address of page `page` of the private backing.
    ///
    /// # Safety
    /// `page` must be a page of guest RAM (the backing has RAM's size).
    unsafe fn private_page(&self, page: u64) -> *mut u8 {
        // SAFETY: the caller passes a page number inside RAM; the backing has RAM's size.
        unsafe { self.private.ptr.add((page * PAGE_SIZE) as usize) }
    }
}

/// Copies the page at `src` (guest RAM or the private backing) into `dst`.
///
/// # Safety
/// `src` must point to a whole page of guest RAM or of the private backing, as
/// [`PhysMemory::ram_page`] and [`Encryption::private_page`] return it. (The bytes are
/// shared memory, hence the raw copy.)
unsafe fn copy_in(dst: &mut Page, src: *const u8) {
    // SAFETY: the caller guarantees a whole page of guest memory at `src`.
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE as usize) }
}

/// Copies `src` over the page at `dst` (guest RAM or the private backing).
///
/// # Safety
/// As for [`copy_in`], for the page at `dst`.
unsafe fn copy_out(dst: *mut u8, src: &Page) {
    // SAFETY: the caller guarantees a whole page of guest memory at `dst`.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE as usize) }
}

impl PhysMemory {
    fn enc(&self) -> Option<&Encryption> {
        self.inner.sev.enc.get()
    }

    fn enc_or_err(&self) -> Result<&Encryption, MemError> {
        self.enc().ok_or(MemError::EncryptionOff)
    }

    /// Host address of page `page` of guest RAM.
    ///
    /// # Safety
    /// `page` must be a page of guest RAM.
    unsafe fn ram_page(&self, page: u64) -> *mut u8 {
        // SAFETY: the caller passes a page number inside RAM.
        unsafe { self.inner.base.add((page * PAGE_SIZE) as usize) }
    }

    /// Turn on SEV memory encryption with the guest's memory key: allocates the private
    /// backing (same size as RAM, zero) and the page-state bitmap, all pages Shared. Call it
    /// once, at LAUNCH_START (or RECEIVE_START), before any vCPU of the VM runs the guest.
    pub fn enable_encryption(&self, cipher: Arc<dyn PageCipher>) -> Result<(), MemError> {
        if self.enc().is_some() {
            return Err(MemError::EncryptionOn);
        }
        let size = self.inner.size;
        // 16-byte alignment keeps the allocation on calloc's lazily-zeroed path (see
        // `new_owned`); guest atomics need at most 16-byte alignment.
        let layout =
            Layout::from_size_align(size as usize, 16).map_err(|_| MemError::Alloc(size))?;
        // SAFETY: the layout has a non-zero size (RAM sizes are checked at construction).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(MemError::Alloc(size));
        }
        let pages = size / PAGE_SIZE;
        let enc = Encryption {
            cipher,
            private: OwnedRam { ptr, layout },
            state: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            lock: Mutex::new(()),
        };
        self.inner
            .sev
            .enc
            .set(enc)
            .map_err(|_| MemError::EncryptionOn)
    }

    /// Fault in the whole private backing now (`MADV_POPULATE_WRITE`) instead of page by
    /// page as it is first written, for a VM that will receive all its memory (a migration
    /// destination with preallocated memory). Its content stays zero. A no-op when
    /// encryption is off; a kernel without the advice (before 5.14) faults in on demand.
    pub fn prefault_private(&self) {
        let Some(e) = self.enc() else {
            return;
        };
        let page = PAGE_SIZE as usize;
        let start = e.private.ptr as usize;
        let aligned = start.next_multiple_of(page);
        let end = start + self.inner.size as usize;
        if aligned >= end {
            return;
        }
        // SAFETY: [aligned, end) lies inside the private backing's allocation (page-aligned
        // start rounded up, its end), which lives as long as `self`; MADV_POPULATE_WRITE only
        // allocates its pages (as a write of the same bytes would), it never changes them.
        let _ = unsafe {
            libc::madvise(
                aligned as *mut libc::c_void,
                end - aligned,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }

    /// Whether [`PhysMemory::enable_encryption`] ran.
    pub fn encryption_enabled(&self) -> bool {
        self.enc().is_some()
    }

    /// Whether RAM page `page` (guest-physical page number) is Private. False for pages
    /// outside RAM and when encryption is off.
    pub fn is_private(&self, page: u64) -> bool {
        self.enc().is_some_and(|e| e.is_private(page))
    }

    /// The page-state bitmap: bit `i` of word `i / 64` set = page `i` is Private (all zero
    /// when encryption is off).
    pub fn private_bitmap(&self) -> Vec<u64> {
        let pages = self.inner.size / PAGE_SIZE;
        match self.enc() {
            Some(e) => e.state.iter().map(|w| w.load(Ordering::Acquire)).collect(),
            None => vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Split `[gpa, gpa+len)` (inside RAM, checked by the caller) into per-page pieces:
    /// (page, offset in page, offset in the buffer, length).
    fn pieces(gpa: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let a = gpa + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(len - done);
            let item = (a / PAGE_SIZE, off, done, n);
            done += n;
            Some(item)
        })
    }

    /// Convert `page` to `view` (no-op if it is already there), with the lock held. Returns
    /// true if it converted.
    fn convert_locked(&self, e: &Encryption, page: u64, view: View) -> bool {
        let private = e.is_private(page);
        if private == (view == View::Private) {
            return false;
        }
        // Outside RAM there is nothing to convert (and no backing to touch): a caller bug.
        assert!(
            page < self.inner.size / PAGE_SIZE,
            "page {page:#x} is outside guest RAM"
        );
        let gpa = page * PAGE_SIZE;
        let mut buf = [0u8; PAGE_SIZE as usize];
        match view {
            View::Private => {
                // SAFETY: `page` is a RAM page (asserted above), held whole by both backings.
                unsafe { copy_in(&mut buf, self.ram_page(page)) };
                e.cipher.decrypt_page(gpa, &mut buf);
                // SAFETY: `page` is a RAM page (asserted above).
                unsafe { copy_out(e.private_page(page), &buf) };
            }
            View::Shared => {
                // SAFETY: `page` is a RAM page (asserted above), held whole by both backings.
                unsafe { copy_in(&mut buf, e.private_page(page)) };
                e.cipher.encrypt_page(gpa, &mut buf);
                // SAFETY: `page` is a RAM page (asserted above).
                unsafe { copy_out(self.ram_page(page), &buf) };
            }
        }
        e.set_state(page, view);
        self.converted(page);
        true
    }

    /// Bookkeeping after the content behind `page` changed home: new conversion generation,
    /// decoded code on the page dropped, page dirty.
    fn converted(&self, page: u64) {
        self.inner.sev.gen.fetch_add(1, Ordering::AcqRel);
        self.inner.sev.watchers().retain(|w| match w.upgrade() {
            Some(k) => {
                k.fetch_or(crate::KICK_SEV, Ordering::Release);
                true
            }
            None => false,
        });
        self.invalidate_page(page);
        let bm = self.bitmap();
        if !bm.is_bit_set(page as usize) {
            bm.set_bit(page as usize);
        }
    }

    /// vCPU side: make RAM page `page` hold its content in `view`. `None` if encryption is
    /// off; `Some(true)` if a conversion happened (the caller flushes its TLB).
    pub(crate) fn make_view(&self, page: u64, view: View) -> Option<bool> {
        let e = self.enc()?;
        if e.is_private(page) == (view == View::Private) {
            return Some(false);
        }
        let _g = e.lock();
        Some(self.convert_locked(e, page, view))
    }

    /// Base of the private backing (null when encryption is off).
    pub(crate) fn private_base(&self) -> *mut u8 {
        self.enc().map_or(std::ptr::null_mut(), |e| e.private.ptr)
    }

    /// The conversion generation counter.
    pub(crate) fn conversion_gen(&self) -> *const AtomicU64 {
        &self.inner.sev.gen
    }

    /// Have conversions set `KICK_SEV` in a vCPU's attention flags.
    pub(crate) fn watch_conversions(&self, kick: &Arc<AtomicU8>) {
        self.inner.sev.watchers().push(Arc::downgrade(kick));
    }

    /// LAUNCH_UPDATE_DATA's effect on `[gpa, gpa+len)` (trusted API): the bytes now in RAM
    /// become the plaintext of the private view and RAM receives their ciphertext, so a
    /// host reading its mapping sees ciphertext. Whole pages become Private; bytes of those
    /// pages outside the range keep what a C-bit read saw before (for a Shared page, the
    /// decryption of its RAM bytes), as on hardware, which only encrypts the range.
    pub fn encrypt_in_place(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let e = self.enc_or_err()?;
        self.check(gpa, len as usize)?;
        let _g = e.lock();
        for (page, off, _, n) in Self::pieces(gpa, len as usize) {
            let pgpa = page * PAGE_SIZE;
            // What DRAM holds now, and what a C-bit read of it yields.
            let mut dram = [0u8; PAGE_SIZE as usize];
            let mut plain = [0u8; PAGE_SIZE as usize];
            if e.is_private(page) {
                // SAFETY: `page` is in the range checked to lie inside RAM above.
                unsafe { copy_in(&mut plain, e.private_page(page)) };
                dram = plain;
                e.cipher.encrypt_page(pgpa, &mut dram);
            } else {
                // SAFETY: `page` is in the range checked to lie inside RAM above.
                unsafe { copy_in(&mut dram, self.ram_page(page)) };
                plain = dram;
                e.cipher.decrypt_page(pgpa, &mut plain);
            }
            // The range's DRAM bytes are taken as plaintext.
            plain[off..off + n].copy_from_slice(&dram[off..off + n]);
            // SAFETY: `page` is in the range checked to lie inside RAM above.
            unsafe { copy_out(e.private_page(page), &plain) };
            e.cipher.encrypt_page(pgpa, &mut plain);
            // SAFETY: `page` is in the range checked to lie inside RAM above.
            unsafe { copy_out(self.ram_page(page), &plain) };
            e.set_state(page, View::Private);
            self.converted(page);
        }
        Ok(())
    }

    /// Read the private view (trusted API): the plaintext a C-bit-set read would see. Pages
    /// stay in their state (a Shared page reads as the decryption of its RAM bytes).
    pub fn read_private(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let e = self.enc_or_err()?;
        self.check(gpa, buf.len())?;
        let _g = e.lock();
        let mut tmp = [0u8; PAGE_SIZE as usize];
        for (page, off, at, n) in Self::pieces(gpa, buf.len()) {
            if e.is_private(page) {
                // SAFETY: `page` is in the range checked to lie inside RAM above.
                unsafe { copy_in(&mut tmp, e.private_page(page)) };
            } else {
                // SAFETY: `page` is in the range checked to lie inside RAM above.
                unsafe { copy_in(&mut tmp, self.ram_page(page)) };
                e.cipher.decrypt_page(page * PAGE_SIZE, &mut tmp);
            }
            buf[at..at + n].copy_from_slice(&tmp[off..off + n]);
        }
        Ok(())
    }

    /// Write the private view (trusted API): the pages become Private (a Shared page first
    /// converts, so its other bytes keep what a C-bit read saw) and take `buf` as plaintext.
    pub fn write_private(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let e = self.enc_or_err()?;
        self.check(gpa, buf.len())?;
        let _g = e.lock();
        for (page, off, at, n) in Self::pieces(gpa, buf.len()) {
            let whole_shared_page = n == PAGE_SIZE as usize && !e.is_private(page);
            if !whole_shared_page {
                self.convert_locked(e, page, View::Private);
            }
            // SAFETY: `page` is in the range checked to lie inside RAM above, and
            // `off + n <= PAGE_SIZE`: inside that page of the private backing.
            unsafe {
                std::ptr::copy_nonoverlapping(buf[at..].as_ptr(), e.private_page(page).add(off), n)
            };
            if whole_shared_page {
                // The whole page is replaced: converting it first would decrypt bytes that
                // are overwritten at once (RECEIVE_UPDATE_DATA takes pages whole). The new
                // content is in place before the page turns Private.
                e.set_state(page, View::Private);
                self.converted(page);
            }
            self.note_write(page);
        }
        Ok(())
    }

    /// Read guest memory as the host sees it: RAM bytes for Shared pages, the current
    /// ciphertext (`encrypt(gpa, plaintext)`) for Private pages. Without encryption: RAM.
    pub fn read_host(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let Some(e) = self.enc() else {
            return self.read(gpa, buf);
        };
        self.check(gpa, buf.len())?;
        self.wait_range(gpa, buf.len())?;
        let _g = e.lock();
        let mut tmp = [0u8; PAGE_SIZE as usize];
        for (page, off, at, n) in Self::pieces(gpa, buf.len()) {
            if e.is_private(page) {
                // SAFETY: `page` is in the range checked to lie inside RAM above.
                unsafe { copy_in(&mut tmp, e.private_page(page)) };
                e.cipher.encrypt_page(page * PAGE_SIZE, &mut tmp);
            } else {
                // SAFETY: `page` is in the range checked to lie inside RAM above.
                unsafe { copy_in(&mut tmp, self.ram_page(page)) };
            }
            buf[at..at + n].copy_from_slice(&tmp[off..off + n]);
        }
        Ok(())
    }

    /// Write guest memory as the host can: into RAM. A Private page first becomes Shared
    /// (RAM = its current ciphertext), then takes the bytes, so the guest's next C-bit read
    /// decrypts them into garbage, as on hardware. Marks pages dirty and drops decoded code.
    /// Without encryption: a plain RAM write.
    pub fn write_host(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.write_host_inner(gpa, buf, true)
    }

    /// Post-copy: [`PhysMemory::write_host`] into missing pages that the migration layer
    /// fills (an SEV-ES page that arrives as shared plaintext); it does not wait for them.
    /// Publish them afterwards.
    pub fn fill_missing_host(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.write_host_inner(gpa, buf, false)
    }

    fn write_host_inner(&self, gpa: u64, buf: &[u8], wait: bool) -> Result<(), MemError> {
        let Some(e) = self.enc() else {
            self.check(gpa, buf.len())?;
            if wait {
                self.wait_range(gpa, buf.len())?;
            }
            // SAFETY: range checked against RAM; raw copy into shared memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf.as_ptr(),
                    self.base().add(gpa as usize),
                    buf.len(),
                )
            };
            if !buf.is_empty() {
                for p in gpa / PAGE_SIZE..=(gpa + buf.len() as u64 - 1) / PAGE_SIZE {
                    self.note_write(p);
                }
            }
            return Ok(());
        };
        self.check(gpa, buf.len())?;
        if wait {
            self.wait_range(gpa, buf.len())?;
        }
        let _g = e.lock();
        for (page, off, at, n) in Self::pieces(gpa, buf.len()) {
            self.convert_locked(e, page, View::Shared);
            // SAFETY: `page` is in the range checked to lie inside RAM above, and
            // `off + n <= PAGE_SIZE`: inside that RAM page.
            unsafe {
                std::ptr::copy_nonoverlapping(buf[at..].as_ptr(), self.ram_page(page).add(off), n)
            };
            self.note_write(page);
        }
        Ok(())
    }

    /// The host wrote `[gpa, gpa+len)` of RAM behind our back (see
    /// [`PhysMemory::invalidate_code`]): Private pages in the range become Shared with the RAM
    /// bytes as they are now.
    pub(crate) fn host_wrote(&self, gpa: u64, len: u64) {
        let Some(e) = self.enc() else {
            return;
        };
        if len == 0 || gpa >= self.inner.size {
            return;
        }
        let len = len.min(self.inner.size - gpa);
        let _g = e.lock();
        for (page, _, _, _) in Self::pieces(gpa, len as usize) {
            if e.is_private(page) {
                e.set_state(page, View::Shared);
                self.converted(page);
            }
        }
    }
}
