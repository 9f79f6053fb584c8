//! Post-copy scenario tests over loopback TCP between mock guests: the switch, pages pulled
//! on demand ahead of the background order, SEV-ES packets after the switch, refusals, and
//! the failure semantics after the switch (both sides end with an error, the source never
//! resumes, the destination's guest is stopped and never sees a wrong page).

mod common;

use common::*;
use esvm_migration::mock::MockTarget;
use esvm_migration::protocol::{
    encode_config, encode_page_table, encode_vcpu_prefix, FrameType, FrameWriter, Hello, PageRun,
    PollReader, PostcopySwitch,
};
use esvm_migration::{
    GuestType, PageSet, Phase, ReceiveError, ReceiverState, SendError, Sender, SenderConfig,
    PAGE_SIZE,
};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn postcopy_config(after: u32) -> SenderConfig {
    SenderConfig {
        postcopy_after: Some(after),
        ..sender_config()
    }
}

/// Every page missing at the switch was published exactly once, and nothing else was.
fn assert_published_once(t: &MockTarget) {
    let pending = t.pending_at_switch.as_ref().expect("a switch happened");
    let mut got = t.published.clone();
    got.sort_unstable();
    let want: Vec<u64> = pending.iter().collect();
    assert_eq!(got, want, "each missing page published exactly once");
    assert!(t.present.as_ref().is_some_and(|p| p.count() == p.pages()));
}

#[test]
fn postcopy_with_a_dirtying_guest_arrives_whole() {
    let (g, mut src) = guest(1024, 2, 21);
    let dirtier = g.start_dirtier(16, 5);
    let phases = Arc::new(Mutex::new(Vec::new()));
    let mut sender = Sender::new(postcopy_config(1));
    let seen = Arc::clone(&phases);
    sender.on_progress(move |p| {
        let mut v = seen.lock().unwrap();
        if v.last() != Some(&p.phase) {
            v.push(p.phase);
        }
    });
    let run = migrate_with(&mut src, None, &mut sender, Fault::None, false);
    assert!(dirtier.stop() > 0);
    // The source is dead and paused: its memory is the final state.
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    let pc = out.postcopy.as_ref().expect("post-copy figures");
    assert_eq!(out.passes, 2, "one pre-copy pass, then the post-copy pass");
    assert!(
        pc.pages_at_switch > 0,
        "the dirtier left pages for post-copy"
    );
    assert_published_once(&run.target);
    let rx = run.recv.as_ref().unwrap();
    assert_eq!(
        rx.postcopy.as_ref().map(|p| p.pending_at_switch),
        Some(pc.pages_at_switch)
    );
    assert_eq!(
        *phases.lock().unwrap(),
        vec![
            Phase::Handshake,
            Phase::PreCopy,
            Phase::StopAndCopy,
            Phase::PostCopy,
            Phase::Committing,
            Phase::Completed
        ]
    );
    assert_eq!((src.pauses, src.resumes), (1, 0));
}

#[test]
fn requested_pages_jump_the_queue() {
    let (_g, mut src) = guest(2048, 1, 22);
    let mut target = MockTarget::new(src.matching_target_config());
    // The "guest" faults on high pages first; the background order is ascending.
    target.fault_script = vec![2000, 1500, 1999];
    let run = migrate(&mut src, Some(target), postcopy_config(0), Fault::None);
    assert_migrated(&run, &src);
    let t = &run.target;
    assert_published_once(t);
    assert_eq!(t.pending_at_switch.as_ref().unwrap().count(), 2048);
    let at = |p: u64| t.published.iter().position(|x| *x == p).unwrap();
    for p in [2000, 1500, 1999] {
        assert!(
            at(p) < at(1000),
            "page {p} was requested and must arrive before the background reaches page \
             1000 (it arrived {}th, page 1000 {}th)",
            at(p),
            at(1000)
        );
    }
    let pc = run.send.as_ref().unwrap().postcopy.clone().unwrap();
    assert_eq!(pc.requests, 3);
    assert_eq!(pc.requests_served, 3);
    assert_eq!(
        run.recv
            .as_ref()
            .unwrap()
            .postcopy
            .as_ref()
            .unwrap()
            .requested,
        3
    );
}

#[test]
fn sev_es_pages_arrive_as_packets_after_the_switch() {
    let (g, mut src) = guest(512, 2, 23);
    src.guest_type = GuestType::SevEs;
    let dirtier = g.start_dirtier(8, 6);
    let mut target = MockTarget::new(src.matching_target_config());
    target.fault_script = vec![400, 3];
    let run = migrate(&mut src, Some(target), postcopy_config(1), Fault::None);
    dirtier.stop();
    assert_migrated(&run, &src);
    assert_published_once(&run.target);
    assert_eq!(run.target.packets_refused, 0);
}

#[test]
fn sev_es_packet_failing_authentication_after_the_switch_stops_both_sides() {
    let (_g, mut src) = guest(256, 1, 24);
    src.guest_type = GuestType::SevEs;
    src.corrupt_packet_for = Some(200);
    let run = migrate(&mut src, None, postcopy_config(0), Fault::None);
    assert_lost_on_both_sides(&run, &src);
    let t = &run.target;
    assert_eq!(t.packets_refused, 1);
    assert!(!t.is_present(200), "the refused page never became visible");
}

/// After the switch: the source is paused for good, the destination stopped its guest and
/// did not commit.
fn assert_lost_on_both_sides(run: &Run, src: &esvm_migration::mock::MockSource) {
    match &run.send {
        Err(e) => assert!(e.is_postcopy_lost(), "{e}"),
        Ok(_) => panic!("the migration must fail"),
    }
    let msg = run.send.as_ref().unwrap_err().to_string();
    assert!(msg.contains("neither side holds the whole guest"), "{msg}");
    assert!(src.is_paused() && !src.dead, "the source stays paused");
    assert_eq!(src.resumes, 0, "the source never resumes after the switch");
    assert!(run.recv.is_err());
    assert_eq!(run.state, ReceiverState::Aborted);
    let t = &run.target;
    assert!(
        t.stopped_after_run,
        "the destination's guest ran and was stopped"
    );
    assert!(!t.running && !t.committed && t.aborted);
}

#[test]
fn a_cut_after_the_switch_ends_both_sides_with_an_error() {
    let (_g, mut src) = guest(2048, 1, 25);
    // Everything is pending (switch before any pass); 2048 pages are 8 MiB of post-copy
    // frames, so a cut after 1 MiB lands well after the switch and before the end.
    let run = migrate(&mut src, None, postcopy_config(0), Fault::CutAfter(1 << 20));
    assert_lost_on_both_sides(&run, &src);
    let t = &run.target;
    // Whatever arrived is exactly the source's content; nothing else is visible.
    let mem = src.guest().snapshot();
    let ps = PAGE_SIZE as usize;
    for p in 0..2048u64 {
        let r = p as usize * ps..(p as usize + 1) * ps;
        if t.is_present(p) {
            assert_eq!(
                &t.memory()[r.clone()],
                &mem[r],
                "page {p} present but wrong"
            );
        }
    }
    assert!(t.published.len() < 2048, "the cut came before the end");
}

#[test]
fn a_corrupt_page_after_the_switch_is_refused_and_never_visible() {
    let (_g, mut src) = guest(1024, 1, 26);
    // Record a clean post-copy migration's stream to find a page byte after the switch.
    let clean = {
        let (_g2, mut src2) = guest(1024, 1, 26);
        let mut sender = Sender::new(postcopy_config(0));
        migrate_with(&mut src2, None, &mut sender, Fault::None, true)
    };
    let starts = frame_starts(&clean.stream);
    let run_at = starts
        .iter()
        .position(|&o| {
            u16::from_le_bytes([clean.stream[o as usize + 6], clean.stream[o as usize + 7]])
                == FrameType::PostcopyRun as u16
        })
        .expect("a PostcopyRun frame");
    // Flip a byte in the page data of the third post-copy Pages frame.
    let off = starts[run_at + 3] + 32 + 8 + 16 + 100;
    let run = migrate(&mut src, None, postcopy_config(0), Fault::Flip(off));
    assert_lost_on_both_sides(&run, &src);
    assert!(
        matches!(&run.recv, Err(ReceiveError::Protocol(_))),
        "{:?}",
        run.recv
    );
    // The corrupted frame's pages were written but never published.
    let t = &run.target;
    let mem = src.guest().snapshot();
    let ps = PAGE_SIZE as usize;
    for p in 0..1024u64 {
        let r = p as usize * ps..(p as usize + 1) * ps;
        if t.is_present(p) {
            assert_eq!(
                &t.memory()[r.clone()],
                &mem[r],
                "page {p} visible but wrong"
            );
        }
    }
}

#[test]
fn a_destination_without_postcopy_is_refused_before_the_switch() {
    let (_g, mut src) = guest(128, 1, 27);
    let mut target = MockTarget::new(src.matching_target_config());
    target.postcopy_supported = false;
    let run = migrate(&mut src, Some(target), postcopy_config(1), Fault::None);
    assert!(
        matches!(run.send, Err(SendError::PostcopyUnsupported)),
        "{:?}",
        run.send
    );
    assert!(run.target.aborted && !run.target.running);
    assert!(!src.is_paused() && !src.dead, "the source keeps running");
}

#[test]
fn a_live_postcopy_request_switches_a_migration_that_cannot_converge() {
    let (g, mut src) = guest(2048, 1, 28);
    let dirtier = g.start_dirtier(64, 8);
    let cfg = SenderConfig {
        downtime_limit: Duration::from_millis(1),
        max_passes: 1000,
        max_bandwidth: Some(16 << 20),
        ..sender_config()
    };
    let mut sender = Sender::new(cfg);
    let limits = sender.limits();
    sender.on_progress(move |p| {
        if p.phase == Phase::PreCopy && p.pass >= 2 {
            limits.request_postcopy();
        }
    });
    let run = migrate_with(&mut src, None, &mut sender, Fault::None, false);
    dirtier.stop();
    assert_migrated(&run, &src);
    let out = run.send.as_ref().unwrap();
    assert!(out.postcopy.is_some(), "switched to post-copy");
    assert!(out.passes >= 3);
    assert_published_once(&run.target);
}

/// A hand-driven source: a page that is not missing (already final at the switch), sent
/// after the switch, is refused — it could overwrite what the running guest wrote.
#[test]
fn a_page_that_is_not_missing_is_refused_after_the_switch() {
    let pages = 64u64;
    let mut local = esvm_migration::MigrationConfig {
        mem_size: pages * PAGE_SIZE,
        vcpus: 1,
        vm_type: GuestType::Plain,
        features: 0,
        extra: Vec::new(),
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let target = MockTarget::new(local.clone());
    let h = std::thread::spawn(move || {
        let mut target = target;
        let (s, _) = l.accept().unwrap();
        let mut rx = esvm_migration::Receiver::new(receiver_config());
        let r = rx.run_tcp(&mut target, s);
        (r, target, rx.state())
    });
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = PollReader::responses(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s);
    let next = |r: &mut PollReader<TcpStream>| loop {
        if let Some(f) = r.poll().unwrap() {
            return f.header.frame_type;
        }
    };
    w.send(FrameType::Hello, &[&Hello::ours().encode()])
        .unwrap();
    assert_eq!(next(&mut r), FrameType::HelloAck);
    local.features = 0;
    w.send(FrameType::Config, &[&encode_config(&local)])
        .unwrap();
    assert_eq!(next(&mut r), FrameType::ConfigAck);
    let mut pending = PageSet::new(pages);
    pending.set_range(10, 5);
    let sw = PostcopySwitch { pass: 1, pending }.encode();
    w.send(FrameType::PostcopySwitch, &[&sw]).unwrap();
    w.send(FrameType::DeviceState, &[b"dev"]).unwrap();
    w.send(FrameType::VcpuState, &[&encode_vcpu_prefix(0), b"regs"])
        .unwrap();
    w.send(FrameType::PostcopyRun, &[]).unwrap();
    for _ in 0..4 {
        assert_eq!(next(&mut r), FrameType::Ack);
    }
    // Page 12 is missing: accepted. Page 3 is not: refused.
    let mut table = Vec::new();
    encode_page_table(
        1,
        &[PageRun {
            first: 12,
            count: 1,
        }],
        &mut table,
    );
    w.send(FrameType::Pages, &[&table, &[7u8; 4096]]).unwrap();
    assert_eq!(next(&mut r), FrameType::Ack);
    encode_page_table(1, &[PageRun { first: 3, count: 1 }], &mut table);
    w.send(FrameType::Pages, &[&table, &[9u8; 4096]]).unwrap();
    assert_eq!(next(&mut r), FrameType::Error);
    drop(w);
    drop(r);
    let (res, t, state) = h.join().unwrap();
    let e = res.unwrap_err();
    assert!(e.to_string().contains("not missing"), "{e}");
    assert_eq!(state, ReceiverState::Aborted);
    assert!(t.stopped_after_run && !t.committed);
    assert!(t.is_present(12) && !t.is_present(10));
    assert_eq!(
        &t.memory()[3 * 4096..4 * 4096],
        &[0u8; 4096][..],
        "page 3 untouched"
    );
}

/// A cancel after the switch has no effect: stopping then would lose the guest, so the
/// migration runs to its end.
#[test]
fn a_cancel_after_the_switch_is_ignored() {
    let (_g, mut src) = guest(1024, 1, 29);
    let mut sender = Sender::new(postcopy_config(0));
    let cancel = sender.cancel_token();
    sender.on_progress(move |p| {
        if p.phase == Phase::PostCopy {
            cancel.cancel();
        }
    });
    let run = migrate_with(&mut src, None, &mut sender, Fault::None, false);
    assert_migrated(&run, &src);
    assert_published_once(&run.target);
}
