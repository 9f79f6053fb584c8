//! The PSP's persistent identity (NV storage).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use esvm_psp::cert::{Algo, SevCert, Usage};
use esvm_psp::{EmulatedAmdCa, FirmwareVersion, Psp, StorageError};
use p384::ecdsa::SigningKey;
use p384::SecretKey;
use rand::rngs::OsRng;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn create_open_and_refuse_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("psp");
    let p = Psp::create(&d, ca(), FirmwareVersion::default()).unwrap();
    for key in ["cek.key", "pek.key", "oca.key", "pdh.key"] {
        assert_eq!(mode(&d.join(key)), 0o600, "{key}");
    }
    assert_eq!(mode(&d), 0o700);
    let label = std::fs::read_to_string(d.join("LABEL.txt")).unwrap();
    assert!(label.contains("EMULATED") && label.contains("NOT AMD"));
    let chain = p.chain();
    chain.verify(Some(ca().ark())).unwrap();
    // Refuses to overwrite.
    let e = Psp::create(&d, ca(), FirmwareVersion::default()).unwrap_err();
    assert!(matches!(e, StorageError::AlreadyInitialized(_)), "{e}");
    assert_eq!(Psp::open(&d).unwrap().chain(), chain);
    // Opening an empty directory says how to create one.
    let e = Psp::open(&dir.path().join("nothing")).unwrap_err();
    assert!(e.to_string().contains("esvm platform init"));
}

#[test]
fn identity_changes_persist() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("psp");
    let mut p = Psp::create(&d, ca(), FirmwareVersion::default()).unwrap();
    p.init().unwrap();
    let id = p.get_id();
    p.pdh_gen().unwrap();
    let after_pdh = p.chain();
    let q = Psp::open(&d).unwrap();
    assert_eq!(q.chain(), after_pdh);
    assert_eq!(q.get_id(), id);
    // Take ownership: persists, and the self-owned OCA key is removed.
    let owner = SecretKey::random(&mut OsRng);
    let mut oca = SevCert::new(Usage::OCA, Algo::ECDSA_SHA256, (0, 24), &owner.public_key());
    oca.sign_ecdsa(Usage::OCA, &SigningKey::from(&owner))
        .unwrap();
    let mut csr = p.pek_csr().unwrap();
    csr.sign_ecdsa(Usage::OCA, &SigningKey::from(&owner))
        .unwrap();
    p.pek_cert_import(csr.as_bytes(), oca.as_bytes()).unwrap();
    assert!(!d.join("oca.key").exists());
    let q = Psp::open(&d).unwrap();
    assert!(q.platform_status().owned_externally);
    assert_eq!(q.chain().oca, oca);
    q.chain().verify(Some(ca().ark())).unwrap();
    // PEK_GEN: self-owned again.
    p.pek_gen().unwrap();
    let q = Psp::open(&d).unwrap();
    assert!(!q.platform_status().owned_externally);
    assert_eq!(mode(&d.join("oca.key")), 0o600);
}

#[test]
fn corrupt_storage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("psp");
    Psp::create(&d, ca(), FirmwareVersion::default()).unwrap();
    // A PDH key that does not match its certificate.
    std::fs::write(d.join("pdh.key"), SecretKey::random(&mut OsRng).to_bytes()).unwrap();
    let e = Psp::open(&d).unwrap_err();
    assert!(e.to_string().contains("pdh.key"), "{e}");
    std::fs::write(d.join("pek.cert"), b"short").unwrap();
    assert!(Psp::open(&d).is_err());
}

#[test]
fn emulated_ca_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("ca");
    ca().save(&d).unwrap();
    assert_eq!(mode(&d.join("ark.key")), 0o600);
    assert_eq!(mode(&d.join("ask.key")), 0o600);
    assert!(ca().save(&d).is_err(), "refuses to overwrite");
    let loaded = EmulatedAmdCa::load(&d).unwrap();
    assert_eq!(loaded.ark(), ca().ark());
    // Two platforms from the same CA trust each other's chains.
    let mut a = Psp::ephemeral(&loaded, FirmwareVersion::default()).unwrap();
    a.init().unwrap();
    a.pdh_cert_export()
        .unwrap()
        .verify(Some(platform().trusted_ark()))
        .unwrap();
}
