//! Tests of the definitions the SEV-ES guests share with the host (the former host tests of
//! `guests/rt/src/sevabi.rs` and `fpu_pattern.rs`, moved here with them).

use crate::testing::fpu_pattern::{self, Field, COMPARED, FXSAVE_SIZE};
use crate::testing::{checkpoint, cr_steps};
use crate::{msr_protocol, term};

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
// msr_protocol, ghcb, term, testing

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
    use crate::ghcb::ioio::exit_info1;
    // OUT DX, AL to COM1: port 0x3f8, 8-bit, 64-bit addresses.
    assert_eq!(exit_info1(0x3F8, 1, false, false, false, 64), 0x03F8_0210);
    // REP INSD from port 0x1f0 with 32-bit addresses.
    assert_eq!(exit_info1(0x1F0, 4, true, true, true, 32), 0x01F0_014D);
    assert_eq!(exit_info1(0xF6, 2, false, false, false, 16), 0x00F6_00A0);
    // The names of the former `sevabi::ghcb_layout`.
    mod l {
        pub use crate::ghcb::save_area::*;
        pub use crate::ghcb::{valid_bit, SHARED_BUFFER_SIZE, VALID_BITMAP_OFFSET as VALID_BITMAP};
    }
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
    use crate::boot as layout;
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
