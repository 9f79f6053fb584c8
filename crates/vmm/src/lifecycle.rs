//! The lifecycle of a VM: one state machine, owned here, with its valid transitions.
//!
//! A [`Lifecycle`] is a [`State`] (what the VM is doing) plus its [`Pauses`] (the user's
//! pause and the internal holds). The guest runs only when the run loop runs, the user's
//! pause is lifted and every hold is released; so a failed migration releasing its hold never
//! undoes a user's pause, and migrating a paused VM leaves it paused.
//!
//! ```text
//!                 LoopStarted
//!   NotStarted ───────────────▶ Running ◀──────────────────────────────┐
//!     │  (the same operations      │  SnapshotStarted    SnapshotEnded   │
//!     │   before the loop starts:  ├──────────────▶ Snapshotting ───────┤
//!     │   `started: false`)        │  MigrationStarted   MigrationEnded  │
//!     │                            ├──────────────▶ Migrating ──────────┤
//!     │                            │                  │ │ MigrationInDoubt (keeps a hold)
//!     │                            │                  │ └──────▶ InDoubt ┘ Resume (the
//!     │                            │                  │ MigrationCommitted    operator's call)
//!     │                            │                  └──────▶ Migrated (dead, for good)
//!     │                            │ LoopEnded
//!     │                            └──────────▶ Ended (exited, shut down, failed)
//!   Pause / Resume / Hold / Release change the pauses of every live state.
//! ```
//!
//! [`Lifecycle::apply`] makes a transition or refuses it with a [`LifecycleError`] that says
//! what is wrong and what to do, leaving the lifecycle unchanged. The run control
//! ([`crate::runctl`]) keeps the one lifecycle of a machine under its lock and applies every
//! event there; the control API, snapshots and migrations only ask it.
//!
//! Some events are *absorbed* by a VM that ended or migrated away: a snapshot or migration
//! that was under way when the guest exited ends quietly, and a hold can always be released.

use thiserror::Error;

/// How a run that did not migrate away ended, as reported by the run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// What `esvm` exits with ([`crate::outcome::Outcome::exit_status`], or 125 when the VMM
    /// failed).
    pub exit_status: u8,
    /// The guest did not exit by itself (it shut down, terminated, or the VMM failed).
    pub failed: bool,
    /// A short description for messages ("the guest exited with status 0").
    pub what: String,
}

/// How the run loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopEnd {
    /// The guest ended (or the run loop failed).
    Finished(Ending),
    /// The VM migrated away to this URL.
    Migrated(String),
}

/// The user's pause and the internal holds (stop-and-copy, snapshots, an in-doubt
/// migration). The guest is stopped while either is present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pauses {
    /// `esvm ctl pause` (or `--start-paused`), until `esvm ctl resume`.
    pub user: bool,
    /// Internal holds; each is released by whoever took it.
    pub holds: u32,
}

impl Pauses {
    /// Whether anything keeps the guest stopped.
    pub fn any(&self) -> bool {
        self.user || self.holds > 0
    }
}

/// What the VM is doing. `started` says whether the run loop has started (an operation may
/// begin before it does, e.g. on a VM started paused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Created; the run loop has not started.
    NotStarted,
    /// The run loop runs; the guest runs unless paused.
    Running,
    /// A snapshot is being written (it holds the guest stopped). `in_doubt`: the VM was in
    /// doubt when it started (plain guests only) and returns there.
    Snapshotting {
        /// The run loop has started.
        started: bool,
        /// The snapshot is of a VM in doubt.
        in_doubt: bool,
    },
    /// A live migration is under way (the guest runs during pre-copy, held during
    /// stop-and-copy).
    Migrating {
        /// The run loop has started.
        started: bool,
    },
    /// The last migration's outcome is in doubt (the connection broke after the commit
    /// request): the state keeps a hold until the operator resumes the VM, having checked
    /// that the destination did not commit.
    InDoubt {
        /// The run loop has started.
        started: bool,
    },
    /// The destination committed: the guest runs there and never again here.
    /// `loop_running`: the run loop has not noticed yet.
    Migrated {
        /// Where the VM runs now.
        url: String,
        /// The run loop still runs (it returns at its next clean point).
        loop_running: bool,
    },
    /// The run loop ended without migrating.
    Ended(Ending),
}

/// Something that happens to a VM; [`Lifecycle::apply`] says whether it may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The run loop starts.
    LoopStarted,
    /// The run loop ended.
    LoopEnded(LoopEnd),
    /// The user pauses the guest (`esvm ctl pause`, `--start-paused`).
    Pause,
    /// The user resumes the guest (`esvm ctl resume`); on a VM in doubt it is the
    /// operator's decision that the destination did not commit, and releases the doubt's
    /// hold.
    Resume,
    /// An internal hold is taken.
    Hold,
    /// An internal hold is released.
    Release,
    /// A snapshot starts.
    SnapshotStarted {
        /// The VM is an SEV-ES guest (its snapshot is a send session of its own).
        sev_es: bool,
    },
    /// The snapshot ended (written or failed).
    SnapshotEnded,
    /// A migration starts.
    MigrationStarted,
    /// The migration failed or was cancelled before the commit: the guest runs on here.
    MigrationEnded,
    /// The migration ended in doubt; its hold (taken for stop-and-copy) passes to the state.
    MigrationInDoubt,
    /// The destination committed.
    MigrationCommitted {
        /// Where the VM runs now.
        url: String,
    },
}

/// An event the lifecycle refuses in its current state. The messages complete a phrase such
/// as "cannot pause: ..." and say what to do.
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("the VM migrated to {url}; it runs there now and can never run here again")]
    Migrated { url: String },
    #[error("the VM is not running any more ({what})")]
    Ended { what: String },
    #[error("the VM is paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is paused (left stopped by a migration whose outcome is in doubt)")]
    PausedInDoubt,
    #[error(
        "a migration is in progress (it pauses the guest itself for stop-and-copy); cancel it \
         first with `esvm ctl cancel`"
    )]
    PauseWhileMigrating,
    #[error("a migration is in progress; it resumes the guest itself if it fails")]
    ResumeWhileMigrating,
    #[error("a migration is in progress")]
    SnapshotWhileMigrating,
    #[error("another snapshot is being written")]
    SnapshotInProgress,
    #[error(
        "the last migration's outcome is in doubt and its send session is still open; if the \
         destination does not run the VM, `esvm ctl resume` first"
    )]
    SnapshotInDoubt,
    #[error("a migration is already in progress")]
    AlreadyMigrating,
    #[error(
        "the last migration's outcome is in doubt and the VM stays paused; if the destination \
         does not run the VM, `esvm ctl resume` first"
    )]
    MigrateInDoubt,
    #[error("a snapshot is being written")]
    MigrateWhileSnapshotting,
    #[error("no migration is in progress")]
    NoMigration,
    #[error("no snapshot is being written (an esvm bug: a snapshot ended twice)")]
    NoSnapshot,
    #[error(
        "no hold is taken on the guest (an esvm bug: a hold is released only once, by whoever \
         took it)"
    )]
    NoHold,
    #[error(
        "the run loop is already running (an esvm bug: a machine runs on one thread only, \
         once)"
    )]
    AlreadyStarted,
    #[error("the run loop is not running, so it cannot end (an esvm bug)")]
    LoopNotRunning,
}

/// What the control API's `status` reports as the VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The run loop has not started (and nothing pauses the guest).
    Starting,
    /// The guest runs.
    Running,
    /// A user pause, a hold, a snapshot being written or an in-doubt migration stops it.
    Paused,
    /// A migration is under way.
    Migrating,
    /// The destination committed.
    Migrated,
    /// The guest exited by itself (or hit the instruction limit).
    Exited,
    /// The guest shut down or terminated, or the VMM failed.
    Failed,
}

/// One VM's lifecycle; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    state: State,
    pauses: Pauses,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A VM just created: not started, not paused.
    pub fn new() -> Self {
        Lifecycle {
            state: State::NotStarted,
            pauses: Pauses::default(),
        }
    }

    /// What the VM is doing.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The user's pause and the holds.
    pub fn pauses(&self) -> Pauses {
        self.pauses
    }

    /// Whether the run loop has started (and whether it has ended does not matter).
    pub fn started(&self) -> bool {
        match &self.state {
            State::NotStarted => false,
            State::Running | State::Ended(_) => true,
            State::Snapshotting { started, .. }
            | State::Migrating { started }
            | State::InDoubt { started } => *started,
            State::Migrated { .. } => true,
        }
    }

    /// Whether the run loop is running now (started and not ended).
    pub fn loop_running(&self) -> bool {
        match &self.state {
            State::NotStarted | State::Ended(_) => false,
            State::Migrated { loop_running, .. } => *loop_running,
            _ => self.started(),
        }
    }

    /// The URL the VM migrated to, once the destination committed.
    pub fn migrated_to(&self) -> Option<&str> {
        match &self.state {
            State::Migrated { url, .. } => Some(url),
            _ => None,
        }
    }

    /// Whether the last migration's outcome is in doubt (its hold keeps the guest stopped
    /// until [`Event::Resume`]).
    pub fn in_doubt(&self) -> bool {
        matches!(
            self.state,
            State::InDoubt { .. } | State::Snapshotting { in_doubt: true, .. }
        )
    }

    /// Whether the run loop may end now for a stop request: no snapshot or migration is
    /// under way (a VM in doubt may stop: it then runs nowhere unless the destination
    /// committed, and never twice).
    pub fn stoppable(&self) -> bool {
        matches!(
            self.state,
            State::NotStarted | State::Running | State::InDoubt { .. }
        )
    }

    /// `Ok` while the VM can still be operated: not migrated away, not ended.
    pub fn alive(&self) -> Result<(), LifecycleError> {
        match &self.state {
            State::Migrated { url, .. } => Err(LifecycleError::Migrated { url: url.clone() }),
            State::Ended(e) => Err(LifecycleError::Ended {
                what: e.what.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The state `status` reports.
    pub fn status(&self) -> Status {
        match &self.state {
            State::Migrated { .. } => Status::Migrated,
            State::Ended(e) if e.failed => Status::Failed,
            State::Ended(_) => Status::Exited,
            State::Migrating { .. } => Status::Migrating,
            State::Snapshotting { .. } | State::InDoubt { .. } => Status::Paused,
            _ if self.pauses.any() => Status::Paused,
            State::NotStarted => Status::Starting,
            _ => Status::Running,
        }
    }

    /// Make the transition `event` stands for, or refuse it (leaving the lifecycle as it
    /// was).
    pub fn apply(&mut self, event: Event) -> Result<(), LifecycleError> {
        *self = self.next(event)?;
        Ok(())
    }

    /// The lifecycle after `event`, or why it cannot happen now.
    pub fn next(&self, event: Event) -> Result<Lifecycle, LifecycleError> {
        use State as S;
        let started = self.started();
        let mut pauses = self.pauses;
        // The state an operation (snapshot, migration, doubt) returns to.
        let idle = if started { S::Running } else { S::NotStarted };
        let state = match (&self.state, event) {
            // ---------------------------------------------------------- the run loop
            (S::NotStarted, Event::LoopStarted) => S::Running,
            (
                S::Snapshotting {
                    started: false,
                    in_doubt,
                },
                Event::LoopStarted,
            ) => S::Snapshotting {
                started: true,
                in_doubt: *in_doubt,
            },
            (S::Migrating { started: false }, Event::LoopStarted) => S::Migrating { started: true },
            (S::InDoubt { started: false }, Event::LoopStarted) => S::InDoubt { started: true },
            (S::Migrated { url, .. }, Event::LoopStarted) => {
                return Err(LifecycleError::Migrated { url: url.clone() })
            }
            (S::Ended(e), Event::LoopStarted) => {
                return Err(LifecycleError::Ended {
                    what: e.what.clone(),
                })
            }
            (_, Event::LoopStarted) => return Err(LifecycleError::AlreadyStarted),

            (S::Migrated { url, .. }, Event::LoopEnded(_)) => S::Migrated {
                url: url.clone(),
                loop_running: false,
            },
            (S::Ended(_), Event::LoopEnded(_)) => return Err(LifecycleError::LoopNotRunning),
            (_, Event::LoopEnded(_)) if !started => return Err(LifecycleError::LoopNotRunning),
            (_, Event::LoopEnded(LoopEnd::Finished(e))) => S::Ended(e),
            (_, Event::LoopEnded(LoopEnd::Migrated(url))) => S::Migrated {
                url,
                loop_running: false,
            },

            // ---------------------------------------------------------- holds
            (_, Event::Release) => {
                if pauses.holds == 0 {
                    return Err(LifecycleError::NoHold);
                }
                pauses.holds -= 1;
                self.state.clone()
            }
            (
                S::Migrated { url, .. },
                Event::Hold
                | Event::Pause
                | Event::Resume
                | Event::SnapshotStarted { .. }
                | Event::MigrationStarted,
            ) => return Err(LifecycleError::Migrated { url: url.clone() }),
            (
                S::Ended(e),
                Event::Hold
                | Event::Pause
                | Event::Resume
                | Event::SnapshotStarted { .. }
                | Event::MigrationStarted,
            ) => {
                return Err(LifecycleError::Ended {
                    what: e.what.clone(),
                })
            }
            (_, Event::Hold) => {
                pauses.holds += 1;
                self.state.clone()
            }

            // ---------------------------------------------------------- the user
            (S::Migrating { .. }, Event::Pause) => return Err(LifecycleError::PauseWhileMigrating),
            (_, Event::Pause) if self.in_doubt() => return Err(LifecycleError::PausedInDoubt),
            (_, Event::Pause) if pauses.user => return Err(LifecycleError::AlreadyPaused),
            (_, Event::Pause) => {
                pauses.user = true;
                self.state.clone()
            }
            (S::Migrating { .. }, Event::Resume) => {
                return Err(LifecycleError::ResumeWhileMigrating)
            }
            (S::InDoubt { .. }, Event::Resume) => {
                pauses.holds = pauses.holds.saturating_sub(1);
                idle
            }
            (
                S::Snapshotting {
                    started,
                    in_doubt: true,
                },
                Event::Resume,
            ) => {
                pauses.holds = pauses.holds.saturating_sub(1);
                S::Snapshotting {
                    started: *started,
                    in_doubt: false,
                }
            }
            (S::Snapshotting { .. }, Event::Resume) => return Err(LifecycleError::NotPaused),
            (_, Event::Resume) if !pauses.user => return Err(LifecycleError::NotPaused),
            (_, Event::Resume) => {
                pauses.user = false;
                self.state.clone()
            }

            // ---------------------------------------------------------- snapshots
            (S::NotStarted | S::Running, Event::SnapshotStarted { .. }) => S::Snapshotting {
                started,
                in_doubt: false,
            },
            (S::InDoubt { .. }, Event::SnapshotStarted { sev_es: true }) => {
                return Err(LifecycleError::SnapshotInDoubt)
            }
            (S::InDoubt { started }, Event::SnapshotStarted { sev_es: false }) => S::Snapshotting {
                started: *started,
                in_doubt: true,
            },
            (S::Migrating { .. }, Event::SnapshotStarted { .. }) => {
                return Err(LifecycleError::SnapshotWhileMigrating)
            }
            (S::Snapshotting { .. }, Event::SnapshotStarted { .. }) => {
                return Err(LifecycleError::SnapshotInProgress)
            }
            (S::Snapshotting { in_doubt, .. }, Event::SnapshotEnded) => {
                if *in_doubt {
                    S::InDoubt { started }
                } else {
                    idle
                }
            }
            (S::Migrated { .. } | S::Ended(_), Event::SnapshotEnded) => self.state.clone(),
            (_, Event::SnapshotEnded) => return Err(LifecycleError::NoSnapshot),

            // ---------------------------------------------------------- migrations
            (S::NotStarted | S::Running, Event::MigrationStarted) => S::Migrating { started },
            (S::Migrating { .. }, Event::MigrationStarted) => {
                return Err(LifecycleError::AlreadyMigrating)
            }
            (
                S::InDoubt { .. } | S::Snapshotting { in_doubt: true, .. },
                Event::MigrationStarted,
            ) => return Err(LifecycleError::MigrateInDoubt),
            (S::Snapshotting { .. }, Event::MigrationStarted) => {
                return Err(LifecycleError::MigrateWhileSnapshotting)
            }
            (S::Migrating { .. }, Event::MigrationEnded) => idle,
            (S::Migrating { .. }, Event::MigrationInDoubt) => {
                if pauses.holds == 0 {
                    return Err(LifecycleError::NoHold);
                }
                S::InDoubt { started }
            }
            (S::Migrating { .. } | S::Ended(_), Event::MigrationCommitted { url }) => S::Migrated {
                url,
                loop_running: self.loop_running(),
            },
            (S::Migrated { .. } | S::Ended(_), Event::MigrationEnded | Event::MigrationInDoubt) => {
                self.state.clone()
            }
            (
                _,
                Event::MigrationEnded | Event::MigrationInDoubt | Event::MigrationCommitted { .. },
            ) => return Err(LifecycleError::NoMigration),
        };
        Ok(Lifecycle { state, pauses })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(failed: bool) -> Ending {
        Ending {
            exit_status: if failed {
                crate::outcome::EXIT_GUEST_SHUTDOWN
            } else {
                0
            },
            failed,
            what: "the guest exited with status 0".into(),
        }
    }

    /// A compact name of a lifecycle: the state (N not started, R running, S snapshotting,
    /// M migrating, D in doubt, X migrated, E ended; a trailing `-` means the loop has not
    /// started, resp. has ended for X; `d` a snapshot of a VM in doubt) and the pauses
    /// (`+u` the user's, `+hN` holds).
    fn code(l: &Lifecycle) -> String {
        let loop_mark = |started: bool| if started { "" } else { "-" };
        let mut s = match &l.state {
            State::NotStarted => "N".to_string(),
            State::Running => "R".to_string(),
            State::Snapshotting { started, in_doubt } => format!(
                "S{}{}",
                if *in_doubt { "d" } else { "" },
                loop_mark(*started)
            ),
            State::Migrating { started } => format!("M{}", loop_mark(*started)),
            State::InDoubt { started } => format!("D{}", loop_mark(*started)),
            State::Migrated { loop_running, .. } => format!("X{}", loop_mark(*loop_running)),
            State::Ended(_) => "E".to_string(),
        };
        if l.pauses.user {
            s += "+u";
        }
        if l.pauses.holds > 0 {
            s += &format!("+h{}", l.pauses.holds);
        }
        s
    }

    fn err_code(e: &LifecycleError) -> String {
        let d = format!("{e:?}");
        let name = d.split([' ', '{', '(']).next().unwrap();
        format!("!{name}")
    }

    const EVENTS: [&str; 14] = [
        "start", "end", "endmig", "pause", "resume", "hold", "release", "snap", "snapsev",
        "snapend", "mig", "migend", "doubt", "commit",
    ];

    fn event(name: &str) -> Event {
        match name {
            "start" => Event::LoopStarted,
            "end" => Event::LoopEnded(LoopEnd::Finished(ending(false))),
            "fail" => Event::LoopEnded(LoopEnd::Finished(ending(true))),
            "endmig" => Event::LoopEnded(LoopEnd::Migrated("tcp://h:1".into())),
            "pause" => Event::Pause,
            "resume" => Event::Resume,
            "hold" => Event::Hold,
            "release" => Event::Release,
            "snap" => Event::SnapshotStarted { sev_es: false },
            "snapsev" => Event::SnapshotStarted { sev_es: true },
            "snapend" => Event::SnapshotEnded,
            "mig" => Event::MigrationStarted,
            "migend" => Event::MigrationEnded,
            "doubt" => Event::MigrationInDoubt,
            "commit" => Event::MigrationCommitted {
                url: "tcp://h:1".into(),
            },
            other => panic!("unknown event {other}"),
        }
    }

    fn reach(path: &str) -> Lifecycle {
        let mut l = Lifecycle::new();
        for e in path.split_whitespace() {
            l.apply(event(e))
                .unwrap_or_else(|err| panic!("path {path:?}: {e} refused: {err}"));
        }
        l
    }

    /// Every event in every state: the state it leads to, or the error it is refused with
    /// (`!Name`). The rows are reached from a new VM by the events in the first column.
    #[test]
    fn every_transition_valid_and_invalid() {
        #[rustfmt::skip]
        let table: &[(&str, &str, [&str; 14])] = &[
            // path, state, then:  start, end, endmig, pause, resume, hold, release, snap, snapsev, snapend, mig, migend, doubt, commit
            ("", "N", ["R", "!LoopNotRunning", "!LoopNotRunning", "N+u", "!NotPaused", "N+h1", "!NoHold", "S-", "S-", "!NoSnapshot", "M-", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("pause", "N+u", ["R+u", "!LoopNotRunning", "!LoopNotRunning", "!AlreadyPaused", "N", "N+u+h1", "!NoHold", "S-+u", "S-+u", "!NoSnapshot", "M-+u", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start", "R", ["!AlreadyStarted", "E", "X-", "R+u", "!NotPaused", "R+h1", "!NoHold", "S", "S", "!NoSnapshot", "M", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start pause", "R+u", ["!AlreadyStarted", "E+u", "X-+u", "!AlreadyPaused", "R", "R+u+h1", "!NoHold", "S+u", "S+u", "!NoSnapshot", "M+u", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start hold", "R+h1", ["!AlreadyStarted", "E+h1", "X-+h1", "R+u+h1", "!NotPaused", "R+h2", "R", "S+h1", "S+h1", "!NoSnapshot", "M+h1", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("snap", "S-", ["S", "!LoopNotRunning", "!LoopNotRunning", "S-+u", "!NotPaused", "S-+h1", "!NoHold", "!SnapshotInProgress", "!SnapshotInProgress", "N", "!MigrateWhileSnapshotting", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start snap hold", "S+h1", ["!AlreadyStarted", "E+h1", "X-+h1", "S+u+h1", "!NotPaused", "S+h2", "S", "!SnapshotInProgress", "!SnapshotInProgress", "R+h1", "!MigrateWhileSnapshotting", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("mig", "M-", ["M", "!LoopNotRunning", "!LoopNotRunning", "!PauseWhileMigrating", "!ResumeWhileMigrating", "M-+h1", "!NoHold", "!SnapshotWhileMigrating", "!SnapshotWhileMigrating", "!NoSnapshot", "!AlreadyMigrating", "N", "!NoHold", "X-"]),
            ("start mig", "M", ["!AlreadyStarted", "E", "X-", "!PauseWhileMigrating", "!ResumeWhileMigrating", "M+h1", "!NoHold", "!SnapshotWhileMigrating", "!SnapshotWhileMigrating", "!NoSnapshot", "!AlreadyMigrating", "R", "!NoHold", "X"]),
            ("start pause mig hold", "M+u+h1", ["!AlreadyStarted", "E+u+h1", "X-+u+h1", "!PauseWhileMigrating", "!ResumeWhileMigrating", "M+u+h2", "M+u", "!SnapshotWhileMigrating", "!SnapshotWhileMigrating", "!NoSnapshot", "!AlreadyMigrating", "R+u+h1", "D+u+h1", "X+u+h1"]),
            ("mig hold doubt", "D-+h1", ["D+h1", "!LoopNotRunning", "!LoopNotRunning", "!PausedInDoubt", "N", "D-+h2", "D-", "Sd-+h1", "!SnapshotInDoubt", "!NoSnapshot", "!MigrateInDoubt", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start mig hold doubt", "D+h1", ["!AlreadyStarted", "E+h1", "X-+h1", "!PausedInDoubt", "R", "D+h2", "D", "Sd+h1", "!SnapshotInDoubt", "!NoSnapshot", "!MigrateInDoubt", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start mig hold doubt snap", "Sd+h1", ["!AlreadyStarted", "E+h1", "X-+h1", "!PausedInDoubt", "S", "Sd+h2", "Sd", "!SnapshotInProgress", "!SnapshotInProgress", "D+h1", "!MigrateInDoubt", "!NoMigration", "!NoMigration", "!NoMigration"]),
            ("start mig hold commit", "X+h1", ["!Migrated", "X-+h1", "X-+h1", "!Migrated", "!Migrated", "!Migrated", "X", "!Migrated", "!Migrated", "X+h1", "!Migrated", "X+h1", "X+h1", "!NoMigration"]),
            ("start mig commit endmig", "X-", ["!Migrated", "X-", "X-", "!Migrated", "!Migrated", "!Migrated", "!NoHold", "!Migrated", "!Migrated", "X-", "!Migrated", "X-", "X-", "!NoMigration"]),
            ("start end", "E", ["!Ended", "!LoopNotRunning", "!LoopNotRunning", "!Ended", "!Ended", "!Ended", "!NoHold", "!Ended", "!Ended", "E", "!Ended", "E", "E", "X-"]),
        ];
        let mut failures = Vec::new();
        for (path, state, row) in table {
            let from = reach(path);
            assert_eq!(&code(&from), state, "path {path:?}");
            for (e, want) in EVENTS.iter().zip(row) {
                let got = match from.next(event(e)) {
                    Ok(l) => code(&l),
                    Err(err) => {
                        // A refusal leaves the lifecycle unchanged.
                        let mut l = from.clone();
                        assert!(l.apply(event(e)).is_err());
                        assert_eq!(l, from);
                        err_code(&err)
                    }
                };
                if got != *want {
                    failures.push(format!("{state} --{e}--> {got}, expected {want}"));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn holds_and_user_pause_combine() {
        let mut l = reach("start pause hold hold");
        assert_eq!(l.status(), Status::Paused);
        l.apply(Event::Release).unwrap();
        l.apply(Event::Release).unwrap();
        assert_eq!(l.status(), Status::Paused, "the user's pause still holds");
        l.apply(Event::Resume).unwrap();
        assert_eq!(l.status(), Status::Running);
        assert!(!l.pauses().any());
    }

    #[test]
    fn statuses() {
        for (path, status) in [
            ("", Status::Starting),
            ("pause", Status::Paused),
            ("start", Status::Running),
            ("start hold", Status::Paused),
            ("start snap", Status::Paused),
            ("start mig", Status::Migrating),
            ("start mig hold doubt", Status::Paused),
            ("start mig commit", Status::Migrated),
            ("start end", Status::Exited),
            ("start fail", Status::Failed),
        ] {
            assert_eq!(reach(path).status(), status, "{path:?}");
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let e = reach("start mig").next(Event::Pause).unwrap_err();
        assert!(e.to_string().contains("esvm ctl cancel"), "{e}");
        let e = reach("start mig hold doubt")
            .next(Event::MigrationStarted)
            .unwrap_err();
        assert!(e.to_string().contains("esvm ctl resume"), "{e}");
        let e = reach("start mig commit").next(Event::Hold).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VM migrated to tcp://h:1; it runs there now and can never run here again"
        );
    }
}
