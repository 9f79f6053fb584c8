//! What an SEV-ES guest leaves and enters a VM as: SEND_* on the source, RECEIVE_* on the
//! destination, for live migration and sealed snapshots. The types are backend-neutral; a
//! backend's [`SevVm`](super::SevVm) and [`SevVcpu`](super::SevVcpu) make and take them.
//!
//! What travels, and who can read it:
//! - a **private** page as a firmware transport packet (SEND_UPDATE_DATA: TEK-encrypted,
//!   TIK-authenticated, bound to its address); the hypervisor never sees its plaintext;
//! - a **shared** page (one the guest shares with the host, e.g. its GHCB) as the bytes the
//!   host sees anyway, as hypervisors send them on hardware;
//! - each vCPU as a VMSA packet (SEND_UPDATE_VMSA) that also carries the firmware's
//!   `TrackedExtension` (APIC base, GHCB address, AP state), plus the hypervisor's own,
//!   non-secret per-vCPU state ([`SevHostVcpuState`]: TSC, GHCB MSR, GHCB protocol state).
//!
//! At the destination the firmware hands back what it decrypted and verified: those values
//! — not anything the hypervisor read from the stream — become the tracked registers.
//!
//! The packet and state formats here are esvm's; they are opaque to the migration protocol.

use esvm_psp::session::PACKET_HEADER_LEN;
use esvm_psp::{PacketHeader, SendStartOut};

use crate::ghcb::ApResetHold;
use crate::{HvError, Result};

pub(crate) const PAGE: usize = 4096;
pub(crate) const KIND_PRIVATE: u8 = 1;
pub(crate) const KIND_SHARED: u8 = 2;

/// Length of an encoded private-page packet: kind, firmware header, ciphertext.
pub const PRIVATE_PACKET_LEN: usize = 1 + PACKET_HEADER_LEN + PAGE;
/// Length of an encoded shared-page packet: kind, the page's bytes.
pub const SHARED_PACKET_LEN: usize = 1 + PAGE;

fn sev(msg: impl Into<String>) -> HvError {
    HvError::Sev(msg.into())
}

/// One guest page in transit, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagePacket<'a> {
    /// A private page: the firmware's transport packet.
    Private {
        header: PacketHeader,
        ciphertext: &'a [u8],
    },
    /// A shared page: its host-visible bytes.
    Shared(&'a [u8]),
}

impl<'a> PagePacket<'a> {
    /// Decode an encoded packet (see [`SevVm::send_page`](super::SevVm::send_page)),
    /// checking its length.
    pub fn decode(b: &'a [u8]) -> Result<PagePacket<'a>> {
        match (b.first(), b.len()) {
            (Some(&KIND_PRIVATE), PRIVATE_PACKET_LEN) => Ok(PagePacket::Private {
                header: PacketHeader::from_bytes(&b[1..1 + PACKET_HEADER_LEN])
                    .ok_or_else(|| sev("bad transport packet header"))?,
                ciphertext: &b[1 + PACKET_HEADER_LEN..],
            }),
            (Some(&KIND_SHARED), SHARED_PACKET_LEN) => Ok(PagePacket::Shared(&b[1..])),
            (kind, len) => Err(sev(format!(
                "malformed page packet: kind {kind:?}, {len} bytes (expected kind 1 with \
                 {PRIVATE_PACKET_LEN} bytes or kind 2 with {SHARED_PACKET_LEN})"
            ))),
        }
    }
}

/// The hypervisor's own state of a protected vCPU: what a hypervisor on hardware holds
/// outside the encrypted VMSA (VMCB control area, its GHCB bookkeeping). Not secret, and not
/// trusted by the destination beyond what it checks against the authenticated extension.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevHostVcpuState {
    pub tsc: u64,
    pub ghcb_msr: u64,
    pub ghcb_version: Option<u16>,
    pub ghcb_registered_gpa: Option<u64>,
    pub ap_reset_hold: Option<ApResetHold>,
    pub dr7: u64,
    /// The MTRRs the hypervisor emulates for the guest (they are not in the VMSA).
    #[serde(default)]
    pub mtrr: esvm_arch::msr::MtrrState,
    /// NMI blocking the hypervisor keeps until the guest's NMI_COMPLETE, and an NMI that
    /// waits for it.
    #[serde(default)]
    pub nmi_blocked: bool,
    #[serde(default)]
    pub nmi_pending: bool,
}

/// Version of the hypervisor's SEV-ES transfer state ([`SevHostVcpuState`] and friends), for
/// the migration stream's compatibility check. 2: the MTRRs travel too; 3: NMI blocking.
pub const SEV_TRANSFER_VERSION: u32 = 3;

/// One protected vCPU in transit: its VMSA packet (firmware header + ciphertext of the VMSA
/// and the tracked extension) and the hypervisor's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevVcpuTransfer {
    pub vmsa_header: Vec<u8>,
    pub vmsa_ciphertext: Vec<u8>,
    pub host: SevHostVcpuState,
}

/// The VM-wide hypervisor state of an SEV-ES VM (GHCB bookkeeping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevHostVmState {
    pub ap_jump_table: u64,
}

/// SEND_START's output in the form RECEIVE_START takes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevSessionStart {
    pub policy: u32,
    /// The source platform's PDH certificate.
    pub pdh: Vec<u8>,
    /// The transport keys wrapped for the target's PDH.
    pub session: Vec<u8>,
}

/// Read a `u32` length-prefixed field at `*at`, advancing it.
fn take_field<'a>(b: &'a [u8], at: &mut usize, what: &str) -> Result<&'a [u8]> {
    let bad = || sev(format!("truncated {what}"));
    let len_bytes: [u8; 4] = b
        .get(*at..*at + 4)
        .and_then(|l| l.try_into().ok())
        .ok_or_else(bad)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let field = b.get(*at + 4..*at + 4 + len).ok_or_else(bad)?;
    *at += 4 + len;
    Ok(field)
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

impl SevSessionStart {
    /// Wire form: `policy u32, pdh (u32 length + bytes), session (u32 length + bytes)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.policy.to_le_bytes().to_vec();
        put_field(&mut out, &self.pdh);
        put_field(&mut out, &self.session);
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<SevSessionStart> {
        let policy = b
            .get(..4)
            .and_then(|p| p.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| sev("truncated session start"))?;
        let mut at = 4;
        let pdh = take_field(b, &mut at, "session start (PDH)")?.to_vec();
        let session = take_field(b, &mut at, "session start (session blob)")?.to_vec();
        if at != b.len() {
            return Err(sev("trailing bytes after the session start"));
        }
        Ok(SevSessionStart {
            policy,
            pdh,
            session,
        })
    }
}

impl SevVcpuTransfer {
    /// Wire form: `VMSA packet header (u32 length + bytes), VMSA ciphertext (u32 length +
    /// bytes), the hypervisor's state as JSON (the rest)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.vmsa_ciphertext.len() + 512);
        put_field(&mut out, &self.vmsa_header);
        put_field(&mut out, &self.vmsa_ciphertext);
        out.extend_from_slice(&serde_json::to_vec(&self.host).expect("plain integers serialise"));
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<SevVcpuTransfer> {
        let mut at = 0;
        let vmsa_header = take_field(b, &mut at, "vCPU state (VMSA header)")?.to_vec();
        let vmsa_ciphertext = take_field(b, &mut at, "vCPU state (VMSA packet)")?.to_vec();
        let host = serde_json::from_slice(&b[at..]).map_err(HvError::SevTransferState)?;
        Ok(SevVcpuTransfer {
            vmsa_header,
            vmsa_ciphertext,
            host,
        })
    }
}

impl From<&SendStartOut> for SevSessionStart {
    fn from(o: &SendStartOut) -> Self {
        SevSessionStart {
            policy: o.policy.0,
            pdh: o.pdh.as_bytes().to_vec(),
            session: o.session.to_bytes().to_vec(),
        }
    }
}

/// The GHCB address a GHCB MSR value names: the value itself when it is a page address (the
/// low 12 bits, the MSR protocol's request field, are zero), else 0 (MSR protocol in use).
pub fn ghcb_gpa_of(msr: u64) -> u64 {
    if msr & 0xfff == 0 {
        msr
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_round_trip_and_refuse_truncation() {
        let s = SevSessionStart {
            policy: 4,
            pdh: vec![1, 2, 3],
            session: vec![9; 5],
        };
        let b = s.to_bytes();
        assert_eq!(SevSessionStart::from_bytes(&b).unwrap(), s);
        for n in 0..b.len() {
            assert!(SevSessionStart::from_bytes(&b[..n]).is_err(), "{n}");
        }
        let t = SevVcpuTransfer {
            vmsa_header: vec![7; 3],
            vmsa_ciphertext: vec![8; 10],
            host: SevHostVcpuState {
                tsc: 1,
                ghcb_msr: 0x1000,
                ghcb_version: Some(2),
                ghcb_registered_gpa: None,
                ap_reset_hold: None,
                dr7: 0x400,
                mtrr: Default::default(),
                nmi_blocked: true,
                nmi_pending: true,
            },
        };
        assert_eq!(SevVcpuTransfer::from_bytes(&t.to_bytes()).unwrap(), t);
        assert!(SevVcpuTransfer::from_bytes(&[1, 0]).is_err());
        assert!(PagePacket::decode(&[KIND_SHARED; 7]).is_err());
        assert_eq!(ghcb_gpa_of(0x5000), 0x5000);
        assert_eq!(ghcb_gpa_of(0x5002), 0);
    }
}
