//! `esvm platform ...`: the secure processor's persistent identity (its NV
//! storage): create, inspect, export the certificate chain, rotate the PDH.

use std::path::{Path, PathBuf};

use esvm_psp::cert::fingerprint;
use esvm_psp::{EmulatedAmdCa, FirmwareVersion, Psp};

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

/// Runs an `esvm platform` subcommand; the error is a message for the user.
pub fn run_platform(cmd: PlatformCommand) -> CliResult<()> {
    match cmd {
        PlatformCommand::Init {
            dir,
            amd_ca,
            ark_bits,
        } => init(&dir, amd_ca.as_deref(), ark_bits),
        PlatformCommand::Status { dir } => status(&dir),
        PlatformCommand::Export { dir, out } => export(&dir, &out),
        PlatformCommand::RotatePdh { dir } => rotate_pdh(&dir),
    }
}

fn init(dir: &Path, amd_ca: Option<&Path>, ark_bits: u32) -> CliResult<()> {
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
    println!("platform identity created in {}", dir.display());
    println!("  PDH {}", fingerprint(chain.pdh.as_bytes()));
    println!(
        "  emulated AMD CA (NOT AMD's keys): {} {}",
        ca_dir.display(),
        if new_ca { "(new)" } else { "(existing)" }
    );
    println!(
        "  other platforms that must trust this one: esvm platform init --dir OTHER --amd-ca {}",
        ca_dir.display()
    );
    Ok(())
}

fn status(dir: &Path) -> CliResult<()> {
    let psp = Psp::open(dir)?;
    let st = psp.platform_status();
    let chain = psp.chain();
    let id = psp.get_id();
    println!("platform {}", dir.display());
    println!("  API version   {}.{}", st.api_major, st.api_minor);
    println!("  build         {}", st.build);
    println!(
        "  owner         {}",
        if st.owned_externally {
            "external OCA (PEK_CERT_IMPORT)"
        } else {
            "self-owned"
        }
    );
    println!(
        "  SEV-ES        {}",
        if st.es_capable { "yes" } else { "no" }
    );
    println!("  chip id       {}...", &esvm_owner::hex(&id)[..32]);
    for (name, bytes) in [
        ("PDH", chain.pdh.as_bytes().as_slice()),
        ("PEK", chain.pek.as_bytes().as_slice()),
        ("OCA", chain.oca.as_bytes().as_slice()),
        ("CEK", chain.cek.as_bytes().as_slice()),
        ("ASK", chain.ask.as_bytes()),
        ("ARK", chain.ark.as_bytes()),
    ] {
        println!("  {name}           {}", fingerprint(bytes));
    }
    println!(
        "  ARK/ASK are EMULATED (RSA-{}), not AMD's keys",
        chain.ark.bits()
    );
    match chain.verify(None) {
        Ok(()) => {
            println!("  chain         verifies (ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH)")
        }
        Err(source) => return Err(ChainDoesNotVerify(source).into()),
    }
    Ok(())
}

fn export(dir: &Path, out: &Path) -> CliResult<()> {
    let psp = Psp::open(dir)?;
    let chain = psp.chain();
    std::fs::write(out, chain.to_bytes()).map_err(|e| InFile::new(out, e))?;
    println!(
        "wrote the certificate chain ({} bytes) to {}",
        chain.to_bytes().len(),
        out.display()
    );
    println!("  {}", esvm_owner::describe_chain(&chain));
    Ok(())
}

fn rotate_pdh(dir: &Path) -> CliResult<()> {
    let mut psp = Psp::open(dir)?;
    let old = psp.chain().pdh;
    psp.init()?;
    psp.pdh_gen()?;
    psp.shutdown()?;
    println!(
        "new PDH {} (was {}); export the chain again for guest owners",
        fingerprint(psp.chain().pdh.as_bytes()),
        fingerprint(old.as_bytes())
    );
    Ok(())
}
