//! How a VM's run ends ([`Outcome`]) and the exit status each ending stands for.
//!
//! The statuses are the process exit statuses of `esvm run`, `esvm receive` and
//! `esvm restore`, and the `exit_status` the control API reports once a VM ended; they are
//! defined here, at the bottom of the library, so that the run loop can report them without
//! depending on the binary. [`EXIT_STATUSES`] is the one table of them: `esvm --help`, the
//! README and the tests are made from it.
//!
//! The scheme keeps clear of the statuses common tools give a meaning: 124 (timeout(1)),
//! 126/127 (the shell: not executable / not found), 128+N (killed by signal N), and 2
//! (clap's default for usage errors). A guest's own status is passed through as it wrote it
//! (& 0xff), so only 0-119 are unambiguous.

/// Exit status of a bad command line (a usage error; clap's own default, 2, would collide
/// with a guest exiting 2).
pub const EXIT_USAGE: u8 = 120;
/// Exit status when the guest shut down (triple fault) instead of exiting through the
/// debug-exit port.
pub const EXIT_GUEST_SHUTDOWN: u8 = 121;
/// Exit status when an SEV-ES guest terminated itself through the GHCB protocol.
pub const EXIT_GUEST_TERMINATED: u8 = 122;
/// Exit status when `--max-instructions` ran out before the guest exited.
pub const EXIT_INSTRUCTION_LIMIT: u8 = 123;
/// Exit status when esvm itself fails (unreadable guest, backend error, ...).
pub const EXIT_ESVM_ERROR: u8 = 125;
/// Exit status of a bug in esvm: Rust's status for a panic.
pub const EXIT_PANIC: u8 = 101;
/// The highest guest status that cannot be mistaken for one of esvm's own.
pub const GUEST_STATUS_MAX_UNAMBIGUOUS: u8 = 119;

/// A signal that stops a VM cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C, `kill -INT`).
    Interrupt,
    /// SIGTERM (`kill`, service managers).
    Terminate,
}

impl StopSignal {
    /// Both, in the order of their numbers.
    pub const ALL: [StopSignal; 2] = [StopSignal::Interrupt, StopSignal::Terminate];

    /// The signal's number.
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => libc::SIGINT,
            StopSignal::Terminate => libc::SIGTERM,
        }
    }

    /// The signal of number `n`, if it is one of these.
    pub fn from_number(n: i32) -> Option<StopSignal> {
        Self::ALL.into_iter().find(|s| s.number() == n)
    }

    /// Its name, as `kill -l` prints it with the prefix ("SIGINT").
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// The exit status of a VM stopped by it: 128 + its number, as shells report a process
    /// killed by a signal.
    pub fn exit_status(self) -> u8 {
        // SIGINT and SIGTERM are 2 and 15 on every Unix esvm runs on.
        128 + self.number() as u8
    }
}

/// One row of the exit-status table: the status (or range) and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatusDoc {
    /// The lowest status of the row.
    pub from: u8,
    /// The highest status of the row (the same as `from` for a single status).
    pub to: u8,
    /// What it means.
    pub meaning: &'static str,
}

/// Every exit status of `esvm run`, `receive` and `restore`, in order; the other commands
/// exit 0, [`EXIT_USAGE`], [`EXIT_ESVM_ERROR`] or [`EXIT_PANIC`].
pub const EXIT_STATUSES: [ExitStatusDoc; 10] = [
    ExitStatusDoc {
        from: 0,
        to: 0,
        meaning: "the guest exited 0, or the VM ended cleanly: the guest powered off or reset \
                  itself, it was stopped from the console (Ctrl-A x) or by `esvm ctl shutdown`, \
                  or it migrated away",
    },
    ExitStatusDoc {
        from: 1,
        to: GUEST_STATUS_MAX_UNAMBIGUOUS,
        meaning: "the guest's own exit status (what it wrote to port 0xF4, & 0xff; a guest \
                  may write any value, but only 0-119 cannot be mistaken for esvm's own)",
    },
    ExitStatusDoc {
        from: EXIT_PANIC,
        to: EXIT_PANIC,
        meaning: "a bug in esvm: it panicked (a guest exiting 101 looks the same, but without \
                  the panic message and the request to report it)",
    },
    ExitStatusDoc {
        from: EXIT_USAGE,
        to: EXIT_USAGE,
        meaning: "usage error: the command line is wrong (see --help)",
    },
    ExitStatusDoc {
        from: EXIT_GUEST_SHUTDOWN,
        to: EXIT_GUEST_SHUTDOWN,
        meaning: "the guest shut down (a triple fault)",
    },
    ExitStatusDoc {
        from: EXIT_GUEST_TERMINATED,
        to: EXIT_GUEST_TERMINATED,
        meaning: "an SEV-ES guest terminated itself through the GHCB (the reason is printed)",
    },
    ExitStatusDoc {
        from: EXIT_INSTRUCTION_LIMIT,
        to: EXIT_INSTRUCTION_LIMIT,
        meaning: "--max-instructions ran out",
    },
    ExitStatusDoc {
        from: EXIT_ESVM_ERROR,
        to: EXIT_ESVM_ERROR,
        meaning: "esvm itself failed (the error is printed)",
    },
    ExitStatusDoc {
        from: 128 + libc::SIGINT as u8,
        to: 128 + libc::SIGINT as u8,
        meaning: "the VM was stopped by SIGINT (128 + 2, as shells report it)",
    },
    ExitStatusDoc {
        from: 128 + libc::SIGTERM as u8,
        to: 128 + libc::SIGTERM as u8,
        meaning: "the VM was stopped by SIGTERM (128 + 15)",
    },
];

/// The exit-status table as text, one status (or range) a line, for `--help` and docs.
pub fn exit_status_table() -> String {
    EXIT_STATUSES
        .iter()
        .map(|r| {
            let status = if r.from == r.to {
                r.from.to_string()
            } else {
                format!("{}-{}", r.from, r.to)
            };
            format!("  {status:>6}  {}\n", r.meaning)
        })
        .collect()
}

/// How [`Outcome::PowerOff`] says a guest that halted with interrupts disabled ended.
pub const HALTED_OFF: &str = "it halted with interrupts disabled";
/// How [`Outcome::PowerOff`] says an ACPI power-off ended.
pub const ACPI_OFF: &str = "ACPI S5 through the PM1a control register";

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
    /// The guest powered off: through ACPI (S5 in the FADT's PM1a control register), or it
    /// halted with interrupts disabled, so nothing can wake it (Linux's power-off without
    /// ACPI ends that way); the text says which.
    PowerOff(String),
    /// The user stopped the VM: from the console (Ctrl-A x) or with `esvm ctl shutdown`;
    /// the text says how ("from the console (Ctrl-A x)").
    Stopped(String),
    /// A signal stopped the VM (SIGINT, SIGTERM).
    Signalled(StopSignal),
    /// A live migration failed after its switch to post-copy: neither side holds the whole
    /// guest any more (the destination lacks pages, the source's copy is stale), so the VM
    /// ended here (exit status 125, as an esvm failure). The text says why.
    MigrationLost(String),
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
            Outcome::Migrated(_)
            | Outcome::Reset(_)
            | Outcome::PowerOff(_)
            | Outcome::Stopped(_) => 0,
            Outcome::Signalled(s) => s.exit_status(),
            Outcome::MigrationLost(_) => EXIT_ESVM_ERROR,
        }
    }

    /// Whether the run ended badly (the guest did not exit by itself nor move away).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Outcome::Shutdown(_) | Outcome::Terminated(_) | Outcome::MigrationLost(_)
        )
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
            Outcome::PowerOff(how) => format!("the guest powered off ({how})"),
            Outcome::Stopped(how) => format!("the VM was stopped {how}"),
            Outcome::Signalled(s) => format!("the VM was stopped by {}", s.name()),
            Outcome::MigrationLost(why) => {
                format!("the guest was lost in a failed post-copy migration: {why}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(Outcome::Exited(7).exit_status(), 7);
        assert_eq!(Outcome::Shutdown("x".into()).exit_status(), 121);
        assert_eq!(Outcome::InstructionLimit(1).exit_status(), 123);
        assert_eq!(Outcome::Terminated("x".into()).exit_status(), 122);
        assert_eq!(Outcome::Migrated("tcp://h:1".into()).exit_status(), 0);
        assert!(Outcome::Shutdown("x".into()).is_failure());
        assert!(!Outcome::InstructionLimit(1).is_failure());
        for ended in [
            Outcome::Reset("i8042".into()),
            Outcome::PowerOff(HALTED_OFF.into()),
            Outcome::Stopped("by the user".into()),
        ] {
            assert_eq!(ended.exit_status(), 0);
            assert!(!ended.is_failure());
        }
        let int = Outcome::Signalled(StopSignal::Interrupt);
        assert_eq!(int.exit_status(), 130);
        assert_eq!(int.describe(), "the VM was stopped by SIGINT");
        assert_eq!(Outcome::Signalled(StopSignal::Terminate).exit_status(), 143);
        assert!(!int.is_failure());
        assert_eq!(StopSignal::from_number(15), Some(StopSignal::Terminate));
        assert_eq!(StopSignal::from_number(9), None);
    }

    /// Every status an outcome can have is in the table, and esvm's own statuses do not
    /// collide with timeout(1)'s 124, the shell's 126/127 or clap's usage status 2.
    #[test]
    fn table_covers_every_outcome() {
        let listed = |n: u8| EXIT_STATUSES.iter().any(|r| (r.from..=r.to).contains(&n));
        for o in [
            Outcome::Exited(0),
            Outcome::Exited(7),
            Outcome::Shutdown("x".into()),
            Outcome::InstructionLimit(1),
            Outcome::Terminated("x".into()),
            Outcome::Migrated("tcp:h:1".into()),
            Outcome::Reset("x".into()),
            Outcome::PowerOff(HALTED_OFF.into()),
            Outcome::Stopped("x".into()),
            Outcome::Signalled(StopSignal::Interrupt),
            Outcome::Signalled(StopSignal::Terminate),
            Outcome::MigrationLost("x".into()),
        ] {
            assert!(listed(o.exit_status()), "{o:?}");
        }
        for own in [EXIT_USAGE, EXIT_ESVM_ERROR, EXIT_PANIC] {
            assert!(listed(own));
        }
        let own = [
            EXIT_USAGE,
            EXIT_GUEST_SHUTDOWN,
            EXIT_GUEST_TERMINATED,
            EXIT_INSTRUCTION_LIMIT,
            EXIT_ESVM_ERROR,
        ];
        for taken in [2, 124, 126, 127] {
            assert!(!own.contains(&taken), "{taken}");
        }
        assert!(own.iter().all(|&s| s > GUEST_STATUS_MAX_UNAMBIGUOUS));
        let text = exit_status_table();
        assert_eq!(text.lines().count(), EXIT_STATUSES.len());
        assert!(
            text.contains("   130  the VM was stopped by SIGINT"),
            "{text}"
        );
        assert!(text.contains("  1-119  the guest's own"), "{text}");
    }
}
