//! Guest policy, the launch/transport session blob and the key schedule shared
//! by the firmware and the guest owner (SEV API formats).
//!
//! Session establishment (guest owner -> firmware, or source -> target firmware):
//! ```text
//! Z      = ECDH(own P-384 key, peer PDH)            (x-coordinate, 48 bytes big-endian)
//! master = KDF(Z, "sev-master-secret", nonce)       (16 bytes)
//! KEK    = KDF(master, "sev-kek", "")   KIK = KDF(master, "sev-kik", "")
//! WrapTK = AES-128-CTR(KEK, wrap_iv, TEK || TIK)   WrapMAC = HMAC-SHA256(KIK, WrapTK)
//! PolicyMAC = HMAC-SHA256(TIK, policy as u32 LE)
//! ```
//! The session blob is `nonce[16] wrap_tk[32] wrap_iv[16] wrap_mac[32] policy_mac[32]`
//! (128 bytes), as in the SEV API and the virtee `sev` crate.

use p384::{PublicKey, SecretKey};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::{aes128_ctr, hmac_sha256, kdf, kdf_key128, mac_eq, random_array, Key128};

/// Size of a session blob.
pub const SESSION_LEN: usize = 128;

/// A guest policy (SEV API layout, u32).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Policy(pub u32);

impl Policy {
    /// Debugging (DBG_DECRYPT / DBG_ENCRYPT) is forbidden.
    pub const NODBG: u32 = 1 << 0;
    /// Sharing the memory key with another guest is forbidden.
    pub const NOKS: u32 = 1 << 1;
    /// SEV-ES is required (encrypted register state).
    pub const ES: u32 = 1 << 2;
    /// Sending the guest to another platform is forbidden.
    pub const NOSEND: u32 = 1 << 3;
    /// The guest may only be sent to platforms of the same owner (same OCA).
    pub const DOMAIN: u32 = 1 << 4;
    /// The guest may only be sent to SEV-capable platforms (authenticated chain).
    pub const SEV: u32 = 1 << 5;
    /// Bits that must be zero.
    pub const RESERVED: u32 = 0x0000_FFC0;

    fn flag(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
    /// NODBG bit.
    pub fn nodbg(self) -> bool {
        self.flag(Self::NODBG)
    }
    /// NOKS bit.
    pub fn noks(self) -> bool {
        self.flag(Self::NOKS)
    }
    /// ES bit.
    pub fn es(self) -> bool {
        self.flag(Self::ES)
    }
    /// NOSEND bit.
    pub fn nosend(self) -> bool {
        self.flag(Self::NOSEND)
    }
    /// DOMAIN bit.
    pub fn domain(self) -> bool {
        self.flag(Self::DOMAIN)
    }
    /// SEV bit.
    pub fn sev(self) -> bool {
        self.flag(Self::SEV)
    }
    /// Minimum firmware API version (major, minor) from bits 16..23 and 24..31.
    pub fn min_api(self) -> (u8, u8) {
        ((self.0 >> 16) as u8, (self.0 >> 24) as u8)
    }
    /// The four policy bytes as MACed (little-endian).
    pub fn to_bytes(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    /// Parses a policy: a number (`0x25`, `37`) or a comma-separated list of
    /// flag names (`nodbg,noks,es,nosend,domain,sev`) with an optional
    /// `api=MAJOR.MINOR` minimum version.
    pub fn parse(s: &str) -> Result<Policy, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            return u32::from_str_radix(hex, 16)
                .map(Policy)
                .map_err(|e| format!("bad hexadecimal policy {s:?}: {e}"));
        }
        if let Ok(v) = s.parse::<u32>() {
            return Ok(Policy(v));
        }
        let mut v = 0u32;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let lower = part.to_ascii_lowercase();
            v |= match lower.as_str() {
                "nodbg" => Self::NODBG,
                "noks" => Self::NOKS,
                "es" => Self::ES,
                "nosend" => Self::NOSEND,
                "domain" => Self::DOMAIN,
                "sev" => Self::SEV,
                _ => {
                    let Some(ver) = lower.strip_prefix("api=") else {
                        return Err(format!(
                            "unknown policy flag {part:?}: use a number or nodbg, noks, es, nosend, domain, sev, api=MAJOR.MINOR"
                        ));
                    };
                    let (maj, min) = ver
                        .split_once('.')
                        .ok_or_else(|| format!("bad api version {ver:?}: use MAJOR.MINOR"))?;
                    let maj: u8 = maj.parse().map_err(|_| format!("bad api major {maj:?}"))?;
                    let min: u8 = min.parse().map_err(|_| format!("bad api minor {min:?}"))?;
                    ((maj as u32) << 16) | ((min as u32) << 24)
                }
            };
        }
        Ok(Policy(v))
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:08x}", self.0)?;
        let names = [
            (Self::NODBG, "NODBG"),
            (Self::NOKS, "NOKS"),
            (Self::ES, "ES"),
            (Self::NOSEND, "NOSEND"),
            (Self::DOMAIN, "DOMAIN"),
            (Self::SEV, "SEV"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(b, _)| self.0 & b != 0)
            .map(|(_, n)| *n)
            .collect();
        let (maj, min) = self.min_api();
        write!(f, " [{}] min API {maj}.{min}", set.join(","))
    }
}

/// The transport encryption and integrity keys of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportKeys {
    /// Transport Encryption Key (AES-128-CTR).
    pub tek: Key128,
    /// Transport Integrity Key (HMAC-SHA256).
    pub tik: Key128,
}

impl TransportKeys {
    /// Fresh random keys.
    pub fn random() -> TransportKeys {
        TransportKeys {
            tek: Key128::random(),
            tik: Key128::random(),
        }
    }
}

/// The session blob (SEV API layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionBlob {
    /// KDF nonce.
    pub nonce: [u8; 16],
    /// TEK || TIK encrypted under KEK.
    pub wrap_tk: [u8; 32],
    /// IV for `wrap_tk`.
    pub wrap_iv: [u8; 16],
    /// HMAC(KIK, wrap_tk).
    pub wrap_mac: [u8; 32],
    /// HMAC(TIK, policy).
    pub policy_mac: [u8; 32],
}

/// Why a session blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Wrong blob size.
    #[error("a session blob is {SESSION_LEN} bytes, got {0}")]
    Length(usize),
    /// WrapMAC does not verify.
    #[error("the wrapped transport keys fail their MAC: the session was made for another PDH, or altered")]
    WrapMac,
    /// PolicyMAC does not verify.
    #[error(
        "the policy MAC does not verify: the policy differs from the one the session was made for"
    )]
    PolicyMac,
}

impl SessionBlob {
    /// Encodes the 128-byte blob.
    pub fn to_bytes(&self) -> [u8; SESSION_LEN] {
        let mut b = [0u8; SESSION_LEN];
        b[0..16].copy_from_slice(&self.nonce);
        b[16..48].copy_from_slice(&self.wrap_tk);
        b[48..64].copy_from_slice(&self.wrap_iv);
        b[64..96].copy_from_slice(&self.wrap_mac);
        b[96..128].copy_from_slice(&self.policy_mac);
        b
    }

    /// Decodes the 128-byte blob.
    pub fn from_bytes(b: &[u8]) -> Result<SessionBlob, SessionError> {
        if b.len() != SESSION_LEN {
            return Err(SessionError::Length(b.len()));
        }
        let mut s = SessionBlob {
            nonce: [0; 16],
            wrap_tk: [0; 32],
            wrap_iv: [0; 16],
            wrap_mac: [0; 32],
            policy_mac: [0; 32],
        };
        s.nonce.copy_from_slice(&b[0..16]);
        s.wrap_tk.copy_from_slice(&b[16..48]);
        s.wrap_iv.copy_from_slice(&b[48..64]);
        s.wrap_mac.copy_from_slice(&b[64..96]);
        s.policy_mac.copy_from_slice(&b[96..128]);
        Ok(s)
    }
}

/// ECDH shared secret Z: the x-coordinate of `own * peer`, 48 bytes big-endian
/// (what OpenSSL's ECDH derive returns, and so what the `sev` crate uses).
pub fn shared_secret(own: &SecretKey, peer: &PublicKey) -> Zeroizing<[u8; 48]> {
    let shared = p384::ecdh::diffie_hellman(own.to_nonzero_scalar(), peer.as_affine());
    let mut z = Zeroizing::new([0u8; 48]);
    z.copy_from_slice(shared.raw_secret_bytes());
    z
}

fn kek_kik(z: &[u8], nonce: &[u8; 16]) -> (Key128, Key128) {
    let mut master = Zeroizing::new([0u8; 16]);
    kdf(z, "sev-master-secret", nonce, &mut master[..]);
    (
        kdf_key128(&master[..], "sev-kek", &[]),
        kdf_key128(&master[..], "sev-kik", &[]),
    )
}

/// Wraps `keys` for the holder of the peer key that produced `z`, with random
/// nonce and IV.
pub fn wrap_session(z: &[u8], keys: &TransportKeys, policy: Policy) -> SessionBlob {
    wrap_session_with(z, keys, policy, random_array(), random_array())
}

/// Wraps `keys` with the given nonce and IV (deterministic; for tests).
pub fn wrap_session_with(
    z: &[u8],
    keys: &TransportKeys,
    policy: Policy,
    nonce: [u8; 16],
    wrap_iv: [u8; 16],
) -> SessionBlob {
    let (kek, kik) = kek_kik(z, &nonce);
    let mut wrap_tk = [0u8; 32];
    wrap_tk[..16].copy_from_slice(keys.tek.as_bytes());
    wrap_tk[16..].copy_from_slice(keys.tik.as_bytes());
    aes128_ctr(&kek, &wrap_iv, &mut wrap_tk);
    SessionBlob {
        nonce,
        wrap_mac: hmac_sha256(kik.as_bytes(), &[&wrap_tk]),
        wrap_tk,
        wrap_iv,
        policy_mac: hmac_sha256(keys.tik.as_bytes(), &[&policy.to_bytes()]),
    }
}

/// Unwraps the transport keys, checking WrapMAC and PolicyMAC.
pub fn unwrap_session(
    z: &[u8],
    blob: &SessionBlob,
    policy: Policy,
) -> Result<TransportKeys, SessionError> {
    let (kek, kik) = kek_kik(z, &blob.nonce);
    let mac = hmac_sha256(kik.as_bytes(), &[&blob.wrap_tk]);
    if !mac_eq(&mac, &blob.wrap_mac) {
        return Err(SessionError::WrapMac);
    }
    let mut tk = Zeroizing::new(blob.wrap_tk);
    aes128_ctr(&kek, &blob.wrap_iv, &mut tk[..]);
    let mut tek = [0u8; 16];
    let mut tik = [0u8; 16];
    tek.copy_from_slice(&tk[..16]);
    tik.copy_from_slice(&tk[16..]);
    let keys = TransportKeys {
        tek: Key128::from_bytes(tek),
        tik: Key128::from_bytes(tik),
    };
    tek.zeroize();
    tik.zeroize();
    let pmac = hmac_sha256(keys.tik.as_bytes(), &[&policy.to_bytes()]);
    if !mac_eq(&pmac, &blob.policy_mac) {
        return Err(SessionError::PolicyMac);
    }
    Ok(keys)
}

/// The firmware's API version and build, as bound into the measurement.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Build {
    /// API major version.
    pub api_major: u8,
    /// API minor version.
    pub api_minor: u8,
    /// Firmware build number.
    pub build: u8,
}

impl std::fmt::Display for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{} build {}",
            self.api_major, self.api_minor, self.build
        )
    }
}

/// The launch measurement returned by LAUNCH_MEASURE.
///
/// File format (`to_file_bytes`): `measure[32] || mnonce[16]` (the SEV API's
/// 48-byte layout) followed by `api_major, api_minor, build` (3 bytes) so the
/// owner can recompute the MAC without asking the host separately.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// HMAC-SHA256(TIK, 0x04 || api_major || api_minor || build || policy || digest || mnonce).
    pub measure: [u8; 32],
    /// Random nonce chosen by the firmware.
    pub mnonce: [u8; 16],
    /// The firmware version bound into `measure`.
    pub build: Build,
}

/// Length of a measurement file.
pub const MEASUREMENT_FILE_LEN: usize = 51;

impl Measurement {
    /// The 48-byte SEV API layout (`measure || mnonce`).
    pub fn to_sev_bytes(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..32].copy_from_slice(&self.measure);
        b[32..].copy_from_slice(&self.mnonce);
        b
    }

    /// The measurement file (51 bytes).
    pub fn to_file_bytes(&self) -> [u8; MEASUREMENT_FILE_LEN] {
        let mut b = [0u8; MEASUREMENT_FILE_LEN];
        b[..48].copy_from_slice(&self.to_sev_bytes());
        b[48] = self.build.api_major;
        b[49] = self.build.api_minor;
        b[50] = self.build.build;
        b
    }

    /// Reads a measurement file: 51 bytes, or the 48-byte SEV layout plus an
    /// explicit `build`.
    pub fn from_file_bytes(b: &[u8], build: Option<Build>) -> Result<Measurement, String> {
        let build = match (b.len(), build) {
            (MEASUREMENT_FILE_LEN, None) => Build {
                api_major: b[48],
                api_minor: b[49],
                build: b[50],
            },
            (MEASUREMENT_FILE_LEN | 48, Some(bu)) => bu,
            (48, None) => {
                return Err("a 48-byte measurement carries no firmware version: pass the platform's API version and build".into())
            }
            (n, _) => {
                return Err(format!(
                    "a measurement file is {MEASUREMENT_FILE_LEN} bytes (or 48 in the SEV layout), got {n}"
                ))
            }
        };
        let mut m = Measurement {
            measure: [0; 32],
            mnonce: [0; 16],
            build,
        };
        m.measure.copy_from_slice(&b[..32]);
        m.mnonce.copy_from_slice(&b[32..48]);
        Ok(m)
    }
}

/// The launch measurement MAC.
pub fn measurement_mac(
    tik: &Key128,
    build: Build,
    policy: Policy,
    digest: &[u8; 32],
    mnonce: &[u8; 16],
) -> [u8; 32] {
    hmac_sha256(
        tik.as_bytes(),
        &[
            &[0x04, build.api_major, build.api_minor, build.build],
            &policy.to_bytes(),
            digest,
            mnonce,
        ],
    )
}

/// Header of a LAUNCH_SECRET packet and of transport packets: `flags u32,
/// iv[16], mac[32]` (52 bytes, little-endian).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct PacketHeader {
    /// Flags (bit 0 = compressed; this firmware supports none).
    pub flags: u32,
    /// The IV (initial AES-CTR counter block).
    pub iv: [u8; 16],
    /// HMAC-SHA256 under TIK.
    pub mac: [u8; 32],
}

/// Size of an encoded [`PacketHeader`].
pub const PACKET_HEADER_LEN: usize = 52;

impl PacketHeader {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; PACKET_HEADER_LEN] {
        let mut b = [0u8; PACKET_HEADER_LEN];
        b[..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..20].copy_from_slice(&self.iv);
        b[20..].copy_from_slice(&self.mac);
        b
    }

    /// Decodes a header.
    pub fn from_bytes(b: &[u8]) -> Option<PacketHeader> {
        if b.len() != PACKET_HEADER_LEN {
            return None;
        }
        let mut h = PacketHeader {
            flags: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ..Default::default()
        };
        h.iv.copy_from_slice(&b[4..20]);
        h.mac.copy_from_slice(&b[20..]);
        Some(h)
    }
}

/// The MAC of a LAUNCH_SECRET packet:
/// `HMAC(TIK, 0x01 || flags || iv || guest_len u32 || trans_len u32 || ciphertext || measure)`.
pub fn secret_mac(
    tik: &Key128,
    flags: u32,
    iv: &[u8; 16],
    guest_len: u32,
    ciphertext: &[u8],
    measure: &[u8; 32],
) -> [u8; 32] {
    hmac_sha256(
        tik.as_bytes(),
        &[
            &[0x01],
            &flags.to_le_bytes(),
            iv,
            &guest_len.to_le_bytes(),
            &(ciphertext.len() as u32).to_le_bytes(),
            ciphertext,
            measure,
        ],
    )
}

/// Packages a secret for LAUNCH_SECRET (the guest owner's side).
pub fn package_secret(
    keys: &TransportKeys,
    measure: &[u8; 32],
    secret: &[u8],
) -> (PacketHeader, Vec<u8>) {
    let iv: [u8; 16] = random_array();
    let mut ct = secret.to_vec();
    aes128_ctr(&keys.tek, &iv, &mut ct);
    let mac = secret_mac(&keys.tik, 0, &iv, secret.len() as u32, &ct, measure);
    (PacketHeader { flags: 0, iv, mac }, ct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    #[test]
    fn wrap_unwrap_round_trip_both_sides_of_ecdh() {
        let owner = SecretKey::random(&mut OsRng);
        let pdh = SecretKey::random(&mut OsRng);
        let z1 = shared_secret(&owner, &pdh.public_key());
        let z2 = shared_secret(&pdh, &owner.public_key());
        assert_eq!(*z1, *z2);
        let keys = TransportKeys::random();
        let policy = Policy(Policy::NODBG | Policy::ES);
        let blob = wrap_session(&z1[..], &keys, policy);
        let blob = SessionBlob::from_bytes(&blob.to_bytes()).unwrap();
        assert_eq!(unwrap_session(&z2[..], &blob, policy).unwrap(), keys);
        assert_eq!(
            unwrap_session(&z2[..], &blob, Policy(Policy::ES)),
            Err(SessionError::PolicyMac)
        );
        let other = SecretKey::random(&mut OsRng);
        let z3 = shared_secret(&other, &owner.public_key());
        assert_eq!(
            unwrap_session(&z3[..], &blob, policy),
            Err(SessionError::WrapMac)
        );
    }

    #[test]
    fn policy_parsing() {
        assert_eq!(Policy::parse("0x25").unwrap(), Policy(0x25));
        assert_eq!(Policy::parse("5").unwrap(), Policy(5));
        let p = Policy::parse("nodbg, es,api=0.17").unwrap();
        assert!(p.nodbg() && p.es() && !p.noks());
        assert_eq!(p.min_api(), (0, 17));
        assert!(Policy::parse("bogus").is_err());
    }

    #[test]
    fn measurement_file_round_trip() {
        let m = Measurement {
            measure: [1; 32],
            mnonce: [2; 16],
            build: Build {
                api_major: 0,
                api_minor: 24,
                build: 7,
            },
        };
        let b = m.to_file_bytes();
        assert_eq!(Measurement::from_file_bytes(&b, None).unwrap(), m);
        assert_eq!(
            Measurement::from_file_bytes(&b[..48], Some(m.build)).unwrap(),
            m
        );
        assert!(Measurement::from_file_bytes(&b[..48], None).is_err());
        assert!(Measurement::from_file_bytes(&b[..40], None).is_err());
    }
}
