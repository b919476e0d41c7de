//! SDP offer/answer (RFC 3264) for one audio stream: PCMU, PCMA, Opus,
//! telephone-event, and SDES keys (RFC 4568) for SRTP.

use base64::Engine;
use meeting_proto::config::connector::SrtpPolicy;
use std::fmt;
use std::net::IpAddr;
use zeroize::Zeroizing;

/// Most lines accepted in one SDP body.
pub const MAX_LINES: usize = 128;
/// Most payload formats on one m= line.
pub const MAX_FORMATS: usize = 32;
/// The SRTP suite we implement.
pub const SRTP_SUITE: &str = "AES_CM_128_HMAC_SHA1_80";
/// SDES master key (16) + master salt (14).
pub const SRTP_KEY_SALT_LEN: usize = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Pcmu,
    Pcma,
    /// Opus (RFC 7587): RTP clock 48 kHz whatever the audio bandwidth.
    Opus,
}

impl Codec {
    pub fn clock_rate(self) -> u32 {
        match self {
            Self::Pcmu | Self::Pcma => 8000,
            Self::Opus => 48000,
        }
    }
}

/// Dynamic payload type we use for Opus in offers.
const OPUS_PT: u8 = 111;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdpError {
    #[error("SDP is not UTF-8 text")]
    NotText,
    #[error("SDP has more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("bad SDP line {0:?}")]
    BadLine(String),
    #[error("SDP has no audio stream")]
    NoAudio,
    #[error("SDP has no connection address for the audio stream")]
    NoAddress,
    #[error("no common audio codec (we support PCMU, PCMA, Opus)")]
    NoCodec,
    #[error("this pool requires SRTP and the peer offered plain RTP")]
    SrtpRequired,
    #[error("peer requires SRTP but this pool has SRTP off")]
    SrtpOff,
    #[error("peer offered SRTP without a usable {SRTP_SUITE} key")]
    NoCryptoSuite,
}

/// A master key + salt from an `a=crypto` line; Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKey(pub Zeroizing<[u8; SRTP_KEY_SALT_LEN]>);

impl fmt::Debug for SrtpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SrtpKey(<redacted>)")
    }
}

impl SrtpKey {
    pub fn random() -> Self {
        let mut k = Zeroizing::new([0u8; SRTP_KEY_SALT_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k[..]);
        Self(k)
    }
    fn inline(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&self.0[..]))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crypto {
    pub tag: u32,
    pub suite: String,
    /// None when the key is not a plain inline 30-byte key (unusable for us).
    pub key: Option<SrtpKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    pub pt: u8,
    pub name: String,
    pub rate: u32,
}

/// The audio part of an SDP body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioDesc {
    pub addr: IpAddr,
    pub port: u16,
    pub secure: bool,
    pub formats: Vec<u8>,
    pub rtpmaps: Vec<RtpMap>,
    pub crypto: Vec<Crypto>,
}

impl AudioDesc {
    /// Payload type for `name/rate`, using static assignments for 0 and 8.
    fn pt_of(&self, name: &str, rate: u32) -> Option<u8> {
        self.formats
            .iter()
            .copied()
            .find(|&pt| match self.rtpmaps.iter().find(|m| m.pt == pt) {
                Some(m) => m.name.eq_ignore_ascii_case(name) && m.rate == rate,
                None => {
                    (pt == 0 && name == "PCMU" && rate == 8000)
                        || (pt == 8 && name == "PCMA" && rate == 8000)
                }
            })
    }
}

pub fn parse(body: &[u8]) -> Result<AudioDesc, SdpError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotText)?;
    let mut session_addr = None;
    let mut audio: Option<AudioDesc> = None;
    let mut in_audio = false;
    let mut seen_audio = false;
    for (i, line) in text.lines().enumerate() {
        if i >= MAX_LINES {
            return Err(SdpError::TooManyLines);
        }
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let bad = || SdpError::BadLine(line.chars().take(80).collect());
        let (kind, value) = line.split_once('=').ok_or_else(bad)?;
        if kind.len() != 1 {
            return Err(bad());
        }
        match kind {
            "c" => {
                let addr = value
                    .strip_prefix("IN IP4 ")
                    .or_else(|| value.strip_prefix("IN IP6 "))
                    .ok_or_else(bad)?;
                let addr: IpAddr = addr
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .parse()
                    .map_err(|_| bad())?;
                if in_audio {
                    if let Some(a) = audio.as_mut() {
                        a.addr = addr;
                    }
                } else if audio.is_none() {
                    session_addr = Some(addr);
                }
            }
            "m" => {
                in_audio = false;
                let mut parts = value.split(' ');
                let media = parts.next().ok_or_else(bad)?;
                let port: u16 = parts
                    .next()
                    .and_then(|p| p.split('/').next())
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(bad)?;
                let proto = parts.next().ok_or_else(bad)?;
                if media != "audio" || seen_audio {
                    continue;
                }
                seen_audio = true;
                let formats: Vec<u8> = parts
                    .take(MAX_FORMATS + 1)
                    .map(|f| f.parse::<u8>().ok().filter(|p| *p < 128))
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?;
                if formats.is_empty() || formats.len() > MAX_FORMATS {
                    return Err(bad());
                }
                let secure = match proto {
                    "RTP/AVP" => false,
                    "RTP/SAVP" => true,
                    _ => continue,
                };
                in_audio = true;
                audio = Some(AudioDesc {
                    addr: session_addr.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                    port,
                    secure,
                    formats,
                    rtpmaps: Vec::new(),
                    crypto: Vec::new(),
                });
            }
            "a" if in_audio => {
                let a = audio.as_mut().ok_or_else(bad)?;
                if let Some(v) = value.strip_prefix("rtpmap:") {
                    let (pt, enc) = v.split_once(' ').ok_or_else(bad)?;
                    let mut enc = enc.split('/');
                    let name = enc.next().ok_or_else(bad)?.to_string();
                    let rate = enc.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
                    let pt = pt.parse().map_err(|_| bad())?;
                    if a.rtpmaps.len() < MAX_FORMATS {
                        a.rtpmaps.push(RtpMap { pt, name, rate });
                    }
                } else if let Some(v) = value.strip_prefix("crypto:") {
                    let mut p = v.split(' ');
                    let tag = p.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
                    let suite = p.next().ok_or_else(bad)?.to_string();
                    let key = p
                        .next()
                        .and_then(|k| k.strip_prefix("inline:"))
                        .and_then(|k| {
                            // Lifetime and MKI suffixes are allowed; an MKI we would
                            // have to put on every packet is not supported.
                            let mut parts = k.split('|');
                            let key = parts.next()?;
                            if parts.any(|x| x.contains(':')) {
                                return None;
                            }
                            let raw = Zeroizing::new(
                                base64::engine::general_purpose::STANDARD.decode(key).ok()?,
                            );
                            let arr: [u8; SRTP_KEY_SALT_LEN] = raw.as_slice().try_into().ok()?;
                            Some(SrtpKey(Zeroizing::new(arr)))
                        });
                    if a.crypto.len() < 8 {
                        a.crypto.push(Crypto { tag, suite, key });
                    }
                }
            }
            _ => {}
        }
    }
    let a = audio.ok_or(SdpError::NoAudio)?;
    if a.addr.is_unspecified() && a.port != 0 {
        return Err(SdpError::NoAddress);
    }
    Ok(a)
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub codec: Codec,
    pub pt: u8,
    pub dtmf_pt: Option<u8>,
    pub remote: std::net::SocketAddr,
    /// (our key for sending, their key for receiving).
    pub srtp: Option<(SrtpKey, SrtpKey)>,
}

/// Our side of the session: the codecs and the key we offer.
#[derive(Debug, Clone)]
pub struct Local {
    pub addr: IpAddr,
    pub port: u16,
    pub session_id: u64,
    pub policy: SrtpPolicy,
    pub key: SrtpKey,
}

const DTMF_PT: u8 = 101;

impl Local {
    fn render(&self, secure: bool, formats: &[(u8, &str)], crypto_tag: Option<u32>) -> Vec<u8> {
        let ip = match self.addr {
            IpAddr::V4(_) => "IP4",
            IpAddr::V6(_) => "IP6",
        };
        let proto = if secure { "RTP/SAVP" } else { "RTP/AVP" };
        let pts: Vec<String> = formats.iter().map(|(pt, _)| pt.to_string()).collect();
        let mut s = format!(
            "v=0\r\no=conclave {sid} {sid} IN {ip} {addr}\r\ns=conclave\r\nc=IN {ip} {addr}\r\nt=0 0\r\nm=audio {port} {proto} {pts}\r\n",
            sid = self.session_id,
            addr = self.addr,
            port = self.port,
            pts = pts.join(" ")
        );
        for (pt, map) in formats {
            s.push_str(&format!("a=rtpmap:{pt} {map}\r\n"));
            if *pt == DTMF_PT {
                s.push_str(&format!("a=fmtp:{pt} 0-15\r\n"));
            }
        }
        if let Some(tag) = crypto_tag {
            s.push_str(&format!(
                "a=crypto:{tag} {SRTP_SUITE} inline:{}\r\n",
                self.key.inline().as_str()
            ));
        }
        s.push_str("a=ptime:20\r\na=sendrecv\r\n");
        s.into_bytes()
    }

    /// An offer for dial-out. `required`: RTP/SAVP; `preferred`: RTP/AVP with
    /// a crypto line (best effort, as common trunks and baresip accept).
    pub fn offer(&self) -> Vec<u8> {
        // G.711 first: trunks and PSTN gateways expect it; Opus when the
        // peer prefers it.
        let formats = [
            (0, "PCMU/8000"),
            (8, "PCMA/8000"),
            (OPUS_PT, "opus/48000/2"),
            (DTMF_PT, "telephone-event/8000"),
        ];
        match self.policy {
            SrtpPolicy::Required => self.render(true, &formats, Some(1)),
            SrtpPolicy::Preferred => self.render(false, &formats, Some(1)),
            SrtpPolicy::Off => self.render(false, &formats, None),
        }
    }

    /// Answer a peer's offer (dial-in), or refuse it with a reason.
    pub fn answer(&self, offer: &AudioDesc) -> Result<(Vec<u8>, Negotiated), SdpError> {
        let n = negotiate(self, offer, true)?;
        let mut formats = vec![(
            n.pt,
            match n.codec {
                Codec::Pcmu => "PCMU/8000",
                Codec::Pcma => "PCMA/8000",
                Codec::Opus => "opus/48000/2",
            },
        )];
        if let Some(d) = n.dtmf_pt {
            formats.push((d, "telephone-event/8000"));
        }
        let tag = if n.srtp.is_some() {
            offer
                .crypto
                .iter()
                .find(|c| c.suite == SRTP_SUITE && c.key.is_some())
                .map(|c| c.tag)
        } else {
            None
        };
        // Render with the dtmf pt the peer chose: patch the fmtp by rendering explicitly.
        let mut body = self.render(offer.secure, &formats, tag);
        if let Some(d) = n.dtmf_pt.filter(|d| *d != DTMF_PT) {
            let text = String::from_utf8_lossy(&body).replace(
                &format!("a=rtpmap:{d} telephone-event/8000\r\n"),
                &format!("a=rtpmap:{d} telephone-event/8000\r\na=fmtp:{d} 0-15\r\n"),
            );
            body = text.into_bytes();
        }
        Ok((body, n))
    }

    /// Apply the peer's answer to our offer (dial-out).
    pub fn accept_answer(&self, answer: &AudioDesc) -> Result<Negotiated, SdpError> {
        negotiate(self, answer, false)
    }
}

fn negotiate(local: &Local, peer: &AudioDesc, peer_is_offer: bool) -> Result<Negotiated, SdpError> {
    if peer.port == 0 {
        return Err(SdpError::NoCodec);
    }
    let usable = peer
        .crypto
        .iter()
        .find(|c| c.suite == SRTP_SUITE && c.key.is_some());
    let srtp = match (local.policy, peer.secure, usable) {
        (SrtpPolicy::Off, true, _) => return Err(SdpError::SrtpOff),
        (SrtpPolicy::Off, false, _) => None,
        (_, true, None) => return Err(SdpError::NoCryptoSuite),
        (SrtpPolicy::Required, false, _) => return Err(SdpError::SrtpRequired),
        (_, _, Some(c)) => Some((
            local.key.clone(),
            c.key.clone().ok_or(SdpError::NoCryptoSuite)?,
        )),
        (SrtpPolicy::Preferred, false, None) => None,
    };
    // Prefer the peer's order when it offers; when it answers, it chose already.
    let _ = peer_is_offer;
    let (codec, pt) = peer
        .formats
        .iter()
        .find_map(|&pt| {
            if Some(pt) == peer.pt_of("PCMU", 8000) {
                Some((Codec::Pcmu, pt))
            } else if Some(pt) == peer.pt_of("PCMA", 8000) {
                Some((Codec::Pcma, pt))
            } else if Some(pt) == peer.pt_of("opus", 48000) {
                Some((Codec::Opus, pt))
            } else {
                None
            }
        })
        .ok_or(SdpError::NoCodec)?;
    Ok(Negotiated {
        codec,
        pt,
        dtmf_pt: peer.pt_of("telephone-event", 8000),
        remote: std::net::SocketAddr::new(peer.addr, peer.port),
        srtp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(policy: SrtpPolicy) -> Local {
        Local {
            addr: "127.0.0.1".parse().unwrap(),
            port: 40000,
            session_id: 7,
            policy,
            key: SrtpKey::random(),
        }
    }

    const BARESIP_OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 10000 RTP/SAVP 96 0 8 101\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n\
a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r\n\
a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n\
a=sendrecv\r\n";

    #[test]
    fn answers_savp_offer_with_pcmu_and_our_key() {
        let g711_first = BARESIP_OFFER.replace("RTP/SAVP 96 0 8 101", "RTP/SAVP 0 96 8 101");
        let offer = parse(g711_first.as_bytes()).unwrap();
        assert!(offer.secure);
        assert_eq!(offer.crypto.len(), 3);
        assert!(offer.crypto[1].key.is_none(), "MKI keys are not usable");
        let l = local(SrtpPolicy::Required);
        let (body, n) = l.answer(&offer).unwrap();
        assert_eq!((n.codec, n.pt, n.dtmf_pt), (Codec::Pcmu, 0, Some(101)));
        assert_eq!(n.remote, "127.0.0.1:10000".parse().unwrap());
        let (ours, theirs) = n.srtp.unwrap();
        assert_eq!(ours, l.key);
        assert_eq!(&theirs.0[..5], b"YS___");
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("m=audio 40000 RTP/SAVP 0 101\r\n"), "{text}");
        assert!(
            text.contains("a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:"),
            "{text}"
        );
        // Our answer parses back with our key.
        let back = parse(text.as_bytes()).unwrap();
        assert_eq!(back.crypto[0].key.as_ref(), Some(&l.key));
    }

    #[test]
    fn opus_first_offer_is_answered_with_opus() {
        let offer = BARESIP_OFFER
            .replace("RTP/SAVP 96 0 8 101", "RTP/AVP 96 0 101")
            .lines()
            .filter(|l| !l.starts_with("a=crypto"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let o = parse(offer.as_bytes()).unwrap();
        let (body, n) = local(SrtpPolicy::Preferred).answer(&o).unwrap();
        assert_eq!((n.codec, n.pt), (Codec::Opus, 96));
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("a=rtpmap:96 opus/48000/2")
        );
        let ours = parse(&local(SrtpPolicy::Off).offer()).unwrap();
        assert_eq!(ours.formats, vec![0, 8, 111, 101]);
    }

    #[test]
    fn srtp_policies() {
        let plain = BARESIP_OFFER
            .replace("RTP/SAVP", "RTP/AVP")
            .lines()
            .filter(|l| !l.starts_with("a=crypto"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let plain = parse(plain.as_bytes()).unwrap();
        assert_eq!(
            local(SrtpPolicy::Required).answer(&plain).unwrap_err(),
            SdpError::SrtpRequired
        );
        assert_eq!(
            SdpError::SrtpRequired.to_string(),
            "this pool requires SRTP and the peer offered plain RTP"
        );
        assert!(
            local(SrtpPolicy::Preferred)
                .answer(&plain)
                .unwrap()
                .1
                .srtp
                .is_none()
        );
        let secure = parse(BARESIP_OFFER.as_bytes()).unwrap();
        assert_eq!(
            local(SrtpPolicy::Off).answer(&secure).unwrap_err(),
            SdpError::SrtpOff
        );
        let offer = local(SrtpPolicy::Preferred).offer();
        let o = parse(&offer).unwrap();
        assert!(!o.secure && o.crypto.len() == 1);
    }

    #[test]
    fn bad_sdp_is_refused() {
        assert_eq!(parse(b"v=0\r\n"), Err(SdpError::NoAudio));
        assert!(matches!(
            parse(b"v=0\r\nm=audio x RTP/AVP 0\r\n"),
            Err(SdpError::BadLine(_))
        ));
        assert!(matches!(
            parse(b"v=0\r\nm=audio 1 RTP/AVP 300\r\n"),
            Err(SdpError::BadLine(_))
        ));
        assert_eq!(
            parse(b"v=0\r\nm=audio 1 RTP/AVP 0\r\n"),
            Err(SdpError::NoAddress)
        );
        let many = "a=x\r\n".repeat(MAX_LINES + 1);
        assert_eq!(parse(many.as_bytes()), Err(SdpError::TooManyLines));
        let g729 = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5 RTP/AVP 18\r\n";
        let o = parse(g729.as_bytes()).unwrap();
        assert_eq!(
            local(SrtpPolicy::Off).answer(&o).unwrap_err(),
            SdpError::NoCodec
        );
    }
}
