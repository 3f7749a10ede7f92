//! Signed impression tokens: the idempotency key and the credential of a click.
//!
//! A token is `base64url(version | impression id | ad id | issued at | user | mac)`, where
//! the MAC is HMAC-SHA256 over everything before it, truncated to 128 bits. No server
//! state is needed to check one, so click trackers scale out without a shared database.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::time::Millis;

const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
const FIXED_LEN: usize = 1 + 16 + 8 + 8 + 1;
/// The longest user id a token carries.
pub const MAX_USER_ID: usize = 128;

/// What a token vouches for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impression {
    /// 128-bit random impression id.
    pub impression_id: u128,
    /// The ad shown.
    pub ad_id: u64,
    /// When the impression was issued.
    pub issued_at_ms: Millis,
    /// The user it was shown to (may be empty).
    pub user_id: String,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of ours: bad encoding, length or version.
    #[error("malformed token")]
    Malformed,
    /// The MAC does not match: forged or signed with another secret.
    #[error("token signature does not match")]
    BadSignature,
    /// Issued longer ago than the impression TTL.
    #[error("token expired")]
    Expired,
}

/// Signs and verifies tokens with the configured secret.
#[derive(Clone)]
pub struct TokenSigner {
    mac: Hmac<Sha256>,
    ttl_ms: u64,
}

impl TokenSigner {
    /// A signer for `secret` whose tokens expire after `ttl_ms`.
    pub fn new(secret: &[u8], ttl_ms: u64) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        TokenSigner { mac, ttl_ms }
    }

    /// The impression TTL.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// The token for an impression. User ids longer than [`MAX_USER_ID`] are truncated.
    pub fn sign(&self, imp: &Impression) -> String {
        let user = truncate(&imp.user_id, MAX_USER_ID);
        let mut buf = Vec::with_capacity(FIXED_LEN + user.len() + MAC_LEN);
        buf.push(VERSION);
        buf.extend_from_slice(&imp.impression_id.to_be_bytes());
        buf.extend_from_slice(&imp.ad_id.to_be_bytes());
        buf.extend_from_slice(&imp.issued_at_ms.to_be_bytes());
        buf.push(user.len() as u8);
        buf.extend_from_slice(user.as_bytes());
        let tag = self.tag(&buf);
        buf.extend_from_slice(&tag[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// Checks the signature and the expiry at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: Millis) -> Result<Impression, TokenError> {
        if token.len() > 4 * (FIXED_LEN + MAX_USER_ID + MAC_LEN) / 3 + 4 {
            return Err(TokenError::Malformed);
        }
        let buf = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if buf.len() < FIXED_LEN + MAC_LEN || buf[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let user_len = buf[FIXED_LEN - 1] as usize;
        if buf.len() != FIXED_LEN + user_len + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = buf.split_at(FIXED_LEN + user_len);
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| TokenError::BadSignature)?;

        let u128_at = |i: usize| u128::from_be_bytes(body[i..i + 16].try_into().unwrap_or([0; 16]));
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
        let user_id = std::str::from_utf8(&body[FIXED_LEN..])
            .map_err(|_| TokenError::Malformed)?
            .to_owned();
        let imp = Impression {
            impression_id: u128_at(1),
            ad_id: u64_at(17),
            issued_at_ms: u64_at(25),
            user_id,
        };
        if now_ms > imp.issued_at_ms.saturating_add(self.ttl_ms) {
            return Err(TokenError::Expired);
        }
        Ok(imp)
    }

    fn tag(&self, body: &[u8]) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().to_vec()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp() -> Impression {
        Impression {
            impression_id: 0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
            ad_id: 42,
            issued_at_ms: 1_000_000,
            user_id: "u-123".into(),
        }
    }

    #[test]
    fn signed_tokens_verify_until_they_expire() {
        let s = TokenSigner::new(b"secret", 60_000);
        let t = s.sign(&imp());
        assert!(t.len() < 100, "tokens stay short: {}", t.len());
        assert_eq!(s.verify(&t, 1_000_000), Ok(imp()));
        assert_eq!(s.verify(&t, 1_060_000), Ok(imp()));
        assert_eq!(s.verify(&t, 1_060_001), Err(TokenError::Expired));
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let s = TokenSigner::new(b"secret", 60_000);
        let other = TokenSigner::new(b"other", 60_000);
        let t = other.sign(&imp());
        assert_eq!(s.verify(&t, 1_000_000), Err(TokenError::BadSignature));

        // Flip one bit of the ad id: the MAC no longer matches.
        let mut raw = URL_SAFE_NO_PAD.decode(s.sign(&imp())).expect("b64");
        raw[20] ^= 1;
        assert_eq!(
            s.verify(&URL_SAFE_NO_PAD.encode(&raw), 1_000_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(s.verify("not a token!", 0), Err(TokenError::Malformed));
        assert_eq!(s.verify("", 0), Err(TokenError::Malformed));
        assert_eq!(s.verify(&"A".repeat(5000), 0), Err(TokenError::Malformed));
    }

    #[test]
    fn long_user_ids_are_truncated_on_a_char_boundary() {
        let s = TokenSigner::new(b"k", 1);
        let mut i = imp();
        i.user_id = "é".repeat(100);
        let back = s.verify(&s.sign(&i), 1_000_000).expect("valid");
        assert!(back.user_id.len() <= MAX_USER_ID);
        assert!(i.user_id.starts_with(&back.user_id));
    }
}
