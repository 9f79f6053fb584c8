//! Scenario tests of `esvm bench`: the binary measures real guests; the tests check the
//! figures that do not depend on the machine's speed (instruction counts, refusals) and
//! that `--json` is one parseable document.

mod common;

use common::{esvm, text};

use std::process::Command;

use serde_json::Value;

/// Run a bench with `--json`: exit status 0 and stdout one JSON document.
fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let o = esvm(&all);
    assert_eq!(
        o.status.code(),
        Some(0),
        "esvm {all:?}\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "esvm {all:?}: stdout is not JSON ({e}):\n{}",
            text(&o.stdout)
        )
    })
}

/// Instructions between the markers, per loop, for `n` iterations.
fn cpu_counts(n: u64) -> Vec<(String, u64, u64)> {
    let r = json(&[
        "bench",
        "cpu",
        "--no-kvm",
        "--repeat",
        "1",
        "--iterations",
        &n.to_string(),
    ]);
    assert_eq!(r["iterations"], n);
    r["loops"]
        .as_array()
        .expect("loops")
        .iter()
        .map(|l| {
            let per = l["insns_per_iter"].as_u64().unwrap();
            assert_eq!(l["instructions"].as_u64(), Some(n * per), "{l}");
            assert!(l["emu_mips"].as_f64().unwrap() > 0.0, "{l}");
            (
                l["loop"].as_str().unwrap().to_string(),
                per,
                l["emu_instructions"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn bench_cpu_counts_instructions_exactly_for_any_iteration_count() {
    // The loop's instructions plus a fixed overhead (call, return, marker writes): the
    // overhead is what one iteration leaves beyond its own instructions, and it must be
    // the same at 200,000 and at 2,500,000 iterations (neither is a multiple of the run
    // loop's 10 M-instruction slices, where the counts used to stick).
    let one = cpu_counts(1);
    assert_eq!(one.len(), 3);
    for n in [200_000u64, 2_500_000] {
        let counts = cpu_counts(n);
        for ((name, per, at_one), (name_n, _, at_n)) in one.iter().zip(&counts) {
            assert_eq!(name, name_n);
            let overhead = at_one - per;
            assert!(overhead > 0 && overhead < 64, "{name}: overhead {overhead}");
            assert_eq!(*at_n, n * per + overhead, "{name} at n={n}");
        }
    }
}

#[test]
fn bench_cpu_prints_a_table_by_default_and_refuses_zero_iterations() {
    let o = esvm(&[
        "bench",
        "cpu",
        "--no-kvm",
        "--repeat",
        "1",
        "--iterations",
        "1000",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(serde_json::from_str::<Value>(&out).is_err(), "{out}");
    assert!(
        out.starts_with("esvm bench cpu: 1000 iterations per loop"),
        "{out}"
    );
    let alu = out
        .lines()
        .find(|l| l.starts_with("alu "))
        .expect("alu row");
    let per: u64 = alu.split_whitespace().nth(1).unwrap().parse().unwrap();
    let insns: u64 = alu.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(insns > 1000 * per && insns < 1000 * per + 64, "{alu}");
    let o = esvm(&["bench", "cpu", "--iterations", "0"]);
    assert_eq!(o.status.code(), Some(120), "{}", text(&o.stderr));
}

#[test]
fn bench_io_json_counts_the_writes() {
    let r = json(&["bench", "io", "--writes", "2000", "--repeat", "1"]);
    assert_eq!(r["writes"], 2000);
    let paths = r["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2);
    assert!(paths[1]["path"].as_str().unwrap().contains("SEV-ES"));
    for p in paths {
        let (rate, each) = (
            p["round_trips_per_s"].as_f64().unwrap(),
            p["us_each"].as_f64().unwrap(),
        );
        assert!(rate > 0.0 && each > 0.0, "{p}");
        assert!((rate * each / 1e6 - 1.0).abs() < 1e-9, "{p}");
    }
}

#[test]
fn bench_psp_refuses_a_buffer_too_small_to_measure_and_speaks_json() {
    let o = esvm(&["bench", "psp", "--buffer", "1K"]);
    let err = text(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    assert!(
        err.contains("--buffer 1 KiB is too small to measure"),
        "{err}"
    );
    assert!(err.contains("at least 16 MiB"), "{err}");

    let r = json(&[
        "bench",
        "psp",
        "--buffer",
        "16M",
        "--rounds",
        "1",
        "--threads",
        "2",
    ]);
    assert_eq!(r["buffer_bytes"], 16 << 20);
    assert_eq!(r["packet_bytes"], 4096);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|x| x["threads"].as_u64())
            .collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );
    for row in rows {
        let send = row["send_update_data_gib_s"].as_f64().unwrap();
        let raw = row["raw_rewrap_gib_s"].as_f64().unwrap();
        assert!(send > 0.0 && raw > 0.0, "{row}");
        let pct = row["send_percent_of_raw_rewrap"].as_f64().unwrap();
        assert!((pct - 100.0 * send / raw).abs() < 1e-6, "{row}");
    }

    let o = esvm(&[
        "bench",
        "psp",
        "--buffer",
        "16M",
        "--rounds",
        "1",
        "--threads",
        "1",
    ]);
    let out = text(&o.stdout);
    assert!(
        out.starts_with("buffer 16 MiB, packets 4 KiB, 1 thread(s)"),
        "{out}"
    );
}

#[test]
fn bench_migrate_refuses_too_small_sizes_before_migrating() {
    let t = std::time::Instant::now();
    let o = esvm(&["bench", "migrate", "--sizes", "64M,5M"]);
    let err = text(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--sizes 5 MiB: the demo guest has")
            && err.contains("32 MiB dirty buffer (--dirty-mib)")
            && err.contains("give sizes of at least 35 MiB"),
        "{err}"
    );
    // Nothing was migrated: no progress line, no table.
    assert!(!err.contains("GiB/s"), "{err}");
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
}

#[test]
fn bench_migrate_json_has_the_guest_speed_of_every_row() {
    // A warm-up far shorter than one 10 M-instruction slice: the old figure, read from the
    // count the run loop publishes between slices, was 0 MIPS for most rows.
    let r = json(&[
        "bench",
        "migrate",
        "--sizes",
        "16M",
        "--dirty-mib",
        "4",
        "--downtime-ms",
        "5000",
        "--guests",
        "plain,sev-es",
        "--warmup-ms",
        "20",
    ]);
    assert_eq!(r["guest"], "demo");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    for row in rows {
        assert_eq!(row["mem_bytes"], 16 << 20);
        let mips = row["source_mips"].as_f64().unwrap();
        assert!(mips > 1.0 && mips < 100_000.0, "{row}");
        assert!(row["pages_sent"].as_u64().unwrap() > 0, "{row}");
    }
    assert!(rows.iter().any(|x| x["workload"] == "dirty-mib=4"));
}

/// `--transport tcp,tls`: every scenario runs over both, side by side, and the AES-GCM
/// reference is reported.
#[test]
fn bench_migrate_measures_tcp_and_tls_side_by_side() {
    let r = json(&[
        "bench",
        "migrate",
        "--sizes",
        "16M",
        "--dirty-mib",
        "4",
        "--downtime-ms",
        "5000",
        "--guests",
        "plain",
        "--warmup-ms",
        "20",
        "--transport",
        "tcp,tls",
    ]);
    assert!(r["aes_128_gcm_gib_s"].as_f64().unwrap() > 0.0, "{r}");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    for pair in rows.chunks(2) {
        assert_eq!(pair[0]["transport"], "tcp", "{}", pair[0]);
        assert_eq!(pair[1]["transport"], "tls", "{}", pair[1]);
        assert_eq!(pair[0]["workload"], pair[1]["workload"]);
        assert_eq!(pair[0]["stopped"], pair[1]["stopped"]);
        assert!(pair[1]["pages_sent"].as_u64().unwrap() > 0, "{}", pair[1]);
    }
}

/// The Linux kernel and initrd (`scripts/linux-assets.sh` fetches and builds them once).
fn linux_assets() -> (String, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/linux-assets.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cannot run scripts/linux-assets.sh");
    assert!(out.status.success(), "scripts/linux-assets.sh failed");
    let text = text(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("linux-assets.sh printed no {key}: {text}"))
            .to_string()
    };
    (get("ESVM_LINUX_KERNEL"), get("ESVM_LINUX_INITRD"))
}

#[test]
fn bench_linux_json_has_every_phase_with_its_instructions() {
    let (kernel, initrd) = linux_assets();
    let r = json(&[
        "bench", "linux", "--kernel", &kernel, "--initrd", &initrd, "--qemu", "none", "--repeat",
        "1",
    ]);
    assert_eq!(r["repeat"], 1);
    assert_eq!(r["mem_bytes"], 256 << 20);
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "entry to /init",
            "entry to end of workload",
            "entry to reboot"
        ]
    );
    let mut last = (0.0, 0);
    for p in phases {
        let (wall, insns) = (
            p["esvm_wall_s"].as_f64().unwrap(),
            p["esvm_instructions"].as_u64().unwrap(),
        );
        assert!(wall > last.0 && insns > last.1, "{p}");
        let mips = p["esvm_mips"].as_f64().unwrap();
        assert!((mips - insns as f64 / wall / 1e6).abs() < 1e-6, "{p}");
        assert!(
            p["qemu_wall_s"].is_null() && p["sev_es_wall_s"].is_null(),
            "{p}"
        );
        last = (wall, insns);
    }
    assert!(r["sev_es_vmgexits"].is_null());
}
