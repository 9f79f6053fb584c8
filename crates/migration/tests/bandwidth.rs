//! The bandwidth cap and the live limits of a migration over loopback TCP between mock
//! guests: the cap holds in the measured figures, and changing it (or the downtime limit)
//! during the migration takes effect.

mod common;

use common::*;
use esvm_migration::{Phase, Sender, SenderConfig, PAGE_SIZE};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// 8 MiB at 16 MiB/s: the full pass cannot take less than 0.5 s, and no measured
/// bandwidth (per pass, overall, in any progress report) exceeds the cap. Uncapped, the
/// same migration takes a few milliseconds here.
#[test]
fn a_capped_migration_stays_under_the_cap() {
    let cap = 16 * MIB;
    let pages = 8 * MIB / PAGE_SIZE;
    let (_g, mut src) = guest(pages, 1, 11);
    let mut sender = Sender::new(SenderConfig {
        max_bandwidth: Some(cap),
        ..sender_config()
    });
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    sender.on_progress(move |p| seen.lock().unwrap().push(p.clone()));
    let t0 = Instant::now();
    let run = migrate_with(&mut src, None, &mut sender, Fault::Direct, false);
    let took = t0.elapsed();
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        out.first_pass_bandwidth <= cap as f64,
        "{} > {cap}",
        out.first_pass_bandwidth
    );
    // The cap is what limits: the pass ran close to it.
    assert!(out.first_pass_bandwidth >= cap as f64 * 0.5, "{out:?}");
    assert!(out.bandwidth <= cap as f64, "{out:?}");
    let reports = reports.lock().unwrap();
    assert!(reports.iter().any(|p| p.bandwidth_bytes_per_sec > 0.0));
    for p in reports.iter() {
        assert!(p.bandwidth_bytes_per_sec <= cap as f64, "{p:?}");
        assert_eq!(p.max_bandwidth_bytes_per_sec, Some(cap), "{p:?}");
    }
}

/// A migration capped at 1 MiB/s would need 8 s for 8 MiB; lifting the cap from another
/// thread once the first pass is under way lets it finish at once. Lowering the downtime
/// limit meanwhile shows in the progress reports.
#[test]
fn limits_change_while_the_migration_runs() {
    let pages = 8 * MIB / PAGE_SIZE;
    let (_g, mut src) = guest(pages, 1, 12);
    let mut sender = Sender::new(SenderConfig {
        max_bandwidth: Some(MIB),
        ..sender_config()
    });
    let limits = sender.limits();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    sender.on_progress(move |p| seen.lock().unwrap().push(p.clone()));
    let changer = {
        let reports = Arc::clone(&reports);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !reports
                .lock()
                .unwrap()
                .iter()
                .any(|p: &esvm_migration::Progress| p.phase == Phase::PreCopy && p.pages_sent > 0)
            {
                assert!(Instant::now() < deadline, "no page was sent");
                std::thread::sleep(Duration::from_millis(5));
            }
            limits.set_downtime_limit(Duration::from_millis(250));
            limits.set_max_bandwidth(None);
        })
    };
    let t0 = Instant::now();
    let run = migrate_with(&mut src, None, &mut sender, Fault::Direct, false);
    let took = t0.elapsed();
    changer.join().unwrap();
    assert_migrated(&run, &src);
    assert!(
        took < Duration::from_secs(4),
        "the lifted cap still applied: {took:?}"
    );
    let reports = reports.lock().unwrap();
    assert_eq!(reports[0].max_bandwidth_bytes_per_sec, Some(MIB));
    assert_eq!(reports[0].downtime_limit_ms, 300.0);
    let last = reports.last().unwrap();
    assert_eq!(last.phase, Phase::Completed);
    assert_eq!(last.max_bandwidth_bytes_per_sec, None);
    assert_eq!(last.downtime_limit_ms, 250.0);
}

/// Cancelling a migration that waits for its bandwidth slot ends it promptly.
#[test]
fn a_paced_migration_can_be_cancelled() {
    let (_g, mut src) = guest(2048, 1, 13);
    let mut sender = Sender::new(SenderConfig {
        max_bandwidth: Some(256 << 10),
        ..sender_config()
    });
    let cancel = sender.cancel_token();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel();
    });
    let t0 = Instant::now();
    let run = migrate_with(&mut src, None, &mut sender, Fault::Direct, false);
    t.join().unwrap();
    assert!(
        matches!(run.send, Err(esvm_migration::SendError::Cancelled)),
        "{:?}",
        run.send
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(src.resumes, 0, "the source was never paused");
}
