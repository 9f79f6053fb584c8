//! `esvm run` and `esvm guests`.

use std::path::PathBuf;

use clap::Args;
use esvm_hv::BackendKind;
use thiserror::Error;

use crate::machine::{Machine, MachineConfig, Outcome};
use crate::size::parse_size;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A built-in guest name (see `esvm guests`) or the path of an ELF64 guest image.
    #[arg(default_value = "demo")]
    pub guest: String,
    /// Guest RAM size, e.g. 64M, 512M, 2G.
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs. The boot vCPU runs the guest; the others are created and parked.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// Backend: 'emu' (the software vCPU, deterministic, the default) or 'kvm'.
    #[arg(long, default_value = "emu", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Stop the guest after this many retired instructions (emu only); exit status 123.
    #[arg(long)]
    pub max_instructions: Option<u64>,
    /// Arguments for the guest, passed in its boot-info block (e.g. iterations=1000).
    #[arg(last = true)]
    pub guest_args: Vec<String>,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse().map_err(|e: esvm_hv::HvError| e.to_string())
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("unknown guest {0:?}: it is neither a built-in guest (run `esvm guests` to list them) nor an existing file")]
    UnknownGuest(String),
    #[error("cannot read guest image {path}: {source}")]
    ReadGuest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
}

/// Find the guest image: a built-in name, or a path.
pub fn resolve_guest(guest: &str) -> Result<(String, std::borrow::Cow<'static, [u8]>), RunError> {
    if let Some(g) = esvm_guests::builtin(guest) {
        return Ok((g.name.to_string(), std::borrow::Cow::Borrowed(g.elf)));
    }
    let path = PathBuf::from(guest);
    let looks_like_path = guest.contains('/') || guest.contains('.') || path.exists();
    if !looks_like_path {
        return Err(RunError::UnknownGuest(guest.to_string()));
    }
    let bytes = std::fs::read(&path).map_err(|source| RunError::ReadGuest {
        path: path.clone(),
        source,
    })?;
    Ok((path.display().to_string(), std::borrow::Cow::Owned(bytes)))
}

pub fn run(args: RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let (name, elf) = resolve_guest(&args.guest)?;
    let config = MachineConfig {
        backend: args.backend,
        vm_type: esvm_hv::VmType::Plain,
        mem_size: args.mem,
        vcpus: args.vcpus,
        max_instructions: args.max_instructions,
    };
    let mut machine = Machine::new(&config, Box::new(std::io::stdout())).map_err(RunError::from)?;
    let guest_args = args.guest_args.join(" ");
    machine.load(&elf, &guest_args).map_err(RunError::from)?;
    tracing::info!(guest = %name, backend = %args.backend, mem = args.mem, "starting");
    let outcome = machine.run().map_err(RunError::from)?;
    Ok(match outcome {
        Outcome::Exited(code) => code,
        Outcome::Shutdown(reason) => {
            eprintln!("esvm: guest {name} shut down: {reason}");
            crate::EXIT_GUEST_SHUTDOWN
        }
        Outcome::Terminated(reason) => {
            eprintln!("esvm: guest {name} terminated: {reason}");
            crate::EXIT_GUEST_TERMINATED
        }
        Outcome::InstructionLimit(n) => {
            eprintln!("esvm: guest {name} stopped after {n} instructions (--max-instructions)");
            crate::EXIT_INSTRUCTION_LIMIT
        }
    })
}

pub fn list_guests() {
    for g in esvm_guests::list() {
        println!("{:<12} {}", g.name, g.description);
    }
}
