//! Shared helpers for the esvm-psp scenario tests.
#![allow(dead_code)]

use std::sync::OnceLock;

use esvm_psp::cert::{Algo, SevCert, Usage};
use esvm_psp::session::{shared_secret, wrap_session};
use esvm_psp::{
    EmulatedAmdCa, FirmwareVersion, FlatMemory, LaunchStart, OwnerSession, Policy, Psp,
    TransportKeys,
};
use p384::SecretKey;
use rand::rngs::OsRng;

/// One emulated CA per test binary (RSA key generation is slow).
pub fn ca() -> &'static EmulatedAmdCa {
    static CA: OnceLock<EmulatedAmdCa> = OnceLock::new();
    CA.get_or_init(|| EmulatedAmdCa::generate(2048).expect("emulated CA"))
}

/// An initialised in-memory platform.
pub fn platform() -> Psp {
    platform_with(FirmwareVersion::default())
}

/// An initialised in-memory platform with a given firmware version.
pub fn platform_with(v: FirmwareVersion) -> Psp {
    let mut p = Psp::ephemeral(ca(), v).expect("platform");
    p.init().expect("INIT");
    p
}

/// What a guest owner keeps after making a session for a platform.
pub struct Owner {
    pub keys: TransportKeys,
    pub policy: Policy,
    pub session: OwnerSession,
}

/// Makes an owner session against `psp`'s PDH with our own code.
pub fn owner_session(psp: &Psp, policy: Policy) -> Owner {
    let chain = psp.pdh_cert_export().unwrap();
    let sk = SecretKey::random(&mut OsRng);
    let cert = SevCert::new(Usage::PDH, Algo::ECDH_SHA256, (0, 24), &sk.public_key());
    let z = shared_secret(&sk, &chain.pdh.public_key().unwrap());
    let keys = TransportKeys::random();
    let blob = wrap_session(&z[..], &keys, policy);
    Owner {
        keys,
        policy,
        session: OwnerSession {
            dh_cert: cert.as_bytes().to_vec(),
            session: blob.to_bytes().to_vec(),
        },
    }
}

/// Guest RAM for tests: 1 MiB with a recognisable pattern.
pub fn memory() -> FlatMemory {
    let m = FlatMemory::new(1 << 20);
    let pattern: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    esvm_psp::GuestMemoryAccess::write(&m, 0, &pattern).unwrap();
    m
}

/// A VMSA page with recognisable control registers.
pub fn vmsa_page(seed: u8) -> [u8; 4096] {
    let mut v = [0u8; 4096];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    v[0x158..0x160].copy_from_slice(&(0x8005_0033u64 | seed as u64).to_le_bytes());
    v[0x148..0x150].copy_from_slice(&0x0000_06f0u64.to_le_bytes());
    v[0x0D0..0x0D8].copy_from_slice(&0x0000_1d01u64.to_le_bytes());
    v[0x3B8..0x3C0].copy_from_slice(&((seed as u64) & 0xF).to_le_bytes());
    v
}

/// LAUNCH_START with an owner session and ACTIVATE with `asid`.
pub fn launch(psp: &mut Psp, owner: &Owner, asid: u32) -> u32 {
    let h = psp
        .launch_start(&LaunchStart {
            policy: owner.policy,
            owner: Some(owner.session.clone()),
            share_key_with: None,
        })
        .expect("LAUNCH_START");
    psp.activate(h, asid).expect("ACTIVATE");
    h
}
