//! Guest RAM (through `vm-memory`) and the dirty-page log.

use esvm_arch::layout::MAX_RAM_SIZE;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const PAGE_SIZE: u64 = 4096;

/// The vm-memory type behind guest RAM: mmap-backed regions with an atomic dirty bitmap that
/// vm-memory sets on every write made through it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error(
        "guest memory size {size:#x} is not usable: it must be a non-zero multiple of 4 KiB \
         and at most {max} bytes"
    )]
    BadSize { size: u64, max: u64 },
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Alloc {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest-physical range {addr:#x}+{len:#x} is outside guest RAM ({size:#x} bytes)")]
    OutOfRange { addr: u64, len: u64, size: u64 },
}

/// Guest RAM: one contiguous region at guest-physical 0.
pub struct GuestMemory {
    mmap: GuestMemoryMmap,
    size: u64,
    /// Called after every write through [`GuestMemory::write`] (the emu backend drops decoded
    /// code for the written range).
    write_hook: std::sync::OnceLock<WriteHook>,
}

type WriteHook = Box<dyn Fn(u64, u64) + Send + Sync>;

impl GuestMemory {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || size > MAX_RAM_SIZE {
            return Err(MemoryError::BadSize {
                size,
                max: MAX_RAM_SIZE,
            });
        }
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|source| MemoryError::Alloc { size, source })?;
        Ok(GuestMemory {
            mmap,
            size,
            write_hook: std::sync::OnceLock::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The vm-memory object, for code that wants its full API.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mmap
    }

    /// Host virtual address of guest-physical 0 (RAM is one contiguous mapping).
    pub fn host_base(&self) -> *mut u8 {
        let region = self.mmap.iter().next().expect("one region");
        region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("region start is mapped")
    }

    /// The region's dirty bitmap (shared with the software vCPU, which sets it on guest
    /// writes).
    pub fn bitmap(&self) -> &AtomicBitmap {
        let region = self.mmap.iter().next().expect("one region");
        // The region derefs to its MmapRegion, whose bitmap() is the whole-region bitmap
        // (GuestMemoryRegion::bitmap() would return a slice view).
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mapping.bitmap()
    }

    fn check(&self, addr: u64, len: usize) -> Result<(), MemoryError> {
        if addr
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(MemoryError::OutOfRange {
                addr,
                len: len as u64,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Read guest RAM (not recorded as dirty).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len())?;
        self.mmap
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len() as u64,
                size: self.size,
            })
    }

    /// Write guest RAM; the pages are marked dirty.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len())?;
        self.mmap
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len() as u64,
                size: self.size,
            })?;
        if let Some(hook) = self.write_hook.get() {
            hook(addr, buf.len() as u64);
        }
        Ok(())
    }

    /// Install the write hook (once; later calls are ignored).
    pub fn set_write_hook(&self, hook: WriteHook) {
        let _ = self.write_hook.set(hook);
    }

    /// Take and clear the dirty bits recorded through vm-memory and the software vCPU.
    pub fn take_dirty(&self) -> DirtyBitmap {
        let words = self.bitmap().get_and_reset();
        DirtyBitmap::from_words(self.pages(), words)
    }
}

/// One bit per 4 KiB guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    pub fn from_words(pages: u64, mut words: Vec<u64>) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        let mut b = DirtyBitmap { pages, words };
        b.clear_tail();
        b
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    /// Merge another bitmap of the same size into this one.
    pub fn union(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }
    /// Set every page (a full pass).
    pub fn fill(&mut self) {
        for w in &mut self.words {
            *w = u64::MAX;
        }
        self.clear_tail();
    }
    /// Iterate over the set page numbers in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_writes_are_logged() {
        let m = GuestMemory::new(64 * PAGE_SIZE).unwrap();
        m.write(5 * PAGE_SIZE + 10, &[1, 2, 3]).unwrap();
        m.write(7 * PAGE_SIZE - 1, &[9, 9]).unwrap(); // straddles pages 6 and 7
        let d = m.take_dirty();
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(m.take_dirty().count(), 0, "taking clears");
        let mut b = [0u8; 3];
        m.read(5 * PAGE_SIZE + 10, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }

    #[test]
    fn bounds_are_checked() {
        let m = GuestMemory::new(16 * PAGE_SIZE).unwrap();
        assert!(m.write(16 * PAGE_SIZE - 1, &[0, 0]).is_err());
        assert!(m.write(u64::MAX, &[0]).is_err());
        assert!(GuestMemory::new(100).is_err());
        assert!(GuestMemory::new(0).is_err());
    }

    #[test]
    fn bitmap_ops() {
        let mut b = DirtyBitmap::new(70);
        b.fill();
        assert_eq!(b.count(), 70);
        let mut c = DirtyBitmap::new(70);
        c.set(69);
        c.set(3);
        c.set(1000); // ignored
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![3, 69]);
        let mut d = DirtyBitmap::new(70);
        d.union(&c);
        assert!(d.is_set(69) && !d.is_set(68));
    }
}
