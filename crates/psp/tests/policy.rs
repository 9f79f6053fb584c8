//! Policy tests: one or more per policy bit.

mod common;

use common::*;
use esvm_psp::cert::{Algo, SevCert, Usage};
use esvm_psp::{EmulatedAmdCa, FirmwareVersion, LaunchStart, Policy, Psp, PspResult, SevStatus};
use p384::ecdsa::SigningKey;
use p384::SecretKey;
use rand::rngs::OsRng;

fn running_guest(psp: &mut Psp, policy: u32) -> u32 {
    let owner = owner_session(psp, Policy(policy));
    let asid = psp.guest_handles().len() as u32 + 1;
    let h = launch(psp, &owner, asid);
    if policy & Policy::ES != 0 {
        psp.launch_update_vmsa(h, 0, 0x5000, &vmsa_page(0)).unwrap();
    }
    psp.launch_measure(h).unwrap();
    psp.launch_finish(h).unwrap();
    h
}

fn status<T>(r: PspResult<T>) -> SevStatus {
    match r {
        Ok(_) => SevStatus::Success,
        Err(e) => e.status(),
    }
}

fn version(minor: u8) -> FirmwareVersion {
    FirmwareVersion {
        api_major: 0,
        api_minor: minor,
        build: 3,
    }
}

#[test]
fn nodbg_blocks_debug_commands() {
    let mut psp = platform();
    let mem = memory();
    let h = running_guest(&mut psp, Policy::NODBG);
    let e = psp.dbg_decrypt(h, &mem, 0, 16).unwrap_err();
    assert_eq!(e.status(), SevStatus::PolicyFailure);
    assert!(e.to_string().contains("NODBG"));
    let before = mem.snapshot(0, 3).unwrap();
    assert_eq!(
        status(psp.dbg_encrypt(h, &mem, 0, &[9, 9, 9])),
        SevStatus::PolicyFailure
    );
    assert_eq!(mem.snapshot(0, 3).unwrap(), before);
    // Without NODBG both work and see the plaintext.
    let h2 = running_guest(&mut psp, 0);
    psp.dbg_encrypt(h2, &mem, 0x100, &[7, 8, 9]).unwrap();
    assert_eq!(psp.dbg_decrypt(h2, &mem, 0x100, 3).unwrap(), vec![7, 8, 9]);
}

#[test]
fn noks_blocks_key_sharing() {
    let mut psp = platform();
    let start = |psp: &mut Psp, p: u32, share: Option<u32>| {
        psp.launch_start(&LaunchStart {
            policy: Policy(p),
            owner: None,
            share_key_with: share,
        })
    };
    let noks = start(&mut psp, Policy::NOKS, None).unwrap();
    let open = start(&mut psp, 0, None).unwrap();
    assert_eq!(
        status(start(&mut psp, 0, Some(noks))),
        SevStatus::PolicyFailure
    );
    assert_eq!(
        status(start(&mut psp, Policy::NOKS, Some(open))),
        SevStatus::PolicyFailure
    );
    let shared = start(&mut psp, 0, Some(open)).unwrap();
    // Shared key: identical host view of the same page.
    let page = [5u8; 4096];
    assert_eq!(
        psp.host_view_page(open, 0x1000, &page).unwrap(),
        psp.host_view_page(shared, 0x1000, &page).unwrap()
    );
    assert_ne!(
        psp.host_view_page(open, 0x1000, &page).unwrap(),
        psp.host_view_page(noks, 0x1000, &page).unwrap()
    );
}

#[test]
fn es_requires_vmsa_before_measure_and_es_capable_platforms() {
    let mut psp = platform();
    // Without ES, LAUNCH_UPDATE_VMSA is refused.
    let owner = owner_session(&psp, Policy(0));
    let h = launch(&mut psp, &owner, 1);
    assert_eq!(
        status(psp.launch_update_vmsa(h, 0, 0x5000, &vmsa_page(0))),
        SevStatus::PolicyFailure
    );
    // With ES, LAUNCH_MEASURE needs a VMSA first.
    let owner = owner_session(&psp, Policy(Policy::ES));
    let h = launch(&mut psp, &owner, 2);
    let e = psp.launch_measure(h).unwrap_err();
    assert_eq!(e.status(), SevStatus::PolicyFailure);
    assert!(e.to_string().contains("LAUNCH_UPDATE_VMSA"));
    psp.launch_update_vmsa(h, 0, 0x5000, &vmsa_page(0)).unwrap();
    psp.launch_measure(h).unwrap();
    psp.launch_finish(h).unwrap();
    // A non-ES-capable target (API 0.16) is refused; an ES-capable one accepted.
    let old = platform_with(version(16));
    let chain_old = old.pdh_cert_export().unwrap().to_bytes();
    assert_eq!(
        status(psp.send_start(h, &chain_old)),
        SevStatus::PolicyFailure
    );
    let new = platform();
    psp.send_start(h, &new.pdh_cert_export().unwrap().to_bytes())
        .unwrap();
    // An ES guest cannot even start on a non-ES-capable platform.
    let mut old = old;
    let owner = owner_session(&old, Policy(Policy::ES));
    let r = old.launch_start(&LaunchStart {
        policy: owner.policy,
        owner: Some(owner.session),
        share_key_with: None,
    });
    assert_eq!(status(r), SevStatus::PolicyFailure);
}

#[test]
fn nosend_blocks_send_start() {
    let mut psp = platform();
    let target = platform().pdh_cert_export().unwrap().to_bytes();
    let h = running_guest(&mut psp, Policy::NOSEND);
    let e = psp.send_start(h, &target).unwrap_err();
    assert_eq!(e.status(), SevStatus::PolicyFailure);
    assert!(e.to_string().contains("NOSEND"));
    assert_eq!(
        psp.guest_status(h).unwrap().state,
        esvm_psp::GuestState::Running
    );
    let h2 = running_guest(&mut psp, 0);
    psp.send_start(h2, &target).unwrap();
}

/// An owner CA key and certificate, and PEK_CERT_IMPORT into `psp`.
fn take_ownership(psp: &mut Psp, oca_key: &SecretKey) {
    let mut oca = SevCert::new(
        Usage::OCA,
        Algo::ECDSA_SHA256,
        (0, 24),
        &oca_key.public_key(),
    );
    oca.sign_ecdsa(Usage::OCA, &SigningKey::from(oca_key))
        .unwrap();
    let mut csr = psp.pek_csr().unwrap();
    csr.sign_ecdsa(Usage::OCA, &SigningKey::from(oca_key))
        .unwrap();
    psp.pek_cert_import(csr.as_bytes(), oca.as_bytes()).unwrap();
}

#[test]
fn domain_requires_the_same_owner() {
    let mut src = platform();
    let mut dst = platform();
    let h = running_guest(&mut src, Policy::DOMAIN);
    // Different (self-owned) OCAs: refused.
    let e = src
        .send_start(h, &dst.pdh_cert_export().unwrap().to_bytes())
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::PolicyFailure);
    assert!(e.to_string().contains("DOMAIN"));
    // A bare PDH cannot prove the owner: refused.
    let pdh = dst.pdh_cert_export().unwrap().pdh;
    assert_eq!(
        status(src.send_start(h, pdh.as_bytes())),
        SevStatus::PolicyFailure
    );
    // Both platforms owned by the same OCA: accepted. (Ownership changes need
    // the INIT state, so re-launch after importing.)
    let owner_ca = SecretKey::random(&mut OsRng);
    src.deactivate(h).unwrap();
    src.decommission(h).unwrap();
    take_ownership(&mut src, &owner_ca);
    take_ownership(&mut dst, &owner_ca);
    assert!(src.platform_status().owned_externally);
    let chain = dst.pdh_cert_export().unwrap();
    chain.verify(Some(ca().ark())).unwrap();
    let h = running_guest(&mut src, Policy::DOMAIN);
    src.send_start(h, &chain.to_bytes()).unwrap();
}

#[test]
fn pek_cert_import_checks() {
    let mut p = platform();
    let owner_ca = SecretKey::random(&mut OsRng);
    let mut oca = SevCert::new(
        Usage::OCA,
        Algo::ECDSA_SHA256,
        (0, 24),
        &owner_ca.public_key(),
    );
    oca.sign_ecdsa(Usage::OCA, &SigningKey::from(&owner_ca))
        .unwrap();
    // PEK signed by another key: bad signature.
    let other = SecretKey::random(&mut OsRng);
    let mut csr = p.pek_csr().unwrap();
    csr.sign_ecdsa(Usage::OCA, &SigningKey::from(&other))
        .unwrap();
    assert_eq!(
        status(p.pek_cert_import(csr.as_bytes(), oca.as_bytes())),
        SevStatus::BadSignature
    );
    // Not our PEK: invalid certificate.
    let mut foreign = SevCert::new(Usage::PEK, Algo::ECDSA_SHA256, (0, 24), &other.public_key());
    foreign
        .sign_ecdsa(Usage::OCA, &SigningKey::from(&owner_ca))
        .unwrap();
    assert_eq!(
        status(p.pek_cert_import(foreign.as_bytes(), oca.as_bytes())),
        SevStatus::InvalidCertificate
    );
    take_ownership(&mut p, &owner_ca);
    assert_eq!(
        status(p.pek_cert_import(csr.as_bytes(), oca.as_bytes())),
        SevStatus::AlreadyOwned
    );
    // PEK_GEN returns the platform to self-owned.
    p.pek_gen().unwrap();
    assert!(!p.platform_status().owned_externally);
}

#[test]
fn sev_bit_requires_an_authenticated_target() {
    let mut src = platform();
    let dst = platform();
    let chain = dst.pdh_cert_export().unwrap();
    let h = running_guest(&mut src, Policy::SEV);
    assert_eq!(
        status(src.send_start(h, chain.pdh.as_bytes())),
        SevStatus::PolicyFailure
    );
    // A chain rooted in another (emulated) ARK is not trusted.
    let other_ca = EmulatedAmdCa::generate(2048).unwrap();
    let mut foreign = Psp::ephemeral(&other_ca, FirmwareVersion::default()).unwrap();
    foreign.init().unwrap();
    let e = src
        .send_start(h, &foreign.pdh_cert_export().unwrap().to_bytes())
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::BadSignature);
    src.send_start(h, &chain.to_bytes()).unwrap();
    // Without the SEV bit a bare PDH is enough.
    let mut src2 = platform();
    let h2 = running_guest(&mut src2, 0);
    src2.send_start(h2, chain.pdh.as_bytes()).unwrap();
}

#[test]
fn minimum_api_version() {
    let mut p = platform(); // API 0.24
    let start = |p: &mut Psp, pol: u32| {
        p.launch_start(&LaunchStart {
            policy: Policy(pol),
            owner: None,
            share_key_with: None,
        })
    };
    let api = |maj: u32, min: u32| (maj << 16) | (min << 24);
    assert_eq!(status(start(&mut p, api(0, 25))), SevStatus::PolicyFailure);
    assert_eq!(status(start(&mut p, api(1, 0))), SevStatus::PolicyFailure);
    start(&mut p, api(0, 24)).unwrap();
    // Send: the target's API (from its CEK-signed PEK) must be new enough.
    let h = running_guest(&mut p, api(0, 22));
    let t20 = platform_with(version(20)).pdh_cert_export().unwrap();
    let t23 = platform_with(version(23)).pdh_cert_export().unwrap();
    assert_eq!(
        status(p.send_start(h, &t20.to_bytes())),
        SevStatus::PolicyFailure
    );
    assert_eq!(
        status(p.send_start(h, t23.pdh.as_bytes())),
        SevStatus::PolicyFailure
    );
    p.send_start(h, &t23.to_bytes()).unwrap();
    // Reserved bits.
    assert_eq!(status(start(&mut p, 1 << 9)), SevStatus::PolicyFailure);
}
