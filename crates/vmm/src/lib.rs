#![warn(missing_docs)]
//! The esvm VMM as a library: machines and their run loop, the VM lifecycle and its
//! control, SEV-ES launch, snapshots, live migration and the control API glue. The `esvm`
//! binary (`src/main.rs`, `src/cli/`) is a thin command line on top of it: it parses the
//! arguments, calls this library and maps how things ended to the process's exit status.
//!
//! # Layers
//!
//! Each module uses only modules below it (`tests/module_graph.rs` fails on a cycle or an
//! upward import):
//!
//! ```text
//!  session     run a machine as a process: control API socket, run loop, linger
//!  control     VmHandle: the control API target (status, pause, resume, snapshot,
//!              migrate, cancel), the migration thread
//!  snapshot    snapshots: write (plain / sealed SEV-ES) and restore
//!  migrate     MachineSource / MachineTarget: the migration protocol's VMM side
//!  sev_launch  SEV-ES launch through the secure processor (on the hypervisor's type-state
//!              Launcher); the owner's launch predictor
//!  machine     Machine (vCPUs, devices, clock, run loop, state save/restore),
//!              MachineHandle, in-place guest RAM behind guards
//!  runctl      RunControl<M>: pauses, holds, jobs, stopped guards, tickets (generic over
//!              the job target, so it does not know the machine)
//!  lifecycle   the VM lifecycle state machine and its transitions
//!  dirty       the dirty-log view: carry and ever-written page sets
//!  ram         unsafe in-place views of guest RAM (only reached through guards)
//!  console     the host end of the serial console: stdin into COM1, raw terminal, escape
//!  outcome     how a run ended, and the exit status for each ending
//!  size        human-readable sizes
//!  tls         TLS 1.3 on tcp: migrations (esvm-tls's handshake, client/server config)
//!  transport   migration URLs (tcp:, unix:, fd:), the destination's listener, connecting
//! ```
//!
//! # The lifecycle and its guards
//!
//! A machine has one [`lifecycle::Lifecycle`] (not started, running, snapshotting,
//! migrating, in doubt, migrated, ended; plus the user pause and the internal holds), kept
//! by its [`runctl::RunControl`]; every request that changes it is a transition that may be
//! refused with a [`lifecycle::LifecycleError`]. Code whose soundness depends on the
//! lifecycle takes a proof of it: [`machine::MachineHandle::stopped_ram`] (guest RAM in
//! place, read-only) needs a [`machine::StoppedGuard`], which exists only while the run loop
//! is parked under its hold; [`machine::Machine::exclusive_ram`] (writing or discarding RAM
//! in place) needs a machine that nobody else holds.

pub mod console;
pub mod control;
pub mod dirty;
pub mod lifecycle;
pub mod machine;
pub mod migrate;
pub mod outcome;
pub mod ram;
pub mod runctl;
pub mod session;
pub mod sev_launch;
pub mod size;
pub mod snapshot;
pub mod tls;
pub mod transport;
