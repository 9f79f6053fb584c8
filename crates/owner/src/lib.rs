//! esvm-owner: the guest owner's side of SEV launch attestation.
//!
//! 1. [`create_session`]: verify a platform's certificate chain (ARK -> ASK ->
//!    CEK -> PEK, OCA -> PEK, PEK -> PDH), make the owner's DH certificate and
//!    the session blob that wraps fresh transport keys (TEK, TIK) for the
//!    platform's PDH. [`SessionDir`] stores it: the public launch inputs the
//!    host needs and, separately (0600), the owner's secrets.
//! 2. [`verify_measurement`]: check LAUNCH_MEASURE against the expected
//!    launch digest, computed from the guest image with
//!    [`expected_launch_digest`].
//! 3. [`package_secret`]: wrap a secret for LAUNCH_SECRET, bound to the
//!    verified measurement.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use esvm_psp::cert::{fingerprint, Algo, CaCert, CertChain, CertError, SevCert, Usage};
use esvm_psp::crypto::Key128;
use esvm_psp::session::{
    measurement_mac, shared_secret, wrap_session, SessionError, PACKET_HEADER_LEN, SESSION_LEN,
};
use esvm_psp::{Measurement, OwnerSession, PacketHeader, Policy, SessionBlob, TransportKeys};
use p384::SecretKey;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Why an owner operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The platform's chain is malformed or does not verify.
    #[error("the platform certificate chain does not verify: {0}")]
    Chain(#[from] CertError),
    /// A file has the wrong format.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A stored certificate does not decode.
    #[error("{path}: {source}")]
    BadCert {
        /// The file.
        path: PathBuf,
        /// Why it does not decode.
        #[source]
        source: CertError,
    },
    /// A stored session blob does not decode.
    #[error("{path}: {source}")]
    BadSession {
        /// The file.
        path: PathBuf,
        /// Why it does not decode.
        #[source]
        source: SessionError,
    },
    /// The session directory already holds a session.
    #[error("{0} already holds a session; use a new directory")]
    Exists(PathBuf),
    /// The policy lacks ES, which an SEV-ES launch requires.
    #[error(
        "the policy {0} lacks ES (bit 2, 0x4): SEV-ES guests need it, and the launch would \
         refuse it; add es, e.g. --policy es or es,nodbg (0x5)"
    )]
    PolicyWithoutEs(Policy),
    /// The measurement does not verify.
    #[error("the launch measurement does not verify: the guest was not launched with the expected contents, policy, platform version or session ({0})")]
    BadMeasurement(String),
    /// `secret` before a successful `verify` of the same measurement.
    #[error(
        "this measurement has not been verified with this session: run `esvm owner verify` first"
    )]
    NotVerified,
    /// A secret of invalid size.
    #[error("secret must be 1..={max} bytes, got {got}")]
    SecretSize {
        /// Its size.
        got: usize,
        /// The limit.
        max: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OwnerError + '_ {
    move |source| OwnerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), OwnerError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

fn read(path: &Path) -> Result<Vec<u8>, OwnerError> {
    fs::read(path).map_err(io(path))
}

/// A new session, before it is saved.
pub struct NewSession {
    /// The owner's DH certificate (usage PDH, unsigned).
    pub godh: SevCert,
    /// The session blob.
    pub blob: SessionBlob,
    /// The transport keys (owner secret).
    pub keys: TransportKeys,
    /// The policy.
    pub policy: Policy,
    /// The verified platform chain.
    pub chain: CertChain,
}

/// Verifies `chain` (if `trusted_ark` is given, its ARK must be that one)
/// and creates the owner's DH certificate and session blob for its PDH.
/// `policy` if it can launch an SEV-ES guest (it has ES), else [`OwnerError::PolicyWithoutEs`]:
/// `esvm owner session` refuses such a policy up front rather than at the launch.
pub fn require_es(policy: Policy) -> Result<Policy, OwnerError> {
    if policy.es() {
        Ok(policy)
    } else {
        Err(OwnerError::PolicyWithoutEs(policy))
    }
}

pub fn create_session(
    chain: &[u8],
    policy: Policy,
    trusted_ark: Option<&CaCert>,
) -> Result<NewSession, OwnerError> {
    let chain = CertChain::from_bytes(chain)?;
    chain.verify(trusted_ark)?;
    let dh = SecretKey::random(&mut OsRng);
    let godh = SevCert::new(
        Usage::PDH,
        Algo::ECDH_SHA256,
        chain.pdh.api_version(),
        &dh.public_key(),
    );
    let z = shared_secret(&dh, &chain.pdh.public_key()?);
    let keys = TransportKeys::random();
    let blob = wrap_session(&z[..], &keys, policy);
    Ok(NewSession {
        godh,
        blob,
        keys,
        policy,
        chain,
    })
}

/// Files of a session directory.
///
/// Public (give to the host for LAUNCH_START): `godh.cert` (2084 bytes),
/// `session.bin` (128 bytes), `policy.txt` (`0x........`). Owner secrets
/// (0600, never give out): `tek.key`, `tik.key`. Also `platform-chain.cert`
/// (the verified chain) and, after `verify`, `verified-measurement.bin`.
pub struct SessionDir {
    /// The directory.
    pub dir: PathBuf,
    /// The policy.
    pub policy: Policy,
    /// The transport keys.
    pub keys: TransportKeys,
    /// The owner's DH certificate.
    pub godh: SevCert,
    /// The session blob.
    pub blob: SessionBlob,
}

impl NewSession {
    /// Saves into `dir` (created; refuses a directory that holds a session).
    pub fn save(&self, dir: &Path) -> Result<(), OwnerError> {
        if dir.join("session.bin").exists() {
            return Err(OwnerError::Exists(dir.to_path_buf()));
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        write_file(&dir.join("tek.key"), self.keys.tek.as_bytes(), 0o600)?;
        write_file(&dir.join("tik.key"), self.keys.tik.as_bytes(), 0o600)?;
        write_file(&dir.join("godh.cert"), self.godh.as_bytes(), 0o644)?;
        write_file(
            &dir.join("policy.txt"),
            format!("0x{:08x}\n", self.policy.0).as_bytes(),
            0o644,
        )?;
        write_file(
            &dir.join("platform-chain.cert"),
            &self.chain.to_bytes(),
            0o644,
        )?;
        write_file(&dir.join("session.bin"), &self.blob.to_bytes(), 0o644)
    }
}

fn parse_policy(path: &Path) -> Result<Policy, OwnerError> {
    let text = String::from_utf8(read(path)?).map_err(|_| OwnerError::Format {
        path: path.to_path_buf(),
        what: "not UTF-8".into(),
    })?;
    Policy::parse(&text).map_err(|what| OwnerError::Format {
        path: path.to_path_buf(),
        what,
    })
}

/// The public LAUNCH_START inputs of a session directory (what the host gets).
pub fn launch_request(dir: &Path) -> Result<(Policy, OwnerSession), OwnerError> {
    let policy = parse_policy(&dir.join("policy.txt"))?;
    let dh_cert = read(&dir.join("godh.cert"))?;
    let session = read(&dir.join("session.bin"))?;
    if session.len() != SESSION_LEN {
        return Err(OwnerError::Format {
            path: dir.join("session.bin"),
            what: format!("must be {SESSION_LEN} bytes"),
        });
    }
    Ok((policy, OwnerSession { dh_cert, session }))
}

impl SessionDir {
    /// Loads a session directory, owner secrets included.
    pub fn load(dir: &Path) -> Result<SessionDir, OwnerError> {
        let key = |name: &str| -> Result<Key128, OwnerError> {
            let p = dir.join(name);
            let b = Zeroizing::new(read(&p)?);
            let a: [u8; 16] = b.as_slice().try_into().map_err(|_| OwnerError::Format {
                path: p.clone(),
                what: "a key file must be 16 bytes".into(),
            })?;
            Ok(Key128::from_bytes(a))
        };
        let (policy, launch) = launch_request(dir)?;
        let godh =
            SevCert::from_bytes_with_usage(&launch.dh_cert, Usage::PDH).map_err(|source| {
                OwnerError::BadCert {
                    path: dir.join("godh.cert"),
                    source,
                }
            })?;
        let blob =
            SessionBlob::from_bytes(&launch.session).map_err(|source| OwnerError::BadSession {
                path: dir.join("session.bin"),
                source,
            })?;
        Ok(SessionDir {
            dir: dir.to_path_buf(),
            policy,
            keys: TransportKeys {
                tek: key("tek.key")?,
                tik: key("tik.key")?,
            },
            godh,
            blob,
        })
    }
}

/// The launch digest the firmware will compute: SHA-256 over the contents
/// of every LAUNCH_UPDATE_DATA region in the order given, then every initial
/// VMSA (LAUNCH_UPDATE_VMSA, vCPU order). GPAs are not part of the digest
/// (as in SEV); they are taken for the caller's bookkeeping.
pub fn expected_launch_digest(measured_regions: &[(u64, &[u8])], vmsas: &[[u8; 4096]]) -> [u8; 32] {
    let mut d = Sha256::new();
    for (_gpa, data) in measured_regions {
        d.update(data);
    }
    for v in vmsas {
        d.update(v);
    }
    d.finalize().into()
}

/// What the esvm loader will measure for a guest image (the lead connects
/// the loader through [`GuestMeasurer`]).
#[derive(Clone, Debug, Default)]
pub struct MeasuredLaunch {
    /// LAUNCH_UPDATE_DATA regions, in order.
    pub regions: Vec<(u64, Vec<u8>)>,
    /// Initial VMSAs (SEV-ES), in vCPU order.
    pub vmsas: Vec<[u8; 4096]>,
}

impl MeasuredLaunch {
    /// The expected launch digest.
    pub fn digest(&self) -> [u8; 32] {
        let regions: Vec<(u64, &[u8])> = self.regions.iter().map(|(g, d)| (*g, &d[..])).collect();
        expected_launch_digest(&regions, &self.vmsas)
    }
}

/// What a guest is launched from: everything the host measures comes from these inputs
/// alone, so the owner can compute the expected digest without trusting the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchGuest {
    /// An ELF64 image by esvm's own boot convention (a file, or a name the measurer knows,
    /// e.g. a built-in guest), with the guest arguments of its boot-info block (measured).
    Image { image: PathBuf, args: String },
    /// A Linux kernel by the Linux boot protocol, with its initrd and command line.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// A guest and the machine it is launched on (the memory size shapes what the loader
/// writes, e.g. Linux's e820 map; each vCPU adds a VMSA to the measurement).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInputs {
    pub guest: LaunchGuest,
    pub mem: u64,
    pub vcpus: u32,
}

/// Computes what the loader measures for a launch (implemented by the vmm).
pub trait GuestMeasurer {
    /// The measured regions and initial VMSAs of `inputs` launched with `policy`.
    fn measured_launch(
        &self,
        inputs: &LaunchInputs,
        policy: Policy,
    ) -> Result<MeasuredLaunch, Box<dyn std::error::Error + Send + Sync>>;
}

/// Checks a LAUNCH_MEASURE result against the expected launch digest and
/// records the verified measurement in the session directory.
pub fn verify_measurement(
    session: &SessionDir,
    m: &Measurement,
    digest: &[u8; 32],
) -> Result<(), OwnerError> {
    let want = measurement_mac(
        &session.keys.tik,
        m.build,
        session.policy,
        digest,
        &m.mnonce,
    );
    if !esvm_psp::crypto::mac_eq(&want, &m.measure) {
        return Err(OwnerError::BadMeasurement(format!(
            "expected digest {}, platform {}",
            hex(digest),
            m.build
        )));
    }
    write_file(
        &session.dir.join("verified-measurement.bin"),
        &m.to_file_bytes(),
        0o644,
    )
}

/// Largest secret.
pub const MAX_SECRET: usize = 64 << 10;

/// Packages `secret` for LAUNCH_SECRET, bound to measurement `m`, which must
/// have been verified with [`verify_measurement`] for this session. The
/// packet file is the 52-byte header (flags, IV, MAC) followed by the
/// ciphertext (the `sev` crate's `Secret` encoding).
pub fn package_secret(
    session: &SessionDir,
    m: &Measurement,
    secret: &[u8],
) -> Result<Vec<u8>, OwnerError> {
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(OwnerError::SecretSize {
            got: secret.len(),
            max: MAX_SECRET,
        });
    }
    let verified = session.dir.join("verified-measurement.bin");
    match fs::read(&verified) {
        Ok(v) if v[..] == m.to_file_bytes()[..] => {}
        Ok(_) => return Err(OwnerError::NotVerified),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OwnerError::NotVerified),
        Err(e) => return Err(io(&verified)(e)),
    }
    let (hdr, ct) = esvm_psp::session::package_secret(&session.keys, &m.measure, secret);
    let mut out = hdr.to_bytes().to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Splits a secret packet file into header and ciphertext (for the host's
/// LAUNCH_SECRET call).
pub fn parse_secret_packet(bytes: &[u8]) -> Option<(PacketHeader, Vec<u8>)> {
    if bytes.len() <= PACKET_HEADER_LEN {
        return None;
    }
    let h = PacketHeader::from_bytes(&bytes[..PACKET_HEADER_LEN])?;
    Some((h, bytes[PACKET_HEADER_LEN..].to_vec()))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses a 32-byte digest from hex.
pub fn parse_digest(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return Err(format!(
            "a launch digest is 64 hex digits (SHA-256), got {} characters",
            s.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("bad hex digit in digest near position {}", 2 * i))?;
    }
    Ok(out)
}

/// A one-line description of a verified chain (for CLI output).
pub fn describe_chain(chain: &CertChain) -> String {
    let (a, b) = chain.pdh.api_version();
    format!(
        "PDH {} (API {a}.{b}), OCA {}, ARK {} ({}-bit, emulated unless it is AMD's)",
        fingerprint(chain.pdh.as_bytes()),
        fingerprint(chain.oca.as_bytes()),
        fingerprint(chain.ark.as_bytes()),
        chain.ark.bits()
    )
}
