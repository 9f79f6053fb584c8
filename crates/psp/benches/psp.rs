//! Criterion micro-benchmarks of one 4 KiB packet: SEND_UPDATE_DATA,
//! RECEIVE_UPDATE_DATA and the raw AES-128-CTR / HMAC-SHA256 they are built
//! on. The GiB/s figures for BENCHMARKS.md come from `examples/psp_bench.rs`.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use esvm_psp::{EmulatedAmdCa, FirmwareVersion, FlatMemory, LaunchStart, Policy, Psp};

fn packets(c: &mut Criterion) {
    let ca = EmulatedAmdCa::generate(2048).expect("CA");
    let mut src = Psp::ephemeral(&ca, FirmwareVersion::default()).expect("psp");
    let mut dst = Psp::ephemeral(&ca, FirmwareVersion::default()).expect("psp");
    src.init().expect("init");
    dst.init().expect("init");
    let mem = FlatMemory::new(1 << 20);
    let h = src
        .launch_start(&LaunchStart {
            policy: Policy(0),
            owner: None,
            share_key_with: None,
        })
        .expect("launch");
    src.activate(h, 1).expect("activate");
    src.launch_measure(h).expect("measure");
    src.launch_finish(h).expect("finish");
    let so = src
        .send_start(h, &dst.pdh_cert_export().expect("chain").to_bytes())
        .expect("send start");
    let r = dst
        .receive_start(so.policy, so.pdh.as_bytes(), &so.session.to_bytes())
        .expect("receive start");
    dst.activate(r, 1).expect("activate");
    let sw = src.send_worker(h).expect("worker");
    let rw = dst.receive_worker(r).expect("worker");
    let mut g = c.benchmark_group("psp_4k_packet");
    g.throughput(Throughput::Bytes(4096));
    let mut buf = vec![0u8; 4096];
    g.bench_function("send_update_data", |b| {
        b.iter(|| sw.send_update_data_into(&mem, 0, &mut buf).expect("send"))
    });
    // Receiving needs a fresh packet each time (replays are refused), so this
    // one times a send and a receive together.
    g.bench_function("send_then_receive_update_data", |b| {
        b.iter(|| {
            let hd = sw.send_update_data_into(&mem, 0, &mut buf).expect("send");
            rw.receive_update_data(&mem, 0, &hd, &buf).expect("receive");
        })
    });
    g.finish();
}

criterion_group!(benches, packets);
criterion_main!(benches);
