//! The `esvm` command line: one module per subcommand, on top of the `esvm` library.

pub mod bench;
pub mod bench_linux;
pub mod bench_migrate;
pub mod bench_smp;
pub mod certs;
pub mod ctl;
pub mod guests;
pub mod log;
pub mod output;
pub mod owner;
pub mod platform;
pub mod receive;
pub mod restore;
pub mod run;

use esvm::machine::Machine;
use esvm::outcome::Outcome;
use esvm::session::RunOptions;

/// Say on stderr how the run of guest `name` ended (nothing for a normal exit) and return
/// the process's exit status.
pub fn report(name: &str, o: &Outcome) -> u8 {
    match o {
        Outcome::Exited(_) => {}
        Outcome::Shutdown(reason) => eprintln!("esvm: guest {name} shut down: {reason}"),
        Outcome::Terminated(reason) => eprintln!("esvm: guest {name} terminated: {reason}"),
        Outcome::InstructionLimit(n) => {
            eprintln!("esvm: guest {name} stopped after {n} instructions (--max-instructions)")
        }
        Outcome::Migrated(url) => eprintln!(
            "esvm: guest {name} migrated to {url}; it runs there now and will not run here \
             again"
        ),
        Outcome::Signalled(s) => eprintln!("esvm: guest {name} stopped by {}", s.name()),
        Outcome::MigrationLost(_) => eprintln!("esvm: guest {name}: {}", o.describe()),
        Outcome::Reset(_) | Outcome::PowerOff(_) | Outcome::Stopped(_) => {
            eprintln!("esvm: guest {name}: {}", o.describe())
        }
    }
    o.exit_status()
}

/// Run `machine` as this process does (`esvm run`, `receive`, `restore`): the control API
/// if asked, the guest to its end, then [`report`]. Returns the process's exit status.
pub fn run_session(
    name: &str,
    machine: &mut Machine,
    opts: &RunOptions,
) -> Result<u8, Box<dyn std::error::Error>> {
    let outcome = esvm::session::run(machine, opts)?;
    Ok(report(name, &outcome))
}
