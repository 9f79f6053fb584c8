//! Loopback throughput of the migration transport alone: GIB GiB (default 1) written in
//! 256 KiB writes by one thread and read by another, over plain TCP and over a
//! [`esvm_tls::TlsStream`] pair, alternately RUNS times (default 1), plus one core's
//! AES-128-GCM sealing rate. No guest, no framing, no checksums: the ceiling TLS leaves a
//! migration on this machine. With several runs it prints each and the medians, of the
//! rate and of the CPU time the process spent per GiB (user + system, all threads: less
//! sensitive than the rate to other load on the machine).
//!
//!     cargo run --release -p esvm-tls --example throughput [GIB] [RUNS]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use esvm_tls::{certs, TlsClient, TlsServer, Validity};

const CHUNK: usize = 256 << 10;

/// CPU time of this process so far (all threads, user + system), from /proc/self/stat.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Clock ticks: 100 per second on Linux.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// Rate (GiB/s) and CPU seconds per GiB of moving `total` bytes from `w` to `r`.
fn pump(mut w: impl Write + Send + 'static, mut r: impl Read, total: u64) -> (f64, f64) {
    let cpu = cpu_secs();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0;
        while sent < total {
            w.write_all(&buf).unwrap();
            sent += CHUNK as u64;
        }
        w.flush().unwrap();
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "early end of stream");
        got += n as u64;
    }
    writer.join().unwrap();
    let gib = total as f64 / (1u64 << 30) as f64;
    (gib / t.elapsed().as_secs_f64(), (cpu_secs() - cpu) / gib)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let gib: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1.0);
    let total = ((gib * (1u64 << 30) as f64) as u64).div_ceil(CHUNK as u64) * CHUNK as u64;
    let dir = std::env::temp_dir().join(format!("esvm-tls-throughput-{}", std::process::id()));
    certs::make(
        &dir,
        &["dst,127.0.0.1".into(), "src".into()],
        Validity::Days(1),
        false,
    )
    .unwrap();
    let f = |n: &str| dir.join(n);
    let server = TlsServer::load(&f("dst.pem"), &f("dst-key.pem"), &f("ca.pem")).unwrap();
    let client =
        TlsClient::load(Some((&f("src.pem"), &f("src-key.pem"))), &f("ca.pem"), None).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let runs: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nodelay(true).unwrap();
        let p = pump(a, b, total);

        let addr = l.local_addr().unwrap();
        let server = server.clone();
        let t = std::thread::spawn(move || {
            server.accept(l.accept().unwrap().0, Duration::from_secs(10))
        });
        let c = client
            .connect(
                TcpStream::connect(addr).unwrap(),
                "127.0.0.1",
                Duration::from_secs(10),
            )
            .unwrap();
        let s = t.join().unwrap().unwrap();
        c.configure(Duration::from_secs(30), Duration::from_secs(30))
            .unwrap();
        s.configure(Duration::from_secs(30), Duration::from_secs(30))
            .unwrap();
        let e = pump(c, s, total);
        if runs > 1 {
            println!(
                "run {run}: plain TCP {:.2} GiB/s ({:.2} CPU s/GiB), TLS 1.3 {:.2} GiB/s \
                 ({:.2} CPU s/GiB)",
                p.0, p.1, e.0, e.1
            );
        }
        plain.push(p);
        tls.push(e);
    }
    let tcp = median(plain.iter().map(|x| x.0).collect());
    let tls_rate = median(tls.iter().map(|x| x.0).collect());
    let tcp_cpu = median(plain.iter().map(|x| x.1).collect());
    let tls_cpu = median(tls.iter().map(|x| x.1).collect());
    let aes = esvm_tls::aes_128_gcm_rate(1 << 30) / (1u64 << 30) as f64;
    let what = if runs > 1 { "medians of " } else { "" };
    println!(
        "{gib} GiB over loopback, {what}{runs} run(s): plain TCP {tcp:.2} GiB/s, TLS 1.3 \
         {tls_rate:.2} GiB/s ({:+.0}%); CPU per GiB: plain {tcp_cpu:.2} s, TLS {tls_cpu:.2} s \
         ({:+.0}%); AES-128-GCM seals at {aes:.2} GiB/s on one core",
        (tls_rate / tcp - 1.0) * 100.0,
        (tls_cpu / tcp_cpu - 1.0) * 100.0
    );
}
