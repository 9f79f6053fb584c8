//! The esvm VMM as a library: machines, their run loop and its control, SEV-ES launch,
//! snapshots, live migration and the control API glue. The `esvm` binary is a thin command
//! line on top of it.

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
