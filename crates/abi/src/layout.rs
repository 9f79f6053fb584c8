//! The guest-physical memory map of an esvm VM: every fixed address and size, in one place,
//! with the reason each is where it is. Host crates also reach it as `esvm_arch::layout`.
//!
//! esvm has two boot conventions that never run at the same time: its own ELF protocol
//! (`docs/boot-protocol.md`, the built-in guests) and the Linux 64-bit boot protocol (zero
//! page, command line, ACPI; the next steps of `DESIGN.md`). [`MAP`] says which convention
//! places something in each region ([`Boot`]); within one convention the regions are
//! disjoint. Across conventions exactly one thing overlaps: the esvm boot stack covers the
//! EBDA and the BIOS area, which only a Linux boot uses (see `esvm_stack_is_the_only_overlap`
//! in the tests). RAM is one region from address 0 up to at most [`MAX_RAM_SIZE`], below
//! the MMIO hole; the VMM tells a Linux guest about the legacy hole through e820.
//!
//! | Range | Size | Boot | Contents |
//! |---|---|---|---|
//! | `0x0000_0000-0x0000_0fff` | 4 KiB | both | real-mode IVT and BIOS data area: left zero (no BIOS) |
//! | `0x0000_1000-0x0000_1fff` | 4 KiB | both | boot GDT ([`GDT_ADDR`]) |
//! | `0x0000_2000-0x0000_2fff` | 4 KiB | esvm | boot-info block ([`BOOT_INFO_ADDR`]); RDI at entry |
//! | `0x0000_3000-0x0000_3fff` | 4 KiB | esvm | argument string ([`ARGS_ADDR`], at most [`ARGS_MAX`] bytes) |
//! | `0x0000_4000-0x0000_4fff` | 4 KiB | both | SEV launch secret ([`SECRET_ADDR`], LAUNCH_UPDATE_SECRET) |
//! | `0x0000_5000-0x0000_5fff` | 4 KiB | both | SEV-ES AP start stub ([`AP_STUB_ADDR`]; >1 vCPU) |
//! | `0x0000_6000-0x0000_6fff` | 4 KiB | both | SEV-ES AP jump table ([`AP_JUMP_TABLE_ADDR`]) |
//! | `0x0000_7000-0x0000_7fff` | 4 KiB | Linux | zero page, `struct boot_params` ([`ZERO_PAGE_ADDR`]) |
//! | `0x0000_8000-0x0000_ffff` | 32 KiB | Linux | kernel command line ([`CMDLINE_ADDR`]) |
//! | `0x0001_0000-0x0007_ffff` | 448 KiB | both | boot page tables, PML4 first = CR3 ([`PAGE_TABLES_ADDR`]) |
//! | `0x0008_0000-0x000f_ffff` | 512 KiB | esvm | boot stack, RSP = [`STACK_TOP`] |
//! | `0x0009_fc00-0x0009_ffff` | 1 KiB | Linux | EBDA ([`EBDA_ADDR`]); RAM ends here for Linux ([`LOW_RAM_END`]) |
//! | `0x000a_0000-0x000d_ffff` | 256 KiB | Linux | legacy hole: VGA window, option ROMs (nothing placed) |
//! | `0x000e_0000-0x000f_ffff` | 128 KiB | Linux | BIOS area: ACPI tables, RSDP first ([`ACPI_ADDR`]) |
//! | `0x0010_0000-0x001f_ffff` | 1 MiB | — | high memory starts ([`HIGH_MEMORY_ADDR`]); esvm: reserved, zero |
//! | `0x0020_0000-` | | esvm | the ELF image ([`IMAGE_MIN`]), then free RAM |
//! | `0xc000_0000-0xffff_ffff` | 1 GiB | both | MMIO hole ([`MMIO_HOLE_ADDR`]); RAM ends below it |
//! | `0xfeb0_0000-0xfeb0_0fff` | 4 KiB | both | MMIO scratch window, RAM-like test device ([`MMIO_SCRATCH_ADDR`]) |
//! | `0xfec0_0000-0xfec0_0fff` | 4 KiB | both | IOAPIC ([`IOAPIC_ADDR`]) |
//! | `0xfee0_0000-0xfee0_0fff` | 4 KiB | both | local APIC ([`LAPIC_ADDR`]) |
//! | `0xfffb_c000-0xfffb_cfff` | 4 KiB | both | KVM identity-map page ([`KVM_IDENTITY_MAP_ADDR`]) |
//! | `0xfffb_d000-0xfffb_ffff` | 12 KiB | both | KVM real-mode TSS ([`KVM_TSS_ADDR`]) |
//! | `0x7fff_0000_0000-` | 1 MiB | both | SEV-ES VMSAs, one page per vCPU ([`VMSA_ADDR`]); not guest memory |
//!
//! The identity map of the esvm boot page tables covers at least [`MIN_IDENTITY_MAP`] (so
//! the MMIO hole is reachable) and at most [`MAX_MEMORY`] (the page-table area's capacity).

use crate::sev::C_BIT_POSITION;

/// Size of a page: every region is page-aligned except the EBDA.
pub const PAGE_SIZE: u64 = 0x1000;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------- the first MiB

/// Page 0: where a PC keeps the real-mode interrupt vector table and the BIOS data area.
/// esvm has no BIOS; both conventions leave it zero (Linux reserves it for itself).
pub const REAL_MODE_IVT_ADDR: u64 = 0x0;

/// The boot GDT. The esvm loader writes its five descriptors here (`boot::GDT_ENTRIES`);
/// a Linux boot can put its `__BOOT_CS`/`__BOOT_DS` descriptors in the same page. The first
/// page above page 0, so it stays reachable from any mode.
pub const GDT_ADDR: u64 = 0x1000;
/// esvm: the boot-info block (`boot::BootInfo`); RDI points here at entry.
pub const BOOT_INFO_ADDR: u64 = 0x2000;
/// esvm: the guest argument string (UTF-8, NUL-terminated); one page.
pub const ARGS_ADDR: u64 = 0x3000;
/// Longest accepted argument string in bytes (the page at [`ARGS_ADDR`] minus the NUL).
pub const ARGS_MAX: usize = PAGE_SIZE as usize - 1;
/// SEV-ES: where LAUNCH_UPDATE_SECRET places a guest owner's secret (one page). Inside the
/// loader's measured low memory and used by neither boot convention, so the secret never
/// overwrites boot data.
pub const SECRET_ADDR: u64 = 0x4000;
/// Size of the secret page.
pub const SECRET_SIZE: u64 = PAGE_SIZE;

/// SEV-ES with more than one vCPU: the AP start stub (`esvm_loader::ap_stub`), real-mode
/// code in which the APs park in the GHCB AP reset hold until a SIPI releases them; each
/// AP's initial VMSA starts here (CS base = this address, IP 0). Below 1 MiB so it runs in
/// real mode, page-aligned, encrypted and measured at launch, reported reserved in a Linux
/// guest's e820 map.
pub const AP_STUB_ADDR: u64 = 0x5000;
/// Size of the stub's code page.
pub const AP_STUB_SIZE: u64 = PAGE_SIZE;
/// SEV-ES: the AP jump table, the page the hypervisor reports for AP_JUMP_TABLE GET (as if
/// firmware had registered it with SET); the guest writes the real-mode far pointer (IP at
/// offset 0, CS at 2) of its AP entry here, and a released AP jumps there. Zero at launch.
pub const AP_JUMP_TABLE_ADDR: u64 = 0x6000;
/// Size of the jump table page.
pub const AP_JUMP_TABLE_SIZE: u64 = PAGE_SIZE;

/// Linux: the zero page (`struct boot_params`, 4 KiB), RSI at the 64-bit entry. 0x7000 as
/// in Firecracker and Cloud Hypervisor; free in the esvm convention.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Size of the zero page.
pub const ZERO_PAGE_SIZE: u64 = PAGE_SIZE;
/// Linux: the kernel command line (`boot_params.hdr.cmd_line_ptr`), NUL-terminated. Right
/// after the zero page and below the page tables, so a Linux boot can reuse the esvm page
/// tables; other VMMs put it at 0x20000, which the esvm page tables occupy.
pub const CMDLINE_ADDR: u64 = 0x8000;
/// Room for the command line including its NUL: far above x86 Linux's COMMAND_LINE_SIZE
/// (2048), the limit a kernel reports in `boot_params.hdr.cmdline_size`.
pub const CMDLINE_SIZE: u64 = 0x8000;

/// The boot page tables: PML4 first (CR3 at entry), then one PDPT and one PD per GiB of
/// the identity map. Built by the esvm loader; a Linux boot needs identity-mapped tables
/// too and can use the same builder and place.
pub const PAGE_TABLES_ADDR: u64 = 0x10000;
/// End (exclusive) of the page-table area: room for 2 + 64 tables ([`MAX_MEMORY`]).
pub const PAGE_TABLES_END: u64 = 0x80000;
/// esvm: the lowest address of the boot stack.
pub const STACK_BOTTOM: u64 = 0x80000;
/// esvm: the top of the boot stack (RSP at entry), the end of the first MiB. The stack
/// covers [`EBDA_ADDR`] and [`ACPI_ADDR`]: the two conventions must not be mixed there.
pub const STACK_TOP: u64 = 0x100000;

/// End of conventional memory (639 KiB): for a Linux guest, e820 RAM below 1 MiB ends here.
/// Everything below must stay RAM: Linux allocates its real-mode trampoline (SMP start-up,
/// reboot) from it, and the zero page, command line and page tables are copied or
/// discarded early.
pub const LOW_RAM_END: u64 = 0x9_FC00;
/// Linux: the extended BIOS data area, the classic 1 KiB below 640 KiB (e820 reserved).
/// Linux searches its first KiB for the ACPI RSDP, after `boot_params.acpi_rsdp_addr`.
pub const EBDA_ADDR: u64 = LOW_RAM_END;
/// Size of the EBDA.
pub const EBDA_SIZE: u64 = KIB;
/// Start of the legacy hole (VGA window 0xA0000, option ROMs 0xC0000, system BIOS
/// 0xE0000), never RAM for a Linux guest.
pub const LEGACY_HOLE_ADDR: u64 = 0xA_0000;
/// Linux: ACPI tables in the system-BIOS area 0xE0000-0xFFFFF, the RSDP first: Linux scans
/// this range for "RSD PTR " on 16-byte boundaries when no RSDP address is passed.
pub const ACPI_ADDR: u64 = 0xE_0000;
/// Size of the ACPI area (up to 1 MiB).
pub const ACPI_SIZE: u64 = 0x2_0000;
/// Where the RSDP goes: the first address Linux's scan looks at.
pub const RSDP_ADDR: u64 = ACPI_ADDR;
/// Start of high memory (1 MiB), the end of the legacy hole: RAM again. Linux loads its
/// kernel at or above it (bzImage `code32_start`, 2 MiB-aligned relocation in practice).
pub const HIGH_MEMORY_ADDR: u64 = MIB;

/// esvm: the lowest address an ELF segment may occupy; everything below belongs to the
/// loader (zeroed, then the structures above).
pub const IMAGE_MIN: u64 = 2 * MIB;

// ---------------------------------------------------------------------- below 4 GiB

/// The MMIO hole below 4 GiB (as on PCs and in Cloud Hypervisor): device registers, no RAM.
pub const MMIO_HOLE_ADDR: u64 = 3 * GIB;
/// Size of the MMIO hole (up to 4 GiB).
pub const MMIO_HOLE_SIZE: u64 = GIB;
/// Largest RAM size the VMM accepts: RAM is one region from address 0 and ends at or
/// below the MMIO hole.
pub const MAX_RAM_SIZE: u64 = MMIO_HOLE_ADDR;

/// A 4 KiB RAM-like MMIO window of the VMM (reads return what was written) for guests that
/// test MMIO paths; `sev-mmio`'s default address. Below the IOAPIC, in the hole.
pub const MMIO_SCRATCH_ADDR: u64 = 0xFEB0_0000;
/// Size of the MMIO scratch window.
pub const MMIO_SCRATCH_SIZE: u64 = PAGE_SIZE;
/// The IOAPIC's registers: the address every PC OS expects (MP/ACPI tables repeat it).
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Size of the IOAPIC window (one page; the registers use the first 0x20 bytes).
pub const IOAPIC_SIZE: u64 = PAGE_SIZE;
/// The local APIC's registers: the architectural default of IA32_APIC_BASE.
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Size of the local APIC window.
pub const LAPIC_SIZE: u64 = PAGE_SIZE;
/// KVM backend: the identity-map page table page KVM needs on Intel hosts (EPT without
/// unrestricted guest), the page below the TSS. High in the hole, away from devices.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;
/// Size of KVM's identity-map page.
pub const KVM_IDENTITY_MAP_SIZE: u64 = PAGE_SIZE;
/// KVM backend: the three pages of KVM's real-mode TSS (Intel hosts), just below the
/// 4 GiB BIOS area.
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
/// Size of KVM's TSS area.
pub const KVM_TSS_SIZE: u64 = 3 * PAGE_SIZE;

// ---------------------------------------------------------------------- above 4 GiB

/// The esvm boot page tables identity-map at least this much address space (the first
/// 4 GiB, so the MMIO hole is reachable), more if memory extends beyond it.
pub const MIN_IDENTITY_MAP: u64 = 4 * GIB;
/// Largest end of guest memory the boot page tables can identity-map (one PD per GiB in
/// the page-table area).
pub const MAX_MEMORY: u64 = 64 * GIB;

/// SEV-ES: the guest-physical identity of vCPU 0's VMSA page, vCPU n's at
/// `VMSA_ADDR + n * PAGE_SIZE` ([`vmsa_addr`]). VMSAs live outside guest memory (as on
/// hardware, where KVM allocates them from host memory): the address only serves as the
/// encryption tweak and the firmware's bookkeeping key. Far above any RAM and below the
/// C-bit.
pub const VMSA_ADDR: u64 = 0x7FFF_0000_0000;
/// Size of the VMSA area: one page for each vCPU id 0..=255.
pub const VMSA_AREA_SIZE: u64 = 256 * PAGE_SIZE;

/// The guest-physical identity of vCPU `vcpu`'s VMSA page.
pub const fn vmsa_addr(vcpu: u32) -> u64 {
    VMSA_ADDR + (vcpu as u64) * PAGE_SIZE
}

// ---------------------------------------------------------------------- the table

/// Which boot convention places something in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Either convention (or the platform, whatever boots).
    Both,
    /// The esvm ELF boot protocol only.
    Esvm,
    /// The Linux 64-bit boot protocol only.
    Linux,
}

impl Boot {
    /// Whether a region of this kind is in use when booting with `convention`.
    pub const fn used_by(self, convention: Boot) -> bool {
        matches!(
            (self, convention),
            (Boot::Both, _) | (Boot::Esvm, Boot::Esvm) | (Boot::Linux, Boot::Linux)
        )
    }
}

/// One fixed region of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// What it holds.
    pub name: &'static str,
    /// First address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The convention that uses it.
    pub boot: Boot,
}

impl Region {
    /// End (exclusive).
    pub const fn end(&self) -> u64 {
        self.start + self.size
    }

    /// Whether the two regions share a byte.
    pub const fn overlaps(&self, other: &Region) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// Whether `[start, start + len)` lies inside the region.
    pub const fn contains(&self, start: u64, len: u64) -> bool {
        start >= self.start && len <= self.size && start - self.start <= self.size - len
    }
}

const fn region(name: &'static str, start: u64, size: u64, boot: Boot) -> Region {
    Region {
        name,
        start,
        size,
        boot,
    }
}

/// Every fixed region, sorted by start address. Areas without fixed contents (free RAM,
/// the ELF image, the MMIO hole as a whole) are described by the constants only.
pub const MAP: [Region; 19] = [
    region(
        "real-mode IVT and BDA",
        REAL_MODE_IVT_ADDR,
        PAGE_SIZE,
        Boot::Both,
    ),
    region("boot GDT", GDT_ADDR, PAGE_SIZE, Boot::Both),
    region("boot info", BOOT_INFO_ADDR, PAGE_SIZE, Boot::Esvm),
    region("arguments", ARGS_ADDR, PAGE_SIZE, Boot::Esvm),
    region("SEV launch secret", SECRET_ADDR, SECRET_SIZE, Boot::Both),
    region(
        "SEV-ES AP start stub",
        AP_STUB_ADDR,
        AP_STUB_SIZE,
        Boot::Both,
    ),
    region(
        "SEV-ES AP jump table",
        AP_JUMP_TABLE_ADDR,
        AP_JUMP_TABLE_SIZE,
        Boot::Both,
    ),
    region("zero page", ZERO_PAGE_ADDR, ZERO_PAGE_SIZE, Boot::Linux),
    region("command line", CMDLINE_ADDR, CMDLINE_SIZE, Boot::Linux),
    region(
        "boot page tables",
        PAGE_TABLES_ADDR,
        PAGE_TABLES_END - PAGE_TABLES_ADDR,
        Boot::Both,
    ),
    region(
        "esvm boot stack",
        STACK_BOTTOM,
        STACK_TOP - STACK_BOTTOM,
        Boot::Esvm,
    ),
    region("EBDA", EBDA_ADDR, EBDA_SIZE, Boot::Linux),
    region("ACPI tables", ACPI_ADDR, ACPI_SIZE, Boot::Linux),
    region(
        "MMIO scratch window",
        MMIO_SCRATCH_ADDR,
        MMIO_SCRATCH_SIZE,
        Boot::Both,
    ),
    region("IOAPIC", IOAPIC_ADDR, IOAPIC_SIZE, Boot::Both),
    region("local APIC", LAPIC_ADDR, LAPIC_SIZE, Boot::Both),
    region(
        "KVM identity-map page",
        KVM_IDENTITY_MAP_ADDR,
        KVM_IDENTITY_MAP_SIZE,
        Boot::Both,
    ),
    region("KVM TSS", KVM_TSS_ADDR, KVM_TSS_SIZE, Boot::Both),
    region("SEV-ES VMSAs", VMSA_ADDR, VMSA_AREA_SIZE, Boot::Both),
];

// The facts other code builds on, checked at compile time.
const _: () = assert!(ARGS_MAX < PAGE_SIZE as usize);
const _: () = assert!(STACK_TOP == HIGH_MEMORY_ADDR && HIGH_MEMORY_ADDR < IMAGE_MIN);
const _: () =
    assert!(MAX_RAM_SIZE <= MAX_MEMORY && MMIO_HOLE_ADDR + MMIO_HOLE_SIZE <= MIN_IDENTITY_MAP);
const _: () = assert!(VMSA_ADDR >= MAX_MEMORY && VMSA_ADDR + VMSA_AREA_SIZE <= 1 << C_BIT_POSITION);
// PML4 + PDPT + one PD per GiB of the largest identity map.
const _: () = assert!(PAGE_TABLES_END - PAGE_TABLES_ADDR >= (2 + MAX_MEMORY / GIB) * PAGE_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    fn used_by(convention: Boot) -> impl Iterator<Item = &'static Region> {
        MAP.iter().filter(move |r| r.boot.used_by(convention))
    }

    #[test]
    fn map_is_sorted_and_disjoint_within_each_convention() {
        for w in MAP.windows(2) {
            assert!(
                w[0].start < w[1].start,
                "{} before {}",
                w[0].name,
                w[1].name
            );
        }
        for convention in [Boot::Esvm, Boot::Linux] {
            let regions: Vec<_> = used_by(convention).collect();
            for w in regions.windows(2) {
                assert!(
                    w[0].end() <= w[1].start,
                    "{convention:?}: {} overlaps {}",
                    w[0].name,
                    w[1].name
                );
            }
        }
    }

    #[test]
    fn esvm_stack_is_the_only_overlap_between_the_conventions() {
        let mut overlaps = Vec::new();
        for (i, a) in MAP.iter().enumerate() {
            for b in &MAP[i + 1..] {
                if a.overlaps(b) {
                    overlaps.push((a.name, b.name));
                }
            }
        }
        assert_eq!(
            overlaps,
            [
                ("esvm boot stack", "EBDA"),
                ("esvm boot stack", "ACPI tables")
            ]
        );
    }

    #[test]
    fn regions_are_aligned() {
        for r in &MAP {
            // The EBDA is placed in KiB units (the BIOS data area records it as a segment).
            let align = if r.name == "EBDA" { KIB } else { PAGE_SIZE };
            assert_eq!(r.start % align, 0, "{} start", r.name);
            assert_eq!(r.size % align, 0, "{} size", r.name);
            assert!(r.size > 0, "{}", r.name);
        }
        // ACPI: the RSDP must be 16-byte aligned inside the range Linux scans.
        assert_eq!(RSDP_ADDR % 16, 0);
        assert!((0xE_0000..0x10_0000).contains(&RSDP_ADDR));
        assert_eq!(ACPI_ADDR + ACPI_SIZE, HIGH_MEMORY_ADDR);
    }

    #[test]
    fn ram_regions_lie_below_the_mmio_hole_and_devices_inside_it() {
        let hole = MMIO_HOLE_ADDR..MMIO_HOLE_ADDR + MMIO_HOLE_SIZE;
        for r in &MAP {
            let in_hole = hole.contains(&r.start) && r.end() <= hole.end;
            let in_ram = r.end() <= MMIO_HOLE_ADDR;
            let outside_memory = r.start >= MAX_MEMORY;
            assert_eq!(
                [in_ram, in_hole, outside_memory]
                    .iter()
                    .filter(|&&b| b)
                    .count(),
                1,
                "{} lies in exactly one of RAM, the MMIO hole, beyond memory",
                r.name
            );
        }
        for dev in [
            MMIO_SCRATCH_ADDR,
            IOAPIC_ADDR,
            LAPIC_ADDR,
            KVM_IDENTITY_MAP_ADDR,
            KVM_TSS_ADDR,
        ] {
            assert!(hole.contains(&dev), "{dev:#x}");
        }
        // Every address the esvm boot page tables must reach is identity-mapped.
        assert!(hole.end <= MIN_IDENTITY_MAP);
        assert_eq!(MAX_RAM_SIZE, MMIO_HOLE_ADDR);
    }

    #[test]
    fn linux_low_memory_keeps_conventional_ram_intact() {
        // Below 1 MiB, what a Linux boot uses is either inside conventional RAM (which the
        // e820 map reports as RAM, for the real-mode trampoline) or inside the reserved
        // EBDA + legacy hole; nothing straddles the boundary at 639 KiB.
        for r in used_by(Boot::Linux).filter(|r| r.start < HIGH_MEMORY_ADDR) {
            let low = r.end() <= LOW_RAM_END;
            let reserved = r.start >= LOW_RAM_END && r.end() <= HIGH_MEMORY_ADDR;
            assert!(low ^ reserved, "{}", r.name);
        }
        assert_eq!(EBDA_ADDR + EBDA_SIZE, LEGACY_HOLE_ADDR);
        const { assert!(LEGACY_HOLE_ADDR < ACPI_ADDR) };
        // The command line holds the largest one x86 Linux accepts, plus its NUL.
        const { assert!(CMDLINE_SIZE > 2048) };
    }

    #[test]
    fn esvm_boot_structures_lie_below_the_image() {
        for r in used_by(Boot::Esvm).filter(|r| r.end() <= MMIO_HOLE_ADDR) {
            assert!(r.end() <= IMAGE_MIN, "{}", r.name);
        }
        // The measured low memory of an SEV-ES launch ([0, STACK_TOP)) holds the secret page.
        const { assert!(SECRET_ADDR + SECRET_SIZE <= STACK_TOP) };
    }

    #[test]
    fn vmsa_pages_lie_beyond_memory_and_below_the_c_bit() {
        assert_eq!(vmsa_addr(0), VMSA_ADDR);
        assert_eq!(vmsa_addr(1), VMSA_ADDR + 0x1000);
        assert_eq!(vmsa_addr(255) + PAGE_SIZE, VMSA_ADDR + VMSA_AREA_SIZE);
        const { assert!(VMSA_ADDR >= MAX_MEMORY) };
        const { assert!(VMSA_ADDR + VMSA_AREA_SIZE <= 1 << C_BIT_POSITION) };
        // The value the hypervisor has always used.
        assert_eq!(vmsa_addr(3), 0x7fff_0000_0000 + 3 * 4096);
    }

    #[test]
    fn region_helpers() {
        let r = region("r", 0x1000, 0x2000, Boot::Both);
        assert!(r.contains(0x1000, 0x2000));
        assert!(r.contains(0x2fff, 1));
        assert!(!r.contains(0x2fff, 2));
        assert!(!r.contains(0xfff, 1));
        assert!(!r.contains(0x1000, u64::MAX));
        assert!(r.overlaps(&region("s", 0x2fff, 1, Boot::Both)));
        assert!(!r.overlaps(&region("s", 0x3000, 1, Boot::Both)));
        assert!(Boot::Both.used_by(Boot::Linux) && !Boot::Esvm.used_by(Boot::Linux));
    }
}
