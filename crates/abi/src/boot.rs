//! The esvm boot protocol: the boot-info block, the loader's GDT and selectors, and the I/O
//! ports of the esvm guests. The addresses of the boot structures are in [`crate::layout`].
//!
//! This is the contract between the loader (host side, crate `esvm-loader`) and the guest
//! runtime (`guests/rt`). See `docs/boot-protocol.md` for the prose version.

/// `BootInfo::magic`: the ASCII bytes "ESVMBOOT" read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"ESVMBOOT");
/// `BootInfo::version` written by this loader / understood by this runtime.
pub const BOOT_INFO_VERSION: u32 = 1;
/// Size in bytes of the encoded boot-info block (`BootInfo::size`).
pub const BOOT_INFO_SIZE: usize = 128;

/// `BootInfo::flags` bit 0: the guest runs with protected (encrypted) register state, the
/// SEV-ES model. Port I/O then needs the GHCB protocol; the plain runtime does not do that.
pub const FLAG_PROTECTED_STATE: u32 = 1 << 0;

/// The loader's GDT at [`crate::layout::GDT_ADDR`]: null, kernel code 0x08, kernel data
/// 0x10, user data 0x18, user code 0x20 (the order SYSCALL/SYSRET need with
/// `STAR[63:48] = 0x10`). The guest runtime's own GDT starts with the same descriptors.
pub const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00AF_9B00_0000_FFFF, // 0x08 kernel code: P, DPL 0, code exec/read accessed, L, G
    0x00CF_9300_0000_FFFF, // 0x10 kernel data: P, DPL 0, data r/w accessed, D/B, G
    0x00CF_F300_0000_FFFF, // 0x18 user data: P, DPL 3
    0x00AF_FB00_0000_FFFF, // 0x20 user code: P, DPL 3, L
];
/// Code selector at entry (64-bit, DPL 0).
pub const KERNEL_CS: u16 = 0x08;
/// Data/stack selector at entry (DPL 0).
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (DPL 3), with RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User 64-bit code selector (DPL 3), with RPL 3.
pub const USER_CS: u16 = 0x20 | 3;

/// Debug-exit port: writing v ends the VM with exit status v & 0xff.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// Benchmark marker port: `cpubench` writes a 32-bit marker before and after its loop.
pub const BENCH_MARKER_PORT: u16 = 0xF5;
/// Marker written to [`BENCH_MARKER_PORT`] right before the timed loop.
pub const BENCH_MARKER_START: u32 = 0xE5B0_0001;
/// Marker written to [`BENCH_MARKER_PORT`] right after the timed loop.
pub const BENCH_MARKER_END: u32 = 0xE5B0_0002;
/// COM1 base port (16550 UART, polled).
pub const SERIAL_PORT: u16 = 0x3F8;

/// The boot-info block the loader writes at [`crate::layout::BOOT_INFO_ADDR`].
///
/// All fields are little-endian; addresses are guest-physical (= guest-virtual, the
/// memory is identity-mapped). The encoded block is exactly [`BOOT_INFO_SIZE`] bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Size of this structure in bytes ([`BOOT_INFO_SIZE`]).
    pub size: u32,
    /// Bytes of RAM contiguous from physical address 0.
    pub mem_size: u64,
    /// Number of vCPUs of the VM.
    pub vcpus: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Physical address of the argument string (UTF-8, space-separated `key=value` words).
    pub args_addr: u64,
    /// Length of the argument string in bytes (without the NUL terminator).
    pub args_len: u64,
    /// Lowest physical address of the loaded image.
    pub image_start: u64,
    /// End (exclusive) of the loaded image, including zero-filled memory.
    pub image_end: u64,
    /// First free physical address after the image, 4 KiB aligned; the guest may use
    /// `[free_start, mem_size)` freely.
    pub free_start: u64,
    /// Reserved, zero.
    pub reserved: [u64; 7],
}

impl BootInfo {
    /// A boot-info block with magic, version and size filled in and everything else zero.
    pub const fn new() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: BOOT_INFO_SIZE as u32,
            mem_size: 0,
            vcpus: 0,
            flags: 0,
            args_addr: 0,
            args_len: 0,
            image_start: 0,
            image_end: 0,
            free_start: 0,
            reserved: [0; 7],
        }
    }

    /// Whether magic, version and size are the ones this file defines.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.version == BOOT_INFO_VERSION
            && self.size as usize == BOOT_INFO_SIZE
    }

    /// Encodes the block in its little-endian in-memory form.
    pub fn to_bytes(&self) -> [u8; BOOT_INFO_SIZE] {
        let mut out = [0u8; BOOT_INFO_SIZE];
        let mut w = Cursor {
            buf: &mut out,
            pos: 0,
        };
        w.put(&self.magic.to_le_bytes());
        w.put(&self.version.to_le_bytes());
        w.put(&self.size.to_le_bytes());
        w.put(&self.mem_size.to_le_bytes());
        w.put(&self.vcpus.to_le_bytes());
        w.put(&self.flags.to_le_bytes());
        w.put(&self.args_addr.to_le_bytes());
        w.put(&self.args_len.to_le_bytes());
        w.put(&self.image_start.to_le_bytes());
        w.put(&self.image_end.to_le_bytes());
        w.put(&self.free_start.to_le_bytes());
        for r in &self.reserved {
            w.put(&r.to_le_bytes());
        }
        out
    }

    /// Decodes a block from its little-endian form. Returns `None` if `bytes` is shorter
    /// than [`BOOT_INFO_SIZE`]; does not check magic or version (see [`Self::is_valid`]).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < BOOT_INFO_SIZE {
            return None;
        }
        let mut pos = 0usize;
        let mut u64_at = || {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[pos..pos + 8]);
            pos += 8;
            u64::from_le_bytes(b)
        };
        let magic = u64_at();
        let version_size = u64_at();
        let mem_size = u64_at();
        let vcpus_flags = u64_at();
        let args_addr = u64_at();
        let args_len = u64_at();
        let image_start = u64_at();
        let image_end = u64_at();
        let free_start = u64_at();
        let mut reserved = [0u64; 7];
        for r in reserved.iter_mut() {
            *r = u64_at();
        }
        Some(BootInfo {
            magic,
            version: version_size as u32,
            size: (version_size >> 32) as u32,
            mem_size,
            vcpus: vcpus_flags as u32,
            flags: (vcpus_flags >> 32) as u32,
            args_addr,
            args_len,
            image_start,
            image_end,
            free_start,
            reserved,
        })
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        Self::new()
    }
}

struct Cursor<'a> {
    buf: &'a mut [u8; BOOT_INFO_SIZE],
    pos: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

// The in-memory layout the guest reads through a pointer must match `to_bytes`.
const _: () = assert!(core::mem::size_of::<BootInfo>() == BOOT_INFO_SIZE);
const _: () = assert!(core::mem::align_of::<BootInfo>() == 8);
// The block and the GDT each fit the page the memory map gives them.
const _: () = assert!(BOOT_INFO_SIZE as u64 <= crate::layout::PAGE_SIZE);
const _: () = assert!(GDT_ENTRIES.len() * 8 <= crate::layout::PAGE_SIZE as usize);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layout_offsets_are_the_documented_ones() {
        assert_eq!(offset_of!(BootInfo, magic), 0);
        assert_eq!(offset_of!(BootInfo, version), 8);
        assert_eq!(offset_of!(BootInfo, size), 12);
        assert_eq!(offset_of!(BootInfo, mem_size), 16);
        assert_eq!(offset_of!(BootInfo, vcpus), 24);
        assert_eq!(offset_of!(BootInfo, flags), 28);
        assert_eq!(offset_of!(BootInfo, args_addr), 32);
        assert_eq!(offset_of!(BootInfo, args_len), 40);
        assert_eq!(offset_of!(BootInfo, image_start), 48);
        assert_eq!(offset_of!(BootInfo, image_end), 56);
        assert_eq!(offset_of!(BootInfo, free_start), 64);
        assert_eq!(offset_of!(BootInfo, reserved), 72);
        assert_eq!(core::mem::size_of::<BootInfo>(), BOOT_INFO_SIZE);
    }

    #[test]
    fn encoding_matches_in_memory_representation() {
        let bi = BootInfo {
            mem_size: 0x1234_5678_9abc,
            vcpus: 3,
            flags: FLAG_PROTECTED_STATE,
            args_addr: crate::layout::ARGS_ADDR,
            args_len: 17,
            image_start: 0x20_0000,
            image_end: 0x20_5123,
            free_start: 0x20_6000,
            reserved: [1, 2, 3, 4, 5, 6, 7],
            ..BootInfo::new()
        };
        let bytes = bi.to_bytes();
        // The guest reads the block through a pointer: the native representation on x86-64
        // (little endian, repr(C)) must equal the encoding.
        let mut native = [0u8; BOOT_INFO_SIZE];
        let words = [
            bi.magic,
            u64::from(bi.version) | (u64::from(bi.size) << 32),
            bi.mem_size,
            u64::from(bi.vcpus) | (u64::from(bi.flags) << 32),
            bi.args_addr,
            bi.args_len,
            bi.image_start,
            bi.image_end,
            bi.free_start,
        ];
        for (i, w) in words.iter().chain(bi.reserved.iter()).enumerate() {
            native[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(bytes, native);
        assert_eq!(&bytes[..8], b"ESVMBOOT");
        assert_eq!(BootInfo::from_bytes(&bytes), Some(bi));
        assert!(bi.is_valid());
    }

    #[test]
    fn decoding_rejects_short_input_and_validity_checks_fields() {
        assert_eq!(BootInfo::from_bytes(&[0u8; BOOT_INFO_SIZE - 1]), None);
        let zero = BootInfo::from_bytes(&[0u8; BOOT_INFO_SIZE]).unwrap();
        assert!(!zero.is_valid());
        let mut bi = BootInfo::new();
        assert!(bi.is_valid());
        bi.version = 2;
        assert!(!bi.is_valid());
    }

    #[test]
    fn selectors_index_the_gdt() {
        let dpl = |d: u64| (d >> 45) & 3;
        let code64 = |d: u64| (d >> 43) & 1 == 1 && (d >> 53) & 1 == 1;
        assert!(code64(GDT_ENTRIES[usize::from(KERNEL_CS >> 3)]));
        assert!(code64(GDT_ENTRIES[usize::from(USER_CS >> 3)]));
        assert!(!code64(GDT_ENTRIES[usize::from(KERNEL_DS >> 3)]));
        assert!(!code64(GDT_ENTRIES[usize::from(USER_DS >> 3)]));
        assert_eq!(dpl(GDT_ENTRIES[usize::from(KERNEL_CS >> 3)]), 0);
        assert_eq!(
            dpl(GDT_ENTRIES[usize::from(USER_CS >> 3)]),
            u64::from(USER_CS & 3)
        );
        assert_eq!(
            dpl(GDT_ENTRIES[usize::from(USER_DS >> 3)]),
            u64::from(USER_DS & 3)
        );
        // SYSRET with STAR[63:48] = KERNEL_DS: SS = +8 (user data), CS = +16 (user code).
        assert_eq!(KERNEL_DS + 8, USER_DS & !3);
        assert_eq!(KERNEL_DS + 16, USER_CS & !3);
    }
}
