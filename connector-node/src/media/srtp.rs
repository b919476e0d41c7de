//! SRTP (RFC 3711) with AES_CM_128_HMAC_SHA1_80, the suite every SDES
//! peer supports. AES-CTR comes from RustCrypto (ring does not expose it);
//! HMAC-SHA1 comes from ring. One context per direction.

use ctr::cipher::{InnerIvInit, KeyInit, KeyIvInit, StreamCipher};
use ring::hmac;
use std::fmt;
use zeroize::Zeroizing;

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;

const TAG_LEN: usize = 10;
const REPLAY_WINDOW: u64 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SrtpError {
    #[error("SRTP packet too short")]
    Short,
    #[error("SRTP authentication failed")]
    Auth,
    #[error("SRTP replayed or too old packet")]
    Replay,
    #[error("not an RTP packet")]
    NotRtp,
}

pub struct SrtpContext {
    /// Session cipher key, expanded once (per-packet key schedules dominated
    /// the cost); the `zeroize` feature of `aes` wipes the round keys on drop.
    aes: aes::Aes128,
    salt: Zeroizing<[u8; 14]>,
    auth: hmac::Key,
    roc: u32,
    /// Highest sequence number seen (receive side) or last sent (send side).
    s_l: Option<u16>,
    replay_top: u64,
    replay_bits: u64,
}

impl fmt::Debug for SrtpContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SrtpContext")
            .field("roc", &self.roc)
            .finish_non_exhaustive()
    }
}

/// RFC 3711 §4.3.1 key derivation with key_derivation_rate 0.
fn derive(master_key: &[u8; 16], master_salt: &[u8; 14], label: u8, out: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..14].copy_from_slice(master_salt);
    iv[7] ^= label;
    out.fill(0);
    Aes128Ctr::new(master_key.into(), &iv.into()).apply_keystream(out);
}

impl SrtpContext {
    /// From the 30-byte SDES key||salt.
    pub fn new(key_salt: &[u8; 30]) -> Self {
        let mut mk = Zeroizing::new([0u8; 16]);
        let mut ms = Zeroizing::new([0u8; 14]);
        mk.copy_from_slice(&key_salt[..16]);
        ms.copy_from_slice(&key_salt[16..]);
        let mut cipher_key = Zeroizing::new([0u8; 16]);
        let mut auth_key = Zeroizing::new([0u8; 20]);
        let mut salt = Zeroizing::new([0u8; 14]);
        derive(&mk, &ms, 0, &mut cipher_key[..]);
        derive(&mk, &ms, 1, &mut auth_key[..]);
        derive(&mk, &ms, 2, &mut salt[..]);
        let aes = aes::Aes128::new((&*cipher_key).into());
        Self {
            aes,
            salt,
            auth: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &auth_key[..]),
            roc: 0,
            s_l: None,
            replay_top: 0,
            replay_bits: 0,
        }
    }

    fn keystream(&self, ssrc: u32, index: u64, data: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..14].copy_from_slice(&self.salt[..]);
        for (i, b) in ssrc.to_be_bytes().iter().enumerate() {
            iv[4 + i] ^= b;
        }
        for (i, b) in index.to_be_bytes()[2..].iter().enumerate() {
            iv[8 + i] ^= b;
        }
        Aes128Ctr::from_core(ctr::CtrCore::inner_iv_init(self.aes.clone(), &iv.into()))
            .apply_keystream(data);
    }

    fn tag(&self, authenticated: &[u8], roc: u32) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.auth);
        ctx.update(authenticated);
        ctx.update(&roc.to_be_bytes());
        let full = ctx.sign();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        t
    }

    /// Encrypt a plain RTP packet in place and append the tag.
    pub fn protect(&mut self, pkt: &mut Vec<u8>) -> Result<(), SrtpError> {
        let (h, _) = crate::media::rtp::parse(pkt).map_err(|_| SrtpError::NotRtp)?;
        if let Some(prev) = self.s_l
            && h.seq < prev
            && prev - h.seq > 0x8000
        {
            self.roc = self.roc.wrapping_add(1);
        }
        self.s_l = Some(h.seq);
        let index = (u64::from(self.roc) << 16) | u64::from(h.seq);
        self.keystream(h.ssrc, index, &mut pkt[h.len..]);
        let tag = self.tag(pkt, self.roc);
        pkt.extend_from_slice(&tag);
        Ok(())
    }

    /// Check, decrypt and strip the tag of an SRTP packet in place.
    pub fn unprotect(&mut self, pkt: &mut Vec<u8>) -> Result<(), SrtpError> {
        if pkt.len() < 12 + TAG_LEN {
            return Err(SrtpError::Short);
        }
        let body_len = pkt.len() - TAG_LEN;
        let (h, _) = crate::media::rtp::parse(&pkt[..body_len]).map_err(|_| SrtpError::NotRtp)?;
        let seq = h.seq;
        let v = match self.s_l {
            None => self.roc,
            Some(s_l) if s_l < 0x8000 => {
                if seq > s_l && seq - s_l > 0x8000 {
                    self.roc.wrapping_sub(1)
                } else {
                    self.roc
                }
            }
            Some(s_l) => {
                if s_l - 0x8000 > seq {
                    self.roc.wrapping_add(1)
                } else {
                    self.roc
                }
            }
        };
        let index = (u64::from(v) << 16) | u64::from(seq);
        if self.s_l.is_some() {
            if index + REPLAY_WINDOW <= self.replay_top {
                return Err(SrtpError::Replay);
            }
            if index <= self.replay_top && self.replay_bits & (1 << (self.replay_top - index)) != 0
            {
                return Err(SrtpError::Replay);
            }
        }
        let expected = self.tag(&pkt[..body_len], v);
        if !ct_eq(&expected, &pkt[body_len..]) {
            return Err(SrtpError::Auth);
        }
        pkt.truncate(body_len);
        self.keystream(h.ssrc, index, &mut pkt[h.len..]);
        // Only authenticated packets move the state.
        if self.s_l.is_none() || index > self.replay_top {
            let shift = index.saturating_sub(self.replay_top);
            self.replay_bits = if self.s_l.is_none() || shift >= 64 {
                1
            } else {
                (self.replay_bits << shift) | 1
            };
            self.replay_top = index;
            self.roc = v;
            self.s_l = Some(seq);
        } else {
            self.replay_bits |= 1 << (self.replay_top - index);
        }
        Ok(())
    }
}

/// Tag comparison whose time does not depend on where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn rfc3711_b3_key_derivation() {
        let mk: [u8; 16] = h("E1F97A0D3E018BE0D64FA32C06DE4139").try_into().unwrap();
        let ms: [u8; 14] = h("0EC675AD498AFEEBB6960B3AABE6").try_into().unwrap();
        let mut k = [0u8; 16];
        derive(&mk, &ms, 0, &mut k);
        assert_eq!(k.to_vec(), h("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut s = [0u8; 14];
        derive(&mk, &ms, 2, &mut s);
        assert_eq!(s.to_vec(), h("30CBBC08863D8C85D49DB34A9AE1"));
        let mut a = [0u8; 20];
        derive(&mk, &ms, 1, &mut a);
        assert_eq!(a.to_vec(), h("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    }

    #[test]
    fn rfc3711_b2_keystream() {
        // Session key/salt given directly: bypass derivation.
        let mut c = SrtpContext::new(&[0u8; 30]);
        let key: [u8; 16] = h("2B7E151628AED2A6ABF7158809CF4F3C").try_into().unwrap();
        c.aes = aes::Aes128::new((&key).into());
        *c.salt = h("F0F1F2F3F4F5F6F7F8F9FAFBFCFD").try_into().unwrap();
        let mut ks = vec![0u8; 48];
        c.keystream(0, 0, &mut ks);
        assert_eq!(
            ks,
            h(
                "E03EAD0935C95E80E166B16DD92B4EB4D23513162B02D0F72A43A2FE4A5F97AB41E95B3BB0A2E8DD477901E4FCA894C0"
            )
        );
    }

    #[test]
    fn roundtrip_across_rollover_with_replay_and_tamper_checks() {
        let key = [7u8; 30];
        let (mut tx, mut rx) = (SrtpContext::new(&key), SrtpContext::new(&key));
        for i in 0..70_000u32 {
            let seq = (65_000 + i) as u16;
            let plain = rtp::build(false, 0, seq, i * 160, 42, &[i as u8; 160]);
            let mut p = plain.clone();
            tx.protect(&mut p).unwrap();
            assert_ne!(&p[12..172], &plain[12..]);
            if i % 1000 == 3 {
                let mut bad = p.clone();
                bad[20] ^= 1;
                assert_eq!(rx.unprotect(&mut bad), Err(SrtpError::Auth));
            }
            let mut dup = p.clone();
            rx.unprotect(&mut p).unwrap();
            assert_eq!(p, plain);
            if i % 1000 == 5 {
                assert_eq!(rx.unprotect(&mut dup), Err(SrtpError::Replay));
            }
        }
        assert_eq!(rx.roc, 2);
        assert!(!format!("{rx:?}").contains("aes"));
    }
}
