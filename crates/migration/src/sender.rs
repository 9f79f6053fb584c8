//! The source side: the pre-copy engine.
//!
//! ## Passes and convergence
//! After the handshake the sender starts dirty logging and sends every page (or every page
//! the source says was ever written) in a first pass; then it repeatedly takes the dirty log
//! and sends what it names. After each pass it waits until the destination acknowledged the
//! whole pass, measures the bandwidth (acknowledged bytes / time: the lower of the average
//! over all passes and the last pass's), and estimates the downtime of stopping now:
//! remaining dirty bytes / bandwidth. When that fits
//! the downtime limit it pauses the source, sends the last dirty pages, the device state and
//! every vCPU's state, and asks the destination to commit. A pass cap and a timeout bound
//! pre-copy; reaching either cancels the migration or forces stop-and-copy, as configured.
//!
//! ## The "nothing lost" guarantee
//! The sender keeps two page sets:
//! * `to_send` — pages it still has to send in this or a later pass;
//! * `taken` — pages whose dirty bit it consumed from the source's log
//!   ([`MigrationSource::take_dirty_log`]) and whose transfer *after* that has not been
//!   acknowledged yet.
//!
//! Taking the log adds its pages to both sets. Sending a batch removes its pages from
//! `to_send` only; the batch is remembered with its sequence number. When the destination
//! acknowledges a frame (acknowledgements are cumulative and arrive only after the frame was
//! fully applied), the pages of every batch up to it leave `taken` — unless they are in
//! `to_send` again. The log is only taken when no batch is in flight, so a page cannot be
//! re-dirtied between being sent and the acknowledgement clearing it without also being in
//! `to_send`. So at every moment, each page written since logging started is in the
//! source's log, in `taken`, or acknowledged by the destination with its latest content.
//!
//! On any failure before the destination's commit, the sender gives every page in `taken`
//! back to the source ([`MigrationSource::restore_dirty_log`]), cancels the SEV-ES send
//! session, and resumes the source if it paused it: the source runs as before and its dirty
//! log again names every page the failed migration had consumed without confirmation.
//!
//! ## The commit and the in-doubt window
//! The destination commits when it receives `Complete` with everything in place, then sends
//! `Committed`; the sender then marks the source dead. If the connection fails after
//! `Complete` was written but before `Committed` (or an `Error`) came back, the destination
//! may or may not have committed. Resuming the source could run the guest twice, so the
//! sender leaves it paused and returns [`SendError::InDoubt`]; the VMM resolves it by asking
//! the destination (resume the source only if the destination did not commit).
//!
//! ## Post-copy
//! With [`SenderConfig::postcopy_after`] (after that many pre-copy passes) or on
//! [`LiveLimits::request_postcopy`] (which also ends the current pass early), and only if the
//! destination offered [`CAP_POSTCOPY`], the sender switches instead of stop-and-copy: it
//! pauses the source, takes the last dirty log, and sends `PostcopySwitch` (the pages not yet
//! transferred), the device and vCPU states and `PostcopyRun`. The destination starts the
//! guest on `PostcopyRun`; the sender then sends every remaining page exactly once — pages
//! named by the destination's `PageRequest` frames first, the rest in ascending order — in
//! small frames with a small window ([`SenderConfig::postcopy_pages_per_frame`],
//! [`SenderConfig::postcopy_window_frames`]) so that a request waits behind little data, and
//! finishes with `Complete` (SEV-ES: the finish blob) and the commit handshake.
//!
//! Failure semantics: before `PostcopyRun` was written, as above (the source resumes). Once
//! it was written, the guest may run at the destination, so the source must never run
//! again, and the destination lacks pages only the source has: neither side holds the whole
//! guest. Any failure then (cut, refusal, timeout, cancel) tells the destination (`Abort`, if
//! the connection still works), leaves the source paused, and returns
//! [`SendError::PostcopyFailed`]: the guest is lost. A cancel after the switch has no
//! effect (as after `Complete`): finishing is the only outcome that keeps the guest.

use crate::bitmap::{BitmapError, PageSet};
use crate::progress::{Phase, Progress};
use crate::protocol::{
    decode_error, decode_seq, encode_config, encode_packet_table, encode_page_table,
    encode_vcpu_prefix, truncate_text, ErrorCode, Frame, FrameType, FrameWriter, Hello, HelloAck,
    PacketEntry, PageRun, PassEnd, PollReader, PostcopySwitch, ProtocolError, CAP_POSTCOPY,
    CAP_SEV_ES, CRC_CHUNK, HEADER_LEN, MAX_BLOB_LEN, MAX_MEM_SIZE, MAX_PACKET_LEN,
    MAX_PAGES_PER_FRAME, MAX_TEXT_LEN, MAX_VCPUS, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    TABLE_ENTRY_LEN,
};
use crate::rate::{LiveLimits, Pacer, PACE_CHECK_INTERVAL};
use crate::source::{MigrationSource, SourceError};
use crate::stream::MigrationStream;
use crate::{CancelToken, GuestType, MigrationConfig, PAGE_SIZE};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use thiserror::Error;

/// What to do when pre-copy hits the pass cap or the timeout without converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LimitPolicy {
    /// Give up: the source keeps running, the destination discards everything.
    Cancel,
    /// Stop the source anyway and copy what is left (downtime above the limit).
    Force,
}

/// Sender tuning.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Largest acceptable downtime estimate for stop-and-copy (default 300 ms).
    pub downtime_limit: Duration,
    /// Longest pre-copy phase, measured from the start of the migration (default none).
    pub timeout: Option<Duration>,
    /// Most pre-copy passes, the first full pass included (default 30).
    pub max_passes: u32,
    /// What to do at the pass cap or the timeout (default [`LimitPolicy::Cancel`]).
    pub on_limit: LimitPolicy,
    /// Pages per `Pages` frame (default and maximum 1024 = 4 MiB: fewer, larger writes
    /// matter more than finer acknowledgements).
    pub pages_per_frame: u32,
    /// Most unacknowledged bytes in flight before the sender waits (default 64 MiB).
    pub window_bytes: u64,
    /// Longest wait for the destination (default 60 s); [`Sender::run_tcp`] also uses it as
    /// the socket's write timeout.
    pub io_timeout: Duration,
    /// [`Sender::run_tcp`]'s read timeout: how often a waiting sender checks for cancel.
    pub poll_interval: Duration,
    /// Least time between two progress reports within a pass (default 100 ms).
    pub progress_interval: Duration,
    /// Bandwidth cap in bytes per second over every frame written (default none). Changeable
    /// during the migration through [`Sender::limits`], like the downtime limit.
    pub max_bandwidth: Option<u64>,
    /// Switch to post-copy after this many pre-copy passes (0: before the first pass)
    /// instead of waiting for convergence (default none: pre-copy only). The destination
    /// must offer post-copy, or the migration fails at the handshake.
    pub postcopy_after: Option<u32>,
    /// Pages per frame during post-copy (default 32 = 128 KiB): a demand request waits
    /// behind at most [`postcopy_window_frames`](Self::postcopy_window_frames) such frames.
    pub postcopy_pages_per_frame: u32,
    /// Most unacknowledged frames during post-copy (default 2).
    pub postcopy_window_frames: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            downtime_limit: Duration::from_millis(300),
            timeout: None,
            max_passes: 30,
            on_limit: LimitPolicy::Cancel,
            pages_per_frame: MAX_PAGES_PER_FRAME,
            window_bytes: 64 << 20,
            io_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(20),
            progress_interval: Duration::from_millis(100),
            max_bandwidth: None,
            postcopy_after: None,
            postcopy_pages_per_frame: 32,
            postcopy_window_frames: 2,
        }
    }
}

/// What post-copy did (part of [`SendOutcome`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PostcopySent {
    /// From the start of the migration until the destination confirmed that the guest runs
    /// there.
    pub switch_time: Duration,
    /// Pages that were still missing at the destination when its guest started.
    pub pages_at_switch: u64,
    /// Pages the destination requested because its guest faulted on them.
    pub requests: u64,
    /// Requested pages that were still unsent when the request arrived (and jumped the
    /// queue).
    pub requests_served: u64,
}

/// What a successful migration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SendOutcome {
    /// Memory passes, the final stop-and-copy pass included.
    pub passes: u32,
    /// Whether the downtime estimate fitted the limit before stopping.
    pub converged: bool,
    /// Whether the pass cap or the timeout forced stop-and-copy.
    pub forced: bool,
    pub pages_sent: u64,
    /// Bytes written to the connection, headers included.
    pub bytes_sent: u64,
    /// Pages sent while the source was paused.
    pub final_pass_pages: u64,
    /// Bandwidth of the first (full) pass, bytes per second.
    pub first_pass_bandwidth: f64,
    /// Bandwidth over all pre-copy passes, bytes per second.
    pub bandwidth: f64,
    pub total_time: Duration,
    /// The downtime estimate when pre-copy stopped (`None` if nothing had been measured).
    pub estimated_downtime: Option<Duration>,
    /// From pausing the source to receiving the destination's commit (post-copy: to the
    /// destination's confirmation that the guest runs there).
    pub downtime: Duration,
    /// Post-copy figures, if the migration switched to post-copy.
    pub postcopy: Option<PostcopySent>,
}

#[derive(Debug, Error)]
pub enum SendError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("source VM: {0}")]
    Source(#[from] SourceError),
    #[error("source VM: {0}")]
    Bitmap(#[from] BitmapError),
    #[error("the destination refused the migration ({code}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the destination is not compatible: {0}")]
    Incompatible(String),
    #[error("unexpected response from the destination: {0}")]
    UnexpectedResponse(String),
    #[error("the migration was cancelled")]
    Cancelled,
    #[error(
        "pre-copy did not converge before {limit}: {remaining_pages} dirty pages left after \
         {passes} passes, estimated downtime {estimate} exceeds the {downtime_limit_ms} ms \
         limit; raise the downtime limit (--downtime-ms), the timeout (--timeout-s) or the \
         pass cap (--max-passes), or force the final copy anyway (--force-on-timeout)"
    )]
    NotConverged {
        limit: &'static str,
        passes: u32,
        remaining_pages: u64,
        estimate: String,
        downtime_limit_ms: u128,
    },
    #[error("the destination did not respond for {0:?}")]
    Timeout(Duration),
    #[error(
        "the destination did not answer the handshake within the migration's timeout ({} s): \
         is an esvm receive listening at that address? (a peer that accepts the connection \
         and says nothing is not one)",
        .0.as_secs_f64()
    )]
    HandshakeTimeout(Duration),
    #[error(
        "the connection failed after the commit request ({cause}); the destination may or \
         may not have committed, so the source stays paused: resume it only if the \
         destination did not commit"
    )]
    InDoubt { cause: Box<SendError> },
    #[error(
        "the destination cannot do post-copy (an older esvm, or a backend that needs every \
         page before the guest runs, such as kvm); migrate without --postcopy-after / ctl \
         postcopy"
    )]
    PostcopyUnsupported,
    #[error(
        "the migration failed after the switch to post-copy ({cause}): the guest ran on at \
         the destination, which lacks pages only this source had, so neither side holds the \
         whole guest; the source stays paused and must not resume: the guest is lost"
    )]
    PostcopyFailed { cause: Box<SendError> },
    #[error("{cause}; recovering the source also failed: {recovery}")]
    RecoveryFailed {
        cause: Box<SendError>,
        recovery: String,
    },
}

impl SendError {
    /// Whether the commit outcome is unknown (the source was left paused).
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, SendError::InDoubt { .. })
    }

    /// Whether the migration failed after the switch to post-copy (the source was left
    /// paused and must never run again; the guest is lost).
    pub fn is_postcopy_lost(&self) -> bool {
        match self {
            SendError::PostcopyFailed { .. } => true,
            SendError::RecoveryFailed { cause, .. } => cause.is_postcopy_lost(),
            _ => false,
        }
    }
}

type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// Under a bandwidth cap, a `Pages` frame carries at most about this much transfer time.
pub const CAPPED_FRAME_TIME: Duration = Duration::from_millis(100);

/// Most unacknowledged frames in flight, whatever their size.
pub const MAX_FRAMES_IN_FLIGHT: usize = 256;

/// The source's side of a migration.
pub struct Sender {
    config: SenderConfig,
    cancel: CancelToken,
    limits: LiveLimits,
    on_progress: Option<ProgressFn>,
}

impl Sender {
    pub fn new(config: SenderConfig) -> Self {
        Sender {
            limits: LiveLimits::new(config.max_bandwidth, config.downtime_limit),
            config,
            cancel: CancelToken::new(),
            on_progress: None,
        }
    }

    pub fn config(&self) -> &SenderConfig {
        &self.config
    }

    /// The bandwidth cap and downtime limit, changeable from any thread while the migration
    /// runs (they start as the config's `max_bandwidth` and `downtime_limit`).
    pub fn limits(&self) -> LiveLimits {
        self.limits.clone()
    }

    /// A token that cancels this sender from any thread.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Receive a [`Progress`] snapshot at phase changes, pass ends and at most every
    /// `progress_interval` within a pass.
    pub fn on_progress(&mut self, f: impl FnMut(&Progress) + Send + 'static) {
        self.on_progress = Some(Box::new(f));
    }

    /// Migrate over a connected TCP stream: [`Sender::run_stream`].
    pub fn run_tcp<S: MigrationSource + ?Sized>(
        &mut self,
        source: &mut S,
        stream: TcpStream,
    ) -> Result<SendOutcome, SendError> {
        self.run_stream(source, stream.into())
    }

    /// Migrate over a connected TCP or Unix stream (sets the socket timeouts, and
    /// TCP_NODELAY on TCP; shuts the stream down at the end).
    pub fn run_stream<S: MigrationSource + ?Sized>(
        &mut self,
        source: &mut S,
        stream: MigrationStream,
    ) -> Result<SendOutcome, SendError> {
        let poll = self.config.poll_interval.max(Duration::from_millis(1));
        let io = self.config.io_timeout.max(Duration::from_millis(1));
        let setup = stream.configure(poll, io).and_then(|()| stream.try_clone());
        let reader = setup.map_err(|e| SendError::Protocol(ProtocolError::Io(e)))?;
        let result = self.run(source, reader, &stream);
        if result.is_err() {
            // Closing with unread acknowledgements queued would send a reset, which can
            // destroy our Abort frame before the destination reads it. Half-close instead
            // and read until the destination hangs up (briefly).
            let _ = stream.shutdown(Shutdown::Write);
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut buf = [0u8; 4096];
            let mut r = &stream;
            while Instant::now() < deadline {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => break,
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Both);
        result
    }

    /// Migrate `source`, reading responses from `reader` and writing frames to `writer`.
    /// `reader` may time out (`WouldBlock`/`TimedOut`): the sender then checks for cancel and
    /// its deadlines and reads on.
    pub fn run<S: MigrationSource + ?Sized, R: Read, W: Write>(
        &mut self,
        source: &mut S,
        reader: R,
        writer: W,
    ) -> Result<SendOutcome, SendError> {
        let now = Instant::now();
        let mut s = Session {
            cfg: &self.config,
            cancel: &self.cancel,
            limits: &self.limits,
            pacer: Pacer::new(),
            on_progress: &mut self.on_progress,
            source,
            w: FrameWriter::new(writer),
            r: PollReader::responses(reader),
            guest: None,
            mem_pages: 0,
            to_send: PageSet::new(0),
            taken: PageSet::new(0),
            in_flight: VecDeque::new(),
            outstanding: 0,
            dirty_started: false,
            sev_started: false,
            paused: false,
            complete_sent: false,
            postcopy_peer: false,
            switched: false,
            demand: Vec::new(),
            requests: 0,
            requests_served: 0,
            progress: Progress::new(
                self.limits.downtime_limit().as_secs_f64() * 1e3,
                self.limits.max_bandwidth(),
            ),
            start: now,
            last_report: now,
            xfer_bytes: 0,
            xfer_secs: 0.0,
            last_pass_bandwidth: 0.0,
            packet_bytes: 0,
            packets: 0,
            page_buf: Vec::new(),
            table: Vec::new(),
            runs: Vec::new(),
            entries: Vec::new(),
        };
        match s.migrate() {
            Ok(o) => Ok(o),
            Err(e) => {
                let e = s.recover(e);
                s.set_phase(Phase::Failed);
                Err(e)
            }
        }
    }
}

/// A batch in flight: its frame's sequence number, wire size and pages.
struct InFlight {
    seq: u64,
    bytes: u64,
    runs: Vec<PageRun>,
}

struct Session<'a, S: MigrationSource + ?Sized, R: Read, W: Write> {
    cfg: &'a SenderConfig,
    cancel: &'a CancelToken,
    limits: &'a LiveLimits,
    pacer: Pacer,
    on_progress: &'a mut Option<ProgressFn>,
    source: &'a mut S,
    w: FrameWriter<W>,
    r: PollReader<R>,
    guest: Option<MigrationConfig>,
    mem_pages: u64,
    to_send: PageSet,
    taken: PageSet,
    in_flight: VecDeque<InFlight>,
    outstanding: u64,
    dirty_started: bool,
    sev_started: bool,
    paused: bool,
    complete_sent: bool,
    /// The destination offered post-copy.
    postcopy_peer: bool,
    /// `PostcopyRun` was written: the source must never resume (see the module docs).
    switched: bool,
    /// Post-copy: pages the destination requested, not yet looked at.
    demand: Vec<u64>,
    requests: u64,
    requests_served: u64,
    progress: Progress,
    start: Instant,
    last_report: Instant,
    /// Bytes and seconds of the pre-copy passes, for the bandwidth.
    xfer_bytes: u64,
    xfer_secs: f64,
    last_pass_bandwidth: f64,
    /// SEV-ES packets sent, for the per-page size estimate.
    packet_bytes: u64,
    packets: u64,
    page_buf: Vec<u8>,
    table: Vec<u8>,
    runs: Vec<PageRun>,
    entries: Vec<PacketEntry>,
}

fn unexpected(t: FrameType, wanted: &str) -> SendError {
    SendError::UnexpectedResponse(format!("a {t} frame while waiting for {wanted}"))
}

impl<S: MigrationSource + ?Sized, R: Read, W: Write> Session<'_, S, R, W> {
    fn vm_type(&self) -> GuestType {
        self.guest
            .as_ref()
            .map(|g| g.vm_type)
            .unwrap_or(GuestType::Plain)
    }

    fn migrate(&mut self) -> Result<SendOutcome, SendError> {
        self.set_phase(Phase::Handshake);
        self.w.send(FrameType::Hello, &[&Hello::ours().encode()])?;
        let f = self.wait_frame(true)?;
        if f.header.frame_type != FrameType::HelloAck {
            return Err(unexpected(f.header.frame_type, "HelloAck"));
        }
        let hello = HelloAck::decode(&f.payload)?;
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
            return Err(SendError::Incompatible(format!(
                "the destination chose protocol version {}, this source speaks \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                hello.version
            )));
        }

        let guest = self.source.config();
        check_guest_config(&guest)?;
        if guest.vm_type == GuestType::SevEs && hello.capabilities & CAP_SEV_ES == 0 {
            return Err(SendError::Incompatible(
                "the destination cannot receive SEV-ES guests".into(),
            ));
        }
        self.postcopy_peer = hello.capabilities & CAP_POSTCOPY != 0;
        if self.cfg.postcopy_after.is_some() && !self.postcopy_peer {
            return Err(SendError::PostcopyUnsupported);
        }
        self.mem_pages = guest.pages();
        self.progress.mem_pages = self.mem_pages;
        self.to_send = PageSet::new(self.mem_pages);
        self.taken = PageSet::new(self.mem_pages);
        self.w.send(FrameType::Config, &[&encode_config(&guest)])?;
        let f = self.wait_frame(true)?;
        if f.header.frame_type != FrameType::ConfigAck {
            return Err(unexpected(f.header.frame_type, "ConfigAck"));
        }
        let certs = f.payload;
        let vcpus = guest.vcpus;
        self.guest = Some(guest);
        if self.vm_type() == GuestType::SevEs {
            let blob = self.source.sev_send_start(&certs)?;
            self.sev_started = true;
            self.pace((HEADER_LEN + blob.len()) as u64)?;
            let seq = self.w.send(FrameType::SevSession, &[&blob])?;
            self.track(seq, (HEADER_LEN + blob.len()) as u64, Vec::new());
            self.drain_all(true)?;
        }

        // Pre-copy.
        self.source.start_dirty_log()?;
        self.dirty_started = true;
        self.to_send = match self.source.written_pages()? {
            Some(set) => {
                set.check_size(self.mem_pages)?;
                set
            }
            None => PageSet::full(self.mem_pages),
        };
        self.set_phase(Phase::PreCopy);
        let mut pass = 0u32;
        let mut converged = false;
        let mut forced = false;
        let mut first_pass_bandwidth = 0.0;
        let mut last_estimate = None;
        let mut postcopy = self.postcopy_due(0)?;
        while !postcopy {
            pass += 1;
            let t0 = Instant::now();
            let b0 = self.w.bytes_written();
            let interrupted = self.send_pass(pass, false)?;
            self.drain_all(true)?;
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            let bytes = self.w.bytes_written() - b0;
            self.xfer_bytes += bytes;
            self.xfer_secs += secs;
            self.last_pass_bandwidth = bytes as f64 / secs;
            if pass == 1 {
                first_pass_bandwidth = bytes as f64 / secs;
            }
            // Nothing is in flight now, so taking the log is safe (see the module docs).
            let dirtied = self.take_log()?;
            let remaining = self.to_send.count();
            let estimate = self.estimate(remaining);
            last_estimate = estimate;
            self.progress.dirty_pages_per_sec = dirtied as f64 / secs;
            self.progress.pages_remaining = remaining;
            self.progress.bandwidth_bytes_per_sec = self.bandwidth();
            self.progress.estimated_downtime_ms = estimate.map(|d| d.as_secs_f64() * 1e3);
            self.report(true);
            if self.cancel.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            if self.postcopy_due(pass)? {
                postcopy = true;
                break;
            }
            if interrupted {
                forced = true;
                break;
            }
            if estimate.is_some_and(|e| e <= self.limits.downtime_limit()) {
                converged = true;
                break;
            }
            let limit = if pass >= self.cfg.max_passes {
                Some("the pass cap")
            } else if self.timed_out() {
                Some("the timeout")
            } else {
                None
            };
            if let Some(limit) = limit {
                match self.cfg.on_limit {
                    LimitPolicy::Cancel => return Err(self.not_converged(limit, pass)),
                    LimitPolicy::Force => {
                        forced = true;
                        break;
                    }
                }
            }
        }

        if postcopy {
            let mut o = self.postcopy(pass)?;
            o.first_pass_bandwidth = first_pass_bandwidth;
            o.estimated_downtime = last_estimate;
            return Ok(o);
        }

        // Stop-and-copy.
        self.set_phase(Phase::StopAndCopy);
        let paused_at = Instant::now();
        // Marked first: a pause that fails part-way is undone by resume() in recover().
        self.paused = true;
        self.source.pause()?;
        self.take_log()?;
        pass += 1;
        let final_pass_pages = self.to_send.count();
        self.send_pass(pass, true)?;
        self.send_states(vcpus)?;
        if self.cancel.is_cancelled() {
            return Err(SendError::Cancelled);
        }

        // Commit.
        self.commit(false)?;
        let downtime = paused_at.elapsed();
        self.source.mark_dead();
        self.paused = false;
        self.set_phase(Phase::Completed);
        Ok(SendOutcome {
            passes: pass,
            converged,
            forced,
            pages_sent: self.progress.pages_sent,
            bytes_sent: self.w.bytes_written(),
            final_pass_pages,
            first_pass_bandwidth,
            bandwidth: if self.xfer_secs > 0.0 {
                self.xfer_bytes as f64 / self.xfer_secs
            } else {
                0.0
            },
            total_time: self.start.elapsed(),
            estimated_downtime: last_estimate,
            downtime,
            postcopy: None,
        })
    }

    /// The commit handshake: send `Complete` (with the SEV-ES finish blob) and wait for
    /// `Committed`. After post-copy (`postcopy`), late page requests for pages already sent
    /// may still arrive and are ignored.
    fn commit(&mut self, postcopy: bool) -> Result<(), SendError> {
        self.set_phase(Phase::Committing);
        let finish = match self.vm_type() {
            GuestType::SevEs => self.source.sev_finish_blob()?,
            GuestType::Plain => Vec::new(),
        };
        let complete_seq = self.w.send(FrameType::Complete, &[&finish])?;
        self.complete_sent = true;
        self.track(complete_seq, (HEADER_LEN + finish.len()) as u64, Vec::new());
        self.w.flush()?;
        loop {
            let f = self.wait_frame(false)?;
            match f.header.frame_type {
                FrameType::Ack => {
                    let s = decode_seq(FrameType::Ack, &f.payload)?;
                    self.ack_up_to(s)?;
                }
                // Late requests for pages already sent: nothing to do.
                FrameType::PageRequest if postcopy => {
                    self.note_requests(&f.payload)?;
                }
                FrameType::Committed => {
                    let s = decode_seq(FrameType::Committed, &f.payload)?;
                    if s != complete_seq {
                        return Err(SendError::UnexpectedResponse(format!(
                            "commit of frame #{s}, but Complete was frame #{complete_seq}"
                        )));
                    }
                    self.ack_up_to(s)?;
                    break;
                }
                other => return Err(unexpected(other, "Committed")),
            }
        }
        Ok(())
    }

    /// Send the device state and every vCPU's state (the source is paused).
    fn send_states(&mut self, vcpus: u32) -> Result<(), SendError> {
        let state = self.source.device_state()?;
        self.pace((HEADER_LEN + state.len()) as u64)?;
        let seq = self.w.send(FrameType::DeviceState, &[&state])?;
        self.track(seq, (HEADER_LEN + state.len()) as u64, Vec::new());
        self.wait_window(true)?;
        for v in 0..vcpus {
            let st = self.source.vcpu_state(v)?;
            self.pace((HEADER_LEN + 8 + st.len()) as u64)?;
            let seq = self
                .w
                .send(FrameType::VcpuState, &[&encode_vcpu_prefix(v), &st])?;
            self.track(seq, (HEADER_LEN + 8 + st.len()) as u64, Vec::new());
            self.wait_window(true)?;
        }
        Ok(())
    }

    /// Whether to switch to post-copy now, `passes` pre-copy passes being done: configured
    /// after that many passes, or requested live. A request to a destination without
    /// post-copy fails the migration (before any switch: the source keeps running).
    fn postcopy_due(&self, passes: u32) -> Result<bool, SendError> {
        let due = self.cfg.postcopy_after.is_some_and(|n| passes >= n)
            || self.limits.postcopy_requested();
        if due && !self.postcopy_peer {
            return Err(SendError::PostcopyUnsupported);
        }
        Ok(due)
    }

    /// The switch and the post-copy phase (see the module docs); `pass` pre-copy passes are
    /// done.
    fn postcopy(&mut self, mut pass: u32) -> Result<SendOutcome, SendError> {
        let vcpus = self.guest.as_ref().map(|g| g.vcpus).unwrap_or(0);
        self.set_phase(Phase::StopAndCopy);
        let paused_at = Instant::now();
        self.paused = true;
        self.source.pause()?;
        self.take_log()?;
        pass += 1;
        let pending = self.to_send.clone();
        let pages_at_switch = pending.count();
        let sw = PostcopySwitch { pass, pending }.encode();
        self.pace((HEADER_LEN + sw.len()) as u64)?;
        let seq = self.w.send(FrameType::PostcopySwitch, &[&sw])?;
        self.track(seq, (HEADER_LEN + sw.len()) as u64, Vec::new());
        self.send_states(vcpus)?;
        if self.cancel.is_cancelled() {
            return Err(SendError::Cancelled);
        }
        self.pace(HEADER_LEN as u64)?;
        let seq = self.w.send(FrameType::PostcopyRun, &[])?;
        // Point of no return for the source: the destination may start the guest now.
        self.switched = true;
        self.track(seq, HEADER_LEN as u64, Vec::new());
        self.w.flush()?;
        // The destination acknowledges PostcopyRun once its guest runs.
        while !self.in_flight.is_empty() {
            self.postcopy_wait()?;
        }
        let downtime = paused_at.elapsed();
        let switch_time = self.start.elapsed();
        self.progress.postcopy_switch_ms = Some(switch_time.as_millis() as u64);
        self.progress.pass = pass;
        self.progress.pass_pages_total = pages_at_switch;
        self.progress.pass_pages_sent = 0;
        self.progress.pages_remaining = pages_at_switch;
        self.set_phase(Phase::PostCopy);

        // From here on a cancel has no effect (as after `Complete`): stopping now would lose
        // the guest, which runs at the destination; finishing is the only good outcome.
        let mut cursor = 0u64;
        let mut sent = 0u64;
        loop {
            let per_frame = self.frame_pages().min(
                self.cfg
                    .postcopy_pages_per_frame
                    .clamp(1, MAX_PAGES_PER_FRAME) as u64,
            );
            self.runs.clear();
            let mut n = 0u64;
            // Requested pages first, in a frame of their own (runs must ascend).
            self.demand.sort_unstable();
            self.demand.dedup();
            let mut keep = Vec::new();
            for &p in &self.demand {
                if !self.to_send.is_set(p) {
                    continue;
                }
                if n >= per_frame {
                    keep.push(p);
                    continue;
                }
                self.requests_served += 1;
                match self.runs.last_mut() {
                    Some(r) if r.first + r.count as u64 == p => r.count += 1,
                    _ => self.runs.push(PageRun { first: p, count: 1 }),
                }
                n += 1;
            }
            self.demand = keep;
            if n == 0 {
                // No request waiting: the next pages in background order.
                n = self.take_runs(&mut cursor, per_frame);
            }
            if n == 0 {
                break;
            }
            self.send_runs(pass, n, &mut sent, pages_at_switch)?;
            while self.in_flight.len() > self.cfg.postcopy_window_frames.max(1) {
                self.postcopy_wait()?;
            }
        }
        while !self.in_flight.is_empty() {
            self.postcopy_wait()?;
        }

        self.commit(true)?;
        self.source.mark_dead();
        self.paused = false;
        self.set_phase(Phase::Completed);
        Ok(SendOutcome {
            passes: pass,
            converged: false,
            forced: false,
            pages_sent: self.progress.pages_sent,
            bytes_sent: self.w.bytes_written(),
            final_pass_pages: pages_at_switch,
            first_pass_bandwidth: 0.0,
            bandwidth: if self.xfer_secs > 0.0 {
                self.xfer_bytes as f64 / self.xfer_secs
            } else {
                0.0
            },
            total_time: self.start.elapsed(),
            estimated_downtime: None,
            downtime,
            postcopy: Some(PostcopySent {
                switch_time,
                pages_at_switch,
                requests: self.requests,
                requests_served: self.requests_served,
            }),
        })
    }

    /// Post-copy: read one response — an acknowledgement or a page request. Not
    /// cancellable (see [`Session::postcopy`]).
    fn postcopy_wait(&mut self) -> Result<(), SendError> {
        let f = self.wait_frame(false)?;
        match f.header.frame_type {
            FrameType::Ack => {
                let s = decode_seq(FrameType::Ack, &f.payload)?;
                self.ack_up_to(s)
            }
            FrameType::PageRequest => self.note_requests(&f.payload),
            other => Err(unexpected(other, "Ack or PageRequest")),
        }
    }

    fn note_requests(&mut self, payload: &[u8]) -> Result<(), SendError> {
        if !self.switched {
            return Err(SendError::UnexpectedResponse(
                "a PageRequest before the switch to post-copy".into(),
            ));
        }
        let pages = crate::protocol::decode_page_request(payload, self.mem_pages)?;
        self.requests += pages.len() as u64;
        self.progress.postcopy_requests = self.requests;
        self.demand.extend(pages);
        Ok(())
    }

    /// Append to `self.runs` the runs of `to_send` from `cursor` on, up to `per_frame` pages
    /// in all (counting the runs already there); move `cursor` past them. Returns the page
    /// count of `self.runs`.
    fn take_runs(&mut self, cursor: &mut u64, per_frame: u64) -> u64 {
        let mut n: u64 = self.runs.iter().map(|r| r.count as u64).sum();
        while n < per_frame {
            let Some(p) = self.to_send.next_set(*cursor) else {
                break;
            };
            let len = self.to_send.run_len(p, per_frame - n);
            self.runs.push(PageRun {
                first: p,
                count: len as u32,
            });
            n += len;
            *cursor = p + len;
        }
        n
    }

    /// Send every page in `to_send`, then `PassEnd`. Returns true if a timeout under the
    /// Force policy cut the pass short (the unsent pages stay in `to_send`).
    fn send_pass(&mut self, pass: u32, final_pass: bool) -> Result<bool, SendError> {
        let scheduled = self.to_send.count();
        self.progress.pass = pass;
        self.progress.pass_pages_total = scheduled;
        self.progress.pass_pages_sent = 0;
        self.progress.pages_remaining = scheduled;
        self.report(true);
        let mut cursor = 0u64;
        let mut sent = 0u64;
        let mut interrupted = false;
        loop {
            if self.cancel.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            if !final_pass && self.limits.postcopy_requested() && self.postcopy_peer {
                interrupted = true;
                break;
            }
            if !final_pass && self.timed_out() {
                match self.cfg.on_limit {
                    LimitPolicy::Cancel => return Err(self.not_converged("the timeout", pass)),
                    LimitPolicy::Force => {
                        interrupted = true;
                        break;
                    }
                }
            }
            let per_frame = self.frame_pages();
            self.runs.clear();
            let n = self.take_runs(&mut cursor, per_frame);
            if n == 0 {
                break;
            }
            self.send_runs(pass, n, &mut sent, scheduled)?;
            self.wait_window(true)?;
        }
        self.pace(HEADER_LEN as u64 + 16)?;
        let seq = self.w.send(
            FrameType::PassEnd,
            &[&PassEnd {
                pass,
                final_pass,
                pages: sent,
            }
            .encode()],
        )?;
        self.track(seq, HEADER_LEN as u64 + 16, Vec::new());
        Ok(interrupted)
    }

    /// Send the `n` pages of `self.runs` (plaintext or SEV-ES packets) and count them:
    /// `sent` of `scheduled` pages are then out.
    fn send_runs(
        &mut self,
        pass: u32,
        n: u64,
        sent: &mut u64,
        scheduled: u64,
    ) -> Result<(), SendError> {
        match self.vm_type() {
            GuestType::Plain => self.send_plain_batch(pass, n)?,
            GuestType::SevEs => self.send_sev_batch(pass)?,
        }
        *sent += n;
        self.progress.pass_pages_sent = *sent;
        self.progress.pages_sent += n;
        self.progress.pages_remaining = scheduled.saturating_sub(*sent);
        self.report(false);
        Ok(())
    }

    fn send_plain_batch(&mut self, pass: u32, pages: u64) -> Result<(), SendError> {
        encode_page_table(pass, &self.runs, &mut self.table);
        let data_len = pages * PAGE_SIZE;
        self.pace((HEADER_LEN + self.table.len()) as u64 + data_len)?;
        // While paused nothing writes guest memory, so the source's own pages can go out
        // without a copy (checksum and data then agree). While running we send a copy, so
        // the checksum covers exactly the bytes on the wire.
        let zero_copy = self.paused
            && self.runs.iter().all(|r| {
                self.source
                    .paused_pages(r.first, r.count as u64)
                    .is_some_and(|s| s.len() as u64 == r.count as u64 * PAGE_SIZE)
            });
        let seq = if zero_copy {
            let src: &S = self.source;
            let mut parts: Vec<&[u8]> = Vec::with_capacity(self.runs.len() + 1);
            parts.push(&self.table);
            for r in &self.runs {
                match src.paused_pages(r.first, r.count as u64) {
                    Some(s) if s.len() as u64 == r.count as u64 * PAGE_SIZE => parts.push(s),
                    _ => {
                        return Err(SendError::Source(SourceError::failed(format!(
                            "paused_pages({}, {}) changed its answer",
                            r.first, r.count
                        ))))
                    }
                }
            }
            self.w.send(FrameType::Pages, &parts)?
        } else {
            self.page_buf.resize(data_len as usize, 0);
            let mut crc = crc32c::crc32c(&self.table);
            let mut off = 0usize;
            let chunk_pages = (CRC_CHUNK / PAGE_SIZE as usize) as u64;
            for r in &self.runs {
                let end = r.first + r.count as u64;
                let mut page = r.first;
                while page < end {
                    let n = chunk_pages.min(end - page);
                    let len = (n * PAGE_SIZE) as usize;
                    let piece = &mut self.page_buf[off..off + len];
                    self.source.read_pages(page, piece)?;
                    crc = crc32c::crc32c_append(crc, piece);
                    off += len;
                    page += n;
                }
            }
            self.w
                .send_with_crc(FrameType::Pages, &[&self.table, &self.page_buf[..off]], crc)?
        };
        for r in &self.runs {
            self.to_send.clear_range(r.first, r.count as u64);
        }
        let bytes = (HEADER_LEN + self.table.len()) as u64 + data_len;
        let runs = self.runs.clone();
        self.track(seq, bytes, runs);
        Ok(())
    }

    fn send_sev_batch(&mut self, pass: u32) -> Result<(), SendError> {
        self.page_buf.clear();
        self.entries.clear();
        for r in &self.runs {
            for page in r.first..r.first + r.count as u64 {
                let before = self.page_buf.len();
                self.source.sev_page_packet(page, &mut self.page_buf)?;
                let len = self.page_buf.len() - before;
                if len == 0 || len > MAX_PACKET_LEN as usize {
                    return Err(SendError::Source(SourceError::failed(format!(
                        "the transport packet for page {page} is {len} bytes; it must be \
                         1..={MAX_PACKET_LEN}"
                    ))));
                }
                self.entries.push(PacketEntry {
                    page,
                    len: len as u32,
                });
            }
        }
        encode_packet_table(pass, &self.entries, &mut self.table);
        self.pace((HEADER_LEN + self.table.len() + self.page_buf.len()) as u64)?;
        let seq = self
            .w
            .send(FrameType::SevPages, &[&self.table, &self.page_buf])?;
        self.packets += self.entries.len() as u64;
        self.packet_bytes += self.page_buf.len() as u64;
        for r in &self.runs {
            self.to_send.clear_range(r.first, r.count as u64);
        }
        let bytes = (HEADER_LEN + self.table.len() + self.page_buf.len()) as u64;
        let runs = self.runs.clone();
        self.track(seq, bytes, runs);
        Ok(())
    }

    /// Pages per `Pages` frame: the configured size, but under a bandwidth cap at most
    /// about [`CAPPED_FRAME_TIME`] worth of data, so that a low cap paces smoothly (and a
    /// changed cap applies soon) instead of in multi-second steps.
    fn frame_pages(&self) -> u64 {
        let mut pages = self.cfg.pages_per_frame.clamp(1, MAX_PAGES_PER_FRAME) as u64;
        if let Some(rate) = self.limits.max_bandwidth() {
            let fit = (rate as f64 * CAPPED_FRAME_TIME.as_secs_f64() / PAGE_SIZE as f64) as u64;
            pages = pages.min(fit.max(1));
        }
        pages
    }

    /// Wait until a frame of `bytes` may be written under the bandwidth cap (at once when
    /// there is none). The wait is re-timed when the cap changes meanwhile, and ends early
    /// with [`SendError::Cancelled`] on cancel.
    fn pace(&mut self, bytes: u64) -> Result<(), SendError> {
        if self.limits.max_bandwidth().is_none() {
            self.pacer.reset();
            return Ok(());
        }
        let start = self.pacer.slot_start(Instant::now());
        loop {
            let Some(rate) = self.limits.max_bandwidth() else {
                self.pacer.reset();
                return Ok(());
            };
            let end = Pacer::slot_end(start, bytes, rate);
            let now = Instant::now();
            if now >= end {
                self.pacer.sent(end);
                return Ok(());
            }
            if self.cancel.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            std::thread::sleep((end - now).min(PACE_CHECK_INTERVAL));
            self.report(false);
        }
    }

    fn track(&mut self, seq: u64, bytes: u64, runs: Vec<PageRun>) {
        self.outstanding += bytes;
        self.in_flight.push_back(InFlight { seq, bytes, runs });
    }

    /// Take the source's dirty log into `to_send` and `taken`; returns its page count.
    fn take_log(&mut self) -> Result<u64, SendError> {
        let log = self.source.take_dirty_log()?;
        log.check_size(self.mem_pages)?;
        self.to_send.union(&log);
        self.taken.union(&log);
        Ok(log.count())
    }

    /// Wait for acknowledgements while more than the window is in flight. The frame cap
    /// bounds the acknowledgements the destination may have queued for us to at most
    /// `MAX_FRAMES_IN_FLIGHT` x 40 bytes, far below any socket buffer, so neither side can
    /// block on a full buffer while the other waits for it.
    fn wait_window(&mut self, cancellable: bool) -> Result<(), SendError> {
        while self.outstanding > self.cfg.window_bytes
            || self.in_flight.len() > MAX_FRAMES_IN_FLIGHT
        {
            self.wait_ack(cancellable)?;
        }
        Ok(())
    }

    /// Wait until every frame sent so far is acknowledged.
    fn drain_all(&mut self, cancellable: bool) -> Result<(), SendError> {
        while !self.in_flight.is_empty() {
            self.wait_ack(cancellable)?;
        }
        Ok(())
    }

    fn wait_ack(&mut self, cancellable: bool) -> Result<(), SendError> {
        let f = self.wait_frame(cancellable)?;
        if f.header.frame_type != FrameType::Ack {
            return Err(unexpected(f.header.frame_type, "Ack"));
        }
        let s = decode_seq(FrameType::Ack, &f.payload)?;
        self.ack_up_to(s)
    }

    /// The destination fully processed every frame up to `seq`: their pages leave `taken`
    /// (unless pending again in `to_send`).
    fn ack_up_to(&mut self, seq: u64) -> Result<(), SendError> {
        let oldest = self.in_flight.front().map(|f| f.seq);
        match oldest {
            Some(o) if seq >= o && seq < self.w.next_seq() => {}
            _ => {
                return Err(SendError::UnexpectedResponse(format!(
                    "acknowledgement of frame #{seq}, but the oldest unacknowledged frame is \
                     {oldest:?} and the newest sent #{}",
                    self.w.next_seq().saturating_sub(1)
                )))
            }
        }
        while let Some(f) = self.in_flight.front() {
            if f.seq > seq {
                break;
            }
            if let Some(f) = self.in_flight.pop_front() {
                self.outstanding -= f.bytes;
                for r in &f.runs {
                    self.taken
                        .clear_range_unless(r.first, r.count as u64, &self.to_send);
                }
            }
        }
        Ok(())
    }

    /// The next response; an `Error` frame becomes [`SendError::Refused`].
    fn wait_frame(&mut self, cancellable: bool) -> Result<Frame, SendError> {
        let mut deadline = Instant::now() + self.cfg.io_timeout;
        // The handshake is part of the migration: its timeout bounds it too, so a peer that
        // accepts and stays silent fails the migration at the timeout, not the I/O timeout.
        let mut handshake_timeout = None;
        if self.progress.phase == Phase::Handshake {
            if let Some(t) = self.cfg.timeout {
                if self.start + t < deadline {
                    deadline = self.start + t;
                    handshake_timeout = Some(t);
                }
            }
        }
        loop {
            if let Some(f) = self.r.poll()? {
                let t = f.header.frame_type;
                if t == FrameType::Error {
                    let (code, message) = decode_error(&f.payload)?;
                    return Err(SendError::Refused { code, message });
                }
                if t.from_source() {
                    return Err(SendError::UnexpectedResponse(format!(
                        "a {t} frame, which only a source sends"
                    )));
                }
                return Ok(f);
            }
            if cancellable && self.cancel.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            if Instant::now() >= deadline {
                return Err(match handshake_timeout {
                    Some(t) => SendError::HandshakeTimeout(t),
                    None => SendError::Timeout(self.cfg.io_timeout),
                });
            }
        }
    }

    fn timed_out(&self) -> bool {
        self.cfg.timeout.is_some_and(|t| self.start.elapsed() >= t)
    }

    /// The bandwidth the downtime estimate uses: the lower of the average over all passes and
    /// the last pass's. The last pass resembles the final one (scattered dirty pages, a
    /// round trip at its end), which streams slower than the full first pass that
    /// dominates the average.
    ///
    /// Under a bandwidth cap, the estimate never assumes more than the cap (it may have been
    /// lowered since the last pass): a cap makes convergence harder, as a slower link would.
    fn bandwidth(&self) -> f64 {
        if self.xfer_secs > 0.0 {
            let average = self.xfer_bytes as f64 / self.xfer_secs;
            capped(
                average.min(self.last_pass_bandwidth),
                self.limits.max_bandwidth(),
            )
        } else {
            0.0
        }
    }

    /// Estimated time to send `remaining` pages at the measured bandwidth; `None` before
    /// anything was measured.
    fn estimate(&self, remaining: u64) -> Option<Duration> {
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        let bw = self.bandwidth();
        if bw <= 0.0 {
            return None;
        }
        let per_page = match self.vm_type() {
            GuestType::Plain => PAGE_SIZE as f64,
            GuestType::SevEs if self.packets > 0 => self.packet_bytes as f64 / self.packets as f64,
            GuestType::SevEs => PAGE_SIZE as f64 + 64.0,
        } + TABLE_ENTRY_LEN as f64;
        Some(Duration::try_from_secs_f64(remaining as f64 * per_page / bw).unwrap_or(Duration::MAX))
    }

    fn not_converged(&self, limit: &'static str, passes: u32) -> SendError {
        let remaining = self.to_send.count();
        SendError::NotConverged {
            limit,
            passes,
            remaining_pages: remaining,
            estimate: match self.estimate(remaining) {
                Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
                None => "unknown".into(),
            },
            downtime_limit_ms: self.limits.downtime_limit().as_millis(),
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.progress.phase = phase;
        self.report(true);
    }

    fn report(&mut self, force: bool) {
        let now = Instant::now();
        if !force && now.duration_since(self.last_report) < self.cfg.progress_interval {
            return;
        }
        self.last_report = now;
        self.progress.downtime_limit_ms = self.limits.downtime_limit().as_secs_f64() * 1e3;
        self.progress.max_bandwidth_bytes_per_sec = self.limits.max_bandwidth();
        self.progress.elapsed_ms = self.start.elapsed().as_millis() as u64;
        self.progress.bytes_sent = self.w.bytes_written();
        if let Some(cb) = self.on_progress.as_mut() {
            cb(&self.progress);
        }
    }

    /// Undo a failed migration on the source (see the module docs) and return the error to
    /// report.
    fn recover(&mut self, e: SendError) -> SendError {
        if self.switched {
            return self.recover_postcopy(e);
        }
        let in_doubt = self.complete_sent && !matches!(e, SendError::Refused { .. });
        let tell_destination = !in_doubt
            && !self.w.is_poisoned()
            && !matches!(
                e,
                SendError::Refused { .. } | SendError::Timeout(_) | SendError::HandshakeTimeout(_)
            );
        if tell_destination {
            let reason = e.to_string();
            let reason = truncate_text(&reason, MAX_TEXT_LEN as usize);
            let _ = self
                .w
                .send(FrameType::Abort, &[reason.as_bytes()])
                .and_then(|_| self.w.flush());
        }
        let mut failures = Vec::new();
        if self.dirty_started {
            if let Err(x) = self.source.restore_dirty_log(&self.taken) {
                failures.push(format!("restoring the dirty log: {x}"));
            }
        }
        if in_doubt {
            let e = SendError::InDoubt { cause: Box::new(e) };
            return if failures.is_empty() {
                e
            } else {
                SendError::RecoveryFailed {
                    cause: Box::new(e),
                    recovery: failures.join("; "),
                }
            };
        }
        if self.sev_started {
            if let Err(x) = self.source.sev_send_cancel() {
                failures.push(format!("cancelling the SEV send session: {x}"));
            }
        }
        if self.paused {
            match self.source.resume() {
                Ok(()) => self.paused = false,
                Err(x) => failures.push(format!("resuming the source: {x}")),
            }
        }
        if failures.is_empty() {
            e
        } else {
            SendError::RecoveryFailed {
                cause: Box::new(e),
                recovery: failures.join("; "),
            }
        }
    }
}

impl<S: MigrationSource + ?Sized, R: Read, W: Write> Session<'_, S, R, W> {
    /// A failure after the switch to post-copy: tell the destination (so that it stops its
    /// guest with a clear error rather than at its I/O timeout), leave the source paused.
    fn recover_postcopy(&mut self, e: SendError) -> SendError {
        let tell = !self.w.is_poisoned()
            && !matches!(e, SendError::Refused { .. } | SendError::Timeout(_));
        if tell {
            let reason = format!("the source failed after the switch to post-copy: {e}");
            let reason = truncate_text(&reason, MAX_TEXT_LEN as usize);
            let _ = self
                .w
                .send(FrameType::Abort, &[reason.as_bytes()])
                .and_then(|_| self.w.flush());
        }
        SendError::PostcopyFailed { cause: Box::new(e) }
    }
}

/// The bandwidth the downtime estimate may assume: the measured one, but never more than
/// the cap.
fn capped(measured: f64, cap: Option<u64>) -> f64 {
    match cap {
        Some(cap) => measured.min(cap as f64),
        None => measured,
    }
}

/// Refuse a source configuration the protocol cannot carry, before anything is sent.
fn check_guest_config(g: &MigrationConfig) -> Result<(), SendError> {
    let bad = |m: String| Err(SendError::Source(SourceError::Failed(m)));
    if g.mem_size == 0 || !g.mem_size.is_multiple_of(PAGE_SIZE) || g.mem_size > MAX_MEM_SIZE {
        return bad(format!(
            "guest memory size {:#x} is not a non-zero multiple of 4 KiB up to {MAX_MEM_SIZE:#x}",
            g.mem_size
        ));
    }
    if g.vcpus == 0 || g.vcpus > MAX_VCPUS {
        return bad(format!("{} vCPUs (must be 1..={MAX_VCPUS})", g.vcpus));
    }
    if g.extra.len() > MAX_BLOB_LEN as usize {
        return bad(format!(
            "{} bytes of extra compatibility data (at most {MAX_BLOB_LEN})",
            g.extra.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_never_assumes_more_than_the_cap() {
        assert_eq!(capped(100e6, None), 100e6);
        assert_eq!(capped(100e6, Some(10 << 20)), (10 << 20) as f64);
        assert_eq!(capped(1e6, Some(10 << 20)), 1e6);
    }
}
