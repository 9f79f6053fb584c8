//! Loopback throughput of the migration transport alone: 1 GiB (or GIB GiB, e.g. 0.25) written in
//! 256 KiB writes by one thread and read by another, over plain TCP and over a
//! [`esvm_tls::TlsStream`] pair, plus one core's AES-128-GCM sealing rate. No guest, no
//! framing, no checksums: the ceiling TLS leaves a migration on this machine.
//!
//!     cargo run --release -p esvm-tls --example throughput [GIB]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use esvm_tls::{certs, TlsClient, TlsServer, Validity};

const CHUNK: usize = 256 << 10;

fn pump(mut w: impl Write + Send + 'static, mut r: impl Read, total: u64) -> f64 {
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
    total as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let total = gib << 30;
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

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nodelay(true).unwrap();
    let tcp = pump(a, b, total);

    let addr = l.local_addr().unwrap();
    let t =
        std::thread::spawn(move || server.accept(l.accept().unwrap().0, Duration::from_secs(10)));
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
    let tls = pump(c, s, total);

    let aes = esvm_tls::aes_128_gcm_rate(1 << 30) / (1u64 << 30) as f64;
    println!(
        "{gib} GiB over loopback: plain TCP {tcp:.2} GiB/s, TLS 1.3 {tls:.2} GiB/s ({:+.0}%); \
         AES-128-GCM seals at {aes:.2} GiB/s on one core",
        (tls / tcp - 1.0) * 100.0
    );
}
