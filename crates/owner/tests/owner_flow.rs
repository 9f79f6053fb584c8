//! The guest owner's flow against the esvm firmware model.

use std::sync::OnceLock;

use esvm_owner::*;
use esvm_psp::{
    EmulatedAmdCa, FirmwareVersion, FlatMemory, GuestMemoryAccess, LaunchStart, Measurement,
    Policy, Psp, SevStatus,
};

fn ca() -> &'static EmulatedAmdCa {
    static CA: OnceLock<EmulatedAmdCa> = OnceLock::new();
    CA.get_or_init(|| EmulatedAmdCa::generate(2048).unwrap())
}

fn platform() -> Psp {
    let mut p = Psp::ephemeral(ca(), FirmwareVersion::default()).unwrap();
    p.init().unwrap();
    p
}

fn vmsa() -> [u8; 4096] {
    let mut v = [0u8; 4096];
    v[0x158] = 0x33;
    v[0x178] = 0xf0;
    v
}

/// Launches `regions` + one VMSA as the host would, using only the public
/// files of the session directory.
fn host_launch(
    psp: &mut Psp,
    dir: &std::path::Path,
    mem: &FlatMemory,
    regions: &[(u64, Vec<u8>)],
) -> (u32, Measurement) {
    let (policy, owner) = launch_request(dir).unwrap();
    let h = psp
        .launch_start(&LaunchStart {
            policy,
            owner: Some(owner),
            share_key_with: None,
        })
        .unwrap();
    psp.activate(h, 1).unwrap();
    for (gpa, data) in regions {
        mem.write(*gpa, data).unwrap();
        psp.launch_update_data(h, mem, *gpa, data.len()).unwrap();
    }
    psp.launch_update_vmsa(h, 0, 0xF000, &vmsa()).unwrap();
    let m = psp.launch_measure(h).unwrap();
    (h, m)
}

#[test]
fn session_verify_secret_round_trip() {
    let mut psp = platform();
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("session");
    let chain = psp.pdh_cert_export().unwrap().to_bytes();
    let policy = Policy(Policy::ES | Policy::NODBG);
    let s = create_session(&chain, policy, Some(psp.trusted_ark())).unwrap();
    s.save(&sdir).unwrap();
    assert!(s.save(&sdir).is_err(), "refuses to overwrite");
    let mode = |n: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(sdir.join(n))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("tek.key"), 0o600);
    assert_eq!(mode("tik.key"), 0o600);

    let mem = FlatMemory::new(1 << 20);
    let regions = vec![(0x1000u64, vec![0xAB; 5000]), (0x10000, b"kernel".to_vec())];
    let (h, m) = host_launch(&mut psp, &sdir, &mem, &regions);
    let session = SessionDir::load(&sdir).unwrap();
    let expected = MeasuredLaunch {
        regions: regions.clone(),
        vmsas: vec![vmsa()],
    };
    assert_eq!(expected.digest(), psp.launch_digest(h).unwrap().unwrap());

    // Secret before verify: refused.
    assert!(matches!(
        package_secret(&session, &m, b"key"),
        Err(OwnerError::NotVerified)
    ));
    // A wrong digest does not verify.
    let mut wrong = expected.clone();
    wrong.regions[1].1[0] ^= 1;
    assert!(matches!(
        verify_measurement(&session, &m, &wrong.digest()),
        Err(OwnerError::BadMeasurement(_))
    ));
    // Nor does a measurement with the wrong platform version.
    let mut mv = m;
    mv.build.build ^= 1;
    assert!(verify_measurement(&session, &mv, &expected.digest()).is_err());
    verify_measurement(&session, &m, &expected.digest()).unwrap();

    let pkt = package_secret(&session, &m, b"disk key 42").unwrap();
    let (hdr, ct) = parse_secret_packet(&pkt).unwrap();
    psp.launch_secret(h, &mem, 0x30000, &hdr, &ct).unwrap();
    assert_eq!(mem.snapshot(0x30000, 11).unwrap(), b"disk key 42");
    psp.launch_finish(h).unwrap();
}

#[test]
fn session_for_another_platform_is_refused_by_launch_start() {
    let psp_a = platform();
    let mut psp_b = platform();
    let chain = psp_a.pdh_cert_export().unwrap().to_bytes();
    let s = create_session(&chain, Policy(0), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    s.save(dir.path()).unwrap();
    let (policy, owner) = launch_request(dir.path()).unwrap();
    let e = psp_b
        .launch_start(&LaunchStart {
            policy,
            owner: Some(owner),
            share_key_with: None,
        })
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::BadSignature);
}

#[test]
fn tampered_or_untrusted_chains_are_refused() {
    let psp = platform();
    let chain = psp.pdh_cert_export().unwrap().to_bytes();
    let mut bad = chain.clone();
    bad[0x30] ^= 1;
    assert!(matches!(
        create_session(&bad, Policy(0), None),
        Err(OwnerError::Chain(_))
    ));
    let other = EmulatedAmdCa::generate(2048).unwrap();
    assert!(create_session(&chain, Policy(0), Some(other.ark())).is_err());
}

#[test]
fn digest_helpers() {
    let d = expected_launch_digest(&[(0, b"abc")], &[]);
    assert_eq!(
        hex(&d),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(parse_digest(&hex(&d)).unwrap(), d);
    assert!(parse_digest("abc").is_err());
    assert!(parse_secret_packet(&[0u8; 52]).is_none());
}
