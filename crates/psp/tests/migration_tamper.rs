//! Cross-platform migration (SEND_* / RECEIVE_*) including VMSAs and the
//! tracked extension, and tamper tests: flipping any bit of a session blob,
//! a certificate, a packet header, ciphertext or MAC makes the command fail
//! with guest memory unchanged.

mod common;

use common::*;
use esvm_psp::cert::SEV_CERT_LEN;
use esvm_psp::session::{package_secret, SessionError};
use esvm_psp::{
    FlatMemory, GuestMemoryAccess, GuestState, LaunchStart, OwnerSession, PacketHeader, Policy,
    Psp, SevStatus, TrackedExtension, TrackedRegisters,
};

const PAGES: u64 = 8;

/// vCPU, VMSA GPA, plaintext VMSA, host (encrypted) copy.
type VmsaRecord = (u32, u64, [u8; 4096], Box<[u8; 4096]>);

struct Migration {
    src: Psp,
    dst: Psp,
    hs: u32,
    hd: u32,
    src_mem: FlatMemory,
    dst_mem: FlatMemory,
    vmsas: Vec<VmsaRecord>,
}

/// An ES guest with 2 vCPUs launched on `src`, SEND_START to `dst`,
/// RECEIVE_START and ACTIVATE on `dst`.
fn start_migration(policy: u32) -> Migration {
    let mut src = platform();
    let mut dst = platform();
    let src_mem = memory();
    let dst_mem = FlatMemory::new(1 << 20);
    let owner = owner_session(&src, Policy(policy));
    let hs = launch(&mut src, &owner, 1);
    src.launch_update_data(hs, &src_mem, 0, (PAGES * 4096) as usize)
        .unwrap();
    let mut vmsas = Vec::new();
    let n_vmsa = if policy & Policy::ES != 0 { 2u32 } else { 0 };
    for vcpu in 0..n_vmsa {
        let gpa = 0x80000 + vcpu as u64 * 0x1000;
        let plain = vmsa_page(vcpu as u8 + 4);
        let enc = src.launch_update_vmsa(hs, vcpu, gpa, &plain).unwrap();
        assert_ne!(
            &enc[..],
            &plain[..],
            "the host copy of a VMSA is ciphertext"
        );
        vmsas.push((vcpu, gpa, plain, enc));
    }
    src.launch_measure(hs).unwrap();
    src.launch_finish(hs).unwrap();
    let out = src
        .send_start(hs, &dst.pdh_cert_export().unwrap().to_bytes())
        .unwrap();
    let hd = dst
        .receive_start(out.policy, out.pdh.as_bytes(), &out.session.to_bytes())
        .unwrap();
    dst.activate(hd, 3).unwrap();
    Migration {
        src,
        dst,
        hs,
        hd,
        src_mem,
        dst_mem,
        vmsas,
    }
}

fn ext(vcpu: u32) -> TrackedExtension {
    TrackedExtension {
        ap_flags: if vcpu == 0 {
            0
        } else {
            TrackedExtension::AP_RESET_HOLD
        },
        apic_base: 0xfee0_0800 | if vcpu == 0 { 0x100 } else { 0 },
        ghcb_gpa: 0x7000 + vcpu as u64 * 0x1000,
    }
}

#[test]
fn full_migration_of_an_es_guest() {
    let mut m = start_migration(Policy::ES);
    for p in 0..PAGES {
        let (hdr, ct) = m
            .src
            .send_update_data(m.hs, &m.src_mem, p * 4096, 4096)
            .unwrap();
        assert_ne!(ct, m.src_mem.snapshot(p * 4096, 4096).unwrap());
        m.dst
            .receive_update_data(m.hd, &m.dst_mem, p * 4096, &hdr, &ct)
            .unwrap();
    }
    assert_eq!(
        m.dst_mem.snapshot(0, (PAGES * 4096) as usize),
        m.src_mem.snapshot(0, (PAGES * 4096) as usize)
    );
    for (vcpu, gpa, plain, enc) in &m.vmsas {
        let (hdr, ct) = m
            .src
            .send_update_vmsa(m.hs, *vcpu, *gpa, enc, &ext(*vcpu))
            .unwrap();
        let r = m
            .dst
            .receive_update_vmsa(m.hd, *vcpu, *gpa, &hdr, &ct)
            .unwrap();
        // Re-encrypted under the destination's own key.
        assert_ne!(&r.encrypted_vmsa[..], &enc[..]);
        assert_eq!(
            &m.dst.vmsa_plaintext(m.hd, *gpa, &r.encrypted_vmsa).unwrap()[..],
            &plain[..]
        );
        assert_eq!(r.extension, ext(*vcpu));
        assert_eq!(
            r.tracked,
            TrackedRegisters::from_vmsa(plain, ext(*vcpu).apic_base)
        );
        assert_eq!(r.tracked.cr0, 0x8005_0033 | (*vcpu as u64 + 4));
        assert_eq!(r.tracked.cr8, (*vcpu as u64 + 4) & 0xF);
    }
    let tag = m.src.send_finish(m.hs).unwrap();
    m.dst.receive_finish(m.hd, &tag).unwrap();
    assert_eq!(m.src.guest_status(m.hs).unwrap().state, GuestState::Sent);
    assert_eq!(m.dst.guest_status(m.hd).unwrap().state, GuestState::Running);
    assert_eq!(m.dst.vmsa_gpas(m.hd).unwrap().len(), 2);
    // The source can no longer make packets.
    assert_eq!(
        m.src
            .send_update_data(m.hs, &m.src_mem, 0, 4096)
            .unwrap_err()
            .status(),
        SevStatus::InvalidGuestState
    );
}

#[test]
fn parallel_workers_produce_a_consistent_stream() {
    let mut m = start_migration(Policy::ES);
    let sw = m.src.send_worker(m.hs).unwrap();
    let rw = m.dst.receive_worker(m.hd).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (sw, rw, sm, dm) = (sw.clone(), rw.clone(), &m.src_mem, &m.dst_mem);
            s.spawn(move || {
                let mut buf = vec![0u8; 4096];
                for p in (t..64).step_by(2) {
                    let h = sw.send_update_data_into(sm, p * 4096, &mut buf).unwrap();
                    rw.receive_update_data(dm, p * 4096, &h, &buf).unwrap();
                }
            });
        }
    });
    assert_eq!(
        m.dst_mem.snapshot(0, 64 * 4096),
        m.src_mem.snapshot(0, 64 * 4096)
    );
    for (vcpu, gpa, _, enc) in &m.vmsas {
        let (h, ct) = sw.send_update_vmsa(*vcpu, *gpa, enc, &ext(*vcpu)).unwrap();
        rw.receive_update_vmsa(*vcpu, *gpa, &h, &ct).unwrap();
    }
    let tag = m.src.send_finish(m.hs).unwrap();
    m.dst.receive_finish(m.hd, &tag).unwrap();
}

#[test]
fn every_bit_of_a_data_packet_is_protected() {
    let m = start_migration(Policy::ES);
    let (hdr, ct) = m
        .src
        .send_update_data(m.hs, &m.src_mem, 0x2000, 4096)
        .unwrap();
    let before = m.dst_mem.snapshot(0x2000, 4096).unwrap();
    let refuse = |h: &PacketHeader, c: &[u8]| {
        let e = m
            .dst
            .receive_update_data(m.hd, &m.dst_mem, 0x2000, h, c)
            .unwrap_err();
        assert!(
            matches!(
                e.status(),
                SevStatus::BadSignature | SevStatus::Unsupported | SevStatus::InvalidParam
            ),
            "{e}"
        );
    };
    // Header: flags, IV and MAC, every bit.
    for bit in 0..52 * 8 {
        let mut b = hdr.to_bytes();
        b[bit / 8] ^= 1 << (bit % 8);
        refuse(&PacketHeader::from_bytes(&b).unwrap(), &ct);
    }
    // Ciphertext, every bit.
    let mut c = ct.clone();
    for bit in 0..ct.len() * 8 {
        c[bit / 8] ^= 1 << (bit % 8);
        refuse(&hdr, &c);
        c[bit / 8] ^= 1 << (bit % 8);
    }
    // Truncated or extended ciphertext.
    refuse(&hdr, &ct[..4095]);
    refuse(&hdr, &[&ct[..], &[0]].concat());
    assert_eq!(m.dst_mem.snapshot(0x2000, 4096).unwrap(), before);
    // Replayed at another address.
    assert_eq!(
        m.dst
            .receive_update_data(m.hd, &m.dst_mem, 0x3000, &hdr, &ct)
            .unwrap_err()
            .status(),
        SevStatus::BadSignature
    );
    // The genuine packet is accepted once; a replay is refused.
    m.dst
        .receive_update_data(m.hd, &m.dst_mem, 0x2000, &hdr, &ct)
        .unwrap();
    assert_eq!(
        m.dst
            .receive_update_data(m.hd, &m.dst_mem, 0x2000, &hdr, &ct)
            .unwrap_err()
            .status(),
        SevStatus::SecureDataInvalid
    );
}

#[test]
fn every_bit_of_a_vmsa_packet_is_protected() {
    let m = start_migration(Policy::ES);
    let (vcpu, gpa, _, enc) = &m.vmsas[1];
    let (hdr, ct) = m
        .src
        .send_update_vmsa(m.hs, *vcpu, *gpa, enc, &ext(*vcpu))
        .unwrap();
    for bit in (0..52 * 8).chain((0..ct.len() * 8).step_by(5).map(|b| b + 52 * 8)) {
        let mut h = hdr.to_bytes();
        let mut c = ct.clone();
        if bit < 52 * 8 {
            h[bit / 8] ^= 1 << (bit % 8);
        } else {
            let b = bit - 52 * 8;
            c[b / 8] ^= 1 << (b % 8);
        }
        let r = m.dst.receive_update_vmsa(
            m.hd,
            *vcpu,
            *gpa,
            &PacketHeader::from_bytes(&h).unwrap(),
            &c,
        );
        assert!(r.is_err(), "flip of bit {bit} accepted");
    }
    // Bound to its vCPU and GPA.
    let e = m
        .dst
        .receive_update_vmsa(m.hd, 0, *gpa, &hdr, &ct)
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::BadSignature);
    let e = m
        .dst
        .receive_update_vmsa(m.hd, *vcpu, gpa + 0x1000, &hdr, &ct)
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::BadSignature);
    assert!(m.dst.vmsa_gpas(m.hd).unwrap().is_empty());
    m.dst
        .receive_update_vmsa(m.hd, *vcpu, *gpa, &hdr, &ct)
        .unwrap();
}

#[test]
fn dropped_injected_or_replayed_packets_fail_receive_finish() {
    // Dropped packet.
    let mut m = start_migration(0);
    let (h1, c1) = m.src.send_update_data(m.hs, &m.src_mem, 0, 4096).unwrap();
    let _dropped = m
        .src
        .send_update_data(m.hs, &m.src_mem, 4096, 4096)
        .unwrap();
    m.dst
        .receive_update_data(m.hd, &m.dst_mem, 0, &h1, &c1)
        .unwrap();
    let tag = m.src.send_finish(m.hs).unwrap();
    let e = m.dst.receive_finish(m.hd, &tag).unwrap_err();
    assert_eq!(e.status(), SevStatus::BadMeasurement);
    assert_eq!(m.dst.guest_status(m.hd).unwrap().state, GuestState::Rupdate);
    // A forged tag fails too.
    let mut m = start_migration(0);
    let (h1, c1) = m.src.send_update_data(m.hs, &m.src_mem, 0, 4096).unwrap();
    m.dst
        .receive_update_data(m.hd, &m.dst_mem, 0, &h1, &c1)
        .unwrap();
    let mut tag = m.src.send_finish(m.hs).unwrap();
    tag[0] ^= 1;
    assert_eq!(
        m.dst.receive_finish(m.hd, &tag).unwrap_err().status(),
        SevStatus::BadMeasurement
    );
    tag[0] ^= 1;
    m.dst.receive_finish(m.hd, &tag).unwrap();
    // A packet from another migration session is refused.
    let m1 = start_migration(0);
    let m2 = start_migration(0);
    let (h, c) = m1
        .src
        .send_update_data(m1.hs, &m1.src_mem, 0, 4096)
        .unwrap();
    assert_eq!(
        m2.dst
            .receive_update_data(m2.hd, &m2.dst_mem, 0, &h, &c)
            .unwrap_err()
            .status(),
        SevStatus::BadSignature
    );
}

#[test]
fn every_bit_of_a_session_blob_and_dh_key_fields_is_protected() {
    let mut psp = platform();
    let owner = owner_session(&psp, Policy(Policy::NODBG));
    let try_start = |psp: &mut Psp, s: &OwnerSession| {
        psp.launch_start(&LaunchStart {
            policy: Policy(Policy::NODBG),
            owner: Some(s.clone()),
            share_key_with: None,
        })
    };
    for bit in 0..128 * 8 {
        let mut s = owner.session.clone();
        s.session[bit / 8] ^= 1 << (bit % 8);
        let e = try_start(&mut psp, &s).unwrap_err();
        assert_eq!(e.status(), SevStatus::BadSignature, "bit {bit}: {e}");
    }
    // The firmware error keeps the session layer's reason as its source: a flipped nonce
    // derives other wrapping keys, so the wrapped transport keys fail their MAC.
    let mut s = owner.session.clone();
    s.session[0] ^= 1;
    let e = try_start(&mut psp, &s).unwrap_err();
    let why = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<SessionError>());
    assert_eq!(why, Some(&SessionError::WrapMac), "{e}");
    // The interpreted fields of the owner's DH certificate: version, usage,
    // algorithm, curve and the public key coordinates (0x00..0xA4).
    for bit in 0..0xA4 * 8 {
        if (0x04 * 8..0x08 * 8).contains(&bit) {
            continue; // api version and reserved: not interpreted in a DH key
        }
        let mut s = owner.session.clone();
        s.dh_cert[bit / 8] ^= 1 << (bit % 8);
        let e = try_start(&mut psp, &s).unwrap_err();
        assert!(
            matches!(
                e.status(),
                SevStatus::BadSignature | SevStatus::InvalidCertificate
            ),
            "bit {bit}: {e}"
        );
    }
    assert_eq!(psp.platform_status().guest_count, 0);
    try_start(&mut psp, &owner.session).unwrap();
}

#[test]
fn bits_of_the_target_chain_are_protected() {
    let mut psp = platform();
    let target = platform().pdh_cert_export().unwrap().to_bytes();
    let owner = owner_session(&psp, Policy(Policy::SEV));
    let h = launch(&mut psp, &owner, 1);
    psp.launch_measure(h).unwrap();
    psp.launch_finish(h).unwrap();
    // A strided sample over every certificate (every byte position class and
    // every bit position), each flip must make SEND_START fail.
    let mut n = 0;
    let mut bit = 3usize;
    while bit < target.len() * 8 {
        let byte = bit / 8;
        let in_sev_cert = byte < 4 * SEV_CERT_LEN;
        // Skip unused signature slots of the SEV certs (not signed, not read).
        let off = byte % SEV_CERT_LEN;
        let unused_slot = in_sev_cert && off >= 0x61C && ((byte / SEV_CERT_LEN) != 1);
        if !unused_slot {
            let mut b = target.clone();
            b[byte] ^= 1 << (bit % 8);
            assert!(
                psp.send_start(h, &b).is_err(),
                "flip at byte 0x{byte:x} accepted"
            );
            n += 1;
        }
        bit += 397;
    }
    assert!(n > 150, "{n} flips tested");
    assert_eq!(psp.guest_status(h).unwrap().state, GuestState::Running);
    psp.send_start(h, &target).unwrap();
}

#[test]
fn every_bit_of_a_secret_packet_is_protected() {
    let mut psp = platform();
    let mem = memory();
    let owner = owner_session(&psp, Policy(0));
    let h = launch(&mut psp, &owner, 1);
    psp.launch_update_data(h, &mem, 0, 4096).unwrap();
    let m = psp.launch_measure(h).unwrap();
    let (hdr, ct) = package_secret(&owner.keys, &m.measure, &[0x5a; 64]);
    let before = mem.snapshot(0x9000, 64).unwrap();
    for bit in 0..(52 + 64) * 8 {
        let mut hb = hdr.to_bytes();
        let mut c = ct.clone();
        if bit < 52 * 8 {
            hb[bit / 8] ^= 1 << (bit % 8);
        } else {
            let b = bit - 52 * 8;
            c[b / 8] ^= 1 << (b % 8);
        }
        assert!(psp
            .launch_secret(h, &mem, 0x9000, &PacketHeader::from_bytes(&hb).unwrap(), &c)
            .is_err());
    }
    assert_eq!(mem.snapshot(0x9000, 64).unwrap(), before);
    // A secret bound to another measurement is refused.
    let (h2, c2) = package_secret(&owner.keys, &[0u8; 32], &[1; 8]);
    assert_eq!(
        psp.launch_secret(h, &mem, 0x9000, &h2, &c2)
            .unwrap_err()
            .status(),
        SevStatus::BadSignature
    );
    psp.launch_secret(h, &mem, 0x9000, &hdr, &ct).unwrap();
    assert_eq!(mem.snapshot(0x9000, 64).unwrap(), vec![0x5a; 64]);
}

#[test]
fn host_view_is_ciphertext_and_launch_digest_matches() {
    use sha2::{Digest, Sha256};
    let mut psp = platform();
    let mem = memory();
    let owner = owner_session(&psp, Policy(Policy::ES));
    let h = launch(&mut psp, &owner, 1);
    psp.launch_update_data(h, &mem, 0x4000, 10000).unwrap();
    let v = vmsa_page(9);
    psp.launch_update_vmsa(h, 0, 0x70000, &v).unwrap();
    psp.launch_measure(h).unwrap();
    let mut d = Sha256::new();
    d.update(mem.snapshot(0x4000, 10000).unwrap());
    d.update(v);
    assert_eq!(
        psp.launch_digest(h).unwrap().unwrap(),
        <[u8; 32]>::from(d.finalize())
    );
    let mut page = [0u8; 4096];
    mem.read(0x4000, &mut page).unwrap();
    let view = psp.host_view(h).unwrap();
    let c = view.encrypt_page(0x4000, &page);
    assert_eq!(c, psp.host_view_page(h, 0x4000, &page).unwrap());
    assert_ne!(c, page);
}

/// The transcript tag taken before SEND_FINISH is what SEND_FINISH returns for the same
/// packets, so a target can finish while the source still may cancel; after SEND_CANCEL the
/// source guest runs on and a new session starts afresh.
#[test]
fn transcript_tag_before_finish_equals_the_finish_tag() {
    let mut m = start_migration(Policy::ES);
    let (h1, c1) = m.src.send_update_data(m.hs, &m.src_mem, 0, 4096).unwrap();
    m.dst
        .receive_update_data(m.hd, &m.dst_mem, 0, &h1, &c1)
        .unwrap();
    let early = m.src.send_transcript_tag(m.hs).unwrap();
    for (vcpu, gpa, _, enc) in &m.vmsas {
        let (h, ct) = m
            .src
            .send_update_vmsa(m.hs, *vcpu, *gpa, enc, &ext(*vcpu))
            .unwrap();
        m.dst
            .receive_update_vmsa(m.hd, *vcpu, *gpa, &h, &ct)
            .unwrap();
    }
    let tag = m.src.send_transcript_tag(m.hs).unwrap();
    assert_ne!(early, tag, "every packet changes the tag");
    assert_eq!(
        m.src.guest_status(m.hs).unwrap().state,
        GuestState::Supdate,
        "taking the tag leaves the session open"
    );
    // A tag over fewer packets than the target received is refused.
    assert_eq!(
        m.dst.receive_finish(m.hd, &early).unwrap_err().status(),
        SevStatus::BadMeasurement
    );
    m.dst.receive_finish(m.hd, &tag).unwrap();
    assert_eq!(m.src.send_finish(m.hs).unwrap(), tag);
    // In any other state there is no transcript.
    assert!(m.src.send_transcript_tag(m.hs).is_err());
    let mut m = start_migration(Policy::ES);
    m.src.send_cancel(m.hs).unwrap();
    assert_eq!(m.src.guest_status(m.hs).unwrap().state, GuestState::Running);
    assert!(m.src.send_transcript_tag(m.hs).is_err());
}

/// A change to bytes of the session start that no MAC covers (an unused signature slot of
/// the source's PDH certificate) still fails RECEIVE_FINISH: both sides fold the session
/// start into the transcript tag.
#[test]
fn unauthenticated_bytes_of_the_session_start_fail_receive_finish() {
    let mut src = platform();
    let mut dst = platform();
    let src_mem = memory();
    let owner = owner_session(&src, Policy(0));
    let hs = launch(&mut src, &owner, 1);
    src.launch_update_data(hs, &src_mem, 0, 4096).unwrap();
    src.launch_measure(hs).unwrap();
    src.launch_finish(hs).unwrap();
    let out = src
        .send_start(hs, &dst.pdh_cert_export().unwrap().to_bytes())
        .unwrap();
    let mut pdh = out.pdh.as_bytes().to_vec();
    pdh[0x700] ^= 0x5a; // inside the unused second signature slot
    let hd = dst
        .receive_start(out.policy, &pdh, &out.session.to_bytes())
        .expect("the key and the session MAC are unchanged");
    dst.activate(hd, 3).unwrap();
    let dst_mem = FlatMemory::new(1 << 20);
    let (h, c) = src.send_update_data(hs, &src_mem, 0, 4096).unwrap();
    dst.receive_update_data(hd, &dst_mem, 0, &h, &c).unwrap();
    let tag = src.send_transcript_tag(hs).unwrap();
    assert_eq!(
        dst.receive_finish(hd, &tag).unwrap_err().status(),
        SevStatus::BadMeasurement
    );
}
