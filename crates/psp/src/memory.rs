//! The trusted memory path between the firmware and a guest's private memory.
//!
//! The PSP is trusted "hardware"; the hypervisor is not. The hypervisor layer
//! implements [`GuestMemoryAccess`] over the guest's private backing (the
//! memory the trusted CPU model sees in plaintext) and hands it to the
//! firmware commands that read or write guest memory. Both methods take
//! `&self` (implementations use interior mutability, as `vm-memory` does), so
//! SEND/RECEIVE workers can run on several threads at once.

use std::sync::RwLock;

/// Why the trusted memory path failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryAccessError {
    /// The range is not backed by guest memory.
    #[error("guest range 0x{gpa:x}+0x{len:x} is outside guest memory")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Any other failure of the backing.
    #[error("{0}")]
    Backing(String),
}

/// Plaintext access to a guest's private memory, for the firmware only.
pub trait GuestMemoryAccess: Send + Sync {
    /// Reads `buf.len()` bytes at guest-physical address `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryAccessError>;
    /// Writes `buf` at guest-physical address `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryAccessError>;
}

/// A flat in-memory guest RAM starting at GPA 0 (tests, benchmarks, tools).
/// Stored in 1 MiB stripes with their own locks, so threads working on
/// different regions do not contend.
#[derive(Debug)]
pub struct FlatMemory {
    size: usize,
    stripes: Vec<RwLock<Box<[u8]>>>,
}

const STRIPE: usize = 1 << 20;

impl FlatMemory {
    /// `size` bytes of zeroed memory.
    pub fn new(size: usize) -> FlatMemory {
        let stripes = (0..size.div_ceil(STRIPE))
            .map(|i| RwLock::new(vec![0u8; STRIPE.min(size - i * STRIPE)].into_boxed_slice()))
            .collect();
        FlatMemory { size, stripes }
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A copy of a range (test helper; None if out of range).
    pub fn snapshot(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v).ok()?;
        Some(v)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<usize, MemoryAccessError> {
        let err = MemoryAccessError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let start = usize::try_from(gpa).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or(err.clone())?;
        if end > self.size {
            return Err(err);
        }
        Ok(start)
    }

    /// Calls `f(stripe_index, offset_in_stripe, range_in_buf)` for each piece.
    fn pieces(
        start: usize,
        len: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>) -> Result<(), MemoryAccessError>,
    ) -> Result<(), MemoryAccessError> {
        let mut done = 0;
        while done < len {
            let a = start + done;
            let (i, off) = (a / STRIPE, a % STRIPE);
            let n = (STRIPE - off).min(len - done);
            f(i, off, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

fn poisoned() -> MemoryAccessError {
    MemoryAccessError::Backing("memory lock poisoned".into())
}

impl GuestMemoryAccess for FlatMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryAccessError> {
        let start = self.check(gpa, buf.len())?;
        Self::pieces(start, buf.len(), |i, off, r| {
            let s = self.stripes[i].read().map_err(|_| poisoned())?;
            let n = r.len();
            buf[r].copy_from_slice(&s[off..off + n]);
            Ok(())
        })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryAccessError> {
        let start = self.check(gpa, buf.len())?;
        Self::pieces(start, buf.len(), |i, off, r| {
            let mut s = self.stripes[i].write().map_err(|_| poisoned())?;
            let n = r.len();
            s[off..off + n].copy_from_slice(&buf[r]);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_memory_bounds() {
        let m = FlatMemory::new(8192);
        m.write(4096, &[1, 2, 3]).unwrap();
        let big = FlatMemory::new(3 << 20);
        let data: Vec<u8> = (0..STRIPE + 10).map(|i| i as u8).collect();
        big.write((STRIPE - 5) as u64, &data).unwrap();
        assert_eq!(big.snapshot((STRIPE - 5) as u64, data.len()).unwrap(), data);
        assert_eq!(m.snapshot(4096, 3).unwrap(), vec![1, 2, 3]);
        assert!(m.write(8190, &[0; 3]).is_err());
        assert!(m.read(u64::MAX, &mut [0; 2]).is_err());
    }
}
