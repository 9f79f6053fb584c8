//! SEV-ES support of the guest runtime (opt-in per guest).
//!
//! A guest chooses its [`SevMode`] with [`crate::entry!`]: `entry!(main)` (none),
//! `entry!(main, sev_es)` (full) or `entry!(main, sev_es_no_vc)` (a GHCB but no #VC
//! handler). When the boot-info block carries `FLAG_PROTECTED_STATE`, `_start` has saved
//! the FPU state of the first instruction (see [`entry_fxsave`]) and, after the GDT and
//! IDT are loaded, [`boot`] does, for the full mode:
//!
//! 1. install the #VC handler (`vc.rs`, IDT gate 29 on its own IST stack), still without a
//!    GHCB: it can only serve CPUID, through the GHCB MSR protocol;
//! 2. SEV_INFO over the MSR protocol: the hypervisor's protocol range (the runtime speaks
//!    versions 1..=2 and uses the highest common one) and C-bit position;
//! 3. CPUID 0x8000_001F (a real CPUID instruction, served by the early #VC path): SEV and
//!    SEV-ES present, the C-bit position equal to SEV_INFO's, and set in CR3;
//! 4. the GHCB page: split the 2 MiB page that holds it, clear the C-bit of its 4 KiB PTE
//!    (INVLPG), zero it through the now shared mapping, write its GPA into the GHCB MSR;
//! 5. SEV_STATUS (MSR 0xC001_0131): SEV-ES enabled.
//!
//! Any failure ends the VM with a termination request (`esvm_abi::term`, reason set 1);
//! before the GHCB exists only the MSR protocol can carry it, so there is no message.
//!
//! From then on serial output goes straight to the GHCB ([`serial_write`]: each line is
//! one `REP OUTSB` of the line through the shared buffer, i.e. one VMGEXIT per line, no
//! #VC), and [`crate::exit`] writes the debug-exit port through the GHCB. Other port I/O,
//! MSRs, CPUID, MMIO ... go through #VC.
//!
//! `sev_es_no_vc` does steps 2-4 with MSR-protocol CPUID calls and leaves IDT gate 29 not
//! present; a guest without SEV-ES support (`entry!(main)`) booted protected gets an
//! empty IDT, so its first #VC shuts the VM down (there is no way for it to print).

use crate::ghcb;
use crate::x86::{self, invlpg, read_cr3, write_cr3};
use crate::Racy;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use esvm_abi::boot::{BootInfo, DEBUG_EXIT_PORT, FLAG_PROTECTED_STATE, SERIAL_PORT};
use esvm_abi::ghcb::{ioio, save_area, SHARED_BUFFER_SIZE};
use esvm_abi::sev::{
    CPUID_SEV_EAX_SEV, CPUID_SEV_EAX_SEV_ES, CPUID_SEV_EBX_CBIT_MASK, CPUID_SEV_LEAF,
    MSR_SEV_STATUS, SEV_STATUS_SEV_ES, VC_VECTOR,
};
use esvm_abi::testing::checkpoint;
use esvm_abi::{exit_code, msr_protocol, term};

pub use crate::ghcb::{msr_cpuid, msr_terminate, vmgexit_count};

/// How a guest handles SEV-ES, chosen with [`crate::entry!`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SevMode {
    /// No SEV-ES support: booted protected, the guest gets an empty IDT.
    None = 0,
    /// GHCB, #VC handler, serial and exit through the GHCB.
    Full = 1,
    /// GHCB, serial and exit through the GHCB, but no #VC handler (gate 29 not present).
    NoVc = 2,
}

// ---------------------------------------------------------------------------------------
// State.

/// The mode in effect (SevMode as u8; 0 also for a boot without the protected flag).
static ACTIVE: AtomicU8 = AtomicU8::new(0);
/// The boot-info block had FLAG_PROTECTED_STATE.
static PROTECTED: AtomicBool = AtomicBool::new(false);
/// The C-bit position in use (0 = not negotiated).
static C_BIT: AtomicU8 = AtomicU8::new(0);
/// SEV_INFO response fields: max version << 16 | min version.
static HV_VERSIONS: AtomicU32 = AtomicU32::new(0);
/// CPUID 0x8000_001F EAX and EBX as the guest saw them.
static CPUID_EAX: AtomicU32 = AtomicU32::new(0);
static CPUID_EBX: AtomicU32 = AtomicU32::new(0);
/// SEV_STATUS as read at boot (u64::MAX = not read).
static SEV_STATUS: AtomicU64 = AtomicU64::new(u64::MAX);
/// Set while `terminate` runs (a failure inside it goes straight to the MSR protocol).
static TERMINATING: AtomicBool = AtomicBool::new(false);

/// What the runtime learnt while setting up SEV-ES.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SevInfo {
    /// The mode in effect.
    pub mode: SevMode,
    /// The negotiated GHCB protocol version.
    pub version: u16,
    /// The hypervisor's protocol range from SEV_INFO.
    pub hv_min_version: u16,
    pub hv_max_version: u16,
    /// The C-bit position (SEV_INFO and CPUID agree).
    pub c_bit: u8,
    /// CPUID 0x8000_001F EAX and EBX.
    pub cpuid_eax: u32,
    pub cpuid_ebx: u32,
    /// SEV_STATUS (None in the no-#VC mode, which does not read it).
    pub sev_status: Option<u64>,
    /// GPA of the GHCB page.
    pub ghcb_gpa: u64,
}

/// Whether the boot-info block said the guest runs with protected state.
pub fn protected() -> bool {
    PROTECTED.load(Ordering::Relaxed)
}

/// The SEV-ES setup, if the guest runs protected with GHCB support.
pub fn info() -> Option<SevInfo> {
    let mode = match ACTIVE.load(Ordering::Acquire) {
        1 => SevMode::Full,
        2 => SevMode::NoVc,
        _ => return None,
    };
    let versions = HV_VERSIONS.load(Ordering::Relaxed);
    let status = SEV_STATUS.load(Ordering::Relaxed);
    Some(SevInfo {
        mode,
        version: ghcb::version(),
        hv_min_version: versions as u16,
        hv_max_version: (versions >> 16) as u16,
        c_bit: C_BIT.load(Ordering::Relaxed),
        cpuid_eax: CPUID_EAX.load(Ordering::Relaxed),
        cpuid_ebx: CPUID_EBX.load(Ordering::Relaxed),
        sev_status: (status != u64::MAX).then_some(status),
        ghcb_gpa: ghcb::gpa(),
    })
}

/// Number of #VC exceptions handled so far.
pub fn vc_count() -> u64 {
    crate::vc::count()
}

// ---------------------------------------------------------------------------------------
// The FPU state at the first instruction.

/// A 64-byte aligned FXSAVE area.
#[repr(C, align(64))]
pub struct FxArea(pub [u8; 512]);

/// Written by `_start` (FXSAVE64) before any other instruction touches x87/SSE state, if
/// the boot-info block has FLAG_PROTECTED_STATE.
#[no_mangle]
static ESVM_RT_ENTRY_FXSAVE: Racy<FxArea> = Racy::new(FxArea([0; 512]));
/// Set to 1 by `_start` after the FXSAVE.
#[no_mangle]
static ESVM_RT_ENTRY_FXSAVE_VALID: AtomicU8 = AtomicU8::new(0);

/// The FXSAVE image `_start` took at the guest's first instruction (protected boots only).
pub fn entry_fxsave() -> Option<&'static [u8; 512]> {
    if ESVM_RT_ENTRY_FXSAVE_VALID.load(Ordering::Acquire) == 0 {
        return None;
    }
    // SAFETY: written once by `_start` before any Rust code ran, never again.
    Some(unsafe { &(*ESVM_RT_ENTRY_FXSAVE.get()).0 })
}

// ---------------------------------------------------------------------------------------
// Boot.

/// Called by `esvm_rt_start` after the GDT and IDT are loaded. Does nothing unless the
/// boot-info block has FLAG_PROTECTED_STATE.
pub(crate) fn boot(bi: &BootInfo, mode: SevMode) {
    if bi.flags & FLAG_PROTECTED_STATE == 0 {
        return;
    }
    PROTECTED.store(true, Ordering::Relaxed);
    match mode {
        SevMode::None => {
            // No #VC handler at all: the first NAE event cannot be delivered (#GP, #DF,
            // shutdown) instead of recursing through handlers that print.
            let empty = x86::DescriptorPointer { limit: 0, base: 0 };
            // SAFETY: deliberately leaves the guest without exception handling.
            unsafe { x86::lidt(&empty) };
            return;
        }
        SevMode::Full => crate::vc::install(),
        SevMode::NoVc => crate::idt::set_gate(
            VC_VECTOR,
            crate::idt::GateOptions {
                present: false,
                ..crate::idt::GateOptions::default()
            },
        ),
    }

    // 1. Protocol version and C-bit from the hypervisor.
    let r = ghcb::msr_protocol_call(msr_protocol::SEV_INFO_REQ);
    let Some(hv) = msr_protocol::sev_info(r) else {
        msr_terminate(term::SET_ESVM, term::BAD_SEV_INFO)
    };
    let Some(version) = msr_protocol::negotiate(hv) else {
        msr_terminate(term::SET_GENERAL, term::PROTOCOL_UNSUPPORTED)
    };
    ghcb::set_version(version);
    HV_VERSIONS.store(
        u32::from(hv.min_version) | (u32::from(hv.max_version) << 16),
        Ordering::Relaxed,
    );

    // 2. CPUID: through the early #VC path (full mode) or explicit MSR-protocol requests.
    let cpuid = |leaf: u32| -> [u32; 4] {
        if mode == SevMode::Full {
            let (a, b, c, d) = x86::cpuid(leaf, 0);
            [a, b, c, d]
        } else {
            match msr_cpuid(leaf) {
                Ok(v) => v,
                Err(_) => msr_terminate(term::SET_ESVM, term::BAD_CPUID_RESPONSE),
            }
        }
    };
    let max_ext = cpuid(0x8000_0000)[0];
    let sev_leaf = if max_ext >= CPUID_SEV_LEAF {
        cpuid(CPUID_SEV_LEAF)
    } else {
        [0; 4]
    };
    CPUID_EAX.store(sev_leaf[0], Ordering::Relaxed);
    CPUID_EBX.store(sev_leaf[1], Ordering::Relaxed);
    let both = CPUID_SEV_EAX_SEV | CPUID_SEV_EAX_SEV_ES;
    if sev_leaf[0] & both != both {
        msr_terminate(term::SET_ESVM, term::NOT_SEV_ES);
    }
    let c_bit = (sev_leaf[1] & CPUID_SEV_EBX_CBIT_MASK) as u8;
    // The C-bit must be a physical-address bit above guest memory, and the loader must
    // have set it in CR3 (all memory private).
    if c_bit != hv.c_bit
        || !(32..=51).contains(&c_bit)
        || read_cr3() & (1u64 << c_bit) == 0
        || bi.mem_size > (1u64 << c_bit)
    {
        msr_terminate(term::SET_ESVM, term::C_BIT_MISMATCH);
    }
    C_BIT.store(c_bit, Ordering::Relaxed);

    // 3. The GHCB page: shared, zeroed, registered.
    let page = ghcb::PAGE.get() as u64;
    if set_encrypted(page, false).is_err() {
        msr_terminate(term::SET_ESVM, term::GHCB_SETUP);
    }
    // On hardware the page's cache lines would be flushed before changing its
    // encryption; the software CPU has no cache. Zero it through the shared mapping (its
    // old contents read back as ciphertext).
    let p = page as *mut u64;
    for i in 0..512 {
        // SAFETY: the GHCB page is ours, 4 KiB, and mapped (now shared).
        unsafe { p.add(i).write_volatile(0) };
    }
    ghcb::register(page);
    ACTIVE.store(mode as u8, Ordering::Release);

    // 4. SEV_STATUS (a RDMSR: direct or through #VC, which now works).
    if mode == SevMode::Full {
        let status = x86::rdmsr(MSR_SEV_STATUS);
        SEV_STATUS.store(status, Ordering::Relaxed);
        if status & SEV_STATUS_SEV_ES == 0 {
            terminate(term::SET_ESVM, term::NOT_SEV_ES, status);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Termination and exit.

/// Ends the VM with a termination request: prints a `FAIL: SEV-ES:` line and uses the GHCB
/// TERM_REQUEST (SW_EXITINFO2 = `info`) when a GHCB is available, the MSR protocol
/// otherwise.
pub fn terminate(reason_set: u8, reason_code: u8, info: u64) -> ! {
    if ghcb::ready() && !ghcb::busy() && !TERMINATING.swap(true, Ordering::AcqRel) {
        crate::println!(
            "FAIL: SEV-ES: terminating: {} (reason set {}, code {}, info {})",
            term::describe(reason_set, reason_code),
            crate::Dec(u64::from(reason_set)),
            crate::Dec(u64::from(reason_code)),
            crate::Hex(info)
        );
        flush();
        ghcb::acquire().terminate(reason_set, reason_code, info)
    }
    msr_terminate(reason_set, reason_code)
}

/// Ends the VM with a GHCB TERM_REQUEST without printing anything.
pub fn ghcb_terminate(reason_set: u8, reason_code: u8, info: u64) -> ! {
    if ghcb::ready() && !ghcb::busy() {
        flush();
        ghcb::acquire().terminate(reason_set, reason_code, info)
    }
    msr_terminate(reason_set, reason_code)
}

/// NMI_COMPLETE (GHCB NAE event 0x8000_0003): this vCPU's NMI handling is finished, the
/// hypervisor may deliver the next NMI. Error: the hypervisor's SW_EXITINFO1 error code.
pub fn nmi_complete() -> Result<(), u8> {
    ghcb::acquire().call(exit_code::NMI_COMPLETE, 0, 0)
}

/// AP_JUMP_TABLE (GHCB NAE event 0x8000_0005): with `Some(gpa)` sets the VM's AP jump table
/// (SET), with `None` asks for it (GET). Returns the hypervisor's answer to a GET (0 for a
/// SET). Error: the hypervisor's SW_EXITINFO1 error code.
pub fn ap_jump_table(set: Option<u64>) -> Result<u64, u8> {
    let mut g = ghcb::acquire();
    match set {
        Some(gpa) => g.call(exit_code::AP_JUMP_TABLE, 0, gpa).map(|()| 0),
        None => {
            g.call(exit_code::AP_JUMP_TABLE, 1, 0)?;
            Ok(g.get(esvm_abi::ghcb::save_area::SW_EXITINFO2).unwrap_or(0))
        }
    }
}

/// Whether the GHCB page is in use: an NMI handler that finds it so must not take it.
pub fn ghcb_busy() -> bool {
    ghcb::busy()
}

/// Called by [`crate::exit`]: with a GHCB, flushes serial output and writes the
/// debug-exit port through it (never returns). Returns without a GHCB.
pub(crate) fn exit_hook(code: u32) {
    if !ghcb::ready() {
        return;
    }
    flush();
    let _ = io_out(DEBUG_EXIT_PORT, 1, code & 0xFF);
    loop {
        x86::cli();
        x86::hlt();
    }
}

// ---------------------------------------------------------------------------------------
// Port I/O straight through the GHCB (no #VC).

/// Writes `value` (`size` = 1, 2 or 4 bytes) to `port` with a GHCB IOIO request.
/// `Err(vector)`: the hypervisor asked for an exception.
pub fn io_out(port: u16, size: u8, value: u32) -> Result<(), u8> {
    let mut g = ghcb::acquire();
    let mask = match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    g.set(save_area::RAX, u64::from(value & mask));
    g.call(
        exit_code::IOIO,
        ioio::exit_info1(port, size, false, false, false, 64),
        0,
    )
}

/// Reads `size` bytes (1, 2 or 4) from `port` with a GHCB IOIO request.
pub fn io_in(port: u16, size: u8) -> Result<u32, u8> {
    let mut g = ghcb::acquire();
    g.call(
        exit_code::IOIO,
        ioio::exit_info1(port, size, true, false, false, 64),
        0,
    )?;
    let v = g.need(save_area::RAX, exit_code::IOIO);
    Ok(match size {
        1 => v as u32 & 0xFF,
        2 => v as u32 & 0xFFFF,
        _ => v as u32,
    })
}

/// Writes a 32-bit value to the checkpoint port ([`checkpoint::PORT`]).
pub fn checkpoint(value: u32) {
    flush();
    if io_out(checkpoint::PORT, 4, value).is_err() {
        terminate(term::SET_ESVM, term::GHCB_BAD_RESPONSE, exit_code::IOIO);
    }
}

/// `REP OUTSB` of `bytes` to `port` through the shared buffer, one VMGEXIT per 2032 bytes.
pub fn outs(port: u16, bytes: &[u8]) -> Result<(), u8> {
    for chunk in bytes.chunks(SHARED_BUFFER_SIZE) {
        let mut g = ghcb::acquire();
        g.write_buffer(0, chunk);
        let scratch = g.buffer_gpa();
        g.set(save_area::SW_SCRATCH, scratch);
        g.call(
            exit_code::IOIO,
            ioio::exit_info1(port, 1, false, true, true, 64),
            chunk.len() as u64,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Serial output through the GHCB: line-buffered, one VMGEXIT per line.

const LINE_MAX: usize = SHARED_BUFFER_SIZE;
static LINE: Racy<[u8; LINE_MAX]> = Racy::new([0; LINE_MAX]);
static LINE_LEN: AtomicUsize = AtomicUsize::new(0);
static LINE_BUSY: AtomicBool = AtomicBool::new(false);

fn serial_out(bytes: &[u8]) {
    if outs(SERIAL_PORT, bytes).is_err() {
        terminate(term::SET_ESVM, term::GHCB_BAD_RESPONSE, exit_code::IOIO);
    }
}

/// The serial driver's hook: with a GHCB, buffers `bytes` and sends each complete line
/// (or a full buffer) with one string-I/O request; returns false without a GHCB (the
/// driver then does port I/O itself). The UART's LSR is not polled: the esvm UART accepts
/// THR writes at any time.
pub fn serial_write(bytes: &[u8]) -> bool {
    if !ghcb::ready() {
        return false;
    }
    if LINE_BUSY.swap(true, Ordering::Acquire) {
        // Printing from an exception that interrupted printing: bypass the buffer.
        serial_out(bytes);
        return true;
    }
    let line = LINE.get();
    let mut len = LINE_LEN.load(Ordering::Relaxed);
    for &b in bytes {
        // SAFETY: LINE_BUSY gives exclusive access; len < LINE_MAX.
        unsafe { (*line)[len] = b };
        len += 1;
        if b == b'\n' || len == LINE_MAX {
            // SAFETY: as above; the first `len` bytes are initialised.
            serial_out(unsafe { &(&*line)[..len] });
            len = 0;
        }
    }
    LINE_LEN.store(len, Ordering::Relaxed);
    LINE_BUSY.store(false, Ordering::Release);
    true
}

/// Sends any buffered partial line.
pub fn flush() {
    if !ghcb::ready() || ghcb::busy() || LINE_BUSY.swap(true, Ordering::Acquire) {
        return;
    }
    let len = LINE_LEN.swap(0, Ordering::Relaxed);
    if len != 0 {
        // SAFETY: LINE_BUSY gives exclusive access; the first `len` bytes are initialised.
        serial_out(unsafe { &(&*LINE.get())[..len] });
    }
    LINE_BUSY.store(false, Ordering::Release);
}

// ---------------------------------------------------------------------------------------
// Page tables with a C-bit.

const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// Why a page's encryption could not be changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageError {
    /// No C-bit negotiated (not an SEV-ES boot).
    NoCBit,
    /// Non-canonical address.
    BadAddress,
    /// Not mapped.
    NotMapped,
    /// No memory for a page table.
    OutOfMemory,
}

fn c_mask() -> u64 {
    match C_BIT.load(Ordering::Relaxed) {
        0 => 0,
        b => 1u64 << b,
    }
}

fn table(entry: u64) -> *mut u64 {
    (entry & ADDR_MASK & !c_mask()) as *mut u64
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * level)) & 0x1FF) as usize
}

fn canonical(va: u64) -> bool {
    let top = (va as i64) >> 47;
    top == 0 || top == -1
}

/// A translation through the live page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address (without the C-bit).
    pub phys: u64,
    /// The leaf entry has the C-bit set (private memory).
    pub encrypted: bool,
    /// Page size in bytes.
    pub page_size: u64,
}

/// Translates `va` through the live tables, understanding the C-bit.
pub fn translate(va: u64) -> Option<Translation> {
    if !canonical(va) {
        return None;
    }
    let cm = c_mask();
    let mut t = table(read_cr3());
    for level in (0..=3u32).rev() {
        // SAFETY: `t` is a live table reached from CR3 (identity-mapped); index < 512.
        let e = unsafe { t.add(index(va, level)).read_volatile() };
        if e & P == 0 {
            return None;
        }
        if level == 0 || (e & PS != 0 && level <= 2) {
            let size = 1u64 << (12 + 9 * level);
            return Some(Translation {
                phys: (e & ADDR_MASK & !cm & !(size - 1)) | (va & (size - 1)),
                encrypted: cm != 0 && e & cm != 0,
                page_size: size,
            });
        }
        t = table(e);
    }
    None
}

/// Splits the huge entry `*entry` (mapping `1 << shift` bytes) into a private table of
/// 512 entries mapping the same memory with the same flags and C-bit.
///
/// # Safety
/// `entry` must point at a live PDPT (shift 30) or PD (shift 21) entry with PS set.
unsafe fn split(entry: *mut u64, shift: u32) -> Result<(), PageError> {
    let cm = c_mask();
    // SAFETY: the caller guarantees `entry` is live.
    let old = unsafe { entry.read_volatile() };
    let new_table = crate::mem::alloc_pages(1).ok_or(PageError::OutOfMemory)?;
    let child_size = 1u64 << (shift - 9);
    let flags = old & (0xFFF | NX);
    let child_flags = if shift == 21 { flags & !PS } else { flags };
    let base = old & ADDR_MASK & !cm & !((1u64 << shift) - 1);
    let t = new_table as *mut u64;
    for i in 0..512u64 {
        // SAFETY: a freshly allocated, identity-mapped (private) page of ours.
        unsafe {
            t.add(i as usize)
                .write_volatile((base + i * child_size) | (old & cm) | child_flags)
        };
    }
    // Tables stay private: the C-bit is set in every non-leaf entry.
    let parent = new_table | cm | P | RW | US | (old & ACCESSED);
    // SAFETY: the new table maps exactly what the huge entry did; reloading CR3 drops any
    // cached huge translation.
    unsafe {
        entry.write_volatile(parent);
        write_cr3(read_cr3());
    }
    Ok(())
}

/// Sets or clears the C-bit of the 4 KiB page at `va` (splitting a huge page that holds
/// it), then INVLPG. Clearing makes the page shared with the hypervisor; its contents
/// must be rewritten through the new mapping before use.
pub fn set_encrypted(va: u64, encrypted: bool) -> Result<(), PageError> {
    let cm = c_mask();
    if cm == 0 {
        return Err(PageError::NoCBit);
    }
    if !canonical(va) {
        return Err(PageError::BadAddress);
    }
    let mut t = table(read_cr3());
    for level in (1..=3u32).rev() {
        // SAFETY: `t` is a live table reached from CR3; index < 512.
        let e = unsafe { t.add(index(va, level)) };
        // SAFETY: as above.
        let v = unsafe { e.read_volatile() };
        if v & P == 0 {
            return Err(PageError::NotMapped);
        }
        if v & PS != 0 {
            if level == 3 {
                return Err(PageError::NotMapped);
            }
            // SAFETY: `e` is a live huge PDPT (level 2) or PD (level 1) entry.
            unsafe { split(e, 12 + 9 * level)? };
        }
        // SAFETY: as above.
        t = table(unsafe { e.read_volatile() });
    }
    // SAFETY: `t` is the page table for `va`.
    let pte = unsafe { t.add(index(va, 0)) };
    // SAFETY: as above.
    let old = unsafe { pte.read_volatile() };
    if old & P == 0 {
        return Err(PageError::NotMapped);
    }
    let new = if encrypted { old | cm } else { old & !cm };
    // SAFETY: changes only the C-bit of the live PTE of `va`.
    unsafe { pte.write_volatile(new) };
    invlpg(va);
    Ok(())
}
