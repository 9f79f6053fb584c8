//! A test CA and host certificates for labs and tests (`esvm certs`), made with rcgen.
//!
//! Keys are written unencrypted (mode 0600): this is not a way to run a production PKI.
//! A directory holds one CA (`ca.pem`, `ca-key.pem`, made on first use) and any number of
//! host certificates (`NAME.pem`, `NAME-key.pem`), each valid for server and client
//! authentication, with its names as subject alternative names (an IP address becomes an
//! IP SAN, anything else a DNS name).
//!
//! Adding hosts later reuses the CA: its certificate is re-issued in memory from its key
//! and its name, which carries a fingerprint of that key so that two test CAs never share
//! a name (a certificate from one then reads as "unknown issuer" at the other, not as a bad
//! signature).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// Why test certificates could not be made.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum CertsError {
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} exists but {} does not: the CA key is needed to sign host certificates; remove \
         ca.pem to make a new CA, or use another directory",
        .cert.display(), .key.display()
    )]
    CaKeyMissing { cert: PathBuf, key: PathBuf },
    #[error("the CA key {} cannot be used: {source}", .path.display())]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("host name {name:?} cannot be put in a certificate: {source}")]
    Name {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("host {0:?}: a host needs at least one name, e.g. --host dst,10.0.0.2")]
    NoName(String),
    #[error(
        "host {0:?}: its first name names the files NAME.pem and NAME-key.pem, so it must not \
         contain '/' or start with '.'"
    )]
    FileName(String),
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// How long new host certificates are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From an hour ago (clock skew) for this many days.
    Days(u32),
    /// Expired: valid from two days ago until yesterday (to test refusals).
    Expired,
}

/// What [`make`] wrote.
#[derive(Debug, Default)]
pub struct Made {
    /// The CA certificate (`ca.pem`) and whether it was created now.
    pub ca: PathBuf,
    /// True if the CA was created by this call.
    pub ca_created: bool,
    /// Each host's (certificate, key) files.
    pub hosts: Vec<(PathBuf, PathBuf)>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CertsError + 'a {
    move |source| CertsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Write `data` to `path`, replacing it, readable only by the owner if `secret`.
fn write_file(path: &Path, data: &str, secret: bool) -> Result<(), CertsError> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    o.mode(if secret { 0o600 } else { 0o644 });
    let mut f = o.open(path).map_err(io_err("create", path))?;
    f.write_all(data.as_bytes()).map_err(io_err("write", path))
}

/// The CA's parameters for its key: the name carries the key's fingerprint.
fn ca_params(key: &KeyPair) -> Result<CertificateParams, CertsError> {
    let raw = key.public_key_raw();
    // P-256 public keys start with 0x04 (uncompressed point); the next bytes are the X
    // coordinate, as random as the key.
    let tag: String = raw
        .iter()
        .skip(1)
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("esvm test CA {tag}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(3650);
    Ok(p)
}

fn host_params(
    spec: &str,
    names: &[String],
    validity: Validity,
) -> Result<CertificateParams, CertsError> {
    let mut p = CertificateParams::new(names.to_vec()).map_err(|source| CertsError::Name {
        name: spec.to_string(),
        source,
    })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].clone());
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    match validity {
        Validity::Days(d) => {
            p.not_before = now - Duration::hours(1);
            p.not_after = now + Duration::days(i64::from(d.max(1)));
        }
        Validity::Expired => {
            p.not_before = now - Duration::days(2);
            p.not_after = now - Duration::days(1);
        }
    }
    Ok(p)
}

/// Split a `--host` value `NAME[,NAME..]` into its names, checking the first can name files.
pub fn host_names(spec: &str) -> Result<Vec<String>, CertsError> {
    let names: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    let Some(first) = names.first() else {
        return Err(CertsError::NoName(spec.to_string()));
    };
    if first.contains('/') || first.starts_with('.') {
        return Err(CertsError::FileName(spec.to_string()));
    }
    Ok(names)
}

/// Make (or reuse) the CA in `dir` and a certificate for each host spec (`NAME[,NAME..]`);
/// `self_signed` makes host certificates that sign themselves instead (to test refusals).
pub fn make(
    dir: &Path,
    hosts: &[String],
    validity: Validity,
    self_signed: bool,
) -> Result<Made, CertsError> {
    fs::create_dir_all(dir).map_err(io_err("create the directory", dir))?;
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let mut made = Made {
        ca: ca_cert_path.clone(),
        ..Made::default()
    };
    let (ca_key, ca_cert) = if ca_cert_path.exists() {
        let pem = match fs::read_to_string(&ca_key_path) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CertsError::CaKeyMissing {
                    cert: ca_cert_path,
                    key: ca_key_path,
                })
            }
            Err(e) => return Err(io_err("read", &ca_key_path)(e)),
        };
        let key = KeyPair::from_pem(&pem).map_err(|source| CertsError::CaKey {
            path: ca_key_path.clone(),
            source,
        })?;
        // The same name and key as the ca.pem on disk: what it signs chains to that file.
        let cert = ca_params(&key)?.self_signed(&key)?;
        (key, cert)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params(&key)?.self_signed(&key)?;
        write_file(&ca_key_path, &key.serialize_pem(), true)?;
        write_file(&ca_cert_path, &cert.pem(), false)?;
        made.ca_created = true;
        (key, cert)
    };
    for spec in hosts {
        let names = host_names(spec)?;
        let key = KeyPair::generate()?;
        let params = host_params(spec, &names, validity)?;
        let cert = if self_signed {
            params.self_signed(&key)?
        } else {
            params.signed_by(&key, &ca_cert, &ca_key)?
        };
        let cert_path = dir.join(format!("{}.pem", names[0]));
        let key_path = dir.join(format!("{}-key.pem", names[0]));
        write_file(&key_path, &key.serialize_pem(), true)?;
        write_file(&cert_path, &cert.pem(), false)?;
        made.hosts.push((cert_path, key_path));
    }
    Ok(made)
}
