//! Every guest command in every guest state, accepted or rejected as the SEV
//! API state table says, and the platform-state gates.

mod common;

use common::*;
use esvm_psp::session::package_secret;
use esvm_psp::{
    Command, FlatMemory, GuestState, LaunchStart, PacketHeader, Policy, Psp, PspError, PspResult,
    SevStatus, TrackedExtension,
};

/// The SEV API guest-state table, written out independently of the
/// firmware's own table. Commands that take an existing guest.
fn expected(cmd: Command, state: GuestState) -> bool {
    use Command::*;
    use GuestState::*;
    let always = matches!(cmd, Activate | Deactivate | GuestStatus | Decommission);
    let dbg = matches!(cmd, DbgDecrypt | DbgEncrypt) && state != Sent;
    let table = match state {
        Lupdate => matches!(cmd, LaunchUpdateData | LaunchUpdateVmsa | LaunchMeasure),
        Lsecret => matches!(cmd, LaunchSecret | LaunchFinish),
        Running => matches!(cmd, SendStart),
        Supdate => matches!(
            cmd,
            SendUpdateData | SendUpdateVmsa | SendFinish | SendCancel
        ),
        Rupdate => matches!(cmd, ReceiveUpdateData | ReceiveUpdateVmsa | ReceiveFinish),
        Sent | Uninit => false,
    };
    always || dbg || table
}

struct World {
    psp: Psp,
    h: u32,
    mem: FlatMemory,
    owner: Owner,
    measure: Option<[u8; 32]>,
    vmsa_gpa: u64,
    enc_vmsa: Box<[u8; 4096]>,
}

const POLICY: u32 = Policy::ES;

/// A guest of an initialised platform, driven into `state`.
fn world(state: GuestState) -> World {
    let mut psp = platform();
    let mem = memory();
    let owner = owner_session(&psp, Policy(POLICY));
    let h = launch(&mut psp, &owner, 1);
    let vmsa_gpa = 0xA000;
    let enc_vmsa = psp
        .launch_update_vmsa(h, 0, vmsa_gpa, &vmsa_page(1))
        .unwrap();
    let mut w = World {
        psp,
        h,
        mem,
        owner,
        measure: None,
        vmsa_gpa,
        enc_vmsa,
    };
    if state == GuestState::Lupdate {
        return w;
    }
    w.measure = Some(w.psp.launch_measure(h).unwrap().measure);
    if state == GuestState::Lsecret {
        return w;
    }
    w.psp.launch_finish(h).unwrap();
    if state == GuestState::Running {
        return w;
    }
    let chain = w.psp.pdh_cert_export().unwrap().to_bytes();
    let out = w.psp.send_start(h, &chain).unwrap();
    match state {
        GuestState::Supdate => w,
        GuestState::Sent => {
            w.psp.send_finish(h).unwrap();
            w
        }
        GuestState::Rupdate => {
            // Receive on the same platform (the source sent to its own PDH).
            let r = w
                .psp
                .receive_start(out.policy, out.pdh.as_bytes(), &out.session.to_bytes())
                .unwrap();
            w.psp.activate(r, 2).unwrap();
            w.h = r;
            w
        }
        _ => unreachable!(),
    }
}

fn attempt(w: &mut World, cmd: Command) -> PspResult<()> {
    let h = w.h;
    let chain = w.psp.pdh_cert_export().unwrap().to_bytes();
    let ext = TrackedExtension::default();
    match cmd {
        Command::Decommission => w.psp.decommission(h),
        Command::Activate => w.psp.activate(h, 9),
        Command::Deactivate => w.psp.deactivate(h),
        Command::GuestStatus => w.psp.guest_status(h).map(|_| ()),
        Command::LaunchUpdateData => w.psp.launch_update_data(h, &w.mem, 0, 8192),
        Command::LaunchUpdateVmsa => w
            .psp
            .launch_update_vmsa(h, 1, 0xB000, &vmsa_page(2))
            .map(|_| ()),
        Command::LaunchMeasure => w.psp.launch_measure(h).map(|_| ()),
        Command::LaunchSecret => {
            let measure = w.measure.unwrap_or([0; 32]);
            let (hdr, ct) = package_secret(&w.owner.keys, &measure, b"secret");
            w.psp.launch_secret(h, &w.mem, 0x3000, &hdr, &ct)
        }
        Command::LaunchFinish => w.psp.launch_finish(h),
        Command::SendStart => w.psp.send_start(h, &chain).map(|_| ()),
        Command::SendUpdateData => w.psp.send_update_data(h, &w.mem, 0, 4096).map(|_| ()),
        Command::SendUpdateVmsa => w
            .psp
            .send_update_vmsa(h, 0, w.vmsa_gpa, &w.enc_vmsa, &ext)
            .map(|_| ()),
        Command::SendFinish => w.psp.send_finish(h).map(|_| ()),
        Command::SendCancel => w.psp.send_cancel(h),
        Command::ReceiveUpdateData => {
            w.psp
                .receive_update_data(h, &w.mem, 0, &PacketHeader::default(), &[0u8; 64])
        }
        Command::ReceiveUpdateVmsa => w
            .psp
            .receive_update_vmsa(h, 0, 0xC000, &PacketHeader::default(), &[0u8; 4128])
            .map(|_| ()),
        Command::ReceiveFinish => w.psp.receive_finish(h, &[0u8; 32]),
        Command::DbgDecrypt => w.psp.dbg_decrypt(h, &w.mem, 0, 16).map(|_| ()),
        Command::DbgEncrypt => w.psp.dbg_encrypt(h, &w.mem, 0, &[1, 2, 3]),
        other => panic!("{other} is not a guest command on an existing guest"),
    }
}

fn is_state_error(e: &PspError) -> bool {
    e.status() == SevStatus::InvalidGuestState
}

#[test]
fn every_guest_command_in_every_guest_state() {
    let states = [
        GuestState::Lupdate,
        GuestState::Lsecret,
        GuestState::Running,
        GuestState::Supdate,
        GuestState::Rupdate,
        GuestState::Sent,
    ];
    let mut checked = 0;
    for state in states {
        for cmd in Command::GUEST {
            if matches!(cmd, Command::LaunchStart | Command::ReceiveStart) {
                continue;
            }
            let mut w = world(state);
            assert_eq!(w.psp.guest_status(w.h).unwrap().state, state);
            let r = attempt(&mut w, cmd);
            let want = expected(cmd, state);
            match (&r, want) {
                (Err(e), true) if is_state_error(e) => {
                    panic!("{cmd} in {state} must be accepted but was refused: {e}")
                }
                (Ok(()), false) => panic!("{cmd} in {state} must be refused but succeeded"),
                (Err(e), false) if !is_state_error(e) => {
                    panic!("{cmd} in {state} must fail with INVALID_GUEST_STATE, got {e}")
                }
                _ => {}
            }
            if let Err(e) = &r {
                // Every refusal says what to do.
                assert!(!e.to_string().is_empty());
            }
            // The firmware's own table agrees with the reference table.
            assert_eq!(cmd.allowed_states().contains(&state), want, "{cmd} {state}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * 19);
}

#[test]
fn accepted_commands_succeed_with_valid_arguments() {
    // In their own state, these commands succeed outright.
    for (state, cmds) in [
        (
            GuestState::Lupdate,
            vec![
                Command::LaunchUpdateData,
                Command::LaunchUpdateVmsa,
                Command::LaunchMeasure,
            ],
        ),
        (
            GuestState::Lsecret,
            vec![Command::LaunchSecret, Command::LaunchFinish],
        ),
        (
            GuestState::Running,
            vec![Command::SendStart, Command::DbgDecrypt],
        ),
        (
            GuestState::Supdate,
            vec![
                Command::SendUpdateData,
                Command::SendUpdateVmsa,
                Command::SendFinish,
                Command::SendCancel,
            ],
        ),
        (
            GuestState::Sent,
            vec![Command::GuestStatus, Command::Deactivate],
        ),
    ] {
        for cmd in cmds {
            let mut w = world(state);
            attempt(&mut w, cmd).unwrap_or_else(|e| panic!("{cmd} in {state}: {e}"));
        }
    }
}

#[test]
fn state_transitions() {
    let mut w = world(GuestState::Lupdate);
    let h = w.h;
    w.psp.launch_measure(h).unwrap();
    assert_eq!(w.psp.guest_status(h).unwrap().state, GuestState::Lsecret);
    w.psp.launch_finish(h).unwrap();
    assert_eq!(w.psp.guest_status(h).unwrap().state, GuestState::Running);
    let chain = w.psp.pdh_cert_export().unwrap().to_bytes();
    w.psp.send_start(h, &chain).unwrap();
    assert_eq!(w.psp.guest_status(h).unwrap().state, GuestState::Supdate);
    w.psp.send_cancel(h).unwrap();
    assert_eq!(w.psp.guest_status(h).unwrap().state, GuestState::Running);
    w.psp.send_start(h, &chain).unwrap();
    w.psp.send_finish(h).unwrap();
    assert_eq!(w.psp.guest_status(h).unwrap().state, GuestState::Sent);
    let e = w.psp.decommission(h).unwrap_err();
    assert_eq!(e.status(), SevStatus::Active);
    w.psp.deactivate(h).unwrap();
    w.psp.decommission(h).unwrap();
    assert_eq!(
        w.psp.guest_status(h).unwrap_err().status(),
        SevStatus::InvalidGuest
    );
}

#[test]
fn unknown_handles_and_uninit_platform() {
    let mut w = world(GuestState::Running);
    // UNINIT (no context): every guest command on an unknown handle is INVALID_GUEST.
    for cmd in Command::GUEST {
        if matches!(cmd, Command::LaunchStart | Command::ReceiveStart) {
            continue;
        }
        let saved = w.h;
        w.h = 4242;
        let e = attempt(&mut w, cmd).unwrap_err();
        assert_eq!(e.status(), SevStatus::InvalidGuest, "{cmd}");
        w.h = saved;
    }
    // Guest commands need an initialised platform.
    w.psp.shutdown().unwrap();
    let e = w
        .psp
        .launch_start(&LaunchStart {
            policy: Policy(0),
            owner: None,
            share_key_with: None,
        })
        .unwrap_err();
    assert_eq!(e.status(), SevStatus::InvalidPlatformState);
    assert!(e.to_string().contains("INIT"));
}

#[test]
fn platform_state_gates() {
    use esvm_psp::PlatformState::*;
    let mut p = Psp::ephemeral(ca(), Default::default()).unwrap();
    assert_eq!(p.state(), Uninit);
    assert_eq!(
        p.pek_gen().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    assert_eq!(
        p.pdh_gen().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    assert_eq!(
        p.pek_csr().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    assert_eq!(
        p.pdh_cert_export().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    let id = p.get_id();
    let old_pdh = p.chain().pdh;
    p.platform_reset().unwrap();
    assert_ne!(p.chain().pdh, old_pdh);
    assert_eq!(p.get_id(), id, "PLATFORM_RESET keeps the chip identity");
    p.init().unwrap();
    assert_eq!(p.state(), Init);
    assert_eq!(
        p.init().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    assert_eq!(
        p.platform_reset().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    let pdh1 = p.pdh_cert_export().unwrap().pdh;
    p.pdh_gen().unwrap();
    let chain = p.pdh_cert_export().unwrap();
    assert_ne!(chain.pdh, pdh1);
    chain.verify(Some(ca().ark())).unwrap();
    let pek1 = chain.pek.clone();
    p.pek_gen().unwrap();
    let chain = p.pdh_cert_export().unwrap();
    assert_ne!(chain.pek, pek1);
    chain.verify(Some(ca().ark())).unwrap();
    // WORKING: one guest.
    let h = p
        .launch_start(&LaunchStart {
            policy: Policy(0),
            owner: None,
            share_key_with: None,
        })
        .unwrap();
    assert_eq!(p.state(), Working);
    let st = p.platform_status();
    assert_eq!(
        (st.state, st.guest_count, st.api_major, st.api_minor),
        (Working, 1, 0, 24)
    );
    assert_eq!(st.flags() & 1, 0, "self-owned");
    assert_eq!(st.flags() & 0x100, 0x100, "SEV-ES capable");
    assert_eq!(
        p.pek_gen().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    assert_eq!(
        p.pdh_gen().unwrap_err().status(),
        SevStatus::InvalidPlatformState
    );
    p.pek_csr().unwrap();
    p.pdh_cert_export().unwrap();
    p.decommission(h).unwrap();
    assert_eq!(p.state(), Init);
    p.shutdown().unwrap();
    assert_eq!(p.state(), Uninit);
}

#[test]
fn asid_rules() {
    let mut p = platform();
    let start = |p: &mut Psp, policy: u32, share: Option<u32>| {
        p.launch_start(&LaunchStart {
            policy: Policy(policy),
            owner: None,
            share_key_with: share,
        })
    };
    let a = start(&mut p, 0, None).unwrap();
    let b = start(&mut p, 0, None).unwrap();
    assert_eq!(
        p.activate(a, 0).unwrap_err().status(),
        SevStatus::InvalidAsid
    );
    assert_eq!(
        p.activate(a, 510).unwrap_err().status(),
        SevStatus::InvalidAsid
    );
    p.activate(a, 5).unwrap();
    assert_eq!(p.activate(a, 6).unwrap_err().status(), SevStatus::Active);
    assert_eq!(p.activate(b, 5).unwrap_err().status(), SevStatus::AsidOwned);
    // A guest sharing a's key may share its ASID.
    let c = start(&mut p, 0, Some(a)).unwrap();
    p.activate(c, 5).unwrap();
    assert_eq!(p.deactivate(b).unwrap_err().status(), SevStatus::Inactive);
    // Memory commands need an active guest.
    let mem = memory();
    assert_eq!(
        p.launch_update_data(b, &mem, 0, 16).unwrap_err().status(),
        SevStatus::Inactive
    );
}
