//! Segment registers with their hidden (descriptor-cache) parts, and descriptor tables.

use serde::{Deserialize, Serialize};

/// Segment attributes in the AMD VMCB/VMSA compressed format: type in bits 3:0, S 4, DPL 6:5,
/// P 7, AVL 8, L 9, D/B 10, G 11. This is descriptor bits 40..47 and 52..55 squeezed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SegmentAttributes(pub u16);

impl SegmentAttributes {
    pub const fn seg_type(self) -> u8 {
        (self.0 & 0xf) as u8
    }
    /// S: code/data (true) or system (false) descriptor.
    pub const fn s(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    pub const fn dpl(self) -> u8 {
        ((self.0 >> 5) & 3) as u8
    }
    pub const fn present(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    pub const fn avl(self) -> bool {
        self.0 & (1 << 8) != 0
    }
    /// L: 64-bit code segment.
    pub const fn long(self) -> bool {
        self.0 & (1 << 9) != 0
    }
    /// D/B: default operand size 32 (code) or big (stack).
    pub const fn db(self) -> bool {
        self.0 & (1 << 10) != 0
    }
    pub const fn granularity(self) -> bool {
        self.0 & (1 << 11) != 0
    }
    /// A code segment (S=1, type bit 3).
    pub const fn is_code(self) -> bool {
        self.s() && self.0 & 0x8 != 0
    }

    /// Build from the raw 8-byte descriptor as stored in a GDT/LDT.
    pub const fn from_descriptor(desc: u64) -> Self {
        let lo = ((desc >> 40) & 0xff) as u16;
        let hi = ((desc >> 52) & 0xf) as u16;
        SegmentAttributes(lo | (hi << 8))
    }

    /// Compose from fields.
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        seg_type: u8,
        s: bool,
        dpl: u8,
        present: bool,
        long: bool,
        db: bool,
        g: bool,
    ) -> Self {
        SegmentAttributes(
            (seg_type as u16 & 0xf)
                | (s as u16) << 4
                | ((dpl as u16) & 3) << 5
                | (present as u16) << 7
                | (long as u16) << 9
                | (db as u16) << 10
                | (g as u16) << 11,
        )
    }
}

/// A segment register: the visible selector and the hidden base/limit/attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Byte-granular limit (already scaled if G was set in the descriptor).
    pub limit: u32,
    pub attrib: SegmentAttributes,
}

impl Segment {
    /// Decode a descriptor (the low 8 bytes; for 16-byte system descriptors in long mode pass
    /// the high quadword as `high` to get the upper 32 bits of the base).
    pub fn from_descriptor(selector: u16, desc: u64, high: Option<u64>) -> Self {
        let attrib = SegmentAttributes::from_descriptor(desc);
        let mut base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
        if let Some(h) = high {
            base |= (h & 0xffff_ffff) << 32;
        }
        let raw_limit = ((desc & 0xffff) | (((desc >> 48) & 0xf) << 16)) as u32;
        let limit = if attrib.granularity() {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        };
        Segment {
            selector,
            base,
            limit,
            attrib,
        }
    }

    /// Requested privilege level of the selector.
    pub const fn rpl(&self) -> u8 {
        (self.selector & 3) as u8
    }
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_long_mode_code_descriptor_decodes() {
        // 0x00af9b000000ffff: the usual 64-bit kernel code descriptor.
        let s = Segment::from_descriptor(0x08, 0x00af_9b00_0000_ffff, None);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert!(s.attrib.long());
        assert!(s.attrib.is_code());
        assert!(s.attrib.present());
        assert_eq!(s.attrib.dpl(), 0);
        assert_eq!(s.attrib.seg_type(), 0xb);
        assert_eq!(s.attrib.0, 0xa9b);
    }

    #[test]
    fn system_descriptor_high_base() {
        // A 64-bit TSS at 0x1234_5678_9abc_def0, limit 0x67.
        let lo = 0x67u64 | (0xdef0u64 << 16) | (0xbcu64 << 32) | (0x89u64 << 40) | (0x9au64 << 56);
        let s = Segment::from_descriptor(0x28, lo, Some(0x1234_5678));
        assert_eq!(s.base, 0x1234_5678_9abc_def0);
        assert_eq!(s.limit, 0x67);
        assert_eq!(s.attrib.seg_type(), 9);
        assert!(!s.attrib.s());
    }

    #[test]
    fn compose_matches_fields() {
        let a = SegmentAttributes::new(0x3, true, 3, true, false, true, true);
        assert_eq!(a.seg_type(), 3);
        assert!(a.s() && a.present() && a.db() && a.granularity() && !a.long());
        assert_eq!(a.dpl(), 3);
    }
}
