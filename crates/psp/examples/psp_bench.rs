//! Throughput of LAUNCH_UPDATE_DATA and SEND/RECEIVE_UPDATE_DATA beside the
//! raw crypto limit. Run in release mode:
//! `cargo run --release -p esvm-psp --example psp_bench -- [MiB] [threads] [rounds]`
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or_else(|_| panic!("not a number: {a}")))
        .collect();
    let mib = args.first().copied().unwrap_or(256);
    let rounds = args.get(2).copied().unwrap_or(3);
    let threads: Vec<usize> = match args.get(1) {
        Some(t) => vec![*t],
        None => vec![1, 2],
    };
    for t in threads {
        let cfg = esvm_psp::bench::BenchConfig {
            buffer_bytes: mib << 20,
            packet_bytes: 4096,
            threads: t,
            rounds,
        };
        match esvm_psp::bench::run(cfg) {
            Ok(f) => println!("{f}\n"),
            Err(e) => {
                eprintln!("benchmark failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
