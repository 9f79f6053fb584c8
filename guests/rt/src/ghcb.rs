//! The guest side of the GHCB protocol: VMGEXIT, the MSR protocol, and requests described
//! in the GHCB page (the 4 KiB page the guest shares with the hypervisor).
//!
//! A request on the page goes like this (the hypervisor side, `crates/hv/src/ghcb/`, is
//! its exact peer):
//! 1. [`acquire`] takes the page (interrupts off, the busy flag set) and clears the valid
//!    bitmap;
//! 2. the caller sets the input fields (each setter also sets the field's valid bit);
//! 3. [`Ghcb::call`] sets SW_EXITCODE, SW_EXITINFO1, SW_EXITINFO2 (valid), the protocol
//!    version (0xFFA) and usage 0 (0xFFC), writes the page's GPA into the GHCB MSR and
//!    executes VMGEXIT;
//! 4. it then checks SW_EXITINFO1: 0 success, 1 raise the exception in SW_EXITINFO2
//!    (returned to the caller), 2 malformed request (terminate, reason
//!    `GHCB_MALFORMED` with the hypervisor's error code), anything else terminates;
//! 5. outputs are read with [`Ghcb::get`]/[`Ghcb::need`], which look at a field only if
//!    the hypervisor set its valid bit.
//!
//! The page is single-user: a second [`acquire`] while a request is in flight (a #VC or
//! an exception inside a transaction) terminates the guest (`GHCB_BUSY`). The MSR
//! protocol has no such state: it saves and restores the GHCB MSR around each exchange
//! and is usable at any time, before the page exists and from nested #VCs.

use crate::x86::{cli, hlt, rdmsr, rflags, sti, wrmsr, RFLAGS_IF};
use crate::Racy;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use esvm_abi::ghcb::{self, response, save_area as L};
use esvm_abi::msr_protocol;
use esvm_abi::sev::MSR_GHCB;
use esvm_abi::term;

/// The GHCB page itself, in the image's bss. `sev::boot` clears the C-bit of its PTE
/// (making it shared) and zeroes it before registering it.
#[repr(C, align(4096))]
pub(crate) struct Page(pub(crate) [u8; 4096]);

pub(crate) static PAGE: Racy<Page> = Racy::new(Page([0; 4096]));

/// GPA of the registered GHCB (0 = none yet).
static GPA: AtomicU64 = AtomicU64::new(0);
/// The negotiated protocol version.
static VERSION: AtomicU16 = AtomicU16::new(0);
/// A request is in flight on the page.
static BUSY: AtomicBool = AtomicBool::new(false);
/// VMGEXITs executed (both protocols).
static VMGEXITS: AtomicU64 = AtomicU64::new(0);

/// Executes VMGEXIT (`rep vmmcall`, F3 0F 01 D9). The hypervisor reads the GHCB MSR and
/// the page; execution continues after the instruction.
#[inline(always)]
pub fn vmgexit() {
    VMGEXITS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: VMGEXIT hands control to the hypervisor, which may change the GHCB page and
    // the GHCB MSR (no `nomem`: the compiler must not cache the page across it) but no
    // other guest state.
    unsafe {
        core::arch::asm!(
            ".byte 0xf3, 0x0f, 0x01, 0xd9",
            options(nostack, preserves_flags)
        )
    }
}

/// Number of VMGEXITs executed so far.
pub fn vmgexit_count() -> u64 {
    VMGEXITS.load(Ordering::Relaxed)
}

/// Whether a GHCB page is registered.
pub fn ready() -> bool {
    GPA.load(Ordering::Acquire) != 0
}

/// Whether a request is in flight on the page.
pub fn busy() -> bool {
    BUSY.load(Ordering::Acquire)
}

/// GPA of the registered GHCB page (0 = none).
pub fn gpa() -> u64 {
    GPA.load(Ordering::Acquire)
}

/// The negotiated GHCB protocol version (0 before negotiation).
pub fn version() -> u16 {
    VERSION.load(Ordering::Relaxed)
}

pub(crate) fn set_version(v: u16) {
    VERSION.store(v, Ordering::Relaxed);
}

/// Registers the (already shared and zeroed) page at `gpa`: from now on requests use it.
pub(crate) fn register(gpa: u64) {
    // SAFETY: the GHCB MSR is accessed directly (no #VC); the value is the page's GPA.
    unsafe { wrmsr(MSR_GHCB, gpa) };
    GPA.store(gpa, Ordering::Release);
}

fn interrupts_off() -> bool {
    let was_on = rflags() & RFLAGS_IF != 0;
    cli();
    was_on
}

/// One MSR-protocol exchange: writes `request` into the GHCB MSR, executes VMGEXIT and
/// returns the MSR's new value. Interrupts are off during the exchange and the MSR's
/// previous value (e.g. the GHCB GPA) is restored afterwards, so this is safe at any time.
pub fn msr_protocol_call(request: u64) -> u64 {
    let was_on = interrupts_off();
    let saved = rdmsr(MSR_GHCB);
    // SAFETY: the GHCB MSR only carries protocol requests; nothing else depends on it
    // until it is restored below.
    unsafe { wrmsr(MSR_GHCB, request) };
    vmgexit();
    let response = rdmsr(MSR_GHCB);
    // SAFETY: restores the value this function found.
    unsafe { wrmsr(MSR_GHCB, saved) };
    if was_on {
        sti();
    }
    response
}

/// Asks for termination through the MSR protocol (request 0x100) and never returns.
pub fn msr_terminate(reason_set: u8, reason_code: u8) -> ! {
    cli();
    // SAFETY: the guest is ending; the GHCB MSR carries the termination request.
    unsafe {
        wrmsr(
            MSR_GHCB,
            msr_protocol::term_request(reason_set, reason_code),
        )
    };
    vmgexit();
    loop {
        cli();
        hlt();
    }
}

/// CPUID through the MSR protocol (four requests, EAX..EDX). The protocol cannot carry
/// ECX, so sub-leaves are not supported (the hypervisor answers sub-leaf 0).
pub fn msr_cpuid(leaf: u32) -> Result<[u32; 4], u64> {
    let mut out = [0u32; 4];
    for (reg, slot) in out.iter_mut().enumerate() {
        let r = msr_protocol_call(msr_protocol::cpuid_request(leaf, reg as u8));
        *slot = msr_protocol::cpuid_response(r, reg as u8).ok_or(r)?;
    }
    Ok(out)
}

/// Exclusive use of the GHCB page for one or more requests; released on drop.
pub struct Ghcb {
    base: *mut u8,
    gpa: u64,
    interrupts_were_on: bool,
}

/// Takes the GHCB page: interrupts off, busy flag set, valid bitmap cleared. Terminates
/// the guest (`GHCB_BUSY`) if the page is in use, or through the MSR protocol if no page
/// is registered.
pub fn acquire() -> Ghcb {
    let interrupts_were_on = interrupts_off();
    let gpa = GPA.load(Ordering::Acquire);
    if gpa == 0 {
        msr_terminate(term::SET_ESVM, term::GHCB_SETUP);
    }
    if BUSY.swap(true, Ordering::AcqRel) {
        msr_terminate(term::SET_ESVM, term::GHCB_BUSY);
    }
    let mut g = Ghcb {
        base: PAGE.get() as *mut u8,
        gpa,
        interrupts_were_on,
    };
    g.reset();
    g
}

impl Drop for Ghcb {
    fn drop(&mut self) {
        BUSY.store(false, Ordering::Release);
        if self.interrupts_were_on {
            sti();
        }
    }
}

impl Ghcb {
    fn write_u8(&mut self, off: usize, v: u8) {
        debug_assert!(off < 4096);
        // SAFETY: `base` is the 4 KiB GHCB page, exclusively ours while `self` lives.
        unsafe { self.base.add(off).write_volatile(v) }
    }

    fn read_u8(&self, off: usize) -> u8 {
        // SAFETY: as for write_u8.
        unsafe { self.base.add(off).read_volatile() }
    }

    fn write_u64(&mut self, off: usize, v: u64) {
        // SAFETY: every field offset is 8-byte aligned inside the page.
        unsafe { (self.base.add(off) as *mut u64).write_volatile(v) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: as for write_u64.
        unsafe { (self.base.add(off) as *const u64).read_volatile() }
    }

    fn set_valid(&mut self, off: usize) {
        let bit = ghcb::valid_bit(off);
        let at = ghcb::VALID_BITMAP_OFFSET + bit / 8;
        let b = self.read_u8(at);
        self.write_u8(at, b | (1 << (bit % 8)));
    }

    /// Whether the field at `off` is marked valid.
    pub fn is_valid(&self, off: usize) -> bool {
        let bit = ghcb::valid_bit(off);
        self.read_u8(ghcb::VALID_BITMAP_OFFSET + bit / 8) & (1 << (bit % 8)) != 0
    }

    /// Clears the valid bitmap and SW_EXITCODE (start of a new request).
    pub fn reset(&mut self) {
        for i in 0..ghcb::VALID_BITMAP_SIZE {
            self.write_u8(ghcb::VALID_BITMAP_OFFSET + i, 0);
        }
        self.write_u64(L::SW_EXITCODE, 0);
    }

    /// Sets a quadword input field (a `ghcb_layout` offset) and its valid bit.
    pub fn set(&mut self, off: usize, v: u64) {
        self.write_u64(off, v);
        self.set_valid(off);
    }

    /// Sets the CPL field (one byte) and its valid bit.
    pub fn set_cpl(&mut self, cpl: u8) {
        self.write_u8(L::CPL, cpl);
        self.set_valid(L::CPL);
    }

    /// A quadword output field, if the hypervisor marked it valid.
    pub fn get(&self, off: usize) -> Option<u64> {
        self.is_valid(off).then(|| self.read_u64(off))
    }

    /// A quadword output field the request must return; terminates the guest
    /// (`GHCB_BAD_RESPONSE`, info = `exit_code`) if it is not marked valid.
    pub fn need(&mut self, off: usize, exit_code: u64) -> u64 {
        match self.get(off) {
            Some(v) => v,
            None => self.terminate(term::SET_ESVM, term::GHCB_BAD_RESPONSE, exit_code),
        }
    }

    /// GPA of the shared buffer (for SW_SCRATCH).
    pub fn buffer_gpa(&self) -> u64 {
        self.gpa + ghcb::SHARED_BUFFER_OFFSET as u64
    }

    /// Writes `data` into the shared buffer at `offset`.
    pub fn write_buffer(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if offset + i < ghcb::SHARED_BUFFER_SIZE {
                self.write_u8(ghcb::SHARED_BUFFER_OFFSET + offset + i, b);
            }
        }
    }

    /// Reads the shared buffer at `offset` into `out`.
    pub fn read_buffer(&self, offset: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = if offset + i < ghcb::SHARED_BUFFER_SIZE {
                self.read_u8(ghcb::SHARED_BUFFER_OFFSET + offset + i)
            } else {
                0
            };
        }
    }

    /// Completes the request (SW_EXITCODE/EXITINFO1/EXITINFO2, version, usage), executes
    /// VMGEXIT and checks the response. `Err(vector)`: the hypervisor asks the guest to
    /// raise this exception. Malformed or unusable responses terminate the guest.
    pub fn call(&mut self, exit_code: u64, info1: u64, info2: u64) -> Result<(), u8> {
        self.submit(exit_code, info1, info2);
        let Some(result) = self.get(L::SW_EXITINFO1) else {
            self.terminate(term::SET_ESVM, term::GHCB_BAD_RESPONSE, exit_code)
        };
        match result & 0xFFFF_FFFF {
            response::SUCCESS => Ok(()),
            response::ISSUE_EXCEPTION => {
                let event = self.get(L::SW_EXITINFO2).unwrap_or(0);
                if event & response::EVENT_VALID == 0
                    || event & response::EVENT_TYPE_MASK != response::EVENT_TYPE_EXCEPTION
                    || event & 0xFF >= 32
                {
                    self.terminate(term::SET_ESVM, term::GHCB_BAD_RESPONSE, exit_code)
                }
                Err(event as u8)
            }
            response::MALFORMED_INPUT => {
                let code = self.get(L::SW_EXITINFO2).unwrap_or(0);
                self.terminate(
                    term::SET_ESVM,
                    term::GHCB_MALFORMED,
                    (exit_code << 32) | (code & 0xFFFF_FFFF),
                )
            }
            _ => self.terminate(term::SET_ESVM, term::GHCB_BAD_RESPONSE, exit_code),
        }
    }

    /// Fills in the request's exit fields, version and usage and executes VMGEXIT.
    fn submit(&mut self, exit_code: u64, info1: u64, info2: u64) {
        self.set(L::SW_EXITCODE, exit_code);
        self.set(L::SW_EXITINFO1, info1);
        self.set(L::SW_EXITINFO2, info2);
        let v = version().to_le_bytes();
        self.write_u8(ghcb::PROTOCOL_VERSION_OFFSET, v[0]);
        self.write_u8(ghcb::PROTOCOL_VERSION_OFFSET + 1, v[1]);
        for i in 0..4 {
            self.write_u8(ghcb::USAGE_OFFSET + i, 0);
        }
        // SAFETY: the GHCB MSR holds the GPA of the registered page for the request.
        unsafe { wrmsr(MSR_GHCB, self.gpa) };
        vmgexit();
    }

    /// Asks for termination with a GHCB TERM_REQUEST (SW_EXITINFO1 = set | code << 4,
    /// SW_EXITINFO2 = `info`); falls back to the MSR protocol if the hypervisor resumes.
    pub fn terminate(&mut self, reason_set: u8, reason_code: u8, info: u64) -> ! {
        self.reset();
        let info1 = term::ghcb_exit_info1(reason_set, reason_code);
        // No response check: whatever the hypervisor answers, the guest stops here.
        self.submit(esvm_abi::exit_code::TERM_REQUEST, info1, info);
        msr_terminate(reason_set, reason_code)
    }
}
