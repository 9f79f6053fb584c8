//! Migration throughput over loopback TCP between mock guests (sender and receiver threads
//! in one process), idle and with a background writer dirtying pages.
//!
//!     cargo bench -p esvm-migration --bench migration_throughput
//!
//! Set `MIGRATION_BENCH_MIB=256` to run one size only, `MIGRATION_BENCH_REPS` for the number
//! of repetitions (default 3). Prints one Markdown table row per scenario (medians).

use esvm_migration::mock::{MockGuest, MockSource, MockTarget};
use esvm_migration::{MigrationSource, Receiver, ReceiverConfig, Sender, SenderConfig, PAGE_SIZE};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Scenario {
    name: &'static str,
    dirty_pages_per_ms: u64,
    pages_per_frame: u32,
    prefault: bool,
    downtime_limit_ms: u64,
}

struct Sample {
    /// CPU seconds per GiB sent, sender thread and receiver thread.
    sender_cpu_s_per_gib: f64,
    receiver_cpu_s_per_gib: f64,
    first_pass_gib_s: f64,
    passes: u32,
    final_pages: u64,
    downtime_ms: f64,
    estimated_ms: f64,
}

/// CPU time this thread has run, from /proc/thread-self/schedstat (0 if unavailable).
fn thread_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

fn gib_s(bytes: f64, secs: f64) -> f64 {
    bytes / secs / (1u64 << 30) as f64
}

fn migrate_once(guest: &Arc<MockGuest>, sc: &Scenario, seed: u64) -> Sample {
    let mut src = MockSource::new(Arc::clone(guest), 2).expect("one source at a time");
    src.force_resume();
    let mut target = MockTarget::new(src.config());
    if sc.prefault {
        target.prefault();
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let rx = std::thread::spawn(move || {
        let mut target = target;
        let (s, _) = listener.accept().expect("accept");
        let c0 = thread_cpu_s();
        let r = Receiver::new(ReceiverConfig::default()).run_tcp(&mut target, s);
        (r, target, thread_cpu_s() - c0)
    });
    let dirtier =
        (sc.dirty_pages_per_ms > 0).then(|| guest.start_dirtier(sc.dirty_pages_per_ms, seed));
    let stream = TcpStream::connect(addr).expect("connect");
    let c0 = thread_cpu_s();
    let out = Sender::new(SenderConfig {
        pages_per_frame: sc.pages_per_frame,
        downtime_limit: Duration::from_millis(sc.downtime_limit_ms),
        ..SenderConfig::default()
    })
    .run_tcp(&mut src, stream)
    .expect("migration succeeds");
    let sender_cpu = thread_cpu_s() - c0;
    if let Some(d) = dirtier {
        d.stop();
    }
    let (r, target, receiver_cpu) = rx.join().expect("receiver thread");
    r.expect("receiver succeeds");
    assert!(guest.same_as(target.memory()), "destination memory differs");
    let gib = out.bytes_sent as f64 / (1u64 << 30) as f64;
    Sample {
        sender_cpu_s_per_gib: sender_cpu / gib,
        receiver_cpu_s_per_gib: receiver_cpu / gib,
        first_pass_gib_s: out.first_pass_bandwidth / (1u64 << 30) as f64,
        passes: out.passes,
        final_pages: out.final_pass_pages,
        downtime_ms: out.downtime.as_secs_f64() * 1e3,
        estimated_ms: out
            .estimated_downtime
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn crc_gib_s() -> f64 {
    let buf = vec![0x5au8; 64 << 20];
    let t = Instant::now();
    let mut c = 0;
    for _ in 0..8 {
        c = crc32c::crc32c_append(c, &buf);
    }
    std::hint::black_box(c);
    gib_s((8 * buf.len()) as f64, t.elapsed().as_secs_f64())
}

fn main() {
    let sizes: Vec<u64> = match std::env::var("MIGRATION_BENCH_MIB") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![256, 1024],
    };
    let reps: usize = std::env::var("MIGRATION_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load().trim());
    println!("CRC32C: {:.1} GiB/s on one core", crc_gib_s());
    println!(
        "| guest | workload | first pass GiB/s (best / median) | passes | final-pass pages | \
         downtime ms (median; estimate) | CPU s/GiB sender + receiver |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mib in sizes {
        let pages = mib * (1 << 20) / PAGE_SIZE;
        let guest = MockGuest::new(pages);
        guest.fill_random(42);
        let sc =
            |name, dirty_pages_per_ms, pages_per_frame, prefault, downtime_limit_ms| Scenario {
                name,
                dirty_pages_per_ms,
                pages_per_frame,
                prefault,
                downtime_limit_ms,
            };
        let scenarios = [
            sc("idle", 0, 1024, true, 300),
            sc("idle, cold destination memory", 0, 1024, false, 300),
            sc("idle, 1 MiB frames", 0, 256, true, 300),
            sc("dirtying 10 pages/ms", 10, 1024, true, 300),
            sc("dirtying 50 pages/ms", 50, 1024, true, 300),
            sc("dirtying 50 pages/ms, limit 10 ms", 50, 1024, true, 10),
        ];
        let only = std::env::var("MIGRATION_BENCH_ONLY").ok();
        for s in &scenarios {
            if only.as_deref().is_some_and(|o| o != s.name) {
                continue;
            }
            let samples: Vec<Sample> = (0..reps)
                .map(|i| migrate_once(&guest, s, i as u64 + 1))
                .collect();
            let name = s.name;
            let first: Vec<f64> = samples.iter().map(|s| s.first_pass_gib_s).collect();
            let best = first.iter().cloned().fold(0.0, f64::max);
            println!(
                "| {mib} MiB | {name} | {best:.2} / {:.2} | {} | {} | {:.2}; {:.2} | {:.2} + {:.2} |",
                median(first),
                median(samples.iter().map(|s| s.passes as f64).collect()),
                median(samples.iter().map(|s| s.final_pages as f64).collect()),
                median(samples.iter().map(|s| s.downtime_ms).collect()),
                median(samples.iter().map(|s| s.estimated_ms).collect()),
                median(samples.iter().map(|s| s.sender_cpu_s_per_gib).collect()),
                median(samples.iter().map(|s| s.receiver_cpu_s_per_gib).collect()),
            );
        }
    }
    println!("load average at end: {}", load().trim());
}
