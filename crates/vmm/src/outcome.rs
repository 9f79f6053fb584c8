//! How a VM's run ends ([`Outcome`]) and the exit status each ending stands for.
//!
//! The statuses are the process exit statuses of `esvm run`, `esvm receive` and
//! `esvm restore`, and the `exit_status` the control API reports once a VM ended; they are
//! defined here, at the bottom of the library, so that the run loop can report them without
//! depending on the binary.

/// Exit status when esvm itself fails (bad arguments, unreadable guest, backend error).
pub const EXIT_ESVM_ERROR: u8 = 125;
/// Exit status when the guest shut down (triple fault) instead of exiting through the
/// debug-exit port.
pub const EXIT_GUEST_SHUTDOWN: u8 = 124;
/// Exit status when an SEV-ES guest terminated itself through the GHCB protocol.
pub const EXIT_GUEST_TERMINATED: u8 = 122;
/// Exit status when `--max-instructions` ran out before the guest exited.
pub const EXIT_INSTRUCTION_LIMIT: u8 = 123;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote its exit status to the debug-exit port.
    Exited(u8),
    /// The guest shut down (triple fault or equivalent).
    Shutdown(String),
    /// The instruction limit ran out first.
    InstructionLimit(u64),
    /// An SEV-ES guest asked to be terminated through the GHCB, or broke its protocol.
    Terminated(String),
    /// The VM was live-migrated to the destination at this URL, which committed: the guest
    /// runs there now and never runs here again.
    Migrated(String),
    /// The guest reset the machine (e.g. Linux's reboot through the i8042 reset line);
    /// esvm does not reboot guests, it ends the VM as Firecracker does. `how` says how.
    Reset(String),
    /// The guest powered off: it halted with interrupts disabled, so nothing can wake it
    /// (Linux's power-off without ACPI ends that way).
    PowerOff,
    /// The user stopped the VM from the console (Ctrl-A x).
    Stopped(String),
}

impl Outcome {
    /// The exit status of `esvm run` / `receive` / `restore` for a run that ended this way.
    /// A VM that migrated away exits 0: the guest lives on at the destination.
    pub fn exit_status(&self) -> u8 {
        match self {
            Outcome::Exited(code) => *code,
            Outcome::Shutdown(_) => EXIT_GUEST_SHUTDOWN,
            Outcome::Terminated(_) => EXIT_GUEST_TERMINATED,
            Outcome::InstructionLimit(_) => EXIT_INSTRUCTION_LIMIT,
            Outcome::Migrated(_) | Outcome::Reset(_) | Outcome::PowerOff | Outcome::Stopped(_) => 0,
        }
    }

    /// Whether the run ended badly (the guest did not exit by itself nor move away).
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Shutdown(_) | Outcome::Terminated(_))
    }

    /// A short description of how the run ended.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exited(code) => format!("the guest exited with status {code}"),
            Outcome::Shutdown(reason) => format!("the guest shut down: {reason}"),
            Outcome::Terminated(reason) => format!("the guest terminated: {reason}"),
            Outcome::InstructionLimit(n) => {
                format!("the guest stopped after {n} instructions (--max-instructions)")
            }
            Outcome::Migrated(url) => format!("the VM migrated to {url}"),
            Outcome::Reset(how) => format!("the guest reset itself ({how})"),
            Outcome::PowerOff => {
                "the guest powered off (it halted with interrupts disabled)".to_string()
            }
            Outcome::Stopped(how) => format!("the VM was stopped {how}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(Outcome::Exited(7).exit_status(), 7);
        assert_eq!(Outcome::Shutdown("x".into()).exit_status(), 124);
        assert_eq!(Outcome::InstructionLimit(1).exit_status(), 123);
        assert_eq!(Outcome::Terminated("x".into()).exit_status(), 122);
        assert_eq!(Outcome::Migrated("tcp://h:1".into()).exit_status(), 0);
        assert!(Outcome::Shutdown("x".into()).is_failure());
        assert!(!Outcome::InstructionLimit(1).is_failure());
        for ended in [
            Outcome::Reset("i8042".into()),
            Outcome::PowerOff,
            Outcome::Stopped("by the user".into()),
        ] {
            assert_eq!(ended.exit_status(), 0);
            assert!(!ended.is_failure());
        }
    }
}
