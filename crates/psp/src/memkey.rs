//! The per-guest memory encryption key (the VEK of SEV).
//!
//! Pages are encrypted with XTS-AES-128 (two independent AES-128 keys) with
//! the guest-physical address of the page as the 128-bit little-endian tweak,
//! so the same plaintext at two addresses gives unrelated ciphertext, as SEV's
//! address-tweaked memory encryption does. The host sees private pages only
//! as this ciphertext. The AES key schedules are zeroized on drop.

use aes::cipher::KeyInit;
use aes::Aes128;
use xts_mode::Xts128;
use zeroize::Zeroizing;

use crate::crypto::random_array;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

/// A guest's memory encryption key.
pub struct MemoryKey {
    xts: Xts128<Aes128>,
}

impl std::fmt::Debug for MemoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryKey(<redacted>)")
    }
}

impl MemoryKey {
    /// A fresh random key.
    pub fn random() -> MemoryKey {
        let k: Zeroizing<[u8; 32]> = Zeroizing::new(random_array());
        MemoryKey::from_bytes(&k)
    }

    /// A key from 32 bytes (data key || tweak key).
    pub fn from_bytes(k: &[u8; 32]) -> MemoryKey {
        let c1 = Aes128::new(k[..16].into());
        let c2 = Aes128::new(k[16..].into());
        MemoryKey {
            xts: Xts128::new(c1, c2),
        }
    }

    fn tweak(gpa: u64) -> [u8; 16] {
        (gpa as u128).to_le_bytes()
    }

    /// Encrypts a page for address `gpa` in place.
    pub fn encrypt_in_place(&self, gpa: u64, page: &mut [u8; PAGE_SIZE]) {
        self.xts.encrypt_sector(&mut page[..], Self::tweak(gpa));
    }

    /// Decrypts a page for address `gpa` in place.
    pub fn decrypt_in_place(&self, gpa: u64, page: &mut [u8; PAGE_SIZE]) {
        self.xts.decrypt_sector(&mut page[..], Self::tweak(gpa));
    }

    /// The ciphertext of `plain` at address `gpa`.
    pub fn encrypt_page(&self, gpa: u64, plain: &[u8; PAGE_SIZE]) -> [u8; PAGE_SIZE] {
        let mut p = *plain;
        self.encrypt_in_place(gpa, &mut p);
        p
    }

    /// The plaintext of `cipher` at address `gpa`.
    pub fn decrypt_page(&self, gpa: u64, cipher: &[u8; PAGE_SIZE]) -> [u8; PAGE_SIZE] {
        let mut p = *cipher;
        self.decrypt_in_place(gpa, &mut p);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_address_tweak() {
        let key = MemoryKey::random();
        let mut plain = [0u8; PAGE_SIZE];
        for (i, b) in plain.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let a = key.encrypt_page(0x1000, &plain);
        let b = key.encrypt_page(0x2000, &plain);
        assert_ne!(a, plain);
        assert_ne!(a, b, "the tweak must depend on the address");
        assert_eq!(key.decrypt_page(0x1000, &a), plain);
        assert_ne!(key.decrypt_page(0x2000, &a), plain);
        let other = MemoryKey::random();
        assert_ne!(other.encrypt_page(0x1000, &plain), a);
        // Identical blocks within a page do not give identical ciphertext blocks.
        let zero = key.encrypt_page(0x3000, &[0u8; PAGE_SIZE]);
        assert_ne!(zero[..16], zero[16..32]);
    }
}
