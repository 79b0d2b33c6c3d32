//! Encryption at rest of signing secrets: XChaCha20-Poly1305 under the deployment's master key.
//! A stored blob is the 24-byte random nonce followed by the ciphertext and tag.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The 32-byte master key. Its `Debug` never prints the bytes.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("encryption failed")]
pub struct CryptoError;

impl MasterKey {
    pub fn from_bytes(b: [u8; 32]) -> MasterKey {
        MasterKey(b)
    }

    /// Encrypts `plaintext`; returns nonce || ciphertext.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = XChaCha20Poly1305::new(&self.0.into());
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = cipher.encrypt(&nonce, plaintext).map_err(|_| CryptoError)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a blob made by `seal`.
    pub fn open(&self, blob: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if blob.len() < 24 {
            return Err(CryptoError);
        }
        let (nonce, ct) = blob.split_at(24);
        let cipher = XChaCha20Poly1305::new(&self.0.into());
        cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| CryptoError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secret_opens_only_under_the_same_key() {
        let k = MasterKey::from_bytes([7u8; 32]);
        let blob = k.seal(b"kwss_secret").unwrap_or_default();
        assert_ne!(&blob[24..], b"kwss_secret");
        assert_eq!(k.open(&blob).unwrap_or_default(), b"kwss_secret");
        assert!(MasterKey::from_bytes([8u8; 32]).open(&blob).is_err());
    }
}
