//! The demo guest's workload, compiled for the host: predicts the guest's output.

#[path = "../../../guests/demo/workload.rs"]
mod workload;

pub use workload::{DEFAULT_ITERATIONS, PAGES_PER_ITER, ROUNDS, TICKS};

/// The value the demo guest prints as `checksum=<16 hex digits>` for
/// `iterations=<iterations> dirty-mib=<dirty_mib>`. Allocates `dirty_mib` MiB.
pub fn expected_checksum(iterations: u64, dirty_mib: u64) -> u64 {
    let words = usize::try_from(dirty_mib << 20).unwrap_or(usize::MAX) / 8;
    let mut buf = vec![0u64; words];
    workload::run(iterations, &mut buf, |_| {})
}

/// The complete serial output the demo guest produces for the given arguments, given
/// the memory size (bytes), vCPU count and the argument string as passed to the loader
/// (`iterations`/`dirty-mib` defaults apply when absent from `args`). Lines end in `\n`.
pub fn expected_output(
    mem_size: u64,
    vcpus: u32,
    args: &str,
    iterations: u64,
    dirty_mib: u64,
) -> String {
    output_of(
        "esvm demo guest",
        "demo",
        mem_size,
        vcpus,
        args,
        iterations,
        dirty_mib,
    )
}

/// The complete serial output of the `sevdemo` guest (the demo as an SEV-ES guest) for
/// the same parameters as [`expected_output`]: the same lines with `sevdemo` for `demo`
/// and the banner `esvm sevdemo guest (SEV-ES)`; the same checksum.
pub fn expected_output_sev(
    mem_size: u64,
    vcpus: u32,
    args: &str,
    iterations: u64,
    dirty_mib: u64,
) -> String {
    output_of(
        "esvm sevdemo guest (SEV-ES)",
        "sevdemo",
        mem_size,
        vcpus,
        args,
        iterations,
        dirty_mib,
    )
}

fn output_of(
    banner: &str,
    name: &str,
    mem_size: u64,
    vcpus: u32,
    args: &str,
    iterations: u64,
    dirty_mib: u64,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{banner}");
    let _ = writeln!(
        out,
        "{name}: memory {} MiB, {vcpus} vCPU(s), args \"{args}\"",
        mem_size >> 20
    );
    let _ = writeln!(out, "{name}: iterations={iterations} dirty-mib={dirty_mib}");
    let words = usize::try_from(dirty_mib << 20).unwrap_or(usize::MAX) / 8;
    let mut buf = vec![0u64; words];
    let mut ticks = Vec::new();
    let sum = workload::run(iterations, &mut buf, |k| ticks.push(k));
    for k in ticks {
        let _ = writeln!(out, "tick {k}");
    }
    let _ = writeln!(out, "checksum={sum:016x}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_depends_on_both_arguments() {
        let a = expected_checksum(100, 0);
        assert_eq!(a, expected_checksum(100, 0));
        assert_ne!(a, expected_checksum(101, 0));
        assert_ne!(a, expected_checksum(100, 1));
        assert_ne!(expected_checksum(100, 1), expected_checksum(100, 2));
    }

    #[test]
    fn output_has_ten_ticks_and_a_checksum() {
        let out = expected_output(64 << 20, 1, "iterations=25", 25, 0);
        let ticks: Vec<&str> = out.lines().filter(|l| l.starts_with("tick ")).collect();
        assert_eq!(
            ticks,
            (1..=10).map(|k| format!("tick {k}")).collect::<Vec<_>>()
        );
        assert!(out.ends_with(&format!("checksum={:016x}\n", expected_checksum(25, 0))));
        // Fewer iterations than ticks: one tick per iteration.
        let out = expected_output(64 << 20, 1, "", 3, 0);
        assert_eq!(out.lines().filter(|l| l.starts_with("tick ")).count(), 3);
    }

    #[test]
    fn sev_output_is_the_demo_output_renamed() {
        let plain = expected_output(64 << 20, 1, "iterations=40", 40, 1);
        let sev = expected_output_sev(64 << 20, 1, "iterations=40", 40, 1);
        assert!(sev.starts_with("esvm sevdemo guest (SEV-ES)\nsevdemo: memory 64 MiB"));
        assert_eq!(
            sev.replace("esvm sevdemo guest (SEV-ES)", "esvm demo guest")
                .replace("sevdemo:", "demo:"),
            plain
        );
    }

    #[test]
    fn known_value_from_a_kvm_run() {
        // Printed by the demo guest under KVM for these arguments.
        assert_eq!(expected_checksum(2000, 2), 0x0db5_7754_f4dd_9890);
        assert_eq!(expected_checksum(300, 1), 0xc44d_6515_e351_cc65);
    }
}
