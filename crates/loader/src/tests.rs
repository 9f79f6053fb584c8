use super::*;
use crate::elf::tests::build;
use crate::elf::{PF_R, PF_W, PF_X};
use esvm_abi::boot::FLAG_PROTECTED_STATE;
use proptest::prelude::*;
use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

type Mem = GuestMemoryMmap<()>;

fn mem(bytes: u64) -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
}

fn mem_ranges(ranges: &[(u64, u64)]) -> Mem {
    let r: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&r).unwrap()
}

fn demo() -> &'static [u8] {
    esvm_guests::builtin("demo").unwrap().elf
}

fn read_u64(m: &Mem, addr: u64) -> u64 {
    m.read_obj::<u64>(GuestAddress(addr)).unwrap()
}

fn read_vec(m: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A 4-level page-table walk through guest memory, as the CPU does it: returns the
/// physical address, the page size and the AND of the R/W and U/S bits, or None.
fn walk(m: &Mem, cr3: u64, va: u64) -> Option<(u64, u64, u64)> {
    let mut table = cr3 & ADDR_MASK;
    let mut rights = PTE_RW | PTE_US;
    for level in (0..4u32).rev() {
        let idx = (va >> (12 + 9 * level)) & 0x1ff;
        let e = read_u64(m, table + idx * 8);
        if e & PTE_P == 0 {
            return None;
        }
        assert_eq!(e & (1 << 63), 0, "NX set on a boot mapping");
        rights &= e;
        if level == 3 {
            assert_eq!(e & PTE_PS, 0, "PS set in a PML4 entry");
        }
        if level == 0 || e & PTE_PS != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((
                (e & ADDR_MASK & !(size - 1)) | (va & (size - 1)),
                size,
                rights,
            ));
        }
        table = e & ADDR_MASK;
    }
    None
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

fn simple_elf(paddr: u64, memsz: u64) -> Vec<u8> {
    build(&[(paddr, &[0xf4, 0xeb, 0xfd], memsz, PF_R | PF_X)], paddr)
}

#[test]
fn boot_state_is_long_mode_with_the_protocol_registers() {
    let m = mem(64 << 20);
    let st = load_elf(&m, demo(), "iterations=5", 2).unwrap();
    assert_eq!(st.regs.rip, st.entry);
    assert_eq!(st.regs.get(Gpr::Rsp), layout::STACK_TOP);
    assert_eq!(st.regs.get(Gpr::Rdi), layout::BOOT_INFO_ADDR);
    assert_eq!(st.regs.rflags, 0x2);
    for r in [
        Gpr::Rax,
        Gpr::Rbx,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rsi,
        Gpr::Rbp,
        Gpr::R15,
    ] {
        assert_eq!(st.regs.get(r), 0);
    }
    let s = &st.sregs;
    assert_eq!(s.cs.selector, 0x08);
    assert_eq!(s.cs.attrib.0, 0xa9b, "64-bit code: type 0xb, S, P, L, G");
    assert!(s.cs.attrib.long() && !s.cs.attrib.db());
    for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.attrib.0, 0xc93, "data: type 3, S, P, DB, G");
        assert_eq!((seg.base, seg.limit), (0, 0xffff_ffff));
    }
    assert_eq!(s.cr0, 0x8001_0033, "PE|MP|ET|NE|WP|PG");
    assert_eq!(s.cr3, layout::PAGE_TABLES_ADDR);
    assert_eq!(s.cr4, 0x620, "PAE|OSFXSR|OSXMMEXCPT");
    assert_eq!(s.efer, 0xd01, "SCE|LME|LMA|NXE");
    assert_eq!((s.gdt.base, s.gdt.limit), (layout::GDT_ADDR, 39));
    assert_eq!(s.idt.limit, 0);
    assert!(s.tr.attrib.present() && s.tr.attrib.seg_type() == 0xb);
}

#[test]
fn low_memory_holds_gdt_boot_info_and_arguments() {
    let m = mem(64 << 20);
    // Dirty memory first: the loader must not rely on zeroed RAM.
    m.write_slice(&vec![0xaa; 4 << 20], GuestAddress(0))
        .unwrap();
    let args = "iterations=5 dirty-mib=1 name=x";
    let st = load_elf_with(
        &m,
        demo(),
        &LoadOptions {
            args,
            vcpus: 3,
            flags: FLAG_PROTECTED_STATE,
        },
    )
    .unwrap();
    // GDT
    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        assert_eq!(read_u64(&m, layout::GDT_ADDR + 8 * i as u64), *d);
    }
    assert_eq!(
        Segment::from_descriptor(0x08, read_u64(&m, layout::GDT_ADDR + 8), None),
        st.sregs.cs
    );
    assert_eq!(
        Segment::from_descriptor(0x10, read_u64(&m, layout::GDT_ADDR + 16), None),
        st.sregs.ss
    );
    // Boot info
    let bi = BootInfo::from_bytes(&read_vec(&m, layout::BOOT_INFO_ADDR, 128)).unwrap();
    assert!(bi.is_valid());
    assert_eq!(bi, st.boot_info);
    assert_eq!(bi.mem_size, 64 << 20);
    assert_eq!(bi.vcpus, 3);
    assert_eq!(bi.flags, FLAG_PROTECTED_STATE);
    assert_eq!(bi.args_addr, layout::ARGS_ADDR);
    assert_eq!(bi.args_len, args.len() as u64);
    assert_eq!(bi.image_start, 0x20_0000);
    let img = elf::parse(demo()).unwrap();
    assert_eq!(bi.image_end, img.end());
    assert_eq!(bi.free_start, img.end().next_multiple_of(4096));
    assert_eq!(bi.reserved, [0; 7]);
    // Arguments, NUL-terminated
    let a = read_vec(&m, layout::ARGS_ADDR, args.len() + 1);
    assert_eq!(&a[..args.len()], args.as_bytes());
    assert_eq!(a[args.len()], 0);
    // The rest of the reserved area is zero (no stale 0xaa), e.g. the stack.
    assert!(read_vec(&m, layout::STACK_BOTTOM, 0x80000)
        .iter()
        .all(|&b| b == 0));
    assert!(read_vec(&m, 0x100000, 0x100000).iter().all(|&b| b == 0));
}

#[test]
fn segments_are_copied_and_zero_filled() {
    let m = mem(64 << 20);
    m.write_slice(&vec![0x55; 4 << 20], GuestAddress(0x20_0000))
        .unwrap();
    let elf = demo();
    load_elf(&m, elf, "", 1).unwrap();
    let img = elf::parse(elf).unwrap();
    for s in &img.segments {
        let got = read_vec(&m, s.paddr, s.mem_len as usize);
        assert_eq!(
            &got[..s.file_len],
            &elf[s.file_offset..s.file_offset + s.file_len]
        );
        assert!(got[s.file_len..].iter().all(|&b| b == 0), "bss not zeroed");
    }
    // Bytes after the image are left alone.
    let after = img.end().next_multiple_of(4096) + 4096;
    assert_eq!(read_vec(&m, after, 16), vec![0x55; 16]);
}

#[test]
fn page_tables_identity_map_all_memory_with_user_writable_2mib_pages() {
    let cases: Vec<(Mem, u64)> = vec![
        (mem(3 << 20), 3 << 20),
        (mem(64 << 20), 64 << 20),
        (mem((1 << 30) + (2 << 20)), (1 << 30) + (2 << 20)),
        // RAM below and above a hole at 3..4 GiB.
        (mem_ranges(&[(0, 3 << 30), (4 << 30, 2 << 30)]), 6 << 30),
    ];
    for (m, end) in cases {
        let st = load_elf(&m, demo(), "", 1).unwrap();
        let map = identity_map_size(end);
        assert!(map >= end && map >= 4 << 30 && map.is_multiple_of(1 << 30));
        assert!(layout::PAGE_TABLES_ADDR + (2 + map / (1 << 30)) * 4096 <= layout::PAGE_TABLES_END);
        let cr3 = st.sregs.cr3;
        let probes = [
            0,
            0x1000,
            layout::BOOT_INFO_ADDR + 8,
            layout::STACK_TOP - 8,
            st.entry,
            end / 2 + 0x123,
            end - 1,
            (4 << 30) - 1,
            0xfee0_0000,
            map - 1,
        ];
        for va in probes {
            let (pa, size, rights) =
                walk(&m, cr3, va).unwrap_or_else(|| panic!("{va:#x} unmapped (mem end {end:#x})"));
            assert_eq!(pa, va, "identity map");
            assert_eq!(size, 2 << 20, "2 MiB pages");
            assert_eq!(rights, PTE_RW | PTE_US, "R/W and U/S on every level");
        }
        assert_eq!(walk(&m, cr3, map), None, "beyond the identity map");
        assert_eq!(walk(&m, cr3, 1 << 47), None, "upper half");
        // Boot info reports the RAM below the first hole.
        let expected_ram = if end == 6 << 30 { 3 << 30 } else { end };
        assert_eq!(st.boot_info.mem_size, expected_ram);
    }
}

#[test]
fn memory_errors() {
    let elf = demo();
    // Smaller than the reserved 2 MiB.
    let e = load_elf(&mem(1 << 20), elf, "", 1).unwrap_err();
    assert!(
        matches!(e, LoadError::MemoryTooSmall { have, need } if have == 1 << 20 && need > 2 << 20),
        "{e}"
    );
    // Exactly the reserved area: the image does not fit.
    let e = load_elf(&mem(2 << 20), elf, "", 1).unwrap_err();
    assert!(matches!(e, LoadError::MemoryTooSmall { .. }), "{e}");
    assert!(e.to_string().contains("give the VM more memory"));
    // No RAM at address 0.
    let e = load_elf(&mem_ranges(&[(1 << 30, 64 << 20)]), elf, "", 1).unwrap_err();
    assert!(
        matches!(e, LoadError::MemoryTooSmall { have: 0, .. }),
        "{e}"
    );
    // Memory ending beyond what the page-table area can map.
    let m = mem_ranges(&[(0, 64 << 20), (layout::MAX_MEMORY, 4096)]);
    let e = load_elf(&m, elf, "", 1).unwrap_err();
    assert!(matches!(e, LoadError::MemoryTooLarge { .. }), "{e}");
    // Exactly at the limit is fine.
    let m = mem_ranges(&[(0, 64 << 20), (layout::MAX_MEMORY - 4096, 4096)]);
    load_elf(&m, elf, "", 1).unwrap();
}

#[test]
fn segment_placement_errors() {
    let m = mem(64 << 20);
    let e = load_elf(&m, &simple_elf(0x10_0000, 0x1000), "", 1).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::SegmentInReservedArea {
                index: 0,
                start: 0x10_0000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("reserved"));
    // Straddling the boundary.
    let e = load_elf(&m, &simple_elf(0x1f_f000, 0x2000), "", 1).unwrap_err();
    assert!(matches!(e, LoadError::SegmentInReservedArea { .. }), "{e}");
    // Beyond RAM but mappable: memory too small.
    let e = load_elf(&m, &simple_elf(100 << 20, 0x1000), "", 1).unwrap_err();
    assert!(
        matches!(e, LoadError::MemoryTooSmall { have, need } if have == 64 << 20 && need == (100 << 20) + 0x1000),
        "{e}"
    );
    // Beyond anything the boot protocol can map.
    let e = load_elf(&m, &simple_elf(1 << 40, 0x1000), "", 1).unwrap_err();
    assert!(matches!(e, LoadError::SegmentOutsideMemory { .. }), "{e}");
    // A large bss is zero-filled and counted.
    let st = load_elf(&m, &simple_elf(0x20_0000, 8 << 20), "", 1).unwrap();
    assert_eq!(st.boot_info.image_end, 0x20_0000 + (8 << 20));
    assert_eq!(read_vec(&m, 0x20_0000, 3), vec![0xf4, 0xeb, 0xfd]);
    // Two segments, entry in the second (executable) one.
    let elf = build(
        &[
            (0x30_0000, &[1, 2], 0x1000, PF_R | PF_W),
            (0x20_0000, &[0xf4], 0x10, PF_R | PF_X),
        ],
        0x20_0008,
    );
    let st = load_elf(&m, &elf, "", 1).unwrap();
    assert_eq!(st.entry, 0x20_0008);
    assert_eq!(st.boot_info.image_start, 0x20_0000);
    assert_eq!(st.boot_info.free_start, 0x30_1000);
}

#[test]
fn argument_and_vcpu_errors() {
    let m = mem(64 << 20);
    let ok = "a".repeat(layout::ARGS_MAX);
    load_elf(&m, demo(), &ok, 1).unwrap();
    assert_eq!(read_vec(&m, layout::ARGS_ADDR + 4095, 1), vec![0]);
    let long = "a".repeat(layout::ARGS_MAX + 1);
    let e = load_elf(&m, demo(), &long, 1).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::ArgsTooLong {
                len: 4096,
                max: 4095
            }
        ),
        "{e}"
    );
    let e = load_elf(&m, demo(), "a=1\0b=2", 1).unwrap_err();
    assert!(matches!(e, LoadError::ArgsContainNul { offset: 3 }), "{e}");
    for n in [0, 256] {
        let e = load_elf(&m, demo(), "", n).unwrap_err();
        assert!(matches!(e, LoadError::InvalidVcpuCount(v) if v == n), "{e}");
    }
    load_elf(&m, demo(), "", 255).unwrap();
}

#[test]
fn elf_errors_are_reported_and_a_failed_load_writes_nothing() {
    let m = mem(64 << 20);
    m.write_slice(&[0xaa; 0x10000], GuestAddress(0)).unwrap();
    let e = load_elf(&m, b"#!/bin/sh\n", "", 1).unwrap_err();
    assert!(matches!(e, LoadError::Elf(ElfError::NotElf)), "{e}");
    assert!(e.to_string().contains("not an ELF"));
    let mut elf32 = demo().to_vec();
    elf32[4] = 1;
    let e = load_elf(&m, &elf32, "", 1).unwrap_err();
    assert!(matches!(e, LoadError::Elf(ElfError::NotElf64(1))), "{e}");
    let mut dynamic = demo().to_vec();
    dynamic[16] = 3; // ET_DYN
    let e = load_elf(&m, &dynamic, "", 1).unwrap_err();
    assert!(
        matches!(e, LoadError::Elf(ElfError::NotExecutable(3))),
        "{e}"
    );
    let e = load_elf(&m, demo(), &"x".repeat(5000), 1).unwrap_err();
    assert!(matches!(e, LoadError::ArgsTooLong { .. }));
    assert_eq!(
        read_vec(&m, 0, 0x10000),
        vec![0xaa; 0x10000],
        "memory written by a failed load"
    );
}

#[test]
fn every_builtin_guest_loads() {
    let m = mem(64 << 20);
    for g in esvm_guests::list() {
        let st = load_elf(&m, g.elf, "", 1).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert!(st.boot_info.free_start < 64 << 20);
        assert_eq!(st.regs.rip, st.entry);
    }
}

#[test]
fn ram_and_map_size_helpers() {
    assert_eq!(identity_map_size(0), 4 << 30);
    assert_eq!(identity_map_size(4 << 30), 4 << 30);
    assert_eq!(identity_map_size((4 << 30) + 1), 5 << 30);
    assert_eq!(ram_below_first_hole(&mem(5 << 20)), 5 << 20);
    let m = mem_ranges(&[(0, 2 << 20), (2 << 20, 2 << 20), (8 << 20, 1 << 20)]);
    assert_eq!(ram_below_first_hole(&m), 4 << 20);
    let pt = build_page_tables(4 << 30);
    assert_eq!(pt.len(), (2 + 4) * 4096);
}

#[test]
fn works_with_a_dirty_bitmap_backend() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    let m: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::from_range(
            GuestAddress(0),
            16 << 20,
            None,
        )
        .unwrap()])
        .unwrap();
    let st = load_elf(&m, demo(), "", 1).unwrap();
    let region = m.find_region(GuestAddress(0)).unwrap();
    assert!(region.bitmap().dirty_at(layout::BOOT_INFO_ADDR as usize));
    assert!(region.bitmap().dirty_at(st.entry as usize));
    assert!(!region.bitmap().dirty_at((15 << 20) as usize));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let m = mem(4 << 20);
        let _ = load_elf(&m, &bytes, "", 1);
        let mut with_magic = b"\x7fELF\x02\x01\x01".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = load_elf(&m, &with_magic, "", 1);
    }

    #[test]
    fn mutated_guests_never_panic(
        edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
        truncate in proptest::option::of(0usize..8192),
    ) {
        let m = mem(4 << 20);
        let mut elf = esvm_guests::builtin("hello").unwrap().elf.to_vec();
        for (off, b) in edits {
            // Mostly the headers and program headers, sometimes anywhere.
            let i = if off < 3000 { off % 64.max(elf.len().min(300)) } else { off % elf.len() };
            elf[i] = b;
        }
        if let Some(t) = truncate {
            elf.truncate(t.min(elf.len()));
        }
        if let Ok(st) = load_elf(&m, &elf, "k=v", 1) {
            prop_assert!(st.boot_info.is_valid());
            prop_assert!(st.entry >= st.boot_info.image_start && st.entry < st.boot_info.image_end);
            prop_assert!(st.boot_info.image_end <= 4 << 20);
        }
    }
}

/// A page-table walk for tables with a C-bit: every entry on the way must carry the bit
/// `c` (all memory private); returns (physical address without the C-bit, page size).
fn walk_c_bit(m: &Mem, cr3: u64, va: u64, c: u8) -> Option<(u64, u64)> {
    let cmask = 1u64 << c;
    assert_ne!(cr3 & cmask, 0, "CR3 {cr3:#x} lacks the C-bit");
    let mut table = cr3 & ADDR_MASK & !cmask;
    for level in (0..4u32).rev() {
        let idx = (va >> (12 + 9 * level)) & 0x1ff;
        let e = read_u64(m, table + idx * 8);
        if e & PTE_P == 0 {
            return None;
        }
        assert_ne!(
            e & cmask,
            0,
            "entry {e:#x} (level {level}) for {va:#x} lacks the C-bit"
        );
        if level == 0 || e & PTE_PS != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((
                (e & ADDR_MASK & !cmask & !(size - 1)) | (va & (size - 1)),
                size,
            ));
        }
        table = e & ADDR_MASK & !cmask;
    }
    None
}

#[test]
fn c_bit_tables_make_all_memory_private() {
    for (m, end) in [
        (mem(64 << 20), 64u64 << 20),
        (mem_ranges(&[(0, 3 << 30), (4 << 30, 2 << 30)]), 6 << 30),
    ] {
        let opts = LoadOptions {
            args: "x=1",
            vcpus: 1,
            flags: FLAG_PROTECTED_STATE,
        };
        let st = load_elf_with_c_bit(&m, demo(), &opts, Some(47)).unwrap();
        assert_eq!(st.sregs.cr3, layout::PAGE_TABLES_ADDR | (1 << 47));
        assert_eq!(st.boot_info.flags, FLAG_PROTECTED_STATE);
        // Everything else in the boot state is the plain protocol's.
        let mut plain_sregs = st.sregs;
        plain_sregs.cr3 = layout::PAGE_TABLES_ADDR;
        assert_eq!(plain_sregs, boot_sregs());
        let map = identity_map_size(end);
        for va in [
            0,
            layout::BOOT_INFO_ADDR,
            st.entry,
            end - 1,
            0xfee0_0000,
            map - 1,
        ] {
            let (pa, size) =
                walk_c_bit(&m, st.sregs.cr3, va, 47).unwrap_or_else(|| panic!("{va:#x} unmapped"));
            assert_eq!((pa, size), (va, 2 << 20), "identity map with 2 MiB pages");
        }
        assert_eq!(walk_c_bit(&m, st.sregs.cr3, map, 47), None);
        // Apart from the C-bit, the tables are exactly the plain ones.
        let tables = read_vec(&m, layout::PAGE_TABLES_ADDR, build_page_tables(map).len());
        let plain = build_page_tables(map);
        for (i, (c, p)) in tables.chunks(8).zip(plain.chunks(8)).enumerate() {
            let c = u64::from_le_bytes(c.try_into().unwrap());
            let p = u64::from_le_bytes(p.try_into().unwrap());
            if p == 0 {
                assert_eq!(c, 0, "entry {i}: C-bit on an empty entry");
            } else {
                assert_eq!(c, p | (1 << 47), "entry {i}");
            }
        }
    }
}

#[test]
fn no_c_bit_is_the_plain_load() {
    let (a, b) = (mem(64 << 20), mem(64 << 20));
    let opts = LoadOptions::default();
    let sa = load_elf_with(&a, demo(), &opts).unwrap();
    let sb = load_elf_with_c_bit(&b, demo(), &opts, None).unwrap();
    assert_eq!(sa, sb);
    assert_eq!(read_vec(&a, 0, 4 << 20), read_vec(&b, 0, 4 << 20));
    assert_eq!(c_bit_mask(None), 0);
    assert_eq!(c_bit_mask(Some(47)), 1 << 47);
}

#[test]
fn bad_c_bit_positions_are_refused_before_writing() {
    let m = mem(64 << 20);
    m.write_slice(&[0xaa; 0x1000], GuestAddress(0x10000))
        .unwrap();
    let opts = LoadOptions::default();
    for bit in [52u8, 63, 31, 21, 0] {
        let e = load_elf_with_c_bit(&m, demo(), &opts, Some(bit)).unwrap_err();
        assert!(
            matches!(e, LoadError::InvalidCBit { bit: b, .. } if b == bit),
            "{e}"
        );
        assert!(e.to_string().contains("C-bit"), "{e}");
    }
    assert_eq!(read_vec(&m, 0x10000, 0x1000), vec![0xaa; 0x1000]);
    // 32 covers a 4 GiB map, but not memory that ends above 4 GiB.
    load_elf_with_c_bit(&m, demo(), &opts, Some(32)).unwrap();
    let big = mem_ranges(&[(0, 64 << 20), (4 << 30, 4096)]);
    let e = load_elf_with_c_bit(&big, demo(), &opts, Some(32)).unwrap_err();
    assert!(matches!(e, LoadError::InvalidCBit { bit: 32, .. }), "{e}");
    load_elf_with_c_bit(&big, demo(), &opts, Some(33)).unwrap();
    assert!(check_c_bit(51, layout::MAX_MEMORY).is_ok());
}

#[test]
fn sev_guests_load_with_a_c_bit() {
    let m = mem(64 << 20);
    for g in esvm_guests::list()
        .iter()
        .filter(|g| g.name.starts_with("sev"))
    {
        let opts = LoadOptions {
            flags: FLAG_PROTECTED_STATE,
            ..LoadOptions::default()
        };
        let st = load_elf_with_c_bit(&m, g.elf, &opts, Some(47))
            .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let (pa, _) = walk_c_bit(&m, st.sregs.cr3, st.entry, 47).unwrap();
        assert_eq!(pa, st.entry, "{}", g.name);
    }
}
