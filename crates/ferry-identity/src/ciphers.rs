//! Which TLS 1.3 cipher suites a host negotiates, in order of preference.
//!
//! The default prefers TLS_AES_128_GCM_SHA256: it is the suite every TLS 1.3
//! implementation must support (RFC 8446 §9.1), 128-bit AES-GCM keys give
//! the 128-bit security level (NIST SP 800-57 part 1, acceptable beyond
//! 2031), and on CPUs with AES instructions it costs less per byte than
//! AES-256-GCM (10 rounds instead of 14; `ferry lab ceilings` measures both
//! on the machine at hand). The handshake — ECDHE key exchange, certificate
//! signatures, the transcript hash — is the same whichever suite is chosen.
//! A cluster whose policy demands 256-bit keys (CNSA 2.0, for instance)
//! lists only TLS_AES_256_GCM_SHA384 on every host.

use std::fmt;
use std::str::FromStr;

use rustls::crypto::aws_lc_rs::cipher_suite;
use rustls::SupportedCipherSuite;

use crate::IdentityError;

/// A TLS 1.3 cipher suite of rustls's aws-lc-rs provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tls13Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Tls13Suite {
    pub const ALL: [Tls13Suite; 3] =
        [Tls13Suite::Aes128Gcm, Tls13Suite::Aes256Gcm, Tls13Suite::Chacha20Poly1305];

    /// The IANA name, as configuration files spell it.
    pub fn name(self) -> &'static str {
        match self {
            Tls13Suite::Aes128Gcm => "TLS_AES_128_GCM_SHA256",
            Tls13Suite::Aes256Gcm => "TLS_AES_256_GCM_SHA384",
            Tls13Suite::Chacha20Poly1305 => "TLS_CHACHA20_POLY1305_SHA256",
        }
    }

    pub(crate) fn rustls(self) -> SupportedCipherSuite {
        match self {
            Tls13Suite::Aes128Gcm => cipher_suite::TLS13_AES_128_GCM_SHA256,
            Tls13Suite::Aes256Gcm => cipher_suite::TLS13_AES_256_GCM_SHA384,
            Tls13Suite::Chacha20Poly1305 => cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        }
    }
}

impl fmt::Display for Tls13Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tls13Suite {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tls13Suite::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            IdentityError::CipherPolicy {
                why: format!(
                    "unknown cipher suite {s:?} (known: {})",
                    Tls13Suite::ALL.map(Tls13Suite::name).join(", ")
                ),
            }
        })
    }
}

/// The suites a host offers and accepts, most preferred first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CipherPolicy {
    suites: Vec<Tls13Suite>,
}

impl Default for CipherPolicy {
    fn default() -> Self {
        Self { suites: Tls13Suite::ALL.to_vec() }
    }
}

impl CipherPolicy {
    /// A policy from names such as `TLS_AES_128_GCM_SHA256`: at least one,
    /// each known, none twice.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, IdentityError> {
        if names.is_empty() {
            return Err(IdentityError::CipherPolicy {
                why: "no cipher suite listed: at least one is needed".into(),
            });
        }
        let mut suites = Vec::with_capacity(names.len());
        for n in names {
            let s: Tls13Suite = n.as_ref().parse()?;
            if suites.contains(&s) {
                return Err(IdentityError::CipherPolicy { why: format!("{s} is listed twice") });
            }
            suites.push(s);
        }
        Ok(Self { suites })
    }

    pub fn suites(&self) -> &[Tls13Suite] {
        &self.suites
    }

    pub(crate) fn rustls_suites(&self) -> Vec<SupportedCipherSuite> {
        self.suites.iter().map(|s| s.rustls()).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_default_prefers_aes_128_and_keeps_the_others() {
        let p = CipherPolicy::default();
        assert_eq!(p.suites()[0], Tls13Suite::Aes128Gcm);
        assert_eq!(p.suites().len(), 3);
    }

    #[test]
    fn names_parse_and_bad_lists_say_what_is_wrong() {
        let p = CipherPolicy::from_names(&["TLS_AES_256_GCM_SHA384"]).unwrap();
        assert_eq!(p.suites(), [Tls13Suite::Aes256Gcm]);
        let e = CipherPolicy::from_names(&["TLS_AES_128_CCM_SHA256"]).unwrap_err().to_string();
        assert!(e.contains("unknown cipher suite") && e.contains("TLS_AES_128_GCM_SHA256"), "{e}");
        let e = CipherPolicy::from_names::<&str>(&[]).unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
        let twice = ["TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"];
        let e = CipherPolicy::from_names(&twice).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }
}
