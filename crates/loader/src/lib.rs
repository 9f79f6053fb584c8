//! The esvm guest loader: puts an ELF64 guest into guest memory following the esvm boot
//! protocol (`docs/boot-protocol.md`) and returns the vCPU state to start it with.
//!
//! What [`load_elf`] writes:
//! - `[0, 2 MiB)` is zeroed, then: the GDT at 0x1000, the boot-info block at 0x2000, the
//!   argument string at 0x3000, identity-map page tables from 0x10000 (2 MiB pages, all
//!   entries P|R/W|U/S); the boot stack is 0x80000..0x100000.
//! - each PT_LOAD segment at its physical address, zero-filled beyond its file size.
//!
//! Everything is validated before the first byte is written: a failed load leaves guest
//! memory untouched.
//!
//! For SEV-ES guests, [`load_elf_with_c_bit`] sets the C-bit (the encryption bit, 47 in
//! esvm) in every page-table entry and in CR3, so all memory starts private
//! (`docs/sev-es-guest.md`).
//!
//! The addresses come from the memory map (`esvm_arch::layout`); the boot-info block, the
//! GDT and the selectors from the guest ABI (`esvm_abi::boot`), which the guest runtime
//! compiles too.

pub mod acpi;
pub mod ap_stub;
pub mod elf;
pub mod linux;

use elf::{ElfError, ElfImage};
use esvm_abi::boot::{KERNEL_CS, KERNEL_DS};
use esvm_arch::bits::{cr0, cr4, efer, rflags};
use esvm_arch::layout;
use esvm_arch::msr::APIC_BASE_DEFAULT_BSP;
use esvm_arch::{DescriptorTable, Gpr, Regs, Segment, SegmentAttributes, SpecialRegs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

/// Why a guest could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("ELF segment {index} [{start:#x}, {end:#x}) overlaps the loader's reserved low memory [0, {reserved_end:#x}); link guests at or above {reserved_end:#x}")]
    SegmentInReservedArea {
        index: usize,
        start: u64,
        end: u64,
        reserved_end: u64,
    },
    #[error("ELF segment {index} [{start:#x}, {end:#x}) lies outside guest memory, which the boot page tables can cover up to {max:#x}")]
    SegmentOutsideMemory {
        index: usize,
        start: u64,
        end: u64,
        max: u64,
    },
    #[error("guest memory too small: {have} bytes of RAM from address 0, but the guest needs at least {need} bytes (2 MiB reserved + image); give the VM more memory")]
    MemoryTooSmall { have: u64, need: u64 },
    #[error("guest memory too large: it ends at {end:#x}, the boot page tables identity-map at most {max:#x}; give the VM at most {max} bytes")]
    MemoryTooLarge { end: u64, max: u64 },
    #[error("guest argument string too long: {len} bytes, at most {max}")]
    ArgsTooLong { len: usize, max: usize },
    #[error("guest argument string contains a NUL byte at offset {offset}; arguments are space-separated key=value words")]
    ArgsContainNul { offset: usize },
    #[error("invalid vCPU count {0}: must be between 1 and 255")]
    InvalidVcpuCount(u32),
    #[error("invalid C-bit position {bit}: {reason}")]
    InvalidCBit { bit: u8, reason: &'static str },
    #[error("writing {len} bytes of guest memory at {addr:#x} failed: {source}")]
    Memory {
        addr: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// Options of [`load_elf_with`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions<'a> {
    /// Guest argument string (space-separated `key=value` words).
    pub args: &'a str,
    /// Number of vCPUs, reported in the boot-info block.
    pub vcpus: u32,
    /// `esvm_abi::boot::FLAG_*` bits for the boot-info block.
    pub flags: u32,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            args: "",
            vcpus: 1,
            flags: 0,
        }
    }
}

/// The state to start the boot vCPU with, plus what was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// RIP = entry, RSP = top of the boot stack, RDI = boot-info address, RFLAGS = 0x2.
    pub regs: Regs,
    /// 64-bit long mode, flat segments from the loader GDT, CR3 = the PML4.
    pub sregs: SpecialRegs,
    /// The boot-info block as written to guest memory.
    pub boot_info: BootInfo,
    /// Entry point.
    pub entry: u64,
}

pub use esvm_abi::boot::{BootInfo, GDT_ENTRIES};

/// Page-table entry bits used by the identity map.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US;

const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Bytes of RAM contiguous from physical address 0.
pub fn ram_below_first_hole<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let mut regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let mut end = 0u64;
    for (start, len) in regions {
        if start != end {
            break;
        }
        end = start.saturating_add(len);
    }
    end
}

/// Size of the address space the boot page tables identity-map for memory ending at
/// `mem_end`: at least 4 GiB, rounded up to whole GiB.
pub fn identity_map_size(mem_end: u64) -> u64 {
    mem_end
        .max(layout::MIN_IDENTITY_MAP)
        .div_ceil(GIB)
        .saturating_mul(GIB)
}

/// Builds the identity-map page tables (PML4, one PDPT, one PD per GiB) as the bytes to
/// place at [`layout::PAGE_TABLES_ADDR`].
pub fn build_page_tables(map_size: u64) -> Vec<u8> {
    build_page_tables_with_c_bit(map_size, None)
}

/// Like [`build_page_tables`], for an SEV-ES guest when `c_bit` is given: every entry at
/// every level has bit `c_bit` set (the encryption bit), so all memory is private. Check
/// the position with [`check_c_bit`] first.
pub fn build_page_tables_with_c_bit(map_size: u64, c_bit: Option<u8>) -> Vec<u8> {
    build_page_tables_at(layout::PAGE_TABLES_ADDR, map_size, c_bit)
}

/// The identity map of [`build_page_tables_with_c_bit`], linked to lie at guest-physical
/// `pml4` (the PML4, then the PDPT, then one PD per GiB).
pub fn build_page_tables_at(pml4: u64, map_size: u64, c_bit: Option<u8>) -> Vec<u8> {
    let c = c_bit_mask(c_bit);
    let pds = map_size.div_ceil(GIB);
    let pdpt = pml4 + PAGE;
    let pd0 = pdpt + PAGE;
    let mut entries = vec![0u64; (2 + pds as usize) * 512];
    entries[0] = pdpt | TABLE_FLAGS | c;
    for i in 0..pds {
        entries[512 + i as usize] = (pd0 + i * PAGE) | TABLE_FLAGS | c;
        for j in 0..512u64 {
            let addr = i * GIB + j * TWO_MIB;
            entries[1024 + (i * 512 + j) as usize] = addr | TABLE_FLAGS | PTE_PS | c;
        }
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The page-table bit of a C-bit position (0 for `None`).
pub fn c_bit_mask(c_bit: Option<u8>) -> u64 {
    match c_bit {
        Some(b) if b < 64 => 1u64 << b,
        _ => 0,
    }
}

/// Checks that `c_bit` can serve as the encryption bit of the boot page tables for an
/// identity map of `map_size` bytes: it must be a physical-address bit (at most 51) that
/// no mapped address uses (`1 << c_bit >= map_size`, so at least 32).
pub fn check_c_bit(c_bit: u8, map_size: u64) -> Result<(), LoadError> {
    if c_bit > 51 {
        return Err(LoadError::InvalidCBit {
            bit: c_bit,
            reason: "page-table entries hold physical-address bits only up to bit 51; use e.g. 47",
        });
    }
    if (1u64 << c_bit) < map_size.max(layout::MIN_IDENTITY_MAP) {
        return Err(LoadError::InvalidCBit {
            bit: c_bit,
            reason: "the bit is a physical-address bit of the identity-mapped memory; use a bit above the highest guest-physical address, e.g. 47",
        });
    }
    Ok(())
}

fn write<M: GuestMemoryBackend>(mem: &M, addr: u64, bytes: &[u8]) -> Result<(), LoadError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| LoadError::Memory {
            addr,
            len: bytes.len(),
            source,
        })
}

fn zero<M: GuestMemoryBackend>(mem: &M, addr: u64, len: u64) -> Result<(), LoadError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        write(mem, addr + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// The initial general-purpose registers of the protocol.
pub fn boot_regs(entry: u64) -> Regs {
    let mut regs = Regs {
        rip: entry,
        rflags: rflags::FIXED,
        ..Regs::default()
    };
    regs.set(Gpr::Rsp, layout::STACK_TOP);
    regs.set(Gpr::Rdi, layout::BOOT_INFO_ADDR);
    regs
}

/// The initial special registers of the protocol: long mode, paging with CR3 at the
/// loader's PML4, flat segments from the loader GDT, no IDT (limit 0), interrupts off.
pub fn boot_sregs() -> SpecialRegs {
    let code = Segment::from_descriptor(KERNEL_CS, GDT_ENTRIES[1], None);
    let data = Segment::from_descriptor(KERNEL_DS, GDT_ENTRIES[2], None);
    SpecialRegs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        // No TSS loaded: a busy 64-bit TSS at 0 (what CPUs require of TR), LDT unused.
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
            limit: (GDT_ENTRIES.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG,
        cr2: 0,
        cr3: layout::PAGE_TABLES_ADDR,
        cr4: cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT,
        cr8: 0,
        efer: efer::SCE | efer::LME | efer::LMA | efer::NXE,
        apic_base: APIC_BASE_DEFAULT_BSP,
    }
}

/// Loads `elf` into `mem` with argument string `args` for a VM of `vcpus` vCPUs.
/// See [`load_elf_with`].
pub fn load_elf<M: GuestMemoryBackend>(
    mem: &M,
    elf: &[u8],
    args: &str,
    vcpus: u32,
) -> Result<BootState, LoadError> {
    load_elf_with(
        mem,
        elf,
        &LoadOptions {
            args,
            vcpus,
            flags: 0,
        },
    )
}

/// Validates everything, then writes the low-memory structures and the image and
/// returns the boot vCPU's initial state. On error nothing has been written.
pub fn load_elf_with<M: GuestMemoryBackend>(
    mem: &M,
    elf: &[u8],
    opts: &LoadOptions<'_>,
) -> Result<BootState, LoadError> {
    load_elf_with_c_bit(mem, elf, opts, None)
}

/// [`load_elf_with`] for an SEV-ES guest when `c_bit` is given: the identity-map page
/// tables have the C-bit set in every entry and CR3 (`BootState::sregs.cr3`) carries it
/// too, so all guest memory starts private; the guest clears the C-bit of the pages it
/// shares (its GHCB). The position must pass [`check_c_bit`]; esvm reports 47. The
/// boot-info flags are taken from `opts` as they are (an SEV-ES guest also needs
/// `FLAG_PROTECTED_STATE`). See `docs/sev-es-guest.md`.
pub fn load_elf_with_c_bit<M: GuestMemoryBackend>(
    mem: &M,
    elf: &[u8],
    opts: &LoadOptions<'_>,
    c_bit: Option<u8>,
) -> Result<BootState, LoadError> {
    let image = elf::parse(elf)?;
    let plan = plan(mem, &image, opts)?;
    if let Some(bit) = c_bit {
        check_c_bit(bit, plan.map_size)?;
    }

    zero(mem, 0, layout::IMAGE_MIN)?;
    let gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, layout::GDT_ADDR, &gdt)?;
    write(mem, layout::BOOT_INFO_ADDR, &plan.boot_info.to_bytes())?;
    write(mem, layout::ARGS_ADDR, opts.args.as_bytes())?;
    write(
        mem,
        layout::PAGE_TABLES_ADDR,
        &build_page_tables_with_c_bit(plan.map_size, c_bit),
    )?;
    for seg in &image.segments {
        let bytes = &elf[seg.file_offset..seg.file_offset + seg.file_len];
        write(mem, seg.paddr, bytes)?;
        zero(
            mem,
            seg.paddr + seg.file_len as u64,
            seg.mem_len - seg.file_len as u64,
        )?;
    }
    let mut sregs = boot_sregs();
    sregs.cr3 |= c_bit_mask(c_bit);
    Ok(BootState {
        regs: boot_regs(image.entry),
        sregs,
        boot_info: plan.boot_info,
        entry: image.entry,
    })
}

struct Plan {
    boot_info: BootInfo,
    map_size: u64,
}

fn plan<M: GuestMemoryBackend>(
    mem: &M,
    image: &ElfImage,
    opts: &LoadOptions<'_>,
) -> Result<Plan, LoadError> {
    if opts.args.len() > layout::ARGS_MAX {
        return Err(LoadError::ArgsTooLong {
            len: opts.args.len(),
            max: layout::ARGS_MAX,
        });
    }
    if let Some(offset) = opts.args.bytes().position(|b| b == 0) {
        return Err(LoadError::ArgsContainNul { offset });
    }
    if opts.vcpus == 0 || opts.vcpus > 255 {
        return Err(LoadError::InvalidVcpuCount(opts.vcpus));
    }
    let mem_end = if mem.num_regions() == 0 {
        0
    } else {
        mem.last_addr().0.saturating_add(1)
    };
    if mem_end > layout::MAX_MEMORY {
        return Err(LoadError::MemoryTooLarge {
            end: mem_end,
            max: layout::MAX_MEMORY,
        });
    }
    let ram = ram_below_first_hole(mem);
    for seg in &image.segments {
        if seg.paddr < layout::IMAGE_MIN {
            return Err(LoadError::SegmentInReservedArea {
                index: seg.index,
                start: seg.paddr,
                end: seg.end(),
                reserved_end: layout::IMAGE_MIN,
            });
        }
        if seg.end() > layout::MAX_MEMORY {
            return Err(LoadError::SegmentOutsideMemory {
                index: seg.index,
                start: seg.paddr,
                end: seg.end(),
                max: layout::MAX_MEMORY,
            });
        }
    }
    let image_end = image.end();
    let free_start = image_end.next_multiple_of(PAGE);
    if ram < layout::IMAGE_MIN || image_end > ram {
        return Err(LoadError::MemoryTooSmall {
            have: ram,
            need: free_start.max(layout::IMAGE_MIN),
        });
    }
    let boot_info = BootInfo {
        mem_size: ram,
        vcpus: opts.vcpus,
        flags: opts.flags,
        args_addr: layout::ARGS_ADDR,
        args_len: opts.args.len() as u64,
        image_start: image.start(),
        image_end,
        free_start: free_start.min(ram),
        ..BootInfo::new()
    };
    Ok(Plan {
        boot_info,
        map_size: identity_map_size(mem_end),
    })
}

#[cfg(test)]
mod tests;
