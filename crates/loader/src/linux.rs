//! The Linux x86 64-bit boot protocol (Documentation/x86/boot.rst): a bzImage or an ELF
//! vmlinux is put into guest memory with rust-vmm's `linux-loader`, beside a zero page
//! (`struct boot_params`) holding the setup header, the command line, the initrd and an e820
//! map; the boot vCPU starts at the 64-bit entry in long mode with an identity map, flat
//! `__BOOT_CS`/`__BOOT_DS` segments, interrupts off and RSI pointing at the zero page.
//!
//! Everything is checked before the first byte is written (a kernel that is not one, a
//! protocol too old for the 64-bit entry, an initrd or command line that does not fit, too
//! little memory for the kernel's decompression): a failed load leaves guest memory untouched.

use std::io::Cursor;

use esvm_arch::bits::{cr0, cr4, efer, rflags};
use esvm_arch::msr::APIC_BASE_DEFAULT_BSP;
use esvm_arch::{DescriptorTable, Gpr, Regs, Segment, SegmentAttributes, SpecialRegs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::{build_page_tables_at, identity_map_size, ram_below_first_hole};

/// Where the pieces of a Linux boot go: the Linux slots of the one memory map
/// (`esvm_arch::layout`), shared with the esvm boot convention where both need the same thing.
pub mod layout {
    pub use esvm_arch::layout::{
        ACPI_ADDR, CMDLINE_ADDR, GDT_ADDR, HIGH_MEMORY_ADDR, LEGACY_HOLE_ADDR, LOW_RAM_END,
        PAGE_TABLES_ADDR, PAGE_TABLES_END, ZERO_PAGE_ADDR,
    };
    /// Longest command line esvm places (its slot, NUL included; the kernel's own limit,
    /// `cmdline_size`, applies too).
    pub const CMDLINE_MAX: usize = esvm_arch::layout::CMDLINE_SIZE as usize - 1;
    /// The legacy BIOS area, reported reserved (option ROMs and the ACPI tables below it).
    pub const BIOS_START: u64 = 0xf_0000;
    /// The first MiB, the firmware's on a PC (the real-mode IVT and BIOS data area, low
    /// RAM, the EBDA, the VGA and option-ROM hole, the BIOS area). The kernel reads parts of
    /// it before it writes them — the BIOS data area's EBDA pointer and base-memory size,
    /// the iBFT scan of 0x80000-0xfffff, the DMI/SMBIOS scan, option-ROM probing — so the
    /// load zeroes all of it (then places its own pieces there) and an SEV-ES launch
    /// encrypts and measures it whole. Otherwise those reads return, through the kernel's
    /// encrypted mappings, the decryption of whatever host memory held under that launch's
    /// key: different on every launch, and so were the kernel's instruction counts.
    pub const FIRMWARE_AREA: (u64, u64) = (0, HIGH_MEMORY_ADDR);
}

/// `__BOOT_CS` / `__BOOT_DS` of the 64-bit boot protocol.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const GDT: [u64; 4] = [0, 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];

/// Setup header magic "HdrS".
const HDRS: u32 = 0x5372_6448;
/// The oldest protocol with a 64-bit entry point and `xloadflags` (2.12).
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit 0: the kernel has the legacy 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags` bit 0: protected-mode code loaded at 0x100000; bit 7: heap_end_ptr valid.
const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
/// `type_of_loader`: "undefined" boot loader id (boot.rst: 0xFF).
const LOADER_UNDEFINED: u8 = 0xff;
/// Physical address a relocatable 64-bit kernel decompresses itself to
/// (CONFIG_PHYSICAL_START of distribution kernels; its `pref_address`).
const DEFAULT_PREF_ADDRESS: u64 = 0x100_0000;
/// RAM a booting kernel needs beyond its image and initrd (page tables, memblock, the
/// first allocations): below this Linux 6.1 panics early.
pub const MIN_KERNEL_WORKING_SET: u64 = 32 << 20;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// ACPI tables (reclaimable). An SEV guest's Linux maps this type encrypted, as the loader
/// wrote it; a reserved region it would map shared.
pub const E820_ACPI: u32 = 3;

/// Why a kernel could not be loaded.
#[derive(Debug, Error)]
pub enum LinuxLoadError {
    #[error("{path}: not a Linux kernel: neither a bzImage (no \"HdrS\" setup header at 0x202) nor an ELF64 vmlinux")]
    NotAKernel { path: String },
    #[error("{path}: boot protocol {major}.{minor:02} is too old: the 64-bit entry needs 2.12 or newer (Linux 3.8+)")]
    ProtocolTooOld {
        path: String,
        major: u16,
        minor: u16,
    },
    #[error("{path}: the kernel has no 64-bit entry point (xloadflags bit 0 clear): it is a 32-bit kernel; esvm boots x86-64 kernels only")]
    No64BitEntry { path: String },
    #[error("{path}: the bzImage is truncated or damaged ({reason})")]
    Damaged { path: String, reason: String },
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte at offset {offset}")]
    CmdlineContainsNul { offset: usize },
    #[error("guest memory is too small for this kernel: it has {have_mib} MiB, the kernel needs at least {need_mib} MiB ({detail}); run with --mem {need_mib}M or more")]
    MemoryTooSmall {
        have_mib: u64,
        need_mib: u64,
        detail: String,
    },
    #[error("the initrd ({size} bytes) does not fit: it must lie page-aligned below {limit:#x} (the kernel's initrd_addr_max or the end of RAM) and above the kernel's image at {kernel_end:#x}; give the VM more memory or use a smaller initrd")]
    InitrdDoesNotFit {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("loading the kernel image failed: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    #[error("writing guest memory at {addr:#x} failed: {source}")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What kind of image was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Vmlinux,
}

/// A loaded kernel: the boot vCPU's state and what went where.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    pub regs: Regs,
    pub sregs: SpecialRegs,
    pub format: KernelFormat,
    /// Boot protocol version of a bzImage (0 for a vmlinux).
    pub protocol: u16,
    /// Guest-physical range the kernel image occupies.
    pub kernel: (u64, u64),
    /// Guest-physical range of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// The e820 map handed to the kernel: (address, size, type).
    pub e820: Vec<(u64, u64, u32)>,
    /// Guest-physical range of the boot page tables.
    pub tables: (u64, u64),
    /// Guest-physical range of the command line (NUL included).
    pub cmdline: (u64, u64),
    /// Guest-physical range of the ACPI tables, if any were placed.
    pub acpi: Option<(u64, u64)>,
    /// Guest-physical range of the SEV-ES AP start stub and its jump table
    /// ([`crate::ap_stub`]), if placed.
    pub ap_stub: Option<(u64, u64)>,
}

impl LinuxBoot {
    /// Every page range the load wrote, page-aligned and merged, in address order: what an
    /// SEV-ES launch encrypts and measures (LAUNCH_UPDATE_DATA) — the GDT, the zero page,
    /// the command line, the page tables, the kernel, the initrd and the firmware area
    /// ([`layout::FIRMWARE_AREA`], zeroed, the ACPI tables inside it).
    pub fn written_pages(&self) -> Vec<(u64, u64)> {
        let page = |a: u64| a & !0xfff;
        let page_end = |a: u64| (a + 0xfff) & !0xfff;
        let mut ranges = vec![
            layout::FIRMWARE_AREA,
            (layout::GDT_ADDR, layout::GDT_ADDR + 0x1000),
            (layout::ZERO_PAGE_ADDR, layout::ZERO_PAGE_ADDR + 0x1000),
            self.cmdline,
            self.tables,
            self.kernel,
        ];
        ranges.extend(self.initrd);
        ranges.extend(self.acpi);
        ranges.extend(self.ap_stub);
        let mut ranges: Vec<(u64, u64)> = ranges
            .into_iter()
            .map(|(s, e)| (page(s), page_end(e)))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged.into_iter().map(|(s, e)| (s, e - s)).collect()
    }
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct LinuxImage<'a> {
    /// Shown in error messages (the file's path).
    pub name: &'a str,
    /// The bzImage or vmlinux bytes.
    pub kernel: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a str,
}

fn is_elf64(b: &[u8]) -> bool {
    b.len() >= 64 && b[..4] == [0x7f, b'E', b'L', b'F'] && b[4] == 2
}

/// The setup header of a bzImage, if `b` is one.
fn bzimage_header(b: &[u8]) -> Option<setup_header> {
    let start = 0x1f1;
    let len = std::mem::size_of::<setup_header>();
    let bytes = b.get(start..start + len)?;
    let mut h = setup_header::default();
    h.as_mut_slice().copy_from_slice(bytes);
    (h.header == HDRS).then_some(h)
}

/// The e820 map for RAM `[0, ram_end)`: conventional memory up to the EBDA, the EBDA and
/// the BIOS area reserved, RAM from 1 MiB on.
pub fn e820_map(ram_end: u64) -> Vec<(u64, u64, u32)> {
    use layout::*;
    vec![
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, LEGACY_HOLE_ADDR - LOW_RAM_END, E820_RESERVED),
        (BIOS_START, HIGH_MEMORY_ADDR - BIOS_START, E820_RESERVED),
        (HIGH_MEMORY_ADDR, ram_end - HIGH_MEMORY_ADDR, E820_RAM),
    ]
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// Load a Linux kernel (and initrd, command line) into `mem`, returning the boot vCPU's
/// state for the 64-bit entry.
pub fn load_linux<M: GuestMemoryBackend>(
    mem: &M,
    image: &LinuxImage<'_>,
) -> Result<LinuxBoot, LinuxLoadError> {
    load_linux_with_c_bit(mem, image, None)
}

/// [`load_linux`] for an SEV-ES guest when `c_bit` is given: the boot page tables set the
/// encryption bit in every entry and in CR3 (all memory private), as the kernel's SEV-ES
/// entry expects. Check the position with [`crate::check_c_bit`] first.
pub fn load_linux_with_c_bit<M: GuestMemoryBackend>(
    mem: &M,
    image: &LinuxImage<'_>,
    c_bit: Option<u8>,
) -> Result<LinuxBoot, LinuxLoadError> {
    load_linux_with_acpi(mem, image, c_bit, None)
}

/// [`load_linux_with_c_bit`], and with `acpi_vcpus` = Some(n) also the ACPI tables of a
/// machine with n vCPUs ([`crate::acpi`]) at `layout::ACPI_ADDR`, their RSDP passed in
/// `boot_params.acpi_rsdp_addr`.
pub fn load_linux_with_acpi<M: GuestMemoryBackend>(
    mem: &M,
    image: &LinuxImage<'_>,
    c_bit: Option<u8>,
    acpi_vcpus: Option<u32>,
) -> Result<LinuxBoot, LinuxLoadError> {
    load_linux_with_ap_stub(mem, image, c_bit, acpi_vcpus, false)
}

/// [`load_linux_with_acpi`], and with `ap_stub` also the SEV-ES AP start stub and its (zero)
/// jump table ([`crate::ap_stub`], for an SEV-ES guest with several vCPUs), reported
/// reserved in the e820 map so that the kernel leaves them alone (and maps the jump table
/// with `ioremap_encrypted`, which refuses RAM).
pub fn load_linux_with_ap_stub<M: GuestMemoryBackend>(
    mem: &M,
    image: &LinuxImage<'_>,
    c_bit: Option<u8>,
    acpi_vcpus: Option<u32>,
    ap_stub: bool,
) -> Result<LinuxBoot, LinuxLoadError> {
    let ram_end = ram_below_first_hole(mem);
    let path = image.name.to_string();
    if let Some(offset) = image.cmdline.bytes().position(|b| b == 0) {
        return Err(LinuxLoadError::CmdlineContainsNul { offset });
    }
    let header = bzimage_header(image.kernel);
    let format = match (&header, is_elf64(image.kernel)) {
        (Some(_), _) => KernelFormat::BzImage,
        (None, true) => KernelFormat::Vmlinux,
        (None, false) => return Err(LinuxLoadError::NotAKernel { path }),
    };
    let initrd_len = image.initrd.map_or(0, |i| i.len() as u64);

    // ---- validate everything first
    let (protocol, cmdline_max, initrd_addr_max, pref, init_size) = match &header {
        Some(h) => {
            let version = h.version;
            if version < MIN_PROTOCOL {
                return Err(LinuxLoadError::ProtocolTooOld {
                    path,
                    major: version >> 8,
                    minor: version & 0xff,
                });
            }
            if h.xloadflags & XLF_KERNEL_64 == 0 || h.loadflags & LOADED_HIGH == 0 {
                return Err(LinuxLoadError::No64BitEntry { path });
            }
            let setup_sects = if h.setup_sects == 0 { 4 } else { h.setup_sects };
            let setup_len = (setup_sects as usize + 1) * 512;
            if image.kernel.len() <= setup_len {
                return Err(LinuxLoadError::Damaged {
                    path,
                    reason: format!(
                        "{} bytes, but its setup code alone takes {setup_len}",
                        image.kernel.len()
                    ),
                });
            }
            let pref = if h.pref_address != 0 {
                h.pref_address
            } else {
                DEFAULT_PREF_ADDRESS
            };
            (
                version,
                h.cmdline_size as usize,
                u64::from(h.initrd_addr_max),
                pref,
                u64::from(h.init_size),
            )
        }
        // A vmlinux: the limits of any 64-bit kernel of protocol 2.12+.
        None => (0, 2047, 0x7fff_ffff, DEFAULT_PREF_ADDRESS, 0),
    };
    let cmdline_max = cmdline_max.min(layout::CMDLINE_MAX);
    if image.cmdline.len() > cmdline_max {
        return Err(LinuxLoadError::CmdlineTooLong {
            len: image.cmdline.len(),
            max: cmdline_max,
        });
    }
    // The decompressed kernel runs at `pref` and needs `init_size` bytes there (bzImage);
    // a vmlinux needs its own segments. Then the initrd and a working set.
    let image_end = match format {
        KernelFormat::BzImage => pref + init_size,
        KernelFormat::Vmlinux => pref + image.kernel.len() as u64,
    };
    let need = image_end + initrd_len.next_multiple_of(4096) + MIN_KERNEL_WORKING_SET;
    if ram_end < need {
        return Err(LinuxLoadError::MemoryTooSmall {
            have_mib: mib(ram_end),
            need_mib: mib(need),
            detail: format!(
                "the kernel runs at {pref:#x} and needs {} MiB there, the initrd {} MiB, plus {} MiB to boot",
                mib(image_end - pref),
                mib(initrd_len),
                mib(MIN_KERNEL_WORKING_SET)
            ),
        });
    }
    let initrd_at = match image.initrd {
        None => None,
        Some(data) => {
            let limit = (initrd_addr_max + 1).min(ram_end);
            let len = data.len() as u64;
            let at = limit.checked_sub(len).map(|a| a & !0xfff);
            match at {
                Some(a) if a >= image_end => Some(a),
                _ => {
                    return Err(LinuxLoadError::InitrdDoesNotFit {
                        size: len,
                        limit,
                        kernel_end: image_end,
                    })
                }
            }
        }
    };

    // ---- write
    let write = |addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| LinuxLoadError::Memory { addr, source })
    };
    let mut cursor = Cursor::new(image.kernel);
    let (entry, kernel_range, mut hdr) = match format {
        KernelFormat::BzImage => {
            let r = linux_loader::loader::bzimage::BzImage::load(
                mem,
                None,
                &mut cursor,
                Some(GuestAddress(layout::HIGH_MEMORY_ADDR)),
            )?;
            let hdr = r.setup_header.unwrap_or_default();
            // The 64-bit entry of a bzImage: load address + 0x200 (boot.rst).
            (
                r.kernel_load.0 + 0x200,
                (r.kernel_load.0, r.kernel_end),
                hdr,
            )
        }
        KernelFormat::Vmlinux => {
            let r = linux_loader::loader::elf::Elf::load(
                mem,
                None,
                &mut cursor,
                Some(GuestAddress(layout::HIGH_MEMORY_ADDR)),
            )?;
            // A vmlinux carries no setup header: give the fields the kernel reads.
            let hdr = setup_header {
                boot_flag: 0xaa55,
                header: HDRS,
                version: MIN_PROTOCOL,
                kernel_alignment: 0x20_0000,
                ..Default::default()
            };
            (r.kernel_load.0, (r.kernel_load.0, r.kernel_end), hdr)
        }
    };
    // The first MiB starts zeroed; what the load places there is written over it.
    let (firmware_start, firmware_end) = layout::FIRMWARE_AREA;
    write(
        firmware_start,
        &vec![0; (firmware_end - firmware_start) as usize],
    )?;
    let mut cmdline = image.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write(layout::CMDLINE_ADDR, &cmdline)?;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags |= CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    hdr.cmdline_size = image.cmdline.len() as u32;
    let mut initrd = None;
    if let (Some(at), Some(data)) = (initrd_at, image.initrd) {
        write(at, data)?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = data.len() as u32;
        initrd = Some((at, at + data.len() as u64));
    }
    let mut acpi = None;
    if let Some(vcpus) = acpi_vcpus {
        let tables = crate::acpi::acpi_tables(layout::ACPI_ADDR, vcpus);
        write(layout::ACPI_ADDR, &tables)?;
        acpi = Some((layout::ACPI_ADDR, layout::ACPI_ADDR + tables.len() as u64));
    }
    let mut stub = None;
    if ap_stub {
        let (start, len) = crate::ap_stub::range();
        let mut bytes = crate::ap_stub::page();
        bytes.resize(len as usize, 0);
        write(start, &bytes)?;
        stub = Some((start, start + len));
    }
    let mut zero_page = boot_params {
        hdr,
        ..Default::default()
    };
    if acpi.is_some() {
        zero_page.acpi_rsdp_addr = layout::ACPI_ADDR;
    }
    let mut e820 = e820_map(ram_end);
    if let Some((start, end)) = acpi {
        // The tables' pages, between the EBDA's reserved entry and the BIOS area's.
        let at = e820.partition_point(|&(addr, _, _)| addr < start);
        e820.insert(at, (start, (end - start + 0xfff) & !0xfff, E820_ACPI));
    }
    if let Some((start, end)) = stub {
        // Cut out of the first RAM entry, which holds it.
        let (ram_start, ram_len, _) = e820[0];
        debug_assert!(ram_start <= start && end <= ram_start + ram_len);
        e820.splice(
            0..1,
            [
                (ram_start, start - ram_start, E820_RAM),
                (start, end - start, E820_RESERVED),
                (end, ram_start + ram_len - end, E820_RAM),
            ],
        );
    }
    for (slot, (addr, size, kind)) in zero_page.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    zero_page.e820_entries = e820.len() as u8;
    // Not an SNP guest: no confidential-computing blob (the kernel would parse one).
    zero_page.cc_blob_address = 0;
    write(layout::ZERO_PAGE_ADDR, zero_page.as_slice())?;
    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(layout::GDT_ADDR, &gdt)?;
    let map_size = identity_map_size(ram_end);
    let tables = build_page_tables_at(layout::PAGE_TABLES_ADDR, map_size, c_bit);
    debug_assert!(tables.len() as u64 <= layout::PAGE_TABLES_END - layout::PAGE_TABLES_ADDR);
    write(layout::PAGE_TABLES_ADDR, &tables)?;

    let mut regs = Regs {
        rip: entry,
        rflags: rflags::FIXED,
        ..Regs::default()
    };
    regs.set(Gpr::Rsi, layout::ZERO_PAGE_ADDR);
    let mut sregs = boot_sregs();
    sregs.cr3 |= crate::c_bit_mask(c_bit);
    let tables_len = tables.len() as u64;
    Ok(LinuxBoot {
        regs,
        sregs,
        tables: (
            layout::PAGE_TABLES_ADDR,
            layout::PAGE_TABLES_ADDR + tables_len,
        ),
        cmdline: (
            layout::CMDLINE_ADDR,
            layout::CMDLINE_ADDR + cmdline.len() as u64,
        ),
        format,
        protocol,
        kernel: kernel_range,
        initrd,
        e820,
        acpi,
        ap_stub: stub,
    })
}

/// Long mode, paging on the identity map, `__BOOT_CS`/`__BOOT_DS`, interrupts off.
pub fn boot_sregs() -> SpecialRegs {
    let code = Segment::from_descriptor(BOOT_CS, GDT[2], None);
    let data = Segment::from_descriptor(BOOT_DS, GDT[3], None);
    SpecialRegs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            selector: 0,
            base: 0,
            limit: 0xffff,
            attrib: SegmentAttributes::new(0xb, false, 0, true, false, false, false),
        },
        ldt: Segment {
            selector: 0,
            base: 0,
            limit: 0xffff,
            attrib: SegmentAttributes::new(0x2, false, 0, true, false, false, false),
        },
        gdt: DescriptorTable {
            base: layout::GDT_ADDR,
            limit: (GDT.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG,
        cr2: 0,
        cr3: layout::PAGE_TABLES_ADDR,
        cr4: cr4::PAE,
        cr8: 0,
        efer: efer::LME | efer::LMA,
        apic_base: APIC_BASE_DEFAULT_BSP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    /// A minimal bzImage: 4 setup sectors + boot sector, then `payload` as the kernel.
    fn bzimage(version: u16, xloadflags: u16, init_size: u32, payload: &[u8]) -> Vec<u8> {
        bzimage_with(version, xloadflags, init_size, payload, |_| {})
    }

    fn bzimage_with(
        version: u16,
        xloadflags: u16,
        init_size: u32,
        payload: &[u8],
        tweak: impl FnOnce(&mut setup_header),
    ) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512];
        let mut h = setup_header {
            setup_sects: 4,
            boot_flag: 0xaa55,
            header: HDRS,
            version,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size,
            ..Default::default()
        };
        h.syssize = (payload.len() / 16) as u32;
        tweak(&mut h);
        b[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(h.as_slice());
        b.extend_from_slice(payload);
        b
    }

    fn image<'a>(kernel: &'a [u8], initrd: Option<&'a [u8]>, cmdline: &'a str) -> LinuxImage<'a> {
        LinuxImage {
            name: "test-kernel",
            kernel,
            initrd,
            cmdline,
        }
    }

    #[test]
    fn acpi_tables_are_placed_reserved_as_acpi_and_passed_in_the_zero_page() {
        let m = mem(128 << 20);
        let k = bzimage(0x020f, 0x7f, 8 << 20, &[0x90; 8192]);
        let boot = load_linux_with_acpi(&m, &image(&k, None, ""), None, Some(1)).unwrap();
        let zp: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ zp.acpi_rsdp_addr }, layout::ACPI_ADDR);
        let mut sig = [0u8; 8];
        m.read_slice(&mut sig, GuestAddress(layout::ACPI_ADDR))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert_eq!(
            boot.acpi,
            Some((layout::ACPI_ADDR, layout::ACPI_ADDR + 0x1000))
        );
        assert!(boot
            .written_pages()
            .iter()
            .any(|&(s, l)| s <= layout::ACPI_ADDR && layout::ACPI_ADDR + 0x1000 <= s + l));
        // The e820 map: the tables' page as ACPI, between the EBDA and the BIOS area.
        assert_eq!({ zp.e820_entries }, 5);
        let e2 = zp.e820_table[2];
        assert_eq!(
            ({ e2.addr }, { e2.size }, { e2.r#type }),
            (layout::ACPI_ADDR, 0x1000, E820_ACPI)
        );
        // Without ACPI nothing of it.
        let m = mem(128 << 20);
        let boot = load_linux(&m, &image(&k, None, "")).unwrap();
        let zp: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ zp.acpi_rsdp_addr }, 0);
        assert_eq!(boot.acpi, None);
        assert_eq!({ zp.e820_entries }, 4);
    }

    /// The first MiB is zeroed by the load, whatever memory held, but for the pieces the
    /// load places there, and is among the written (SEV-ES: measured) pages, so the
    /// kernel's reads of it see the same under every launch key.
    #[test]
    fn the_firmware_area_is_zeroed_and_measured() {
        let m = mem(128 << 20);
        let (start, end) = layout::FIRMWARE_AREA;
        assert_eq!((start, end), (0, 0x10_0000));
        m.write_slice(&vec![0xa5; (end - start) as usize], GuestAddress(start))
            .unwrap();
        let k = bzimage(0x020f, 0x7f, 8 << 20, &[0x90; 8192]);
        let boot = load_linux_with_ap_stub(&m, &image(&k, None, "quiet"), Some(47), Some(2), true)
            .unwrap();
        let mut area = vec![0u8; (end - start) as usize];
        m.read_slice(&mut area, GuestAddress(start)).unwrap();
        // The pieces the load placed: everything else reads zero.
        let placed = [
            (layout::GDT_ADDR, layout::GDT_ADDR + 0x1000),
            (layout::ZERO_PAGE_ADDR, layout::ZERO_PAGE_ADDR + 0x1000),
            boot.cmdline,
            boot.tables,
            boot.acpi.unwrap(),
            boot.ap_stub.unwrap(),
        ];
        for (i, b) in area.iter().enumerate() {
            let gpa = start + i as u64;
            if !placed.iter().any(|&(s, e)| (s..e).contains(&gpa)) {
                assert_eq!(*b, 0, "byte at {gpa:#x}");
            }
        }
        // The BIOS data area (the EBDA pointer at 0x40e), the iBFT scan's 0x80000 and the
        // BIOS area read zero.
        for gpa in [0x40e, 0x413, 0x8_0000, 0xf_0000, 0xf_fff0] {
            assert_eq!(area[gpa], 0, "{gpa:#x}");
        }
        assert!(boot
            .written_pages()
            .iter()
            .any(|&(s, l)| s <= start && end <= s + l));
    }

    /// SEV-ES with several vCPUs: the AP stub and its zero jump table are written, measured
    /// (written pages) and reserved in e820, cut out of low RAM; without it low RAM is whole.
    #[test]
    fn the_ap_stub_is_written_measured_and_reserved_in_e820() {
        let m = mem(128 << 20);
        let k = bzimage(0x020f, 0x7f, 8 << 20, &[0x90; 8192]);
        let boot =
            load_linux_with_ap_stub(&m, &image(&k, None, ""), Some(47), Some(2), true).unwrap();
        let (start, len) = crate::ap_stub::range();
        assert_eq!(boot.ap_stub, Some((start, start + len)));
        let mut code = vec![0u8; crate::ap_stub::code().len()];
        m.read_slice(&mut code, GuestAddress(start)).unwrap();
        assert_eq!(code, crate::ap_stub::code());
        let table: u32 = m
            .read_obj(GuestAddress(esvm_arch::layout::AP_JUMP_TABLE_ADDR))
            .unwrap();
        assert_eq!(table, 0, "the jump table starts empty");
        assert!(boot
            .written_pages()
            .iter()
            .any(|&(s, l)| s <= start && start + len <= s + l));
        let zp: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        let e820: Vec<(u64, u64, u32)> = zp.e820_table[..zp.e820_entries as usize]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            e820[..3],
            [
                (0, start, E820_RAM),
                (start, len, E820_RESERVED),
                (start + len, layout::LOW_RAM_END - start - len, E820_RAM),
            ]
        );
        assert_eq!(e820, boot.e820);
        let m = mem(128 << 20);
        let boot = load_linux_with_acpi(&m, &image(&k, None, ""), Some(47), Some(2)).unwrap();
        assert_eq!(boot.ap_stub, None);
        assert_eq!(boot.e820[0], (0, layout::LOW_RAM_END, E820_RAM));
    }

    #[test]
    fn a_bzimage_gets_the_64_bit_entry_state_and_a_zero_page() {
        let m = mem(128 << 20);
        let k = bzimage(0x020f, 0x7f, 8 << 20, &[0x90; 8192]);
        let initrd = vec![0x5a; 10_000];
        let boot = load_linux(&m, &image(&k, Some(&initrd), "console=ttyS0")).unwrap();
        assert_eq!(boot.format, KernelFormat::BzImage);
        assert_eq!(boot.regs.rip, 0x10_0200);
        assert_eq!(boot.regs.get(Gpr::Rsi), layout::ZERO_PAGE_ADDR);
        assert_eq!(boot.regs.rflags & rflags::IF, 0);
        assert_eq!(boot.sregs.cs.selector, BOOT_CS);
        assert_eq!(boot.sregs.ds.selector, BOOT_DS);
        assert!(boot.sregs.cs.attrib.long());
        let zp: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        let hdr = zp.hdr;
        assert_eq!({ hdr.type_of_loader }, LOADER_UNDEFINED);
        assert_eq!({ hdr.cmd_line_ptr } as u64, layout::CMDLINE_ADDR);
        assert_eq!({ hdr.cmdline_size }, 13);
        let mut cl = [0u8; 14];
        m.read_slice(&mut cl, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        // The initrd: page-aligned, at the top of RAM, intact.
        let (start, end) = boot.initrd.unwrap();
        assert_eq!(start % 4096, 0);
        assert_eq!(end, start + 10_000);
        assert!(end <= 128 << 20);
        assert_eq!({ hdr.ramdisk_image } as u64, start);
        assert_eq!({ hdr.ramdisk_size }, 10_000);
        let mut back = vec![0u8; 10_000];
        m.read_slice(&mut back, GuestAddress(start)).unwrap();
        assert_eq!(back, initrd);
        // e820: low RAM below the EBDA (the real-mode trampoline lives there), RAM from 1 MiB.
        assert_eq!({ zp.e820_entries }, 4);
        let e0 = zp.e820_table[0];
        assert_eq!(
            ({ e0.addr }, { e0.size }, { e0.r#type }),
            (0, 0x9fc00, E820_RAM)
        );
        let e3 = zp.e820_table[3];
        assert_eq!(
            ({ e3.addr }, { e3.size }),
            (0x10_0000, (128 << 20) - 0x10_0000)
        );
        assert_eq!({ zp.cc_blob_address }, 0);
        // The kernel bytes and the identity map are in place.
        let mut k0 = [0u8; 4];
        m.read_slice(&mut k0, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(k0, [0x90; 4]);
        let pml4e: u64 = m.read_obj(GuestAddress(layout::PAGE_TABLES_ADDR)).unwrap();
        assert_eq!(pml4e & !0xfff, layout::PAGE_TABLES_ADDR + 4096);
    }

    #[test]
    fn errors_say_what_is_wrong_and_write_nothing() {
        let m = mem(128 << 20);
        let nothing = |m: &GuestMemoryMmap| {
            let mut b = vec![0u8; 0x30000];
            m.read_slice(&mut b, GuestAddress(0)).unwrap();
            b.iter().all(|&x| x == 0)
        };
        let e = load_linux(&m, &image(b"#!/bin/sh\necho hi\n", None, "")).unwrap_err();
        assert!(matches!(e, LinuxLoadError::NotAKernel { .. }), "{e}");
        assert!(e.to_string().contains("not a Linux kernel"));
        let old = bzimage(0x0206, 0, 8 << 20, &[0; 4096]);
        let e = load_linux(&m, &image(&old, None, "")).unwrap_err();
        assert!(e.to_string().contains("2.06 is too old"), "{e}");
        let k32 = bzimage(0x020f, 0, 8 << 20, &[0; 4096]);
        let e = load_linux(&m, &image(&k32, None, "")).unwrap_err();
        assert!(matches!(e, LinuxLoadError::No64BitEntry { .. }), "{e}");
        let k = bzimage(0x020f, 0x7f, 90 << 20, &[0; 4096]);
        let e = load_linux(&m, &image(&k, None, "")).unwrap_err();
        match &e {
            LinuxLoadError::MemoryTooSmall {
                have_mib, need_mib, ..
            } => {
                assert_eq!(*have_mib, 128);
                assert_eq!(*need_mib, 16 + 90 + 32);
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("--mem 138M"), "{e}");
        let k = bzimage(0x020f, 0x7f, 8 << 20, &[0; 4096]);
        let long = "x".repeat(3000);
        let e = load_linux(&m, &image(&k, None, &long)).unwrap_err();
        assert!(
            matches!(
                e,
                LinuxLoadError::CmdlineTooLong {
                    len: 3000,
                    max: 2047
                }
            ),
            "{e}"
        );
        let e = load_linux(&m, &image(&k, None, "a\0b")).unwrap_err();
        assert!(
            matches!(e, LinuxLoadError::CmdlineContainsNul { offset: 1 }),
            "{e}"
        );
        let huge = vec![0u8; 80 << 20];
        let e = load_linux(&m, &image(&k, Some(&huge), "")).unwrap_err();
        assert!(matches!(e, LinuxLoadError::MemoryTooSmall { .. }), "{e}");
        // The kernel takes initrds only below 32 MiB: 10 MiB do not fit above its image.
        let low = bzimage_with(0x020f, 0x7f, 8 << 20, &[0; 4096], |h| {
            h.initrd_addr_max = 0x1ff_ffff
        });
        let initrd = vec![0u8; 10 << 20];
        let e = load_linux(&m, &image(&low, Some(&initrd), "")).unwrap_err();
        assert!(matches!(e, LinuxLoadError::InitrdDoesNotFit { .. }), "{e}");
        assert!(e.to_string().contains("below 0x2000000"), "{e}");
        let truncated = &k[..5 * 512];
        let e = load_linux(&m, &image(truncated, None, "")).unwrap_err();
        assert!(matches!(e, LinuxLoadError::Damaged { .. }), "{e}");
        assert!(nothing(&m), "a failed load wrote guest memory");
    }
}
