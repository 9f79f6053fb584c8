//! Differential test: random instruction sequences run natively on the host CPU and in the
//! esvm interpreter must end in the same registers, (defined) arithmetic flags + DF, and
//! scratch buffer.
//!
//! The interpreter side is a thin adapter over `esvm_cpu::testutil::Harness` (identity-mapped
//! memory, long mode) that reproduces the native environment at the same addresses: the code
//! at `CODE_ADDR`, the scratch buffer (with the stack) at `SCRATCH_ADDR`, ring 3, flat
//! segments, IF=1, IOPL=0. The code is followed by UD2; the run has completed when the #UD is
//! raised exactly there.
//!
//! Case counts (default ~4,300 in total; `PROPTEST_CASES=n` sets the count of each proptest
//! below, the per-template test uses n/25 per template):
//! - `each_template`: every supported template (38 on a modern host) alone, 60 cases each;
//! - `sequences`: 1..8 random templates, 2,000 cases.
//!
//! The cases are the same on every run (a fixed seed, so CI cannot turn red by chance);
//! `PROPTEST_RNG_SEED=n` picks other cases, e.g. to hunt for bugs over many runs.
//!
//! `ESVM_DIFF_SKIP=Template,...` leaves templates out (to keep hunting while a known bug is
//! open). The flags the architecture leaves undefined are masked on every host (the generator
//! tracks them); `ESVM_DIFF_ALL_FLAGS=1` compares them too, which is meant to pass only on a
//! host of the family the interpreter models (AMD family 17h, see `esvm_cpu::model`); the
//! ignored `undefined_flag_survey` reports where another host disagrees. Vendor-specific
//! cases with defined flags are generated only on the modelled family
//! (`HostFeatures::modelled_family`).

use esvm_arch::bits::{rflags, vector};
use esvm_cpu::testutil::Harness;
use esvm_cpu::Exit;
use esvm_native::gen::{self, Input, OpSpec, Program, Template};
use esvm_native::{HostFeatures, NativeState, CODE_ADDR, FLAGS_MASK, SCRATCH_ADDR, SCRATCH_SIZE};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

thread_local! {
    static IN_INTERP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs the interpreter with panics turned into errors (an interpreter panic on guest input is
/// a bug to report with the program, and must not abort the other cases). The panic hook stays
/// quiet for these, so shrinking does not flood the output.
fn run_interp(code: &[u8], input: &NativeState) -> Result<NativeState, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_INTERP.with(|f| f.get()) {
                prev(info);
            }
        }));
    });
    IN_INTERP.with(|f| f.set(true));
    let r = std::panic::catch_unwind(|| run_interp_inner(code, input));
    IN_INTERP.with(|f| f.set(false));
    r.unwrap_or_else(|p| {
        // The reused machine is in an unknown state now.
        ENV.with(|c| *c.borrow_mut() = None);
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("(non-string payload)");
        Err(format!("the interpreter panicked: {msg}"))
    })
}

/// A prepared interpreter machine, reused across cases (building one costs milliseconds).
struct Env {
    h: Harness,
    sregs: esvm_arch::SpecialRegs,
    events: esvm_arch::PendingEvents,
}

impl Env {
    fn new() -> Result<Env, String> {
        let h = Harness::new(4 << 20);
        let m = h.mem().clone();
        let e = |x: esvm_cpu::MemError| x.to_string();
        // The harness identity-maps the first GiB with supervisor-only 2 MiB pages; make the
        // two pages covering CODE_ADDR and SCRATCH_ADDR (and the levels above) user-accessible.
        const US: u64 = 4;
        const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
        let cr3 = h.cpu.sregs().cr3 & ADDR;
        let pml4e = m.read_u64(cr3).map_err(e)?;
        m.write_u64(cr3, pml4e | US).map_err(e)?;
        let pdpt = pml4e & ADDR;
        let pdpte = m.read_u64(pdpt).map_err(e)?;
        m.write_u64(pdpt, pdpte | US).map_err(e)?;
        let pd = pdpte & ADDR;
        for va in [CODE_ADDR, SCRATCH_ADDR] {
            let slot = pd + 8 * (va >> 21);
            let pde = m.read_u64(slot).map_err(e)?;
            if pde & 0x81 != 0x81 {
                return Err(format!(
                    "harness PDE for {va:#x} is not a present 2 MiB page: {pde:#x}"
                ));
            }
            m.write_u64(slot, pde | US).map_err(e)?;
        }
        Ok(Env {
            sregs: h.cpu.sregs(),
            events: h.cpu.events(),
            h,
        })
    }
}

thread_local! {
    static ENV: std::cell::RefCell<Option<Env>> = const { std::cell::RefCell::new(None) };
}

/// Runs `code` in the interpreter from `input` on this thread's reused machine.
fn run_interp_inner(code: &[u8], input: &NativeState) -> Result<NativeState, String> {
    ENV.with(|cell| {
        let r = {
            let mut env = cell.borrow_mut();
            if env.is_none() {
                *env = Some(Env::new()?);
            }
            run_on(env.as_mut().expect("created above"), code, input)
        };
        if r.is_err() {
            // Start the next case from a clean machine.
            *cell.borrow_mut() = None;
        }
        r
    })
}

/// Runs `code` on a brand-new machine (to tell state leaking between cases from real bugs).
fn run_interp_fresh(code: &[u8], input: &NativeState) -> Result<NativeState, String> {
    let mut env = Env::new()?;
    run_on(&mut env, code, input)
}

fn run_on(env: &mut Env, code: &[u8], input: &NativeState) -> Result<NativeState, String> {
    let e = |x: esvm_cpu::MemError| x.to_string();
    let h = &mut env.h;
    h.cpu
        .set_sregs(&env.sregs)
        .map_err(|x| format!("resetting the machine: {x}"))?;
    h.cpu.set_events(&env.events);
    let m = h.mem().clone();
    let end = CODE_ADDR + code.len() as u64;
    m.write(CODE_ADDR, code).map_err(e)?;
    m.write(end, &[0x0F, 0x0B]).map_err(e)?; // ud2
    m.write(SCRATCH_ADDR, &input.scratch).map_err(e)?;
    let rsp = input.gpr[4];
    h.enter_user(CODE_ADDR, rsp, (input.rflags & FLAGS_MASK) | rflags::IF);
    let mut r = h.cpu.regs();
    r.gpr = input.gpr;
    h.cpu.set_regs(&r);

    let exit = h.cpu.run(1_000_000);
    let caught = match exit {
        Exit::Hlt => h.exception(),
        other => {
            return Err(format!(
                "interpreter stopped with {other:?} instead of finishing"
            ))
        }
    };
    let c = caught.ok_or("interpreter halted outside an exception stub")?;
    if c.vector != vector::UD || c.rip != end {
        return Err(format!(
            "interpreter raised exception {} (error code {:?}) at rip {:#x} (cr2 {:#x}); \
             the snippet ends at {end:#x}",
            c.vector, c.error_code, c.rip, c.cr2
        ));
    }
    // User RSP and RFLAGS are in the exception frame (no error code for #UD).
    let frame = h.cpu.regs().gpr[4];
    let mut gpr = h.cpu.regs().gpr;
    gpr[4] = m.read_u64(frame + 24).map_err(e)?;
    let fl = m.read_u64(frame + 16).map_err(e)?;
    let mut scratch = vec![0u8; SCRATCH_SIZE];
    m.read(SCRATCH_ADDR, &mut scratch).map_err(e)?;
    Ok(NativeState {
        gpr,
        rflags: fl & FLAGS_MASK,
        scratch,
    })
}

fn all_flags() -> bool {
    std::env::var("ESVM_DIFF_ALL_FLAGS").is_ok_and(|v| v == "1")
}

fn check(ops: &[OpSpec], input: &Input, f: &HostFeatures) -> Result<(), TestCaseError> {
    let mut p: Program = gen::assemble_excluding(ops, f, &skipped())
        .map_err(|e| TestCaseError::fail(format!("generator: {e}")))?;
    if all_flags() {
        p.flags_mask = FLAGS_MASK;
    }
    let state = input.state();
    let native = p
        .run_native(&state)
        .map_err(|e| TestCaseError::fail(format!("native run failed: {e}\n{}", p.listing)))?;
    let emu = run_interp(&p.code, &state).map_err(|e| {
        TestCaseError::fail(format!(
            "{e}\nprogram:\n{}input: {input:?}\nnative result: {native:?}",
            p.listing
        ))
    })?;
    let d = p.diff(&native, &emu);
    if !d.is_empty() {
        let fresh = match run_interp_fresh(&p.code, &state) {
            Ok(f) if p.diff(&native, &f).is_empty() => {
                "NOT reproduced on a fresh machine: state leaks between runs on a reused vCPU"
            }
            Ok(_) => "reproduced on a fresh machine",
            Err(_) => "a fresh machine fails differently",
        };
        return Err(TestCaseError::fail(format!(
            "interpreter differs from the host CPU ({fresh}):\n  {}\nprogram:\n{}input: {input:?}\nnative: {native:?}\ninterp: {emu:?}",
            d.join("\n  "),
            p.listing
        )));
    }
    Ok(())
}

/// The supported templates minus those named in `ESVM_DIFF_SKIP` (comma-separated, e.g.
/// `ShldShrd,Div`), to keep hunting while a known interpreter bug is open.
fn templates(f: &HostFeatures) -> Vec<Template> {
    let skip = skipped();
    Template::all_supported(f)
        .into_iter()
        .filter(|t| !skip.contains(t))
        .collect()
}

fn skipped() -> Vec<Template> {
    let skip = std::env::var("ESVM_DIFF_SKIP").unwrap_or_default();
    let names: Vec<&str> = skip.split(',').map(str::trim).collect();
    Template::ALL
        .into_iter()
        .filter(|t| names.contains(&format!("{t:?}").as_str()))
        .collect()
}

fn cases(default: u32) -> u32 {
    match std::env::var("PROPTEST_CASES") {
        Ok(v) => v.parse().unwrap_or(default),
        Err(_) => default,
    }
}

/// The seed when `PROPTEST_RNG_SEED` is not set.
const DEFAULT_SEED: u64 = 0x00e5_f0d1_ff00;

fn config(n: u32) -> Config {
    let base = Config::default();
    let rng_seed = match base.rng_seed {
        RngSeed::Random => RngSeed::Fixed(DEFAULT_SEED),
        fixed => fixed,
    };
    Config {
        cases: n,
        rng_seed,
        // Mismatches are interpreter bugs to report, not regressions to pin in files here.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..base
    }
}

#[test]
fn each_template() {
    let f = HostFeatures::detect();
    let per = (cases(1500) / 25).max(1);
    let mut failures = Vec::new();
    let mut seen = Vec::new();
    for t in templates(&f) {
        if seen.contains(&t) {
            continue;
        }
        seen.push(t);
        let mut runner = TestRunner::new(config(per));
        let strat = (prop::array::uniform16(any::<u64>()), gen::input_strategy());
        let r = runner.run(&strat, |(entropy, input)| {
            check(
                &[OpSpec {
                    template: t,
                    entropy,
                }],
                &input,
                &f,
            )
        });
        if let Err(e) = r {
            failures.push(format!("== {t:?}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn sequences() {
    let f = HostFeatures::detect();
    let mut runner = TestRunner::new(config(cases(2000)));
    let strat = (
        gen::program_strategy_from(templates(&f), 1..=8),
        gen::input_strategy(),
    );
    let r = runner.run(&strat, |(ops, input)| check(&ops, &input, &f));
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The adapter itself: a program whose result is known.
#[test]
fn interpreter_adapter_runs_a_known_snippet() {
    let mut s = NativeState::new();
    s.gpr[0] = 5;
    s.gpr[3] = 7;
    s.rflags = rflags::CF;
    // adc rax, rbx; push rax; pushfq; pop rcx; mov [0x200010], cl
    let code = [
        0x48, 0x11, 0xD8, 0x50, 0x9C, 0x59, 0x88, 0x0C, 0x25, 0x10, 0x00, 0x20, 0x00,
    ];
    let out = run_interp(&code, &s).unwrap();
    assert_eq!(out.gpr[0], 13);
    assert_eq!(out.gpr[4], s.gpr[4] - 8);
    assert_eq!(out.gpr[1] & 0xFFF, 0x202);
    assert_eq!(out.scratch[0x10], 0x02);
    let top = (s.gpr[4] - 8 - SCRATCH_ADDR) as usize;
    assert_eq!(out.scratch[top], 13);
    // SAFETY: the snippet touches only registers, the stack (RSP = STACK_TOP) and the scratch
    // buffer, and falls through its end.
    let native = unsafe { esvm_native::run_native(&code, &s) }.unwrap();
    assert_eq!(native, out);
}

/// Survey (not a check): how often host and interpreter disagree on the flags the generator
/// masks as undefined, per mnemonic and operand size of the program's last instruction.
/// Run with `cargo test -p esvm-native --test differential -- --ignored --nocapture`.
#[test]
#[ignore = "survey that prints a report of undefined-flag disagreements; it asserts nothing"]
fn undefined_flag_survey() {
    use std::collections::BTreeMap;
    let f = HostFeatures::detect();
    let per: u64 = std::env::var("ESVM_SURVEY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    // mnemonic -> (cases, cases differing in masked flags, OR of the differing flags)
    let mut tally: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut runner = TestRunner::deterministic();
    let mut seed = 0x5EED_u64;
    let mut next = move || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for t in templates(&f) {
        for _ in 0..per {
            let ops = [OpSpec {
                template: t,
                entropy: std::array::from_fn(|_| next()),
            }];
            let p = gen::assemble(&ops, &f).unwrap();
            let input = gen::input_strategy()
                .new_tree(&mut runner)
                .expect("input strategy cannot fail")
                .current();
            let s = input.state();
            let Ok(n) = p.run_native(&s) else { continue };
            let Ok(i) = run_interp(&p.code, &s) else {
                continue;
            };
            // Key: iced's code of the last instruction (mnemonic and operand forms).
            let mut d = iced_x86::Decoder::with_ip(64, &p.code, CODE_ADDR, 0);
            let mut key = String::new();
            while d.can_decode() {
                key = format!("{:?}", d.decode().code());
            }
            let e = tally.entry(key).or_default();
            e.0 += 1;
            let masked = (n.rflags ^ i.rflags) & FLAGS_MASK & !p.flags_mask;
            if masked != 0 {
                e.1 += 1;
                e.2 |= masked;
            }
        }
    }
    println!(
        "{:<40} {:>6} {:>6}  flags",
        "instruction", "cases", "differ"
    );
    for (k, (c, d, fl)) in tally {
        if d > 0 {
            println!("{k:<40} {c:>6} {d:>6}  {}", gen::flag_names(fl));
        }
    }
}
