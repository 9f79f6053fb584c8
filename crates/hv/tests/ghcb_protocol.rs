//! Scenario tests of the GHCB page protocol: one test per event, plus the error paths.

mod ghcb_common;

use esvm_abi::ghcb::ioio;
use esvm_hv::ghcb::page::SHARED_BUFFER_OFFSET;
use esvm_hv::ghcb::{
    exit_code as ec, handle_ghcb, handle_vmgexit, GhcbConfig, GhcbErrorCode, GhcbField as F,
    GhcbOutcome, GhcbState, GuestResponse, IoSize, IoioInfo, VmgexitOutcome, VmmcallRegs,
    GHCB_PAGE_SIZE,
};
use ghcb_common::*;

type Page = [u8; GHCB_PAGE_SIZE];

fn run(page: &mut Page, mock: &mut Mock, st: &mut GhcbState) -> GhcbOutcome {
    handle_ghcb(page, GHCB_GPA, mock, st)
}

fn run_fresh(mut page: Page) -> (GhcbOutcome, Page, Mock) {
    let mut m = Mock::default();
    let mut st = GhcbState::default();
    let o = run(&mut page, &mut m, &mut st);
    (o, page, m)
}

/// Success with exactly `outputs` (plus SW_EXITINFO1/2) marked valid.
fn assert_success(o: &GhcbOutcome, page: &Page, outputs: &[F]) {
    assert_eq!(*o, GhcbOutcome::Resume(GuestResponse::Success), "{o:?}");
    assert_eq!(raw(page, F::SwExitInfo1), 0);
    let mut want: Vec<F> = outputs.to_vec();
    want.extend([F::SwExitInfo1, F::SwExitInfo2]);
    want.sort_by_key(|f| f.offset());
    assert_eq!(valid_fields(page), want, "valid bitmap after the response");
}

fn assert_malformed(o: &GhcbOutcome, page: &Page, code: GhcbErrorCode) {
    match o {
        GhcbOutcome::Resume(GuestResponse::Malformed { code: c, detail }) => {
            assert_eq!(*c, code, "{detail}");
            assert!(!detail.is_empty());
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
    assert_eq!(raw(page, F::SwExitInfo1), 2);
    assert_eq!(raw(page, F::SwExitInfo2), code as u64);
    assert_eq!(valid_fields(page), vec![F::SwExitInfo1, F::SwExitInfo2]);
}

fn assert_exception(o: &GhcbOutcome, page: &Page, vector: u8) {
    assert_eq!(*o, GhcbOutcome::Resume(GuestResponse::Exception { vector }));
    assert_eq!(raw(page, F::SwExitInfo1), 1);
    // EVENTINJ: valid (bit 31), type 3 = exception (bits 10:8), vector.
    assert_eq!(raw(page, F::SwExitInfo2), 0x8000_0300 | u64::from(vector));
    assert_eq!(valid_fields(page), vec![F::SwExitInfo1, F::SwExitInfo2]);
}

fn io_info(port: u16, size: IoSize, is_in: bool, string: bool) -> u64 {
    IoioInfo {
        port,
        size,
        is_in,
        string,
        rep: string,
        address_bits: Some(64),
    }
    .encode()
}

// ---- CPUID ----

#[test]
fn cpuid_returns_four_registers() {
    let p = with(
        with(request(ec::CPUID, 0, 0), F::Rax, 0x8000_0001),
        F::Rcx,
        7,
    );
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[F::Rax, F::Rcx, F::Rdx, F::Rbx]);
    assert_eq!(raw(&page, F::Rax), 0x8000_0001 ^ 0xA0A0);
    assert_eq!(raw(&page, F::Rbx), 7 ^ 0xB0B0);
    assert_eq!(raw(&page, F::Rcx), 0);
    assert_eq!(raw(&page, F::Rdx), 0xD0D0_0000 | 0x8000_0001);
    match &m.calls[..] {
        [Call::Cpuid(r)] => {
            assert_eq!((r.function, r.index, r.xcr0), (0x8000_0001, 7, None));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn cpuid_leaf_d_needs_and_passes_xcr0() {
    let p = with(with(request(ec::CPUID, 0, 0), F::Rax, 0xD), F::Rcx, 0);
    let (o, page, m) = run_fresh(p);
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());

    let p = with(
        with(with(request(ec::CPUID, 0, 0), F::Rax, 0xD), F::Rcx, 1),
        F::Xcr0,
        7,
    );
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[F::Rax, F::Rcx, F::Rdx, F::Rbx]);
    assert_eq!(raw(&page, F::Rcx), 7, "the mock echoes XCR0 in ECX");
    assert!(matches!(&m.calls[..], [Call::Cpuid(r)] if r.xcr0 == Some(7) && r.index == 1));
}

#[test]
fn cpuid_missing_rcx_is_missing_input() {
    let p = with(request(ec::CPUID, 0, 0), F::Rax, 1);
    let (o, page, m) = run_fresh(p);
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());
}

#[test]
fn a_refusing_vmm_gives_invalid_input() {
    let mut m = Mock {
        refuse_devices: true,
        ..Mock::default()
    };
    let mut page = with(with(request(ec::CPUID, 0, 0), F::Rax, 1), F::Rcx, 0);
    let o = run(&mut page, &mut m, &mut GhcbState::default());
    assert_malformed(&o, &page, GhcbErrorCode::InvalidInput);
    if let GhcbOutcome::Resume(GuestResponse::Malformed { detail, .. }) = o {
        assert!(detail.contains("device unavailable"), "{detail}");
    }
}

// ---- IOIO ----

#[test]
fn out_uses_the_low_bytes_of_rax() {
    let p = with(
        request(ec::IOIO, io_info(0x3F8, IoSize::Byte, false, false), 0),
        F::Rax,
        0xFFFF_1234,
    );
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[]);
    assert_eq!(m.calls, vec![Call::IoOut(0x3F8, IoSize::Byte, 0x34)]);

    let p = with(
        request(ec::IOIO, io_info(0xCF8, IoSize::Dword, false, false), 0),
        F::Rax,
        0xAAAA_BBBB_8000_0010,
    );
    let (o, _, m) = run_fresh(p);
    assert_eq!(o, GhcbOutcome::Resume(GuestResponse::Success));
    assert_eq!(
        m.calls,
        vec![Call::IoOut(0xCF8, IoSize::Dword, 0x8000_0010)]
    );
}

#[test]
fn out_without_rax_is_missing_input() {
    let p = request(ec::IOIO, io_info(0x80, IoSize::Byte, false, false), 0);
    let (o, page, m) = run_fresh(p);
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());
}

#[test]
fn in_returns_a_masked_value_in_rax() {
    for size in [IoSize::Byte, IoSize::Word, IoSize::Dword] {
        let p = request(ec::IOIO, io_info(0x71, size, true, false), 0);
        let (o, page, m) = run_fresh(p);
        assert_success(&o, &page, &[F::Rax]);
        assert_eq!(m.calls, vec![Call::IoIn(0x71, size)]);
        assert_eq!(
            raw(&page, F::Rax),
            u64::from(Mock::io_value(0x71, 1) & size.mask())
        );
    }
}

#[test]
fn ioio_with_bad_size_bits_is_invalid_input() {
    for info1 in [0x0071_0001u64, 0x0071_0031, 0x0071_0071, 0x0071_0000] {
        let (o, page, m) = run_fresh(with(request(ec::IOIO, info1, 0), F::Rax, 0));
        assert_malformed(&o, &page, GhcbErrorCode::InvalidInput);
        assert!(m.calls.is_empty());
    }
}

#[test]
fn outs_from_the_shared_buffer() {
    let scratch = GHCB_GPA + SHARED_BUFFER_OFFSET as u64 + 0x10;
    let mut p = with(
        request(ec::IOIO, io_info(0x1F0, IoSize::Word, false, true), 3),
        F::SwScratch,
        scratch,
    );
    p[0x810..0x816].copy_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x05, 0x06]);
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[]);
    assert_eq!(
        m.calls,
        vec![
            Call::IoOut(0x1F0, IoSize::Word, 0x0201),
            Call::IoOut(0x1F0, IoSize::Word, 0x0403),
            Call::IoOut(0x1F0, IoSize::Word, 0x0605),
        ]
    );
}

#[test]
fn ins_into_the_shared_buffer_writes_only_the_scratch() {
    let scratch = GHCB_GPA + 0x900;
    let mut p = with(
        request(ec::IOIO, io_info(0x60, IoSize::Byte, true, true), 4),
        F::SwScratch,
        scratch,
    );
    p[0x800..0xFF0].fill(0xEE);
    let before = p;
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[]);
    assert_eq!(m.calls, vec![Call::IoIn(0x60, IoSize::Byte); 4]);
    for i in 0..4u32 {
        assert_eq!(page[0x900 + i as usize], Mock::io_value(0x60, i + 1) as u8);
    }
    assert_eq!(page[0x800..0x900], before[0x800..0x900]);
    assert_eq!(page[0x904..0xFF0], before[0x904..0xFF0]);
}

#[test]
fn ins_and_outs_through_external_shared_memory() {
    let mut m = Mock::default();
    let mut st = GhcbState::default();
    let mut p = with(
        request(ec::IOIO, io_info(0x60, IoSize::Dword, true, true), 2),
        F::SwScratch,
        EXT_SCRATCH,
    );
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[]);
    assert_eq!(
        m.calls,
        vec![
            Call::ReadShared(EXT_SCRATCH, 8), // probe before any port is touched
            Call::IoIn(0x60, IoSize::Dword),
            Call::IoIn(0x60, IoSize::Dword),
            Call::WriteShared(EXT_SCRATCH, 8),
        ]
    );
    let got = m.shared_at(EXT_SCRATCH, 8).to_vec();
    assert_eq!(got[..4], Mock::io_value(0x60, 1).to_le_bytes());
    assert_eq!(got[4..], Mock::io_value(0x60, 2).to_le_bytes());

    let mut m = Mock::default();
    m.shared_at_mut(EXT_SCRATCH + 0x100, 2)
        .copy_from_slice(&[0xAB, 0xCD]);
    let mut p = with(
        request(ec::IOIO, io_info(0x61, IoSize::Byte, false, true), 2),
        F::SwScratch,
        EXT_SCRATCH + 0x100,
    );
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[]);
    assert_eq!(
        m.calls,
        vec![
            Call::ReadShared(EXT_SCRATCH + 0x100, 2),
            Call::IoOut(0x61, IoSize::Byte, 0xAB),
            Call::IoOut(0x61, IoSize::Byte, 0xCD),
        ]
    );
}

#[test]
fn string_io_error_paths() {
    let ins = io_info(0x60, IoSize::Word, true, true);
    // No scratch.
    let (o, page, m) = run_fresh(request(ec::IOIO, ins, 1));
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());

    let cases: &[(u64, u64, &str)] = &[
        (GHCB_GPA + 0x7FE, 1, "starts before the shared buffer"),
        (GHCB_GPA + 0xFEE, 2, "ends after the shared buffer"),
        (GHCB_GPA + 0x800, 1017, "longer than the shared buffer"),
        (GHCB_GPA - 2, 2, "overlaps the GHCB from below"),
        (PRIVATE_BASE, 4, "private memory"),
        (0x4000_0000, 4, "not guest RAM"),
        (0, 1, "zero"),
        (u64::MAX - 1, 2, "wraps"),
        (EXT_SCRATCH, u64::MAX, "huge count"),
        (EXT_SCRATCH, 1 << 63, "count overflowing count*size"),
        (EXT_SCRATCH, 32769, "count*size beyond the 64 KiB limit"),
    ];
    for &(scratch, count, why) in cases {
        let (o, page, m) = run_fresh(with(request(ec::IOIO, ins, count), F::SwScratch, scratch));
        match &o {
            GhcbOutcome::Resume(GuestResponse::Malformed { code, .. }) => {
                assert_eq!(*code, GhcbErrorCode::InvalidScratchArea, "{why}")
            }
            other => panic!("{why}: {other:?}"),
        }
        assert_eq!(raw(&page, F::SwExitInfo2), 3, "{why}");
        assert_eq!(m.device_calls(), 0, "{why}: no port touched");
    }
    // Count 0: nothing to do.
    let (o, page, m) = run_fresh(with(request(ec::IOIO, ins, 0), F::SwScratch, EXT_SCRATCH));
    assert_success(&o, &page, &[]);
    assert!(m.calls.is_empty());
    // Exactly the limit is accepted: 32768 words = 64 KiB.
    let (o, _, m) = run_fresh(with(
        request(ec::IOIO, ins, 32768),
        F::SwScratch,
        EXT_SCRATCH,
    ));
    assert_eq!(o, GhcbOutcome::Resume(GuestResponse::Success));
    assert_eq!(m.device_calls(), 32768);
}

#[test]
fn ioio_constants_match_the_layout() {
    assert_eq!(ioio::TYPE_IN, 1);
    assert_eq!(ioio::STRING, 4);
    assert_eq!(ioio::REP, 8);
    assert_eq!(io_info(0x3F8, IoSize::Byte, true, false), 0x03F8_0211);
}

// ---- MSR ----

#[test]
fn rdmsr_and_wrmsr() {
    let (o, page, m) = run_fresh(with(request(ec::MSR, 0, 0), F::Rcx, 0xC000_0080));
    assert_success(&o, &page, &[F::Rax, F::Rdx]);
    assert_eq!((raw(&page, F::Rax), raw(&page, F::Rdx)), (0xD01, 0));
    assert_eq!(m.calls, vec![Call::Rdmsr(0xC000_0080)]);

    let mut m = Mock::default();
    let mut p = with(
        with(
            with(request(ec::MSR, 1, 0), F::Rcx, 0xFFFF_FFFF_0000_001B),
            F::Rax,
            0xFFFF_FFFF_FEE0_0D00,
        ),
        F::Rdx,
        0x1_0000_0002,
    );
    let o = run(&mut p, &mut m, &mut GhcbState::default());
    assert_success(&o, &p, &[]);
    assert_eq!(m.calls, vec![Call::Wrmsr(0x1B, 0x2_FEE0_0D00)]);
    assert_eq!(m.msrs[&0x1B], 0x2_FEE0_0D00);
}

#[test]
fn msr_faults_and_errors() {
    // Unknown MSR -> #GP for the guest.
    let (o, page, _) = run_fresh(with(request(ec::MSR, 0, 0), F::Rcx, 0x1234));
    assert_exception(&o, &page, 13);
    let p = with(
        with(with(request(ec::MSR, 1, 0), F::Rcx, 0x1234), F::Rax, 0),
        F::Rdx,
        0,
    );
    let (o, page, _) = run_fresh(p);
    assert_exception(&o, &page, 13);
    // Write without RDX.
    let p = with(with(request(ec::MSR, 1, 0), F::Rcx, 0x1B), F::Rax, 0);
    let (o, page, m) = run_fresh(p);
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());
    // No RCX.
    let (o, page, _) = run_fresh(request(ec::MSR, 0, 0));
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    // SW_EXITINFO1 neither read nor write.
    let (o, page, _) = run_fresh(with(request(ec::MSR, 2, 0), F::Rcx, 0x1B));
    assert_malformed(&o, &page, GhcbErrorCode::InvalidInput);
}

// ---- MMIO ----

#[test]
fn mmio_read_into_the_shared_buffer() {
    let mut p = with(
        request(ec::MMIO_READ, 0xFED0_0000, 4),
        F::SwScratch,
        GHCB_GPA + 0x800,
    );
    p[0x800..0x808].fill(0xEE);
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[]);
    assert_eq!(m.calls, vec![Call::MmioRead(0xFED0_0000, 4)]);
    for i in 0..4u64 {
        assert_eq!(page[0x800 + i as usize], Mock::mmio_byte(0xFED0_0000 + i));
    }
    assert_eq!(page[0x804..0x808], [0xEE; 4], "nothing beyond the length");
}

#[test]
fn long_mmio_is_split_into_eight_byte_accesses() {
    let (o, _, m) = run_fresh(with(
        request(ec::MMIO_READ, 0xFED0_0004, 12),
        F::SwScratch,
        EXT_SCRATCH,
    ));
    assert_eq!(o, GhcbOutcome::Resume(GuestResponse::Success));
    assert_eq!(
        m.calls,
        vec![
            Call::ReadShared(EXT_SCRATCH, 12),
            Call::MmioRead(0xFED0_0004, 8),
            Call::MmioRead(0xFED0_000C, 4),
            Call::WriteShared(EXT_SCRATCH, 12),
        ]
    );
    assert_eq!(
        m.shared_at(EXT_SCRATCH, 12)[8],
        Mock::mmio_byte(0xFED0_000C)
    );
}

#[test]
fn mmio_write_from_scratch() {
    let mut p = with(
        request(ec::MMIO_WRITE, 0xFEE0_00B0, 4),
        F::SwScratch,
        GHCB_GPA + 0xA00,
    );
    p[0xA00..0xA04].copy_from_slice(&[1, 2, 3, 4]);
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[]);
    assert_eq!(
        m.calls,
        vec![Call::MmioWrite(0xFEE0_00B0, vec![1, 2, 3, 4])]
    );
}

#[test]
fn mmio_error_paths() {
    // No scratch.
    let (o, page, _) = run_fresh(request(ec::MMIO_READ, 0x1000, 4));
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    // Zero length.
    let (o, page, _) = run_fresh(with(
        request(ec::MMIO_READ, 0x1000, 0),
        F::SwScratch,
        EXT_SCRATCH,
    ));
    assert_malformed(&o, &page, GhcbErrorCode::InvalidInput);
    // GPA wraps.
    let (o, page, _) = run_fresh(with(
        request(ec::MMIO_WRITE, u64::MAX - 2, 8),
        F::SwScratch,
        EXT_SCRATCH,
    ));
    assert_malformed(&o, &page, GhcbErrorCode::InvalidInput);
    // Longer than the limit.
    let (o, page, m) = run_fresh(with(
        request(ec::MMIO_READ, 0x1000, 65537),
        F::SwScratch,
        EXT_SCRATCH,
    ));
    assert_malformed(&o, &page, GhcbErrorCode::InvalidScratchArea);
    assert_eq!(m.device_calls(), 0);
    // Scratch in private memory: no device access happens.
    let (o, page, m) = run_fresh(with(
        request(ec::MMIO_READ, 0x1000, 8),
        F::SwScratch,
        PRIVATE_BASE + 8,
    ));
    assert_malformed(&o, &page, GhcbErrorCode::InvalidScratchArea);
    assert_eq!(m.device_calls(), 0);
}

// ---- VMMCALL, TSC, DR7, misc ----

#[test]
fn vmmcall_passes_registers_and_returns_them() {
    let p = with(
        with(
            with(with(request(ec::VMMCALL, 0, 0), F::Rax, 12), F::Cpl, 0),
            F::Rbx,
            40,
        ),
        F::Rcx,
        2,
    );
    let (o, page, m) = run_fresh(p);
    assert_success(&o, &page, &[F::Rax, F::Rcx, F::Rdx, F::Rbx]);
    assert_eq!(raw(&page, F::Rax), 42);
    assert_eq!(raw(&page, F::Rbx), 0xBB);
    assert_eq!(
        m.calls,
        vec![Call::Vmmcall(VmmcallRegs {
            rax: 12,
            rbx: 40,
            rcx: 2,
            rdx: 0,
            rsi: 0,
            cpl: 0
        })]
    );
    // Missing CPL.
    let (o, page, m) = run_fresh(with(request(ec::VMMCALL, 0, 0), F::Rax, 12));
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());
    // The VMM answers #UD (the mock does for CPL 3).
    let p = with(with(request(ec::VMMCALL, 0, 0), F::Rax, 12), F::Cpl, 3);
    let (o, page, _) = run_fresh(p);
    assert_exception(&o, &page, 6);
}

#[test]
fn rdtsc_and_rdtscp() {
    let (o, page, m) = run_fresh(request(ec::RDTSC, 0, 0));
    assert_success(&o, &page, &[F::Rax, F::Rdx]);
    assert_eq!(raw(&page, F::Rax), 0x5566_7788);
    assert_eq!(raw(&page, F::Rdx), 0x1122_3344);
    assert_eq!(m.calls, vec![Call::Tsc]);
    let (o, page, m) = run_fresh(request(ec::RDTSCP, 0, 0));
    assert_success(&o, &page, &[F::Rax, F::Rcx, F::Rdx]);
    assert_eq!(raw(&page, F::Rcx), 3);
    assert_eq!(m.calls, vec![Call::Tsc, Call::TscAux]);
}

#[test]
fn dr7_is_tracked_per_vcpu() {
    let mut m = Mock::default();
    let mut st = GhcbState::default();
    let mut p = request(ec::DR7_READ, 0, 0);
    run(&mut p, &mut m, &mut st);
    assert_eq!(raw(&p, F::Rax), 0x400);
    let mut p = with(request(ec::DR7_WRITE, 0, 0), F::Rax, 0x455);
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[]);
    let mut p = request(ec::DR7_READ, 0, 0);
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[F::Rax]);
    assert_eq!(raw(&p, F::Rax), 0x455);
    assert_eq!(st.dr7, 0x455);
    let (o, page, _) = run_fresh(request(ec::DR7_WRITE, 0, 0));
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
}

#[test]
fn nops_and_rdpmc() {
    for code in [ec::INVD, ec::WBINVD] {
        let (o, page, m) = run_fresh(request(code, 0, 0));
        assert_success(&o, &page, &[]);
        assert!(m.calls.is_empty());
    }
    let p = with(
        with(with(request(ec::MONITOR, 0, 0), F::Rax, 1), F::Rcx, 0),
        F::Rdx,
        0,
    );
    assert_success(&run_fresh(p).0, &run_fresh(p).1, &[]);
    let (o, page, _) = run_fresh(with(request(ec::MONITOR, 0, 0), F::Rax, 1));
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    let p = with(with(request(ec::MWAIT, 0, 0), F::Rax, 1), F::Rcx, 0);
    assert_success(&run_fresh(p).0, &run_fresh(p).1, &[]);
    let (o, page, _) = run_fresh(with(request(ec::RDPMC, 0, 0), F::Rcx, 0));
    assert_exception(&o, &page, 13);
}

#[test]
fn ap_jump_table_set_and_get() {
    let mut m = Mock::default();
    let mut st = GhcbState::default();
    let mut p = request(ec::AP_JUMP_TABLE, 0, 0x9_F000);
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[]);
    assert_eq!(m.jump_table, 0x9_F000);
    let mut p = request(ec::AP_JUMP_TABLE, 1, 0);
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[]);
    assert_eq!(raw(&p, F::SwExitInfo2), 0x9_F000);
    assert_eq!(
        m.calls,
        vec![Call::SetJumpTable(0x9_F000), Call::GetJumpTable]
    );
    let mut p = request(ec::AP_JUMP_TABLE, 2, 0);
    let o = run(&mut p, &mut m, &mut st);
    assert_malformed(&o, &p, GhcbErrorCode::InvalidInput);
}

#[test]
fn hv_features_termination_unsupported_event_nmi_hlt() {
    let mut st = GhcbState::new(GhcbConfig {
        hv_features: 0x3,
        ..GhcbConfig::default()
    });
    let mut m = Mock::default();
    let mut p = request(ec::HV_FEATURES, 0, 0);
    let o = run(&mut p, &mut m, &mut st);
    assert_success(&o, &p, &[]);
    assert_eq!(raw(&p, F::SwExitInfo2), 0x3);

    // SW_EXITINFO1[3:0] reason set, [11:4] reason code.
    let (o, _, _) = run_fresh(request(ec::TERM_REQUEST, 0x0421, 0x77));
    assert_eq!(
        o,
        GhcbOutcome::Terminate {
            reason_set: 1,
            reason_code: 0x42,
            info: 0x77
        }
    );
    let (o, _, _) = run_fresh(request(ec::UNSUPPORTED_EVENT, 0x72, 0xAB));
    assert_eq!(
        o,
        GhcbOutcome::UnsupportedEvent {
            info1: 0x72,
            info2: 0xAB
        }
    );
    let (o, page, _) = run_fresh(request(ec::NMI_COMPLETE, 0, 0));
    assert_eq!(o, GhcbOutcome::NmiComplete);
    assert_eq!(raw(&page, F::SwExitInfo1), 0);

    let mut st = GhcbState::default();
    let mut p = request(ec::AP_HLT_LOOP, 0, 0);
    assert_eq!(run(&mut p, &mut m, &mut st), GhcbOutcome::ApResetHold);
    assert_eq!(raw(&p, F::SwExitInfo2), 0, "not released yet");
    assert!(st.ap_reset_hold.is_some());
}

// ---- header checks ----

#[test]
fn unknown_exit_codes_are_invalid_events() {
    for code in [
        0x400u64,
        0x1234,
        0x1_0000_0072,
        0x8000_0006,
        0x8000_0010,
        u64::MAX,
    ] {
        let (o, page, m) = run_fresh(request(code, 0, 0));
        assert_malformed(&o, &page, GhcbErrorCode::InvalidEvent);
        assert!(m.calls.is_empty());
    }
}

#[test]
fn usage_version_and_exit_fields_are_checked() {
    let mut p = request(ec::RDTSC, 0, 0);
    esvm_hv::ghcb::GhcbPage::new(&mut p).set_usage(1);
    let (o, page, m) = run_fresh(p);
    assert_malformed(&o, &page, GhcbErrorCode::InvalidUsage);
    assert!(m.calls.is_empty());

    for version in [0u16, 3, 0xFFFF] {
        let mut p = request(ec::RDTSC, 0, 0);
        esvm_hv::ghcb::GhcbPage::new(&mut p).set_protocol_version(version);
        let (o, page, m) = run_fresh(p);
        assert_malformed(&o, &page, GhcbErrorCode::InvalidInput);
        assert!(m.calls.is_empty());
    }
    let mut p = request(ec::RDTSC, 0, 0);
    esvm_hv::ghcb::GhcbPage::new(&mut p).set_protocol_version(1);
    assert_eq!(run_fresh(p).0, GhcbOutcome::Resume(GuestResponse::Success));

    for field in [F::SwExitCode, F::SwExitInfo1, F::SwExitInfo2] {
        let mut p = request(ec::RDTSC, 0, 0);
        esvm_hv::ghcb::GhcbPage::new(&mut p).set_valid(field, false);
        let (o, page, m) = run_fresh(p);
        assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
        assert!(m.calls.is_empty(), "{field:?}");
    }
}

#[test]
fn values_without_valid_bits_are_ignored() {
    // RAX holds a value but is not marked valid: an OUT must not use it.
    let mut p = request(ec::IOIO, io_info(0x80, IoSize::Byte, false, false), 0);
    p[0x1F8] = 0x55;
    let (o, page, m) = run_fresh(p);
    assert_malformed(&o, &page, GhcbErrorCode::MissingInput);
    assert!(m.calls.is_empty());
}

#[test]
fn registered_ghcb_is_enforced() {
    let mut st = GhcbState {
        registered_gpa: Some(GHCB_GPA + 0x1000),
        ..GhcbState::default()
    };
    let mut p = request(ec::RDTSC, 0, 0);
    let o = handle_ghcb(&mut p, GHCB_GPA, &mut Mock::default(), &mut st);
    assert_malformed(&o, &p, GhcbErrorCode::NotRegistered);
    st.registered_gpa = Some(GHCB_GPA);
    let mut p = request(ec::RDTSC, 0, 0);
    let o = handle_ghcb(&mut p, GHCB_GPA, &mut Mock::default(), &mut st);
    assert_eq!(o, GhcbOutcome::Resume(GuestResponse::Success));
}

#[test]
fn handle_vmgexit_reads_and_writes_the_ghcb_through_shared_memory() {
    let mut m = Mock::default();
    let mut st = GhcbState::default();
    let p = with(with(request(ec::CPUID, 0, 0), F::Rax, 1), F::Rcx, 0);
    m.shared_at_mut(GHCB_GPA, GHCB_PAGE_SIZE)
        .copy_from_slice(&p);
    let o = handle_vmgexit(GHCB_GPA, &mut m, &mut st);
    assert_eq!(
        o,
        VmgexitOutcome::Ghcb(GhcbOutcome::Resume(GuestResponse::Success))
    );
    let mut page = [0u8; GHCB_PAGE_SIZE];
    page.copy_from_slice(m.shared_at(GHCB_GPA, GHCB_PAGE_SIZE));
    assert_eq!(raw(&page, F::Rax), 1 ^ 0xA0A0);
    assert_eq!(st.negotiated_version, Some(2));
    // A GHCB in private memory cannot be served.
    let o = handle_vmgexit(PRIVATE_BASE, &mut Mock::new(PRIVATE_BASE), &mut st);
    assert!(matches!(o, VmgexitOutcome::Failed(_)), "{o:?}");
}
