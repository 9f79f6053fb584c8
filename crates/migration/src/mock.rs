//! In-memory stand-ins for a VM, used by the tests and the benchmark: a Vec-backed guest that
//! logs dirty pages, a background "vCPU" that keeps dirtying it, a [`MockSource`] and a
//! [`MockTarget`], and a toy SEV-ES transport (XOR keystream + keyed checksum — **not**
//! cryptography; it only lets tests exercise the packet and refusal paths).

use crate::source::{MigrationSource, SourceError};
use crate::target::{MigrationTarget, TargetError};
use crate::{GuestType, MigrationConfig, PageSet, PAGE_SIZE};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MockError {
    #[error("this mock guest already has a MockSource; drop it before creating another")]
    SourceExists,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread may poison a lock; the data is still usable for the mock.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest RAM with a dirty log. Writers go through [`MockGuest::write`], which refuses while
/// the guest is paused.
pub struct MockGuest {
    pages: u64,
    /// The bytes. Accessed only under `gate` (writes with the write lock, copies with the
    /// read lock), or without it while `paused`, when writers refuse to write.
    mem: Box<[UnsafeCell<u8>]>,
    gate: RwLock<()>,
    paused: AtomicBool,
    has_source: AtomicBool,
    logging: AtomicBool,
    log: Mutex<PageSet>,
    /// Pages ever written (for `written_pages`).
    ever: Mutex<PageSet>,
    /// Ground truth for tests: pages written since dirty logging started (never cleared by
    /// taking the log).
    since_start: Mutex<PageSet>,
    writes: AtomicU64,
}

// SAFETY: `mem` is only mutated in `write`, which holds `gate` exclusively and checks
// `paused` under it; it is only read in `read_into`/`snapshot` under `gate` shared, or through
// `paused_slice`, which is reachable only via the single `MockSource` while it holds the guest
// paused (pause/resume need `&mut MockSource`, so no resume can happen while such a slice is
// borrowed). So no byte is ever written while another thread reads or writes it.
unsafe impl Sync for MockGuest {}

impl MockGuest {
    /// A zeroed guest of `pages` pages.
    pub fn new(pages: u64) -> Arc<MockGuest> {
        let bytes = vec![0u8; (pages * PAGE_SIZE) as usize].into_boxed_slice();
        let raw = Box::into_raw(bytes) as *mut [UnsafeCell<u8>];
        // SAFETY: UnsafeCell<u8> is repr(transparent) over u8, so the slice layouts are
        // identical; the pointer comes from Box::into_raw and is consumed exactly once.
        let mem = unsafe { Box::from_raw(raw) };
        Arc::new(MockGuest {
            pages,
            mem,
            gate: RwLock::new(()),
            paused: AtomicBool::new(false),
            has_source: AtomicBool::new(false),
            logging: AtomicBool::new(false),
            log: Mutex::new(PageSet::new(pages)),
            ever: Mutex::new(PageSet::new(pages)),
            since_start: Mutex::new(PageSet::new(pages)),
            writes: AtomicU64::new(0),
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn base(&self) -> *mut u8 {
        UnsafeCell::raw_get(self.mem.as_ptr())
    }

    /// Write `data` at byte `offset` of `page` (marking it dirty); false if paused or out of
    /// range.
    pub fn write(&self, page: u64, offset: usize, data: &[u8]) -> bool {
        if page >= self.pages || offset + data.len() > PAGE_SIZE as usize {
            return false;
        }
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if self.paused.load(Ordering::SeqCst) {
            return false;
        }
        let at = (page * PAGE_SIZE) as usize + offset;
        // SAFETY: in bounds (checked above); we hold the gate exclusively and the guest is not
        // paused, so no other access to these bytes is in progress (see `impl Sync`).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base().add(at), data.len()) };
        // Log after the write, like hardware: a page read before this point is logged again.
        if self.logging.load(Ordering::SeqCst) {
            lock(&self.log).set(page);
            lock(&self.since_start).set(page);
        }
        lock(&self.ever).set(page);
        self.writes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Fill every page with pseudo-random bytes (deterministic in `seed`).
    pub fn fill_random(&self, seed: u64) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..self.pages {
            let mut s = seed ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&splitmix64(&mut s).to_le_bytes());
            }
            self.write(p, 0, &page);
        }
    }

    /// Write a changing stamp into `page` (what the background dirtier does).
    pub fn touch(&self, page: u64) -> bool {
        let n = self.writes.load(Ordering::Relaxed);
        let off = ((n.wrapping_mul(2654435761) % (PAGE_SIZE / 8)) * 8) as usize;
        self.write(page, off, &(n ^ page.rotate_left(32)).to_le_bytes())
    }

    /// Copy pages `first..` into `buf`.
    fn read_into(&self, first: u64, buf: &mut [u8]) -> bool {
        let at = first.checked_mul(PAGE_SIZE);
        let Some(at) = at.filter(|a| a + buf.len() as u64 <= self.pages * PAGE_SIZE) else {
            return false;
        };
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: in bounds; the shared gate excludes writers (see `impl Sync`).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base().add(at as usize), buf.as_mut_ptr(), buf.len())
        };
        true
    }

    /// All of guest memory.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; (self.pages * PAGE_SIZE) as usize];
        self.read_into(0, &mut v);
        v
    }

    /// Whether guest memory equals `other`, compared in chunks (no full copy).
    pub fn same_as(&self, other: &[u8]) -> bool {
        if other.len() as u64 != self.pages * PAGE_SIZE {
            return false;
        }
        let mut chunk = vec![0u8; 4 << 20];
        let per = chunk.len() / PAGE_SIZE as usize;
        other.chunks(chunk.len()).enumerate().all(|(i, theirs)| {
            let ours = &mut chunk[..theirs.len()];
            self.read_into((i * per) as u64, ours) && ours == theirs
        })
    }

    fn set_paused(&self, paused: bool) {
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The current dirty log, without clearing it.
    pub fn peek_dirty_log(&self) -> PageSet {
        lock(&self.log).clone()
    }

    /// Pages written since dirty logging last started.
    pub fn written_since_log_start(&self) -> PageSet {
        lock(&self.since_start).clone()
    }

    /// Successful writes so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Start a background thread that touches `pages_per_ms` random pages every millisecond
    /// while the guest runs.
    pub fn start_dirtier(self: &Arc<Self>, pages_per_ms: u64, seed: u64) -> Dirtier {
        let stop = Arc::new(AtomicBool::new(false));
        let guest = Arc::clone(self);
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut s = seed | 1;
            let mut done = 0u64;
            while !flag.load(Ordering::SeqCst) {
                for _ in 0..pages_per_ms {
                    let p = splitmix64(&mut s) % guest.pages;
                    if guest.touch(p) {
                        done += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            done
        });
        Dirtier {
            stop,
            handle: Some(handle),
        }
    }
}

/// The background writer started by [`MockGuest::start_dirtier`]; stops when dropped.
pub struct Dirtier {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl Dirtier {
    /// Stop and return how many pages it touched.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or(0)
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn splitmix64(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The toy transport of the mock SEV-ES guests: keystream XOR and a keyed 64-bit checksum.
fn toy_keystream_xor(key: u64, page: u64, iv: u64, data: &mut [u8]) {
    let mut s = key ^ page.rotate_left(17) ^ iv.rotate_left(41);
    for chunk in data.chunks_mut(8) {
        let k = splitmix64(&mut s).to_le_bytes();
        for (b, k) in chunk.iter_mut().zip(k) {
            *b ^= k;
        }
    }
}

fn toy_mac(key: u64, page: u64, iv: u64, ciphertext: &[u8]) -> u64 {
    let mut h = key ^ 0xcbf2_9ce4_8422_2325;
    for w in [page, iv] {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    for chunk in ciphertext.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(b))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    splitmix64(&mut h)
}

/// The toy SEND_FINISH tag over (packet count, XOR of packet MACs).
fn toy_finish_tag(key: u64, (count, xor): (u64, u64)) -> u64 {
    let mut h = key ^ count.rotate_left(13) ^ xor;
    splitmix64(&mut h)
}

/// Mock packet layout: `iv u64, mac u64, ciphertext[4096]`.
pub const MOCK_PACKET_LEN: usize = 16 + PAGE_SIZE as usize;
const CERT_MAGIC: &[u8; 8] = b"MOCK-PDH";
const SESSION_MAGIC: &[u8; 8] = b"MOCK-SES";

/// A [`MigrationSource`] over a [`MockGuest`], with counters the tests check.
pub struct MockSource {
    guest: Arc<MockGuest>,
    pub vcpus: u32,
    pub guest_type: GuestType,
    pub features: u64,
    pub device_state: Vec<u8>,
    pub vcpu_states: Vec<Vec<u8>>,
    /// Report `written_pages` (pages ever written) so the first pass skips zero pages.
    pub report_written: bool,
    /// Deterministic "concurrent guest": every `read_pages` call (while running) first
    /// touches this many pages, round robin.
    pub dirty_on_read: u64,
    dirty_cursor: u64,
    /// SEV-ES: damage the packet of this page after computing its MAC.
    pub corrupt_packet_for: Option<u64>,
    sev_key: Option<u64>,
    /// Toy transcript of the packets made: (count, XOR of MACs).
    sev_transcript: (u64, u64),
    iv_counter: u64,
    pub pauses: u32,
    pub resumes: u32,
    pub send_cancels: u32,
    pub dead: bool,
}

impl MockSource {
    /// The source for `guest` (one per guest at a time).
    pub fn new(guest: Arc<MockGuest>, vcpus: u32) -> Result<MockSource, MockError> {
        if guest.has_source.swap(true, Ordering::SeqCst) {
            return Err(MockError::SourceExists);
        }
        let vcpu_states = (0..vcpus)
            .map(|v| format!("vcpu {v} registers").into_bytes())
            .collect();
        Ok(MockSource {
            guest,
            vcpus,
            guest_type: GuestType::Plain,
            features: 0b11,
            device_state: b"mock devices: uart, pit, pic".to_vec(),
            vcpu_states,
            report_written: false,
            dirty_on_read: 0,
            dirty_cursor: 0,
            corrupt_packet_for: None,
            sev_key: None,
            sev_transcript: (0, 0),
            iv_counter: 1,
            pauses: 0,
            resumes: 0,
            send_cancels: 0,
            dead: false,
        })
    }

    pub fn guest(&self) -> &Arc<MockGuest> {
        &self.guest
    }

    pub fn is_paused(&self) -> bool {
        self.guest.is_paused()
    }

    /// Resolve an in-doubt outcome by hand (what an operator would do).
    pub fn force_resume(&mut self) {
        self.guest.set_paused(false);
        self.resumes += 1;
    }

    /// A destination configuration matching this source.
    pub fn matching_target_config(&self) -> MigrationConfig {
        self.config()
    }
}

impl Drop for MockSource {
    fn drop(&mut self) {
        self.guest.has_source.store(false, Ordering::SeqCst);
    }
}

impl MigrationSource for MockSource {
    fn config(&self) -> MigrationConfig {
        MigrationConfig {
            mem_size: self.guest.pages * PAGE_SIZE,
            vcpus: self.vcpus,
            vm_type: self.guest_type,
            features: self.features,
            extra: b"mock".to_vec(),
        }
    }

    fn start_dirty_log(&mut self) -> Result<(), SourceError> {
        let pages = self.guest.pages;
        let _g = self.guest.gate.write().unwrap_or_else(|e| e.into_inner());
        *lock(&self.guest.log) = PageSet::new(pages);
        *lock(&self.guest.since_start) = PageSet::new(pages);
        self.guest.logging.store(true, Ordering::SeqCst);
        // Every migration sees the same deterministic dirtying pattern.
        self.dirty_cursor = 0;
        Ok(())
    }

    fn written_pages(&mut self) -> Result<Option<PageSet>, SourceError> {
        Ok(self.report_written.then(|| lock(&self.guest.ever).clone()))
    }

    fn take_dirty_log(&mut self) -> Result<PageSet, SourceError> {
        let mut log = lock(&self.guest.log);
        let pages = log.pages();
        Ok(std::mem::replace(&mut *log, PageSet::new(pages)))
    }

    fn restore_dirty_log(&mut self, pages: &PageSet) -> Result<(), SourceError> {
        lock(&self.guest.log).union(pages);
        Ok(())
    }

    fn read_pages(&mut self, first_page: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        for _ in 0..self.dirty_on_read {
            let p = self.dirty_cursor % self.guest.pages;
            self.dirty_cursor = self.dirty_cursor.wrapping_add(7);
            self.guest.touch(p);
        }
        if !(buf.len() as u64).is_multiple_of(PAGE_SIZE) || !self.guest.read_into(first_page, buf) {
            return Err(SourceError::failed(format!(
                "read of {} bytes at page {first_page} is outside guest memory",
                buf.len()
            )));
        }
        Ok(())
    }

    fn paused_pages(&self, first_page: u64, count: u64) -> Option<&[u8]> {
        if !self.guest.is_paused() {
            return None;
        }
        let end = first_page.checked_add(count)?;
        if end > self.guest.pages {
            return None;
        }
        let at = (first_page * PAGE_SIZE) as usize;
        // SAFETY: in bounds; the guest is paused, and only this (unique) source can resume it,
        // which needs `&mut self` while the returned slice borrows `self` — so no write
        // happens while the slice lives (see `impl Sync for MockGuest`).
        Some(unsafe {
            std::slice::from_raw_parts(self.guest.base().add(at), (count * PAGE_SIZE) as usize)
        })
    }

    fn sev_send_start(&mut self, target_certs: &[u8]) -> Result<Vec<u8>, SourceError> {
        if self.guest_type != GuestType::SevEs {
            return Err(SourceError::Unsupported {
                what: "SEV-ES sessions on a plain guest",
            });
        }
        if target_certs.len() != 16 || &target_certs[..8] != CERT_MAGIC {
            return Err(SourceError::failed(
                "the destination's certificate chain is not a mock PDH",
            ));
        }
        let pdh = crate::protocol::le64(&target_certs[8..16]);
        let nonce = 0x5eed_0000 + u64::from(self.pauses) + u64::from(self.send_cancels);
        self.sev_key = Some(pdh.rotate_left(7) ^ nonce.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.sev_transcript = (0, 0);
        let mut blob = SESSION_MAGIC.to_vec();
        blob.extend_from_slice(&nonce.to_le_bytes());
        Ok(blob)
    }

    fn sev_page_packet(&mut self, page: u64, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let key = self
            .sev_key
            .ok_or_else(|| SourceError::failed("no SEV send session"))?;
        let mut data = vec![0u8; PAGE_SIZE as usize];
        if !self.guest.read_into(page, &mut data) {
            return Err(SourceError::failed(format!(
                "page {page} is outside memory"
            )));
        }
        let iv = self.iv_counter;
        self.iv_counter += 1;
        toy_keystream_xor(key, page, iv, &mut data);
        let mac = toy_mac(key, page, iv, &data);
        self.sev_transcript.0 += 1;
        self.sev_transcript.1 ^= mac;
        if self.corrupt_packet_for == Some(page) {
            data[100] ^= 0x01;
        }
        out.extend_from_slice(&iv.to_le_bytes());
        out.extend_from_slice(&mac.to_le_bytes());
        out.extend_from_slice(&data);
        Ok(())
    }

    fn sev_finish_blob(&mut self) -> Result<Vec<u8>, SourceError> {
        let key = self
            .sev_key
            .ok_or_else(|| SourceError::failed("no SEV send session"))?;
        Ok(toy_finish_tag(key, self.sev_transcript)
            .to_le_bytes()
            .to_vec())
    }

    fn sev_send_cancel(&mut self) -> Result<(), SourceError> {
        self.sev_key = None;
        self.send_cancels += 1;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), SourceError> {
        self.guest.set_paused(true);
        self.pauses += 1;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), SourceError> {
        if self.dead {
            return Err(SourceError::failed("the source VM is dead (migrated away)"));
        }
        self.guest.set_paused(false);
        self.resumes += 1;
        Ok(())
    }

    fn device_state(&mut self) -> Result<Vec<u8>, SourceError> {
        Ok(self.device_state.clone())
    }

    fn vcpu_state(&mut self, vcpu: u32) -> Result<Vec<u8>, SourceError> {
        self.vcpu_states
            .get(vcpu as usize)
            .cloned()
            .ok_or_else(|| SourceError::failed(format!("no vCPU {vcpu}")))
    }

    fn mark_dead(&mut self) {
        self.dead = true;
    }
}

/// A [`MigrationTarget`] over a Vec. After `abort` the received memory is kept for tests to
/// inspect, but everything else is discarded and `aborted` is set.
pub struct MockTarget {
    /// The destination's own configuration, checked against the source's.
    pub local: MigrationConfig,
    mem: Vec<u8>,
    pub pdh: u64,
    sev_key: Option<u64>,
    /// Toy transcript of the packets accepted: (count, XOR of MACs).
    sev_transcript: (u64, u64),
    pub device_state: Option<Vec<u8>>,
    pub vcpu_states: Vec<Option<Vec<u8>>>,
    pub passes: Vec<(u32, bool)>,
    pub packets_refused: u64,
    /// Refuse `commit` (to test a failing RECEIVE_FINISH).
    pub fail_commit: bool,
    pub committed: bool,
    pub aborted: bool,
    pub aborts: u32,
    /// Offer post-copy (default true; false models the KVM backend).
    pub postcopy_supported: bool,
    /// Post-copy: pages present (None before a switch: all present).
    pub present: Option<PageSet>,
    /// Post-copy: pages missing at the switch.
    pub pending_at_switch: Option<PageSet>,
    /// Post-copy: pages in the order they were published.
    pub published: Vec<u64>,
    /// Post-copy: the guest was started here.
    pub running: bool,
    /// Post-copy: the guest was started and then stopped by `abort` (never to run again).
    pub stopped_after_run: bool,
    /// Post-copy: pages the "guest" faults on, reported (once each, in order) by
    /// `postcopy_faults` while they are missing — a script standing in for a running vCPU.
    pub fault_script: Vec<u64>,
    /// Post-copy: `postcopy_faults` reports at most this many script pages per call.
    pub faults_per_call: usize,
    /// Post-copy: script pages reported so far.
    pub faults_reported: Vec<u64>,
}

impl MockTarget {
    pub fn new(local: MigrationConfig) -> MockTarget {
        let bytes = local.mem_size as usize;
        let vcpus = local.vcpus as usize;
        MockTarget {
            local,
            mem: vec![0u8; bytes],
            pdh: 0x0123_4567_89ab_cdef,
            sev_key: None,
            sev_transcript: (0, 0),
            device_state: None,
            vcpu_states: vec![None; vcpus],
            passes: Vec::new(),
            packets_refused: 0,
            fail_commit: false,
            committed: false,
            aborted: false,
            aborts: 0,
            postcopy_supported: true,
            present: None,
            pending_at_switch: None,
            published: Vec::new(),
            running: false,
            stopped_after_run: false,
            fault_script: Vec::new(),
            faults_per_call: 1,
            faults_reported: Vec::new(),
        }
    }

    /// Whether `page` may be read by the guest (post-copy: it arrived).
    pub fn is_present(&self, page: u64) -> bool {
        self.present.as_ref().is_none_or(|p| p.is_set(page))
    }

    pub fn memory(&self) -> &[u8] {
        &self.mem
    }

    /// Touch every page of the destination memory now (the benchmark separates the cost of
    /// first-touch page faults from the protocol's).
    pub fn prefault(&mut self) {
        for page in self.mem.chunks_mut(PAGE_SIZE as usize) {
            // SAFETY: `page` is a live, non-empty &mut [u8]; a volatile store keeps the
            // compiler from dropping the write of a byte it may know to be zero.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
        }
    }
}

impl MigrationTarget for MockTarget {
    fn accept_config(&mut self, config: &MigrationConfig) -> Result<Vec<u8>, TargetError> {
        self.local.check_compatible(config)?;
        if config.vm_type == GuestType::SevEs {
            let mut certs = CERT_MAGIC.to_vec();
            certs.extend_from_slice(&self.pdh.to_le_bytes());
            Ok(certs)
        } else {
            Ok(Vec::new())
        }
    }

    fn sev_receive_start(&mut self, session: &[u8]) -> Result<(), TargetError> {
        if self.local.vm_type != GuestType::SevEs {
            return Err(TargetError::Unsupported {
                what: "SEV-ES sessions",
            });
        }
        if session.len() != 16 || &session[..8] != SESSION_MAGIC {
            return Err(TargetError::Refused("not a mock session blob".into()));
        }
        let nonce = crate::protocol::le64(&session[8..16]);
        self.sev_key = Some(self.pdh.rotate_left(7) ^ nonce.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.sev_transcript = (0, 0);
        Ok(())
    }

    fn pages_mut(&mut self, first_page: u64, count: u64) -> Result<&mut [u8], TargetError> {
        let start = first_page
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| TargetError::Failed("page number overflow".into()))?;
        let end = start + count * PAGE_SIZE;
        self.mem
            .get_mut(start as usize..end as usize)
            .ok_or_else(|| TargetError::Failed(format!("pages {first_page}+{count} outside")))
    }

    fn receive_page_packet(&mut self, page: u64, packet: &[u8]) -> Result<(), TargetError> {
        let key = self
            .sev_key
            .ok_or_else(|| TargetError::Refused("no receive session".into()))?;
        if packet.len() != MOCK_PACKET_LEN {
            return Err(TargetError::Refused(format!(
                "packet for page {page} is {} bytes",
                packet.len()
            )));
        }
        let iv = crate::protocol::le64(&packet[0..8]);
        let mac = crate::protocol::le64(&packet[8..16]);
        if toy_mac(key, page, iv, &packet[16..]) != mac {
            self.packets_refused += 1;
            return Err(TargetError::Refused(format!(
                "transport MAC mismatch for page {page}"
            )));
        }
        self.sev_transcript.0 += 1;
        self.sev_transcript.1 ^= mac;
        let dst = self.pages_mut(page, 1)?;
        dst.copy_from_slice(&packet[16..]);
        toy_keystream_xor(key, page, iv, dst);
        Ok(())
    }

    fn pass_end(&mut self, pass: u32, final_pass: bool) -> Result<(), TargetError> {
        self.passes.push((pass, final_pass));
        Ok(())
    }

    fn apply_device_state(&mut self, state: &[u8]) -> Result<(), TargetError> {
        self.device_state = Some(state.to_vec());
        Ok(())
    }

    fn apply_vcpu_state(&mut self, vcpu: u32, state: &[u8]) -> Result<(), TargetError> {
        let slot = self
            .vcpu_states
            .get_mut(vcpu as usize)
            .ok_or_else(|| TargetError::Refused(format!("no vCPU {vcpu} here")))?;
        *slot = Some(state.to_vec());
        Ok(())
    }

    fn sev_receive_finish(&mut self, blob: &[u8]) -> Result<(), TargetError> {
        let key = self
            .sev_key
            .ok_or_else(|| TargetError::Refused("no receive session".into()))?;
        if blob != toy_finish_tag(key, self.sev_transcript).to_le_bytes() {
            return Err(TargetError::Refused(
                "the finish tag does not match the packets received".into(),
            ));
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), TargetError> {
        if self.fail_commit {
            return Err(TargetError::Failed("commit refused (test)".into()));
        }
        self.committed = true;
        Ok(())
    }

    fn postcopy_supported(&self) -> bool {
        self.postcopy_supported
    }

    fn postcopy_begin(&mut self, pending: &PageSet) -> Result<(), TargetError> {
        let mut present = PageSet::full(pending.pages());
        for p in pending.iter() {
            present.clear(p);
        }
        self.present = Some(present);
        self.pending_at_switch = Some(pending.clone());
        Ok(())
    }

    fn postcopy_run(&mut self) -> Result<(), TargetError> {
        self.running = true;
        Ok(())
    }

    fn postcopy_publish(&mut self, first_page: u64, count: u64) -> Result<(), TargetError> {
        let present = self
            .present
            .as_mut()
            .ok_or_else(|| TargetError::Failed("publish before the switch".into()))?;
        for p in first_page..first_page + count {
            present.set(p);
            self.published.push(p);
        }
        Ok(())
    }

    fn postcopy_faults(&mut self, out: &mut Vec<u64>) {
        let mut n = 0;
        while n < self.faults_per_call.max(1) {
            let Some(&p) = self.fault_script.get(self.faults_reported.len()) else {
                break;
            };
            self.faults_reported.push(p);
            if !self.is_present(p) {
                out.push(p);
                n += 1;
            }
        }
    }

    fn abort(&mut self) {
        if self.running {
            self.running = false;
            self.stopped_after_run = true;
        }
        self.aborted = true;
        self.aborts += 1;
        self.device_state = None;
        self.vcpu_states.iter_mut().for_each(|s| *s = None);
        self.sev_key = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_logs_writes_and_refuses_while_paused() {
        let g = MockGuest::new(8);
        let mut s = MockSource::new(Arc::clone(&g), 1).unwrap();
        assert!(matches!(
            MockSource::new(Arc::clone(&g), 1),
            Err(MockError::SourceExists)
        ));
        s.start_dirty_log().unwrap();
        assert!(g.write(3, 10, &[1, 2, 3]));
        assert_eq!(
            s.take_dirty_log().unwrap().iter().collect::<Vec<_>>(),
            vec![3]
        );
        assert!(s.take_dirty_log().unwrap().is_empty());
        s.pause().unwrap();
        assert!(!g.write(4, 0, &[1]));
        let slice = s.paused_pages(3, 1).unwrap();
        assert_eq!(&slice[10..13], &[1, 2, 3]);
        s.resume().unwrap();
        assert!(s.paused_pages(3, 1).is_none());
        assert!(g.write(4, 0, &[1]));
        let mut back = PageSet::new(8);
        back.set(6);
        s.restore_dirty_log(&back).unwrap();
        assert_eq!(
            s.take_dirty_log().unwrap().iter().collect::<Vec<_>>(),
            vec![4, 6]
        );
        assert_eq!(
            g.written_since_log_start().iter().collect::<Vec<_>>(),
            vec![3, 4]
        );
        drop(s);
        assert!(MockSource::new(g, 1).is_ok());
    }

    #[test]
    fn toy_sev_round_trip_and_tamper() {
        let g = MockGuest::new(4);
        g.fill_random(7);
        let mut s = MockSource::new(Arc::clone(&g), 1).unwrap();
        s.guest_type = GuestType::SevEs;
        let mut t = MockTarget::new(s.config());
        let certs = t.accept_config(&s.config()).unwrap();
        let blob = s.sev_send_start(&certs).unwrap();
        t.sev_receive_start(&blob).unwrap();
        let mut pkt = Vec::new();
        s.sev_page_packet(2, &mut pkt).unwrap();
        assert_eq!(pkt.len(), MOCK_PACKET_LEN);
        let plain = g.snapshot();
        assert_ne!(&pkt[16..], &plain[2 * 4096..3 * 4096], "encrypted");
        t.receive_page_packet(2, &pkt).unwrap();
        assert_eq!(&t.memory()[2 * 4096..3 * 4096], &plain[2 * 4096..3 * 4096]);
        pkt[200] ^= 4;
        assert!(matches!(
            t.receive_page_packet(2, &pkt),
            Err(TargetError::Refused(_))
        ));
        // a packet for one page does not authenticate as another
        pkt[200] ^= 4;
        assert!(t.receive_page_packet(1, &pkt).is_err());
    }
}
