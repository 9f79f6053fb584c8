//! Unit tests of the MSR protocol, the state and the VMGEXIT dispatch. The GHCB-page events
//! are covered by crates/hv/tests/ghcb_protocol.rs and ghcb_fuzz.rs.

use super::msr::*;
use super::*;
use esvm_abi::msr_protocol::{
    cpuid_request, sev_info_response, term_request, AP_RESET_HOLD_REQ as MSR_AP_RESET_HOLD_REQ,
    HV_FT_REQ as MSR_HV_FT_REQ, REG_GPA_REQ as MSR_REG_GPA_REQ, SEV_INFO_REQ as MSR_SEV_INFO_REQ,
};
use std::collections::BTreeMap;

/// A small services mock: CPUID from a table, a sparse shared memory, everything else refused.
#[derive(Default)]
struct Mock {
    cpuid: BTreeMap<(u32, u32), [u32; 4]>,
    cpuid_calls: Vec<CpuidRequest>,
    shared: BTreeMap<u64, [u8; 4096]>,
    refuse_writes: bool,
}

impl Mock {
    fn page(&mut self, gpa: u64) -> &mut [u8; 4096] {
        self.shared.entry(gpa).or_insert([0; 4096])
    }
}

impl GhcbServices for Mock {
    fn cpuid(&mut self, r: CpuidRequest) -> Result<[u32; 4], ServiceError> {
        self.cpuid_calls.push(r);
        self.cpuid
            .get(&(r.function, r.index))
            .copied()
            .ok_or_else(|| ServiceError::refused("no such leaf"))
    }
    fn io_in(&mut self, _: u16, _: IoSize) -> Result<u32, ServiceError> {
        Err(ServiceError::refused("io"))
    }
    fn io_out(&mut self, _: u16, _: IoSize, _: u32) -> Result<(), ServiceError> {
        Err(ServiceError::refused("io"))
    }
    fn mmio_read(&mut self, _: u64, _: &mut [u8]) -> Result<(), ServiceError> {
        Err(ServiceError::refused("mmio"))
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) -> Result<(), ServiceError> {
        Err(ServiceError::refused("mmio"))
    }
    fn rdmsr(&mut self, _: u32) -> Result<u64, ServiceError> {
        Err(ServiceError::GeneralProtection)
    }
    fn wrmsr(&mut self, _: u32, _: u64) -> Result<(), ServiceError> {
        Err(ServiceError::GeneralProtection)
    }
    fn vmmcall(&mut self, _: &mut VmmcallRegs) -> Result<(), ServiceError> {
        Err(ServiceError::refused("vmmcall"))
    }
    fn tsc(&mut self) -> Result<u64, ServiceError> {
        Ok(0)
    }
    fn tsc_aux(&mut self) -> Result<u32, ServiceError> {
        Ok(0)
    }
    fn ap_jump_table(&mut self) -> Result<u64, ServiceError> {
        Ok(0)
    }
    fn set_ap_jump_table(&mut self, _: u64) -> Result<(), ServiceError> {
        Ok(())
    }
    fn read_shared(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), ServiceError> {
        match self.shared.get(&gpa) {
            Some(p) if buf.len() <= 4096 => {
                buf.copy_from_slice(&p[..buf.len()]);
                Ok(())
            }
            _ => Err(ServiceError::refused("private or unbacked")),
        }
    }
    fn write_shared(&mut self, gpa: u64, data: &[u8]) -> Result<(), ServiceError> {
        if self.refuse_writes {
            return Err(ServiceError::refused("read-only"));
        }
        match self.shared.get_mut(&gpa) {
            Some(p) if data.len() <= 4096 => {
                p[..data.len()].copy_from_slice(data);
                Ok(())
            }
            _ => Err(ServiceError::refused("private or unbacked")),
        }
    }
}

fn respond(o: MsrProtocolOutcome) -> u64 {
    match o {
        MsrProtocolOutcome::Respond { msr } => msr,
        other => panic!("expected a response, got {other:?}"),
    }
}

#[test]
fn sev_info_reports_versions_and_cbit() {
    let mut st = GhcbState::new(GhcbConfig {
        min_version: 1,
        max_version: 2,
        cbit_position: 47,
        ..GhcbConfig::default()
    });
    let msr = respond(handle_msr_protocol(
        MSR_SEV_INFO_REQ,
        &mut Mock::default(),
        &mut st,
    ));
    assert_eq!(msr & 0xFFF, 0x001);
    assert_eq!(msr >> 48, 2, "max version");
    assert_eq!((msr >> 32) & 0xFFFF, 1, "min version");
    assert_eq!((msr >> 24) & 0xFF, 47, "C-bit position");
    assert_eq!(msr, sev_info_response(2, 1, 47));
}

#[test]
fn cpuid_request_returns_each_register() {
    let mut m = Mock::default();
    m.cpuid
        .insert((0x8000_001F, 0), [0x1111, 0x2222_002F, 0x3333, 0x4444]);
    let mut st = GhcbState::default();
    for (reg, want) in [0x1111u64, 0x2222_002F, 0x3333, 0x4444].iter().enumerate() {
        let msr = respond(handle_msr_protocol(
            cpuid_request(0x8000_001F, reg as u8),
            &mut m,
            &mut st,
        ));
        assert_eq!(msr & 0xFFF, 0x005);
        assert_eq!((msr >> 30) & 3, reg as u64, "register echoed");
        assert_eq!((msr >> 12) & 0x3_FFFF, 0, "bits 29:12 are zero");
        assert_eq!(msr >> 32, *want);
    }
    assert_eq!(m.cpuid_calls.len(), 4);
    assert!(m
        .cpuid_calls
        .iter()
        .all(|r| r.function == 0x8000_001F && r.index == 0 && r.xcr0.is_none()));
}

#[test]
fn cpuid_request_refused_is_an_error() {
    let mut st = GhcbState::default();
    let o = handle_msr_protocol(cpuid_request(0x4000_0000, 0), &mut Mock::default(), &mut st);
    match o {
        MsrProtocolOutcome::Error(GhcbError::MsrServiceFailed { request, reason }) => {
            assert!(request.contains("0x40000000"), "{request}");
            assert!(reason.contains("no such leaf"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hv_features_and_registration() {
    let mut st = GhcbState::new(GhcbConfig {
        hv_features: 0b101,
        ..GhcbConfig::default()
    });
    let msr = respond(handle_msr_protocol(
        MSR_HV_FT_REQ,
        &mut Mock::default(),
        &mut st,
    ));
    assert_eq!(msr, (0b101 << 12) | 0x081);

    let req = (0x1234u64 << 12) | MSR_REG_GPA_REQ;
    let msr = respond(handle_msr_protocol(req, &mut Mock::default(), &mut st));
    assert_eq!(msr, (0x1234 << 12) | 0x013);
    assert_eq!(st.registered_gpa, Some(0x123_4000));
}

#[test]
fn termination_request_decodes_reason() {
    let mut st = GhcbState::default();
    let o = handle_msr_protocol(term_request(1, 0x42), &mut Mock::default(), &mut st);
    assert_eq!(
        o,
        MsrProtocolOutcome::Terminate {
            reason_set: 1,
            reason_code: 0x42
        }
    );
    // Bits 15:12 and 23:16 exactly.
    assert_eq!(term_request(0xF, 0xFF), 0x00FF_F100);
}

#[test]
fn unknown_requests_are_errors_not_panics() {
    let mut st = GhcbState::default();
    for info in [0x003u64, 0x010, 0x014, 0xFFF, 0x101] {
        let o = handle_msr_protocol(info | (0xDEAD << 12), &mut Mock::default(), &mut st);
        match o {
            MsrProtocolOutcome::Error(GhcbError::UnsupportedMsrRequest { info: i, .. }) => {
                assert_eq!(u64::from(i), info)
            }
            other => panic!("{info:#x}: {other:?}"),
        }
    }
    let msg = GhcbError::UnsupportedMsrRequest {
        info: 0x14,
        msr: 0x14,
    }
    .to_string();
    assert!(msg.contains("0x014"), "{msg}");
}

#[test]
fn ap_reset_hold_via_msr_protocol() {
    let mut st = GhcbState::default();
    let mut m = Mock::default();
    assert_eq!(
        st.release_ap_reset_hold(&mut m).unwrap(),
        ApHoldRelease::NotHeld
    );
    let o = handle_msr_protocol(MSR_AP_RESET_HOLD_REQ, &mut m, &mut st);
    assert_eq!(o, MsrProtocolOutcome::ApResetHold { msr: 0x007 });
    assert_eq!(st.ap_reset_hold, Some(ApResetHold::MsrProtocol));
    let r = st.release_ap_reset_hold(&mut m).unwrap();
    match r {
        ApHoldRelease::SetMsr(v) => {
            assert_eq!(v & 0xFFF, 0x007);
            assert_ne!(v >> 12, 0, "released: GHCBData non-zero");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(st.ap_reset_hold, None);
}

fn ghcb_page(code: u64, info1: u64, info2: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    let mut p = GhcbPage::new(&mut b);
    p.set_protocol_version(2);
    p.set_sw_exit_code(code);
    p.set_sw_exit_info1(info1);
    p.set_sw_exit_info2(info2);
    b
}

#[test]
fn ap_hlt_loop_then_release_updates_the_page() {
    let gpa = 0x5000;
    let mut m = Mock::default();
    *m.page(gpa) = ghcb_page(exit_code::AP_HLT_LOOP, 0, 0);
    let mut st = GhcbState::default();
    let o = handle_vmgexit(gpa, &mut m, &mut st);
    assert_eq!(o, VmgexitOutcome::Ghcb(GhcbOutcome::ApResetHold));
    assert_eq!(st.ap_reset_hold, Some(ApResetHold::Ghcb { gpa }));
    let mut page = *m.page(gpa);
    assert_eq!(GhcbPage::new(&mut page).sw_exit_info2(), Some(0));

    // A failing write leaves the vCPU held.
    m.refuse_writes = true;
    assert!(st.release_ap_reset_hold(&mut m).is_err());
    assert!(st.ap_reset_hold.is_some());
    m.refuse_writes = false;
    assert_eq!(
        st.release_ap_reset_hold(&mut m).unwrap(),
        ApHoldRelease::GhcbUpdated
    );
    let mut page = *m.page(gpa);
    let p = GhcbPage::new(&mut page);
    assert_eq!(p.sw_exit_info1(), Some(0));
    assert_eq!(p.sw_exit_info2(), Some(1));
    assert_eq!(st.ap_reset_hold, None);
}

#[test]
fn vmgexit_dispatch() {
    let mut st = GhcbState::default();
    let mut m = Mock::default();
    assert_eq!(
        handle_vmgexit(0, &mut m, &mut st),
        VmgexitOutcome::Failed(GhcbError::NoGhcb)
    );
    // An unbacked GHCB page.
    assert!(matches!(
        handle_vmgexit(0x9000, &mut m, &mut st),
        VmgexitOutcome::Failed(GhcbError::GhcbInaccessible { gpa: 0x9000, .. })
    ));
    assert!(matches!(
        handle_vmgexit(!0xFFF, &mut m, &mut st),
        VmgexitOutcome::Failed(GhcbError::GhcbInaccessible { .. })
    ));
    // MSR protocol.
    assert!(matches!(
        handle_vmgexit(MSR_SEV_INFO_REQ, &mut m, &mut st),
        VmgexitOutcome::Msr(MsrProtocolOutcome::Respond { .. })
    ));
    // A GHCB page: HV_FEATURES round trip through shared memory.
    *m.page(0x7000) = ghcb_page(exit_code::HV_FEATURES, 0, 0);
    assert_eq!(
        handle_vmgexit(0x7000, &mut m, &mut st),
        VmgexitOutcome::Ghcb(GhcbOutcome::Resume(GuestResponse::Success))
    );
    assert_eq!(st.negotiated_version, Some(2));
}

/// Serialize/Deserialize are derived on the migrating types (compile-time check; the crate has
/// no serde format as a dependency to round-trip through).
#[allow(dead_code)]
fn migrating_types_are_serde() {
    fn is_serde<T: serde::Serialize + serde::de::DeserializeOwned>() {}
    is_serde::<GhcbState>();
    is_serde::<GhcbVmState>();
    is_serde::<ApResetHold>();
}
