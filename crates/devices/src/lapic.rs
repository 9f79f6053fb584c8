//! The local APIC of one vCPU, on virtual time: xAPIC registers (MMIO at the APIC base) and
//! the same registers as x2APIC MSRs (0x800 + offset / 16).
//!
//! Modelled after the Intel SDM vol. 3 ch. 11 and the AMD APM vol. 2 ch. 16: ID, version,
//! TPR / PPR (processor priority from the TPR and the highest in-service vector), EOI (the
//! highest in-service vector; a level-triggered one is broadcast to the I/O APIC), LDR / DFR,
//! SVR (software enable), ISR / IRR / TMR, ESR (illegal vectors, latched on ESR writes),
//! ICR (fixed, lowest-priority, NMI, INIT and SIPI, physical and logical destinations and the
//! shorthands: a write sends an [`IpiMessage`], which the platform (`crate::intc`) delivers
//! to the local APICs it names, this one included), the six LVT entries and the timer in one-shot, periodic and
//! TSC-deadline modes. The timer's input clock is the virtual 1 GHz bus clock (1 tick per
//! virtual ns, before the divide configuration); the TSC-deadline is converted to virtual ns
//! by the caller, who knows the guest TSC.
//!
//! Not modelled: the thermal and performance-counter sources (their LVT entries hold what the
//! guest writes), error interrupts through LVT Error, the remote read register, and access
//! rules that differ between xAPIC and x2APIC beyond the ID, LDR, DFR and ICR layouts.
//!
//! Reset state: like KVM's for the boot vCPU — APIC ID = vCPU id, software-disabled (SVR
//! 0xff), LINT0 unmasked in ExtINT mode ("virtual wire"), so the 8259's INTR reaches the vCPU
//! until the guest programs the APIC (guests that never touch it keep working on the 8259).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The version register: version 0x14 (integrated APIC), 6 LVT entries (max LVT index 5).
pub const LAPIC_VERSION: u32 = 0x0005_0014;
/// First x2APIC MSR.
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// Last x2APIC MSR.
pub const X2APIC_MSR_END: u32 = 0x8ff;
/// IA32_TSC_DEADLINE.
pub const TSC_DEADLINE_MSR: u32 = 0x6e0;

const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_RRD: u32 = 0xc0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_ICR_LO: u32 = 0x300;
const REG_ICR_HI: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LAST: u32 = 0x370;
const REG_TIMER_ICR: u32 = 0x380;
const REG_TIMER_CCR: u32 = 0x390;
const REG_TIMER_DCR: u32 = 0x3e0;
/// x2APIC only: SELF IPI (MSR 0x83f).
const REG_SELF_IPI: u32 = 0x3f0;

/// LVT indices (offset 0x320 + 0x10 * index).
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_COUNT: usize = 6;

const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLED: u32 = 1 << 8;
/// ESR bits: send / receive illegal vector.
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
const ESR_RECV_ILLEGAL: u32 = 1 << 6;
/// Writable bits of each LVT entry (timer, thermal, perf, LINT0, LINT1, error).
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_10ff, // vector, mask, timer mode (18:17)
    0x0001_07ff, // vector, delivery mode, mask
    0x0001_07ff,
    0x0001_a7ff, // vector, delivery mode, polarity, trigger, mask
    0x0001_a7ff,
    0x0001_00ff, // vector, mask
];

/// Delivery modes (ICR, LVT, I/O APIC redirection entries).
pub mod delivery {
    /// Fixed.
    pub const FIXED: u32 = 0;
    /// Lowest priority.
    pub const LOWEST: u32 = 1;
    /// SMI.
    pub const SMI: u32 = 2;
    /// NMI.
    pub const NMI: u32 = 4;
    /// INIT.
    pub const INIT: u32 = 5;
    /// Start-up IPI.
    pub const SIPI: u32 = 6;
    /// External interrupt (the 8259's vector).
    pub const EXTINT: u32 = 7;
}

/// Timer modes of LVT Timer bits 18:17.
const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

/// Errors of the local APIC.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LapicError {
    /// A saved state the APIC cannot be in.
    #[error("saved local APIC state is invalid: {0}; the state is corrupt or from an incompatible build")]
    InvalidState(String),
}

/// Something the APIC asks of the rest of the platform after a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicEvent {
    /// EOI of a level-triggered vector: the I/O APIC clears remote IRR of its entries.
    EoiBroadcast(u8),
    /// An interprocessor interrupt sent through the ICR, for the platform to deliver.
    Ipi(IpiMessage),
}

/// Destination shorthands of the ICR (bits 19:18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field names the targets.
    None,
    /// The sender only.
    SelfOnly,
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// An interprocessor interrupt as the ICR describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpiMessage {
    /// Vector (fixed, lowest priority; the start-up page for SIPI).
    pub vector: u8,
    /// Delivery mode (see [`delivery`]).
    pub mode: u32,
    /// Logical (true) or physical destination.
    pub logical: bool,
    /// Destination: an APIC ID or a logical mask (xAPIC: 8 bits; x2APIC: 32 bits).
    pub dest: u32,
    /// The sender was in x2APIC mode (the destination has the x2APIC layout).
    pub x2apic: bool,
    /// The destination shorthand.
    pub shorthand: Shorthand,
    /// INIT level de-assert (level-triggered INIT with the level bit clear): only the
    /// 82489DX acted on it; every later APIC ignores it.
    pub init_deassert: bool,
}

/// The saved state of a local APIC (also its live state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LapicState {
    /// APIC ID (the x2APIC ID; the xAPIC register shows bits 7:0 in 31:24).
    pub id: u32,
    /// Task priority (bits 7:0).
    pub tpr: u32,
    /// Logical destination (xAPIC layout, bits 31:24).
    pub ldr: u32,
    /// Destination format (xAPIC).
    pub dfr: u32,
    /// Spurious-interrupt vector register.
    pub svr: u32,
    /// In-service, request and trigger-mode registers (256 bits each, 8 words).
    pub isr: [u32; 8],
    /// Interrupt request register.
    pub irr: [u32; 8],
    /// Trigger mode register (1 = level).
    pub tmr: [u32; 8],
    /// Error status as last latched, and errors since.
    pub esr: u32,
    /// Errors since the last ESR write.
    pub esr_pending: u32,
    /// Interrupt command register (high word = destination).
    pub icr: u64,
    /// LVT: timer, thermal, performance, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    /// Timer initial count.
    pub timer_initial: u32,
    /// Timer divide configuration.
    pub timer_dcr: u32,
    /// Virtual time (ns) the current count period started.
    pub timer_start_ns: u64,
    /// Whether the one-shot / periodic count is running.
    pub timer_running: bool,
    /// IA32_TSC_DEADLINE as written (0 = disarmed).
    pub tsc_deadline: u64,
    /// The deadline in virtual ns.
    pub tsc_deadline_ns: u64,
}

/// A local APIC; see the module documentation.
#[derive(Debug, Clone)]
pub struct LocalApic {
    s: LapicState,
    now_ns: u64,
}

fn bit_test(r: &[u32; 8], v: u8) -> bool {
    r[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn bit_set(r: &mut [u32; 8], v: u8, on: bool) {
    let w = &mut r[usize::from(v >> 5)];
    if on {
        *w |= 1 << (v & 31);
    } else {
        *w &= !(1 << (v & 31));
    }
}

fn highest(r: &[u32; 8]) -> Option<u8> {
    (0..8).rev().find(|&i| r[i] != 0).map(|i| {
        // i < 8 and the bit index < 32: the vector fits in a byte.
        (i * 32 + 31 - r[i].leading_zeros() as usize) as u8
    })
}

impl LocalApic {
    /// The APIC of vCPU `id` in its reset state (see the module documentation).
    pub fn new(id: u32) -> Self {
        let mut lvt = [LVT_MASKED; LVT_COUNT];
        if id == 0 {
            lvt[LVT_LINT0] = delivery::EXTINT << 8;
            lvt[LVT_LINT1] = delivery::NMI << 8;
        }
        Self {
            s: LapicState {
                id,
                tpr: 0,
                ldr: 0,
                dfr: 0xffff_ffff,
                svr: 0xff,
                isr: [0; 8],
                irr: [0; 8],
                tmr: [0; 8],
                esr: 0,
                esr_pending: 0,
                icr: 0,
                lvt,
                timer_initial: 0,
                timer_dcr: 0,
                timer_start_ns: 0,
                timer_running: false,
                tsc_deadline: 0,
                tsc_deadline_ns: 0,
            },
            now_ns: 0,
        }
    }

    /// Saved state.
    pub fn state(&self) -> LapicState {
        self.s.clone()
    }

    /// Put the APIC in `state` (at virtual time `now_ns`). On error nothing changes.
    pub fn restore(&mut self, state: &LapicState, now_ns: u64) -> Result<(), LapicError> {
        if state.tpr > 0xff {
            return Err(LapicError::InvalidState(format!(
                "TPR {:#x} is above 0xff",
                state.tpr
            )));
        }
        self.s = state.clone();
        self.now_ns = now_ns;
        Ok(())
    }

    /// Whether the APIC is software-enabled (SVR bit 8).
    pub fn enabled(&self) -> bool {
        self.s.svr & SVR_ENABLED != 0
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.s.id
    }

    /// Processor priority: the TPR or the highest in-service class, whichever is higher.
    pub fn ppr(&self) -> u32 {
        let isrv = highest(&self.s.isr).map_or(0, u32::from);
        if (self.s.tpr & 0xf0) >= (isrv & 0xf0) {
            self.s.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The TPR (bits 7:0).
    pub fn tpr(&self) -> u32 {
        self.s.tpr
    }

    /// Set the TPR (a MOV to CR8 sets bits 7:4 from CR8 3:0).
    pub fn set_tpr(&mut self, tpr: u32) {
        self.s.tpr = tpr & 0xff;
    }

    /// Whether the 8259's INTR reaches the vCPU through LINT0 (unmasked, ExtINT mode).
    pub fn accepts_pic(&self) -> bool {
        let l = self.s.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && (l >> 8) & 7 == delivery::EXTINT
    }

    /// Whether any request is held in IRR.
    pub fn has_request(&self) -> bool {
        self.s.irr.iter().any(|&w| w != 0)
    }

    /// The vector the APIC would deliver now: the highest request above the processor
    /// priority.
    pub fn pending_vector(&self) -> Option<u8> {
        let v = highest(&self.s.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The interrupt-acknowledge cycle for [`LocalApic::pending_vector`]: the vector moves
    /// from IRR to ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending_vector()?;
        bit_set(&mut self.s.irr, v, false);
        bit_set(&mut self.s.isr, v, true);
        Some(v)
    }

    /// A fixed interrupt of `vector` arrives (from the I/O APIC, an IPI or an LVT entry);
    /// `level` = level-triggered (its EOI is broadcast). Illegal vectors (0-15) set the
    /// receive-illegal-vector error instead; a software-disabled APIC takes none.
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.s.esr_pending |= ESR_RECV_ILLEGAL;
            return;
        }
        if !self.enabled() {
            return;
        }
        bit_set(&mut self.s.irr, vector, true);
        bit_set(&mut self.s.tmr, vector, level);
    }

    fn eoi(&mut self) -> Option<LapicEvent> {
        let v = highest(&self.s.isr)?;
        bit_set(&mut self.s.isr, v, false);
        bit_test(&self.s.tmr, v).then(|| {
            bit_set(&mut self.s.tmr, v, false);
            LapicEvent::EoiBroadcast(v)
        })
    }

    /// The logical ID bits of this APIC (xAPIC LDR 31:24; x2APIC's derived LDR).
    fn logical_match(&self, dest: u32, x2apic: bool) -> bool {
        if x2apic {
            let ldr = self.x2apic_ldr();
            return dest >> 16 == ldr >> 16 && dest & ldr & 0xffff != 0;
        }
        let ldr = self.s.ldr >> 24;
        let dest = dest & 0xff;
        if dest == 0xff {
            return true;
        }
        if self.s.dfr >> 28 == 0xf {
            // Flat model: one bit per APIC.
            dest & ldr != 0
        } else {
            // Cluster model: cluster in 7:4, members in 3:0.
            dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0
        }
    }

    fn x2apic_ldr(&self) -> u32 {
        ((self.s.id >> 4) << 16) | (1 << (self.s.id & 0xf))
    }

    /// Whether an interrupt message for `dest` (physical or logical) reaches this APIC.
    pub fn matches(&self, dest: u32, logical: bool, x2apic: bool) -> bool {
        if logical {
            self.logical_match(dest, x2apic)
        } else if x2apic {
            dest == 0xffff_ffff || dest == self.s.id
        } else {
            dest & 0xff == 0xff || dest & 0xff == self.s.id & 0xff
        }
    }

    fn send_ipi(&mut self, x2apic: bool, events: &mut Vec<LapicEvent>) {
        let lo = self.s.icr as u32;
        let vector = lo as u8;
        let mode = (lo >> 8) & 7;
        let dest = if x2apic {
            (self.s.icr >> 32) as u32
        } else {
            (self.s.icr >> 56) as u32
        };
        if matches!(mode, delivery::FIXED | delivery::LOWEST) && vector < 16 {
            self.s.esr_pending |= ESR_SEND_ILLEGAL;
            return;
        }
        let shorthand = match (lo >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        events.push(LapicEvent::Ipi(IpiMessage {
            vector,
            mode,
            logical: lo & (1 << 11) != 0,
            dest,
            x2apic,
            shorthand,
            init_deassert: mode == delivery::INIT && lo & (1 << 15) != 0 && lo & (1 << 14) == 0,
        }));
    }

    fn timer_divisor(&self) -> u64 {
        let d = self.s.timer_dcr;
        let v = ((d & 8) >> 1) | (d & 3);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn timer_mode(&self) -> u32 {
        (self.s.lvt[LVT_TIMER] >> 17) & 3
    }

    fn timer_period_ns(&self) -> u64 {
        u64::from(self.s.timer_initial) * self.timer_divisor()
    }

    fn current_count(&self) -> u32 {
        if !self.s.timer_running || self.timer_mode() == TIMER_TSC_DEADLINE {
            return 0;
        }
        let elapsed = self.now_ns.saturating_sub(self.s.timer_start_ns) / self.timer_divisor();
        u64::from(self.s.timer_initial)
            .saturating_sub(elapsed)
            .try_into()
            .unwrap_or(0)
    }

    /// Virtual time (ns) of the next timer interrupt, if the timer is armed.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            return (self.s.tsc_deadline != 0).then_some(self.s.tsc_deadline_ns);
        }
        self.s
            .timer_running
            .then(|| self.s.timer_start_ns + self.timer_period_ns())
    }

    fn timer_fire(&mut self) {
        let lvt = self.s.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8, false);
        }
    }

    /// Bring the timer to virtual time `now_ns`, raising its interrupt if it expired.
    pub fn advance_to(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        let now = self.now_ns;
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            if self.s.tsc_deadline != 0 && now >= self.s.tsc_deadline_ns {
                self.s.tsc_deadline = 0;
                self.timer_fire();
            }
            return;
        }
        if !self.s.timer_running {
            return;
        }
        let period = self.timer_period_ns();
        let end = self.s.timer_start_ns + period;
        if now < end {
            return;
        }
        self.timer_fire();
        if self.timer_mode() == TIMER_PERIODIC && period > 0 {
            // Periods missed while the vCPU did not look merge into one request (IRR is a
            // bit), as on hardware when the guest does not take them in time.
            let periods = (now - self.s.timer_start_ns) / period;
            self.s.timer_start_ns += periods * period;
        } else {
            self.s.timer_running = false;
        }
    }

    /// IA32_TSC_DEADLINE write of `value` when the guest TSC is `tsc` (virtual time is the
    /// APIC's current time). Ignored unless the timer is in TSC-deadline mode, as on hardware.
    pub fn write_tsc_deadline(&mut self, value: u64, tsc: u64) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return;
        }
        self.s.tsc_deadline = value;
        // The guest TSC advances 1 tick per virtual ns (`tsc_per_insn` = 1).
        self.s.tsc_deadline_ns = self.now_ns.saturating_add(value.saturating_sub(tsc));
    }

    /// IA32_TSC_DEADLINE as the guest reads it.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.s.tsc_deadline
        } else {
            0
        }
    }

    /// Read register `reg` (its xAPIC MMIO offset, 16-byte aligned). None: no such register
    /// (an x2APIC RDMSR of it raises #GP).
    pub fn read_reg(&self, reg: u32, x2apic: bool) -> Option<u64> {
        let v = match reg {
            REG_ID if x2apic => self.s.id,
            REG_ID => (self.s.id & 0xff) << 24,
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => self.s.tpr,
            REG_APR if !x2apic => 0,
            REG_PPR => self.ppr(),
            REG_EOI | REG_RRD if !x2apic => 0,
            REG_LDR if x2apic => self.x2apic_ldr(),
            REG_LDR => self.s.ldr,
            REG_DFR if !x2apic => self.s.dfr,
            REG_SVR => self.s.svr,
            0x100..=0x170 => self.s.isr[((reg - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.s.tmr[((reg - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.s.irr[((reg - REG_IRR) >> 4) as usize],
            REG_ESR => self.s.esr,
            REG_ICR_LO if x2apic => return Some(self.s.icr & !(1 << 12)),
            REG_ICR_LO => self.s.icr as u32 & !(1 << 12),
            REG_ICR_HI if !x2apic => (self.s.icr >> 32) as u32,
            0x320..=0x370 => self.s.lvt[((reg - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_ICR => self.s.timer_initial,
            REG_TIMER_CCR => self.current_count(),
            REG_TIMER_DCR => self.s.timer_dcr,
            _ => return None,
        };
        Some(u64::from(v))
    }

    /// Write register `reg` (its xAPIC MMIO offset). Returns false for a register that does
    /// not exist or is read-only in x2APIC mode (a WRMSR of it raises #GP); events the
    /// platform must act on go to `events`.
    pub fn write_reg(
        &mut self,
        reg: u32,
        value: u64,
        x2apic: bool,
        events: &mut Vec<LapicEvent>,
    ) -> bool {
        let v = value as u32;
        match reg {
            REG_ID if !x2apic => self.s.id = v >> 24,
            REG_TPR => self.s.tpr = v & 0xff,
            REG_EOI => events.extend(self.eoi()),
            REG_LDR if !x2apic => self.s.ldr = v & 0xff00_0000,
            REG_DFR if !x2apic => self.s.dfr = v | 0x0fff_ffff,
            REG_SVR => {
                self.s.svr = v & 0x13ff;
                if v & SVR_ENABLED == 0 {
                    for l in &mut self.s.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.s.esr = self.s.esr_pending;
                self.s.esr_pending = 0;
            }
            REG_ICR_LO if x2apic => {
                self.s.icr = value & 0xffff_ffff_000c_cfff;
                self.send_ipi(true, events);
            }
            REG_ICR_LO => {
                self.s.icr = (self.s.icr & !0xffff_ffff) | u64::from(v & 0x000c_cfff);
                self.send_ipi(false, events);
            }
            REG_ICR_HI if !x2apic => {
                self.s.icr = (self.s.icr & 0xffff_ffff) | (u64::from(v & 0xff00_0000) << 32)
            }
            0x320..=REG_LVT_LAST => {
                let i = ((reg - REG_LVT_TIMER) >> 4) as usize;
                let mut nv = v & LVT_WRITABLE[i];
                if !self.enabled() {
                    nv |= LVT_MASKED;
                }
                let old_mode = self.timer_mode();
                self.s.lvt[i] = nv;
                if i == LVT_TIMER && self.timer_mode() != old_mode {
                    // Switching between counting and TSC-deadline disarms the timer.
                    self.s.timer_running = false;
                    self.s.tsc_deadline = 0;
                }
            }
            REG_TIMER_ICR => {
                if self.timer_mode() == TIMER_TSC_DEADLINE {
                    return true;
                }
                self.s.timer_initial = v;
                self.s.timer_start_ns = self.now_ns;
                self.s.timer_running = v != 0;
            }
            REG_TIMER_DCR => {
                // Keep the count where it is: restart the period at the current count.
                let cur = self.current_count();
                self.s.timer_dcr = v & 0xb;
                if self.s.timer_running {
                    self.s.timer_initial = cur;
                    self.s.timer_start_ns = self.now_ns;
                }
            }
            REG_SELF_IPI if x2apic => self.accept(v as u8, false),
            // Read-only registers: writes are ignored in xAPIC mode, #GP in x2APIC mode.
            REG_VERSION | REG_PPR | REG_TIMER_CCR | 0x100..=0x270 | REG_APR | REG_RRD => {
                return !x2apic
            }
            REG_ID | REG_LDR => return !x2apic,
            _ => return !x2apic,
        }
        true
    }

    /// Guest MMIO read at `offset` in the APIC page.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let reg = (offset & 0xff0) as u32;
        let v = self.read_reg(reg, false).unwrap_or(0) as u32;
        let bytes = v.to_le_bytes();
        let start = (offset & 0xf) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// Guest MMIO write at `offset` in the APIC page (32-bit accesses at the register's
    /// start; others are ignored, as the SDM leaves them undefined).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], events: &mut Vec<LapicEvent>) {
        if offset & 0xf != 0 || data.len() < 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg((offset & 0xff0) as u32, u64::from(v), false, events);
    }

    /// Whether x2APIC register `reg` takes writes (others raise #GP).
    pub fn x2apic_writable(reg: u32) -> bool {
        matches!(
            reg,
            REG_TPR | REG_EOI | REG_SVR | REG_ESR | REG_ICR_LO | 0x320
                ..=REG_LVT_LAST | REG_TIMER_ICR | REG_TIMER_DCR | REG_SELF_IPI
        )
    }

    /// The register of x2APIC MSR `msr`, if it is one.
    pub fn x2apic_reg(msr: u32) -> Option<u32> {
        (X2APIC_MSR_BASE..=X2APIC_MSR_END)
            .contains(&msr)
            .then(|| (msr - X2APIC_MSR_BASE) << 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> LocalApic {
        let mut a = LocalApic::new(0);
        let mut ev = Vec::new();
        a.write_reg(REG_SVR, 0x1ff, false, &mut ev);
        a
    }

    #[test]
    fn reset_state_passes_the_8259_through() {
        let a = LocalApic::new(0);
        assert!(a.accepts_pic());
        assert!(!a.enabled());
        assert_eq!(a.read_reg(REG_VERSION, false), Some(0x50014));
        assert_eq!(a.read_reg(REG_DFR, false), Some(0xffff_ffff));
        assert_eq!(LocalApic::new(1).read_reg(REG_ID, false), Some(1 << 24));
        assert!(!LocalApic::new(1).accepts_pic());
    }

    #[test]
    fn disabled_apic_takes_no_fixed_interrupts_and_masks_lvts() {
        let mut a = LocalApic::new(0);
        a.accept(0x40, false);
        assert!(!a.has_request());
        let mut ev = Vec::new();
        a.write_reg(REG_LVT_TIMER, 0x30, false, &mut ev);
        assert_eq!(a.read_reg(REG_LVT_TIMER, false), Some(0x10030));
    }

    #[test]
    fn priority_tpr_ppr_and_eoi() {
        let mut a = enabled();
        let mut ev = Vec::new();
        a.accept(0x31, false);
        a.accept(0x55, true);
        assert_eq!(a.pending_vector(), Some(0x55));
        assert_eq!(a.acknowledge(), Some(0x55));
        assert_eq!(a.ppr(), 0x50);
        // 0x31's class is below the in-service one.
        assert_eq!(a.pending_vector(), None);
        a.write_reg(REG_EOI, 0, false, &mut ev);
        assert_eq!(ev, [LapicEvent::EoiBroadcast(0x55)], "level: broadcast");
        assert_eq!(a.pending_vector(), Some(0x31));
        a.write_reg(REG_TPR, 0x30, false, &mut ev);
        assert_eq!(a.ppr(), 0x30);
        assert_eq!(a.pending_vector(), None, "class 3 is not above TPR 3");
        a.write_reg(REG_TPR, 0x2f, false, &mut ev);
        assert_eq!(a.ppr(), 0x2f);
        assert_eq!(a.acknowledge(), Some(0x31));
        ev.clear();
        a.write_reg(REG_EOI, 0, false, &mut ev);
        assert!(ev.is_empty(), "edge: no broadcast");
        assert_eq!(a.read_reg(REG_ISR + 0x10, false), Some(0));
    }

    #[test]
    fn isr_irr_tmr_registers_show_bits() {
        let mut a = enabled();
        a.accept(0x41, true);
        assert_eq!(a.read_reg(REG_IRR + 0x20, false), Some(1 << 1));
        assert_eq!(a.read_reg(REG_TMR + 0x20, false), Some(1 << 1));
        a.acknowledge();
        assert_eq!(a.read_reg(REG_IRR + 0x20, false), Some(0));
        assert_eq!(a.read_reg(REG_ISR + 0x20, false), Some(1 << 1));
    }

    #[test]
    fn illegal_vectors_latch_in_esr() {
        let mut a = enabled();
        let mut ev = Vec::new();
        a.accept(3, false);
        assert_eq!(
            a.read_reg(REG_ESR, false),
            Some(0),
            "latched only on ESR write"
        );
        a.write_reg(REG_ESR, 0, false, &mut ev);
        assert_eq!(
            a.read_reg(REG_ESR, false),
            Some(u64::from(ESR_RECV_ILLEGAL))
        );
        a.write_reg(REG_ICR_LO, 0x4_0005, false, &mut ev); // self, vector 5
        a.write_reg(REG_ESR, 0, false, &mut ev);
        assert_eq!(
            a.read_reg(REG_ESR, false),
            Some(u64::from(ESR_SEND_ILLEGAL))
        );
    }

    #[test]
    fn icr_writes_send_ipi_messages() {
        let mut a = enabled();
        let mut ev = Vec::new();
        a.write_reg(REG_ICR_HI, 3 << 24, false, &mut ev);
        a.write_reg(REG_ICR_LO, (1 << 11) | 0x62, false, &mut ev);
        // Self shorthand, NMI.
        a.write_reg(REG_ICR_LO, (1 << 18) | (4 << 8), false, &mut ev);
        // All but self: INIT assert (level, assert), INIT de-assert (level), SIPI 0x9a.
        a.write_reg(REG_ICR_LO, (3 << 18) | (3 << 14) | (5 << 8), false, &mut ev);
        a.write_reg(REG_ICR_LO, (3 << 18) | (2 << 14) | (5 << 8), false, &mut ev);
        a.write_reg(REG_ICR_LO, (3 << 18) | (6 << 8) | 0x9a, false, &mut ev);
        let msg = |vector, mode, logical, dest, shorthand, init_deassert| {
            LapicEvent::Ipi(IpiMessage {
                vector,
                mode,
                logical,
                dest,
                x2apic: false,
                shorthand,
                init_deassert,
            })
        };
        assert_eq!(
            ev,
            [
                msg(0x62, delivery::FIXED, true, 3, Shorthand::None, false),
                msg(0, delivery::NMI, false, 3, Shorthand::SelfOnly, false),
                msg(
                    0,
                    delivery::INIT,
                    false,
                    3,
                    Shorthand::AllExcludingSelf,
                    false
                ),
                msg(
                    0,
                    delivery::INIT,
                    false,
                    3,
                    Shorthand::AllExcludingSelf,
                    true
                ),
                msg(
                    0x9a,
                    delivery::SIPI,
                    false,
                    3,
                    Shorthand::AllExcludingSelf,
                    false
                ),
            ]
        );
        // x2APIC: the destination is the ICR's high 32 bits.
        ev.clear();
        a.write_reg(REG_ICR_LO, (7 << 32) | (2 << 18) | 0x70, true, &mut ev);
        assert_eq!(
            ev,
            [LapicEvent::Ipi(IpiMessage {
                vector: 0x70,
                mode: delivery::FIXED,
                logical: false,
                dest: 7,
                x2apic: true,
                shorthand: Shorthand::AllIncludingSelf,
                init_deassert: false,
            })]
        );
    }

    #[test]
    fn destinations_match_physical_logical_and_broadcast() {
        let mut a = LocalApic::new(2);
        let mut ev = Vec::new();
        assert!(a.matches(2, false, false));
        assert!(!a.matches(1, false, false));
        assert!(a.matches(0xff, false, false), "xAPIC physical broadcast");
        assert!(a.matches(2, false, true));
        assert!(a.matches(0xffff_ffff, false, true), "x2APIC broadcast");
        assert!(!a.matches(0xff, false, true));
        // Flat logical: LDR bit 2.
        a.write_reg(REG_LDR, 4 << 24, false, &mut ev);
        assert!(a.matches(0x4, true, false));
        assert!(a.matches(0x6, true, false));
        assert!(!a.matches(0x1, true, false));
        // Cluster model: cluster 1, member bit 0.
        a.write_reg(REG_DFR, 0x0fff_ffff, false, &mut ev);
        a.write_reg(REG_LDR, 0x11 << 24, false, &mut ev);
        assert!(a.matches(0x13, true, false));
        assert!(!a.matches(0x23, true, false));
        // x2APIC cluster: derived LDR of ID 2 = cluster 0, bit 2.
        assert!(a.matches(0x4, true, true));
        assert!(!a.matches(0x1_0004, true, true));
    }

    #[test]
    fn x2apic_registers() {
        let mut a = LocalApic::new(0);
        let mut ev = Vec::new();
        let reg = |msr| LocalApic::x2apic_reg(msr).unwrap();
        assert!(a.write_reg(reg(0x80f), 0x1ff, true, &mut ev));
        assert_eq!(a.read_reg(reg(0x802), true), Some(0));
        assert_eq!(a.read_reg(reg(0x80d), true), Some(1), "derived LDR");
        assert_eq!(a.read_reg(reg(0x80e), true), None, "no DFR in x2APIC mode");
        assert!(
            !a.write_reg(reg(0x802), 5, true, &mut ev),
            "ID is read-only"
        );
        assert!(a.write_reg(reg(0x83f), 0x77, true, &mut ev), "SELF IPI");
        assert_eq!(a.pending_vector(), Some(0x77));
        assert!(a.write_reg(reg(0x830), 0x78 | (1 << 18), true, &mut ev));
        assert!(matches!(
            ev[..],
            [LapicEvent::Ipi(IpiMessage { vector: 0x78, .. })]
        ));
        assert_eq!(LocalApic::x2apic_reg(0x900), None);
    }

    #[test]
    fn one_shot_and_periodic_timer() {
        let mut a = enabled();
        let mut ev = Vec::new();
        a.write_reg(REG_TIMER_DCR, 0xb, false, &mut ev); // divide by 1
        a.write_reg(REG_LVT_TIMER, 0xec, false, &mut ev);
        a.advance_to(100);
        a.write_reg(REG_TIMER_ICR, 1000, false, &mut ev);
        assert_eq!(a.next_deadline_ns(), Some(1100));
        a.advance_to(600);
        assert_eq!(a.read_reg(REG_TIMER_CCR, false), Some(500));
        a.advance_to(1099);
        assert!(!a.has_request());
        a.advance_to(1100);
        assert_eq!(a.pending_vector(), Some(0xec));
        assert_eq!(a.next_deadline_ns(), None, "one-shot stops");
        assert_eq!(a.read_reg(REG_TIMER_CCR, false), Some(0));
        // Periodic, divide by 2.
        a.acknowledge();
        a.write_reg(REG_EOI, 0, false, &mut ev);
        a.write_reg(REG_TIMER_DCR, 0x0, false, &mut ev);
        a.write_reg(REG_LVT_TIMER, (1 << 17) | 0xec, false, &mut ev);
        a.write_reg(REG_TIMER_ICR, 50, false, &mut ev);
        assert_eq!(a.next_deadline_ns(), Some(1200));
        a.advance_to(1200);
        assert!(a.has_request());
        assert_eq!(a.next_deadline_ns(), Some(1300), "periodic re-arms");
        a.acknowledge();
        a.advance_to(1650);
        assert_eq!(a.next_deadline_ns(), Some(1700), "missed periods merge");
        // Masked: the count runs, no interrupt.
        a.write_reg(REG_EOI, 0, false, &mut ev);
        a.acknowledge();
        a.write_reg(REG_EOI, 0, false, &mut ev);
        a.write_reg(
            REG_LVT_TIMER,
            u64::from((1 << 17) | LVT_MASKED | 0xec),
            false,
            &mut ev,
        );
        a.write_reg(REG_TIMER_ICR, 50, false, &mut ev);
        a.advance_to(5000);
        assert!(!a.has_request());
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut a = enabled();
        let mut ev = Vec::new();
        a.write_tsc_deadline(5000, 0);
        assert_eq!(a.tsc_deadline(), 0, "ignored outside TSC-deadline mode");
        a.write_reg(REG_LVT_TIMER, (2 << 17) | 0xef, false, &mut ev);
        a.advance_to(1000);
        // Guest TSC 7000 at virtual time 1000: a deadline of 9000 is 2000 ns away.
        a.write_tsc_deadline(9000, 7000);
        assert_eq!(a.tsc_deadline(), 9000);
        assert_eq!(a.next_deadline_ns(), Some(3000));
        a.write_reg(REG_TIMER_ICR, 5, false, &mut ev);
        assert_eq!(a.read_reg(REG_TIMER_ICR, false), Some(0), "ICR ignored");
        a.advance_to(2999);
        assert!(!a.has_request());
        a.advance_to(3000);
        assert_eq!(a.pending_vector(), Some(0xef));
        assert_eq!(a.tsc_deadline(), 0, "fired deadlines clear");
        assert_eq!(a.next_deadline_ns(), None);
        // A deadline in the past fires at once.
        a.write_tsc_deadline(1, 7000);
        a.acknowledge();
        a.advance_to(3000);
        assert!(a.has_request());
    }

    #[test]
    fn mmio_bytes_and_state_round_trip() {
        let mut a = enabled();
        let mut ev = Vec::new();
        a.mmio_write(0x80, &0x20u32.to_le_bytes(), &mut ev);
        let mut b = [0u8; 4];
        a.mmio_read(0x80, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x20);
        let mut one = [0u8; 1];
        a.mmio_read(0x32, &mut one);
        assert_eq!(one[0], 0x5, "byte 2 of the version register: max LVT");
        let s = a.state();
        let mut c = LocalApic::new(0);
        c.restore(&s, 0).unwrap();
        assert_eq!(c.state(), s);
        let mut bad = s;
        bad.tpr = 0x100;
        assert!(c.restore(&bad, 0).is_err());
    }
}
