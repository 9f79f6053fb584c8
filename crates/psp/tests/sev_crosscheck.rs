//! Cross-checks against an independent SEV implementation: the virtee `sev`
//! crate (OpenSSL-based) parses and verifies our chain, builds sessions our
//! LAUNCH_START accepts, verifies our LAUNCH_MEASURE and packages secrets
//! our LAUNCH_SECRET accepts.

mod common;

use common::*;
use esvm_psp::cert::{CaCert, CertChain};
use esvm_psp::{LaunchStart, OwnerSession, PacketHeader, Policy, PspError, SevStatus};
use sev::certs::sev::{ca, sev as sevcerts, Chain, Verifiable};
use sev::firmware::host::{Build, Version};
use sev::launch::sev::{HeaderFlags, Measurement, Policy as SevPolicy, PolicyFlags};
use sev::parser::{Decoder, Encoder};
use sev::session::Session;

fn sev_chain(psp: &esvm_psp::Psp) -> Chain {
    let bytes = psp.pdh_cert_export().unwrap().to_bytes();
    Chain::decode(&mut &bytes[..], ()).expect("the sev crate decodes our chain")
}

fn encode<T: Encoder<()>>(t: &T) -> Vec<u8> {
    let mut v = Vec::new();
    t.encode(&mut v, ()).unwrap();
    v
}

fn sev_policy(p: &SevPolicy) -> Policy {
    Policy(p.flags.bits() as u32 | (p.minfw.major as u32) << 16 | (p.minfw.minor as u32) << 24)
}

#[test]
fn sev_crate_parses_and_verifies_our_chain() {
    let psp = platform();
    let chain = sev_chain(&psp);
    // Every link: ARK self, ARK->ASK, ASK->CEK, OCA self, OCA->PEK, CEK->PEK, PEK->PDH.
    (&chain.ca).verify().expect("ARK -> ASK");
    (&chain.ca.ask, &chain.sev.cek)
        .verify()
        .expect("ASK -> CEK");
    (&chain.sev.cek, &chain.sev.pek)
        .verify()
        .expect("CEK -> PEK");
    (&chain.sev.oca, &chain.sev.pek)
        .verify()
        .expect("OCA -> PEK");
    (&chain.sev.pek, &chain.sev.pdh)
        .verify()
        .expect("PEK -> PDH");
    (&chain).verify().expect("whole chain");
    // Re-encoding with the sev crate gives back our exact bytes.
    assert_eq!(encode(&chain), psp.pdh_cert_export().unwrap().to_bytes());
}

#[test]
fn sev_crate_rejects_our_chain_after_tampering() {
    let psp = platform();
    let good = psp.pdh_cert_export().unwrap().to_bytes();
    // Flip one bit inside each certificate's signed body; the sev crate must
    // refuse the chain (if it can still decode it) and so must we.
    let offsets = [
        0x30usize,
        0x824 + 0x30,
        2 * 0x824 + 0x30,
        3 * 0x824 + 0x30,
        4 * 0x824 + 0x100,
    ];
    for off in offsets {
        let mut b = good.clone();
        b[off] ^= 0x10;
        if let Ok(chain) = Chain::decode(&mut &b[..], ()) {
            assert!(
                (&chain).verify().is_err(),
                "sev crate accepted a chain flipped at 0x{off:x}"
            );
        }
        let ours = CertChain::from_bytes(&b).and_then(|c| c.verify(None));
        assert!(ours.is_err(), "we accepted a chain flipped at 0x{off:x}");
    }
}

#[test]
fn our_ca_code_verifies_amds_real_milan_and_genoa_roots() {
    // AMD's real ARK/ASK certificates (shipped in the sev crate) in AMD's CA
    // layout: our parser and RSA-PSS verification must accept them.
    for (ark, ask) in [
        (
            sev::certs::sev::builtin::milan::ARK,
            sev::certs::sev::builtin::milan::ASK,
        ),
        (
            sev::certs::sev::builtin::genoa::ARK,
            sev::certs::sev::builtin::genoa::ASK,
        ),
    ] {
        let ark = CaCert::from_bytes(ark).expect("parse AMD ARK");
        let ask = CaCert::from_bytes(ask).expect("parse AMD ASK");
        assert_eq!(ark.bits(), 4096);
        ark.verify_signed_by(&ark).expect("AMD ARK self-signature");
        ask.verify_signed_by(&ark).expect("AMD ASK signed by ARK");
        // And a forged bit breaks it.
        let mut b = ask.as_bytes().to_vec();
        b[0x50] ^= 1;
        assert!(CaCert::from_bytes(&b)
            .unwrap()
            .verify_signed_by(&ark)
            .is_err());
    }
    // The sev crate's own verification of those roots agrees with ours.
    let c = ca::Chain {
        ask: ca::Certificate::decode(&mut &sev::certs::sev::builtin::milan::ASK[..], ()).unwrap(),
        ark: ca::Certificate::decode(&mut &sev::certs::sev::builtin::milan::ARK[..], ()).unwrap(),
    };
    (&c).verify().unwrap();
}

fn sev_session_launch(policy: SevPolicy, es: bool) {
    let mut psp = platform();
    let chain = sev_chain(&psp);
    let session = Session::try_from(policy).expect("session");
    let start = session
        .start(chain)
        .expect("sev crate session against our PDH");
    let owner = OwnerSession {
        dh_cert: encode(&start.cert),
        session: [
            &start.session.nonce[..],
            &start.session.wrap_tk,
            &start.session.wrap_iv,
            &start.session.wrap_mac,
            &start.session.policy_mac,
        ]
        .concat(),
    };
    let our_policy = sev_policy(&start.policy);
    let h = psp
        .launch_start(&LaunchStart {
            policy: our_policy,
            owner: Some(owner),
            share_key_with: None,
        })
        .expect("our LAUNCH_START accepts the sev crate's session");
    psp.activate(h, 1).unwrap();
    let mem = memory();
    let mut measuring = session.measure().unwrap();
    psp.launch_update_data(h, &mem, 0x1000, 3 * 4096 + 100)
        .unwrap();
    measuring
        .update_data(&mem.snapshot(0x1000, 3 * 4096 + 100).unwrap())
        .unwrap();
    if es {
        let v = vmsa_page(3);
        psp.launch_update_vmsa(h, 0, 0x8000, &v).unwrap();
        measuring.update_data(&v).unwrap();
    }
    let m = psp.launch_measure(h).unwrap();
    let status = psp.platform_status();
    let build = Build {
        version: Version {
            major: status.api_major,
            minor: status.api_minor,
        },
        build: status.build,
    };
    let verified = measuring
        .verify(
            build,
            Measurement {
                measure: m.measure,
                mnonce: m.mnonce,
            },
        )
        .expect("the sev crate verifies our LAUNCH_MEASURE");

    // A secret packaged by the sev crate is accepted and lands decrypted.
    let secret = b"the guest owner's disk key: 0123456789abcdef".to_vec();
    let pkt = verified.secret(HeaderFlags::default(), &secret).unwrap();
    let header = PacketHeader {
        flags: pkt.header.flags.bits(),
        iv: pkt.header.iv,
        mac: pkt.header.mac,
    };
    // Tampered ciphertext: refused, memory unchanged.
    let before = mem.snapshot(0x20000, secret.len()).unwrap();
    let mut bad = pkt.ciphertext.clone();
    bad[0] ^= 1;
    let e = psp
        .launch_secret(h, &mem, 0x20000, &header, &bad)
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::BadSignature);
    assert_eq!(mem.snapshot(0x20000, secret.len()).unwrap(), before);
    psp.launch_secret(h, &mem, 0x20000, &header, &pkt.ciphertext)
        .expect("our LAUNCH_SECRET accepts the sev crate's secret");
    assert_eq!(mem.snapshot(0x20000, secret.len()).unwrap(), secret);
    psp.launch_finish(h).unwrap();
}

#[test]
fn sev_crate_session_measurement_and_secret_plain_sev() {
    sev_session_launch(
        SevPolicy {
            flags: PolicyFlags::NO_DEBUG | PolicyFlags::NO_KEY_SHARING,
            minfw: Version {
                major: 0,
                minor: 17,
            },
        },
        false,
    );
}

#[test]
fn sev_crate_session_measurement_and_secret_es() {
    sev_session_launch(
        SevPolicy {
            flags: PolicyFlags::ENCRYPTED_STATE | PolicyFlags::NO_DEBUG,
            minfw: Version::default(),
        },
        true,
    );
}

#[test]
fn sev_crate_session_for_another_policy_is_refused() {
    let mut psp = platform();
    let session = Session::try_from(SevPolicy::default()).unwrap();
    let start = session.start(sev_chain(&psp)).unwrap();
    let owner = OwnerSession {
        dh_cert: encode(&start.cert),
        session: [
            &start.session.nonce[..],
            &start.session.wrap_tk,
            &start.session.wrap_iv,
            &start.session.wrap_mac,
            &start.session.policy_mac,
        ]
        .concat(),
    };
    // The host tries to weaken nothing but change the policy: PolicyMAC fails.
    let e: PspError = psp
        .launch_start(&LaunchStart {
            policy: Policy(Policy::NOSEND),
            owner: Some(owner),
            share_key_with: None,
        })
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::BadSignature);
    assert_eq!(psp.platform_status().guest_count, 0);
}

#[test]
fn sev_crate_reads_our_exported_pdh_and_pek_separately() {
    let psp = platform();
    let chain = psp.pdh_cert_export().unwrap();
    let pdh = sevcerts::Certificate::decode(&mut &chain.pdh.as_bytes()[..], ()).unwrap();
    let pek = sevcerts::Certificate::decode(&mut &chain.pek.as_bytes()[..], ()).unwrap();
    (&pek, &pdh).verify().unwrap();
}

#[test]
fn sev_crate_verifies_a_chain_under_a_4096_bit_emulated_ark() {
    // `esvm platform init` uses RSA-4096 (AMD's Rome+ layout, RSA-PSS with
    // SHA-384) by default; make sure the sev crate accepts that layout too.
    let ca = esvm_psp::EmulatedAmdCa::generate(4096).unwrap();
    let mut psp = esvm_psp::Psp::ephemeral(&ca, Default::default()).unwrap();
    psp.init().unwrap();
    let bytes = psp.pdh_cert_export().unwrap().to_bytes();
    assert_eq!(bytes.len(), 4 * 0x824 + 2 * 1600);
    let chain = Chain::decode(&mut &bytes[..], ()).unwrap();
    (&chain)
        .verify()
        .expect("sev crate verifies the RSA-4096 chain");
    CertChain::from_bytes(&bytes)
        .unwrap()
        .verify(Some(ca.ark()))
        .unwrap();
}
