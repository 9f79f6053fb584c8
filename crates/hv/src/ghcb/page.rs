//! The GHCB page layout and a typed view over it.
//!
//! The GHCB is one 4 KiB page the guest shares with the hypervisor (C-bit clear). Its first
//! part mirrors the VMSA save area for the few registers the protocol exchanges; a 16-byte
//! valid bitmap at 0x3F0 has one bit per quadword of that save area (bit = offset / 8), and a
//! field counts as supplied only while its bit is set. A shared buffer at 0x800..0xFF0 can
//! carry bulk data (the "scratch" area), and the page ends with the protocol version (u16 at
//! 0xFFA) and the usage code (u32 at 0xFFC; 0 = the standard layout). The offsets are the
//! guest ABI's ([`esvm_abi::ghcb`]), re-exported here for the users of [`GhcbPage`].

use esvm_abi::ghcb::{save_area, valid_bit};
pub use esvm_abi::ghcb::{
    GHCB_PAGE_SIZE, GHCB_USAGE_STANDARD, PROTOCOL_VERSION_OFFSET, SHARED_BUFFER_END,
    SHARED_BUFFER_OFFSET, SHARED_BUFFER_SIZE, USAGE_OFFSET, VALID_BITMAP_OFFSET, VALID_BITMAP_SIZE,
};

/// The save-area fields the GHCB protocol exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GhcbField {
    Cpl,
    Xss,
    Dr7,
    Rax,
    Rcx,
    Rdx,
    Rbx,
    Rsi,
    SwExitCode,
    SwExitInfo1,
    SwExitInfo2,
    SwScratch,
    Xcr0,
}

impl GhcbField {
    /// Every field, in offset order.
    pub const ALL: [GhcbField; 13] = [
        GhcbField::Cpl,
        GhcbField::Xss,
        GhcbField::Dr7,
        GhcbField::Rax,
        GhcbField::Rcx,
        GhcbField::Rdx,
        GhcbField::Rbx,
        GhcbField::Rsi,
        GhcbField::SwExitCode,
        GhcbField::SwExitInfo1,
        GhcbField::SwExitInfo2,
        GhcbField::SwScratch,
        GhcbField::Xcr0,
    ];

    /// Byte offset of the field in the page (the same as in the VMSA).
    pub const fn offset(self) -> usize {
        match self {
            GhcbField::Cpl => save_area::CPL,
            GhcbField::Xss => save_area::XSS,
            GhcbField::Dr7 => save_area::DR7,
            GhcbField::Rax => save_area::RAX,
            GhcbField::Rcx => save_area::RCX,
            GhcbField::Rdx => save_area::RDX,
            GhcbField::Rbx => save_area::RBX,
            GhcbField::Rsi => save_area::RSI,
            GhcbField::SwExitCode => save_area::SW_EXITCODE,
            GhcbField::SwExitInfo1 => save_area::SW_EXITINFO1,
            GhcbField::SwExitInfo2 => save_area::SW_EXITINFO2,
            GhcbField::SwScratch => save_area::SW_SCRATCH,
            GhcbField::Xcr0 => save_area::XCR0,
        }
    }

    /// Width of the field in bytes.
    pub const fn width(self) -> usize {
        match self {
            GhcbField::Cpl => 1,
            _ => 8,
        }
    }

    /// Index of the field's bit in the valid bitmap.
    pub const fn valid_bit(self) -> usize {
        valid_bit(self.offset())
    }
}

/// A typed view over a GHCB page.
///
/// Getters named after a field ([`GhcbPage::rax`] ...) return `None` unless the field's valid
/// bit is set; setters write the value and set the bit. [`GhcbPage::raw`] reads a field
/// whatever its bit says (for diagnostics).
#[derive(Debug)]
pub struct GhcbPage<'a> {
    bytes: &'a mut [u8; GHCB_PAGE_SIZE],
}

macro_rules! field_accessors {
    ($($get:ident, $set:ident, $field:ident, $ty:ty;)*) => {
        $(
            #[doc = concat!("The `", stringify!($field), "` field if its valid bit is set.")]
            pub fn $get(&self) -> Option<$ty> {
                self.get(GhcbField::$field).map(|v| v as $ty)
            }
            #[doc = concat!("Write the `", stringify!($field), "` field and set its valid bit.")]
            pub fn $set(&mut self, value: $ty) {
                self.set(GhcbField::$field, u64::from(value));
            }
        )*
    };
}

impl<'a> GhcbPage<'a> {
    pub fn new(bytes: &'a mut [u8; GHCB_PAGE_SIZE]) -> Self {
        GhcbPage { bytes }
    }

    pub fn bytes(&self) -> &[u8; GHCB_PAGE_SIZE] {
        self.bytes
    }

    pub fn bytes_mut(&mut self) -> &mut [u8; GHCB_PAGE_SIZE] {
        self.bytes
    }

    /// Whether `field`'s valid bit is set.
    pub fn is_valid(&self, field: GhcbField) -> bool {
        let bit = field.valid_bit();
        self.bytes[VALID_BITMAP_OFFSET + bit / 8] & (1 << (bit % 8)) != 0
    }

    /// Set or clear `field`'s valid bit.
    pub fn set_valid(&mut self, field: GhcbField, valid: bool) {
        let bit = field.valid_bit();
        let byte = &mut self.bytes[VALID_BITMAP_OFFSET + bit / 8];
        if valid {
            *byte |= 1 << (bit % 8);
        } else {
            *byte &= !(1 << (bit % 8));
        }
    }

    /// The raw 16-byte valid bitmap.
    pub fn valid_bitmap(&self) -> [u8; VALID_BITMAP_SIZE] {
        let mut b = [0u8; VALID_BITMAP_SIZE];
        b.copy_from_slice(
            &self.bytes[VALID_BITMAP_OFFSET..VALID_BITMAP_OFFSET + VALID_BITMAP_SIZE],
        );
        b
    }

    /// Clear every valid bit.
    pub fn clear_valid_bitmap(&mut self) {
        self.bytes[VALID_BITMAP_OFFSET..VALID_BITMAP_OFFSET + VALID_BITMAP_SIZE].fill(0);
    }

    /// The field's value whatever its valid bit says.
    pub fn raw(&self, field: GhcbField) -> u64 {
        let off = field.offset();
        let mut b = [0u8; 8];
        b[..field.width()].copy_from_slice(&self.bytes[off..off + field.width()]);
        u64::from_le_bytes(b)
    }

    /// The field's value if its valid bit is set.
    pub fn get(&self, field: GhcbField) -> Option<u64> {
        self.is_valid(field).then(|| self.raw(field))
    }

    /// Write the field (truncated to its width) and set its valid bit.
    pub fn set(&mut self, field: GhcbField, value: u64) {
        let off = field.offset();
        let w = field.width();
        self.bytes[off..off + w].copy_from_slice(&value.to_le_bytes()[..w]);
        self.set_valid(field, true);
    }

    field_accessors! {
        cpl, set_cpl, Cpl, u8;
        xss, set_xss, Xss, u64;
        dr7, set_dr7, Dr7, u64;
        rax, set_rax, Rax, u64;
        rbx, set_rbx, Rbx, u64;
        rcx, set_rcx, Rcx, u64;
        rdx, set_rdx, Rdx, u64;
        rsi, set_rsi, Rsi, u64;
        xcr0, set_xcr0, Xcr0, u64;
        sw_exit_code, set_sw_exit_code, SwExitCode, u64;
        sw_exit_info1, set_sw_exit_info1, SwExitInfo1, u64;
        sw_exit_info2, set_sw_exit_info2, SwExitInfo2, u64;
        sw_scratch, set_sw_scratch, SwScratch, u64;
    }

    /// The protocol version the guest wrote (not covered by the valid bitmap).
    pub fn protocol_version(&self) -> u16 {
        u16::from_le_bytes([
            self.bytes[PROTOCOL_VERSION_OFFSET],
            self.bytes[PROTOCOL_VERSION_OFFSET + 1],
        ])
    }

    pub fn set_protocol_version(&mut self, version: u16) {
        self.bytes[PROTOCOL_VERSION_OFFSET..PROTOCOL_VERSION_OFFSET + 2]
            .copy_from_slice(&version.to_le_bytes());
    }

    /// The usage code (0 = standard GHCB).
    pub fn usage(&self) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[USAGE_OFFSET..USAGE_OFFSET + 4]);
        u32::from_le_bytes(b)
    }

    pub fn set_usage(&mut self, usage: u32) {
        self.bytes[USAGE_OFFSET..USAGE_OFFSET + 4].copy_from_slice(&usage.to_le_bytes());
    }

    /// The shared buffer (0x800..0xFF0).
    pub fn shared_buffer(&self) -> &[u8] {
        &self.bytes[SHARED_BUFFER_OFFSET..SHARED_BUFFER_END]
    }

    pub fn shared_buffer_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[SHARED_BUFFER_OFFSET..SHARED_BUFFER_END]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_valid_bits_follow_the_save_area() {
        assert_eq!(GhcbField::Cpl.valid_bit(), 25);
        assert_eq!(GhcbField::Rax.valid_bit(), 0x1F8 / 8);
        assert_eq!(GhcbField::SwExitCode.valid_bit(), 0x72);
        assert_eq!(GhcbField::Xcr0.valid_bit(), 0x7D);
        // Every field lies in the save area the bitmap covers and fields don't overlap.
        for (i, a) in GhcbField::ALL.iter().enumerate() {
            assert!(a.offset() + a.width() <= VALID_BITMAP_OFFSET);
            for b in &GhcbField::ALL[i + 1..] {
                assert!(a.offset() + a.width() <= b.offset(), "{a:?} overlaps {b:?}");
            }
        }
        assert_eq!(SHARED_BUFFER_SIZE, 2032);
    }

    #[test]
    fn fields_read_only_when_valid() {
        let mut bytes = [0u8; GHCB_PAGE_SIZE];
        bytes[0x1F8..0x200].copy_from_slice(&0x1234u64.to_le_bytes());
        let mut p = GhcbPage::new(&mut bytes);
        assert_eq!(p.rax(), None);
        assert_eq!(p.raw(GhcbField::Rax), 0x1234);
        p.set_valid(GhcbField::Rax, true);
        assert_eq!(p.rax(), Some(0x1234));
        p.set_cpl(3);
        assert_eq!(p.cpl(), Some(3));
        assert_eq!(p.bytes()[0xCB], 3);
        // bit 25 -> byte 3, bit 1 of the bitmap
        assert_eq!(p.bytes()[VALID_BITMAP_OFFSET + 3], 0b10);
        p.set_sw_exit_code(0x8000_0001);
        assert_eq!(p.sw_exit_code(), Some(0x8000_0001));
        p.clear_valid_bitmap();
        assert_eq!(p.sw_exit_code(), None);
        assert_eq!(p.cpl(), None);
        assert_eq!(p.valid_bitmap(), [0; 16]);
    }

    #[test]
    fn version_usage_and_shared_buffer() {
        let mut bytes = [0u8; GHCB_PAGE_SIZE];
        let mut p = GhcbPage::new(&mut bytes);
        p.set_protocol_version(2);
        p.set_usage(7);
        p.shared_buffer_mut()[0] = 0xAA;
        assert_eq!(p.protocol_version(), 2);
        assert_eq!(p.usage(), 7);
        assert_eq!(p.shared_buffer().len(), SHARED_BUFFER_SIZE);
        assert_eq!(bytes[0xFFA], 2);
        assert_eq!(bytes[0xFFC], 7);
        assert_eq!(bytes[0x800], 0xAA);
    }
}
