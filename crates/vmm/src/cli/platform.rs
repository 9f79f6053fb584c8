//! `esvm platform ...`: the secure processor's persistent identity (its NV
//! storage): create, inspect, export the certificate chain, rotate the PDH.

use std::path::{Path, PathBuf};

use esvm_psp::cert::fingerprint;
use esvm_psp::{EmulatedAmdCa, FirmwareVersion, Psp};

use serde::Serialize;

use super::output::Format;
use super::owner::{CliResult, InFile};

/// The platform's own certificate chain fails its check.
#[derive(Debug, thiserror::Error)]
#[error("the stored chain does not verify: {0}")]
struct ChainDoesNotVerify(#[source] esvm_psp::cert::CertError);

/// Subcommands of `esvm platform`.
#[derive(Debug, clap::Subcommand)]
pub enum PlatformCommand {
    /// Create a new platform identity (chip id, CEK, PEK, self-signed OCA, PDH)
    /// in DIR, with key files readable only by you (0600). Refuses to
    /// overwrite an existing identity.
    ///
    /// The CEK is signed by an EMULATED AMD signing key (ASK) under an
    /// emulated AMD root key (ARK) in AMD's certificate layout: these are NOT
    /// AMD's keys. Platforms that must verify each other's chains (for
    /// migration with the SEV or DOMAIN policy bits) need the same emulated
    /// CA: pass the same --amd-ca directory to each `init`.
    Init {
        /// Directory for the platform identity (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Emulated AMD CA directory to use; created there if it does not
        /// exist yet. Default: a new CA in DIR/emulated-amd-ca.
        #[arg(long, value_name = "CA_DIR")]
        amd_ca: Option<PathBuf>,
        /// RSA size of a newly generated emulated ARK/ASK: 4096 (AMD's Rome
        /// and later layout, RSA-PSS SHA-384) or 2048 (Naples layout, SHA-256).
        #[arg(long, default_value_t = 4096, value_parser = parse_ark_bits)]
        ark_bits: u32,
    },
    /// Show the stored identity: API version, build, owner, certificate fingerprints.
    Status {
        /// Platform identity directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Write the certificate chain (PDH, PEK, OCA, CEK, ASK, ARK) to CHAIN in
    /// the layout the virtee `sev` crate reads as its SEV chain; give it to
    /// guest owners (`esvm owner session --chain CHAIN`).
    Export {
        /// Platform identity directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Output file.
        #[arg(long, value_name = "CHAIN")]
        out: PathBuf,
    },
    /// Generate a new PDH key (PDH_GEN) and store it. Sessions made for the
    /// old PDH stop working; re-export the chain.
    RotatePdh {
        /// Platform identity directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

fn parse_ark_bits(s: &str) -> Result<u32, String> {
    match s {
        "2048" => Ok(2048),
        "4096" => Ok(4096),
        _ => Err(format!(
            "{s}: the emulated ARK/ASK size must be 2048 or 4096"
        )),
    }
}

/// How long generating the emulated ARK and ASK takes, as `platform init` says it: measured
/// 5 to 8 s for RSA-4096 on the development VM's build, and up to about 20 s on a loaded
/// machine (the prime search's time varies from run to run).
const KEYGEN_TIME: &str = "5 to 30 s";

/// Run `step`, saying on stderr what it does: a spinner with the elapsed time on a terminal,
/// otherwise one line when it starts and one with its time when it ends.
fn with_progress<T>(what: &str, step: impl FnOnce() -> T) -> T {
    use std::io::IsTerminal;
    let start = std::time::Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let spinner = terminal.then(|| {
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar
    });
    if spinner.is_none() {
        eprintln!("esvm: {what}...");
    }
    let result = step();
    let took = start.elapsed().as_secs_f64();
    match spinner {
        Some(bar) => {
            bar.finish_and_clear();
            eprintln!("esvm: {what}: done in {took:.1} s");
        }
        None => eprintln!("esvm: done in {took:.1} s"),
    }
    result
}

/// Runs an `esvm platform` subcommand, reporting in `format`; the error is a message for the
/// user.
pub fn run_platform(cmd: PlatformCommand, format: Format) -> CliResult<()> {
    match cmd {
        PlatformCommand::Init {
            dir,
            amd_ca,
            ark_bits,
        } => init(&dir, amd_ca.as_deref(), ark_bits, format),
        PlatformCommand::Status { dir } => status(&dir, format),
        PlatformCommand::Export { dir, out } => export(&dir, &out, format),
        PlatformCommand::RotatePdh { dir } => rotate_pdh(&dir, format),
    }
}

/// What `esvm platform init` created.
#[derive(Debug, Serialize)]
struct Created {
    dir: PathBuf,
    pdh: String,
    /// The emulated AMD CA's directory (NOT AMD's keys).
    amd_ca: PathBuf,
    /// Whether that CA was generated now.
    amd_ca_new: bool,
}

fn init(dir: &Path, amd_ca: Option<&Path>, ark_bits: u32, format: Format) -> CliResult<()> {
    if Psp::storage_exists(dir) {
        return Err(format!(
            "{} already holds a platform identity; refusing to overwrite it",
            dir.display()
        )
        .into());
    }
    let (ca, ca_dir, new_ca) = match amd_ca {
        Some(d) if EmulatedAmdCa::exists(d) => (EmulatedAmdCa::load(d)?, d.to_path_buf(), false),
        other => {
            let ca = with_progress(
                &format!(
                    "generating an emulated AMD ARK/ASK (two RSA-{ark_bits} keys); this takes \
                     {KEYGEN_TIME} (a random prime search)"
                ),
                || EmulatedAmdCa::generate(ark_bits),
            )?;
            let d = other
                .map(Path::to_path_buf)
                .unwrap_or_else(|| dir.join("emulated-amd-ca"));
            (ca, d, true)
        }
    };
    let psp = with_progress(
        "creating the platform identity (CEK, PEK, OCA, PDH)",
        || Psp::create(dir, &ca, FirmwareVersion::default()),
    )?;
    if new_ca {
        ca.save(&ca_dir)?;
    }
    let chain = psp.chain();
    let created = Created {
        dir: dir.to_path_buf(),
        pdh: fingerprint(chain.pdh.as_bytes()),
        amd_ca: ca_dir,
        amd_ca_new: new_ca,
    };
    format.emit(&created, |c| {
        format!(
            "platform identity created in {}\n  PDH {}\n  emulated AMD CA (NOT AMD's keys): {} \
             {}\n  other platforms that must trust this one: esvm platform init --dir OTHER \
             --amd-ca {}",
            c.dir.display(),
            c.pdh,
            c.amd_ca.display(),
            if c.amd_ca_new { "(new)" } else { "(existing)" },
            c.amd_ca.display()
        )
    })?;
    Ok(())
}

/// The certificates' short fingerprints (`esvm platform status`).
#[derive(Debug, Serialize)]
struct Fingerprints {
    pdh: String,
    pek: String,
    oca: String,
    cek: String,
    ask: String,
    ark: String,
}

/// What `esvm platform status` reports.
#[derive(Debug, Serialize)]
struct PlatformReport {
    dir: PathBuf,
    /// The firmware's platform state (UNINIT, INIT, WORKING) as the stored identity opens.
    state: String,
    api_major: u8,
    api_minor: u8,
    build: u8,
    /// An external OCA was imported (PEK_CERT_IMPORT); otherwise self-owned.
    owned_externally: bool,
    es_capable: bool,
    guest_count: u32,
    chip_id: String,
    fingerprints: Fingerprints,
    /// The emulated ARK's RSA size (the ARK/ASK are NOT AMD's keys).
    emulated_ark_bits: u32,
    /// ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH verifies.
    chain_verifies: bool,
    /// Why it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_error: Option<String>,
}

fn status_text(r: &PlatformReport) -> String {
    let f = &r.fingerprints;
    let mut lines = vec![
        format!("platform {}", r.dir.display()),
        format!("  state         {}", r.state),
        format!("  API version   {}.{}", r.api_major, r.api_minor),
        format!("  build         {}", r.build),
        format!(
            "  owner         {}",
            if r.owned_externally {
                "external OCA (PEK_CERT_IMPORT)"
            } else {
                "self-owned"
            }
        ),
        format!(
            "  SEV-ES        {}",
            if r.es_capable { "yes" } else { "no" }
        ),
        format!(
            "  chip id       {}...",
            &r.chip_id[..r.chip_id.len().min(32)]
        ),
    ];
    for (name, fp) in [
        ("PDH", &f.pdh),
        ("PEK", &f.pek),
        ("OCA", &f.oca),
        ("CEK", &f.cek),
        ("ASK", &f.ask),
        ("ARK", &f.ark),
    ] {
        lines.push(format!("  {name}           {fp}"));
    }
    lines.push(format!(
        "  ARK/ASK are EMULATED (RSA-{}), not AMD's keys",
        r.emulated_ark_bits
    ));
    lines.push(match &r.chain_error {
        None => "  chain         verifies (ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH)".into(),
        Some(e) => format!("  chain         DOES NOT VERIFY: {e}"),
    });
    lines.join("\n")
}

fn status(dir: &Path, format: Format) -> CliResult<()> {
    let psp = Psp::open(dir)?;
    let st = psp.platform_status();
    let chain = psp.chain();
    let verified = chain.verify(None);
    let report = PlatformReport {
        dir: dir.to_path_buf(),
        state: st.state.to_string(),
        api_major: st.api_major,
        api_minor: st.api_minor,
        build: st.build,
        owned_externally: st.owned_externally,
        es_capable: st.es_capable,
        guest_count: st.guest_count,
        chip_id: esvm_owner::hex(&psp.get_id()),
        fingerprints: Fingerprints {
            pdh: fingerprint(chain.pdh.as_bytes()),
            pek: fingerprint(chain.pek.as_bytes()),
            oca: fingerprint(chain.oca.as_bytes()),
            cek: fingerprint(chain.cek.as_bytes()),
            ask: fingerprint(chain.ask.as_bytes()),
            ark: fingerprint(chain.ark.as_bytes()),
        },
        emulated_ark_bits: chain.ark.bits(),
        chain_verifies: verified.is_ok(),
        chain_error: verified.as_ref().err().map(ToString::to_string),
    };
    format.emit(&report, status_text)?;
    verified.map_err(|source| ChainDoesNotVerify(source).into())
}

/// What `esvm platform export` wrote.
#[derive(Debug, Serialize)]
struct Exported {
    out: PathBuf,
    bytes: usize,
    chain: String,
}

fn export(dir: &Path, out: &Path, format: Format) -> CliResult<()> {
    let psp = Psp::open(dir)?;
    let chain = psp.chain();
    let bytes = chain.to_bytes();
    std::fs::write(out, &bytes).map_err(|e| InFile::new(out, e))?;
    let e = Exported {
        out: out.to_path_buf(),
        bytes: bytes.len(),
        chain: esvm_owner::describe_chain(&chain),
    };
    format.emit(&e, |e| {
        format!(
            "wrote the certificate chain ({} bytes) to {}\n  {}",
            e.bytes,
            e.out.display(),
            e.chain
        )
    })?;
    Ok(())
}

/// What `esvm platform rotate-pdh` changed.
#[derive(Debug, Serialize)]
struct Rotated {
    pdh: String,
    previous_pdh: String,
}

fn rotate_pdh(dir: &Path, format: Format) -> CliResult<()> {
    let mut psp = Psp::open(dir)?;
    let old = psp.chain().pdh;
    psp.init()?;
    psp.pdh_gen()?;
    psp.shutdown()?;
    let r = Rotated {
        pdh: fingerprint(psp.chain().pdh.as_bytes()),
        previous_pdh: fingerprint(old.as_bytes()),
    };
    format.emit(&r, |r| {
        format!(
            "new PDH {} (was {}); export the chain again for guest owners",
            r.pdh, r.previous_pdh
        )
    })?;
    Ok(())
}
