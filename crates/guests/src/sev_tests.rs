//! Host tests of the #VC handler's instruction decoder (`vcdecode`, against iced-x86). The
//! tests of the definitions the SEV-ES guests share with the host are in `esvm-abi`.

use crate::vcdecode::{self, DecodeError, Insn, IoPort, MmioOp, Reg};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// vcdecode against iced-x86

const IP: u64 = 0x0040_1000;

fn iced(bytes: &[u8]) -> Instruction {
    let mut d = Decoder::with_ip(64, bytes, IP, DecoderOptions::NONE);
    d.decode()
}

/// (number, high8, width) of an iced general-purpose register.
fn reg_of(r: Register) -> (u8, bool, u8) {
    let high8 = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    let num = r.full_register() as u32 - Register::RAX as u32;
    (num as u8, high8, r.size() as u8)
}

/// A register file where every register has a distinct value.
fn gpr_value(n: u8) -> u64 {
    0x1111_0000_0000_1000u64.wrapping_mul(u64::from(n) + 1) ^ 0x0123_4567_89AB_CDEF
}

fn iced_reg_value(r: Register) -> Option<u64> {
    if r.is_segment_register() {
        return Some(0);
    }
    let (num, high8, size) = reg_of(r);
    let full = gpr_value(num);
    Some(match (high8, size) {
        (true, _) => (full >> 8) & 0xFF,
        (_, 1) => full & 0xFF,
        (_, 2) => full & 0xFFFF,
        (_, 4) => full & 0xFFFF_FFFF,
        _ => full,
    })
}

/// Checks a successful decode of `bytes` against iced-x86.
fn agrees_with_iced(bytes: &[u8]) -> Result<(), String> {
    let d = vcdecode::decode(bytes).map_err(|e| format!("{e:?}"))?;
    let i = iced(bytes);
    if i.is_invalid() {
        return Err(format!("iced: invalid, ours: {d:?}"));
    }
    if i.len() != d.len {
        return Err(format!("length {} vs iced {} ({i})", d.len, i.len()));
    }
    let m = i.mnemonic();
    let ok = match d.insn {
        Insn::Cpuid => m == Mnemonic::Cpuid,
        Insn::Rdmsr => m == Mnemonic::Rdmsr,
        Insn::Wrmsr => m == Mnemonic::Wrmsr,
        Insn::Rdtsc => m == Mnemonic::Rdtsc,
        Insn::Rdtscp => m == Mnemonic::Rdtscp,
        Insn::Vmmcall => m == Mnemonic::Vmmcall,
        Insn::Wbinvd => m == Mnemonic::Wbinvd,
        Insn::Invd => m == Mnemonic::Invd,
        Insn::Monitor => m == Mnemonic::Monitor,
        Insn::Mwait => m == Mnemonic::Mwait,
        Insn::MovFromDr7 { gpr } => {
            m == Mnemonic::Mov
                && i.op1_register() == Register::DR7
                && reg_of(i.op0_register()) == (gpr, false, 8)
        }
        Insn::MovToDr7 { gpr } => {
            m == Mnemonic::Mov
                && i.op0_register() == Register::DR7
                && reg_of(i.op1_register()) == (gpr, false, 8)
        }
        Insn::Io(io) => {
            let mnemonic_ok = match (io.string, io.is_in, io.size) {
                (false, true, _) => m == Mnemonic::In,
                (false, false, _) => m == Mnemonic::Out,
                (true, true, 1) => m == Mnemonic::Insb,
                (true, true, 2) => m == Mnemonic::Insw,
                (true, true, _) => m == Mnemonic::Insd,
                (true, false, 1) => m == Mnemonic::Outsb,
                (true, false, 2) => m == Mnemonic::Outsw,
                (true, false, _) => m == Mnemonic::Outsd,
            };
            let (data_op, port_op) = if io.is_in { (0, 1) } else { (1, 0) };
            let operands_ok = if io.string {
                let mem_op = if io.is_in { 0 } else { 1 };
                let want = match (io.is_in, io.addr32) {
                    (true, false) => OpKind::MemoryESRDI,
                    (true, true) => OpKind::MemoryESEDI,
                    (false, false) => OpKind::MemorySegRSI,
                    (false, true) => OpKind::MemorySegESI,
                };
                i.op_kind(mem_op) == want && io.rep == (i.has_rep_prefix() || i.has_repne_prefix())
            } else {
                let port_ok = match io.port {
                    IoPort::Imm(p) => {
                        i.op_kind(port_op) == OpKind::Immediate8 && i.immediate8() == p
                    }
                    IoPort::Dx => i.op_register(port_op) == Register::DX,
                };
                port_ok && reg_of(i.op_register(data_op)) == (0, false, io.size)
            };
            mnemonic_ok && operands_ok
        }
        Insn::Mmio(mm) => {
            let (mem_op, other) = if mm.is_write() { (0, 1) } else { (1, 0) };
            let opcode = bytes.iter().find(|&&b| {
                !matches!(
                    b,
                    0x66 | 0x67
                        | 0xF0
                        | 0xF2
                        | 0xF3
                        | 0x26
                        | 0x2E
                        | 0x36
                        | 0x3E
                        | 0x64
                        | 0x65
                        | 0x40..=0x4F
                )
            });
            let want_m = if opcode == Some(&0x0F) {
                Mnemonic::Movzx
            } else {
                Mnemonic::Mov
            };
            let mem_ok = i.op_kind(mem_op) == OpKind::Memory
                && i.memory_size().size() == mm.size as usize
                && {
                    let next = IP + d.len as u64;
                    let ours = mm.mem.effective_address(gpr_value, next);
                    let theirs = i.virtual_address(mem_op, 0, |r, _, _| iced_reg_value(r));
                    theirs == Some(ours)
                };
            let other_ok = match mm.op {
                MmioOp::StoreReg(r) => reg_of(i.op_register(other)) == (r.num, r.high8, mm.size),
                MmioOp::Load { dst, dst_size } => {
                    reg_of(i.op_register(other)) == (dst.num, dst.high8, dst_size)
                }
                MmioOp::StoreImm(v) => {
                    let mask = if mm.size == 8 {
                        u64::MAX
                    } else {
                        (1u64 << (8 * mm.size)) - 1
                    };
                    i.immediate(other) & mask == v & mask
                        && (mm.size != 8 || i.immediate(other) == v)
                }
            };
            m == want_m && mem_ok && other_ok
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("ours {d:?} vs iced {i} ({m:?})"))
    }
}

#[test]
fn decodes_the_fixed_forms() {
    let cases: &[(&[u8], Insn, usize)] = &[
        (&[0x0F, 0xA2], Insn::Cpuid, 2),
        (&[0x0F, 0x32], Insn::Rdmsr, 2),
        (&[0x0F, 0x30], Insn::Wrmsr, 2),
        (&[0x0F, 0x31], Insn::Rdtsc, 2),
        (&[0x0F, 0x01, 0xF9], Insn::Rdtscp, 3),
        (&[0x0F, 0x01, 0xD9], Insn::Vmmcall, 3),
        (&[0x0F, 0x09], Insn::Wbinvd, 2),
        (&[0x0F, 0x08], Insn::Invd, 2),
        (&[0x0F, 0x01, 0xC8], Insn::Monitor, 3),
        (&[0x0F, 0x01, 0xC9], Insn::Mwait, 3),
        (&[0x0F, 0x21, 0xF8], Insn::MovFromDr7 { gpr: 0 }, 3),
        (&[0x41, 0x0F, 0x21, 0xF9], Insn::MovFromDr7 { gpr: 9 }, 4),
        (&[0x0F, 0x23, 0xFB], Insn::MovToDr7 { gpr: 3 }, 3),
    ];
    for (bytes, insn, len) in cases {
        let d = vcdecode::decode(bytes).unwrap();
        assert_eq!((d.insn, d.len), (*insn, *len), "{bytes:02x?}");
        agrees_with_iced(bytes).unwrap();
        // Trailing bytes are not part of the instruction.
        let mut more = bytes.to_vec();
        more.extend_from_slice(&[0x90, 0xCC]);
        assert_eq!(vcdecode::decode(&more).unwrap().len, *len);
    }
    // VMGEXIT (F3 0F 01 D9) never raises #VC and is not VMMCALL.
    assert!(vcdecode::decode(&[0xF3, 0x0F, 0x01, 0xD9]).is_err());
    // F2/F3 select other instructions in the 0F map; 0x66 on the 0F 01 group.
    for b in [
        &[0xF2, 0x0F, 0x01, 0xC8][..],
        &[0xF2, 0x0F, 0xA2],
        &[0x66, 0x0F, 0x01, 0xD9],
    ] {
        assert_eq!(
            vcdecode::decode(b),
            Err(DecodeError::UnsupportedPrefix),
            "{b:02x?}"
        );
    }
    // Other debug registers, other 0F 01 forms, LOCK.
    assert!(vcdecode::decode(&[0x0F, 0x21, 0xC0]).is_err());
    assert!(vcdecode::decode(&[0x0F, 0x01, 0xD8]).is_err());
    assert_eq!(
        vcdecode::decode(&[0xF0, 0x0F, 0xA2]),
        Err(DecodeError::UnsupportedPrefix)
    );
    assert_eq!(vcdecode::decode(&[0x0F]), Err(DecodeError::Truncated));
    assert_eq!(vcdecode::decode(&[]), Err(DecodeError::Truncated));
    assert_eq!(
        vcdecode::decode(&[0x66; 16]),
        Err(DecodeError::TooLong),
        "prefixes beyond 15 bytes"
    );
}

#[test]
fn decodes_port_io() {
    let io = |b: &[u8]| match vcdecode::decode(b).unwrap().insn {
        Insn::Io(io) => io,
        other => panic!("{b:02x?}: {other:?}"),
    };
    let cases: &[&[u8]] = &[
        &[0xE4, 0x71],
        &[0xE5, 0x71],
        &[0x66, 0xE5, 0x71],
        &[0xE6, 0xF4],
        &[0xE7, 0xF6],
        &[0x66, 0xE7, 0xF6],
        &[0xEC],
        &[0xED],
        &[0x66, 0xED],
        &[0xEE],
        &[0xEF],
        &[0x48, 0xEF],
        &[0x6C],
        &[0xF3, 0x6C],
        &[0xF3, 0x6D],
        &[0xF3, 0x66, 0x6D],
        &[0xF3, 0x6E],
        &[0xF3, 0x67, 0x6F],
        &[0xF2, 0x6E],
        &[0x66, 0x6F],
    ];
    for b in cases {
        agrees_with_iced(b).unwrap_or_else(|e| panic!("{b:02x?}: {e}"));
    }
    let a = io(&[0xE6, 0xF4]);
    assert!(!a.is_in && !a.string && a.size == 1 && a.port == IoPort::Imm(0xF4));
    let a = io(&[0x66, 0xED]);
    assert!(a.is_in && a.size == 2 && a.port == IoPort::Dx);
    let a = io(&[0x48, 0xEF]);
    assert_eq!(a.size, 4, "REX.W does not make port I/O 64-bit");
    let a = io(&[0x66, 0x48, 0xE5, 0x00]);
    assert_eq!(a.size, 4, "REX.W wins over 0x66");
    agrees_with_iced(&[0x66, 0x48, 0xE5, 0x00]).unwrap();
    let a = io(&[0xF3, 0x67, 0x6F]);
    assert!(a.string && a.rep && a.addr32 && !a.is_in && a.size == 4);
    // FS/GS on OUTS changes the source segment: refused.
    assert_eq!(
        vcdecode::decode(&[0x64, 0xF3, 0x6E]),
        Err(DecodeError::UnsupportedPrefix)
    );
}

#[test]
fn decodes_mmio_moves() {
    let cases: &[&[u8]] = &[
        &[0x89, 0x03],                                     // mov [rbx], eax
        &[0x48, 0x89, 0x43, 0x08],                         // mov [rbx+8], rax
        &[0x66, 0x89, 0x43, 0x10],                         // mov [rbx+16], ax
        &[0x88, 0x63, 0x13],                               // mov [rbx+19], ah
        &[0x40, 0x88, 0x63, 0x13],                         // mov [rbx+19], spl
        &[0x8B, 0x0B],                                     // mov ecx, [rbx]
        &[0x8A, 0x6F, 0x13],                               // mov ch, [rdi+19]
        &[0x44, 0x8A, 0x6F, 0x13],                         // mov r13b, [rdi+19]
        &[0xC7, 0x43, 0x18, 0xEF, 0xBE, 0xAD, 0xDE],       // mov dword [rbx+24], imm32
        &[0x48, 0xC7, 0x43, 0x20, 0xFE, 0xFF, 0xFF, 0xFF], // mov qword [rbx+32], -2
        &[0x66, 0xC7, 0x43, 0x20, 0x34, 0x12],             // mov word [rbx+32], 0x1234
        &[0xC6, 0x43, 0x28, 0x7E],                         // mov byte [rbx+40], 0x7e
        &[0x0F, 0xB6, 0x43, 0x28],                         // movzx eax, byte [rbx+40]
        &[0x0F, 0xB7, 0x43, 0x18],                         // movzx eax, word [rbx+24]
        &[0x48, 0x0F, 0xB6, 0x43, 0x12],                   // movzx rax, byte [rbx+18]
        &[0x66, 0x0F, 0xB6, 0x43, 0x12],                   // movzx ax, byte [rbx+18]
        &[0x4F, 0x89, 0x64, 0xDA, 0xF8],                   // mov [r10+r11*8-8], r12
        &[0x46, 0x8B, 0x4C, 0x9A, 0x14],                   // mov r9d, [rdx+r11*4+20]
        &[0x8B, 0x05, 0x10, 0x00, 0x00, 0x00],             // mov eax, [rip+16]
        &[0x67, 0x8B, 0x05, 0x10, 0x00, 0x00, 0x00],       // mov eax, [eip+16]
        &[0x8B, 0x04, 0x25, 0x00, 0x00, 0xB0, 0xFE],       // mov eax, [0xfeb00000] (sign-extended)
        &[0x41, 0x8B, 0x45, 0x00],                         // mov eax, [r13+0]
        &[0x42, 0x8B, 0x04, 0x24], // mov eax, [rsp] (REX.X, index 12? no: 4|8)
        &[0x67, 0x8B, 0x44, 0x8B, 0x80], // mov eax, [ebx+ecx*4-128]
        &[0x2E, 0x8B, 0x03],       // cs: mov eax, [rbx]
        &[0x48, 0x66, 0x8B, 0x03], // REX before 66: REX dropped
    ];
    for b in cases {
        agrees_with_iced(b).unwrap_or_else(|e| panic!("{b:02x?}: {e}"));
    }
    let mm = |b: &[u8]| match vcdecode::decode(b).unwrap().insn {
        Insn::Mmio(m) => m,
        other => panic!("{b:02x?}: {other:?}"),
    };
    let m = mm(&[0x88, 0x63, 0x13]);
    assert_eq!(
        m.op,
        MmioOp::StoreReg(Reg {
            num: 0,
            high8: true
        })
    );
    let m = mm(&[0x48, 0xC7, 0x43, 0x20, 0xFE, 0xFF, 0xFF, 0xFF]);
    assert_eq!((m.size, m.op), (8, MmioOp::StoreImm(u64::MAX - 1)));
    let m = mm(&[0x48, 0x66, 0x8B, 0x03]);
    assert_eq!(m.size, 2, "a legacy prefix after REX cancels the REX");
    // Register operands, FS/GS, REP, LOCK, other C6/C7 forms, other opcodes.
    assert_eq!(
        vcdecode::decode(&[0x89, 0xC3]),
        Err(DecodeError::RegisterOperand)
    );
    for b in [
        &[0x64, 0x8B, 0x03][..],
        &[0x65, 0x89, 0x03],
        &[0xF3, 0x89, 0x03],
        &[0xF0, 0x89, 0x03],
    ] {
        assert_eq!(
            vcdecode::decode(b),
            Err(DecodeError::UnsupportedPrefix),
            "{b:02x?}"
        );
    }
    for b in [
        &[0xC7, 0x4B, 0x18, 0, 0, 0, 0][..],
        &[0x83, 0x03, 0x01],
        &[0x01, 0x03],
        &[0xA1, 0, 0, 0, 0, 0, 0, 0, 0],
        &[0x0F, 0xBE, 0x03],
    ] {
        assert_eq!(
            vcdecode::decode(b),
            Err(DecodeError::Unsupported),
            "{b:02x?}"
        );
    }
    // Truncated displacement / immediate.
    assert_eq!(
        vcdecode::decode(&[0x8B, 0x83, 0x00, 0x00]),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        vcdecode::decode(&[0xC7, 0x03, 0x00]),
        Err(DecodeError::Truncated)
    );
}

#[test]
fn exit_codes_match_instructions() {
    use esvm_abi::exit_code as ec;
    let pairs: &[(&[u8], u64)] = &[
        (&[0x0F, 0xA2], ec::CPUID),
        (&[0xEE], ec::IOIO),
        (&[0xF3, 0x6E], ec::IOIO),
        (&[0x0F, 0x32], ec::MSR),
        (&[0x0F, 0x30], ec::MSR),
        (&[0x0F, 0x01, 0xD9], ec::VMMCALL),
        (&[0x0F, 0x31], ec::RDTSC),
        (&[0x0F, 0x01, 0xF9], ec::RDTSCP),
        (&[0x0F, 0x09], ec::WBINVD),
        (&[0x0F, 0x08], ec::INVD),
        (&[0x0F, 0x01, 0xC8], ec::MONITOR),
        (&[0x0F, 0x01, 0xC9], ec::MWAIT),
        (&[0x0F, 0x21, 0xF8], ec::DR7_READ),
        (&[0x0F, 0x23, 0xF8], ec::DR7_WRITE),
        (&[0x89, 0x03], ec::NPF),
    ];
    let codes: Vec<u64> = pairs.iter().map(|p| p.1).collect();
    for (bytes, code) in pairs {
        let insn = vcdecode::decode(bytes).unwrap().insn;
        for c in &codes {
            assert_eq!(
                insn.matches_exit_code(*c),
                c == code,
                "{bytes:02x?} vs {c:#x}"
            );
        }
    }
}

#[test]
fn register_writes_follow_operand_size_rules() {
    let r = |num, high8| Reg { num, high8 };
    let old = 0x1122_3344_5566_7788u64;
    assert_eq!(r(0, false).write(old, 1, 0xAB), 0x1122_3344_5566_77AB);
    assert_eq!(r(0, true).write(old, 1, 0xAB), 0x1122_3344_5566_AB88);
    assert_eq!(r(0, false).write(old, 2, 0xABCD), 0x1122_3344_5566_ABCD);
    assert_eq!(
        r(0, false).write(old, 4, 0xFFFF_FFFF_ABCD),
        0x0000_0000_FFFF_ABCD
    );
    assert_eq!(r(0, false).write(old, 8, 7), 7);
    assert_eq!(r(0, true).read(old, 1), 0x77);
    assert_eq!(r(0, false).read(old, 1), 0x88);
    assert_eq!(r(0, false).read(old, 2), 0x7788);
    assert_eq!(r(0, false).read(old, 4), 0x5566_7788);
    assert_eq!(r(0, false).read(old, 8), old);
}

/// A random instruction built from the prefixes and opcodes the decoder cares about.
fn insn_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop::sample::select(vec![
        0x66u8, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65,
    ]);
    let opcode = prop::sample::select(vec![
        vec![0x88u8],
        vec![0x89],
        vec![0x8A],
        vec![0x8B],
        vec![0xC6],
        vec![0xC7],
        vec![0x0F, 0xB6],
        vec![0x0F, 0xB7],
        vec![0xE4],
        vec![0xE5],
        vec![0xE6],
        vec![0xE7],
        vec![0xEC],
        vec![0xED],
        vec![0xEE],
        vec![0xEF],
        vec![0x6C],
        vec![0x6D],
        vec![0x6E],
        vec![0x6F],
        vec![0x0F, 0xA2],
        vec![0x0F, 0x30],
        vec![0x0F, 0x31],
        vec![0x0F, 0x32],
        vec![0x0F, 0x01],
        vec![0x0F, 0x21],
        vec![0x0F, 0x23],
    ]);
    (
        prop::collection::vec(prefix, 0..3),
        prop::option::of(0x40u8..=0x4F),
        opcode,
        prop::collection::vec(any::<u8>(), 12),
    )
        .prop_map(|(prefixes, rex, opcode, tail)| {
            let mut v = prefixes;
            v.extend(rex);
            v.extend(opcode);
            v.extend(tail);
            v
        })
}

/// The legacy and REX prefixes in front of the opcode.
fn prefixes(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .position(|&b| {
            !matches!(
                b,
                0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x40
                    ..=0x4F
            )
        })
        .unwrap_or(bytes.len());
    &bytes[..n]
}

/// Whether iced decodes `i` as a form the decoder must support (compilers' encodings:
/// no LOCK, no FS/GS, no F2/F3 except REP on string I/O, no 0x66 on the 0F 01 group).
fn must_support(i: &Instruction, bytes: &[u8]) -> bool {
    if i.is_invalid() || i.has_lock_prefix() {
        return false;
    }
    let pre = prefixes(bytes);
    let fs_gs = pre.iter().any(|&b| b == 0x64 || b == 0x65);
    let f2_f3 = pre.iter().any(|&b| b == 0xF2 || b == 0xF3);
    let opsize = pre.contains(&0x66);
    let opcode = bytes.get(pre.len()).copied();
    match i.mnemonic() {
        Mnemonic::In | Mnemonic::Out => true,
        Mnemonic::Cpuid | Mnemonic::Rdmsr | Mnemonic::Wrmsr | Mnemonic::Rdtsc => !f2_f3,
        Mnemonic::Rdtscp | Mnemonic::Monitor | Mnemonic::Mwait | Mnemonic::Vmmcall => {
            !f2_f3 && !opsize
        }
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => !fs_gs,
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => !fs_gs,
        Mnemonic::Mov => {
            if i.op0_register() == Register::DR7 || i.op1_register() == Register::DR7 {
                return !f2_f3;
            }
            (i.op0_kind() == OpKind::Memory || i.op1_kind() == OpKind::Memory)
                && !fs_gs
                && !f2_f3
                && matches!(opcode, Some(0x88 | 0x89 | 0x8A | 0x8B | 0xC6 | 0xC7))
        }
        Mnemonic::Movzx => i.op1_kind() == OpKind::Memory && !fs_gs && !f2_f3,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// Whatever the decoder accepts, iced-x86 decodes identically (length, operation,
    /// operands, effective address); what iced decodes as a supported form, the decoder
    /// accepts.
    #[test]
    fn decoder_agrees_with_iced(bytes in insn_bytes()) {
        match vcdecode::decode(&bytes) {
            Ok(_) => {
                if let Err(e) = agrees_with_iced(&bytes) {
                    prop_assert!(false, "{:02x?}: {}", bytes, e);
                }
            }
            Err(e) => {
                let i = iced(&bytes);
                prop_assert!(
                    !must_support(&i, &bytes),
                    "{:02x?}: refused ({:?}) but iced decodes {} ", bytes, e, i
                );
            }
        }
    }
}
