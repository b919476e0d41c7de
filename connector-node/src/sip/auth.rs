//! Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 8760):
//! answering a trunk's 401/407 challenge with MD5 or SHA-256.

use md5::{Digest, Md5};
use std::fmt;
use zeroize::Zeroizing;

/// Trunk credentials, read from the pool's Secret file (`user:password`).
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    password: Zeroizing<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            password: Zeroizing::new(password.into()),
        }
    }

    /// Parse the credentials file: one line `user:password`.
    pub fn parse_file(text: &str) -> Result<Self, AuthError> {
        let line = text.lines().next().unwrap_or("").trim_end();
        let (u, p) = line.split_once(':').ok_or(AuthError::CredentialsFile)?;
        if u.is_empty() || p.is_empty() {
            return Err(AuthError::CredentialsFile);
        }
        Ok(Self::new(u, p))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("challenge is not a Digest challenge")]
    NotDigest,
    #[error("challenge lacks {0}")]
    Missing(&'static str),
    #[error("unsupported digest algorithm {0:?}")]
    Algorithm(String),
    #[error("challenge offers only qop values other than auth")]
    Qop,
    #[error("credentials file must hold one line user:password")]
    CredentialsFile,
}

/// A parsed WWW-Authenticate / Proxy-Authenticate challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    pub qop_auth: bool,
}

fn split_params(s: &str) -> Vec<(String, String)> {
    // Values may be quoted strings containing commas.
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

impl Challenge {
    pub fn parse(header: &str) -> Result<Self, AuthError> {
        let rest = header
            .trim()
            .strip_prefix("Digest")
            .filter(|r| r.starts_with(char::is_whitespace))
            .ok_or(AuthError::NotDigest)?;
        let params = split_params(rest);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let algorithm = match get("algorithm").as_deref() {
            None => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("MD5") => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Algorithm::Sha256,
            Some(a) => return Err(AuthError::Algorithm(a.to_string())),
        };
        let qop_auth = match get("qop") {
            None => false,
            Some(q) if q.split(',').any(|v| v.trim() == "auth") => true,
            Some(_) => return Err(AuthError::Qop),
        };
        Ok(Self {
            realm: get("realm").ok_or(AuthError::Missing("realm"))?,
            nonce: get("nonce").ok_or(AuthError::Missing("nonce"))?,
            opaque: get("opaque"),
            algorithm,
            qop_auth,
        })
    }

    /// The Authorization header value answering this challenge.
    pub fn answer(
        &self,
        creds: &Credentials,
        method: &str,
        uri: &str,
        nonce_count: u32,
        cnonce: &str,
    ) -> String {
        let h = |s: &str| -> String {
            match self.algorithm {
                Algorithm::Md5 => hex::encode(Md5::digest(s.as_bytes())),
                Algorithm::Sha256 => {
                    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
                }
            }
        };
        let ha1 = Zeroizing::new(h(&format!(
            "{}:{}:{}",
            creds.user,
            self.realm,
            creds.password.as_str()
        )));
        let ha2 = h(&format!("{method}:{uri}"));
        let nc = format!("{nonce_count:08x}");
        let response = if self.qop_auth {
            h(&format!(
                "{}:{}:{nc}:{cnonce}:auth:{ha2}",
                ha1.as_str(),
                self.nonce
            ))
        } else {
            h(&format!("{}:{}:{ha2}", ha1.as_str(), self.nonce))
        };
        let mut v = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", response=\"{response}\", algorithm={}",
            creds.user,
            self.realm,
            self.nonce,
            match self.algorithm {
                Algorithm::Md5 => "MD5",
                Algorithm::Sha256 => "SHA-256",
            }
        );
        if self.qop_auth {
            v.push_str(&format!(", qop=auth, nc={nc}, cnonce=\"{cnonce}\""));
        }
        if let Some(o) = &self.opaque {
            v.push_str(&format!(", opaque=\"{o}\""));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_of(v: &str) -> String {
        split_params(v.strip_prefix("Digest").unwrap())
            .into_iter()
            .find(|(k, _)| k == "response")
            .unwrap()
            .1
    }

    #[test]
    fn rfc2617_md5_vector() {
        let c = Challenge::parse(
            "Digest realm=\"testrealm@host.com\", qop=\"auth,auth-int\", \
             nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::Md5);
        let creds = Credentials::new("Mufasa", "Circle Of Life");
        let a = c.answer(&creds, "GET", "/dir/index.html", 1, "0a4f113b");
        assert_eq!(response_of(&a), "6629fae49393a05397450978507c4ef1");
        assert!(a.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""));
    }

    #[test]
    fn rfc7616_sha256_vector() {
        let c = Challenge::parse(
            "Digest realm=\"http-auth@example.org\", qop=\"auth, auth-int\", algorithm=SHA-256, \
             nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", \
             opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"",
        )
        .unwrap();
        let creds = Credentials::new("Mufasa", "Circle of Life");
        let a = c.answer(
            &creds,
            "GET",
            "/dir/index.html",
            1,
            "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        );
        assert_eq!(
            response_of(&a),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn refuses_unknown_schemes_and_algorithms() {
        assert_eq!(Challenge::parse("Basic realm=x"), Err(AuthError::NotDigest));
        assert!(matches!(
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=SHA-512-256"),
            Err(AuthError::Algorithm(_))
        ));
        assert_eq!(
            Challenge::parse("Digest realm=\"r\""),
            Err(AuthError::Missing("nonce"))
        );
        assert_eq!(
            Credentials::parse_file("nopass\n").unwrap_err(),
            AuthError::CredentialsFile
        );
        let c = Credentials::parse_file("trunk:s3cret\n").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
