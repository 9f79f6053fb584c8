//! The destination side: an explicit state machine over incoming frames.
//!
//! ```text
//!  AwaitHello --Hello--> AwaitConfig --Config--> ReceivingMemory            (plain)
//!                                          \--> AwaitSevSession --SevSession--> ReceivingMemory
//!  ReceivingMemory --Pages|SevPages|PassEnd--> ReceivingMemory
//!  ReceivingMemory --PassEnd(final)--> AwaitState
//!  AwaitState --DeviceState|VcpuState--> AwaitState --Complete--> Committed
//!  any state but Committed --Abort, error, cancel--> Aborted
//!
//!  post-copy (only if both sides offered CAP_POSTCOPY):
//!  ReceivingMemory --PostcopySwitch--> PostcopyState
//!  PostcopyState --DeviceState|VcpuState--> PostcopyState --PostcopyRun--> PostcopyMemory
//!  PostcopyMemory --Pages|SevPages--> PostcopyMemory --Complete--> Committed
//! ```
//!
//! ## Post-copy
//! `PostcopySwitch` names the pages still missing; the target hides them from the guest
//! ([`MigrationTarget::postcopy_begin`]). After the states, `PostcopyRun` starts the guest
//! ([`MigrationTarget::postcopy_run`]). From then on every page frame may carry only pages
//! still missing (a page sent twice, or one never announced, is refused: it could overwrite
//! what the running guest wrote since); a page becomes visible to the guest only after its
//! frame's checksum (plain) or its packet's MAC (SEV-ES) was verified
//! ([`MigrationTarget::postcopy_publish`]). Between frames the receiver asks the target for
//! the pages the guest faulted on and sends `PageRequest` frames for those not yet requested;
//! the source sends them ahead of its background order. `Complete` is admitted only when no
//! page is missing. The request latency is therefore one frame's transfer time at worst
//! plus the source's small post-copy window; the receiver needs no second thread.
//!
//! After `PostcopyRun` the guest has run here: any failure (cut, bad frame, refused page,
//! cancel) calls [`MigrationTarget::abort`], which must stop the guest for good, since
//! neither side holds the whole guest any more.
//! A frame the current state does not admit is refused on its header alone (before its
//! payload is read or anything is allocated). On any error the target's
//! [`abort`](MigrationTarget::abort) discards everything, the source is told why with an
//! `Error` frame, and the receiver drains the stream briefly so that the source can read that
//! frame instead of a connection reset.

use crate::protocol::{
    self, check_payload_crc, decode_packet_table, decode_page_table, decode_table_prefix,
    encode_error, encode_seq, ErrorCode, FrameHeader, FrameReader, FrameType, FrameWriter,
    HelloAck, PassEnd, PostcopySwitch, ProtocolError, CAPABILITIES, CAP_POSTCOPY, CAP_SEV_ES,
    CRC_CHUNK, MAX_BLOB_LEN, MAX_PAGES_PER_REQUEST, MIN_PROTOCOL_VERSION, PAGES_PREFIX_LEN,
    PROTOCOL_VERSION, TABLE_ENTRY_LEN,
};
use crate::stream::MigrationStream;
use crate::target::{MigrationTarget, TargetError};
use crate::PageSet;
use crate::{CancelToken, GuestType, MigrationConfig, PAGE_SIZE};
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use thiserror::Error;

/// The receiver's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReceiverState {
    AwaitHello,
    AwaitConfig,
    AwaitSevSession,
    ReceivingMemory,
    AwaitState,
    /// Post-copy: the switch arrived; device and vCPU states follow, then `PostcopyRun`.
    PostcopyState,
    /// Post-copy: the guest runs here; the missing pages arrive, then `Complete`.
    PostcopyMemory,
    Committed,
    Aborted,
}

impl ReceiverState {
    /// Whether a frame of type `t` may arrive in this state.
    pub fn admits(self, t: FrameType) -> bool {
        use FrameType as F;
        use ReceiverState as S;
        match (self, t) {
            (S::Committed | S::Aborted, _) => false,
            (_, F::Abort) => true,
            (S::AwaitHello, F::Hello) => true,
            (S::AwaitConfig, F::Config) => true,
            (S::AwaitSevSession, F::SevSession) => true,
            (S::ReceivingMemory, F::Pages | F::SevPages | F::PassEnd | F::PostcopySwitch) => true,
            (S::AwaitState, F::DeviceState | F::VcpuState | F::Complete) => true,
            (S::PostcopyState, F::DeviceState | F::VcpuState | F::PostcopyRun) => true,
            (S::PostcopyMemory, F::Pages | F::SevPages | F::Complete) => true,
            _ => false,
        }
    }

    /// What this state waits for, for error messages.
    pub fn expects(self) -> &'static str {
        match self {
            ReceiverState::AwaitHello => "Hello",
            ReceiverState::AwaitConfig => "Config",
            ReceiverState::AwaitSevSession => "SevSession",
            ReceiverState::ReceivingMemory => "Pages, SevPages, PassEnd or PostcopySwitch",
            ReceiverState::AwaitState => "DeviceState, VcpuState or Complete",
            ReceiverState::PostcopyState => "DeviceState, VcpuState or PostcopyRun",
            ReceiverState::PostcopyMemory => "Pages, SevPages or Complete",
            ReceiverState::Committed | ReceiverState::Aborted => "nothing (the migration ended)",
        }
    }
}

#[derive(Debug, Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{frame} frame refused in state {state:?}: expected {expected}")]
    OutOfOrder {
        frame: FrameType,
        state: ReceiverState,
        expected: &'static str,
    },
    #[error(
        "no common protocol version: the source speaks {min}..={max}, this destination \
         {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; run compatible esvm versions"
    )]
    NoCommonVersion { min: u16, max: u16 },
    #[error("the migration stream is inconsistent: {0}")]
    Invalid(String),
    #[error("the destination VM refused the migration: {0}")]
    Target(#[from] TargetError),
    #[error("the source aborted the migration: {0}")]
    AbortedBySource(String),
    #[error("the migration was cancelled on the destination")]
    Cancelled,
    #[error("cannot set up the migration connection: {0}")]
    Setup(#[source] io::Error),
}

impl ReceiveError {
    /// The code reported to the source in the `Error` frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReceiveError::Protocol(_) | ReceiveError::Invalid(_) | ReceiveError::Setup(_) => {
                ErrorCode::Protocol
            }
            ReceiveError::NoCommonVersion { .. } => ErrorCode::Incompatible,
            ReceiveError::OutOfOrder { .. } => ErrorCode::OutOfOrder,
            ReceiveError::Target(TargetError::Incompatible(_) | TargetError::Config(_)) => {
                ErrorCode::Incompatible
            }
            ReceiveError::Target(TargetError::Unsupported { .. }) => ErrorCode::Incompatible,
            ReceiveError::Target(TargetError::Refused(_) | TargetError::RefusedBy { .. }) => {
                ErrorCode::Refused
            }
            ReceiveError::Target(TargetError::Failed(_) | TargetError::FailedBy(_)) => {
                ErrorCode::Internal
            }
            ReceiveError::AbortedBySource(_) => ErrorCode::Internal,
            ReceiveError::Cancelled => ErrorCode::Cancelled,
        }
    }
}

/// Receiver tuning.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Longest silence from the source ([`Receiver::run_tcp`] sets it as the socket's read
    /// and write timeout).
    pub io_timeout: Duration,
    /// After refusing a migration, how long and how much to keep reading (and discarding) so
    /// the source gets to read the `Error` frame.
    pub drain_timeout: Duration,
    pub drain_limit: u64,
    /// Read buffer for headers and tables; page data bypasses it.
    pub read_buffer: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            io_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
            drain_limit: 256 << 20,
            read_buffer: 16 << 10,
        }
    }
}

/// What a successful receive did.
#[derive(Debug, Clone)]
pub struct ReceiveOutcome {
    pub config: MigrationConfig,
    /// Memory passes received (the last one is the stop-and-copy pass).
    pub passes: u32,
    pub pages: u64,
    pub bytes: u64,
    /// Whether the `Committed` acknowledgement reached the wire. If not, the destination is
    /// committed all the same, and the source stays paused reporting an in-doubt outcome.
    pub commit_ack_sent: bool,
    /// Post-copy figures, if the migration switched to post-copy.
    pub postcopy: Option<PostcopyReceived>,
}

/// What post-copy did on the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyReceived {
    /// Pages missing at the switch.
    pub pending_at_switch: u64,
    /// Distinct pages requested from the source because the guest faulted on them.
    pub requested: u64,
}

/// The destination's side of a migration.
pub struct Receiver {
    config: ReceiverConfig,
    state: ReceiverState,
    cancel: CancelToken,
}

/// Per-migration bookkeeping.
struct Ctx {
    config: Option<MigrationConfig>,
    sev_capable: bool,
    pass: u32,
    pass_pages: u64,
    pages: u64,
    device_state: bool,
    vcpus_seen: Vec<bool>,
    scratch: Vec<u8>,
    postcopy_capable: bool,
    /// Post-copy: pages still missing (from the switch on).
    pending: Option<PageSet>,
    /// Post-copy: pages already requested from the source.
    requested: Option<PageSet>,
    postcopy: Option<PostcopyReceived>,
    faults: Vec<u64>,
}

impl Receiver {
    pub fn new(config: ReceiverConfig) -> Self {
        Receiver {
            config,
            state: ReceiverState::AwaitHello,
            cancel: CancelToken::new(),
        }
    }

    pub fn state(&self) -> ReceiverState {
        self.state
    }

    /// A token that cancels this receiver (checked between frames).
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Receive a migration over a connected TCP stream: [`Receiver::run_stream`].
    pub fn run_tcp<T: MigrationTarget + ?Sized>(
        &mut self,
        target: &mut T,
        stream: TcpStream,
    ) -> Result<ReceiveOutcome, ReceiveError> {
        self.run_stream(target, stream.into())
    }

    /// Receive a migration over a connected TCP or Unix stream (sets the socket timeouts,
    /// and TCP_NODELAY on TCP; shuts the stream down at the end).
    pub fn run_stream<T: MigrationTarget + ?Sized>(
        &mut self,
        target: &mut T,
        stream: MigrationStream,
    ) -> Result<ReceiveOutcome, ReceiveError> {
        let timeout = self.config.io_timeout.max(Duration::from_millis(1));
        let setup = stream
            .configure(timeout, timeout)
            .and_then(|()| stream.try_clone());
        let reader = match setup {
            Ok(r) => r,
            Err(e) => {
                target.abort();
                self.state = ReceiverState::Aborted;
                return Err(ReceiveError::Setup(e));
            }
        };
        let result = self.run(target, reader, &stream);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        result
    }

    /// Receive a migration from `reader`, answering on `writer`.
    pub fn run<T: MigrationTarget + ?Sized, R: Read, W: Write>(
        &mut self,
        target: &mut T,
        reader: R,
        writer: W,
    ) -> Result<ReceiveOutcome, ReceiveError> {
        let mut r = FrameReader::new(BufReader::with_capacity(
            self.config.read_buffer.max(4096),
            reader,
        ));
        let mut w = FrameWriter::new(writer);
        let mut ctx = Ctx {
            config: None,
            sev_capable: false,
            pass: 1,
            pass_pages: 0,
            pages: 0,
            device_state: false,
            vcpus_seen: Vec::new(),
            scratch: Vec::new(),
            postcopy_capable: false,
            pending: None,
            requested: None,
            postcopy: None,
            faults: Vec::new(),
        };
        self.state = ReceiverState::AwaitHello;
        match self.session(target, &mut r, &mut w, &mut ctx) {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                // A committed receiver returns from session() right away, so we are before
                // the commit here: discard everything.
                target.abort();
                self.state = ReceiverState::Aborted;
                let peer_gone = matches!(
                    e,
                    ReceiveError::AbortedBySource(_)
                        | ReceiveError::Protocol(ProtocolError::Closed)
                        | ReceiveError::Protocol(ProtocolError::Truncated)
                        | ReceiveError::Protocol(ProtocolError::Io(_))
                );
                if !peer_gone {
                    let msg = e.to_string();
                    if w.send(FrameType::Error, &[&encode_error(e.code(), &msg)])
                        .and_then(|_| w.flush())
                        .is_ok()
                    {
                        drain(
                            r.get_mut(),
                            self.config.drain_limit,
                            self.config.drain_timeout,
                        );
                    }
                }
                Err(e)
            }
        }
    }

    fn session<T: MigrationTarget + ?Sized, R: Read, W: Write>(
        &mut self,
        target: &mut T,
        r: &mut FrameReader<R>,
        w: &mut FrameWriter<W>,
        ctx: &mut Ctx,
    ) -> Result<ReceiveOutcome, ReceiveError> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(ReceiveError::Cancelled);
            }
            if self.state == ReceiverState::PostcopyMemory {
                request_faults(target, w, ctx)?;
            }
            let h = r.read_header()?;
            if !self.state.admits(h.frame_type) {
                return Err(ReceiveError::OutOfOrder {
                    frame: h.frame_type,
                    state: self.state,
                    expected: self.state.expects(),
                });
            }
            match h.frame_type {
                FrameType::Hello => {
                    let hello = protocol::Hello::decode(&r.read_payload(&h)?)?;
                    let version = hello.max_version.min(PROTOCOL_VERSION);
                    if version < hello.min_version.max(MIN_PROTOCOL_VERSION) {
                        return Err(ReceiveError::NoCommonVersion {
                            min: hello.min_version,
                            max: hello.max_version,
                        });
                    }
                    let mut caps = hello.capabilities & CAPABILITIES;
                    if !target.postcopy_supported() {
                        caps &= !CAP_POSTCOPY;
                    }
                    ctx.sev_capable = caps & CAP_SEV_ES != 0;
                    ctx.postcopy_capable = caps & CAP_POSTCOPY != 0;
                    w.send(
                        FrameType::HelloAck,
                        &[&HelloAck {
                            version,
                            capabilities: caps,
                        }
                        .encode()],
                    )?;
                    self.state = ReceiverState::AwaitConfig;
                }
                FrameType::Config => {
                    let cfg = protocol::decode_config(&r.read_payload(&h)?)?;
                    if cfg.vm_type == GuestType::SevEs && !ctx.sev_capable {
                        return Err(ReceiveError::Invalid(
                            "an SEV-ES guest from a source without the SEV-ES capability".into(),
                        ));
                    }
                    let certs = target.accept_config(&cfg)?;
                    if certs.len() > MAX_BLOB_LEN as usize {
                        return Err(ReceiveError::Target(TargetError::Failed(format!(
                            "the platform certificate chain is {} bytes, more than the \
                             protocol's {MAX_BLOB_LEN}",
                            certs.len()
                        ))));
                    }
                    ctx.vcpus_seen = vec![false; cfg.vcpus as usize];
                    self.state = if cfg.vm_type == GuestType::SevEs {
                        ReceiverState::AwaitSevSession
                    } else {
                        ReceiverState::ReceivingMemory
                    };
                    ctx.config = Some(cfg);
                    w.send(FrameType::ConfigAck, &[&certs])?;
                }
                FrameType::SevSession => {
                    let blob = r.read_payload(&h)?;
                    target.sev_receive_start(&blob)?;
                    self.state = ReceiverState::ReceivingMemory;
                    ack(w, &h)?;
                }
                FrameType::Pages => {
                    let cfg = ctx.config.as_ref().ok_or_else(no_config)?;
                    if cfg.vm_type != GuestType::Plain {
                        return Err(ReceiveError::Invalid(
                            "plaintext pages for an SEV-ES guest".into(),
                        ));
                    }
                    let mem_pages = cfg.pages();
                    let n =
                        receive_pages(target, r, &h, mem_pages, ctx.pass, ctx.pending.as_mut())?;
                    ctx.pass_pages += n;
                    ctx.pages += n;
                    ack(w, &h)?;
                }
                FrameType::SevPages => {
                    let cfg = ctx.config.as_ref().ok_or_else(no_config)?;
                    if cfg.vm_type != GuestType::SevEs {
                        return Err(ReceiveError::Invalid(
                            "SEV-ES transport packets for a plain guest".into(),
                        ));
                    }
                    let mem_pages = cfg.pages();
                    let n = receive_sev_pages(
                        target,
                        r,
                        &h,
                        mem_pages,
                        ctx.pass,
                        &mut ctx.scratch,
                        ctx.pending.as_mut(),
                    )?;
                    ctx.pass_pages += n;
                    ctx.pages += n;
                    ack(w, &h)?;
                }
                FrameType::PassEnd => {
                    let pe = PassEnd::decode(&r.read_payload(&h)?)?;
                    if pe.pass != ctx.pass {
                        return Err(ReceiveError::Invalid(format!(
                            "end of pass {} while receiving pass {}",
                            pe.pass, ctx.pass
                        )));
                    }
                    if pe.pages != ctx.pass_pages {
                        return Err(ReceiveError::Invalid(format!(
                            "pass {} announced {} pages but {} arrived",
                            pe.pass, pe.pages, ctx.pass_pages
                        )));
                    }
                    target.pass_end(pe.pass, pe.final_pass)?;
                    ctx.pass += 1;
                    ctx.pass_pages = 0;
                    if pe.final_pass {
                        self.state = ReceiverState::AwaitState;
                    }
                    ack(w, &h)?;
                }
                FrameType::PostcopySwitch => {
                    if !ctx.postcopy_capable {
                        return Err(ReceiveError::Invalid(
                            "a post-copy switch, but post-copy was not negotiated".into(),
                        ));
                    }
                    let cfg = ctx.config.as_ref().ok_or_else(no_config)?;
                    let sw = PostcopySwitch::decode(&r.read_payload(&h)?, cfg.pages())?;
                    if sw.pass != ctx.pass {
                        return Err(ReceiveError::Invalid(format!(
                            "post-copy switch to pass {} while receiving pass {}",
                            sw.pass, ctx.pass
                        )));
                    }
                    if ctx.pass_pages != 0 {
                        return Err(ReceiveError::Invalid(format!(
                            "post-copy switch in the middle of pass {}",
                            ctx.pass
                        )));
                    }
                    target.postcopy_begin(&sw.pending)?;
                    ctx.postcopy = Some(PostcopyReceived {
                        pending_at_switch: sw.pending.count(),
                        requested: 0,
                    });
                    ctx.requested = Some(PageSet::new(cfg.pages()));
                    ctx.pending = Some(sw.pending);
                    self.state = ReceiverState::PostcopyState;
                    ack(w, &h)?;
                }
                FrameType::PostcopyRun => {
                    r.read_payload(&h)?;
                    check_states(ctx, "PostcopyRun")?;
                    target.postcopy_run()?;
                    self.state = ReceiverState::PostcopyMemory;
                    ack(w, &h)?;
                    w.flush()?;
                }
                FrameType::DeviceState => {
                    if ctx.device_state {
                        return Err(ReceiveError::Invalid("device state sent twice".into()));
                    }
                    let state = r.read_payload(&h)?;
                    target.apply_device_state(&state)?;
                    ctx.device_state = true;
                    ack(w, &h)?;
                }
                FrameType::VcpuState => {
                    let p = r.read_payload(&h)?;
                    let vcpu = protocol::decode_vcpu_prefix(&p)?;
                    let count = ctx.vcpus_seen.len();
                    match ctx.vcpus_seen.get_mut(vcpu as usize) {
                        None => {
                            return Err(ReceiveError::Invalid(format!(
                                "state for vCPU {vcpu}, but the guest has {count} vCPUs"
                            )))
                        }
                        Some(true) => {
                            return Err(ReceiveError::Invalid(format!(
                                "state for vCPU {vcpu} sent twice"
                            )))
                        }
                        Some(seen) => *seen = true,
                    }
                    target.apply_vcpu_state(vcpu, &p[8..])?;
                    ack(w, &h)?;
                }
                FrameType::Complete => {
                    let finish = r.read_payload(&h)?;
                    check_states(ctx, "Complete")?;
                    if let Some(missing) = ctx.pending.as_ref().filter(|p| !p.is_empty()) {
                        return Err(ReceiveError::Invalid(format!(
                            "Complete while {} pages are still missing (the first is page {})",
                            missing.count(),
                            missing.next_set(0).unwrap_or(0)
                        )));
                    }
                    if ctx.pending.is_some() {
                        // The post-copy pass has no PassEnd: Complete ends it.
                        target.pass_end(ctx.pass, true)?;
                        ctx.pass += 1;
                    }
                    let config = ctx.config.clone().ok_or_else(no_config)?;
                    match (config.vm_type, finish.is_empty()) {
                        (GuestType::SevEs, true) => {
                            return Err(ReceiveError::Invalid(
                                "Complete without the SEV-ES finish blob".into(),
                            ))
                        }
                        (GuestType::SevEs, false) => target.sev_receive_finish(&finish)?,
                        (GuestType::Plain, false) => {
                            return Err(ReceiveError::Invalid(
                                "Complete with a finish blob for a plain guest".into(),
                            ))
                        }
                        (GuestType::Plain, true) => {}
                    }
                    target.commit()?;
                    // Point of no return: the guest is ours now, whatever happens to the
                    // acknowledgement.
                    self.state = ReceiverState::Committed;
                    let sent = w
                        .send(FrameType::Committed, &[&encode_seq(h.seq)])
                        .and_then(|_| w.flush())
                        .is_ok();
                    return Ok(ReceiveOutcome {
                        config,
                        passes: ctx.pass - 1,
                        pages: ctx.pages,
                        bytes: r.bytes_read(),
                        commit_ack_sent: sent,
                        postcopy: ctx.postcopy.clone(),
                    });
                }
                FrameType::Abort => {
                    let reason = r.read_payload(&h)?;
                    return Err(ReceiveError::AbortedBySource(
                        String::from_utf8_lossy(&reason).into_owned(),
                    ));
                }
                FrameType::HelloAck
                | FrameType::ConfigAck
                | FrameType::Ack
                | FrameType::Committed
                | FrameType::Error
                | FrameType::PageRequest => {
                    // admits() never lets a response type through; refuse defensively.
                    return Err(ReceiveError::OutOfOrder {
                        frame: h.frame_type,
                        state: self.state,
                        expected: self.state.expects(),
                    });
                }
            }
        }
    }
}

/// The device state and every vCPU's state arrived (before `Complete` / `PostcopyRun`).
fn check_states(ctx: &Ctx, frame: &str) -> Result<(), ReceiveError> {
    if !ctx.device_state {
        return Err(ReceiveError::Invalid(format!(
            "{frame} before the device state"
        )));
    }
    if let Some(v) = ctx.vcpus_seen.iter().position(|s| !s) {
        return Err(ReceiveError::Invalid(format!(
            "{frame} before the state of vCPU {v}"
        )));
    }
    Ok(())
}

/// Post-copy: send `PageRequest`s for the pages the guest faulted on that are still missing
/// and not requested yet.
fn request_faults<T: MigrationTarget + ?Sized, W: Write>(
    target: &mut T,
    w: &mut FrameWriter<W>,
    ctx: &mut Ctx,
) -> Result<(), ReceiveError> {
    ctx.faults.clear();
    target.postcopy_faults(&mut ctx.faults);
    let (Some(pending), Some(requested)) = (ctx.pending.as_ref(), ctx.requested.as_mut()) else {
        return Ok(());
    };
    let mut new = Vec::new();
    for &p in &ctx.faults {
        if p < pending.pages() && pending.is_set(p) && !requested.is_set(p) {
            requested.set(p);
            new.push(p);
        }
    }
    if new.is_empty() {
        return Ok(());
    }
    if let Some(pc) = ctx.postcopy.as_mut() {
        pc.requested += new.len() as u64;
    }
    for chunk in new.chunks(MAX_PAGES_PER_REQUEST as usize) {
        w.send(
            FrameType::PageRequest,
            &[&protocol::encode_page_request(chunk)],
        )?;
    }
    w.flush()?;
    Ok(())
}

/// Post-copy: every page of a frame must still be missing, or the frame could overwrite
/// what the running guest wrote since.
fn check_pending(pending: &PageSet, first: u64, count: u64) -> Result<(), ReceiveError> {
    for p in first..first + count {
        if !pending.is_set(p) {
            return Err(ReceiveError::Invalid(format!(
                "page {p} arrived during post-copy although it is not missing (sent twice,                  or never announced at the switch); refused so that it cannot overwrite                  the running guest's memory"
            )));
        }
    }
    Ok(())
}

fn no_config() -> ReceiveError {
    ReceiveError::Invalid("memory before the configuration".into())
}

fn ack<W: Write>(w: &mut FrameWriter<W>, h: &FrameHeader) -> Result<(), ReceiveError> {
    w.send(FrameType::Ack, &[&encode_seq(h.seq)])?;
    Ok(())
}

fn check_pass(frame_pass: u32, pass: u32) -> Result<(), ReceiveError> {
    if frame_pass != pass {
        return Err(ReceiveError::Invalid(format!(
            "pages of pass {frame_pass} while receiving pass {pass}"
        )));
    }
    Ok(())
}

/// Read a `Pages` frame's payload straight into guest memory; returns the page count.
fn receive_pages<T: MigrationTarget + ?Sized, R: Read>(
    target: &mut T,
    r: &mut FrameReader<R>,
    h: &FrameHeader,
    mem_pages: u64,
    pass: u32,
    pending: Option<&mut PageSet>,
) -> Result<u64, ReceiveError> {
    let mut crc = 0u32;
    let mut prefix = [0u8; PAGES_PREFIX_LEN];
    r.read_exact_crc(&mut prefix, &mut crc)?;
    let (frame_pass, entries) = decode_table_prefix(FrameType::Pages, &prefix, h.len)?;
    check_pass(frame_pass, pass)?;
    // entries <= MAX_PAGES_PER_FRAME, so the table is at most 16 KiB.
    let mut table = vec![0u8; entries as usize * TABLE_ENTRY_LEN];
    r.read_exact_crc(&mut table, &mut crc)?;
    let (runs, total) = decode_page_table(&table, mem_pages, h.len)?;
    if let Some(pending) = pending.as_deref() {
        for run in &runs {
            check_pending(pending, run.first, run.count as u64)?;
        }
    }
    for run in &runs {
        let dst = target.pages_mut(run.first, run.count as u64)?;
        let want = run.count as u64 * PAGE_SIZE;
        if dst.len() as u64 != want {
            return Err(ReceiveError::Target(TargetError::Failed(format!(
                "pages_mut({}, {}) returned {} bytes instead of {want}",
                run.first,
                run.count,
                dst.len()
            ))));
        }
        for piece in dst.chunks_mut(CRC_CHUNK) {
            r.read_exact_crc(piece, &mut crc)?;
        }
    }
    // A mismatch means corrupted data already landed in guest memory; the error aborts the
    // target, which discards it. In post-copy those pages are still hidden from the guest
    // (published only below), so the guest never sees them either.
    check_payload_crc(h, crc)?;
    if let Some(pending) = pending {
        for run in &runs {
            target.postcopy_publish(run.first, run.count as u64)?;
            pending.clear_range(run.first, run.count as u64);
        }
    }
    Ok(total)
}

/// Read a `SevPages` frame, verify its checksum, then hand each packet to the target.
fn receive_sev_pages<T: MigrationTarget + ?Sized, R: Read>(
    target: &mut T,
    r: &mut FrameReader<R>,
    h: &FrameHeader,
    mem_pages: u64,
    pass: u32,
    scratch: &mut Vec<u8>,
    mut pending: Option<&mut PageSet>,
) -> Result<u64, ReceiveError> {
    let mut crc = 0u32;
    let mut prefix = [0u8; PAGES_PREFIX_LEN];
    r.read_exact_crc(&mut prefix, &mut crc)?;
    let (frame_pass, entries) = decode_table_prefix(FrameType::SevPages, &prefix, h.len)?;
    check_pass(frame_pass, pass)?;
    let mut table = vec![0u8; entries as usize * TABLE_ENTRY_LEN];
    r.read_exact_crc(&mut table, &mut crc)?;
    let list = decode_packet_table(&table, mem_pages, h.len)?;
    if let Some(pending) = pending.as_deref() {
        for e in &list {
            check_pending(pending, e.page, 1)?;
        }
    }
    // The packets' total was checked to fill the payload exactly, and the payload length is
    // bounded by the frame type's limit.
    let data_len = h.len as usize - PAGES_PREFIX_LEN - table.len();
    scratch.resize(data_len, 0);
    r.read_exact_crc(&mut scratch[..], &mut crc)?;
    check_payload_crc(h, crc)?;
    let mut off = 0usize;
    for e in &list {
        let end = off + e.len as usize;
        // The firmware authenticates the packet before it writes the page; only then is it
        // published (post-copy).
        target.receive_page_packet(e.page, &scratch[off..end])?;
        if let Some(pending) = pending.as_deref_mut() {
            target.postcopy_publish(e.page, 1)?;
            pending.clear(e.page);
        }
        off = end;
    }
    Ok(list.len() as u64)
}

/// Read and discard until end of stream, `limit` bytes or `timeout`.
fn drain<R: Read>(r: &mut R, limit: u64, timeout: Duration) {
    let start = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    while total < limit && start.elapsed() < timeout {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_errors_keep_their_cause_and_their_wire_code() {
        use std::error::Error as _;
        let cause = || crate::Incompatible::Vcpus {
            source_count: 2,
            local: 1,
        };
        let e = ReceiveError::Target(cause().into());
        assert_eq!(e.code(), ErrorCode::Incompatible);
        assert_eq!(
            e.to_string(),
            format!(
                "the destination VM refused the migration: incompatible: {}",
                cause()
            )
        );
        let inner = e.source().and_then(|t| t.source());
        assert_eq!(
            inner.and_then(|i| i.downcast_ref::<crate::Incompatible>()),
            Some(&cause())
        );
        let e = ReceiveError::Target(TargetError::refused_by(
            "vCPU 0",
            io::Error::other("bad packet"),
        ));
        assert_eq!(e.code(), ErrorCode::Refused);
        assert!(
            e.to_string().ends_with("refused: vCPU 0: bad packet"),
            "{e}"
        );
        let inner = e.source().and_then(|t| t.source());
        assert!(inner.is_some_and(|i| i.is::<io::Error>()), "{e}");
        let e = ReceiveError::Target(TargetError::failed_by(io::Error::other("disk")));
        assert_eq!(e.code(), ErrorCode::Internal);
    }

    #[test]
    fn state_table() {
        use FrameType as F;
        use ReceiverState as S;
        let admitted: Vec<(S, F)> = [
            S::AwaitHello,
            S::AwaitConfig,
            S::AwaitSevSession,
            S::ReceivingMemory,
            S::AwaitState,
            S::PostcopyState,
            S::PostcopyMemory,
            S::Committed,
            S::Aborted,
        ]
        .iter()
        .flat_map(|s| F::ALL.iter().map(move |f| (*s, *f)))
        .filter(|(s, f)| s.admits(*f) && *f != F::Abort)
        .collect();
        assert_eq!(
            admitted,
            vec![
                (S::AwaitHello, F::Hello),
                (S::AwaitConfig, F::Config),
                (S::AwaitSevSession, F::SevSession),
                (S::ReceivingMemory, F::Pages),
                (S::ReceivingMemory, F::SevPages),
                (S::ReceivingMemory, F::PassEnd),
                (S::ReceivingMemory, F::PostcopySwitch),
                (S::AwaitState, F::DeviceState),
                (S::AwaitState, F::VcpuState),
                (S::AwaitState, F::Complete),
                (S::PostcopyState, F::DeviceState),
                (S::PostcopyState, F::VcpuState),
                (S::PostcopyState, F::PostcopyRun),
                (S::PostcopyMemory, F::Pages),
                (S::PostcopyMemory, F::SevPages),
                (S::PostcopyMemory, F::Complete),
            ]
        );
        assert!(S::AwaitHello.admits(F::Abort));
        assert!(!S::Committed.admits(F::Abort));
        for f in F::ALL {
            if !f.from_source() {
                assert!(!S::ReceivingMemory.admits(f));
            }
        }
    }
}
