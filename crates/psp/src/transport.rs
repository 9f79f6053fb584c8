//! Transport packets for SEND_UPDATE_* / RECEIVE_UPDATE_* and the workers
//! that make and check them on several threads.
//!
//! Every packet is `header {flags u32, iv[16], mac[32]}` + ciphertext:
//! - data = AES-128-CTR(TEK, iv) over the plaintext; the IV is the initial
//!   counter block: `iv[0..8]` = packet sequence number (u64 LE, unique per
//!   session; `n * 16 + shard` with per-thread shards), `iv[8..12]` random,
//!   `iv[12..16]` = 0 (block counter), so every packet has a fresh IV and
//!   counter ranges never overlap;
//! - `mac = HMAC-SHA256(TIK, tag || flags || iv || binding || ciphertext)` with
//!   tag 0x21 and binding `gpa u64 || len u32` for data packets, tag 0x22 and
//!   binding `vcpu u32 || vmsa_gpa u64 || len u32` for VMSA packets, so a
//!   packet cannot be replayed at another address or to another vCPU.
//!
//! The receiver rejects a sequence number it has already accepted, and both
//! sides fold every packet MAC into a transcript (count and XOR of MACs).
//! SEND_FINISH returns `HMAC(TIK, 0x23 || count u64 || xor)`, which
//! RECEIVE_FINISH checks, so a dropped, replayed or injected packet makes the
//! migration fail before the destination guest can run (an esvm extension:
//! the SEV API's RECEIVE_FINISH takes no such tag).

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aes::cipher::{InnerIvInit, KeyInit, StreamCipher};
use aes::Aes128;
use hmac::Mac;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::crypto::{mac_eq, new_hmac, Aes128Ctr, HmacSha256};
use crate::error::{PspError, PspResult};
use crate::memkey::{MemoryKey, PAGE_SIZE};
use crate::memory::GuestMemoryAccess;
use crate::session::{PacketHeader, TransportKeys};
use crate::vmsa::{TrackedExtension, TrackedRegisters, VMSA_SIZE};
use crate::GuestState;

/// Largest payload of one data packet.
pub const MAX_PACKET_LEN: usize = 16 << 20;
/// Length of a VMSA packet's ciphertext (VMSA page + tracked extension).
pub const VMSA_PACKET_LEN: usize = VMSA_SIZE + TrackedExtension::LEN;
/// Packet flag: payload compressed (not supported by this firmware).
pub const FLAG_COMPRESSED: u32 = 1;

const TAG_DATA: u8 = 0x21;
const TAG_VMSA: u8 = 0x22;
const TAG_FINISH: u8 = 0x23;
const MAX_SEQ: u64 = 1 << 36;

/// Per-thread shards of the sequence counter and transcript, so that worker
/// threads on different cores do not bounce one cache line per packet. The
/// transcript (count, XOR of MACs) is order-independent, so shards combine
/// at FINISH; sequence numbers are `n * SHARDS + shard`, unique across shards.
const SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Shard {
    next: AtomicU64,
    count: AtomicU64,
    xor: [AtomicU64; 4],
}

static NEXT_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn my_shard() -> usize {
    thread_local! {
        static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// An HMAC-SHA256 state keyed with the TIK, kept ready so each packet costs
/// no key setup. Zeroized on drop.
struct TikMac(ManuallyDrop<HmacSha256>);

// The zeroing below relies on the HMAC state owning no heap memory.
const _: () = assert!(!std::mem::needs_drop::<HmacSha256>());

impl TikMac {
    fn new(tik: &[u8]) -> TikMac {
        TikMac(ManuallyDrop::new(new_hmac(tik)))
    }
    fn start(&self) -> HmacSha256 {
        (*self.0).clone()
    }
}

impl Drop for TikMac {
    fn drop(&mut self) {
        let p = (&mut *self.0) as *mut HmacSha256 as *mut u8;
        for i in 0..std::mem::size_of::<HmacSha256>() {
            // SAFETY: `p` points to the HmacSha256 owned by this ManuallyDrop,
            // which is valid for `size_of::<HmacSha256>()` bytes and never
            // used or dropped after this (HmacSha256 has no drop glue, checked
            // by the const assertion above), so overwriting it is sound.
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
    }
}

/// Keys and transcript shared by one direction of a migration.
struct Channel {
    tek: Aes128,
    tik: TikMac,
    shards: Box<[Shard]>,
    open: AtomicBool,
    /// SHA-256 of the session start as this side saw it (the source platform's PDH
    /// certificate and the session blob), folded into the transcript tag: bytes of it that
    /// no MAC covers (unused certificate fields) cannot be changed unnoticed either.
    start: [u8; 32],
    /// Guest state after the channel was closed (for error messages).
    closed_state: std::sync::atomic::AtomicU8,
    active: AtomicBool,
}

impl Channel {
    fn new(keys: &TransportKeys, active: bool, start: [u8; 32]) -> Channel {
        Channel {
            start,
            tek: Aes128::new(keys.tek.as_bytes().into()),
            tik: TikMac::new(keys.tik.as_bytes()),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            open: AtomicBool::new(true),
            closed_state: std::sync::atomic::AtomicU8::new(GuestState::Running as u8),
            active: AtomicBool::new(active),
        }
    }

    fn ctr(&self, iv: &[u8; 16]) -> Aes128Ctr {
        Aes128Ctr::from_core(ctr::CtrCore::inner_iv_init(self.tek.clone(), iv.into()))
    }

    fn record(&self, mac: &[u8; 32]) {
        let sh = &self.shards[my_shard()];
        for (i, a) in sh.xor.iter().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&mac[i * 8..i * 8 + 8]);
            a.fetch_xor(u64::from_le_bytes(w), Ordering::AcqRel);
        }
        sh.count.fetch_add(1, Ordering::AcqRel);
    }

    fn finish_tag(&self) -> [u8; 32] {
        let mut count = 0u64;
        let mut xor = [0u64; 4];
        for sh in self.shards.iter() {
            count += sh.count.load(Ordering::Acquire);
            for (x, a) in xor.iter_mut().zip(sh.xor.iter()) {
                *x ^= a.load(Ordering::Acquire);
            }
        }
        let mut m = self.tik.start();
        m.update(&[TAG_FINISH]);
        m.update(&self.start);
        m.update(&count.to_le_bytes());
        for x in xor {
            m.update(&x.to_le_bytes());
        }
        m.finalize().into_bytes().into()
    }

    fn close(&self, state: GuestState) {
        self.closed_state.store(state as u8, Ordering::Release);
        self.open.store(false, Ordering::Release);
    }

    fn check_usable(&self, handle: u32, command: crate::Command) -> PspResult<()> {
        if !self.open.load(Ordering::Acquire) {
            return Err(PspError::InvalidGuestState {
                command,
                handle,
                allowed: crate::allowed_list(command),
                state: GuestState::from_u8(self.closed_state.load(Ordering::Acquire)),
            });
        }
        if !self.active.load(Ordering::Acquire) {
            return Err(PspError::Inactive { handle });
        }
        Ok(())
    }

    fn data_mac(&self, flags: u32, iv: &[u8; 16], gpa: u64, ct: &[u8]) -> [u8; 32] {
        let mut m = self.tik.start();
        m.update(&[TAG_DATA]);
        m.update(&flags.to_le_bytes());
        m.update(iv);
        m.update(&gpa.to_le_bytes());
        m.update(&(ct.len() as u32).to_le_bytes());
        m.update(ct);
        m.finalize().into_bytes().into()
    }

    fn vmsa_mac(&self, flags: u32, iv: &[u8; 16], vcpu: u32, gpa: u64, ct: &[u8]) -> [u8; 32] {
        let mut m = self.tik.start();
        m.update(&[TAG_VMSA]);
        m.update(&flags.to_le_bytes());
        m.update(iv);
        m.update(&vcpu.to_le_bytes());
        m.update(&gpa.to_le_bytes());
        m.update(&(ct.len() as u32).to_le_bytes());
        m.update(ct);
        m.finalize().into_bytes().into()
    }
}

fn check_len(len: usize) -> PspResult<()> {
    if len == 0 || len > MAX_PACKET_LEN {
        return Err(PspError::InvalidLen {
            what: "transport packet payload",
            expected: format!("1..={MAX_PACKET_LEN} bytes"),
            got: len,
        });
    }
    Ok(())
}

fn check_flags(flags: u32) -> PspResult<()> {
    if flags & FLAG_COMPRESSED != 0 {
        return Err(PspError::Unsupported(
            "compressed transport packets are not supported; send the data uncompressed".into(),
        ));
    }
    if flags != 0 {
        return Err(PspError::InvalidParam(format!(
            "unknown packet header flags 0x{flags:x}"
        )));
    }
    Ok(())
}

/// Clears a plaintext buffer (a plain memset kept alive by `black_box`; much
/// cheaper per page than byte-wise volatile writes).
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

fn not_es(command: crate::Command) -> PspError {
    PspError::PolicyFailure(format!(
        "{command} is only for SEV-ES guests: the policy has no ES bit"
    ))
}

fn seq_of(iv: &[u8; 16]) -> u64 {
    let mut s = [0u8; 8];
    s.copy_from_slice(&iv[..8]);
    u64::from_le_bytes(s)
}

/// Source side of a migration (state SUPDATE).
pub(crate) struct SendState {
    handle: u32,
    ch: Channel,
    memkey: Arc<MemoryKey>,
    vmsas: BTreeMap<u32, u64>,
    es: bool,
}

/// Makes SEND_UPDATE_DATA / SEND_UPDATE_VMSA packets for one guest. Cheap to
/// clone, `Send + Sync`; all methods take `&self`, so several threads can
/// make packets at once. Stops working after SEND_FINISH / SEND_CANCEL.
#[derive(Clone)]
pub struct SendWorker {
    pub(crate) inner: Arc<SendState>,
}

impl SendState {
    pub(crate) fn new(
        handle: u32,
        keys: &TransportKeys,
        memkey: Arc<MemoryKey>,
        vmsas: BTreeMap<u32, u64>,
        active: bool,
        es: bool,
        start: [u8; 32],
    ) -> SendState {
        SendState {
            handle,
            ch: Channel::new(keys, active, start),
            memkey,
            vmsas,
            es,
        }
    }

    pub(crate) fn close(&self, state: GuestState) {
        self.ch.close(state);
    }

    pub(crate) fn set_active(&self, a: bool) {
        self.ch.active.store(a, Ordering::Release);
    }

    pub(crate) fn finish_tag(&self) -> [u8; 32] {
        self.ch.finish_tag()
    }

    fn next_iv(&self) -> PspResult<[u8; 16]> {
        let shard = my_shard();
        let n = self.ch.shards[shard].next.fetch_add(1, Ordering::AcqRel);
        let seq = n.saturating_mul(SHARDS as u64).saturating_add(shard as u64);
        if seq >= MAX_SEQ {
            return Err(PspError::ResourceLimit(
                "too many packets in one migration session; start a new SEND_START".into(),
            ));
        }
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&seq.to_le_bytes());
        rand::thread_rng().fill_bytes(&mut iv[8..12]);
        Ok(iv)
    }
}

impl SendWorker {
    /// The guest handle.
    pub fn handle(&self) -> u32 {
        self.inner.handle
    }

    /// SEND_UPDATE_DATA into a caller buffer: reads `out.len()` bytes of guest
    /// plaintext at `gpa` through the trusted path and encrypts them in
    /// `out`; returns the packet header.
    pub fn send_update_data_into(
        &self,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        out: &mut [u8],
    ) -> PspResult<PacketHeader> {
        let s = &*self.inner;
        s.ch.check_usable(s.handle, crate::Command::SendUpdateData)?;
        check_len(out.len())?;
        gpa.checked_add(out.len() as u64)
            .ok_or_else(|| PspError::InvalidAddress {
                gpa,
                len: out.len() as u64,
                why: "the range wraps around the address space".into(),
            })?;
        mem.read(gpa, out)?;
        let iv = s.next_iv()?;
        s.ch.ctr(&iv).apply_keystream(out);
        let mac = s.ch.data_mac(0, &iv, gpa, out);
        s.ch.record(&mac);
        Ok(PacketHeader { flags: 0, iv, mac })
    }

    /// SEND_UPDATE_DATA returning a new ciphertext buffer.
    pub fn send_update_data(
        &self,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        len: usize,
    ) -> PspResult<(PacketHeader, Vec<u8>)> {
        check_len(len)?;
        let mut out = vec![0u8; len];
        let h = self.send_update_data_into(mem, gpa, &mut out)?;
        Ok((h, out))
    }

    /// SEND_UPDATE_VMSA: decrypts the host's copy of vCPU `vcpu`'s VMSA (held
    /// at `vmsa_gpa` under the guest's memory key) and wraps it together with
    /// the tracked extension.
    pub fn send_update_vmsa(
        &self,
        vcpu: u32,
        vmsa_gpa: u64,
        encrypted_vmsa: &[u8; VMSA_SIZE],
        ext: &TrackedExtension,
    ) -> PspResult<(PacketHeader, Vec<u8>)> {
        let s = &*self.inner;
        s.ch.check_usable(s.handle, crate::Command::SendUpdateVmsa)?;
        if !s.es {
            return Err(not_es(crate::Command::SendUpdateVmsa));
        }
        match s.vmsas.get(&vcpu) {
            Some(g) if *g == vmsa_gpa => {}
            Some(g) => {
                return Err(PspError::InvalidParam(format!(
                    "vCPU {vcpu}'s VMSA is at GPA 0x{g:x}, not 0x{vmsa_gpa:x}"
                )))
            }
            None => {
                return Err(PspError::InvalidParam(format!(
                    "vCPU {vcpu} has no VMSA in this guest (known vCPUs: {:?})",
                    s.vmsas.keys().collect::<Vec<_>>()
                )))
            }
        }
        let mut buf = Zeroizing::new(vec![0u8; VMSA_PACKET_LEN]);
        let mut page = Zeroizing::new([0u8; PAGE_SIZE]);
        page.copy_from_slice(encrypted_vmsa);
        s.memkey.decrypt_in_place(vmsa_gpa, &mut page);
        buf[..VMSA_SIZE].copy_from_slice(&page[..]);
        buf[VMSA_SIZE..].copy_from_slice(&ext.to_bytes());
        let iv = s.next_iv()?;
        s.ch.ctr(&iv).apply_keystream(&mut buf);
        let mac = s.ch.vmsa_mac(0, &iv, vcpu, vmsa_gpa, &buf);
        s.ch.record(&mac);
        Ok((PacketHeader { flags: 0, iv, mac }, buf.to_vec()))
    }
}

/// Destination side of a migration (state RUPDATE).
pub(crate) struct RecvState {
    handle: u32,
    ch: Channel,
    seen: Box<[Mutex<Vec<u64>>]>,
    memkey: Arc<MemoryKey>,
    pub(crate) vmsas: Mutex<BTreeMap<u32, u64>>,
    es: bool,
}

/// What RECEIVE_UPDATE_VMSA gives the hypervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedVmsa {
    /// The VMSA encrypted under the destination guest's memory key at its GPA
    /// (the host keeps this, as it keeps the launch-time encrypted VMSA).
    pub encrypted_vmsa: Box<[u8; VMSA_SIZE]>,
    /// Tracked registers derived from the authenticated VMSA plaintext.
    pub tracked: TrackedRegisters,
    /// The authenticated tracked extension.
    pub extension: TrackedExtension,
}

/// Checks RECEIVE_UPDATE_DATA / RECEIVE_UPDATE_VMSA packets for one guest.
/// Cheap to clone, `Send + Sync`, `&self` methods.
#[derive(Clone)]
pub struct ReceiveWorker {
    pub(crate) inner: Arc<RecvState>,
}

impl RecvState {
    pub(crate) fn new(
        handle: u32,
        keys: &TransportKeys,
        memkey: Arc<MemoryKey>,
        active: bool,
        es: bool,
        start: [u8; 32],
    ) -> RecvState {
        RecvState {
            handle,
            ch: Channel::new(keys, active, start),
            seen: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            memkey,
            vmsas: Mutex::new(BTreeMap::new()),
            es,
        }
    }

    pub(crate) fn close(&self, state: GuestState) {
        self.ch.close(state);
    }

    pub(crate) fn set_active(&self, a: bool) {
        self.ch.active.store(a, Ordering::Release);
    }

    pub(crate) fn finish_tag(&self) -> [u8; 32] {
        self.ch.finish_tag()
    }

    /// Marks a sequence number as used; error if it was used before.
    fn claim(&self, seq: u64) -> PspResult<()> {
        if seq >= MAX_SEQ {
            return Err(PspError::SecureDataInvalid(format!(
                "packet sequence number {seq} is out of range"
            )));
        }
        let mut seen = self.seen[(seq % SHARDS as u64) as usize]
            .lock()
            .map_err(|_| PspError::ResourceLimit("receive state lock poisoned".into()))?;
        let local = seq / SHARDS as u64;
        let (w, b) = ((local / 64) as usize, local % 64);
        if seen.len() <= w {
            seen.resize(w + 1, 0);
        }
        if seen[w] & (1 << b) != 0 {
            return Err(PspError::SecureDataInvalid(format!(
                "packet {seq} was already received: a replayed packet is refused"
            )));
        }
        seen[w] |= 1 << b;
        Ok(())
    }
}

fn bad_mac(what: &str) -> PspError {
    PspError::BadSignature(format!(
        "{what} MAC does not verify: the packet was altered, sent for another address or vCPU, or made with other transport keys; guest memory was not changed"
    ))
}

impl ReceiveWorker {
    /// The guest handle.
    pub fn handle(&self) -> u32 {
        self.inner.handle
    }

    /// RECEIVE_UPDATE_DATA: verifies the packet, decrypts it and writes the
    /// plaintext at `gpa` through the trusted path. Nothing is written unless
    /// every check passes.
    pub fn receive_update_data(
        &self,
        mem: &dyn GuestMemoryAccess,
        gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> PspResult<()> {
        let s = &*self.inner;
        s.ch.check_usable(s.handle, crate::Command::ReceiveUpdateData)?;
        check_flags(header.flags)?;
        check_len(ciphertext.len())?;
        let mac = s.ch.data_mac(header.flags, &header.iv, gpa, ciphertext);
        if !mac_eq(&mac, &header.mac) {
            return Err(bad_mac("data packet"));
        }
        s.claim(seq_of(&header.iv))?;
        s.ch.record(&mac);
        let mut stack = [0u8; PAGE_SIZE];
        let mut heap;
        let buf: &mut [u8] = if ciphertext.len() <= PAGE_SIZE {
            &mut stack[..ciphertext.len()]
        } else {
            heap = vec![0u8; ciphertext.len()];
            &mut heap[..]
        };
        s.ch.ctr(&header.iv)
            .apply_keystream_b2b(ciphertext, buf)
            .map_err(|_| PspError::InvalidParam("buffer length mismatch".into()))?;
        let written = mem.write(gpa, buf);
        wipe(buf);
        written?;
        Ok(())
    }

    /// RECEIVE_UPDATE_VMSA: verifies and decrypts a VMSA packet for vCPU
    /// `vcpu` whose VMSA lives at `vmsa_gpa`, re-encrypts the VMSA under the
    /// destination guest's memory key, and derives the tracked registers from
    /// the decrypted VMSA.
    pub fn receive_update_vmsa(
        &self,
        vcpu: u32,
        vmsa_gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> PspResult<ReceivedVmsa> {
        let s = &*self.inner;
        s.ch.check_usable(s.handle, crate::Command::ReceiveUpdateVmsa)?;
        if !s.es {
            return Err(not_es(crate::Command::ReceiveUpdateVmsa));
        }
        check_flags(header.flags)?;
        if ciphertext.len() != VMSA_PACKET_LEN {
            return Err(PspError::InvalidLen {
                what: "VMSA packet",
                expected: format!("{VMSA_PACKET_LEN} bytes"),
                got: ciphertext.len(),
            });
        }
        let mac =
            s.ch.vmsa_mac(header.flags, &header.iv, vcpu, vmsa_gpa, ciphertext);
        if !mac_eq(&mac, &header.mac) {
            return Err(bad_mac("VMSA packet"));
        }
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        s.ch.ctr(&header.iv).apply_keystream(&mut buf);
        let extension =
            TrackedExtension::from_bytes(&buf[VMSA_SIZE..]).map_err(PspError::InvalidParam)?;
        {
            let vmsas = s
                .vmsas
                .lock()
                .map_err(|_| PspError::ResourceLimit("receive state lock poisoned".into()))?;
            if let Some(g) = vmsas.get(&vcpu) {
                return Err(PspError::InvalidParam(format!(
                    "vCPU {vcpu}'s VMSA was already received (at GPA 0x{g:x})"
                )));
            }
        }
        s.claim(seq_of(&header.iv))?;
        s.ch.record(&mac);
        let mut page = Zeroizing::new([0u8; PAGE_SIZE]);
        page.copy_from_slice(&buf[..VMSA_SIZE]);
        let tracked = TrackedRegisters::from_vmsa(&page, extension.apic_base);
        s.memkey.encrypt_in_place(vmsa_gpa, &mut page);
        let encrypted_vmsa = Box::new(*page);
        s.vmsas
            .lock()
            .map_err(|_| PspError::ResourceLimit("receive state lock poisoned".into()))?
            .insert(vcpu, vmsa_gpa);
        Ok(ReceivedVmsa {
            encrypted_vmsa,
            tracked,
            extension,
        })
    }
}

/// What both sides fold into the transcript tag: SHA-256 of the source platform's PDH
/// certificate and the session blob, as SEND_START produced them and RECEIVE_START took them.
pub(crate) fn session_start_digest(pdh: &[u8], session: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(pdh);
    h.update(session);
    h.finalize().into()
}
