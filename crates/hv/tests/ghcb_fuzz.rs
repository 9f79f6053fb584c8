//! Fuzz-style tests: arbitrary GHCB pages and GHCB MSR values.
//!
//! For every input the handler must not panic, must call the services only with in-range
//! arguments and a bounded number of times (the mock asserts both), must answer with a
//! well-formed response, and must change nothing but its output fields, the valid bitmap and
//! the scratch area it was given.
//!
//! Case counts: `GHCB_FUZZ_CASES` (default 2000) for each of the proptest properties and the
//! seeded loops; raise it for a longer local run, e.g.
//! `GHCB_FUZZ_CASES=300000 cargo test --release -p esvm-hv --test ghcb_fuzz`.

mod ghcb_common;

use esvm_abi::msr_protocol::{
    AP_RESET_HOLD_REQ as MSR_AP_RESET_HOLD_REQ, CPUID_REQ as MSR_CPUID_REQ,
    HV_FT_REQ as MSR_HV_FT_REQ, REG_GPA_REQ as MSR_REG_GPA_REQ, SEV_INFO_REQ as MSR_SEV_INFO_REQ,
    TERM_REQ as MSR_TERM_REQ,
};
use esvm_hv::ghcb::page::{GhcbPage, SHARED_BUFFER_END, SHARED_BUFFER_OFFSET, VALID_BITMAP_OFFSET};
use esvm_hv::ghcb::{
    exit_code as ec, handle_ghcb, handle_msr_protocol, handle_vmgexit, GhcbField as F, GhcbOutcome,
    GhcbState, GuestResponse, IoSize, IoioInfo, MsrProtocolOutcome, VmgexitOutcome, GHCB_PAGE_SIZE,
};
use ghcb_common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};

type Page = [u8; GHCB_PAGE_SIZE];

fn cases() -> u32 {
    std::env::var("GHCB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

const CODES: &[u64] = &[
    ec::DR7_READ,
    ec::DR7_WRITE,
    ec::RDTSC,
    ec::RDPMC,
    ec::CPUID,
    ec::INVD,
    ec::IOIO,
    ec::MSR,
    ec::VMMCALL,
    ec::RDTSCP,
    ec::WBINVD,
    ec::MONITOR,
    ec::MWAIT,
    ec::MMIO_READ,
    ec::MMIO_WRITE,
    ec::NMI_COMPLETE,
    ec::AP_HLT_LOOP,
    ec::AP_JUMP_TABLE,
    ec::HV_FEATURES,
    ec::TERM_REQUEST,
    ec::UNSUPPORTED_EVENT,
    0x400,
    0x8000_0010,
];

const COUNTS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    255,
    1016,
    1017,
    2032,
    2033,
    4096,
    32768,
    65536,
    65537,
    u32::MAX as u64,
    1 << 62,
    1 << 63,
    u64::MAX,
];

/// What one fuzz case is made of.
#[derive(Debug, Clone)]
struct Spec {
    code: u64,
    info1: u64,
    info2: u64,
    scratch: u64,
    /// Valid bits for [`F::ALL`], in order.
    valid: u16,
    /// CPL, XSS, DR7, RAX, RCX, RDX, RBX, RSI, XCR0.
    regs: [u64; 9],
    usage: u32,
    version: u16,
    /// Seed of the bytes the fields don't cover (including the shared buffer).
    fill: u64,
    registered: Option<u64>,
}

fn gen_info1(r: &mut SplitMix, code: u64) -> u64 {
    match code {
        ec::IOIO if r.chance(85) => {
            let any_port = r.next_u64() as u16;
            let io = IoioInfo {
                port: r.pick(&[0x60u16, 0x80, 0x3F8, 0xCF8, any_port]),
                size: r.pick(&[IoSize::Byte, IoSize::Word, IoSize::Dword]),
                is_in: r.chance(50),
                string: r.chance(50),
                rep: r.chance(50),
                address_bits: r.pick(&[Some(16), Some(32), Some(64), None]),
            };
            let noise = if r.chance(10) {
                r.next_u64() & 0x1C00
            } else {
                0
            };
            io.encode() | noise
        }
        ec::MMIO_READ | ec::MMIO_WRITE if r.chance(70) => {
            let (near_top, any) = (u64::MAX - r.below(16), r.next_u64());
            r.pick(&[0xFED0_0000, 0xFEE0_00B0, near_top, any])
        }
        ec::TERM_REQUEST | ec::UNSUPPORTED_EVENT => r.next_u64(),
        _ => {
            let any = r.next_u64();
            r.pick(&[0, 1, 2, 3, any])
        }
    }
}

fn gen_scratch(r: &mut SplitMix) -> u64 {
    let small = r.below(64);
    match r.below(10) {
        0 => 0,
        1 | 2 => GHCB_GPA + SHARED_BUFFER_OFFSET as u64 + r.below(SHARED_BUFFER_END as u64 - 0x800),
        3 => GHCB_GPA + r.below(GHCB_PAGE_SIZE as u64),
        4 => GHCB_GPA.wrapping_sub(small),
        5 | 6 => EXT_SCRATCH + r.below(0x1000),
        7 => PRIVATE_BASE + small,
        8 => r.pick(&[
            SHARED_BASE + SHARED_SIZE as u64 - small,
            u64::MAX - small,
            SHARED_BASE,
        ]),
        _ => r.next_u64(),
    }
}

/// A request that moves data through a scratch area, mostly well-formed.
fn gen_scratch_spec(r: &mut SplitMix) -> Spec {
    let mut spec = gen_spec_any(r);
    spec.valid = if r.chance(85) { 0x1FFF } else { spec.valid };
    spec.usage = 0;
    spec.version = 2;
    let size = r.pick(&[IoSize::Byte, IoSize::Word, IoSize::Dword]);
    let (code, info1) = match r.below(3) {
        0 => (
            ec::IOIO,
            IoioInfo {
                port: 0x60,
                size,
                is_in: r.chance(60),
                string: true,
                rep: true,
                address_bits: Some(64),
            }
            .encode(),
        ),
        1 => (ec::MMIO_READ, 0xFED0_0000 + r.below(0x100)),
        _ => (ec::MMIO_WRITE, 0xFED0_0000 + r.below(0x100)),
    };
    spec.code = code;
    spec.info1 = info1;
    let unit = if code == ec::IOIO {
        size.bytes() as u64
    } else {
        1
    };
    let in_page = r.chance(60);
    let room = if in_page { 2032 } else { 0x3000 };
    // Mostly fitting, sometimes one element too many.
    let max_count = room / unit;
    spec.info2 = if r.chance(85) {
        1 + r.below(max_count.min(64))
    } else {
        max_count + r.below(3)
    };
    let len = spec.info2 * unit;
    spec.scratch = if in_page {
        let slack = 2032u64.saturating_sub(len);
        GHCB_GPA + 0x800 + r.below(slack + 2)
    } else {
        EXT_SCRATCH + r.below(0x1000)
    };
    spec
}

fn gen_spec(r: &mut SplitMix) -> Spec {
    if r.chance(35) {
        gen_scratch_spec(r)
    } else {
        gen_spec_any(r)
    }
}

fn gen_spec_any(r: &mut SplitMix) -> Spec {
    let code = if r.chance(90) {
        r.pick(CODES)
    } else {
        r.next_u64()
    };
    let info1 = gen_info1(r, code);
    let info2 = if r.chance(80) {
        r.pick(COUNTS)
    } else {
        r.next_u64()
    };
    let scratch = gen_scratch(r);
    // Mostly everything valid, sometimes random bits.
    let valid = match r.below(10) {
        0..=4 => 0x1FFF,
        5 | 6 => 0x1FFF & !(1 << r.below(13)),
        _ => r.next_u64() as u16,
    };
    let mut regs = [0u64; 9];
    for v in regs.iter_mut() {
        *v = if r.chance(50) {
            r.below(0x20)
        } else {
            r.next_u64()
        };
    }
    Spec {
        code,
        info1,
        info2,
        scratch,
        valid,
        regs,
        usage: if r.chance(95) { 0 } else { r.next_u64() as u32 },
        version: if r.chance(95) {
            r.pick(&[1, 2])
        } else {
            r.next_u64() as u16
        },
        fill: r.next_u64(),
        registered: if r.chance(5) {
            Some(r.pick(&[GHCB_GPA, GHCB_GPA + 0x1000]))
        } else {
            None
        },
    }
}

fn build(spec: &Spec) -> Page {
    let mut b = [0u8; GHCB_PAGE_SIZE];
    let mut fill = SplitMix(spec.fill);
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&fill.next_u64().to_le_bytes());
    }
    let mut p = GhcbPage::new(&mut b);
    let values = [
        spec.regs[0],
        spec.regs[1],
        spec.regs[2],
        spec.regs[3],
        spec.regs[4],
        spec.regs[5],
        spec.regs[6],
        spec.regs[7],
        spec.code,
        spec.info1,
        spec.info2,
        spec.scratch,
        spec.regs[8],
    ];
    for (i, (field, value)) in F::ALL.iter().zip(values).enumerate() {
        p.set(*field, value);
        p.set_valid(*field, spec.valid & (1 << i) != 0);
    }
    p.set_usage(spec.usage);
    p.set_protocol_version(spec.version);
    b
}

/// Largest number of bytes the event may write into its scratch area.
fn max_scratch_write(before: &Page) -> Option<(u64, u64)> {
    let mut c = *before;
    let p = GhcbPage::new(&mut c);
    let scratch = p.sw_scratch()?;
    let code = p.sw_exit_code()?;
    let info1 = p.sw_exit_info1()?;
    let info2 = p.sw_exit_info2()?;
    let len = match code {
        ec::MMIO_READ => info2,
        ec::IOIO => {
            let io = IoioInfo::decode(info1)?;
            if !(io.is_in && io.string) {
                return None;
            }
            info2.checked_mul(io.size.bytes() as u64)?
        }
        _ => return None,
    };
    Some((scratch, len))
}

/// Check everything the handler promises about one handled page.
fn check(before: &Page, after: &Page, outcome: &GhcbOutcome, mock: &Mock) {
    let mut a = *after;
    let p = GhcbPage::new(&mut a);

    // A well-formed response.
    let info1 = p.sw_exit_info1().expect("SW_EXITINFO1 must be valid");
    let info2 = p.sw_exit_info2().expect("SW_EXITINFO2 must be valid");
    match info1 {
        0 => {}
        1 => assert!(info2 == 0x8000_0306 || info2 == 0x8000_030D, "{info2:#x}"),
        2 => assert!((1..=6).contains(&info2), "reason {info2}"),
        other => panic!("SW_EXITINFO1 {other}"),
    }
    match outcome {
        GhcbOutcome::Resume(GuestResponse::Success) => assert_eq!(info1, 0),
        GhcbOutcome::Resume(GuestResponse::Exception { .. }) => assert_eq!(info1, 1),
        GhcbOutcome::Resume(GuestResponse::Malformed { code, .. }) => {
            assert_eq!((info1, info2), (2, *code as u64))
        }
        _ => assert_eq!(info1, 0),
    }

    // Only output fields marked valid; no stray bitmap bits.
    let outputs = [
        F::Rax,
        F::Rbx,
        F::Rcx,
        F::Rdx,
        F::SwExitInfo1,
        F::SwExitInfo2,
    ];
    let mut allowed_bits = [0u8; 16];
    for f in outputs {
        allowed_bits[f.valid_bit() / 8] |= 1 << (f.valid_bit() % 8);
    }
    for (i, (got, ok)) in p.valid_bitmap().iter().zip(allowed_bits).enumerate() {
        assert_eq!(got & !ok, 0, "stray valid bits in bitmap byte {i}");
    }

    // Changed bytes only in output fields, the bitmap and the in-page scratch window.
    let mut allowed = vec![false; GHCB_PAGE_SIZE];
    for f in outputs {
        allowed[f.offset()..f.offset() + f.width()].fill(true);
    }
    allowed[VALID_BITMAP_OFFSET..VALID_BITMAP_OFFSET + 16].fill(true);
    let window = max_scratch_write(before);
    if let Some((scratch, len)) = window {
        if scratch & !0xFFF == GHCB_GPA {
            let start = (scratch - GHCB_GPA) as usize;
            let end = start.saturating_add(len.min(GHCB_PAGE_SIZE as u64) as usize);
            if start >= SHARED_BUFFER_OFFSET && end <= SHARED_BUFFER_END {
                allowed[start..end].fill(true);
            }
        }
    }
    for i in 0..GHCB_PAGE_SIZE {
        if before[i] != after[i] {
            assert!(allowed[i], "byte {i:#x} changed outside the allowed areas");
        }
    }

    // Writes to shared memory only to the scratch area, within its length.
    for call in &mock.calls {
        if let Call::WriteShared(gpa, len) = call {
            let (scratch, max) = window.expect("write_shared without a writable scratch");
            assert_eq!(*gpa, scratch);
            assert!(*len as u64 <= max);
        }
    }
}

/// Handle one case and check it; returns the response code (SW_EXITINFO1, or 3 for an
/// outcome that stops the guest) and the number of device calls, for coverage statistics.
fn run_case(spec: &Spec) -> (u64, usize) {
    let before = build(spec);
    let mut page = before;
    let mut mock = Mock::default();
    let mut state = GhcbState {
        registered_gpa: spec.registered,
        ..GhcbState::default()
    };
    let outcome = handle_ghcb(&mut page, GHCB_GPA, &mut mock, &mut state);
    check(&before, &page, &outcome, &mock);
    let kind = match outcome {
        GhcbOutcome::Resume(_) => raw(&page, F::SwExitInfo1),
        _ => 3,
    };
    (kind, mock.device_calls())
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    // Structured fields from proptest (so failures shrink), the rest from a seed.
    (
        prop_oneof![4 => proptest::sample::select(CODES.to_vec()), 1 => any::<u64>()],
        prop_oneof![
            any::<u64>(),
            0u64..4,
            Just(0x0060_0215u64),
            Just(0x03F8_022Cu64)
        ],
        prop_oneof![proptest::sample::select(COUNTS.to_vec()), any::<u64>()],
        any::<u64>(),
        prop_oneof![Just(0x1FFFu16), any::<u16>()],
        any::<[u64; 9]>(),
        prop_oneof![9 => Just(0u32), 1 => any::<u32>()],
        prop_oneof![9 => 1u16..=2, 1 => any::<u16>()],
        any::<u64>(),
    )
        .prop_map(
            |(code, info1, info2, seed, valid, regs, usage, version, fill)| {
                let mut r = SplitMix(seed);
                if seed % 3 == 0 {
                    return gen_scratch_spec(&mut r);
                }
                Spec {
                    code,
                    info1,
                    info2,
                    scratch: gen_scratch(&mut r),
                    valid,
                    regs,
                    usage,
                    version,
                    fill,
                    registered: None,
                }
            },
        )
}

#[test]
fn proptest_arbitrary_pages() {
    let mut runner = TestRunner::new(PtConfig {
        cases: cases(),
        failure_persistence: None,
        ..PtConfig::default()
    });
    runner
        .run(&spec_strategy(), |spec| {
            run_case(&spec);
            Ok(())
        })
        .unwrap();
}

#[test]
fn seeded_random_pages() {
    let mut r = SplitMix(0x6863_6221_5EED);
    let mut kinds = [0usize; 4];
    let mut device_calls = 0;
    let mut scratch_writes = 0;
    for _ in 0..cases() {
        let spec = gen_spec(&mut r);
        let (kind, calls) = run_case(&spec);
        kinds[kind as usize] += 1;
        device_calls += calls;
        if kind == 0 && max_scratch_write(&build(&spec)).is_some_and(|(_, len)| len > 0) {
            scratch_writes += 1;
        }
    }
    eprintln!(
        "seeded_random_pages: {} success, {} exception, {} malformed, {} stop; {} device \
         calls; {scratch_writes} successful scratch writes",
        kinds[0], kinds[1], kinds[2], kinds[3], device_calls
    );
    // The generator must reach the handlers, not only the header checks.
    let n = cases() as usize;
    assert!(
        scratch_writes * 50 >= n,
        "too few scratch writes: {scratch_writes}"
    );
    assert!(kinds[0] * 10 >= n, "too few successful cases: {kinds:?}");
    assert!(kinds[2] * 10 >= n, "too few rejected cases: {kinds:?}");
}

#[test]
fn fully_random_pages() {
    // Raw random bytes: almost always rejected, but never a panic or a stray write.
    let mut r = SplitMix(0xBAD_C0DE);
    for _ in 0..cases() {
        let mut before = [0u8; GHCB_PAGE_SIZE];
        for chunk in before.chunks_mut(8) {
            chunk.copy_from_slice(&r.next_u64().to_le_bytes());
        }
        let mut page = before;
        let mut mock = Mock::default();
        let outcome = handle_ghcb(&mut page, GHCB_GPA, &mut mock, &mut GhcbState::default());
        check(&before, &page, &outcome, &mock);
    }
}

fn check_msr(value: u64, outcome: &MsrProtocolOutcome) {
    let info = value & 0xFFF;
    match (info, outcome) {
        (MSR_SEV_INFO_REQ, MsrProtocolOutcome::Respond { msr }) => assert_eq!(msr & 0xFFF, 0x001),
        (MSR_CPUID_REQ, MsrProtocolOutcome::Respond { msr }) => {
            assert_eq!(msr & 0xFFF, 0x005);
            assert_eq!((msr >> 30) & 3, (value >> 30) & 3);
        }
        (MSR_AP_RESET_HOLD_REQ, MsrProtocolOutcome::ApResetHold { msr }) => assert_eq!(*msr, 7),
        (MSR_REG_GPA_REQ, MsrProtocolOutcome::Respond { msr }) => {
            assert_eq!(*msr, (value & !0xFFF) | 0x013)
        }
        (MSR_HV_FT_REQ, MsrProtocolOutcome::Respond { msr }) => assert_eq!(msr & 0xFFF, 0x081),
        (
            MSR_TERM_REQ,
            MsrProtocolOutcome::Terminate {
                reason_set,
                reason_code,
            },
        ) => {
            assert_eq!(u64::from(*reason_set), (value >> 12) & 0xF);
            assert_eq!(u64::from(*reason_code), (value >> 16) & 0xFF);
        }
        (
            MSR_SEV_INFO_REQ
            | MSR_CPUID_REQ
            | MSR_AP_RESET_HOLD_REQ
            | MSR_REG_GPA_REQ
            | MSR_HV_FT_REQ
            | MSR_TERM_REQ,
            other,
        ) => panic!("{value:#x}: {other:?}"),
        (_, MsrProtocolOutcome::Error(e)) => assert!(!e.to_string().is_empty()),
        (_, other) => panic!("unknown request {value:#x} answered: {other:?}"),
    }
}

#[test]
fn msr_protocol_values() {
    let known = [
        MSR_SEV_INFO_REQ,
        MSR_CPUID_REQ,
        MSR_AP_RESET_HOLD_REQ,
        MSR_REG_GPA_REQ,
        MSR_HV_FT_REQ,
        MSR_TERM_REQ,
    ];
    let mut r = SplitMix(0x4D53_5250);
    for _ in 0..cases() {
        let data = r.next_u64() & !0xFFF;
        let value = if r.chance(70) {
            data | r.pick(&known)
        } else {
            r.next_u64()
        };
        let mut mock = Mock::default();
        let mut state = GhcbState::default();
        let o = handle_msr_protocol(value, &mut mock, &mut state);
        check_msr(value, &o);
        assert!(mock.calls.len() <= 1);
    }
}

proptest! {
    #![proptest_config(PtConfig { cases: cases(), failure_persistence: None, ..PtConfig::default() })]

    #[test]
    fn proptest_msr_protocol(value in any::<u64>()) {
        let mut state = GhcbState::default();
        let o = handle_msr_protocol(value, &mut Mock::default(), &mut state);
        check_msr(value, &o);
    }

    #[test]
    fn proptest_vmgexit(msr in prop_oneof![
            any::<u64>(),
            Just(GHCB_GPA),
            (0u64..(1 << 40)).prop_map(|v| v & !0xFFF),
            (0u64..0x1000),
        ],
        seed in any::<u64>(),
    ) {
        // A guest GHCB page in shared memory, handled through handle_vmgexit.
        let mut r = SplitMix(seed);
        let spec = gen_spec(&mut r);
        let page = build(&spec);
        // The mock checks scratch accesses against the page the handler treats as the GHCB.
        let mut mock = Mock::new(msr & !0xFFF);
        mock.shared_at_mut(GHCB_GPA, GHCB_PAGE_SIZE).copy_from_slice(&page);
        let mut state = GhcbState::default();
        let o = handle_vmgexit(msr, &mut mock, &mut state);
        match o {
            VmgexitOutcome::Ghcb(ref outcome) => {
                prop_assert_eq!(msr & 0xFFF, 0);
                if msr == GHCB_GPA {
                    let mut after = [0u8; GHCB_PAGE_SIZE];
                    after.copy_from_slice(mock.shared_at(GHCB_GPA, GHCB_PAGE_SIZE));
                    check(&page, &after, outcome, &Mock { calls: Vec::new(), ..Mock::default() });
                }
            }
            VmgexitOutcome::Msr(ref m) => {
                prop_assert_ne!(msr & 0xFFF, 0);
                check_msr(msr, m);
            }
            VmgexitOutcome::Failed(ref e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
