//! Symmetric primitives shared by the firmware and the guest-owner tools:
//! 128-bit keys that zeroize on drop, the NIST SP 800-108 counter-mode KDF
//! with HMAC-SHA256, HMAC-SHA256 and AES-128-CTR.

use aes::cipher::{KeyIvInit, StreamCipher};
use aes::Aes128;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// HMAC-SHA256.
pub type HmacSha256 = Hmac<Sha256>;
/// AES-128 in counter mode with a 128-bit big-endian counter (the whole IV is
/// the initial counter block).
pub type Aes128Ctr = ctr::Ctr128BE<Aes128>;

/// A 128-bit symmetric key (TEK, TIK, KEK, KIK). Zeroized on drop; `Debug`
/// never prints the key.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Key128([u8; 16]);

impl Key128 {
    /// Wraps key bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Key128 {
        Key128(bytes)
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn random() -> Key128 {
        Key128(random_array())
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl std::fmt::Debug for Key128 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key128(<redacted>)")
    }
}

/// Random bytes from the operating system's CSPRNG.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    OsRng.fill_bytes(&mut out);
    out
}

/// NIST SP 800-108 key derivation in counter mode with HMAC-SHA256 as the PRF,
/// as the SEV API uses it: for i = 1, 2, ...
/// `K(i) = HMAC(key, i (u32 LE) || label || 0x00 || context || L (u32 LE, bits))`,
/// output = K(1) || K(2) || ... truncated to `out.len()` bytes.
pub fn kdf(key: &[u8], label: &str, context: &[u8], out: &mut [u8]) {
    let len_bits = (out.len() as u32).wrapping_mul(8);
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let mut mac = new_hmac(key);
        mac.update(&(i as u32 + 1).to_le_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0u8]);
        mac.update(context);
        mac.update(&len_bits.to_le_bytes());
        let block = Zeroizing::new(mac.finalize().into_bytes());
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// KDF producing a 128-bit key.
pub fn kdf_key128(key: &[u8], label: &str, context: &[u8]) -> Key128 {
    let mut out = Key128([0u8; 16]);
    kdf(key, label, context, &mut out.0);
    out
}

/// A keyed HMAC-SHA256 instance. HMAC accepts keys of any length.
pub fn new_hmac(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC is defined for every key length; the error is unreachable.
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = new_hmac(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

/// AES-128-CTR keystream applied in place (encryption and decryption are the
/// same operation).
pub fn aes128_ctr(key: &Key128, iv: &[u8; 16], buf: &mut [u8]) {
    let mut c = Aes128Ctr::new(key.as_bytes().into(), iv.into());
    c.apply_keystream(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdf_is_counter_mode_hmac() {
        // Recompute the first block by hand and check that a 48-byte output
        // is K(1) || K(2)[..16] with L = 384 bits in every block.
        let key = [7u8; 48];
        let mut out = [0u8; 48];
        kdf(&key, "sev-master-secret", &[1, 2, 3], &mut out);
        let l = 384u32.to_le_bytes();
        let k1 = hmac_sha256(
            &key,
            &[
                &1u32.to_le_bytes(),
                b"sev-master-secret",
                &[0],
                &[1, 2, 3],
                &l,
            ],
        );
        let k2 = hmac_sha256(
            &key,
            &[
                &2u32.to_le_bytes(),
                b"sev-master-secret",
                &[0],
                &[1, 2, 3],
                &l,
            ],
        );
        assert_eq!(&out[..32], &k1);
        assert_eq!(&out[32..], &k2[..16]);
        // Different label, different key.
        let a = kdf_key128(&key, "sev-kek", &[]);
        let b = kdf_key128(&key, "sev-kik", &[]);
        assert_ne!(a, b);
    }

    #[test]
    fn ctr_round_trips_and_depends_on_iv() {
        let key = Key128::random();
        let iv = [3u8; 16];
        let plain: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut buf = plain.clone();
        aes128_ctr(&key, &iv, &mut buf);
        assert_ne!(buf, plain);
        let mut other = plain.clone();
        aes128_ctr(&key, &[4u8; 16], &mut other);
        assert_ne!(buf, other);
        aes128_ctr(&key, &iv, &mut buf);
        assert_eq!(buf, plain);
    }

    #[test]
    fn mac_eq_detects_any_difference() {
        let a = [9u8; 32];
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 0x40;
            assert!(!mac_eq(&a, &b));
        }
        assert!(mac_eq(&a, &a.clone()));
    }
}
