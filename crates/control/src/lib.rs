//! The control API of a running esvm VM.
//!
//! `esvm run --api-socket PATH` serves this API on a Unix stream socket; `esvm ctl` is its
//! client. The protocol ([`protocol`]) is versioned line-delimited JSON: one request object
//! per line, one response object per line; it is documented in `docs/control-api.md`.
//!
//! * The VMM implements [`ControlTarget`] and hands it to [`ApiServer::spawn`], which serves
//!   any number of clients over time, each on its own thread, and answers every malformed
//!   request with an error instead of failing.
//! * [`ApiClient`] connects and sends [`Request`]s, turning every failure (no server,
//!   stale socket, timeout, version mismatch) into a [`ClientError`] that says what to do.
//! * [`mock::MockTarget`] is a deterministic fake VM for tests.

pub mod client;
mod framing;
pub mod mock;
pub mod protocol;
pub mod server;
pub mod target;

pub use client::{ApiClient, ClientError, DEFAULT_CLIENT_TIMEOUT};
pub use protocol::{
    ApiError, ControlRegs, ErrorCode, LaunchMeasurement, MigrateRequest, MigrateSetRequest,
    MigrateTls, MigrationLimits, MigrationPhase, MigrationStatus, OnTimeout, PostcopyStatus, Reply,
    Request, Response, SnapshotInfo, VcpuScheduling, VcpuView, VmState, VmStatus, VmType,
    PROTOCOL_VERSION,
};
pub use server::{ApiServer, ServerConfig, ServerError};
pub use target::ControlTarget;
