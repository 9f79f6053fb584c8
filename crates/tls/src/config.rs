//! Loading and checking the PEM files of a TLS endpoint, and the two ends' rustls
//! configurations: TLS 1.3 only, the `ring` provider, mutual authentication.
//!
//! Every file is read and checked before the endpoint listens or connects, so a wrong path,
//! a file without the expected PEM block, a key that does not match its certificate, or an
//! own certificate that expired or does not chain to the given CA is reported at once,
//! naming the file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

use crate::error::utc;

/// A TLS file that cannot be used.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum ConfigError {
    #[error("cannot read the TLS {what} file {}: {source}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the TLS {what} file {} is not valid PEM: {source}; it must hold {expect}",
        .path.display()
    )]
    Pem {
        what: &'static str,
        path: PathBuf,
        expect: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error(
        "the TLS {what} file {} holds no certificate (no -----BEGIN CERTIFICATE----- block); \
         is it the right file?",
        .path.display()
    )]
    NoCert { what: &'static str, path: PathBuf },
    #[error(
        "the TLS key file {} holds no private key (no -----BEGIN PRIVATE KEY----- or -----BEGIN \
         EC/RSA PRIVATE KEY----- block); is it the right file?",
        .0.display()
    )]
    NoKey(PathBuf),
    #[error("the TLS CA file {}: a certificate in it cannot be a trust anchor: {source}", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "the key in {} does not belong to the certificate in {}: {source}; give the key that \
         was made with this certificate",
        .key.display(), .cert.display()
    )]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "the certificate in {} expired at {not_after} (it is now {now}); renew it (for a lab: \
         `esvm certs`)",
        .path.display()
    )]
    OwnExpired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error(
        "the certificate in {} is not valid before {not_before} (it is now {now}); check this \
         host's clock",
        .path.display()
    )]
    OwnNotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error(
        "the certificate in {} does not chain to the CA in {}: the peer, trusting that CA, would \
         refuse it; give both ends certificates from the CA passed with --tls-ca",
        .cert.display(), .ca.display()
    )]
    OwnNotFromCa { cert: PathBuf, ca: PathBuf },
    #[error("--tls-name {name:?} is not a DNS name or IP address: {source}")]
    BadName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The `ring` provider with AES-128-GCM first: TLS 1.3's cheapest suite on CPUs with AES
/// instructions (what migration throughput wants); AES-256-GCM and ChaCha20-Poly1305 stay
/// acceptable.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    // Deprecated in rustls 0.23.48 because ring offers no post-quantum key exchange; the
    // provider that has one (aws-lc-rs) needs cmake and a C toolchain this project avoids.
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ConfigError::Pem {
            what,
            path: path.to_path_buf(),
            expect: "PEM certificates",
            source,
        })?;
    if certs.is_empty() {
        return Err(ConfigError::NoCert {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let bytes = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => ConfigError::NoKey(path.to_path_buf()),
        source => ConfigError::Pem {
            what: "key",
            path: path.to_path_buf(),
            expect: "a private key",
            source,
        },
    })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("CA", path)? {
        roots.add(c).map_err(|source| ConfigError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

fn client_verifier(
    roots: Arc<RootCertStore>,
    p: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, ConfigError> {
    WebPkiClientVerifier::builder_with_provider(roots, p.clone())
        .build()
        .map_err(|e| ConfigError::Setup(e.to_string()))
}

/// An endpoint's own certificate and key, checked: the key belongs to the certificate, and
/// the certificate is valid now and chains to the CA the endpoint was given.
struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load_identity(
    cert: &Path,
    key: &Path,
    ca: &Path,
    roots: &Arc<RootCertStore>,
    p: &Arc<CryptoProvider>,
) -> Result<Identity, ConfigError> {
    let certs = load_certs("certificate", cert)?;
    let k = load_key(key)?;
    let signing = p
        .key_provider
        .load_private_key(k.clone_key())
        .map_err(|source| ConfigError::CertKey {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    rustls::sign::CertifiedKey::new(certs.clone(), signing)
        .keys_match()
        .map_err(|source| ConfigError::CertKey {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    // Check validity and the chain the way the peer will (webpki, the same CA). The
    // client-certificate verifier checks no name, which neither end knows here; a
    // certificate made for one purpose only (server or client authentication) fails the
    // purpose check, which is left to the handshake.
    let now = UnixTime::now();
    let v = client_verifier(roots.clone(), p)?;
    if let Err(rustls::Error::InvalidCertificate(c)) =
        v.verify_client_cert(&certs[0], &certs[1..], now)
    {
        match c {
            CertificateError::ExpiredContext { time, not_after } => {
                return Err(ConfigError::OwnExpired {
                    path: cert.to_path_buf(),
                    not_after: utc(not_after),
                    now: utc(time),
                })
            }
            CertificateError::NotValidYetContext { time, not_before } => {
                return Err(ConfigError::OwnNotYetValid {
                    path: cert.to_path_buf(),
                    not_before: utc(not_before),
                    now: utc(time),
                })
            }
            CertificateError::UnknownIssuer => {
                return Err(ConfigError::OwnNotFromCa {
                    cert: cert.to_path_buf(),
                    ca: ca.to_path_buf(),
                })
            }
            _ => {}
        }
    }
    Ok(Identity { certs, key: k })
}

/// The destination's TLS: its certificate and key, and the CA every source's client
/// certificate must chain to (a source without one is refused).
#[derive(Clone)]
pub struct TlsServer {
    pub(crate) config: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

impl TlsServer {
    /// Load and check `cert`, `key` and `ca` (PEM).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, ConfigError> {
        Self::build(cert, key, ca, true)
    }

    pub(crate) fn build(
        cert: &Path,
        key: &Path,
        ca: &Path,
        check_own: bool,
    ) -> Result<Self, ConfigError> {
        let p = provider();
        let roots = load_roots(ca)?;
        let id = if check_own {
            load_identity(cert, key, ca, &roots, &p)?
        } else {
            Identity {
                certs: load_certs("certificate", cert)?,
                key: load_key(key)?,
            }
        };
        let mut config = ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ConfigError::Setup(e.to_string()))?
            .with_client_cert_verifier(client_verifier(roots, &p)?)
            .with_single_cert(id.certs, id.key)
            .map_err(|source| ConfigError::CertKey {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?;
        // One connection carries one migration: no resumption, so no tickets to send.
        config.send_tls13_tickets = 0;
        // esvm seals and opens the records itself once the handshake is done (record.rs).
        config.enable_secret_extraction = true;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }
}

/// The source's TLS: the CA the destination's certificate must chain to, the source's own
/// certificate and key (optional: a destination refuses a source without one, but the
/// operator then reads that from the destination), and an optional name to check the
/// destination's certificate against instead of the URL's host.
#[derive(Clone)]
pub struct TlsClient {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Load and check `ca`, and `identity` (certificate, key) if given; `name` overrides the
    /// name the destination's certificate is checked against.
    pub fn load(
        identity: Option<(&Path, &Path)>,
        ca: &Path,
        name: Option<&str>,
    ) -> Result<Self, ConfigError> {
        Self::build(identity, ca, name, true)
    }

    pub(crate) fn build(
        identity: Option<(&Path, &Path)>,
        ca: &Path,
        name: Option<&str>,
        check_own: bool,
    ) -> Result<Self, ConfigError> {
        let name = name
            .map(|n| {
                ServerName::try_from(n.to_string()).map_err(|source| ConfigError::BadName {
                    name: n.to_string(),
                    source,
                })
            })
            .transpose()?;
        let p = provider();
        let roots = load_roots(ca)?;
        let builder = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ConfigError::Setup(e.to_string()))?
            .with_root_certificates(roots.clone());
        let mut config = match identity {
            Some((cert, key)) => {
                let id = if check_own {
                    load_identity(cert, key, ca, &roots, &p)?
                } else {
                    Identity {
                        certs: load_certs("certificate", cert)?,
                        key: load_key(key)?,
                    }
                };
                builder
                    .with_client_auth_cert(id.certs, id.key)
                    .map_err(|source| ConfigError::CertKey {
                        cert: cert.to_path_buf(),
                        key: key.to_path_buf(),
                        source,
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        // esvm seals and opens the records itself once the handshake is done (record.rs).
        config.enable_secret_extraction = true;
        Ok(TlsClient {
            config: Arc::new(config),
            name,
        })
    }
}
