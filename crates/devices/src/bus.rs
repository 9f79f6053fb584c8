//! Port-I/O bus: routes `IN`/`OUT` accesses of 1, 2 or 4 bytes to the device that claims the
//! port.
//!
//! The bus is generic over what it stores per port range (`T`). Stand-alone users store boxed
//! [`PortIoDevice`]s and call [`IoBus::read`]/[`IoBus::write`]; the [`crate::Devices`]
//! registry stores a small routing key and dispatches itself through [`IoBus::read_with`] /
//! [`IoBus::write_with`], whose handler also says whether the device took the access.
//!
//! Routing rules:
//! - An access is routed by its first port. If no range claims that port, or the device
//!   answers "not mine", the access is *unclaimed*: reads return all-ones, writes are
//!   dropped, and both are counted in [`BusStats`].
//! - A range registered with [`AccessMode::Whole`] receives the whole access (offset of the
//!   first port, 1/2/4 data bytes), e.g. the debug-exit port that takes a value of any width.
//! - A range registered with [`AccessMode::Bytewise`] models a byte-wide ISA device: the access
//!   is split into single-byte accesses at consecutive ports, each routed on its own (a byte
//!   that lands on no device reads as 0xff / is dropped).
//!
//! [`MmioBus`] is the same map for guest-physical MMIO ranges: an access is routed whole to
//! the range that contains all of it.

use std::fmt;

use thiserror::Error;

/// Errors of the port-I/O bus.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero ports was given.
    #[error("port range starting at {base:#06x} is empty; give it a length of at least one port")]
    EmptyRange {
        /// First port of the rejected range.
        base: u16,
    },
    /// The range runs past port 0xffff.
    #[error("port range {base:#06x}+{len} runs past port 0xffff; shorten it or move it down")]
    RangeOverflow {
        /// First port of the rejected range.
        base: u16,
        /// Requested length.
        len: u32,
    },
    /// The range overlaps a range that is already registered.
    #[error("port range {new} overlaps the registered range {existing}; pick free ports or remove the other device first")]
    Overlap {
        /// The rejected range.
        new: PortRange,
        /// The range already on the bus.
        existing: PortRange,
    },
    /// An MMIO range of zero bytes was given.
    #[error("MMIO range starting at {base:#x} is empty; give it a length of at least one byte")]
    EmptyMmioRange {
        /// First address of the rejected range.
        base: u64,
    },
    /// The MMIO range runs past the end of the address space.
    #[error("MMIO range {base:#x}+{len:#x} runs past the end of the address space")]
    MmioRangeOverflow {
        /// First address of the rejected range.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The MMIO range overlaps a range that is already registered.
    #[error("MMIO range {new} overlaps the registered range {existing}; pick a free range")]
    MmioOverlap {
        /// The rejected range.
        new: MmioRange,
        /// The range already on the bus.
        existing: MmioRange,
    },
    /// An access that is not 1, 2 or 4 bytes wide.
    #[error("port access of {len} bytes at port {port:#06x} is not 1, 2 or 4 bytes wide; split it into such accesses")]
    BadAccessSize {
        /// First port of the access.
        port: u16,
        /// Its width in bytes.
        len: usize,
    },
}

/// A contiguous range of I/O ports, `base ..= base + len - 1`, never empty and never wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    base: u16,
    /// `last - base` (a full 64 Ki range does not fit a u16 length).
    span: u16,
}

impl PortRange {
    /// A range of `len` ports starting at `base`.
    pub fn new(base: u16, len: u32) -> Result<Self, BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        if u32::from(base) + len > 0x1_0000 {
            return Err(BusError::RangeOverflow { base, len });
        }
        // 1 <= len <= 0x10000 - base, so len - 1 fits in u16 and base + span does not wrap.
        Ok(Self {
            base,
            span: (len - 1) as u16,
        })
    }

    /// First port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// Last port (inclusive).
    pub fn last(&self) -> u16 {
        self.base.saturating_add(self.span)
    }

    /// Number of ports.
    pub fn len(&self) -> u32 {
        u32::from(self.span) + 1
    }

    /// Always false: ranges are never empty. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        port >= self.base && port <= self.last()
    }

    fn overlaps(&self, other: &PortRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#06x}-{:#06x}", self.base, self.last())
    }
}

/// How accesses wider than a byte reach a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// The device has byte-wide registers: wide accesses are split into byte accesses at
    /// consecutive ports, each routed independently (as the ISA bus does).
    Bytewise,
    /// The device takes the whole 1/2/4-byte access at the offset of its first port.
    Whole,
}

/// A device on the port-I/O bus. `offset` is relative to the start of its range.
pub trait PortIoDevice: Send {
    /// Fill `data` (1, 2 or 4 bytes; 1 byte for [`AccessMode::Bytewise`] ranges).
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Accept `data` (1, 2 or 4 bytes, little-endian; 1 byte for bytewise ranges).
    fn write(&mut self, offset: u16, data: &[u8]);
}

impl<D: PortIoDevice + ?Sized> PortIoDevice for Box<D> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        (**self).read(offset, data)
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        (**self).write(offset, data)
    }
}

/// Diagnostic counters of accesses nobody claimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Reads of unclaimed ports (answered with all-ones).
    pub unclaimed_reads: u64,
    /// Writes to unclaimed ports (dropped).
    pub unclaimed_writes: u64,
    /// Port and little-endian value of the most recent unclaimed write.
    pub last_unclaimed_write: Option<(u16, u32)>,
}

struct Entry<T> {
    range: PortRange,
    mode: AccessMode,
    target: T,
}

/// Port-I/O dispatcher; see the module documentation for the routing rules.
pub struct IoBus<T> {
    /// Sorted by base port, non-overlapping.
    entries: Vec<Entry<T>>,
    stats: BusStats,
}

impl<T> Default for IoBus<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for IoBus<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBus")
            .field(
                "ranges",
                &self
                    .entries
                    .iter()
                    .map(|e| (e.range, e.mode))
                    .collect::<Vec<_>>(),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

fn check_len(port: u16, len: usize) -> Result<(), BusError> {
    match len {
        1 | 2 | 4 => Ok(()),
        _ => Err(BusError::BadAccessSize { port, len }),
    }
}

fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

impl<T> IoBus<T> {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
            stats: BusStats::default(),
        }
    }

    /// Claim `range` for `target`.
    pub fn insert(
        &mut self,
        range: PortRange,
        mode: AccessMode,
        target: T,
    ) -> Result<(), BusError> {
        if let Some(existing) = self.entries.iter().find(|e| e.range.overlaps(&range)) {
            return Err(BusError::Overlap {
                new: range,
                existing: existing.range,
            });
        }
        let at = self.entries.partition_point(|e| e.range.base < range.base);
        self.entries.insert(
            at,
            Entry {
                range,
                mode,
                target,
            },
        );
        Ok(())
    }

    /// Remove the range starting exactly at `base`, returning what was stored there.
    pub fn remove(&mut self, base: u16) -> Option<T> {
        let idx = self.entries.iter().position(|e| e.range.base == base)?;
        Some(self.entries.remove(idx).target)
    }

    /// The registered ranges, in port order.
    pub fn ranges(&self) -> impl Iterator<Item = (PortRange, AccessMode)> + '_ {
        self.entries.iter().map(|e| (e.range, e.mode))
    }

    /// Unclaimed-access counters.
    pub fn stats(&self) -> BusStats {
        self.stats
    }

    fn find(&self, port: u16) -> Option<usize> {
        let idx = self.entries.partition_point(|e| e.range.base <= port);
        let idx = idx.checked_sub(1)?;
        self.entries[idx].range.contains(port).then_some(idx)
    }

    /// What claims `port`, and the port's offset in that range.
    pub fn target(&self, port: u16) -> Option<(&T, u16)> {
        self.find(port).map(|i| {
            let e = &self.entries[i];
            (&e.target, port - e.range.base)
        })
    }

    /// Mutable form of [`IoBus::target`].
    pub fn target_mut(&mut self, port: u16) -> Option<(&mut T, u16)> {
        self.find(port).map(|i| {
            let e = &mut self.entries[i];
            (&mut e.target, port - e.range.base)
        })
    }

    /// Route a read of `data.len()` bytes at `port`, calling `f(target, range base, offset,
    /// bytes)` for each claimed piece; `f` returns whether the device took it. Unclaimed
    /// bytes read as 0xff; the access counts as unclaimed when its first piece is.
    pub fn read_with<F>(&mut self, port: u16, data: &mut [u8], mut f: F) -> Result<(), BusError>
    where
        F: FnMut(&mut T, u16, u16, &mut [u8]) -> bool,
    {
        check_len(port, data.len())?;
        let Some(first) = self.find(port) else {
            data.fill(0xff);
            self.stats.unclaimed_reads += 1;
            return Ok(());
        };
        if self.entries[first].mode == AccessMode::Whole {
            let e = &mut self.entries[first];
            let base = e.range.base;
            if !f(&mut e.target, base, port - base, data) {
                data.fill(0xff);
                self.stats.unclaimed_reads += 1;
            }
            return Ok(());
        }
        let mut first_claimed = true;
        for (i, byte) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            let found = if i == 0 { Some(first) } else { self.find(p) };
            let claimed = match found {
                Some(idx) => {
                    let e = &mut self.entries[idx];
                    let base = e.range.base;
                    f(&mut e.target, base, p - base, std::slice::from_mut(byte))
                }
                None => false,
            };
            if !claimed {
                *byte = 0xff;
                first_claimed &= i != 0;
            }
        }
        if !first_claimed {
            self.stats.unclaimed_reads += 1;
        }
        Ok(())
    }

    /// Route a write of `data` (little-endian) at `port`, calling `f(target, range base,
    /// offset, bytes)` for each claimed piece; `f` returns whether the device took it.
    /// Unclaimed bytes are dropped; the access counts as unclaimed when its first piece is.
    pub fn write_with<F>(&mut self, port: u16, data: &[u8], mut f: F) -> Result<(), BusError>
    where
        F: FnMut(&mut T, u16, u16, &[u8]) -> bool,
    {
        check_len(port, data.len())?;
        let claimed = match self.find(port) {
            None => false,
            Some(first) if self.entries[first].mode == AccessMode::Whole => {
                let e = &mut self.entries[first];
                let base = e.range.base;
                f(&mut e.target, base, port - base, data)
            }
            Some(first) => {
                let mut first_claimed = true;
                for (i, byte) in data.iter().enumerate() {
                    let p = port.wrapping_add(i as u16);
                    let found = if i == 0 { Some(first) } else { self.find(p) };
                    if let Some(idx) = found {
                        let e = &mut self.entries[idx];
                        let base = e.range.base;
                        let took = f(&mut e.target, base, p - base, std::slice::from_ref(byte));
                        first_claimed &= took || i != 0;
                    }
                }
                first_claimed
            }
        };
        if !claimed {
            self.stats.unclaimed_writes += 1;
            self.stats.last_unclaimed_write = Some((port, le_value(data)));
        }
        Ok(())
    }
}

impl<T: PortIoDevice> IoBus<T> {
    /// Read `data.len()` (1, 2 or 4) bytes from `port`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) -> Result<(), BusError> {
        self.read_with(port, data, |d, _base, off, bytes| {
            d.read(off, bytes);
            true
        })
    }

    /// Write `data` (1, 2 or 4 bytes, little-endian) to `port`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Result<(), BusError> {
        self.write_with(port, data, |d, _base, off, bytes| {
            d.write(off, bytes);
            true
        })
    }
}

/// A contiguous range of guest-physical addresses, `base ..= base + len - 1`, never empty and
/// never wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmioRange {
    base: u64,
    /// `last - base`.
    span: u64,
}

impl MmioRange {
    /// A range of `len` bytes starting at `base`.
    pub fn new(base: u64, len: u64) -> Result<Self, BusError> {
        if len == 0 {
            return Err(BusError::EmptyMmioRange { base });
        }
        if base.checked_add(len - 1).is_none() {
            return Err(BusError::MmioRangeOverflow { base, len });
        }
        Ok(Self {
            base,
            span: len - 1,
        })
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Last address (inclusive).
    pub fn last(&self) -> u64 {
        self.base + self.span
    }

    /// Whether `[addr, addr + len)` lies entirely in the range (`len` of 0 never does).
    pub fn contains_access(&self, addr: u64, len: usize) -> bool {
        let Some(end) = (len as u64)
            .checked_sub(1)
            .and_then(|l| addr.checked_add(l))
        else {
            return false;
        };
        addr >= self.base && end <= self.last()
    }

    fn overlaps(&self, other: &MmioRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for MmioRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.base, self.last())
    }
}

/// MMIO dispatcher: non-overlapping address ranges, each with a `T`. An access is routed to
/// the range that contains all of its bytes; anything else is the caller's (unclaimed).
pub struct MmioBus<T> {
    /// Sorted by base address, non-overlapping.
    entries: Vec<(MmioRange, T)>,
}

impl<T> Default for MmioBus<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for MmioBus<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(r, _)| r))
            .finish()
    }
}

impl<T> MmioBus<T> {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Claim `range` for `target`.
    pub fn insert(&mut self, range: MmioRange, target: T) -> Result<(), BusError> {
        if let Some((existing, _)) = self.entries.iter().find(|(r, _)| r.overlaps(&range)) {
            return Err(BusError::MmioOverlap {
                new: range,
                existing: *existing,
            });
        }
        let at = self.entries.partition_point(|(r, _)| r.base < range.base);
        self.entries.insert(at, (range, target));
        Ok(())
    }

    /// Remove the range starting exactly at `base`, returning what was stored there.
    pub fn remove(&mut self, base: u64) -> Option<T> {
        let idx = self.entries.iter().position(|(r, _)| r.base == base)?;
        Some(self.entries.remove(idx).1)
    }

    /// The registered ranges, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = MmioRange> + '_ {
        self.entries.iter().map(|(r, _)| *r)
    }

    /// The range containing the whole access `[addr, addr + len)` and what it holds.
    pub fn target_mut(&mut self, addr: u64, len: usize) -> Option<(MmioRange, &mut T)> {
        let idx = self.entries.partition_point(|(r, _)| r.base <= addr);
        let (range, target) = self.entries.get_mut(idx.checked_sub(1)?)?;
        range.contains_access(addr, len).then_some((*range, target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// One recorded access: 'r' or 'w', offset, bytes.
    type Access = (char, u16, Vec<u8>);

    /// Records accesses and answers reads with `offset + 0x10 * byte index`.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Access>>>);

    impl PortIoDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(0x10 * i as u8);
            }
            self.0.lock().unwrap().push(('r', offset, data.to_vec()));
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.lock().unwrap().push(('w', offset, data.to_vec()));
        }
    }

    fn bus_with(mode: AccessMode) -> (IoBus<Box<dyn PortIoDevice>>, Recorder) {
        let rec = Recorder::default();
        let mut bus: IoBus<Box<dyn PortIoDevice>> = IoBus::new();
        bus.insert(
            PortRange::new(0x100, 4).unwrap(),
            mode,
            Box::new(rec.clone()),
        )
        .unwrap();
        (bus, rec)
    }

    #[test]
    fn range_validation() {
        assert_eq!(PortRange::new(5, 0), Err(BusError::EmptyRange { base: 5 }));
        assert!(matches!(
            PortRange::new(0xfffe, 3),
            Err(BusError::RangeOverflow { .. })
        ));
        let r = PortRange::new(0xfffe, 2).unwrap();
        assert_eq!((r.base(), r.last(), r.len()), (0xfffe, 0xffff, 2));
        let full = PortRange::new(0, 0x1_0000).unwrap();
        assert!(full.contains(0) && full.contains(0xffff));
        assert_eq!(full.len(), 0x1_0000);
    }

    #[test]
    fn overlap_is_rejected_and_touching_is_fine() {
        let (mut bus, rec) = bus_with(AccessMode::Bytewise);
        let err = bus
            .insert(
                PortRange::new(0x103, 2).unwrap(),
                AccessMode::Bytewise,
                Box::new(rec.clone()),
            )
            .unwrap_err();
        assert!(matches!(err, BusError::Overlap { .. }));
        bus.insert(
            PortRange::new(0xfc, 4).unwrap(),
            AccessMode::Bytewise,
            Box::new(rec.clone()),
        )
        .unwrap();
        bus.insert(
            PortRange::new(0x104, 1).unwrap(),
            AccessMode::Bytewise,
            Box::new(rec),
        )
        .unwrap();
        let bases: Vec<u16> = bus.ranges().map(|(r, _)| r.base()).collect();
        assert_eq!(bases, vec![0xfc, 0x100, 0x104]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_writes_are_counted() {
        let (mut bus, rec) = bus_with(AccessMode::Bytewise);
        let mut d = [0u8; 4];
        bus.read(0x80, &mut d).unwrap();
        assert_eq!(d, [0xff; 4]);
        bus.write(0x80, &[0x12, 0x34]).unwrap();
        bus.write(0x81, &[0x56]).unwrap();
        let s = bus.stats();
        assert_eq!(s.unclaimed_reads, 1);
        assert_eq!(s.unclaimed_writes, 2);
        assert_eq!(s.last_unclaimed_write, Some((0x81, 0x56)));
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn bytewise_splits_wide_accesses() {
        let (mut bus, rec) = bus_with(AccessMode::Bytewise);
        let mut d = [0u8; 4];
        // Ports 0x102, 0x103 are claimed; 0x104, 0x105 are not.
        bus.read(0x102, &mut d).unwrap();
        assert_eq!(d, [2, 3, 0xff, 0xff]);
        bus.write(0x101, &[0xaa, 0xbb]).unwrap();
        let log = rec.0.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                ('r', 2, vec![2]),
                ('r', 3, vec![3]),
                ('w', 1, vec![0xaa]),
                ('w', 2, vec![0xbb]),
            ]
        );
        assert_eq!(bus.stats().unclaimed_reads, 0);
    }

    #[test]
    fn whole_mode_passes_the_full_access() {
        let (mut bus, rec) = bus_with(AccessMode::Whole);
        let mut d = [0u8; 4];
        bus.read(0x103, &mut d).unwrap();
        assert_eq!(d, [3, 0x13, 0x23, 0x33]);
        bus.write(0x100, &[1, 2, 3, 4]).unwrap();
        let log = rec.0.lock().unwrap().clone();
        assert_eq!(log[1], ('w', 0, vec![1, 2, 3, 4]));
    }

    #[test]
    fn bad_sizes_are_errors() {
        let (mut bus, _rec) = bus_with(AccessMode::Whole);
        let mut d = [0u8; 3];
        assert_eq!(
            bus.read(0x100, &mut d),
            Err(BusError::BadAccessSize {
                port: 0x100,
                len: 3
            })
        );
        assert!(bus.write(0x100, &[]).is_err());
        assert!(bus.write(0x100, &[0; 8]).is_err());
    }

    #[test]
    fn remove_and_lookup() {
        let (mut bus, _rec) = bus_with(AccessMode::Whole);
        assert_eq!(bus.target(0x102).map(|(_, o)| o), Some(2));
        assert!(bus.target(0x104).is_none());
        assert!(bus.remove(0x101).is_none());
        assert!(bus.remove(0x100).is_some());
        assert!(bus.target(0x100).is_none());
    }

    #[test]
    fn top_of_port_space_wraps_without_panic() {
        let mut bus: IoBus<Box<dyn PortIoDevice>> = IoBus::new();
        let rec = Recorder::default();
        bus.insert(
            PortRange::new(0xffff, 1).unwrap(),
            AccessMode::Bytewise,
            Box::new(rec.clone()),
        )
        .unwrap();
        bus.insert(
            PortRange::new(0, 1).unwrap(),
            AccessMode::Bytewise,
            Box::new(rec),
        )
        .unwrap();
        let mut d = [0u8; 4];
        bus.read(0xffff, &mut d).unwrap();
        assert_eq!(d, [0, 0, 0xff, 0xff]);
    }
    #[test]
    fn handlers_that_decline_count_as_unclaimed() {
        let mut bus: IoBus<u8> = IoBus::new();
        bus.insert(PortRange::new(0x70, 2).unwrap(), AccessMode::Bytewise, 1)
            .unwrap();
        bus.insert(PortRange::new(0xcf8, 8).unwrap(), AccessMode::Whole, 2)
            .unwrap();
        // The bytewise device takes only its first port; the whole one only dword accesses.
        let mut seen = Vec::new();
        let mut d = [0u8; 2];
        bus.read_with(0x70, &mut d, |t, base, off, b| {
            seen.push((*t, base, off));
            b[0] = 0x11;
            off == 0
        })
        .unwrap();
        assert_eq!(d, [0x11, 0xff]);
        assert_eq!(seen, [(1, 0x70, 0), (1, 0x70, 1)]);
        assert_eq!(bus.stats().unclaimed_reads, 0, "first byte was taken");
        let mut b = [0u8; 1];
        bus.read_with(0xcfb, &mut b, |_, _, _, b| b.len() == 4)
            .unwrap();
        assert_eq!(b, [0xff]);
        bus.write_with(0xcf9, &[1], |_, base, off, b| {
            assert_eq!((base, off), (0xcf8, 1));
            b.len() == 4
        })
        .unwrap();
        bus.write_with(0xcf8, &[0, 0, 0, 0x80], |_, _, _, b| b.len() == 4)
            .unwrap();
        let s = bus.stats();
        assert_eq!((s.unclaimed_reads, s.unclaimed_writes), (1, 1));
        assert_eq!(s.last_unclaimed_write, Some((0xcf9, 1)));
    }

    #[test]
    fn mmio_ranges_route_whole_accesses() {
        assert_eq!(
            MmioRange::new(0x1000, 0),
            Err(BusError::EmptyMmioRange { base: 0x1000 })
        );
        assert!(matches!(
            MmioRange::new(u64::MAX, 2),
            Err(BusError::MmioRangeOverflow { .. })
        ));
        let top = MmioRange::new(u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(top.last(), u64::MAX);
        assert!(top.contains_access(u64::MAX - 7, 8));
        assert!(!top.contains_access(u64::MAX - 6, 8), "runs past the end");
        assert!(!top.contains_access(u64::MAX - 7, 0));

        let mut bus: MmioBus<&str> = MmioBus::new();
        bus.insert(MmioRange::new(0xfec0_0000, 0x1000).unwrap(), "ioapic")
            .unwrap();
        bus.insert(MmioRange::new(0xfee0_0000, 0x1000).unwrap(), "lapic")
            .unwrap();
        assert!(matches!(
            bus.insert(MmioRange::new(0xfec0_0ff0, 0x20).unwrap(), "x"),
            Err(BusError::MmioOverlap { .. })
        ));
        let (r, t) = bus.target_mut(0xfee0_0020, 4).unwrap();
        assert_eq!((r.base(), *t), (0xfee0_0000, "lapic"));
        assert!(
            bus.target_mut(0xfec0_0ffe, 4).is_none(),
            "straddles the end"
        );
        assert!(bus.target_mut(0xfeb0_0000, 4).is_none());
        assert_eq!(bus.ranges().count(), 2);
        assert_eq!(bus.remove(0xfec0_0000), Some("ioapic"));
        assert!(bus.target_mut(0xfec0_0000, 4).is_none());
    }
}
