//! Checks of the embedded guest images: each is a static ELF64 x86-64 executable laid
//! out as the boot protocol requires.

use super::*;
use esvm_abi::layout;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[derive(Debug)]
struct Phdr {
    p_type: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn phdrs(elf: &[u8]) -> Vec<Phdr> {
    let phoff = u64_at(elf, 32) as usize;
    let n = u16_at(elf, 56) as usize;
    assert_eq!(u16_at(elf, 54), 56, "e_phentsize");
    (0..n)
        .map(|i| {
            let p = &elf[phoff + i * 56..phoff + (i + 1) * 56];
            Phdr {
                p_type: u32_at(p, 0),
                flags: u32_at(p, 4),
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                paddr: u64_at(p, 24),
                filesz: u64_at(p, 32),
                memsz: u64_at(p, 40),
                align: u64_at(p, 48),
            }
        })
        .collect()
}

#[test]
fn every_guest_is_a_bootable_elf64() {
    assert!(list().len() >= 9);
    for g in list() {
        let elf = g.elf;
        let n = g.name;
        assert_eq!(&elf[..4], b"\x7fELF", "{n}: magic");
        assert_eq!(elf[4], 2, "{n}: ELFCLASS64");
        assert_eq!(elf[5], 1, "{n}: little endian");
        assert_eq!(u16_at(elf, 16), 2, "{n}: ET_EXEC");
        assert_eq!(u16_at(elf, 18), 62, "{n}: EM_X86_64");
        let entry = u64_at(elf, 24);
        let loads: Vec<Phdr> = phdrs(elf).into_iter().filter(|p| p.p_type == 1).collect();
        assert!(!loads.is_empty(), "{n}: no PT_LOAD");
        for p in phdrs(elf) {
            assert!(
                p.p_type == 1 || p.p_type == 0x6474_e551 || p.p_type == 0,
                "{n}: unexpected program header type {:#x}",
                p.p_type
            );
        }
        for p in &loads {
            assert!(
                p.paddr >= layout::IMAGE_MIN,
                "{n}: segment at {:#x} below 2 MiB",
                p.paddr
            );
            assert_eq!(p.vaddr, p.paddr, "{n}: VMA != LMA");
            assert_eq!(p.paddr % 4096, 0, "{n}: segment not 4 KiB aligned");
            assert_eq!(p.align, 4096, "{n}: p_align");
            assert!(p.filesz <= p.memsz, "{n}: filesz > memsz");
            assert!(
                p.offset + p.filesz <= elf.len() as u64,
                "{n}: segment beyond file"
            );
            assert!(
                !(p.flags & 2 != 0 && p.flags & 1 != 0),
                "{n}: writable and executable segment"
            );
        }
        let text = loads
            .iter()
            .find(|p| p.flags & 1 != 0 && entry >= p.paddr && entry < p.paddr + p.memsz);
        let text =
            text.unwrap_or_else(|| panic!("{n}: entry {entry:#x} not in an executable segment"));
        assert_eq!(
            entry, text.paddr,
            "{n}: _start is not the first byte of the text segment"
        );
        assert!(
            loads.iter().any(|p| p.flags & 2 != 0),
            "{n}: no writable segment"
        );
        // No segment may overlap another.
        for (i, a) in loads.iter().enumerate() {
            for b in &loads[i + 1..] {
                assert!(
                    a.paddr + a.memsz <= b.paddr || b.paddr + b.memsz <= a.paddr,
                    "{n}: overlapping segments"
                );
            }
        }
    }
}

#[test]
fn lookup_by_name() {
    for name in [
        "demo",
        "hello",
        "pagefault",
        "exceptions",
        "usermode",
        "triplefault",
        "timer",
        "sse",
        "cpubench",
    ] {
        let g = builtin(name).unwrap_or_else(|| panic!("guest {name} missing"));
        assert_eq!(g.name, name);
        assert!(!g.description.is_empty() && !g.description.contains('\n'));
    }
    assert!(builtin("no-such-guest").is_none());
    let mut names: Vec<&str> = list().iter().map(|g| g.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), list().len(), "duplicate guest names");
}

#[test]
fn guests_embed_their_strings() {
    // A cheap check that each image is the guest it claims to be.
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains(builtin("demo").unwrap().elf, "checksum="));
    assert!(contains(
        builtin("pagefault").unwrap().elf,
        "pagefault: all tests passed"
    ));
    assert!(contains(
        builtin("triplefault").unwrap().elf,
        "expect a shutdown"
    ));
}

/// The value of a one-byte static `symbol` in `elf`, through the symbol table.
fn static_byte(elf: &[u8], symbol: &str) -> Option<u8> {
    let shoff = u64_at(elf, 0x28) as usize;
    let shentsize = u16_at(elf, 0x3a) as usize;
    let shnum = u16_at(elf, 0x3c) as usize;
    let section = |i: usize| &elf[shoff + i * shentsize..shoff + (i + 1) * shentsize];
    let symtab = (0..shnum).map(section).find(|s| u32_at(s, 4) == 2)?;
    let strtab = section(u32_at(symtab, 40) as usize);
    let (str_off, sym_off, sym_size) = (
        u64_at(strtab, 24) as usize,
        u64_at(symtab, 24) as usize,
        u64_at(symtab, 32) as usize,
    );
    let value = (0..sym_size / 24).find_map(|i| {
        let sym = &elf[sym_off + 24 * i..sym_off + 24 * (i + 1)];
        let name_at = str_off + u32_at(sym, 0) as usize;
        let len = elf[name_at..].iter().position(|&b| b == 0)?;
        (&elf[name_at..name_at + len] == symbol.as_bytes()).then(|| u64_at(sym, 8))
    })?;
    let seg = phdrs(elf)
        .into_iter()
        .find(|p| p.p_type == 1 && value >= p.vaddr && value < p.vaddr + p.filesz)?;
    Some(elf[(seg.offset + value - seg.vaddr) as usize])
}

#[test]
fn sev_guests_are_present_and_opt_in_to_sev_es() {
    // (name, SevMode as declared by entry!: 1 full, 2 no #VC handler)
    let sev = [
        ("sevdemo", 1u8),
        ("sev-smoke", 1),
        ("sev-idt", 1),
        ("sev-fpu", 1),
        ("sev-cr", 1),
        ("sev-pf", 1),
        ("sev-novc", 2),
        ("sev-mmio", 1),
        ("sev-apic", 1),
        ("smp", 1),
    ];
    for (name, mode) in sev {
        let g = builtin(name).unwrap_or_else(|| panic!("guest {name} missing"));
        assert_eq!(&g.elf[..4], b"\x7fELF", "{name}");
        assert!(!g.description.is_empty() && !g.description.contains('\n'));
        assert_eq!(
            static_byte(g.elf, "__ESVM_GUEST_SEV_MODE"),
            Some(mode),
            "{name}: SEV-ES mode declared by entry!"
        );
    }
    // Plain guests declare no SEV-ES support.
    for name in ["demo", "hello", "triplefault"] {
        assert_eq!(
            static_byte(builtin(name).unwrap().elf, "__ESVM_GUEST_SEV_MODE"),
            Some(0),
            "{name}"
        );
    }
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    for (name, needle) in [
        ("sevdemo", "checksum="),
        ("sev-smoke", "all checks passed; requesting termination"),
        ("sev-idt", "expect a shutdown"),
        ("sev-fpu", "match the pattern"),
        ("sev-cr", "steps passed"),
        ("sev-pf", "#PF delivered"),
        ("sev-novc", "expect a shutdown"),
        ("sev-mmio", "cases passed"),
        ("sev-apic", "ticks after its deadline"),
    ] {
        assert!(
            contains(builtin(name).unwrap().elf, needle),
            "{name}: {needle}"
        );
    }
}
