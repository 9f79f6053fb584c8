//! AMD SEV certificates in AMD's binary layouts, with real P-384 and RSA crypto.
//!
//! # SEV certificate (`SevCert`, 0x824 bytes, little-endian)
//! ```text
//! 0x000 u32 version (1)          0x004 u8 api_major   0x005 u8 api_minor
//! 0x006 u16 reserved             0x008 u32 pubkey usage  0x00C u32 pubkey algorithm
//! 0x010 public key (1028 bytes): ECC = u32 curve (2 = P-384), qx[72], qy[72]
//!       (little-endian, zero-padded), rest zero
//! 0x414 signature 1: u32 usage, u32 algorithm, 512 bytes
//! 0x61C signature 2: u32 usage, u32 algorithm, 512 bytes
//! ```
//! The signed body is bytes 0x000..0x414. ECDSA signatures are r[72] || s[72]
//! little-endian; RSA signatures (the ASK's on the CEK) are the little-endian
//! signature integer padded to 512 bytes. An empty slot has algorithm 0.
//! ECDSA_SHA256 over P-384 means: SHA-256 of the body, ECDSA on P-384.
//!
//! # AMD CA certificate (`CaCert`: ARK and ASK)
//! ```text
//! 0x00 u32 version (1)  0x04 key_id[16]  0x14 signer key_id[16]  0x24 u32 usage
//! 0x28 reserved[16]     0x38 u32 pubexp bits  0x3C u32 modulus bits
//! 0x40 pubexp[n] modulus[n] signature[n]      (n = modulus bytes, little-endian)
//! ```
//! Signatures are RSA-PSS with salt length = digest length, SHA-256 for 2048-bit
//! and SHA-384 for 4096-bit keys, over everything before the signature.
//!
//! # Chain file
//! PDH, PEK, OCA, CEK (SEV certs) followed by ASK, ARK (CA certs) — the layout
//! the virtee `sev` crate decodes as `certs::sev::Chain`.

use p384::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use p384::ecdsa::{Signature as EcdsaSig, SigningKey, VerifyingKey};
use p384::elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ToEncodedPoint};
use p384::{NistP384, PublicKey};
use rand::rngs::OsRng;
use rsa::pss::Pss;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384};

/// Size of an SEV certificate.
pub const SEV_CERT_LEN: usize = 0x824;
/// Size of the signed body of an SEV certificate.
pub const SEV_CERT_BODY_LEN: usize = 0x414;
const SIG1_OFF: usize = 0x414;
const SIG_SLOT_LEN: usize = 520;
const CURVE_P384: u32 = 2;
const CA_HEADER_LEN: usize = 0x40;

/// A certificate's key usage.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Usage(pub u32);

impl Usage {
    /// AMD Root Key.
    pub const ARK: Usage = Usage(0x0000);
    /// AMD Signing Key.
    pub const ASK: Usage = Usage(0x0013);
    /// Empty signature slot.
    pub const INVALID: Usage = Usage(0x1000);
    /// Owner Certificate Authority.
    pub const OCA: Usage = Usage(0x1001);
    /// Platform Endorsement Key.
    pub const PEK: Usage = Usage(0x1002);
    /// Platform Diffie-Hellman key.
    pub const PDH: Usage = Usage(0x1003);
    /// Chip Endorsement Key.
    pub const CEK: Usage = Usage(0x1004);

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Usage::ARK => "ARK",
            Usage::ASK => "ASK",
            Usage::OCA => "OCA",
            Usage::PEK => "PEK",
            Usage::PDH => "PDH",
            Usage::CEK => "CEK",
            Usage::INVALID => "none",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:04x})", self.name(), self.0)
    }
}

/// Key / signature algorithm identifiers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Algo(pub u32);

impl Algo {
    /// No algorithm (empty signature slot).
    pub const NONE: Algo = Algo(0x0000);
    /// RSA-PSS with SHA-256.
    pub const RSA_SHA256: Algo = Algo(0x0001);
    /// ECDSA with SHA-256.
    pub const ECDSA_SHA256: Algo = Algo(0x0002);
    /// ECDH (key usage PDH) with SHA-256.
    pub const ECDH_SHA256: Algo = Algo(0x0003);
    /// RSA-PSS with SHA-384.
    pub const RSA_SHA384: Algo = Algo(0x0101);
    /// ECDSA with SHA-384.
    pub const ECDSA_SHA384: Algo = Algo(0x0102);
    /// ECDH with SHA-384.
    pub const ECDH_SHA384: Algo = Algo(0x0103);

    fn is_ecc(self) -> bool {
        matches!(
            self,
            Algo::ECDSA_SHA256 | Algo::ECDSA_SHA384 | Algo::ECDH_SHA256 | Algo::ECDH_SHA384
        )
    }
    fn is_ecdsa(self) -> bool {
        matches!(self, Algo::ECDSA_SHA256 | Algo::ECDSA_SHA384)
    }
    fn is_signature(self) -> bool {
        matches!(
            self,
            Algo::RSA_SHA256 | Algo::RSA_SHA384 | Algo::ECDSA_SHA256 | Algo::ECDSA_SHA384
        )
    }
}

/// What is wrong with a certificate or chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Wrong size.
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        /// Which structure.
        what: &'static str,
        /// Expected size.
        expected: usize,
        /// Actual size.
        got: usize,
    },
    /// Unknown version field.
    #[error("unsupported certificate version {0} (only version 1 exists)")]
    Version(u32),
    /// The certificate has the wrong key usage for its place.
    #[error("expected a {expected} certificate, found usage {got}")]
    WrongUsage {
        /// The usage required here.
        expected: Usage,
        /// The usage found.
        got: Usage,
    },
    /// Unknown or unsupported algorithm.
    #[error("unsupported public-key algorithm 0x{0:04x} (this firmware uses ECDSA/ECDH on P-384)")]
    Algorithm(u32),
    /// Unsupported curve.
    #[error("unsupported curve id {0} (only P-384, id 2, is supported)")]
    Curve(u32),
    /// The public key is not a valid point.
    #[error("the public key is not a valid P-384 point")]
    BadPoint,
    /// Unsupported RSA size.
    #[error(
        "unsupported RSA key size {0} bits (2048 or 4096 expected, pubexp and modulus sizes equal)"
    )]
    KeySize(u32),
    /// No signature from the expected signer.
    #[error("the certificate carries no signature by a {0} key")]
    NoSignatureBy(Usage),
    /// A signature is present but invalid.
    #[error("the {signer} signature does not verify: the certificate was altered or signed by another key")]
    SignatureInvalid {
        /// Who was supposed to have signed.
        signer: Usage,
    },
    /// The signer key id does not match.
    #[error("the certificate names a different signing key id than the issuer's key id")]
    KeyIdMismatch,
    /// The chain's ARK is not the trusted one.
    #[error("the chain's ARK is not the trusted ARK")]
    ArkNotTrusted,
    /// Both signature slots are used.
    #[error("both signature slots are already used")]
    SlotsFull,
    /// Extra bytes after a chain.
    #[error("{0} unexpected trailing bytes after the certificate chain")]
    TrailingBytes(usize),
    /// RSA library failure (shared, so that the error stays `Clone`).
    #[error("RSA: {0}")]
    Rsa(#[source] std::sync::Arc<rsa::Error>),
    /// Signing kept producing signatures shorter than the modulus.
    #[error("RSA: could not produce a full-length signature")]
    ShortSignature,
}

impl CertError {
    /// True for failures of signature verification (as opposed to malformed input).
    pub fn is_signature_failure(&self) -> bool {
        matches!(
            self,
            CertError::NoSignatureBy(_)
                | CertError::SignatureInvalid { .. }
                | CertError::KeyIdMismatch
                | CertError::ArkNotTrusted
        )
    }
}

fn rd32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn wr32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a big-endian integer as little-endian into `dst` (zero-padded).
fn be_to_le_into(be: &[u8], dst: &mut [u8]) {
    dst.fill(0);
    for (i, b) in be.iter().rev().enumerate() {
        dst[i] = *b;
    }
}

/// Reads a little-endian field of `len` significant bytes as big-endian;
/// `None` if the padding above `len` is non-zero.
fn le_to_be(src: &[u8], len: usize) -> Option<Vec<u8>> {
    if src[len..].iter().any(|b| *b != 0) {
        return None;
    }
    Some(src[..len].iter().rev().copied().collect())
}

/// An SEV certificate (PEK, PDH, OCA, CEK) in AMD's layout.
#[derive(Clone, PartialEq, Eq)]
pub struct SevCert {
    raw: Box<[u8; SEV_CERT_LEN]>,
}

impl std::fmt::Debug for SevCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SevCert {{ usage: {}, algo: 0x{:x}, api: {}.{} }}",
            self.usage(),
            self.algo().0,
            self.api_version().0,
            self.api_version().1
        )
    }
}

impl SevCert {
    /// A new certificate for a P-384 public key, with both signature slots empty.
    pub fn new(usage: Usage, algo: Algo, api: (u8, u8), key: &PublicKey) -> SevCert {
        let mut raw = Box::new([0u8; SEV_CERT_LEN]);
        wr32(&mut raw[..], 0, 1);
        raw[4] = api.0;
        raw[5] = api.1;
        wr32(&mut raw[..], 0x08, usage.0);
        wr32(&mut raw[..], 0x0C, algo.0);
        wr32(&mut raw[..], 0x10, CURVE_P384);
        let point = key.to_encoded_point(false);
        // An uncompressed point on P-384 always has both coordinates.
        if let (Some(x), Some(y)) = (point.x(), point.y()) {
            be_to_le_into(x, &mut raw[0x14..0x14 + 72]);
            be_to_le_into(y, &mut raw[0x5C..0x5C + 72]);
        }
        for slot in 0..2 {
            let off = SIG1_OFF + slot * SIG_SLOT_LEN;
            wr32(&mut raw[..], off, Usage::INVALID.0);
            wr32(&mut raw[..], off + 4, Algo::NONE.0);
        }
        SevCert { raw }
    }

    /// Parses and checks the structure (version, algorithm, curve, point).
    pub fn from_bytes(bytes: &[u8]) -> Result<SevCert, CertError> {
        if bytes.len() != SEV_CERT_LEN {
            return Err(CertError::Length {
                what: "an SEV certificate",
                expected: SEV_CERT_LEN,
                got: bytes.len(),
            });
        }
        let mut raw = Box::new([0u8; SEV_CERT_LEN]);
        raw.copy_from_slice(bytes);
        let cert = SevCert { raw };
        let version = rd32(&cert.raw[..], 0);
        if version != 1 {
            return Err(CertError::Version(version));
        }
        if !cert.algo().is_ecc() {
            return Err(CertError::Algorithm(cert.algo().0));
        }
        cert.public_key()?;
        Ok(cert)
    }

    /// Parses and checks the usage too.
    pub fn from_bytes_with_usage(bytes: &[u8], usage: Usage) -> Result<SevCert, CertError> {
        let cert = SevCert::from_bytes(bytes)?;
        cert.expect_usage(usage)?;
        Ok(cert)
    }

    /// Fails unless the certificate has `usage`.
    pub fn expect_usage(&self, usage: Usage) -> Result<(), CertError> {
        if self.usage() != usage {
            return Err(CertError::WrongUsage {
                expected: usage,
                got: self.usage(),
            });
        }
        Ok(())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; SEV_CERT_LEN] {
        &self.raw
    }

    /// The signed body (bytes 0..0x414).
    pub fn body(&self) -> &[u8] {
        &self.raw[..SEV_CERT_BODY_LEN]
    }

    /// Key usage.
    pub fn usage(&self) -> Usage {
        Usage(rd32(&self.raw[..], 0x08))
    }

    /// Key algorithm.
    pub fn algo(&self) -> Algo {
        Algo(rd32(&self.raw[..], 0x0C))
    }

    /// The API version (major, minor) of the firmware that made the certificate.
    pub fn api_version(&self) -> (u8, u8) {
        (self.raw[4], self.raw[5])
    }

    /// The P-384 public key.
    pub fn public_key(&self) -> Result<PublicKey, CertError> {
        let curve = rd32(&self.raw[..], 0x10);
        if curve != CURVE_P384 {
            return Err(CertError::Curve(curve));
        }
        let x = le_to_be(&self.raw[0x14..0x14 + 72], 48).ok_or(CertError::BadPoint)?;
        let y = le_to_be(&self.raw[0x5C..0x5C + 72], 48).ok_or(CertError::BadPoint)?;
        // Bytes 0xA4..0x414 (the rest of the key union) are not interpreted:
        // other implementations leave them uninitialised in unsigned
        // certificates; in signed ones the signature covers them.
        let point = EncodedPoint::<NistP384>::from_affine_coordinates(
            x.as_slice().into(),
            y.as_slice().into(),
            false,
        );
        Option::<PublicKey>::from(PublicKey::from_encoded_point(&point)).ok_or(CertError::BadPoint)
    }

    /// True if both certificates hold the same public key with the same usage.
    pub fn same_key(&self, other: &SevCert) -> bool {
        self.raw[0x08..SEV_CERT_BODY_LEN] == other.raw[0x08..SEV_CERT_BODY_LEN]
    }

    fn slot(&self, i: usize) -> (Usage, Algo, &[u8]) {
        let off = SIG1_OFF + i * SIG_SLOT_LEN;
        (
            Usage(rd32(&self.raw[..], off)),
            Algo(rd32(&self.raw[..], off + 4)),
            &self.raw[off + 8..off + SIG_SLOT_LEN],
        )
    }

    fn free_slot(&self) -> Result<usize, CertError> {
        (0..2)
            .find(|i| !self.slot(*i).1.is_signature())
            .ok_or(CertError::SlotsFull)
    }

    fn put_slot(&mut self, i: usize, usage: Usage, algo: Algo, sig: &[u8]) {
        let off = SIG1_OFF + i * SIG_SLOT_LEN;
        wr32(&mut self.raw[..], off, usage.0);
        wr32(&mut self.raw[..], off + 4, algo.0);
        let dst = &mut self.raw[off + 8..off + SIG_SLOT_LEN];
        dst.fill(0);
        dst[..sig.len()].copy_from_slice(sig);
    }

    /// Removes all signatures (used to build a CSR or compare bodies).
    pub fn clear_signatures(&mut self) {
        for i in 0..2 {
            self.put_slot(i, Usage::INVALID, Algo::NONE, &[]);
        }
    }

    /// Copies the signature made by a `signer` key from `from` (a certificate
    /// with the same body) into the first free slot.
    pub fn adopt_signature(&mut self, from: &SevCert, signer: Usage) -> Result<(), CertError> {
        let (algo, sig) = (0..2)
            .map(|i| from.slot(i))
            .find(|(u, a, _)| *u == signer && a.is_signature())
            .map(|(_, a, s)| (a, s.to_vec()))
            .ok_or(CertError::NoSignatureBy(signer))?;
        let slot = self.free_slot()?;
        self.put_slot(slot, signer, algo, &sig);
        Ok(())
    }

    /// Signs with an ECDSA P-384 key of `signer_usage` using ECDSA_SHA256,
    /// into the first free slot.
    pub fn sign_ecdsa(&mut self, signer_usage: Usage, key: &SigningKey) -> Result<(), CertError> {
        let slot = self.free_slot()?;
        let digest = Sha256::digest(self.body());
        let sig: EcdsaSig = key
            .sign_prehash(&digest)
            .map_err(|_| CertError::SignatureInvalid {
                signer: signer_usage,
            })?;
        let (r, s) = sig.split_bytes();
        let mut buf = [0u8; 144];
        be_to_le_into(&r, &mut buf[..72]);
        be_to_le_into(&s, &mut buf[72..]);
        self.put_slot(slot, signer_usage, Algo::ECDSA_SHA256, &buf);
        Ok(())
    }

    /// Signs with the ASK (RSA-PSS) into the first free slot.
    pub fn sign_rsa(&mut self, signer_usage: Usage, key: &RsaPrivateKey) -> Result<(), CertError> {
        let slot = self.free_slot()?;
        let bits = (key.size() * 8) as u32;
        let (algo, sig) = rsa_pss_sign(key, bits, self.body())?;
        let mut le = vec![0u8; 512];
        be_to_le_into(&sig, &mut le[..sig.len()]);
        self.put_slot(slot, signer_usage, algo, &le);
        Ok(())
    }

    /// Verifies that `signer` (an ECDSA key: OCA, CEK or PEK) signed this certificate.
    pub fn verify_signed_by(&self, signer: &SevCert) -> Result<(), CertError> {
        let salgo = signer.algo();
        if !salgo.is_ecdsa() {
            return Err(CertError::Algorithm(salgo.0));
        }
        let vk = VerifyingKey::from(&signer.public_key()?);
        let mut found = false;
        for i in 0..2 {
            let (usage, algo, sig) = self.slot(i);
            if usage != signer.usage() || algo != salgo {
                continue;
            }
            found = true;
            // r and s are 48-byte values zero-padded to 72 bytes; the rest of
            // the 512-byte slot is reserved and must be zero.
            if sig[144..].iter().any(|b| *b != 0) {
                continue;
            }
            let (Some(r), Some(s)) = (le_to_be(&sig[..72], 48), le_to_be(&sig[72..144], 48)) else {
                continue;
            };
            let Ok(sig) = EcdsaSig::from_scalars(
                *p384::FieldBytes::from_slice(&r),
                *p384::FieldBytes::from_slice(&s),
            ) else {
                continue;
            };
            let ok = if salgo == Algo::ECDSA_SHA256 {
                vk.verify_prehash(&Sha256::digest(self.body()), &sig)
                    .is_ok()
            } else {
                vk.verify_prehash(&Sha384::digest(self.body()), &sig)
                    .is_ok()
            };
            if ok {
                return Ok(());
            }
        }
        if found {
            Err(CertError::SignatureInvalid {
                signer: signer.usage(),
            })
        } else {
            Err(CertError::NoSignatureBy(signer.usage()))
        }
    }

    /// Verifies that the ASK `ca` signed this certificate (the CEK).
    pub fn verify_signed_by_ca(&self, ca: &CaCert) -> Result<(), CertError> {
        let want = if ca.bits() == 2048 {
            Algo::RSA_SHA256
        } else {
            Algo::RSA_SHA384
        };
        let n = ca.bits() as usize / 8;
        let mut found = false;
        for i in 0..2 {
            let (usage, algo, sig) = self.slot(i);
            if usage != ca.usage() || algo != want {
                continue;
            }
            found = true;
            let Some(be) = le_to_be(sig, n) else { continue };
            if rsa_pss_verify(&ca.public_key()?, ca.bits(), self.body(), &be).is_ok() {
                return Ok(());
            }
        }
        if found {
            Err(CertError::SignatureInvalid { signer: ca.usage() })
        } else {
            Err(CertError::NoSignatureBy(ca.usage()))
        }
    }
}

fn rsa_pss_sign(key: &RsaPrivateKey, bits: u32, msg: &[u8]) -> Result<(Algo, Vec<u8>), CertError> {
    // Re-sign (PSS is randomised) until the signature's top byte is non-zero,
    // so that verifiers that strip leading zero bytes still see a full-length
    // signature; about one try in 256 needs a second attempt.
    for _ in 0..64 {
        let (algo, sig) = match bits {
            2048 => (
                Algo::RSA_SHA256,
                key.sign_with_rng(
                    &mut OsRng,
                    Pss::new_with_salt::<Sha256>(32),
                    &Sha256::digest(msg),
                ),
            ),
            4096 => (
                Algo::RSA_SHA384,
                key.sign_with_rng(
                    &mut OsRng,
                    Pss::new_with_salt::<Sha384>(48),
                    &Sha384::digest(msg),
                ),
            ),
            other => return Err(CertError::KeySize(other)),
        };
        let sig = sig.map_err(|e| CertError::Rsa(e.into()))?;
        if sig.len() == bits as usize / 8 && sig[0] != 0 {
            return Ok((algo, sig));
        }
    }
    Err(CertError::ShortSignature)
}

fn rsa_pss_verify(key: &RsaPublicKey, bits: u32, msg: &[u8], sig_be: &[u8]) -> Result<(), ()> {
    let r = match bits {
        2048 => key.verify(
            Pss::new_with_salt::<Sha256>(32),
            &Sha256::digest(msg),
            sig_be,
        ),
        4096 => key.verify(
            Pss::new_with_salt::<Sha384>(48),
            &Sha384::digest(msg),
            sig_be,
        ),
        _ => return Err(()),
    };
    r.map_err(|_| ())
}

/// An AMD CA certificate (ARK or ASK) in AMD's layout.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCert {
    raw: Vec<u8>,
}

impl std::fmt::Debug for CaCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CaCert {{ usage: {}, bits: {} }}",
            self.usage(),
            self.bits()
        )
    }
}

impl CaCert {
    /// Builds and signs a CA certificate. For the ARK, `signer` is its own key
    /// and `signer_kid == key_id`.
    pub fn new_signed(
        usage: Usage,
        key_id: [u8; 16],
        signer_kid: [u8; 16],
        key: &RsaPublicKey,
        signer: &RsaPrivateKey,
    ) -> Result<CaCert, CertError> {
        let bits = (key.size() * 8) as u32;
        if bits != 2048 && bits != 4096 {
            return Err(CertError::KeySize(bits));
        }
        if signer.size() != key.size() {
            return Err(CertError::KeySize((signer.size() * 8) as u32));
        }
        let n = bits as usize / 8;
        let mut raw = vec![0u8; CA_HEADER_LEN + 3 * n];
        wr32(&mut raw, 0, 1);
        raw[0x04..0x14].copy_from_slice(&key_id);
        raw[0x14..0x24].copy_from_slice(&signer_kid);
        wr32(&mut raw, 0x24, usage.0);
        wr32(&mut raw, 0x38, bits);
        wr32(&mut raw, 0x3C, bits);
        let e = key.e().to_bytes_be();
        let m = key.n().to_bytes_be();
        be_to_le_into(&e, &mut raw[CA_HEADER_LEN..CA_HEADER_LEN + n]);
        be_to_le_into(&m, &mut raw[CA_HEADER_LEN + n..CA_HEADER_LEN + 2 * n]);
        let (_, sig) = rsa_pss_sign(signer, bits, &raw[..CA_HEADER_LEN + 2 * n])?;
        be_to_le_into(&sig, &mut raw[CA_HEADER_LEN + 2 * n..]);
        Ok(CaCert { raw })
    }

    /// Parses one CA certificate at the start of `bytes`; returns it and the
    /// number of bytes it used.
    pub fn parse_prefix(bytes: &[u8]) -> Result<(CaCert, usize), CertError> {
        if bytes.len() < CA_HEADER_LEN {
            return Err(CertError::Length {
                what: "an AMD CA certificate header",
                expected: CA_HEADER_LEN,
                got: bytes.len(),
            });
        }
        let version = rd32(bytes, 0);
        if version != 1 {
            return Err(CertError::Version(version));
        }
        let (pbits, mbits) = (rd32(bytes, 0x38), rd32(bytes, 0x3C));
        if pbits != mbits || (mbits != 2048 && mbits != 4096) {
            return Err(CertError::KeySize(mbits));
        }
        let total = CA_HEADER_LEN + 3 * (mbits as usize / 8);
        if bytes.len() < total {
            return Err(CertError::Length {
                what: "an AMD CA certificate",
                expected: total,
                got: bytes.len(),
            });
        }
        let cert = CaCert {
            raw: bytes[..total].to_vec(),
        };
        let u = cert.usage();
        if u != Usage::ARK && u != Usage::ASK {
            return Err(CertError::WrongUsage {
                expected: Usage::ARK,
                got: u,
            });
        }
        Ok((cert, total))
    }

    /// Parses exactly one CA certificate.
    pub fn from_bytes(bytes: &[u8]) -> Result<CaCert, CertError> {
        let (c, n) = CaCert::parse_prefix(bytes)?;
        if n != bytes.len() {
            return Err(CertError::TrailingBytes(bytes.len() - n));
        }
        Ok(c)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Key usage (ARK or ASK).
    pub fn usage(&self) -> Usage {
        Usage(rd32(&self.raw, 0x24))
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        rd32(&self.raw, 0x3C)
    }

    /// This key's id.
    pub fn key_id(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.raw[0x04..0x14]);
        a
    }

    /// The id of the key that signed this certificate.
    pub fn signer_key_id(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.raw[0x14..0x24]);
        a
    }

    /// The RSA public key.
    pub fn public_key(&self) -> Result<RsaPublicKey, CertError> {
        let n = self.bits() as usize / 8;
        let e: Vec<u8> = self.raw[CA_HEADER_LEN..CA_HEADER_LEN + n]
            .iter()
            .rev()
            .copied()
            .collect();
        let m: Vec<u8> = self.raw[CA_HEADER_LEN + n..CA_HEADER_LEN + 2 * n]
            .iter()
            .rev()
            .copied()
            .collect();
        RsaPublicKey::new(BigUint::from_bytes_be(&m), BigUint::from_bytes_be(&e))
            .map_err(|e| CertError::Rsa(e.into()))
    }

    /// Verifies that `signer` (the ARK) signed this certificate.
    pub fn verify_signed_by(&self, signer: &CaCert) -> Result<(), CertError> {
        if signer.usage() != Usage::ARK {
            return Err(CertError::WrongUsage {
                expected: Usage::ARK,
                got: signer.usage(),
            });
        }
        if self.signer_key_id() != signer.key_id() {
            return Err(CertError::KeyIdMismatch);
        }
        if signer.bits() != self.bits() {
            return Err(CertError::KeySize(signer.bits()));
        }
        let n = self.bits() as usize / 8;
        let body = &self.raw[..CA_HEADER_LEN + 2 * n];
        let sig: Vec<u8> = self.raw[CA_HEADER_LEN + 2 * n..]
            .iter()
            .rev()
            .copied()
            .collect();
        rsa_pss_verify(&signer.public_key()?, signer.bits(), body, &sig)
            .map_err(|_| CertError::SignatureInvalid { signer: Usage::ARK })
    }
}

/// The full platform certificate chain: PDH, PEK, OCA, CEK, ASK, ARK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertChain {
    /// Platform Diffie-Hellman certificate.
    pub pdh: SevCert,
    /// Platform Endorsement Key certificate.
    pub pek: SevCert,
    /// Owner CA certificate.
    pub oca: SevCert,
    /// Chip Endorsement Key certificate.
    pub cek: SevCert,
    /// AMD Signing Key certificate.
    pub ask: CaCert,
    /// AMD Root Key certificate.
    pub ark: CaCert,
}

impl CertChain {
    /// Encodes in the `sev` crate's chain layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 * SEV_CERT_LEN + 2 * 1600);
        for c in [&self.pdh, &self.pek, &self.oca, &self.cek] {
            out.extend_from_slice(c.as_bytes());
        }
        out.extend_from_slice(self.ask.as_bytes());
        out.extend_from_slice(self.ark.as_bytes());
        out
    }

    /// Decodes the `sev` crate's chain layout, checking each certificate's usage.
    pub fn from_bytes(bytes: &[u8]) -> Result<CertChain, CertError> {
        let need = 4 * SEV_CERT_LEN;
        if bytes.len() < need {
            return Err(CertError::Length {
                what: "the four SEV certificates of a chain",
                expected: need,
                got: bytes.len(),
            });
        }
        let at = |i: usize, u: Usage| {
            SevCert::from_bytes_with_usage(&bytes[i * SEV_CERT_LEN..(i + 1) * SEV_CERT_LEN], u)
        };
        let pdh = at(0, Usage::PDH)?;
        let pek = at(1, Usage::PEK)?;
        let oca = at(2, Usage::OCA)?;
        let cek = at(3, Usage::CEK)?;
        let (ask, n1) = CaCert::parse_prefix(&bytes[need..])?;
        let (ark, n2) = CaCert::parse_prefix(&bytes[need + n1..])?;
        if ask.usage() != Usage::ASK {
            return Err(CertError::WrongUsage {
                expected: Usage::ASK,
                got: ask.usage(),
            });
        }
        if ark.usage() != Usage::ARK {
            return Err(CertError::WrongUsage {
                expected: Usage::ARK,
                got: ark.usage(),
            });
        }
        let rest = bytes.len() - need - n1 - n2;
        if rest != 0 {
            return Err(CertError::TrailingBytes(rest));
        }
        Ok(CertChain {
            pdh,
            pek,
            oca,
            cek,
            ask,
            ark,
        })
    }

    /// Verifies every link: ARK self-signed (and equal to `trusted_ark` if
    /// given), ARK -> ASK -> CEK -> PEK, OCA self-signed, OCA -> PEK, PEK -> PDH.
    pub fn verify(&self, trusted_ark: Option<&CaCert>) -> Result<(), CertError> {
        if let Some(t) = trusted_ark {
            if t != &self.ark {
                return Err(CertError::ArkNotTrusted);
            }
        }
        self.ark.verify_signed_by(&self.ark)?;
        self.ask.verify_signed_by(&self.ark)?;
        self.cek.verify_signed_by_ca(&self.ask)?;
        self.pek.verify_signed_by(&self.cek)?;
        self.oca.verify_signed_by(&self.oca)?;
        self.pek.verify_signed_by(&self.oca)?;
        self.pdh.verify_signed_by(&self.pek)?;
        if !matches!(self.pdh.algo(), Algo::ECDH_SHA256 | Algo::ECDH_SHA384) {
            return Err(CertError::Algorithm(self.pdh.algo().0));
        }
        Ok(())
    }
}

/// Short SHA-256 fingerprint (hex) of a certificate's bytes, for display.
pub fn fingerprint(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p384::SecretKey;

    fn ecc(usage: Usage) -> (SevCert, SigningKey) {
        let sk = SecretKey::random(&mut OsRng);
        let algo = if usage == Usage::PDH {
            Algo::ECDH_SHA256
        } else {
            Algo::ECDSA_SHA256
        };
        (
            SevCert::new(usage, algo, (0, 24), &sk.public_key()),
            SigningKey::from(&sk),
        )
    }

    #[test]
    fn sev_cert_layout_and_round_trip() {
        let (mut pek, _) = ecc(Usage::PEK);
        let (oca, oca_key) = ecc(Usage::OCA);
        pek.sign_ecdsa(Usage::OCA, &oca_key).unwrap();
        let bytes = pek.as_bytes().to_vec();
        assert_eq!(bytes.len(), 0x824);
        assert_eq!(rd32(&bytes, 0), 1);
        assert_eq!(rd32(&bytes, 8), 0x1002);
        assert_eq!(rd32(&bytes, 0x414), 0x1001);
        assert_eq!(rd32(&bytes, 0x418), 2);
        assert_eq!(rd32(&bytes, 0x61C), 0x1000);
        let back = SevCert::from_bytes(&bytes).unwrap();
        assert_eq!(back, pek);
        back.verify_signed_by(&oca).unwrap();
    }

    #[test]
    fn every_body_bit_flip_breaks_the_signature_or_parse() {
        let (mut pdh, _) = ecc(Usage::PDH);
        let (pek, pek_key) = ecc(Usage::PEK);
        pdh.sign_ecdsa(Usage::PEK, &pek_key).unwrap();
        // Sample bits across the body and the signature slot.
        for byte in (0..0x414 + 8 + 144).step_by(7) {
            let mut b = pdh.as_bytes().to_vec();
            b[byte] ^= 1 << (byte % 8);
            let ok = SevCert::from_bytes(&b).and_then(|c| c.verify_signed_by(&pek));
            assert!(ok.is_err(), "flip in byte 0x{byte:x} not detected");
        }
    }

    #[test]
    fn wrong_signer_is_rejected() {
        let (mut pdh, _) = ecc(Usage::PDH);
        let (_, pek_key) = ecc(Usage::PEK);
        let (other_pek, _) = ecc(Usage::PEK);
        pdh.sign_ecdsa(Usage::PEK, &pek_key).unwrap();
        assert_eq!(
            pdh.verify_signed_by(&other_pek),
            Err(CertError::SignatureInvalid { signer: Usage::PEK })
        );
        let (oca, _) = ecc(Usage::OCA);
        assert_eq!(
            pdh.verify_signed_by(&oca),
            Err(CertError::NoSignatureBy(Usage::OCA))
        );
    }

    #[test]
    fn slots_fill_up() {
        let (mut pek, _) = ecc(Usage::PEK);
        let (_, k) = ecc(Usage::OCA);
        pek.sign_ecdsa(Usage::OCA, &k).unwrap();
        pek.sign_ecdsa(Usage::CEK, &k).unwrap();
        assert_eq!(pek.sign_ecdsa(Usage::CEK, &k), Err(CertError::SlotsFull));
    }

    #[test]
    fn malformed_sev_certs_are_rejected() {
        let (pdh, _) = ecc(Usage::PDH);
        let mut b = pdh.as_bytes().to_vec();
        assert!(matches!(
            SevCert::from_bytes(&b[..100]),
            Err(CertError::Length { .. })
        ));
        b[0] = 2;
        assert_eq!(SevCert::from_bytes(&b), Err(CertError::Version(2)));
        let mut b = pdh.as_bytes().to_vec();
        b[0x10] = 1;
        assert_eq!(SevCert::from_bytes(&b), Err(CertError::Curve(1)));
        let mut b = pdh.as_bytes().to_vec();
        b[0x14] ^= 1; // x no longer on the curve (overwhelmingly likely)
        assert_eq!(SevCert::from_bytes(&b), Err(CertError::BadPoint));
    }
}
