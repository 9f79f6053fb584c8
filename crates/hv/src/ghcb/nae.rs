//! The GHCB page protocol: non-automatic-exit (NAE) events described in the GHCB page.
//!
//! Exit codes, response codes and the IOIO encoding are the guest ABI's
//! ([`esvm_abi::exit_code`], [`esvm_abi::ghcb`]).

use esvm_abi::exit_code;
use esvm_abi::ghcb::{
    ioio, response, GHCB_PAGE_SIZE, GHCB_USAGE_STANDARD, SHARED_BUFFER_END, SHARED_BUFFER_OFFSET,
};

use super::page::{GhcbField, GhcbPage};
use super::services::{CpuidRequest, GhcbServices, IoSize, ServiceError, VmmcallRegs};
use super::{ApResetHold, GhcbState};

/// Reason codes carried in SW_EXITINFO2 when SW_EXITINFO1 = 2 (malformed input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u64)]
pub enum GhcbErrorCode {
    /// The GHCB used is not the one the guest registered.
    NotRegistered = 1,
    /// The usage field is not a supported value.
    InvalidUsage = 2,
    /// SW_SCRATCH is missing the mark or does not describe an acceptable area.
    InvalidScratchArea = 3,
    /// A field the event needs is not marked valid.
    MissingInput = 4,
    /// A field holds a value the hypervisor cannot act on.
    InvalidInput = 5,
    /// SW_EXITCODE names no event the hypervisor handles.
    InvalidEvent = 6,
}

/// What the guest finds in SW_EXITINFO1/2 after a VMGEXIT that resumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestResponse {
    /// Handled; results are in the page.
    Success,
    /// The guest is told to raise this exception (#GP = 13 or #UD = 6).
    Exception { vector: u8 },
    /// The guest gets a GHCB error. `detail` explains it for the VMM's log.
    Malformed { code: GhcbErrorCode, detail: String },
}

/// What the VMM must do after a GHCB-page VMGEXIT. In every case the page holds the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GhcbOutcome {
    /// Resume the guest.
    Resume(GuestResponse),
    /// NMI_COMPLETE: the guest's NMI handler finished; unblock NMIs for this vCPU and resume.
    NmiComplete,
    /// AP_HLT_LOOP: park this vCPU until it is woken (INIT-SIPI), then call
    /// [`GhcbState::release_ap_reset_hold`] and resume.
    ApResetHold,
    /// TERM_REQUEST: the guest asks to be terminated (`SW_EXITINFO1[3:0]` reason set, `[11:4]`
    /// reason code, SW_EXITINFO2 extra information). Stop it and report.
    Terminate {
        reason_set: u8,
        reason_code: u8,
        info: u64,
    },
    /// UNSUPPORTED_EVENT: the guest's #VC handler met an event it cannot handle (SW_EXITINFO1/2
    /// as it reported them). Stop it and report.
    UnsupportedEvent { info1: u64, info2: u64 },
}

/// A failed request: what the guest is told.
#[derive(Debug)]
enum Fail {
    Malformed(GhcbErrorCode, String),
    Exception(u8),
}

fn malformed<T>(code: GhcbErrorCode, detail: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Malformed(code, detail.into()))
}

/// Map a service error to what the guest is told.
fn service_fail(what: &str, e: ServiceError) -> Fail {
    match e {
        ServiceError::GeneralProtection => Fail::Exception(13),
        ServiceError::InvalidOpcode => Fail::Exception(6),
        ServiceError::Refused(why) => Fail::Malformed(
            GhcbErrorCode::InvalidInput,
            format!("the VMM refused {what}: {why}"),
        ),
    }
}

/// The inputs captured from the page before the valid bitmap is cleared.
#[derive(Debug, Default)]
struct Inputs {
    rax: Option<u64>,
    rbx: Option<u64>,
    rcx: Option<u64>,
    rdx: Option<u64>,
    rsi: Option<u64>,
    cpl: Option<u8>,
    xcr0: Option<u64>,
    xss: Option<u64>,
    exit_code: Option<u64>,
    info1: Option<u64>,
    info2: Option<u64>,
    scratch: Option<u64>,
    usage: u32,
    version: u16,
}

impl Inputs {
    fn capture(page: &GhcbPage<'_>) -> Self {
        Inputs {
            rax: page.rax(),
            rbx: page.rbx(),
            rcx: page.rcx(),
            rdx: page.rdx(),
            rsi: page.rsi(),
            cpl: page.cpl(),
            xcr0: page.xcr0(),
            xss: page.xss(),
            exit_code: page.sw_exit_code(),
            info1: page.sw_exit_info1(),
            info2: page.sw_exit_info2(),
            scratch: page.sw_scratch(),
            usage: page.usage(),
            version: page.protocol_version(),
        }
    }
}

/// Results to write back.
#[derive(Debug, Default)]
struct Reply {
    rax: Option<u64>,
    rbx: Option<u64>,
    rcx: Option<u64>,
    rdx: Option<u64>,
    info2: u64,
}

/// What happens after a successful request.
enum Next {
    Resume,
    NmiComplete,
    ApResetHold,
    Terminate {
        reason_set: u8,
        reason_code: u8,
        info: u64,
    },
    UnsupportedEvent {
        info1: u64,
        info2: u64,
    },
}

fn need(value: Option<u64>, field: &str, event: &str) -> Result<u64, Fail> {
    value.ok_or_else(|| {
        Fail::Malformed(
            GhcbErrorCode::MissingInput,
            format!("{event} needs {field}, which the guest did not mark valid"),
        )
    })
}

/// Handle a VMGEXIT whose GHCB MSR held `ghcb_gpa` (page aligned) and whose GHCB is `page`.
///
/// Reads only fields marked valid, then clears the valid bitmap, and writes back SW_EXITINFO1,
/// SW_EXITINFO2 and the registers it returns, each with its valid bit; bulk data goes to the
/// scratch area (in the page's shared buffer, or shared guest memory through `services`).
/// Never panics; every guest mistake becomes a GHCB error response.
pub fn handle_ghcb<S: GhcbServices + ?Sized>(
    page: &mut [u8; GHCB_PAGE_SIZE],
    ghcb_gpa: u64,
    services: &mut S,
    state: &mut GhcbState,
) -> GhcbOutcome {
    let mut view = GhcbPage::new(page);
    let inputs = Inputs::capture(&view);
    view.clear_valid_bitmap();
    let mut reply = Reply::default();
    let result = process(&inputs, &mut view, ghcb_gpa, services, state, &mut reply);
    match result {
        Ok(next) => {
            for (field, value) in [
                (GhcbField::Rax, reply.rax),
                (GhcbField::Rbx, reply.rbx),
                (GhcbField::Rcx, reply.rcx),
                (GhcbField::Rdx, reply.rdx),
            ] {
                if let Some(v) = value {
                    view.set(field, v);
                }
            }
            view.set_sw_exit_info1(response::SUCCESS);
            view.set_sw_exit_info2(reply.info2);
            match next {
                Next::Resume => GhcbOutcome::Resume(GuestResponse::Success),
                Next::NmiComplete => GhcbOutcome::NmiComplete,
                Next::ApResetHold => GhcbOutcome::ApResetHold,
                Next::Terminate {
                    reason_set,
                    reason_code,
                    info,
                } => GhcbOutcome::Terminate {
                    reason_set,
                    reason_code,
                    info,
                },
                Next::UnsupportedEvent { info1, info2 } => {
                    GhcbOutcome::UnsupportedEvent { info1, info2 }
                }
            }
        }
        Err(Fail::Exception(vector)) => {
            view.set_sw_exit_info1(response::ISSUE_EXCEPTION);
            view.set_sw_exit_info2(
                response::EVENT_VALID | response::EVENT_TYPE_EXCEPTION | u64::from(vector),
            );
            GhcbOutcome::Resume(GuestResponse::Exception { vector })
        }
        Err(Fail::Malformed(code, detail)) => {
            view.set_sw_exit_info1(response::MALFORMED_INPUT);
            view.set_sw_exit_info2(code as u64);
            GhcbOutcome::Resume(GuestResponse::Malformed { code, detail })
        }
    }
}

fn process<S: GhcbServices + ?Sized>(
    inp: &Inputs,
    view: &mut GhcbPage<'_>,
    ghcb_gpa: u64,
    services: &mut S,
    state: &mut GhcbState,
    reply: &mut Reply,
) -> Result<Next, Fail> {
    use exit_code as ec;
    use GhcbErrorCode as E;

    if inp.usage != GHCB_USAGE_STANDARD {
        return malformed(
            E::InvalidUsage,
            format!("GHCB usage {:#x} is not the standard usage 0", inp.usage),
        );
    }
    let (min, max) = (state.config.min_version, state.config.max_version);
    if inp.version < min || inp.version > max {
        return malformed(
            E::InvalidInput,
            format!(
                "GHCB protocol version {} is outside the supported range {min}..={max}",
                inp.version
            ),
        );
    }
    if let Some(registered) = state.registered_gpa {
        if registered != ghcb_gpa {
            return malformed(
                E::NotRegistered,
                format!("GHCB at {ghcb_gpa:#x} is not the registered GHCB {registered:#x}"),
            );
        }
    }
    let (Some(code), Some(info1), Some(info2)) = (inp.exit_code, inp.info1, inp.info2) else {
        return malformed(
            E::MissingInput,
            "SW_EXITCODE, SW_EXITINFO1 and SW_EXITINFO2 must all be marked valid",
        );
    };
    state.negotiated_version = Some(inp.version);

    match code {
        ec::CPUID => {
            let rax = need(inp.rax, "RAX", "CPUID")?;
            let rcx = need(inp.rcx, "RCX", "CPUID")?;
            let function = rax as u32;
            if function == 0xD && inp.xcr0.is_none() {
                return malformed(E::MissingInput, "CPUID leaf 0xD needs XCR0");
            }
            let regs = services
                .cpuid(CpuidRequest {
                    function,
                    index: rcx as u32,
                    xcr0: inp.xcr0,
                    xss: inp.xss,
                })
                .map_err(|e| service_fail("CPUID", e))?;
            reply.rax = Some(regs[0].into());
            reply.rbx = Some(regs[1].into());
            reply.rcx = Some(regs[2].into());
            reply.rdx = Some(regs[3].into());
            Ok(Next::Resume)
        }
        ec::IOIO => ioio(inp, info1, info2, view, ghcb_gpa, services, state, reply),
        ec::MSR => {
            let index = need(inp.rcx, "RCX", "MSR")? as u32;
            match info1 {
                0 => {
                    let v = services
                        .rdmsr(index)
                        .map_err(|e| service_fail("RDMSR", e))?;
                    reply.rax = Some(v & 0xFFFF_FFFF);
                    reply.rdx = Some(v >> 32);
                    Ok(Next::Resume)
                }
                1 => {
                    let lo = need(inp.rax, "RAX", "WRMSR")? & 0xFFFF_FFFF;
                    let hi = need(inp.rdx, "RDX", "WRMSR")? & 0xFFFF_FFFF;
                    services
                        .wrmsr(index, (hi << 32) | lo)
                        .map_err(|e| service_fail("WRMSR", e))?;
                    Ok(Next::Resume)
                }
                other => malformed(
                    E::InvalidInput,
                    format!("MSR SW_EXITINFO1 {other:#x} is neither 0 (read) nor 1 (write)"),
                ),
            }
        }
        ec::VMMCALL => {
            let mut regs = VmmcallRegs {
                rax: need(inp.rax, "RAX", "VMMCALL")?,
                rbx: inp.rbx.unwrap_or(0),
                rcx: inp.rcx.unwrap_or(0),
                rdx: inp.rdx.unwrap_or(0),
                rsi: inp.rsi.unwrap_or(0),
                cpl: inp.cpl.ok_or_else(|| {
                    Fail::Malformed(E::MissingInput, "VMMCALL needs CPL".to_string())
                })?,
            };
            services
                .vmmcall(&mut regs)
                .map_err(|e| service_fail("VMMCALL", e))?;
            reply.rax = Some(regs.rax);
            reply.rbx = Some(regs.rbx);
            reply.rcx = Some(regs.rcx);
            reply.rdx = Some(regs.rdx);
            Ok(Next::Resume)
        }
        ec::RDTSC | ec::RDTSCP => {
            let tsc = services.tsc().map_err(|e| service_fail("RDTSC", e))?;
            reply.rax = Some(tsc & 0xFFFF_FFFF);
            reply.rdx = Some(tsc >> 32);
            if code == ec::RDTSCP {
                let aux = services.tsc_aux().map_err(|e| service_fail("RDTSCP", e))?;
                reply.rcx = Some(aux.into());
            }
            Ok(Next::Resume)
        }
        ec::RDPMC => {
            need(inp.rcx, "RCX", "RDPMC")?;
            // esvm exposes no performance counters to guests.
            Err(Fail::Exception(13))
        }
        ec::DR7_READ => {
            reply.rax = Some(state.dr7);
            Ok(Next::Resume)
        }
        ec::DR7_WRITE => {
            state.dr7 = need(inp.rax, "RAX", "DR7 write")?;
            Ok(Next::Resume)
        }
        ec::INVD | ec::WBINVD => Ok(Next::Resume),
        ec::MONITOR => {
            need(inp.rax, "RAX", "MONITOR")?;
            need(inp.rcx, "RCX", "MONITOR")?;
            need(inp.rdx, "RDX", "MONITOR")?;
            Ok(Next::Resume)
        }
        ec::MWAIT => {
            // Treated as a NOP, as KVM does.
            need(inp.rax, "RAX", "MWAIT")?;
            need(inp.rcx, "RCX", "MWAIT")?;
            Ok(Next::Resume)
        }
        ec::MMIO_READ | ec::MMIO_WRITE => {
            let scratch_gpa = inp.scratch.ok_or_else(|| {
                Fail::Malformed(E::MissingInput, "MMIO needs SW_SCRATCH".to_string())
            })?;
            let gpa = info1;
            let len = info2;
            if len == 0 {
                return malformed(E::InvalidInput, "MMIO access of length 0");
            }
            if gpa.checked_add(len).is_none() {
                return malformed(
                    E::InvalidInput,
                    format!("MMIO access at {gpa:#x} of {len:#x} bytes wraps around"),
                );
            }
            let scratch =
                Scratch::locate(scratch_gpa, len, ghcb_gpa, state.config.scratch_limit())?;
            if code == ec::MMIO_READ {
                scratch.probe(services)?;
                let mut data = vec![0u8; scratch.len];
                for (i, chunk) in data.chunks_mut(8).enumerate() {
                    let off = (i * 8) as u64;
                    services
                        .mmio_read(gpa + off, chunk)
                        .map_err(|e| service_fail("the MMIO read", e))?;
                }
                scratch.write(view, services, &data)?;
            } else {
                let data = scratch.read(view, services)?;
                for (i, chunk) in data.chunks(8).enumerate() {
                    let off = (i * 8) as u64;
                    services
                        .mmio_write(gpa + off, chunk)
                        .map_err(|e| service_fail("the MMIO write", e))?;
                }
            }
            Ok(Next::Resume)
        }
        ec::NMI_COMPLETE => Ok(Next::NmiComplete),
        ec::AP_HLT_LOOP => {
            state.ap_reset_hold = Some(ApResetHold::Ghcb { gpa: ghcb_gpa });
            // SW_EXITINFO2 = 0 until the AP is released.
            Ok(Next::ApResetHold)
        }
        ec::AP_JUMP_TABLE => match info1 {
            0 => {
                services
                    .set_ap_jump_table(info2)
                    .map_err(|e| service_fail("setting the AP jump table", e))?;
                Ok(Next::Resume)
            }
            1 => {
                reply.info2 = services
                    .ap_jump_table()
                    .map_err(|e| service_fail("reading the AP jump table", e))?;
                Ok(Next::Resume)
            }
            other => malformed(
                E::InvalidInput,
                format!("AP jump table request {other:#x} is neither 0 (set) nor 1 (get)"),
            ),
        },
        ec::HV_FEATURES => {
            reply.info2 = state.config.hv_features & super::HV_FEATURES_MASK;
            Ok(Next::Resume)
        }
        ec::TERM_REQUEST => {
            let (reason_set, reason_code) = esvm_abi::term::decode_ghcb_exit_info1(info1);
            Ok(Next::Terminate {
                reason_set,
                reason_code,
                info: info2,
            })
        }
        ec::UNSUPPORTED_EVENT => Ok(Next::UnsupportedEvent { info1, info2 }),
        other => malformed(
            E::InvalidEvent,
            format!("SW_EXITCODE {other:#x} is not an event esvm handles"),
        ),
    }
}

/// A validated scratch area.
#[derive(Debug, Clone, Copy)]
struct Scratch {
    loc: ScratchLoc,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
enum ScratchLoc {
    /// Inside the GHCB's shared buffer, at this page offset.
    InPage(usize),
    /// In shared guest memory outside the GHCB page.
    Shared(u64),
}

impl Scratch {
    /// Validate the area [`gpa`, `gpa + len`) for a request of `len` bytes.
    fn locate(gpa: u64, len: u64, ghcb_gpa: u64, limit: usize) -> Result<Scratch, Fail> {
        use GhcbErrorCode::InvalidScratchArea as E;
        if gpa == 0 {
            return malformed(E, "SW_SCRATCH is 0");
        }
        let Some(end) = gpa.checked_add(len) else {
            return malformed(
                E,
                format!("scratch area at {gpa:#x} of {len:#x} bytes wraps around"),
            );
        };
        let page_end = ghcb_gpa.saturating_add(GHCB_PAGE_SIZE as u64);
        if gpa & !(GHCB_PAGE_SIZE as u64 - 1) == ghcb_gpa {
            let beg = ghcb_gpa + SHARED_BUFFER_OFFSET as u64;
            let buf_end = ghcb_gpa + SHARED_BUFFER_END as u64;
            if gpa < beg || end > buf_end {
                return malformed(
                    E,
                    format!(
                        "scratch area {gpa:#x}..{end:#x} starts in the GHCB but is not inside \
                         its shared buffer {beg:#x}..{buf_end:#x}"
                    ),
                );
            }
            return Ok(Scratch {
                loc: ScratchLoc::InPage((gpa - ghcb_gpa) as usize),
                len: len as usize,
            });
        }
        if len > limit as u64 {
            return malformed(
                E,
                format!("scratch area of {len:#x} bytes exceeds the limit of {limit:#x} bytes"),
            );
        }
        if gpa < page_end && end > ghcb_gpa {
            return malformed(
                E,
                format!("scratch area {gpa:#x}..{end:#x} overlaps the GHCB page {ghcb_gpa:#x}"),
            );
        }
        Ok(Scratch {
            loc: ScratchLoc::Shared(gpa),
            len: len as usize,
        })
    }

    fn shared_fail(gpa: u64, len: usize, e: ServiceError) -> Fail {
        Fail::Malformed(
            GhcbErrorCode::InvalidScratchArea,
            format!("scratch area {gpa:#x} (+{len:#x}) is not accessible shared memory: {e}"),
        )
    }

    /// Check that an area to be written is accessible before any device side effect happens.
    fn probe<S: GhcbServices + ?Sized>(&self, services: &mut S) -> Result<(), Fail> {
        if let ScratchLoc::Shared(gpa) = self.loc {
            let mut tmp = vec![0u8; self.len];
            services
                .read_shared(gpa, &mut tmp)
                .map_err(|e| Self::shared_fail(gpa, self.len, e))?;
        }
        Ok(())
    }

    fn read<S: GhcbServices + ?Sized>(
        &self,
        view: &GhcbPage<'_>,
        services: &mut S,
    ) -> Result<Vec<u8>, Fail> {
        match self.loc {
            ScratchLoc::InPage(off) => Ok(view.bytes()[off..off + self.len].to_vec()),
            ScratchLoc::Shared(gpa) => {
                let mut data = vec![0u8; self.len];
                services
                    .read_shared(gpa, &mut data)
                    .map_err(|e| Self::shared_fail(gpa, self.len, e))?;
                Ok(data)
            }
        }
    }

    fn write<S: GhcbServices + ?Sized>(
        &self,
        view: &mut GhcbPage<'_>,
        services: &mut S,
        data: &[u8],
    ) -> Result<(), Fail> {
        let n = data.len().min(self.len);
        match self.loc {
            ScratchLoc::InPage(off) => {
                view.bytes_mut()[off..off + n].copy_from_slice(&data[..n]);
                Ok(())
            }
            ScratchLoc::Shared(gpa) => services
                .write_shared(gpa, &data[..n])
                .map_err(|e| Self::shared_fail(gpa, n, e)),
        }
    }
}

/// Decoded IOIO SW_EXITINFO1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoioInfo {
    pub port: u16,
    pub size: IoSize,
    pub is_in: bool,
    pub string: bool,
    pub rep: bool,
    /// Address size in bits (16, 32, 64) if exactly one address-size bit is set.
    pub address_bits: Option<u8>,
}

impl IoioInfo {
    /// Decode SW_EXITINFO1 of an IOIO event; `None` unless exactly one operand-size bit is set.
    pub fn decode(info1: u64) -> Option<IoioInfo> {
        let size = match (info1 & ioio::SIZE_MASK) >> ioio::SIZE_SHIFT {
            0b001 => IoSize::Byte,
            0b010 => IoSize::Word,
            0b100 => IoSize::Dword,
            _ => return None,
        };
        let address_bits = match (info1 & ioio::ADDR_MASK) >> ioio::ADDR_SHIFT {
            0b001 => Some(16),
            0b010 => Some(32),
            0b100 => Some(64),
            _ => None,
        };
        Some(IoioInfo {
            port: (info1 >> ioio::PORT_SHIFT) as u16,
            size,
            is_in: info1 & ioio::TYPE_IN != 0,
            string: info1 & ioio::STRING != 0,
            rep: info1 & ioio::REP != 0,
            address_bits,
        })
    }

    /// Encode (guest side; for tests and test guests).
    pub fn encode(&self) -> u64 {
        let size_bit = match self.size {
            IoSize::Byte => 1,
            IoSize::Word => 2,
            IoSize::Dword => 4,
        };
        let addr_bit = match self.address_bits {
            Some(16) => 1,
            Some(32) => 2,
            Some(64) => 4,
            _ => 0,
        };
        (u64::from(self.port) << ioio::PORT_SHIFT)
            | (addr_bit << ioio::ADDR_SHIFT)
            | (size_bit << ioio::SIZE_SHIFT)
            | if self.rep { ioio::REP } else { 0 }
            | if self.string { ioio::STRING } else { 0 }
            | if self.is_in { ioio::TYPE_IN } else { 0 }
    }
}

#[allow(clippy::too_many_arguments)]
fn ioio<S: GhcbServices + ?Sized>(
    inp: &Inputs,
    info1: u64,
    info2: u64,
    view: &mut GhcbPage<'_>,
    ghcb_gpa: u64,
    services: &mut S,
    state: &GhcbState,
    reply: &mut Reply,
) -> Result<Next, Fail> {
    use GhcbErrorCode as E;
    let Some(io) = IoioInfo::decode(info1) else {
        return malformed(
            E::InvalidInput,
            format!("IOIO SW_EXITINFO1 {info1:#x} does not set exactly one operand-size bit"),
        );
    };
    let size = io.size;
    if !io.string {
        if io.is_in {
            let v = services
                .io_in(io.port, size)
                .map_err(|e| service_fail("the port read", e))?;
            reply.rax = Some(u64::from(v & size.mask()));
        } else {
            let rax = need(inp.rax, "RAX", "OUT")?;
            services
                .io_out(io.port, size, rax as u32 & size.mask())
                .map_err(|e| service_fail("the port write", e))?;
        }
        return Ok(Next::Resume);
    }

    // INS/OUTS: SW_EXITINFO2 is the element count, the data moves through the scratch area.
    let Some(scratch_gpa) = inp.scratch else {
        return malformed(E::MissingInput, "string I/O needs SW_SCRATCH");
    };
    let count = info2;
    if count == 0 {
        return Ok(Next::Resume);
    }
    let width = size.bytes() as u64;
    let limit = state.config.scratch_limit();
    let bytes = match count.checked_mul(width) {
        Some(b) if b <= limit as u64 => b,
        _ => {
            return malformed(
                E::InvalidScratchArea,
                format!(
                    "string I/O of {count:#x} elements of {width} bytes exceeds the scratch \
                     limit of {limit:#x} bytes"
                ),
            )
        }
    };
    let scratch = Scratch::locate(scratch_gpa, bytes, ghcb_gpa, limit)?;
    if io.is_in {
        scratch.probe(services)?;
        let mut data = vec![0u8; scratch.len];
        for chunk in data.chunks_mut(size.bytes()) {
            let v = services
                .io_in(io.port, size)
                .map_err(|e| service_fail("the port read", e))?;
            chunk.copy_from_slice(&v.to_le_bytes()[..size.bytes()]);
        }
        scratch.write(view, services, &data)?;
    } else {
        let data = scratch.read(view, services)?;
        for chunk in data.chunks(size.bytes()) {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            services
                .io_out(io.port, size, u32::from_le_bytes(b))
                .map_err(|e| service_fail("the port write", e))?;
        }
    }
    Ok(Next::Resume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioio_decode_roundtrip() {
        for size in [IoSize::Byte, IoSize::Word, IoSize::Dword] {
            for bits in [Some(16u8), Some(32), Some(64), None] {
                let io = IoioInfo {
                    port: 0x3F8,
                    size,
                    is_in: true,
                    string: true,
                    rep: false,
                    address_bits: bits,
                };
                assert_eq!(IoioInfo::decode(io.encode()), Some(io));
            }
        }
        // 8-bit IN from port 0x80: bit 0, bit 4, port in 31:16.
        let io = IoioInfo::decode(0x0080_0011).unwrap();
        assert_eq!((io.port, io.size, io.is_in), (0x80, IoSize::Byte, true));
        assert_eq!(IoioInfo::decode(0x0080_0001), None, "no size bit");
        assert_eq!(IoioInfo::decode(0x0080_0031), None, "two size bits");
    }

    #[test]
    fn scratch_inside_shared_buffer() {
        let g = 0x10_0000;
        let s = Scratch::locate(g + 0x800, 2032, g, 65536).unwrap();
        assert!(matches!(s.loc, ScratchLoc::InPage(0x800)));
        assert!(Scratch::locate(g + 0x800, 2033, g, 65536).is_err());
        assert!(Scratch::locate(g + 0x7FF, 1, g, 65536).is_err());
        assert!(Scratch::locate(g + 0xFEF, 1, g, 65536).is_ok());
        assert!(Scratch::locate(g + 0xFF0, 1, g, 65536).is_err());
    }

    #[test]
    fn scratch_outside_ghcb() {
        let g = 0x10_0000;
        assert!(matches!(
            Scratch::locate(0x20_0000, 100, g, 65536).unwrap().loc,
            ScratchLoc::Shared(0x20_0000)
        ));
        // Overlapping the GHCB from below.
        assert!(Scratch::locate(g - 8, 16, g, 65536).is_err());
        // Ends exactly at the GHCB: fine.
        assert!(Scratch::locate(g - 16, 16, g, 65536).is_ok());
        // Too large, wrapping, zero.
        assert!(Scratch::locate(0x20_0000, 65537, g, 65536).is_err());
        assert!(Scratch::locate(u64::MAX - 4, 16, g, 65536).is_err());
        assert!(Scratch::locate(0, 16, g, 65536).is_err());
    }
}
