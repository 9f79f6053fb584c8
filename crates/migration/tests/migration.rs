//! Scenario tests: whole migrations over loopback TCP (one over a Unix socket) between mock guests, with dirtying,
//! limits, cancellation, connection cuts and tampering.

mod common;

use common::*;
use esvm_migration::mock::{MockGuest, MockSource, MockTarget};
use esvm_migration::{
    ErrorCode, GuestType, LimitPolicy, Phase, ReceiveError, ReceiverState, SendError, Sender,
    PAGE_SIZE,
};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

#[test]
fn plain_idle_migration_is_byte_identical() {
    let (_g, mut src) = guest(512, 2, 1);
    let phases = Arc::new(Mutex::new(Vec::new()));
    let mut sender = Sender::new(sender_config());
    let seen = Arc::clone(&phases);
    sender.on_progress(move |p| {
        let mut v = seen.lock().unwrap();
        if v.last() != Some(&p.phase) {
            v.push(p.phase);
        }
    });
    let run = migrate_with(&mut src, None, &mut sender, Fault::Direct, false);
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    assert!(out.converged && !out.forced);
    assert_eq!(
        out.passes, 2,
        "idle guest: one full pass and an empty final pass"
    );
    assert_eq!(out.pages_sent, 512);
    assert_eq!(out.final_pass_pages, 0);
    assert_eq!((src.pauses, src.resumes), (1, 0));
    assert_eq!(
        *phases.lock().unwrap(),
        vec![
            Phase::Handshake,
            Phase::PreCopy,
            Phase::StopAndCopy,
            Phase::Committing,
            Phase::Completed
        ]
    );
}

#[test]
fn first_pass_skips_pages_never_written() {
    let g = MockGuest::new(256);
    for p in (0..256).step_by(3) {
        assert!(g.write(p, 7, b"data"));
    }
    let mut src = MockSource::new(Arc::clone(&g), 1).unwrap();
    src.report_written = true;
    let run = migrate(&mut src, None, sender_config(), Fault::None);
    assert_migrated(&run, &src);
    assert_eq!(run.send.as_ref().unwrap().pages_sent, 86);
}

#[test]
fn dirtying_guest_converges_to_the_final_state() {
    let (g, mut src) = guest(1024, 2, 2);
    let dirtier = g.start_dirtier(16, 99);
    let run = migrate(&mut src, None, sender_config(), Fault::None);
    let touched = dirtier.stop();
    assert!(touched > 0, "the dirtier ran");
    // The source is paused for good, so its memory is the final state.
    assert_migrated(&run, &src);
    assert!(run.send.as_ref().unwrap().converged);
}

/// The same engine over a Unix stream socket (`unix:PATH` and `fd:N` in the VMM): a dirtying
/// guest arrives whole.
#[test]
fn dirtying_guest_migrates_over_a_unix_socket() {
    let (g, mut src) = guest(1024, 2, 3);
    let dirtier = g.start_dirtier(16, 7);
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let target = MockTarget::new(src.matching_target_config());
    let recv_thread = std::thread::spawn(move || {
        let mut target = target;
        let mut rx = esvm_migration::Receiver::new(receiver_config());
        let r = rx.run_stream(&mut target, b.into());
        (r, target, rx.state())
    });
    let send = Sender::new(sender_config()).run_stream(&mut src, a.into());
    let (recv, target, state) = recv_thread.join().unwrap();
    assert!(dirtier.stop() > 0, "the dirtier ran");
    let run = Run {
        send,
        recv,
        target,
        state,
        forwarded: 0,
        stream: Vec::new(),
    };
    assert_migrated(&run, &src);
}

#[test]
fn dirtying_guest_with_unreachable_limit_is_forced_at_the_cap() {
    let (g, mut src) = guest(1024, 1, 3);
    let dirtier = g.start_dirtier(16, 5);
    let cfg = esvm_migration::SenderConfig {
        downtime_limit: Duration::ZERO,
        max_passes: 4,
        on_limit: LimitPolicy::Force,
        ..sender_config()
    };
    let run = migrate(&mut src, None, cfg, Fault::None);
    dirtier.stop();
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    assert!(
        out.passes <= 5,
        "at most 4 pre-copy passes and the final one"
    );
    assert!(out.forced || out.converged);
}

/// A source whose every page read dirties other pages never converges to a zero limit.
fn busy_source(pages: u64, seed: u64) -> MockSource {
    let (_g, mut src) = guest(pages, 2, seed);
    src.dirty_on_read = 8;
    src
}

#[test]
fn pass_cap_with_cancel_policy_leaves_the_source_running() {
    let mut src = busy_source(128, 4);
    let cfg = esvm_migration::SenderConfig {
        downtime_limit: Duration::ZERO,
        max_passes: 3,
        on_limit: LimitPolicy::Cancel,
        pages_per_frame: 16,
        ..sender_config()
    };
    let run = migrate(&mut src, None, cfg, Fault::None);
    match &run.send {
        Err(SendError::NotConverged { limit, passes, .. }) => {
            assert_eq!((*limit, *passes), ("the pass cap", 3));
        }
        other => panic!("expected NotConverged, got {other:?}"),
    }
    assert!(matches!(run.recv, Err(ReceiveError::AbortedBySource(_))));
    assert_eq!(run.state, ReceiverState::Aborted);
    assert!(run.target.aborted && !run.target.committed);
    assert!(!src.is_paused() && !src.dead);
    assert_eq!(src.pauses, 0);
    assert_nothing_lost(&src, run.target.memory());
    // The same source migrates fine afterwards.
    src.dirty_on_read = 0;
    let run = migrate(&mut src, None, sender_config(), Fault::None);
    assert_migrated(&run, &src);
}

#[test]
fn pass_cap_with_force_policy_completes() {
    let mut src = busy_source(128, 5);
    let cfg = esvm_migration::SenderConfig {
        downtime_limit: Duration::ZERO,
        max_passes: 3,
        on_limit: LimitPolicy::Force,
        pages_per_frame: 16,
        ..sender_config()
    };
    let run = migrate(&mut src, None, cfg, Fault::None);
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    assert!(out.forced && !out.converged);
    assert_eq!(out.passes, 4);
    assert!(out.final_pass_pages > 0);
}

#[test]
fn timeout_cancels_or_forces_as_configured() {
    let mut src = busy_source(64, 6);
    let cfg = esvm_migration::SenderConfig {
        downtime_limit: Duration::ZERO,
        timeout: Some(Duration::ZERO),
        on_limit: LimitPolicy::Cancel,
        ..sender_config()
    };
    let run = migrate(&mut src, None, cfg.clone(), Fault::None);
    assert!(matches!(
        run.send,
        Err(SendError::NotConverged {
            limit: "the timeout",
            ..
        })
    ));
    // The message names the flags that change the outcome.
    let e = run.send.as_ref().unwrap_err().to_string();
    assert!(
        e.contains("--force-on-timeout") && e.contains("--timeout-s"),
        "{e}"
    );
    assert!(run.target.aborted && !src.is_paused() && !src.dead);
    assert_nothing_lost(&src, run.target.memory());

    let cfg = esvm_migration::SenderConfig {
        on_limit: LimitPolicy::Force,
        ..cfg
    };
    let run = migrate(&mut src, None, cfg, Fault::None);
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    assert!(out.forced);
    assert_eq!(
        out.passes, 2,
        "an interrupted first pass, then stop-and-copy"
    );
}

/// A peer that accepts the connection and never answers (not an esvm destination) fails
/// the migration at its timeout, not at the much longer I/O timeout, and the source runs on.
#[test]
fn silent_peer_fails_the_handshake_at_the_migration_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let (_guest, mut src) = guest(16, 1, 9);
    let mut sender = Sender::new(esvm_migration::SenderConfig {
        timeout: Some(Duration::from_millis(300)),
        io_timeout: Duration::from_secs(60),
        ..sender_config()
    });
    let t = std::time::Instant::now();
    let r = sender.run_tcp(&mut src, std::net::TcpStream::connect(addr).unwrap());
    let took = t.elapsed();
    let e = r.unwrap_err();
    assert!(matches!(e, SendError::HandshakeTimeout(_)), "{e}");
    assert!(e.to_string().contains("handshake"), "{e}");
    // The timeout, then at most the 2 s the sender drains a failed connection: not 60 s.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!src.is_paused() && !src.dead);
    silent.join().unwrap();
}

#[test]
fn cancel_from_another_thread_aborts_cleanly() {
    let mut src = busy_source(256, 7);
    let cfg = esvm_migration::SenderConfig {
        downtime_limit: Duration::ZERO,
        max_passes: u32::MAX,
        pages_per_frame: 8,
        ..sender_config()
    };
    let mut sender = Sender::new(cfg);
    let token = sender.cancel_token();
    let (tx, rx) = mpsc::channel();
    sender.on_progress(move |p| {
        if p.pass >= 3 {
            let _ = tx.send(());
        }
    });
    let canceller = std::thread::spawn(move || {
        if rx.recv().is_ok() {
            token.cancel();
        }
    });
    let run = migrate_with(&mut src, None, &mut sender, Fault::None, false);
    canceller.join().unwrap();
    assert!(
        matches!(run.send, Err(SendError::Cancelled)),
        "{:?}",
        run.send.err()
    );
    assert!(matches!(run.recv, Err(ReceiveError::AbortedBySource(_))));
    assert!(run.target.aborted && !run.target.committed);
    assert!(!src.is_paused() && !src.dead);
    assert_nothing_lost(&src, run.target.memory());
}

#[test]
fn sev_es_guest_migrates_through_transport_packets() {
    let (_g, mut src) = guest(300, 2, 8);
    src.guest_type = GuestType::SevEs;
    src.vcpu_states = vec![b"encrypted vmsa 0 + tracked".to_vec(), b"vmsa 1".to_vec()];
    let run = migrate(&mut src, None, sender_config(), Fault::None);
    assert_migrated(&run, &src);
    assert_eq!(run.target.packets_refused, 0);
}

#[test]
fn sev_es_packet_failing_authentication_is_refused() {
    let (_g, mut src) = guest(64, 1, 9);
    src.guest_type = GuestType::SevEs;
    src.corrupt_packet_for = Some(17);
    let run = migrate(&mut src, None, sender_config(), Fault::None);
    match &run.send {
        Err(SendError::Refused { code, message }) => {
            assert_eq!(*code, ErrorCode::Refused);
            assert!(message.contains("MAC"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(run.target.packets_refused, 1);
    assert!(run.target.aborted && !run.target.committed);
    assert_eq!(src.send_cancels, 1, "SEND_CANCEL after the failure");
    assert!(!src.is_paused() && !src.dead);
}

#[test]
fn incompatible_destination_is_refused_before_any_memory_moves() {
    let (_g, mut src) = guest(64, 2, 10);
    let mut local = src.matching_target_config();
    local.vcpus = 4;
    let run = migrate(
        &mut src,
        Some(MockTarget::new(local)),
        sender_config(),
        Fault::None,
    );
    match &run.send {
        Err(SendError::Refused { code, message }) => {
            assert_eq!(*code, ErrorCode::Incompatible);
            assert!(message.contains("vCPU"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(run.target.aborted);
    assert_eq!(src.pauses, 0);
    // SEV-ES into a plain destination is refused as well.
    src.guest_type = GuestType::SevEs;
    let mut plain = src.matching_target_config();
    plain.vm_type = GuestType::Plain;
    let run = migrate(
        &mut src,
        Some(MockTarget::new(plain)),
        sender_config(),
        Fault::None,
    );
    assert!(matches!(
        run.send,
        Err(SendError::Refused {
            code: ErrorCode::Incompatible,
            ..
        })
    ));
}

#[test]
fn failed_commit_resumes_the_source() {
    let (_g, mut src) = guest(64, 1, 11);
    let mut target = MockTarget::new(src.matching_target_config());
    target.fail_commit = true;
    let run = migrate(&mut src, Some(target), sender_config(), Fault::None);
    assert!(
        matches!(run.send, Err(SendError::Refused { .. })),
        "a definite refusal, not in doubt: {:?}",
        run.send.as_ref().err()
    );
    assert!(run.target.aborted && !run.target.committed);
    assert_eq!((src.pauses, src.resumes), (1, 1));
    assert!(!src.is_paused() && !src.dead);
}

/// Run one failed (or in-doubt) migration and check the failure semantics; returns the
/// sender error.
fn check_failed_run(src: &mut MockSource, run: &Run, what: &str) {
    let err = match &run.send {
        Ok(_) => panic!("{what}: the migration succeeded"),
        Err(e) => e,
    };
    assert!(!run.target.committed, "{what}: destination committed");
    assert!(run.target.aborted, "{what}: destination did not abort");
    assert_eq!(run.state, ReceiverState::Aborted, "{what}");
    assert!(!src.dead, "{what}: source marked dead");
    if err.is_in_doubt() {
        // Commit outcome unknown: the source must still be paused. The destination did
        // not commit, so the operator resumes it.
        assert!(src.is_paused(), "{what}: in doubt but the source runs");
        src.force_resume();
    }
    assert!(!src.is_paused(), "{what}: source left paused");
    assert_eq!(src.pauses, src.resumes, "{what}: pause/resume mismatch");
    assert_nothing_lost(src, run.target.memory());
}

#[test]
fn connection_cut_anywhere_loses_nothing() {
    let (_g, mut src) = guest(96, 2, 12);
    src.dirty_on_read = 3;
    let cfg = esvm_migration::SenderConfig {
        pages_per_frame: 16,
        max_passes: 3,
        on_limit: LimitPolicy::Force,
        downtime_limit: Duration::ZERO,
        ..sender_config()
    };
    // A full run through the proxy, recorded, to learn the stream's shape. The source then
    // is dead, so cuts are tried on a fresh guest with the same settings.
    let reference = {
        let (_g2, mut s2) = guest(96, 2, 12);
        s2.dirty_on_read = 3;
        let mut sender = Sender::new(cfg.clone());
        let run = migrate_with(&mut s2, None, &mut sender, Fault::None, true);
        assert_migrated(&run, &s2);
        run.stream
    };
    let len = reference.len() as u64;
    let mut cuts: Vec<u64> = (0..=40).collect();
    for start in frame_starts(&reference) {
        cuts.extend([
            start.saturating_sub(1),
            start,
            start + 1,
            start + 31,
            start + 33,
        ]);
    }
    cuts.extend((1..40).map(|i| len * i / 40));
    cuts.extend([len - 1, len - 2]);
    cuts.retain(|c| *c < len);
    cuts.sort_unstable();
    cuts.dedup();
    assert!(cuts.len() > 80, "{} cut points", cuts.len());
    eprintln!("{} cut points over a {len}-byte stream", cuts.len());
    for n in &cuts {
        let run = migrate(&mut src, None, cfg.clone(), Fault::CutAfter(*n));
        assert!(run.forwarded <= *n);
        check_failed_run(&mut src, &run, &format!("cut after {n} of {len} bytes"));
    }
    // After all those failures a complete migration gives identical memory.
    src.dirty_on_read = 0;
    let run = migrate(&mut src, None, sender_config(), Fault::None);
    assert_migrated(&run, &src);
}

#[test]
fn lost_commit_acknowledgement_leaves_the_source_paused() {
    let (_g, mut src) = guest(64, 1, 13);
    let run = migrate(&mut src, None, sender_config(), Fault::SwallowCommitted);
    assert!(
        run.target.committed,
        "the destination got everything and committed"
    );
    assert!(run.recv.is_ok());
    let err = run
        .send
        .as_ref()
        .expect_err("no commit acknowledgement arrived");
    assert!(err.is_in_doubt(), "{err}");
    assert!(
        src.is_paused() && !src.dead,
        "in doubt: paused, neither resumed nor dead"
    );
    assert_eq!(src.resumes, 0);
    assert!(run.target.memory() == src.guest().snapshot().as_slice());
}

#[test]
fn cut_at_the_end_never_runs_the_guest_twice() {
    // Forward the whole source stream, then cut both directions: depending on timing the
    // destination commits (and the acknowledgement may be lost) or loses the tail.
    let len = {
        let (_g2, mut s2) = guest(64, 1, 13);
        let mut sender = Sender::new(sender_config());
        migrate_with(&mut s2, None, &mut sender, Fault::None, true)
            .stream
            .len() as u64
    };
    for n in [len - 1, len] {
        let (_g, mut src) = guest(64, 1, 13);
        let run = migrate(&mut src, None, sender_config(), Fault::CutAfter(n));
        assert!(
            run.target.committed != run.target.aborted,
            "exactly one outcome"
        );
        let source_runs = !src.is_paused();
        assert!(
            !(run.target.committed && source_runs),
            "cut after {n}/{len}: the guest runs on both sides"
        );
        match &run.send {
            Ok(_) => assert!(src.dead && run.target.committed),
            Err(e) if e.is_in_doubt() => assert!(src.is_paused() && !src.dead),
            Err(e) => panic!("cut after {n}/{len}: a definite failure after Complete: {e}"),
        }
    }
}

#[test]
fn flipped_bytes_are_refused() {
    let (_g, mut src) = guest(48, 2, 14);
    let cfg = esvm_migration::SenderConfig {
        pages_per_frame: 16,
        ..sender_config()
    };
    let reference = {
        let (_g2, mut s2) = guest(48, 2, 14);
        let mut sender = Sender::new(cfg.clone());
        migrate_with(&mut s2, None, &mut sender, Fault::None, true).stream
    };
    let len = reference.len() as u64;
    let starts = frame_starts(&reference);
    let mut offsets: Vec<u64> = Vec::new();
    for (i, s) in starts.iter().enumerate() {
        // every header byte of the first frames, a few of the others, and payload bytes
        if i < 3 {
            offsets.extend(*s..*s + 32);
        } else {
            offsets.extend([*s, *s + 6, *s + 12, *s + 16, *s + 24, *s + 28, *s + 31]);
        }
        offsets.push(s + 32);
        offsets.push(s + 40);
    }
    offsets.extend((1..30).map(|i| len * i / 30));
    offsets.push(len - 1);
    offsets.retain(|o| *o < len);
    offsets.sort_unstable();
    offsets.dedup();
    eprintln!("{} flipped offsets over a {len}-byte stream", offsets.len());
    for off in &offsets {
        let run = migrate(&mut src, None, cfg.clone(), Fault::Flip(*off));
        let what = format!("bit flipped at {off} of {len}");
        check_failed_run(&mut src, &run, &what);
        assert!(
            !run.send.as_ref().unwrap_err().is_in_doubt(),
            "{what}: the receiver should have refused explicitly"
        );
        assert!(run.recv.is_err(), "{what}");
    }
    let run = migrate(&mut src, None, cfg, Fault::None);
    assert_migrated(&run, &src);
}

#[test]
fn progress_reports_are_consistent() {
    let (_g, mut src) = guest(256, 1, 15);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let mut sender = Sender::new(esvm_migration::SenderConfig {
        pages_per_frame: 4,
        progress_interval: Duration::ZERO,
        ..sender_config()
    });
    let r = Arc::clone(&reports);
    sender.on_progress(move |p| r.lock().unwrap().push(p.clone()));
    let run = migrate_with(&mut src, None, &mut sender, Fault::None, false);
    assert_migrated(&run, &src);
    let reports = reports.lock().unwrap();
    assert!(reports.len() > 64, "a report per frame");
    let mut last_sent = 0;
    for p in reports.iter() {
        assert!(p.pages_sent >= last_sent, "monotonic");
        last_sent = p.pages_sent;
        assert!(p.pass_pages_sent <= p.pass_pages_total);
        if p.phase != Phase::Handshake {
            assert_eq!(p.mem_pages, 256);
        }
    }
    let last = reports.last().unwrap();
    assert_eq!(last.phase, Phase::Completed);
    assert_eq!(last.pages_sent, 256);
    assert!(last.bytes_sent > 256 * PAGE_SIZE);
    let after_first = reports
        .iter()
        .find(|p| p.pass == 1 && p.estimated_downtime_ms.is_some())
        .expect("an estimate after the first pass");
    assert!(after_first.bandwidth_bytes_per_sec > 0.0);
}

#[test]
fn destination_cancel_is_reported_to_the_source() {
    let (_g, mut src) = guest(64, 1, 16);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut target = MockTarget::new(src.matching_target_config());
    let rx = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut receiver = esvm_migration::Receiver::new(receiver_config());
        receiver.cancel_token().cancel();
        let r = receiver.run_tcp(&mut target, s);
        (r, target, receiver.state())
    });
    let stream = std::net::TcpStream::connect(addr).unwrap();
    let send = Sender::new(sender_config()).run_tcp(&mut src, stream);
    let (recv, target, state) = rx.join().unwrap();
    assert!(matches!(recv, Err(ReceiveError::Cancelled)));
    assert_eq!(state, ReceiverState::Aborted);
    assert!(target.aborted);
    assert!(matches!(
        send,
        Err(SendError::Refused {
            code: ErrorCode::Cancelled,
            ..
        })
    ));
    assert!(!src.is_paused() && !src.dead);
}

#[test]
fn one_page_frames_stay_within_the_frame_window() {
    let (_g, mut src) = guest(4096, 1, 17);
    let cfg = esvm_migration::SenderConfig {
        pages_per_frame: 1,
        ..sender_config()
    };
    let run = migrate(&mut src, None, cfg, Fault::Direct);
    assert_migrated(&run, &src);
    assert_eq!(run.send.as_ref().unwrap().pages_sent, 4096);
}
