//! Intel 8254 programmable interval timer (ports 0x40-0x43, plus the gate/output bits of
//! port 0x61), clocked at 1.193182 MHz on a caller-supplied virtual clock.
//!
//! # Time model
//! Time is virtual nanoseconds supplied by [`Pit::advance_to`]; it never reads the host clock.
//! The input clock has its rising edges at tick `k` = `ceil(k * 1e9 / 1_193_182)` ns, so the
//! tick index at time `t` is `floor(t * 1_193_182 / 1e9)`. A count written during tick `k` is
//! loaded into the counting element on edge `k + 1` (as on the real part) and every later edge
//! decrements it. Counter state is kept as "ticks elapsed since the load", so any instant is
//! computed in O(1), and [`Pit::next_deadline_ns`] tells the VMM when channel 0's output will
//! next rise (the edge that raises IRQ 0).
//!
//! # What is modelled
//! All three channels, modes 0-5 (6 and 7 alias 2 and 3), binary and BCD counting, LSB / MSB /
//! LSB-then-MSB access, the counter-latch command, the read-back command (count and status),
//! the null-count flag, the gate of channel 2 (port 0x61 bit 0; channels 0 and 1 are gated
//! on) and OUT2 (port 0x61 bit 5). Simplifications: a new count written in mode 3 takes effect
//! at the end of the current full period (the part switches at the next half-period); in mode
//! 2 a count of 1 (illegal on the part) produces an edge on every tick.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::PortIoDevice;
use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// Input clock of the PIT in Hz.
pub const PIT_FREQUENCY_HZ: u64 = 1_193_182;
/// First PIT port (channel 0 data).
pub const PIT_BASE: u16 = 0x40;
/// Number of PIT ports (0x40-0x43).
pub const PIT_PORTS: u16 = 4;
/// System control port B (speaker gate, OUT2, refresh toggle).
pub const PORT_61: u16 = 0x61;
/// ISA IRQ of channel 0.
pub const PIT_IRQ: u8 = 0;
/// Registry id of the PIT.
pub const PIT_ID: &str = "pit";
/// Half-period of the DRAM refresh toggle visible in port 0x61 bit 4, in ns.
const REFRESH_HALF_PERIOD_NS: u64 = 15_085;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Errors of the PIT.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PitError {
    /// A saved channel state that the device cannot be in.
    #[error("saved PIT channel {channel} is invalid: {reason}; the state is corrupt or from an incompatible build")]
    InvalidState {
        /// Channel number.
        channel: usize,
        /// What is wrong.
        reason: String,
    },
    /// A channel number outside 0..=2.
    #[error("PIT channel {0} does not exist; channels are 0, 1 and 2")]
    NoSuchChannel(usize),
}

/// Tick index (number of input-clock edges since time 0) at virtual time `ns`.
pub fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_FREQUENCY_HZ) / NS_PER_SEC) as u64
}

/// First virtual nanosecond at which input-clock edge `tick` has happened (saturating at
/// `u64::MAX`).
pub fn ticks_to_ns(tick: u64) -> u64 {
    checked_ticks_to_ns(tick).unwrap_or(u64::MAX)
}

/// [`ticks_to_ns`], or `None` if that instant is beyond `u64::MAX` ns.
pub fn checked_ticks_to_ns(tick: u64) -> Option<u64> {
    let num = u128::from(tick) * NS_PER_SEC;
    let den = u128::from(PIT_FREQUENCY_HZ);
    u64::try_from(num.div_ceil(den)).ok()
}

/// Counter access mode (control word bits 5:4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RwMode {
    /// Low byte only.
    Lsb,
    /// High byte only.
    Msb,
    /// Low byte then high byte.
    Word,
}

impl RwMode {
    fn bits(self) -> u8 {
        match self {
            RwMode::Lsb => 1,
            RwMode::Msb => 2,
            RwMode::Word => 3,
        }
    }
}

/// Where a channel's counting element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Not counting: no count since the control word, waiting for a gate trigger, or stopped
    /// by the gate (modes 2/3). OUT is the stored level.
    Idle {
        /// OUT level.
        out: bool,
        /// Value the counting element shows (binary).
        ce: u32,
    },
    /// Counting: `elapsed` ticks had passed since the load at tick `sync_tick` (which can be
    /// one tick in the future: the load edge after a count write).
    Counting {
        /// Tick at which `elapsed` was measured.
        sync_tick: u64,
        /// Ticks since the count was loaded.
        elapsed: u64,
    },
    /// Counting suspended by a low gate (modes 0 and 4) after `elapsed` ticks.
    Frozen {
        /// Ticks counted before the gate went low.
        elapsed: u64,
    },
}

/// State of one 8254 channel; also its saved form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// Counter mode, 0..=5.
    pub mode: u8,
    /// Access mode.
    pub rw: RwMode,
    /// BCD counting.
    pub bcd: bool,
    /// Count loaded on every (re)load: 1..=65536 (binary) or 1..=10000 (BCD).
    pub reload: u32,
    /// A count written while counting that takes effect at the next period end (modes 2, 3)
    /// or the next gate trigger (modes 1, 5).
    pub pending_reload: Option<u32>,
    /// A count has been written since the last control word.
    pub loaded: bool,
    /// Gate input level.
    pub gate: bool,
    /// Counting element.
    pub phase: Phase,
    /// Null-count flag (a written count not yet loaded into the counting element).
    pub null_count: bool,
    /// First byte of an LSB-then-MSB count write, waiting for its MSB.
    pub write_lsb: Option<u8>,
    /// LSB-then-MSB live reads: the next read returns the MSB.
    pub read_msb_next: bool,
    /// Latched count (as the register shows it, BCD-encoded in BCD mode).
    pub latched_count: Option<u16>,
    /// LSB-then-MSB latched read: the next read returns the MSB.
    pub latch_msb_next: bool,
    /// Latched status byte (read-back command).
    pub latched_status: Option<u8>,
}

impl PitChannelState {
    /// Power-on state: mode 3 (as a BIOS leaves it) but no count, so not counting, OUT high.
    /// With OUT high, programming mode 2 or 3 does not make an edge on IRQ 0.
    fn reset(gate: bool) -> Self {
        Self {
            mode: 3,
            rw: RwMode::Word,
            bcd: false,
            reload: 0x1_0000,
            pending_reload: None,
            loaded: false,
            gate,
            phase: Phase::Idle { out: true, ce: 0 },
            null_count: true,
            write_lsb: None,
            read_msb_next: false,
            latched_count: None,
            latch_msb_next: false,
            latched_status: None,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// Effective count, guarded against a zero from a corrupt state.
    fn n(&self) -> u64 {
        u64::from(self.reload).max(1)
    }

    fn validate(&self, channel: usize) -> Result<(), PitError> {
        let bad = |reason: &str| {
            Err(PitError::InvalidState {
                channel,
                reason: reason.to_string(),
            })
        };
        if self.mode > 5 {
            return bad("mode is above 5");
        }
        let m = self.modulus();
        if self.reload == 0 || u64::from(self.reload) > m {
            return bad("reload count is outside 1..=modulus");
        }
        if let Some(p) = self.pending_reload {
            if p == 0 || u64::from(p) > m {
                return bad("pending reload count is outside 1..=modulus");
            }
        }
        if let Phase::Idle { ce, .. } = self.phase {
            if u64::from(ce) >= m {
                return bad("idle counting element value is not below the modulus");
            }
        }
        Ok(())
    }

    // ----- pure counter formulas over "ticks since load" -----

    fn out_at(&self, e: u64) -> bool {
        let n = self.n();
        match self.mode {
            0 | 1 => e >= n,
            2 => n == 1 || e % n != n - 1,
            3 => e % n < n.div_ceil(2),
            _ => e != n, // 4, 5
        }
    }

    fn ce_at(&self, e: u64) -> u64 {
        let n = self.n();
        let m = self.modulus();
        let v = match self.mode {
            2 => n - e % n,
            3 => {
                let p = e % n;
                let h = n.div_ceil(2);
                let top = if n & 1 == 0 { n } else { n - 1 };
                let q = if p < h { p } else { p - h };
                top.saturating_sub(2 * q)
            }
            _ => {
                // 0, 1, 4, 5: one-shot down-count that wraps through the modulus.
                if e <= n {
                    n - e
                } else {
                    (m - (e - n) % m) % m
                }
            }
        };
        v % m
    }

    /// Rising edges of OUT at elapsed values in `(e0, e1]`.
    fn edges_between(&self, e0: u64, e1: u64) -> u64 {
        if e1 <= e0 {
            return 0;
        }
        let n = self.n();
        match self.mode {
            0 | 1 => u64::from(e0 < n && n <= e1),
            2 | 3 => e1 / n - e0 / n,
            _ => {
                let at = n.saturating_add(1);
                u64::from(e0 < at && at <= e1)
            }
        }
    }

    /// Smallest elapsed value above `e` with a rising edge of OUT.
    fn next_edge_after(&self, e: u64) -> Option<u64> {
        let n = self.n();
        match self.mode {
            0 | 1 => (e < n).then_some(n),
            2 | 3 => (e / n).checked_add(1).and_then(|k| k.checked_mul(n)),
            _ => {
                let at = n.saturating_add(1);
                (e < at).then_some(at)
            }
        }
    }

    // ----- state queries at the channel's synced time -----

    fn out(&self) -> bool {
        match self.phase {
            Phase::Idle { out, .. } => out,
            Phase::Counting { elapsed, .. } | Phase::Frozen { elapsed } => self.out_at(elapsed),
        }
    }

    /// Binary value of the counting element.
    fn ce(&self) -> u64 {
        match self.phase {
            Phase::Idle { ce, .. } => u64::from(ce),
            Phase::Counting { elapsed, .. } | Phase::Frozen { elapsed } => self.ce_at(elapsed),
        }
    }

    /// Counting element as the register shows it.
    fn ce_register(&self) -> u16 {
        let v = self.ce();
        if self.bcd {
            to_bcd(v)
        } else {
            v as u16
        }
    }

    fn status(&self) -> u8 {
        (u8::from(self.out()) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.rw.bits() << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    // ----- evolution -----

    /// Advance the counting element to tick `t`; returns the rising edges of OUT on the way.
    fn sync(&mut self, t: u64) -> u64 {
        let Phase::Counting {
            mut sync_tick,
            mut elapsed,
        } = self.phase
        else {
            return 0;
        };
        if t < sync_tick {
            return 0;
        }
        let mut edges = 0;
        if matches!(self.mode, 2 | 3) {
            if let Some(new) = self.pending_reload {
                let n = self.n();
                let to_boundary = n - elapsed % n;
                if t - sync_tick >= to_boundary {
                    edges += 1;
                    sync_tick += to_boundary;
                    elapsed = 0;
                    self.reload = new;
                    self.pending_reload = None;
                }
            }
        }
        let d = t - sync_tick;
        let e1 = elapsed.saturating_add(d);
        edges += self.edges_between(elapsed, e1);
        self.phase = Phase::Counting {
            sync_tick: t,
            elapsed: e1,
        };
        if self.pending_reload.is_none() {
            self.null_count = false;
        }
        edges
    }

    /// Tick of the next rising edge of OUT, if one is scheduled.
    fn next_edge_tick(&self) -> Option<u64> {
        let Phase::Counting { sync_tick, elapsed } = self.phase else {
            return None;
        };
        let e = self.next_edge_after(elapsed)?;
        sync_tick.checked_add(e - elapsed)
    }

    fn start_counting(&mut self, load_tick: u64) {
        self.phase = Phase::Counting {
            sync_tick: load_tick,
            elapsed: 0,
        };
    }

    fn control_word(&mut self, t: u64, rw: RwMode, mode: u8, bcd: bool) {
        self.sync(t);
        let ce = self.ce() as u32;
        self.mode = mode;
        self.rw = rw;
        self.bcd = bcd;
        self.write_lsb = None;
        self.read_msb_next = false;
        self.latched_count = None;
        self.latch_msb_next = false;
        self.latched_status = None;
        self.pending_reload = None;
        self.loaded = false;
        self.null_count = true;
        let m = self.modulus() as u32;
        // No count until the guest writes one; keep the reload valid for the new modulus.
        self.reload = m;
        self.phase = Phase::Idle {
            out: mode != 0,
            ce: ce % m,
        };
    }

    fn latch_count(&mut self) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.ce_register());
            self.latch_msb_next = false;
        }
    }

    fn latch_status(&mut self) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status());
        }
    }

    fn read_data(&mut self, t: u64) -> u8 {
        self.sync(t);
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if let Some(v) = self.latched_count {
            let [lo, hi] = v.to_le_bytes();
            return match self.rw {
                RwMode::Lsb => {
                    self.latched_count = None;
                    lo
                }
                RwMode::Msb => {
                    self.latched_count = None;
                    hi
                }
                RwMode::Word => {
                    if self.latch_msb_next {
                        self.latched_count = None;
                        self.latch_msb_next = false;
                        hi
                    } else {
                        self.latch_msb_next = true;
                        lo
                    }
                }
            };
        }
        let [lo, hi] = self.ce_register().to_le_bytes();
        match self.rw {
            RwMode::Lsb => lo,
            RwMode::Msb => hi,
            RwMode::Word => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write_data(&mut self, t: u64, value: u8) {
        self.sync(t);
        let raw = match self.rw {
            RwMode::Lsb => u16::from(value),
            RwMode::Msb => u16::from(value) << 8,
            RwMode::Word => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(value);
                    if self.mode == 0 {
                        // Writing the first byte stops the count and drives OUT low at once.
                        self.phase = Phase::Idle {
                            out: false,
                            ce: self.ce() as u32,
                        };
                    }
                    return;
                }
                Some(lsb) => u16::from_le_bytes([lsb, value]),
            },
        };
        self.write_count(t, raw);
    }

    fn write_count(&mut self, t: u64, raw: u16) {
        let m = self.modulus();
        let value = if self.bcd {
            from_bcd(raw)
        } else {
            u64::from(raw)
        } % m;
        let n = if value == 0 { m } else { value } as u32;
        self.null_count = true;
        let counting = matches!(self.phase, Phase::Counting { .. });
        match self.mode {
            0 | 4 => {
                self.reload = n;
                self.pending_reload = None;
                self.loaded = true;
                if self.gate {
                    self.start_counting(t + 1);
                } else {
                    self.phase = Phase::Frozen { elapsed: 0 };
                }
            }
            2 | 3 => {
                if counting && self.loaded {
                    self.pending_reload = Some(n);
                } else {
                    self.reload = n;
                    self.loaded = true;
                    if self.gate {
                        self.start_counting(t + 1);
                    } else {
                        let ce = self.ce() as u32;
                        self.phase = Phase::Idle { out: true, ce };
                    }
                }
            }
            _ => {
                // 1, 5: wait for a gate trigger.
                if counting && self.loaded {
                    self.pending_reload = Some(n);
                } else {
                    self.reload = n;
                    self.loaded = true;
                }
            }
        }
    }

    fn set_gate(&mut self, t: u64, level: bool) {
        self.sync(t);
        if self.gate == level {
            return;
        }
        self.gate = level;
        match (self.mode, level) {
            (0 | 4, false) => {
                if let Phase::Counting { sync_tick, elapsed } = self.phase {
                    // A load scheduled for the next edge has not happened yet: freeze at 0.
                    let elapsed = if sync_tick > t { 0 } else { elapsed };
                    self.phase = Phase::Frozen { elapsed };
                }
            }
            (0 | 4, true) => {
                if let Phase::Frozen { elapsed } = self.phase {
                    self.phase = Phase::Counting {
                        sync_tick: t,
                        elapsed,
                    };
                }
            }
            (2 | 3, false) => {
                if matches!(self.phase, Phase::Counting { .. }) {
                    let ce = self.ce() as u32;
                    self.phase = Phase::Idle { out: true, ce };
                }
            }
            (2 | 3, true) | (1 | 5, true) if self.loaded => {
                if let Some(p) = self.pending_reload.take() {
                    self.reload = p;
                }
                self.start_counting(t + 1);
            }
            _ => {} // 1, 5 falling, or nothing loaded yet: no effect
        }
    }
}

fn to_bcd(v: u64) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

fn from_bcd(raw: u16) -> u64 {
    let r = u64::from(raw);
    (r >> 12 & 0xf) * 1000 + (r >> 8 & 0xf) * 100 + (r >> 4 & 0xf) * 10 + (r & 0xf)
}

/// Saved state of the PIT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Virtual time the PIT was last advanced to, in ns.
    pub now_ns: u64,
    /// Channels 0, 1, 2.
    pub channels: [PitChannelState; 3],
    /// Writable bits (3:0) of port 0x61.
    pub port61: u8,
}

/// The 8254 PIT. See the module documentation for the time model.
#[derive(Debug, Clone)]
pub struct Pit {
    state: PitState,
    /// The input-clock tick of `state.now_ns` and the first ns of the next one (derived:
    /// the run loop advances the PIT on every exit, mostly within one tick).
    tick: u64,
    next_tick_ns: u64,
    /// The IRQ 0 level last reported to the interrupt controller (host-side: `None` until
    /// the first report, and after a restore).
    reported: Option<bool>,
}

/// Two PITs are equal when their guest-visible state is.
impl PartialEq for Pit {
    fn eq(&self, other: &Self) -> bool {
        self.state == other.state
    }
}

impl Eq for Pit {}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT at virtual time 0 with no channel counting (no interrupts until the guest
    /// programs one): every channel in mode 3 without a count, OUT high. Channel 2's gate
    /// starts low (port 0x61 = 0).
    pub fn new() -> Self {
        Self {
            state: PitState {
                now_ns: 0,
                channels: [
                    PitChannelState::reset(true),
                    PitChannelState::reset(true),
                    PitChannelState::reset(false),
                ],
                port61: 0,
            },
            tick: 0,
            next_tick_ns: ticks_to_ns(1),
            reported: None,
        }
    }

    /// Rebuild from saved state.
    pub fn from_state(state: &PitState) -> Result<Self, PitError> {
        for (i, ch) in state.channels.iter().enumerate() {
            ch.validate(i)?;
        }
        let tick = ns_to_ticks(state.now_ns);
        Ok(Self {
            state: state.clone(),
            tick,
            next_tick_ns: ticks_to_ns(tick + 1),
            reported: None,
        })
    }

    /// Saved state.
    pub fn state(&self) -> PitState {
        self.state.clone()
    }

    /// Current virtual time in ns (the latest `advance_to`).
    pub fn now_ns(&self) -> u64 {
        self.state.now_ns
    }

    fn now_tick(&self) -> u64 {
        self.tick
    }

    /// Move virtual time forward to `now_ns` (earlier times are ignored: time never goes
    /// back). Returns how many rising edges channel 0's output (IRQ 0) had on the way.
    pub fn advance_to(&mut self, now_ns: u64) -> u64 {
        if now_ns > self.state.now_ns {
            self.state.now_ns = now_ns;
        }
        if self.state.now_ns < self.next_tick_ns {
            // Still in the tick of the last sync: nothing can have changed (accesses sync
            // the channels themselves).
            return 0;
        }
        self.tick = ns_to_ticks(self.state.now_ns);
        self.next_tick_ns = ticks_to_ns(self.tick + 1);
        let t = self.tick;
        let mut irq0_edges = 0;
        for (i, ch) in self.state.channels.iter_mut().enumerate() {
            let e = ch.sync(t);
            if i == 0 {
                irq0_edges = e;
            }
        }
        irq0_edges
    }

    /// Virtual time (ns) at which channel 0's output next rises, i.e. when IRQ 0 is next
    /// raised, if the channel is counting towards one (and that instant fits in a u64).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.state.channels[0]
            .next_edge_tick()
            .and_then(checked_ticks_to_ns)
    }

    /// Output level of `channel` at the current time.
    pub fn output(&self, channel: usize) -> Result<bool, PitError> {
        self.state
            .channels
            .get(channel)
            .map(|c| c.out())
            .ok_or(PitError::NoSuchChannel(channel))
    }

    /// Level of channel 0's output, which drives IRQ 0.
    pub fn irq0_level(&self) -> bool {
        self.state.channels[0].out()
    }

    /// Current counting-element value of `channel` (binary, 0 meaning 65536/10000 before the
    /// first decrement), without any side effect on latches.
    pub fn count(&self, channel: usize) -> Result<u16, PitError> {
        self.state
            .channels
            .get(channel)
            .map(|c| c.ce() as u16)
            .ok_or(PitError::NoSuchChannel(channel))
    }

    /// Set the gate input of `channel` (only channel 2's is wired, through port 0x61).
    pub fn set_gate(&mut self, channel: usize, level: bool) -> Result<(), PitError> {
        let t = self.now_tick();
        let ch = self
            .state
            .channels
            .get_mut(channel)
            .ok_or(PitError::NoSuchChannel(channel))?;
        ch.set_gate(t, level);
        Ok(())
    }

    /// Guest read of PIT register `offset` (0-2 data, 3 control: reads as 0xff).
    pub fn read_reg(&mut self, offset: u8) -> u8 {
        let t = self.now_tick();
        match self.state.channels.get_mut(usize::from(offset)) {
            Some(ch) => ch.read_data(t),
            None => 0xff,
        }
    }

    /// Guest write of `value` to PIT register `offset` (0-2 data, 3 control word).
    pub fn write_reg(&mut self, offset: u8, value: u8) {
        let t = self.now_tick();
        match offset {
            0..=2 => self.state.channels[usize::from(offset)].write_data(t, value),
            3 => self.write_control(t, value),
            _ => {}
        }
    }

    fn write_control(&mut self, t: u64, value: u8) {
        let sc = usize::from(value >> 6);
        if sc == 3 {
            // Read-back: bit 5 = 0 latches counts, bit 4 = 0 latches status, bits 3:1 select.
            for (i, ch) in self.state.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                ch.sync(t);
                if value & 0x20 == 0 {
                    ch.latch_count();
                }
                if value & 0x10 == 0 {
                    ch.latch_status();
                }
            }
            return;
        }
        let ch = &mut self.state.channels[sc];
        let rw = match (value >> 4) & 3 {
            0 => {
                ch.sync(t);
                ch.latch_count();
                return;
            }
            1 => RwMode::Lsb,
            2 => RwMode::Msb,
            _ => RwMode::Word,
        };
        let mut mode = (value >> 1) & 7;
        if mode > 5 {
            mode -= 4;
        }
        ch.control_word(t, rw, mode, value & 1 != 0);
    }

    /// Guest read of port 0x61: bit 0 gate 2, bit 1 speaker enable, bits 3:2 as written,
    /// bit 4 refresh toggle (from virtual time), bit 5 OUT2.
    pub fn read_port61(&mut self) -> u8 {
        let t = self.now_tick();
        self.state.channels[2].sync(t);
        let refresh = (self.state.now_ns / REFRESH_HALF_PERIOD_NS) & 1 != 0;
        (self.state.port61 & 0x0f)
            | (u8::from(refresh) << 4)
            | (u8::from(self.state.channels[2].out()) << 5)
    }

    /// Guest write of port 0x61: bit 0 drives channel 2's gate; bits 3:0 are kept.
    pub fn write_port61(&mut self, value: u8) {
        self.state.port61 = value & 0x0f;
        let t = self.now_tick();
        self.state.channels[2].set_gate(t, value & 1 != 0);
    }
}

impl PortIoDevice for Pit {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let reg = usize::from(offset) + i;
            *b = if reg < usize::from(PIT_PORTS) {
                self.read_reg(reg as u8)
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let reg = usize::from(offset) + i;
            if reg < usize::from(PIT_PORTS) {
                self.write_reg(reg as u8, *b);
            }
        }
    }
}

impl Pit {
    /// Drive IRQ 0 to OUT0, telling the controller only of changes (the run loop calls
    /// `advance_to` on every exit).
    fn report_irq0(&mut self, cx: &mut DeviceContext<'_>) {
        let level = self.irq0_level();
        if self.reported != Some(level) {
            self.reported = Some(level);
            cx.set_irq(PIT_IRQ, level);
        }
    }
}

impl Persist for Pit {
    type State = PitState;
    type Error = PitError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> PitState {
        self.state()
    }

    fn restore(&mut self, state: &PitState) -> Result<(), PitError> {
        *self = Self::from_state(state)?;
        Ok(())
    }
}

/// The PIT on the platform: ports 0x40-0x43 and 0x61; channel 0's OUT drives IRQ 0 as a
/// level, and every rising edge since the last report is latched even if OUT is low again.
impl Device for Pit {
    fn id(&self) -> &str {
        PIT_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![
            PortRegion::bytewise(PIT_BASE, u32::from(PIT_PORTS)),
            PortRegion::bytewise(PORT_61, 1),
        ]
    }

    fn hooks(&self) -> Hooks {
        Hooks::CLOCK
    }

    fn io_read(
        &mut self,
        base: u16,
        offset: u16,
        data: &mut [u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        if base == PORT_61 {
            data.fill(self.read_port61());
        } else {
            PortIoDevice::read(self, offset, data);
        }
        self.report_irq0(cx);
        Access::Handled
    }

    fn io_write(
        &mut self,
        base: u16,
        offset: u16,
        data: &[u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        if base == PORT_61 {
            if let Some(v) = data.first() {
                self.write_port61(*v);
            }
        } else {
            PortIoDevice::write(self, offset, data);
        }
        // A control word can move OUT0 at once (mode 0 drops it, mode 2 raises it).
        self.report_irq0(cx);
        Access::Handled
    }

    fn advance_to(&mut self, now_ns: u64, cx: &mut DeviceContext<'_>) {
        if Pit::advance_to(self, now_ns) > 0 {
            // At least one rising edge of OUT0 since the last report: latch it even if OUT0
            // is low again by now; the final level follows.
            cx.set_irq(PIT_IRQ, false);
            cx.set_irq(PIT_IRQ, true);
            self.reported = Some(true);
        }
        self.report_irq0(cx);
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        Pit::next_deadline_ns(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH0: u8 = 0;
    const CH2: u8 = 2;
    const CTRL: u8 = 3;

    /// Virtual time at which edge `k` happens.
    fn at(k: u64) -> u64 {
        ticks_to_ns(k)
    }

    /// Program channel `ch` with `mode`, LSB-then-MSB, binary, count `n`, at time `now`.
    fn program(pit: &mut Pit, ch: u8, mode: u8, n: u16, now: u64) {
        pit.advance_to(now);
        pit.write_reg(CTRL, (ch << 6) | 0x30 | (mode << 1));
        let [lo, hi] = n.to_le_bytes();
        pit.write_reg(ch, lo);
        pit.write_reg(ch, hi);
    }

    fn latch_read(pit: &mut Pit, ch: u8) -> u16 {
        pit.write_reg(CTRL, ch << 6); // counter latch
        let lo = pit.read_reg(ch);
        let hi = pit.read_reg(ch);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn tick_conversions_round_trip() {
        for k in [0u64, 1, 2, 1_193_181, 1_193_182, 1 << 40] {
            let ns = ticks_to_ns(k);
            assert_eq!(ns_to_ticks(ns), k, "edge {k} happens at {ns}");
            if ns > 0 {
                assert_eq!(
                    ns_to_ticks(ns - 1),
                    k - 1,
                    "one ns earlier is before edge {k}"
                );
            }
        }
        assert_eq!(ns_to_ticks(1_000_000_000), PIT_FREQUENCY_HZ);
        assert_eq!(ticks_to_ns(u64::MAX), u64::MAX);
        assert_eq!(checked_ticks_to_ns(u64::MAX), None);
    }

    #[test]
    fn end_of_time_has_no_deadline() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 2, 1000, u64::MAX - 100);
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(pit.advance_to(u64::MAX), 0);
    }

    #[test]
    fn mode0_interrupt_on_terminal_count() {
        let mut pit = Pit::new();
        let start = 10_000; // tick 11 (11.93...), write during tick 11
        let tw = ns_to_ticks(start);
        program(&mut pit, CH0, 0, 100, start);
        assert!(!pit.irq0_level(), "mode 0 OUT low after programming");
        // Loaded at edge tw+1, reaches zero at edge tw+1+100.
        let edge = tw + 1 + 100;
        assert_eq!(pit.next_deadline_ns(), Some(at(edge)));
        assert_eq!(pit.advance_to(at(tw + 1)), 0);
        assert_eq!(latch_read(&mut pit, CH0), 100);
        pit.advance_to(at(tw + 1 + 40));
        assert_eq!(latch_read(&mut pit, CH0), 60);
        assert_eq!(pit.advance_to(at(edge) - 1), 0);
        assert!(!pit.irq0_level());
        assert_eq!(latch_read(&mut pit, CH0), 1);
        assert_eq!(pit.advance_to(at(edge)), 1);
        assert!(pit.irq0_level());
        assert_eq!(latch_read(&mut pit, CH0), 0);
        // One-shot: no further deadline; the counter wraps and keeps going.
        assert_eq!(pit.next_deadline_ns(), None);
        pit.advance_to(at(edge + 3));
        assert_eq!(latch_read(&mut pit, CH0), 0xfffd);
        assert_eq!(pit.advance_to(at(edge + 200_000)), 0);
        assert!(pit.irq0_level());
    }

    #[test]
    fn mode0_rewrite_restarts_and_lowers_out() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 0, 10, 0);
        pit.advance_to(at(20));
        assert!(pit.irq0_level());
        // First byte: OUT low at once, counting stops.
        pit.write_reg(CH0, 5);
        assert!(!pit.irq0_level());
        assert_eq!(pit.next_deadline_ns(), None);
        pit.advance_to(at(30));
        pit.write_reg(CH0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(at(30 + 1 + 5)));
    }

    #[test]
    fn mode2_rate_generator() {
        let mut pit = Pit::new();
        let n = 1193u64; // ~1 kHz
        program(&mut pit, CH0, 2, n as u16, 0);
        assert!(pit.irq0_level(), "mode 2 OUT high");
        let load = 1; // written in tick 0, loaded at edge 1
        assert_eq!(pit.next_deadline_ns(), Some(at(load + n)));
        // Count runs N, N-1, ... 1 (OUT low while 1), then reload.
        pit.advance_to(at(load + 500));
        assert_eq!(latch_read(&mut pit, CH0) as u64, n - 500);
        pit.advance_to(at(load + n - 1));
        assert_eq!(latch_read(&mut pit, CH0), 1);
        assert!(!pit.irq0_level(), "OUT low for the tick at count 1");
        assert_eq!(pit.advance_to(at(load + n)), 1);
        assert!(pit.irq0_level());
        assert_eq!(latch_read(&mut pit, CH0) as u64, n);
        assert_eq!(pit.next_deadline_ns(), Some(at(load + 2 * n)));
        // Skipping ten periods at once reports ten edges.
        assert_eq!(pit.advance_to(at(load + 11 * n)), 10);
        assert_eq!(pit.next_deadline_ns(), Some(at(load + 12 * n)));
    }

    #[test]
    fn mode2_new_count_applies_at_period_end() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 2, 100, 0);
        pit.advance_to(at(50));
        pit.write_reg(CH0, 40);
        pit.write_reg(CH0, 0);
        // Current period still ends at edge 1 + 100.
        assert_eq!(pit.next_deadline_ns(), Some(at(101)));
        pit.write_reg(CTRL, 0xe2); // read-back status of channel 0
        assert_ne!(
            pit.read_reg(CH0) & 0x40,
            0,
            "null count until the new count loads"
        );
        assert_eq!(pit.advance_to(at(101)), 1);
        assert_eq!(latch_read(&mut pit, CH0), 40);
        assert_eq!(pit.next_deadline_ns(), Some(at(141)));
        assert_eq!(pit.advance_to(at(101 + 400)), 10);
    }

    #[test]
    fn mode3_square_wave_even_and_odd() {
        // Even N = 10: high for 5 ticks (10, 8, 6, 4, 2), low for 5.
        let mut pit = Pit::new();
        program(&mut pit, CH0, 3, 10, 0);
        let load = 1;
        let expect = [
            (0, true, 10),
            (1, true, 8),
            (4, true, 2),
            (5, false, 10),
            (6, false, 8),
            (9, false, 2),
            (10, true, 10),
        ];
        for (e, out, ce) in expect {
            pit.advance_to(at(load + e));
            assert_eq!(pit.irq0_level(), out, "even N, elapsed {e}");
            assert_eq!(latch_read(&mut pit, CH0), ce, "even N, elapsed {e}");
        }
        // Odd N = 7: high for 4 ticks (6, 4, 2, 0), low for 3 (6, 4, 2).
        let mut pit = Pit::new();
        program(&mut pit, CH0, 3, 7, 0);
        let expect = [
            (0, true, 6),
            (3, true, 0),
            (4, false, 6),
            (6, false, 2),
            (7, true, 6),
        ];
        for (e, out, ce) in expect {
            pit.advance_to(at(load + e));
            assert_eq!(pit.irq0_level(), out, "odd N, elapsed {e}");
            assert_eq!(latch_read(&mut pit, CH0), ce, "odd N, elapsed {e}");
        }
        assert_eq!(pit.next_deadline_ns(), Some(at(load + 14)));
        assert_eq!(pit.advance_to(at(load + 7 * 5)), 4);
    }

    #[test]
    fn mode3_count_zero_is_65536_bios_timer() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 3, 0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(at(1 + 65_536)));
        // ~18.2 Hz: one second has 18 edges.
        assert_eq!(pit.advance_to(1_000_000_000), 18);
    }

    #[test]
    fn mode4_software_strobe_once() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 4, 20, 0);
        assert!(pit.irq0_level());
        assert_eq!(pit.next_deadline_ns(), Some(at(1 + 21)));
        pit.advance_to(at(1 + 20));
        assert!(!pit.irq0_level(), "strobe low at count 0");
        assert_eq!(pit.advance_to(at(1 + 21)), 1);
        assert!(pit.irq0_level());
        assert_eq!(pit.next_deadline_ns(), None);
        assert_eq!(
            pit.advance_to(at(1 + 21 + 0x2_0000)),
            0,
            "no re-strobe on wrap"
        );
    }

    #[test]
    fn modes_1_and_5_wait_for_gate_trigger() {
        let mut pit = Pit::new();
        // Channel 2 mode 1, gate low.
        pit.write_reg(CTRL, 0x80 | 0x30 | (1 << 1));
        pit.write_reg(CH2, 10);
        pit.write_reg(CH2, 0);
        assert!(pit.output(2).unwrap(), "mode 1 OUT high until triggered");
        pit.advance_to(at(100));
        assert!(pit.output(2).unwrap());
        pit.write_port61(0x01); // gate rising edge: trigger
        pit.advance_to(at(101));
        assert!(!pit.output(2).unwrap(), "OUT low while the one-shot runs");
        pit.advance_to(at(101 + 9));
        assert!(!pit.output(2).unwrap());
        pit.advance_to(at(101 + 10));
        assert!(pit.output(2).unwrap());
        assert_ne!(pit.read_port61() & 0x20, 0, "OUT2 in port 0x61 bit 5");

        // Mode 5 strobe after the trigger.
        pit.write_reg(CTRL, 0x80 | 0x30 | (5 << 1));
        pit.write_reg(CH2, 4);
        pit.write_reg(CH2, 0);
        pit.write_port61(0x00);
        pit.advance_to(at(200));
        pit.write_port61(0x01);
        pit.advance_to(at(201 + 4));
        assert!(!pit.output(2).unwrap());
        pit.advance_to(at(201 + 5));
        assert!(pit.output(2).unwrap());
    }

    #[test]
    fn channel2_gate_suspends_mode0_like_linux_calibration() {
        let mut pit = Pit::new();
        pit.write_port61(0x00);
        pit.write_reg(CTRL, 0xb0); // ch2, lsb/msb, mode 0
        pit.write_reg(CH2, 0xff);
        pit.write_reg(CH2, 0xff);
        pit.advance_to(at(1000));
        assert_eq!(pit.count(2).unwrap(), 0xffff, "gate low: not counting");
        pit.write_port61(0x01);
        pit.advance_to(at(1000 + 100));
        assert_eq!(latch_read(&mut pit, CH2), 0xffff - 100);
        pit.write_port61(0x00);
        pit.advance_to(at(5000));
        assert_eq!(latch_read(&mut pit, CH2), 0xffff - 100, "frozen");
        assert_eq!(pit.read_port61() & 0x21, 0, "gate low, OUT2 low");
        pit.write_port61(0x01);
        pit.advance_to(at(5000 + 0xffff - 100));
        assert_ne!(pit.read_port61() & 0x20, 0, "terminal count reached");
    }

    #[test]
    fn gate_low_stops_mode2_and_rising_restarts() {
        let mut pit = Pit::new();
        pit.write_port61(0x01);
        pit.write_reg(CTRL, 0xb4); // ch2 mode 2
        pit.write_reg(CH2, 50);
        pit.write_reg(CH2, 0);
        pit.advance_to(at(1 + 49));
        assert!(!pit.output(2).unwrap());
        pit.write_port61(0x00);
        assert!(pit.output(2).unwrap(), "gate low forces OUT high");
        pit.advance_to(at(500));
        pit.write_port61(0x01);
        pit.advance_to(at(501 + 10));
        assert_eq!(
            latch_read(&mut pit, CH2),
            40,
            "reloaded on the edge after the gate rose"
        );
    }

    #[test]
    fn latch_holds_value_until_read() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 2, 1000, 0);
        pit.advance_to(at(101));
        pit.write_reg(CTRL, 0x00);
        pit.advance_to(at(301));
        pit.write_reg(CTRL, 0x00); // second latch ignored while the first is unread
        assert_eq!(pit.read_reg(CH0), (900u16 & 0xff) as u8);
        pit.advance_to(at(401));
        assert_eq!(pit.read_reg(CH0), (900u16 >> 8) as u8);
        // Now live reads follow the counter.
        assert_eq!(latch_read(&mut pit, CH0), 600);
    }

    #[test]
    fn live_reads_and_byte_modes() {
        let mut pit = Pit::new();
        pit.write_reg(CTRL, 0x14); // ch0, LSB only, mode 2
        pit.write_reg(CH0, 200);
        pit.advance_to(at(1 + 50));
        assert_eq!(pit.read_reg(CH0), 150);
        assert_eq!(pit.read_reg(CH0), 150, "LSB mode: every read is the LSB");
        pit.write_reg(CTRL, 0x24); // ch0, MSB only, mode 2
        pit.write_reg(CH0, 0x02); // N = 0x200
        let t = ns_to_ticks(pit.now_ns());
        pit.advance_to(at(t + 1 + 0x10));
        assert_eq!(pit.read_reg(CH0), 0x01, "MSB of 0x1f0");
        // Word mode live reads alternate LSB / MSB.
        let now = pit.now_ns();
        program(&mut pit, CH0, 2, 0x1234, now);
        let lo = pit.read_reg(CH0);
        let hi = pit.read_reg(CH0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 0x1234);
    }

    #[test]
    fn read_back_status_and_count() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 3, 100, 0);
        pit.advance_to(at(1 + 60)); // low half, OUT low
                                    // Read-back: latch count and status of channel 0.
        pit.write_reg(CTRL, 0b1100_0010);
        let status = pit.read_reg(CH0);
        assert_eq!(
            status, 0b0011_0110,
            "OUT low, count loaded, LSB/MSB, mode 3, binary"
        );
        let lo = pit.read_reg(CH0);
        let hi = pit.read_reg(CH0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 100 - 2 * 10);
        // Status only, right after a control word: null count set, OUT high for mode 2.
        pit.write_reg(CTRL, 0x74); // ch1, lsb/msb, mode 2
        pit.write_reg(CTRL, 0b1110_0100); // read-back status only, ch1
        assert_eq!(pit.read_reg(1), 0b1111_0100);
    }

    #[test]
    fn bcd_counting() {
        let mut pit = Pit::new();
        pit.write_reg(CTRL, 0x31); // ch0 lsb/msb mode 0 BCD
        pit.write_reg(CH0, 0x00);
        pit.write_reg(CH0, 0x10); // BCD 1000
        assert_eq!(pit.next_deadline_ns(), Some(at(1 + 1000)));
        pit.advance_to(at(1 + 1));
        assert_eq!(latch_read(&mut pit, CH0), 0x0999);
        pit.advance_to(at(1 + 1002));
        assert_eq!(latch_read(&mut pit, CH0), 0x9998, "BCD wraps through 9999");
        // Count 0 in BCD is 10000.
        pit.write_reg(CTRL, 0x35); // mode 2 BCD
        pit.write_reg(CH0, 0);
        pit.write_reg(CH0, 0);
        let t = ns_to_ticks(pit.now_ns());
        assert_eq!(pit.next_deadline_ns(), Some(at(t + 1 + 10_000)));
    }

    #[test]
    fn reset_state_and_control_word_edges() {
        let mut pit = Pit::new();
        assert!(pit.irq0_level());
        assert_eq!(pit.next_deadline_ns(), None);
        // Mode 2 from reset: OUT stays high, no edge.
        pit.write_reg(CTRL, 0x34);
        assert!(pit.irq0_level());
        // Mode 0: OUT drops at the control word...
        pit.write_reg(CTRL, 0x30);
        assert!(!pit.irq0_level());
        // ...and a mode 2 control word before terminal count raises it again (as the part).
        pit.write_reg(CTRL, 0x34);
        assert!(pit.irq0_level());
    }

    #[test]
    fn mode_aliases_and_control_reads() {
        let mut pit = Pit::new();
        pit.write_reg(CTRL, 0x3c); // mode 6 == 2
        pit.write_reg(CTRL, 0xe2);
        assert_eq!(pit.read_reg(CH0) & 0x0e, 2 << 1);
        assert_eq!(pit.read_reg(CTRL), 0xff);
    }

    #[test]
    fn refresh_bit_toggles_with_virtual_time() {
        let mut pit = Pit::new();
        let a = pit.read_port61() & 0x10;
        pit.advance_to(REFRESH_HALF_PERIOD_NS);
        let b = pit.read_port61() & 0x10;
        assert_ne!(a, b);
        pit.write_port61(0xff);
        assert_eq!(pit.read_port61() & 0x0f, 0x0f);
    }

    #[test]
    fn time_never_goes_back() {
        let mut pit = Pit::new();
        program(&mut pit, CH0, 2, 10, 1_000_000);
        let t = pit.now_ns();
        pit.advance_to(5);
        assert_eq!(pit.now_ns(), t);
        assert!(pit.next_deadline_ns().unwrap() > t);
    }

    #[test]
    fn save_restore_mid_count_continues_identically() {
        let mut a = Pit::new();
        program(&mut a, CH0, 2, 777, 3_000);
        a.write_port61(0x01);
        a.write_reg(CTRL, 0xb0);
        a.write_reg(CH2, 0x00);
        a.write_reg(CH2, 0x40);
        a.advance_to(at(5_000) + 17);
        a.write_reg(CTRL, 0x00); // pending latch on channel 0
        let json = serde_json::to_string(&a.state()).unwrap();
        let mut b = Pit::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(a, b);
        for step in 1..50u64 {
            let now = at(5_000) + step * 123_457;
            assert_eq!(a.advance_to(now), b.advance_to(now));
            assert_eq!(a.next_deadline_ns(), b.next_deadline_ns());
            assert_eq!(a.read_reg(CH0), b.read_reg(CH0));
            assert_eq!(a.read_port61(), b.read_port61());
        }
        assert_eq!(a, b);
    }

    #[test]
    fn invalid_states_are_rejected() {
        let mut st = Pit::new().state();
        st.channels[1].mode = 6;
        assert!(matches!(
            Pit::from_state(&st),
            Err(PitError::InvalidState { channel: 1, .. })
        ));
        let mut st = Pit::new().state();
        st.channels[0].reload = 0;
        assert!(Pit::from_state(&st).is_err());
        let mut st = Pit::new().state();
        st.channels[2].bcd = true;
        st.channels[2].reload = 20_000;
        assert!(Pit::from_state(&st).is_err());
        assert_eq!(Pit::new().output(3), Err(PitError::NoSuchChannel(3)));
    }
}
