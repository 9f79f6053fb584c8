//! A strict parser for the ELF files esvm boots: statically linked, little-endian ELF64
//! x86-64 executables. Every offset and size is checked; no input makes it panic.

use thiserror::Error;

/// ELF header size.
const EHDR_SIZE: usize = 64;
/// Program header entry size.
const PHDR_SIZE: usize = 56;
/// Upper bound on program headers we accept (real guests have a handful).
pub const MAX_PHDRS: usize = 256;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_TLS: u32 = 7;

/// Segment flag: executable.
pub const PF_X: u32 = 1;
/// Segment flag: writable.
pub const PF_W: u32 = 2;
/// Segment flag: readable.
pub const PF_R: u32 = 4;

/// Why an ELF file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ElfError {
    #[error("not an ELF file (the first bytes are not 7f 'E' 'L' 'F'); esvm boots ELF64 x86-64 executables")]
    NotElf,
    #[error("not an ELF64 file (EI_CLASS = {0}); build the guest for x86_64")]
    NotElf64(u8),
    #[error("not a little-endian ELF (EI_DATA = {0}); build the guest for x86_64")]
    NotLittleEndian(u8),
    #[error("not an x86-64 ELF (e_machine = {0}); build the guest for x86_64")]
    NotX86_64(u16),
    #[error("not an executable ELF (e_type = {0}, expected 2 = ET_EXEC); link the guest as a static, non-PIE executable")]
    NotExecutable(u16),
    #[error("dynamically linked ELF ({0} segment present); link the guest statically with no interpreter")]
    Dynamic(&'static str),
    #[error("thread-local storage (PT_TLS) is not supported by the esvm boot protocol; remove #[thread_local]/TLS use")]
    Tls,
    #[error("malformed ELF: {0}")]
    Malformed(String),
    #[error("ELF has no PT_LOAD segment with contents; nothing to boot")]
    NoLoadableSegments,
    #[error("ELF segment {index}: virtual address {vaddr:#x} differs from physical address {paddr:#x}; the boot protocol identity-maps memory, link with VMA = LMA")]
    NotIdentity {
        index: usize,
        vaddr: u64,
        paddr: u64,
    },
    #[error("ELF segments {a} and {b} overlap in physical memory")]
    Overlap { a: usize, b: usize },
    #[error("ELF entry point {0:#x} is not inside an executable PT_LOAD segment")]
    EntryOutsideImage(u64),
}

/// A validated PT_LOAD segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// Index in the program header table.
    pub index: usize,
    /// Physical load address (`p_paddr`).
    pub paddr: u64,
    /// Bytes in memory (`p_memsz`), at least `file_len`.
    pub mem_len: u64,
    /// Offset of the file contents (`p_offset`).
    pub file_offset: usize,
    /// Bytes taken from the file (`p_filesz`); the rest is zero-filled.
    pub file_len: usize,
    /// `PF_*` flags.
    pub flags: u32,
}

impl LoadSegment {
    /// End (exclusive) of the segment in memory.
    pub fn end(&self) -> u64 {
        // Cannot overflow: checked by the parser.
        self.paddr + self.mem_len
    }
}

/// A validated ELF image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    /// Entry point (`e_entry`).
    pub entry: u64,
    /// PT_LOAD segments with a non-zero memory size, in program-header order.
    pub segments: Vec<LoadSegment>,
}

impl ElfImage {
    /// Lowest loaded address.
    pub fn start(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr).min().unwrap_or(0)
    }

    /// End (exclusive) of the highest loaded segment.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(LoadSegment::end)
            .max()
            .unwrap_or(0)
    }
}

fn malformed(msg: impl Into<String>) -> ElfError {
    ElfError::Malformed(msg.into())
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Parses and validates `elf`. Checks the header, every program header's bounds,
/// segment sanity (file size ≤ memory size, no address overflow, VMA = LMA, no
/// overlaps) and that the entry point lies in an executable segment. It does not know
/// about guest memory; [`crate::load_elf`] checks placement.
pub fn parse(elf: &[u8]) -> Result<ElfImage, ElfError> {
    if elf.len() < 4 || elf[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err(ElfError::NotElf);
    }
    if elf.len() < EHDR_SIZE {
        return Err(malformed(format!(
            "file is {} bytes, shorter than the {EHDR_SIZE}-byte ELF64 header",
            elf.len()
        )));
    }
    if elf[4] != 2 {
        return Err(ElfError::NotElf64(elf[4]));
    }
    if elf[5] != 1 {
        return Err(ElfError::NotLittleEndian(elf[5]));
    }
    if elf[6] != 1 {
        return Err(malformed(format!("EI_VERSION is {}, expected 1", elf[6])));
    }
    let e_type = u16_at(elf, 16);
    let e_machine = u16_at(elf, 18);
    if e_machine != 62 {
        return Err(ElfError::NotX86_64(e_machine));
    }
    if e_type != 2 {
        return Err(ElfError::NotExecutable(e_type));
    }
    let e_version = u32_at(elf, 20);
    if e_version != 1 {
        return Err(malformed(format!("e_version is {e_version}, expected 1")));
    }
    let entry = u64_at(elf, 24);
    let phoff = u64_at(elf, 32);
    let phentsize = usize::from(u16_at(elf, 54));
    let phnum = usize::from(u16_at(elf, 56));
    if phnum == 0 {
        return Err(ElfError::NoLoadableSegments);
    }
    if phentsize != PHDR_SIZE {
        return Err(malformed(format!(
            "e_phentsize is {phentsize}, expected {PHDR_SIZE}"
        )));
    }
    if phnum > MAX_PHDRS {
        return Err(malformed(format!(
            "{phnum} program headers, more than the {MAX_PHDRS} accepted"
        )));
    }
    let table_len = phnum * PHDR_SIZE;
    let table = usize::try_from(phoff)
        .ok()
        .and_then(|start| Some((start, start.checked_add(table_len)?)))
        .filter(|&(_, end)| end <= elf.len())
        .map(|(start, end)| &elf[start..end])
        .ok_or_else(|| {
            malformed(format!(
                "program header table [{phoff:#x}, +{table_len:#x}) runs past the end of the {}-byte file",
                elf.len()
            ))
        })?;

    let mut segments: Vec<LoadSegment> = Vec::new();
    for index in 0..phnum {
        let ph = &table[index * PHDR_SIZE..(index + 1) * PHDR_SIZE];
        let p_type = u32_at(ph, 0);
        let flags = u32_at(ph, 4);
        let offset = u64_at(ph, 8);
        let vaddr = u64_at(ph, 16);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        match p_type {
            PT_INTERP => return Err(ElfError::Dynamic("PT_INTERP")),
            PT_DYNAMIC => return Err(ElfError::Dynamic("PT_DYNAMIC")),
            PT_TLS => return Err(ElfError::Tls),
            PT_LOAD => {}
            _ => continue,
        }
        if filesz > memsz {
            return Err(malformed(format!(
                "segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}"
            )));
        }
        let file_end = offset
            .checked_add(filesz)
            .filter(|&e| e <= elf.len() as u64);
        if file_end.is_none() {
            return Err(malformed(format!(
                "segment {index}: contents [{offset:#x}, +{filesz:#x}) run past the end of the {}-byte file",
                elf.len()
            )));
        }
        if paddr.checked_add(memsz).is_none() {
            return Err(malformed(format!(
                "segment {index}: address {paddr:#x} + size {memsz:#x} overflows"
            )));
        }
        if memsz == 0 {
            continue;
        }
        if vaddr != paddr {
            return Err(ElfError::NotIdentity {
                index,
                vaddr,
                paddr,
            });
        }
        // Both fit in usize: they are bounded by elf.len().
        let seg = LoadSegment {
            index,
            paddr,
            mem_len: memsz,
            file_offset: offset as usize,
            file_len: filesz as usize,
            flags,
        };
        if let Some(other) = segments
            .iter()
            .find(|s| s.paddr < seg.end() && seg.paddr < s.end())
        {
            return Err(ElfError::Overlap {
                a: other.index,
                b: index,
            });
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadableSegments);
    }
    if !segments
        .iter()
        .any(|s| s.flags & PF_X != 0 && entry >= s.paddr && entry < s.end())
    {
        return Err(ElfError::EntryOutsideImage(entry));
    }
    Ok(ElfImage { entry, segments })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 executable with the given PT_LOAD segments
    /// (paddr, file bytes, memsz, flags); entry = first segment's address.
    pub(crate) fn build(segs: &[(u64, &[u8], u64, u32)], entry: u64) -> Vec<u8> {
        let phoff = 64usize;
        let mut data_off = phoff + segs.len() * PHDR_SIZE;
        let mut out = vec![0u8; data_off];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&62u16.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        out[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, &(paddr, bytes, memsz, flags)) in segs.iter().enumerate() {
            let ph = phoff + i * PHDR_SIZE;
            out[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            out[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
            out[ph + 8..ph + 16].copy_from_slice(&(data_off as u64).to_le_bytes());
            out[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
            out[ph + 32..ph + 40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            out[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
            out[ph + 48..ph + 56].copy_from_slice(&4096u64.to_le_bytes());
            data_off += bytes.len();
        }
        for &(_, bytes, _, _) in segs {
            out.extend_from_slice(bytes);
        }
        out
    }

    fn set_u16(elf: &mut [u8], off: usize, v: u16) {
        elf[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u64(elf: &mut [u8], off: usize, v: u64) {
        elf[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn sample() -> Vec<u8> {
        build(
            &[
                (0x20_0000, &[0xf4; 16], 0x10, PF_R | PF_X),
                (0x20_1000, &[1, 2, 3], 0x2000, PF_R | PF_W),
            ],
            0x20_0000,
        )
    }

    #[test]
    fn parses_a_valid_image() {
        let img = parse(&sample()).unwrap();
        assert_eq!(img.entry, 0x20_0000);
        assert_eq!(img.segments.len(), 2);
        assert_eq!(img.segments[1].file_len, 3);
        assert_eq!(img.segments[1].mem_len, 0x2000);
        assert_eq!(img.start(), 0x20_0000);
        assert_eq!(img.end(), 0x20_3000);
    }

    #[test]
    fn rejects_header_problems() {
        assert_eq!(parse(b"MZ\0\0"), Err(ElfError::NotElf));
        assert_eq!(parse(b""), Err(ElfError::NotElf));
        assert!(matches!(parse(b"\x7fELF\x02"), Err(ElfError::Malformed(_))));
        let mut e = sample();
        e[4] = 1;
        assert_eq!(parse(&e), Err(ElfError::NotElf64(1)));
        let mut e = sample();
        e[5] = 2;
        assert_eq!(parse(&e), Err(ElfError::NotLittleEndian(2)));
        let mut e = sample();
        set_u16(&mut e, 18, 3);
        assert_eq!(parse(&e), Err(ElfError::NotX86_64(3)));
        let mut e = sample();
        set_u16(&mut e, 16, 3);
        assert_eq!(parse(&e), Err(ElfError::NotExecutable(3)));
        let mut e = sample();
        set_u16(&mut e, 54, 32);
        assert!(matches!(parse(&e), Err(ElfError::Malformed(m)) if m.contains("e_phentsize")));
        let mut e = sample();
        set_u64(&mut e, 32, u64::MAX - 8);
        assert!(
            matches!(parse(&e), Err(ElfError::Malformed(m)) if m.contains("program header table"))
        );
        let mut e = sample();
        set_u16(&mut e, 56, 0);
        assert_eq!(parse(&e), Err(ElfError::NoLoadableSegments));
    }

    #[test]
    fn rejects_segment_problems() {
        // filesz > memsz
        let mut e = sample();
        set_u64(&mut e, 64 + 40, 4);
        assert!(
            matches!(parse(&e), Err(ElfError::Malformed(m)) if m.contains("exceeds memory size"))
        );
        // contents beyond the file
        let mut e = sample();
        set_u64(&mut e, 64 + 8, 0xffff_ffff_ffff_fff0);
        assert!(matches!(parse(&e), Err(ElfError::Malformed(m)) if m.contains("past the end")));
        // address overflow
        let mut e = sample();
        set_u64(&mut e, 64 + 16, u64::MAX - 4);
        set_u64(&mut e, 64 + 24, u64::MAX - 4);
        assert!(matches!(parse(&e), Err(ElfError::Malformed(m)) if m.contains("overflows")));
        // VMA != LMA
        let mut e = sample();
        set_u64(&mut e, 64 + 16, 0xffff_8000_0000_0000);
        assert!(matches!(
            parse(&e),
            Err(ElfError::NotIdentity { index: 0, .. })
        ));
        // overlap
        let e = build(
            &[
                (0x20_0000, &[0xf4], 0x2000, PF_X),
                (0x20_1000, &[], 0x1000, PF_W),
            ],
            0x20_0000,
        );
        assert_eq!(parse(&e), Err(ElfError::Overlap { a: 0, b: 1 }));
        // entry in a non-executable segment
        let e = build(&[(0x20_0000, &[0xf4], 0x1000, PF_R | PF_W)], 0x20_0000);
        assert_eq!(parse(&e), Err(ElfError::EntryOutsideImage(0x20_0000)));
        // interpreter
        let mut e = sample();
        e[64..68].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert_eq!(parse(&e), Err(ElfError::Dynamic("PT_INTERP")));
        let mut e = sample();
        e[64 + PHDR_SIZE..64 + PHDR_SIZE + 4].copy_from_slice(&PT_TLS.to_le_bytes());
        assert_eq!(parse(&e), Err(ElfError::Tls));
        // only empty segments
        let e = build(&[(0x20_0000, &[], 0, PF_X)], 0x20_0000);
        assert_eq!(parse(&e), Err(ElfError::NoLoadableSegments));
    }
}
