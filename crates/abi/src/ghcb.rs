//! The GHCB page: the 4 KiB page an SEV-ES guest shares with the hypervisor (C-bit clear)
//! to describe one request per VMGEXIT.
//!
//! Its first part mirrors the VMSA save area for the few registers the protocol exchanges
//! ([`save_area`]); a 16-byte valid bitmap at 0x3F0 has one bit per quadword of that save
//! area (bit = offset / 8, [`valid_bit`]), and a field counts as supplied only while its bit
//! is set. A shared buffer at 0x800..0xFF0 carries bulk data (the "scratch" area of string
//! I/O and MMIO), and the page ends with the protocol version (u16 at 0xFFA) and the usage
//! code (u32 at 0xFFC; 0 = the standard layout). Offsets are those of the GHCB
//! specification (pub. 56421, table 3) and Linux's `struct ghcb`.

/// Size of the GHCB page.
pub const GHCB_PAGE_SIZE: usize = 4096;
/// Offset of the valid bitmap.
pub const VALID_BITMAP_OFFSET: usize = 0x3F0;
/// Size of the valid bitmap in bytes (128 bits: one per quadword of 0x000..0x400).
pub const VALID_BITMAP_SIZE: usize = 16;
/// Offset of the shared buffer.
pub const SHARED_BUFFER_OFFSET: usize = 0x800;
/// End (exclusive) of the shared buffer.
pub const SHARED_BUFFER_END: usize = 0xFF0;
/// Size of the shared buffer (2032 bytes): the most one request can carry in the page.
pub const SHARED_BUFFER_SIZE: usize = SHARED_BUFFER_END - SHARED_BUFFER_OFFSET;
/// Offset of the u16 protocol version.
pub const PROTOCOL_VERSION_OFFSET: usize = 0xFFA;
/// Offset of the u32 usage code.
pub const USAGE_OFFSET: usize = 0xFFC;
/// The standard GHCB usage code, the only one esvm uses.
pub const GHCB_USAGE_STANDARD: u32 = 0;

/// Byte offsets of the save-area fields the protocol exchanges (the same as in the VMSA;
/// each quadword except CPL, a byte).
pub mod save_area {
    /// CPL (u8).
    pub const CPL: usize = 0x0CB;
    pub const XSS: usize = 0x140;
    pub const DR7: usize = 0x160;
    pub const RAX: usize = 0x1F8;
    pub const RCX: usize = 0x308;
    pub const RDX: usize = 0x310;
    pub const RBX: usize = 0x318;
    pub const RSI: usize = 0x330;
    pub const SW_EXITCODE: usize = 0x390;
    pub const SW_EXITINFO1: usize = 0x398;
    pub const SW_EXITINFO2: usize = 0x3A0;
    pub const SW_SCRATCH: usize = 0x3A8;
    pub const XCR0: usize = 0x3E8;
}

/// Index of the valid-bitmap bit of the field at `offset`.
pub const fn valid_bit(offset: usize) -> usize {
    offset / 8
}

/// What the hypervisor puts in SW_EXITINFO1 (low 32 bits) after a GHCB request, and the
/// EVENTINJ format of the exception it may ask for in SW_EXITINFO2.
pub mod response {
    /// Handled; SW_EXITINFO2 may carry data.
    pub const SUCCESS: u64 = 0;
    /// Raise the exception described in SW_EXITINFO2 (EVENTINJ format).
    pub const ISSUE_EXCEPTION: u64 = 1;
    /// Malformed input; SW_EXITINFO2 holds the hypervisor's error code.
    pub const MALFORMED_INPUT: u64 = 2;
    /// EVENTINJ: valid bit.
    pub const EVENT_VALID: u64 = 1 << 31;
    /// EVENTINJ: type field (bits 10:8).
    pub const EVENT_TYPE_MASK: u64 = 7 << 8;
    /// EVENTINJ type 3: exception.
    pub const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
}

/// SW_EXITINFO1 of an IOIO request: the SVM IOIO intercept information (AMD APM vol. 2,
/// 15.10.2).
pub mod ioio {
    /// Direction: set for IN.
    pub const TYPE_IN: u64 = 1 << 0;
    /// String instruction (INS/OUTS).
    pub const STRING: u64 = 1 << 2;
    /// REP prefix.
    pub const REP: u64 = 1 << 3;
    /// Operand size, one-hot from bit 4: 8, 16 or 32 bits.
    pub const SIZE_SHIFT: u32 = 4;
    pub const SIZE_MASK: u64 = 7 << SIZE_SHIFT;
    pub const SIZE8: u64 = 1 << SIZE_SHIFT;
    pub const SIZE16: u64 = 2 << SIZE_SHIFT;
    pub const SIZE32: u64 = 4 << SIZE_SHIFT;
    /// Address size, one-hot from bit 7: 16, 32 or 64 bits.
    pub const ADDR_SHIFT: u32 = 7;
    pub const ADDR_MASK: u64 = 7 << ADDR_SHIFT;
    pub const ADDR16: u64 = 1 << ADDR_SHIFT;
    pub const ADDR32: u64 = 2 << ADDR_SHIFT;
    pub const ADDR64: u64 = 4 << ADDR_SHIFT;
    /// Port number, bits 31:16.
    pub const PORT_SHIFT: u32 = 16;

    /// SW_EXITINFO1 for a port access: `size` is 1, 2 or 4 bytes, `addr_bits` 16, 32 or 64
    /// (only meaningful for string I/O).
    pub const fn exit_info1(
        port: u16,
        size: u8,
        is_in: bool,
        string: bool,
        rep: bool,
        addr_bits: u8,
    ) -> u64 {
        let size_bit = match size {
            1 => SIZE8,
            2 => SIZE16,
            _ => SIZE32,
        };
        let addr_bit = match addr_bits {
            16 => ADDR16,
            32 => ADDR32,
            _ => ADDR64,
        };
        ((port as u64) << PORT_SHIFT)
            | addr_bit
            | size_bit
            | if rep { REP } else { 0 }
            | if string { STRING } else { 0 }
            | if is_in { TYPE_IN } else { 0 }
    }
}

// The AMD GHCB specification's offsets, checked where the build sees them.
const _: () = {
    use save_area as s;
    assert!(s::SW_EXITCODE == 0x390 && s::SW_EXITINFO1 == 0x398);
    assert!(s::SW_EXITINFO2 == 0x3A0 && s::SW_SCRATCH == 0x3A8);
    assert!(s::RAX == 0x1F8 && s::RBX == 0x318 && s::RCX == 0x308 && s::RDX == 0x310);
    assert!(s::CPL == 0x0CB && s::XCR0 == 0x3E8);
    assert!(VALID_BITMAP_OFFSET == 0x3F0 && SHARED_BUFFER_OFFSET == 0x800);
    assert!(SHARED_BUFFER_SIZE == 2032);
    assert!(PROTOCOL_VERSION_OFFSET == 0xFFA && USAGE_OFFSET == 0xFFC);
    // The bitmap covers the whole save area (0x000..0x400) and ends before the buffer.
    assert!(VALID_BITMAP_SIZE * 8 * 8 == 0x400);
    assert!(USAGE_OFFSET + 4 == GHCB_PAGE_SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// (offset, width) of every save-area field, in offset order.
    const FIELDS: [(usize, usize); 13] = [
        (save_area::CPL, 1),
        (save_area::XSS, 8),
        (save_area::DR7, 8),
        (save_area::RAX, 8),
        (save_area::RCX, 8),
        (save_area::RDX, 8),
        (save_area::RBX, 8),
        (save_area::RSI, 8),
        (save_area::SW_EXITCODE, 8),
        (save_area::SW_EXITINFO1, 8),
        (save_area::SW_EXITINFO2, 8),
        (save_area::SW_SCRATCH, 8),
        (save_area::XCR0, 8),
    ];

    #[test]
    fn offsets_are_the_ghcb_specification_values() {
        assert_eq!(save_area::SW_EXITCODE, 0x390);
        assert_eq!(save_area::SW_EXITINFO1, 0x398);
        assert_eq!(save_area::SW_EXITINFO2, 0x3A0);
        assert_eq!(save_area::SW_SCRATCH, 0x3A8);
        assert_eq!(VALID_BITMAP_OFFSET, 0x3F0);
        assert_eq!(SHARED_BUFFER_OFFSET, 0x800);
        assert_eq!(SHARED_BUFFER_SIZE, 2032);
        assert_eq!(PROTOCOL_VERSION_OFFSET, 0xFFA);
        assert_eq!(USAGE_OFFSET, 0xFFC);
        assert_eq!(save_area::RAX, 0x1F8);
        assert_eq!(save_area::RBX, 0x318);
        assert_eq!(save_area::RCX, 0x308);
        assert_eq!(save_area::RDX, 0x310);
        assert_eq!(save_area::CPL, 0x0CB);
        assert_eq!(save_area::XCR0, 0x3E8);
    }

    #[test]
    fn fields_are_aligned_disjoint_and_covered_by_the_bitmap() {
        for (i, &(off, width)) in FIELDS.iter().enumerate() {
            assert_eq!(off % width, 0, "{off:#x}");
            assert!(off + width <= VALID_BITMAP_OFFSET, "{off:#x}");
            assert!(valid_bit(off) < VALID_BITMAP_SIZE * 8);
            if let Some(&(next, _)) = FIELDS.get(i + 1) {
                assert!(off + width <= next, "{off:#x} overlaps {next:#x}");
            }
        }
        assert_eq!(valid_bit(save_area::SW_EXITCODE), 0x72);
        assert_eq!(valid_bit(save_area::CPL), 25);
        const { assert!(VALID_BITMAP_OFFSET + VALID_BITMAP_SIZE <= SHARED_BUFFER_OFFSET) };
        const { assert!(SHARED_BUFFER_END <= PROTOCOL_VERSION_OFFSET) };
    }

    #[test]
    fn ioio_fields_compose() {
        use ioio::*;
        assert_eq!(SIZE_MASK, SIZE8 | SIZE16 | SIZE32);
        assert_eq!(ADDR_MASK, ADDR16 | ADDR32 | ADDR64);
        assert_eq!(exit_info1(0x80, 1, true, false, false, 64), 0x0080_0211);
        assert_eq!(
            response::EVENT_TYPE_EXCEPTION & !response::EVENT_TYPE_MASK,
            0
        );
    }
}
