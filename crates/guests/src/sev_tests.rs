//! Host tests of the definitions the SEV-ES guests share with the host (`sevabi`,
//! `fpu_pattern`) and of the #VC handler's instruction decoder (`vcdecode`, against
//! iced-x86).

use crate::fpu_pattern::{self, Field, COMPARED, FXSAVE_SIZE};
use crate::sevabi::{self, checkpoint, cr_steps, msr_protocol, term};
use crate::vcdecode::{self, DecodeError, Insn, IoPort, MmioOp, Reg};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// fpu_pattern

#[test]
fn fpu_pattern_image_has_the_documented_layout() {
    let img = fpu_pattern::fxsave_image();
    assert_eq!(img.len(), FXSAVE_SIZE);
    assert_eq!(u16::from_le_bytes([img[0], img[1]]), fpu_pattern::FCW);
    assert_eq!(u16::from_le_bytes([img[2], img[3]]), fpu_pattern::FSW);
    assert_eq!(img[4], fpu_pattern::FTW);
    assert_eq!(
        u32::from_le_bytes(img[24..28].try_into().unwrap()),
        fpu_pattern::MXCSR
    );
    for i in 0..8 {
        assert_eq!(&img[32 + 16 * i..42 + 16 * i], &fpu_pattern::st(i));
        assert_eq!(&img[42 + 16 * i..48 + 16 * i], &[0; 6], "reserved ST bytes");
    }
    for i in 0..16 {
        assert_eq!(&img[160 + 16 * i..176 + 16 * i], &fpu_pattern::xmm(i));
    }
    // FOP/FIP/FDP and everything after XMM15 are zero.
    assert!(img[6..24].iter().all(|&b| b == 0));
    assert!(img[416..].iter().all(|&b| b == 0));
    // Usable as a compile-time constant.
    const IMG: [u8; FXSAVE_SIZE] = fpu_pattern::fxsave_image();
    assert_eq!(IMG, img);
}

#[test]
fn fpu_pattern_differs_from_the_reset_state_everywhere_it_is_compared() {
    // FNINIT/reset: FCW 0x37f, FSW 0, FTW 0, MXCSR 0x1f80, registers zero.
    assert_ne!(fpu_pattern::FCW, 0x037F);
    assert_ne!(fpu_pattern::MXCSR, 0x1F80);
    assert_ne!(fpu_pattern::FTW, 0);
    // MXCSR: reserved bits (above 15) clear, all exceptions masked (no #XM possible).
    assert_eq!(fpu_pattern::MXCSR >> 16, 0);
    assert_eq!(fpu_pattern::MXCSR & 0x1F80, 0x1F80);
    // FCW: all x87 exceptions masked.
    assert_eq!(fpu_pattern::FCW & 0x3F, 0x3F);
    let mut all = Vec::new();
    for i in 0..16 {
        all.extend_from_slice(&fpu_pattern::xmm(i));
    }
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 256, "XMM bytes are all distinct");
    for i in 0..8 {
        let st = fpu_pattern::st(i);
        assert_ne!(st, [0; 10]);
        assert_eq!(
            st[7] & 0x80,
            0x80,
            "ST{i}: explicit integer bit (a normal number)"
        );
        let exp = u16::from_le_bytes([st[8], st[9]]) & 0x7FFF;
        assert_eq!(exp, 0x3FFF + i as u16);
    }
    // The default FPU state mismatches in every compared field.
    let mut reset = [0u8; FXSAVE_SIZE];
    reset[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
    reset[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
    let mut fields = Vec::new();
    let bad = fpu_pattern::compare(&reset, |m| fields.push(m.field));
    // FSW is 0 in both.
    assert_eq!(bad, COMPARED.len() - 1);
    assert!(!fields.contains(&Field::Fsw));
}

#[test]
fn fpu_pattern_compare_finds_each_changed_byte() {
    let img = fpu_pattern::fxsave_image();
    assert_eq!(fpu_pattern::compare(&img, |_| panic!("identical")), 0);
    for &(field, off, len) in COMPARED.iter() {
        for k in off..off + len {
            let mut bad = img;
            bad[k] ^= 0x40;
            let mut seen = Vec::new();
            assert_eq!(fpu_pattern::compare(&bad, |m| seen.push(m)), 1);
            assert_eq!(seen[0].field, field);
            assert_eq!(seen[0].offset, k);
            assert_eq!(seen[0].expected, img[k]);
            assert_eq!(seen[0].got, img[k] ^ 0x40);
        }
    }
    // Bytes outside the compared ranges do not matter (FOP, FIP, MXCSR_MASK, reserved).
    let mut other = img;
    for k in [6, 8, 16, 28, 29, 42, 47, 416, 511] {
        other[k] ^= 0xFF;
    }
    assert_eq!(fpu_pattern::compare(&other, |_| panic!("not compared")), 0);
    // A short image mismatches rather than panicking.
    assert!(fpu_pattern::compare(&img[..100], |_| {}) > 0);
}

#[test]
fn fpu_pattern_compared_ranges_are_disjoint_and_named() {
    assert_eq!(COMPARED.len(), 4 + 8 + 16);
    let mut covered = [false; FXSAVE_SIZE];
    for &(field, off, len) in COMPARED.iter() {
        for c in &mut covered[off..off + len] {
            assert!(!*c, "{field:?} overlaps");
            *c = true;
        }
        assert!(!field.name().is_empty());
        assert_eq!(
            field.index().is_some(),
            matches!(field, Field::St(_) | Field::Xmm(_))
        );
    }
    assert_eq!(
        covered.iter().filter(|&&c| c).count(),
        2 + 2 + 1 + 4 + 80 + 256
    );
}

// ---------------------------------------------------------------------------------------
// sevabi

#[test]
fn msr_protocol_encodings() {
    assert_eq!(msr_protocol::term_request(0, 0), 0x100);
    assert_eq!(msr_protocol::term_request(1, 8), 0x0008_1100);
    assert_eq!(msr_protocol::term_request(0x1F, 0xFF), 0x00FF_F100);
    assert_eq!(
        msr_protocol::cpuid_request(0x8000_001F, 1),
        0x8000_001F_4000_0004
    );
    assert_eq!(
        msr_protocol::cpuid_response(0x1234_5678_4000_0005, 1),
        Some(0x1234_5678)
    );
    assert_eq!(msr_protocol::cpuid_response(0x1234_5678_4000_0005, 2), None);
    assert_eq!(msr_protocol::cpuid_response(0x1234_5678_4000_0004, 1), None);
    // SEV_INFO: max 2, min 1, C-bit 47.
    let resp = (2u64 << 48) | (1 << 32) | (47 << 24) | 1;
    let info = msr_protocol::sev_info(resp).unwrap();
    assert_eq!((info.max_version, info.min_version, info.c_bit), (2, 1, 47));
    assert_eq!(msr_protocol::sev_info(resp | 2), None);
    assert_eq!(msr_protocol::negotiate(info), Some(2));
    let with = |min, max| msr_protocol::SevInfo {
        max_version: max,
        min_version: min,
        c_bit: 47,
    };
    assert_eq!(msr_protocol::negotiate(with(1, 1)), Some(1));
    assert_eq!(msr_protocol::negotiate(with(1, 5)), Some(2));
    assert_eq!(msr_protocol::negotiate(with(2, 5)), Some(2));
    assert_eq!(msr_protocol::negotiate(with(3, 5)), None);
    assert_eq!(msr_protocol::negotiate(with(0, 0)), None);
    assert_eq!(msr_protocol::negotiate(with(2, 1)), None);
}

#[test]
fn ioio_exit_info_and_ghcb_layout() {
    use sevabi::ioio::exit_info1;
    // OUT DX, AL to COM1: port 0x3f8, 8-bit, 64-bit addresses.
    assert_eq!(exit_info1(0x3F8, 1, false, false, false, 64), 0x03F8_0210);
    // REP INSD from port 0x1f0 with 32-bit addresses.
    assert_eq!(exit_info1(0x1F0, 4, true, true, true, 32), 0x01F0_014D);
    assert_eq!(exit_info1(0xF6, 2, false, false, false, 16), 0x00F6_00A0);
    use sevabi::ghcb_layout as l;
    assert_eq!(l::valid_bit(l::SW_EXITCODE), 0x72);
    assert_eq!(l::valid_bit(l::CPL), 25);
    assert_eq!(l::SHARED_BUFFER_SIZE, 2032);
    for off in [
        l::XSS,
        l::DR7,
        l::RAX,
        l::RCX,
        l::RDX,
        l::RBX,
        l::RSI,
        l::SW_EXITCODE,
        l::SW_EXITINFO1,
        l::SW_EXITINFO2,
        l::SW_SCRATCH,
        l::XCR0,
    ] {
        assert_eq!(off % 8, 0);
        assert!(off + 8 <= l::VALID_BITMAP);
    }
}

#[test]
fn termination_reasons_are_distinct_and_described() {
    let codes = [
        term::BAD_SEV_INFO,
        term::BAD_CPUID_RESPONSE,
        term::C_BIT_MISMATCH,
        term::NOT_SEV_ES,
        term::GHCB_SETUP,
        term::EARLY_VC_UNSUPPORTED,
        term::VC_UNSUPPORTED_EXIT,
        term::VC_DECODE,
        term::GHCB_MALFORMED,
        term::GHCB_BAD_RESPONSE,
        term::GHCB_BUSY,
        term::VC_NESTING,
        term::MMIO_UNSUPPORTED,
        term::GUEST_REQUEST,
    ];
    let mut seen = std::collections::HashSet::new();
    for c in codes {
        assert!(seen.insert(c), "code {c} used twice");
        assert_ne!(term::describe(term::SET_ESVM, c), "unknown reason");
    }
    assert_eq!(
        term::describe(term::SET_GENERAL, term::GENERAL),
        "general termination request"
    );
    assert_ne!(
        term::describe(term::SET_GENERAL, term::PROTOCOL_UNSUPPORTED),
        "unknown reason"
    );
    assert_eq!(term::describe(2, 0), "unknown reason");
    // VC_DECODE is the documented code of the sev-mmio unsupported-form test.
    assert_eq!((term::SET_ESVM, term::VC_DECODE), (1, 8));
    assert_eq!(term::GHCB_BUSY, 11);
}

#[test]
fn checkpoints_round_trip() {
    assert_eq!(checkpoint::PORT, 0xF6);
    for n in 0..=cr_steps::STEPS.len() as u32 {
        let v = checkpoint::cr_step(n);
        assert_eq!(
            checkpoint::decode(v),
            Some(checkpoint::Checkpoint::CrStep(n))
        );
    }
    assert_eq!(
        checkpoint::decode(checkpoint::PF_READY),
        Some(checkpoint::Checkpoint::PfReady)
    );
    assert_eq!(checkpoint::decode(0), None);
    assert_eq!(checkpoint::decode(0x1234_0001), None);
    // Neither the debug-exit nor the benchmark-marker port.
    use crate::bootinfo::layout;
    assert_ne!(checkpoint::PORT, layout::DEBUG_EXIT_PORT);
    assert_ne!(checkpoint::PORT, layout::BENCH_MARKER_PORT);
}

#[test]
fn cr_steps_touch_one_register_each_and_end_where_they_started() {
    use cr_steps::{CrReg, CrState};
    // The boot protocol's values (docs/boot-protocol.md).
    let boot = CrState {
        cr0: 0x8001_0033,
        cr4: 0x620,
        cr8: 0,
        efer: 0xD01,
    };
    let mut prev = boot;
    let mut touched = Vec::new();
    for n in 1..=cr_steps::STEPS.len() {
        let s = cr_steps::expected(boot, n);
        let step = cr_steps::STEPS[n - 1];
        assert_eq!(s, cr_steps::apply(prev, step));
        let changed: Vec<CrReg> = [
            (CrReg::Cr0, s.cr0 != prev.cr0),
            (CrReg::Cr4, s.cr4 != prev.cr4),
            (CrReg::Cr8, s.cr8 != prev.cr8),
            (CrReg::Efer, s.efer != prev.efer),
        ]
        .into_iter()
        .filter_map(|(r, c)| c.then_some(r))
        .collect();
        assert_eq!(
            changed,
            vec![step.reg],
            "step {n} changes exactly its register"
        );
        // Protected mode, paging, PAE, long mode and NX stay on; CR8 is a valid TPR.
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001, "step {n}");
        assert_eq!(s.cr4 & 0x20, 0x20, "step {n}");
        assert_eq!(s.efer & 0xD00, 0xD00, "step {n}");
        assert!(s.cr8 <= 15);
        touched.push(step.reg);
        prev = s;
    }
    assert_eq!(prev, boot, "every register returns to its boot value");
    for r in [CrReg::Cr0, CrReg::Cr4, CrReg::Cr8, CrReg::Efer] {
        assert!(touched.contains(&r));
    }
    assert_eq!(cr_steps::expected(boot, 0), boot);
    assert_eq!(cr_steps::expected(boot, 1).cr0, 0x8005_0033);
    assert_eq!(cr_steps::expected(boot, 7).cr8, 5);
    assert_eq!(cr_steps::expected(boot, 10).efer, 0xD00);
    assert_eq!(cr_steps::expected(boot, 99), boot);
}

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
    use sevabi::exit_code as ec;
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
