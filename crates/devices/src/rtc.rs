//! Motorola MC146818 real-time clock with 114 bytes of CMOS RAM: ports 0x70 (index) and 0x71
//! (data), IRQ 8, running on the guest's virtual clock.
//!
//! # Registers
//! The index port selects one of 128 bytes (bits 6:0); bit 7 is the PC's NMI mask, kept as
//! written ([`Rtc::nmi_masked`]; the platform has no NMI sources). Reads of port 0x70 return
//! 0xff, as on QEMU's chipsets.
//!
//! | index     | register                                                                 |
//! |-----------|--------------------------------------------------------------------------|
//! | 0x00-0x09 | seconds, seconds alarm, minutes, minutes alarm, hours, hours alarm, day of week (1 = Sunday), day of month, month, year |
//! | 0x0a      | A: UIP (bit 7, read-only), DV (6:4; 010 = the PC's 32.768 kHz time base runs, 11x holds the divider in reset), RS (3:0, periodic rate) |
//! | 0x0b      | B: SET, PIE, AIE, UIE, SQWE, DM (1 = binary, 0 = BCD), 24/12 (1 = 24 h), DSE |
//! | 0x0c      | C (read-only): IRQF, PF, AF, UF; reading it clears it and lowers IRQ 8     |
//! | 0x0d      | D (read-only): VRT = 1 (the battery is good)                             |
//! | 0x0e-0x7f | CMOS RAM (114 bytes); 0x32 is the century, which the update cycle carries into |
//!
//! The time registers hold what was last written or updated, in the format of register B
//! at that moment (binary or BCD; 12-hour hours have bit 7 = PM), as on the part: switching
//! the format does not convert them. Writing them sets the clock. Values out of range roll
//! over at their next carry. Leap years are the years divisible by 4, as on the part (valid
//! 1901-2099). DSE (daylight saving) and SQWE (the square-wave pin, not connected) are
//! stored but have no effect.
//!
//! # Time
//! The time base is 32.768 kHz on virtual time: tick `k` happens at `ceil(k * 1e9 / 32768)`
//! ns. While DV = 010, an update cycle happens once per second (every 32768 ticks) unless
//! SET is 1; it advances the clock by a second, sets UF, and sets AF if the alarm matches
//! (an alarm byte with bits 7:6 = 11 matches anything). UIP reads 1 for the 244 us (8
//! ticks) before each update: Linux's `mc146818_avoid_UIP` polls it before reading the time.
//! Leaving divider reset (DV from 11x to 010) starts the divider: the first update follows
//! half a second later. Periodic flags (PF) come at the rate RS selects (RS = 1, 2: 256 and
//! 128 Hz; RS = n >= 3: 65536 >> n Hz), in phase with the divider. IRQF = PF·PIE + AF·AIE +
//! UF·UIE drives IRQ 8 as a level: the PIC sees an edge when IRQF rises, and no further
//! interrupt until the guest reads register C.
//!
//! At power-on the clock shows [`RtcTime::default`] (2026-01-01T00:00:00, UTC, a Thursday)
//! unless another start is given, in BCD and 24-hour mode (A = 0x26: 1024 Hz rate selected,
//! B = 0x02), and the first update happens at virtual time 1 s: the RTC then follows the
//! guest's virtual clock second by second.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::device::{Access, Device, DeviceContext, Hooks, Persist, PortRegion};

/// Index port.
pub const RTC_INDEX_PORT: u16 = 0x70;
/// Data port.
pub const RTC_DATA_PORT: u16 = 0x71;
/// ISA IRQ of the RTC.
pub const RTC_IRQ: u8 = 8;
/// Registry id of the RTC.
pub const RTC_ID: &str = "rtc";
/// Bytes of the register file (14 clock registers and 114 bytes of CMOS RAM).
pub const CMOS_SIZE: usize = 128;
/// Index of the century byte (the ACPI FADT's usual `century` field).
pub const CENTURY_INDEX: u8 = 0x32;
/// The time base, in Hz.
pub const RTC_TICK_HZ: u64 = 32_768;

const SECONDS: usize = 0x00;
const SECONDS_ALARM: usize = 0x01;
const MINUTES: usize = 0x02;
const MINUTES_ALARM: usize = 0x03;
const HOURS: usize = 0x04;
const HOURS_ALARM: usize = 0x05;
const DAY_OF_WEEK: usize = 0x06;
const DAY_OF_MONTH: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = CENTURY_INDEX as usize;

const A_UIP: u8 = 0x80;
const A_DV: u8 = 0x70;
const A_DV_32KHZ: u8 = 0x20;
const A_RS: u8 = 0x0f;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

const TICKS_PER_SEC: u64 = RTC_TICK_HZ;
/// UIP is high for this many ticks (244.140625 us) before an update.
const UIP_TICKS: u64 = 8;
/// Updates are this far from the divider's phase origin: the first update after the
/// divider leaves reset comes half a second later.
const HALF_SEC_TICKS: u64 = TICKS_PER_SEC / 2;
/// Beyond this many seconds at once, the alarm is not compared second by second: any valid
/// alarm time occurs within a day.
const STEPWISE_MAX_SECS: u64 = 2 * 86_400;
const NS_PER_SEC: u128 = 1_000_000_000;

/// Errors of the RTC.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RtcError {
    /// A start time the chip cannot show.
    #[error("the RTC shows the years 1900 to 2099; {0} is outside them")]
    OutOfRange(String),
    /// A start time that is not `YYYY-MM-DDTHH:MM:SS`.
    #[error("{0:?} is not a time of the form YYYY-MM-DDTHH:MM:SS (UTC, e.g. 2026-01-01T00:00:00)")]
    Syntax(String),
    /// A saved state the device cannot be in.
    #[error("saved RTC state is invalid: {0}; the state is corrupt or from an incompatible build")]
    InvalidState(String),
}

/// 32768 / 1e9 reduced: ticks = ns * 64 / 1_953_125.
const NS_PER_TICK_NUM: u64 = 1_953_125;
const NS_PER_TICK_DEN: u64 = 64;

/// Tick of the 32.768 kHz time base at virtual time `ns`.
pub fn ns_to_ticks(ns: u64) -> u64 {
    // The run loop asks on every exit: stay in u64 (a multiply by a constant) for the first
    // nine years of virtual time.
    if ns < 1 << 57 {
        return ns * NS_PER_TICK_DEN / NS_PER_TICK_NUM;
    }
    (u128::from(ns) * u128::from(RTC_TICK_HZ) / NS_PER_SEC) as u64
}

/// First virtual nanosecond at which tick `tick` has happened, if it fits in a u64.
pub fn checked_ticks_to_ns(tick: u64) -> Option<u64> {
    if tick < 1 << 40 {
        return Some((tick * NS_PER_TICK_NUM).div_ceil(NS_PER_TICK_DEN));
    }
    let ns = (u128::from(tick) * NS_PER_SEC).div_ceil(u128::from(RTC_TICK_HZ));
    u64::try_from(ns).ok()
}

/// Number of ticks `t` in `(t0, t1]` with `t % period == residue`.
fn ticks_between(t0: u64, t1: u64, period: u64, residue: u64) -> u64 {
    let f = |t: u64| (t + (period - residue)) / period;
    f(t1) - f(t0)
}

/// The first tick after `t` with `tick % period == residue`.
fn next_tick_after(t: u64, period: u64, residue: u64) -> Option<u64> {
    let d = match (residue + period - t % period) % period {
        0 => period,
        d => d,
    };
    t.checked_add(d)
}

/// A calendar time in UTC, as the RTC shows it (seconds resolution, years 1900-2099).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RtcTime {
    /// 1900..=2099.
    pub year: u16,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u64;
    let mp = u64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + u64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i64 - 719_468
}

/// The proleptic Gregorian date of day `z` since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe as i64 + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl RtcTime {
    /// The time `secs` seconds after 1970-01-01T00:00:00 UTC.
    pub fn from_unix(secs: i64) -> Result<Self, RtcError> {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        if !(1900..=2099).contains(&y) {
            return Err(RtcError::OutOfRange(format!("unix time {secs}")));
        }
        Ok(Self {
            year: y as u16,
            month: m as u8,
            day: d as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        })
    }

    /// Seconds since 1970-01-01T00:00:00 UTC.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(
            i64::from(self.year),
            u32::from(self.month),
            u32::from(self.day),
        ) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// Day of the week as the RTC counts it: 1 = Sunday ... 7 = Saturday.
    pub fn weekday(&self) -> u8 {
        let days = self.to_unix().div_euclid(86_400);
        // 1970-01-01 was a Thursday (5).
        ((days + 4).rem_euclid(7) + 1) as u8
    }
}

impl Default for RtcTime {
    /// 2026-01-01T00:00:00 UTC: the RTC's deterministic power-on time.
    fn default() -> Self {
        Self {
            year: 2026,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
        }
    }
}

impl fmt::Display for RtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

impl FromStr for RtcTime {
    type Err = RtcError;

    /// `YYYY-MM-DDTHH:MM:SS`, UTC (a trailing `Z` is accepted), years 1900-2099.
    fn from_str(s: &str) -> Result<Self, RtcError> {
        let bad = || RtcError::Syntax(s.to_string());
        let t = s.strip_suffix('Z').unwrap_or(s);
        let b = t.as_bytes();
        if b.len() != 19
            || b[4] != b'-'
            || b[7] != b'-'
            || !(b[10] == b'T' || b[10] == b' ')
            || b[13] != b':'
            || b[16] != b':'
        {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u16, RtcError> {
            let part = &t[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let time = Self {
            year: num(0..4)?,
            month: num(5..7)? as u8,
            day: num(8..10)? as u8,
            hour: num(11..13)? as u8,
            minute: num(14..16)? as u8,
            second: num(17..19)? as u8,
        };
        if !(1900..=2099).contains(&time.year) {
            return Err(RtcError::OutOfRange(s.to_string()));
        }
        // A date that does not exist (2026-02-30, 24:00:00) does not survive the round trip.
        if Self::from_unix(time.to_unix()) != Ok(time) {
            return Err(bad());
        }
        Ok(time)
    }
}

/// The clock registers decoded to binary and 24-hour time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clock {
    sec: u8,
    min: u8,
    hour: u8,
    wday: u8,
    mday: u8,
    month: u8,
    year: u8,
    century: u8,
}

fn days_in_month(month: u8, year: u8) -> u8 {
    match month {
        4 | 6 | 9 | 11 => 30,
        // The part's leap-year rule: every fourth year (right for 1901-2099).
        2 if year.is_multiple_of(4) => 29,
        2 => 28,
        _ => 31,
    }
}

impl Clock {
    fn step_second(&mut self) {
        if self.sec < 59 {
            self.sec += 1;
            return;
        }
        self.sec = 0;
        if self.min < 59 {
            self.min += 1;
            return;
        }
        self.min = 0;
        if self.hour < 23 {
            self.hour += 1;
            return;
        }
        self.hour = 0;
        self.advance_days(1);
    }

    /// `n` steps of [`Clock::step_second`] at once.
    fn advance_seconds(&mut self, n: u64) {
        let total = u64::from(self.sec.min(59)) + n;
        if total < 60 {
            self.sec = total as u8;
            return;
        }
        self.sec = (total % 60) as u8;
        let total = u64::from(self.min.min(59)) + total / 60;
        if total < 60 {
            self.min = total as u8;
            return;
        }
        self.min = (total % 60) as u8;
        let total = u64::from(self.hour.min(23)) + total / 60;
        self.hour = (total % 24) as u8;
        self.advance_days(total / 24);
    }

    fn advance_days(&mut self, mut days: u64) {
        if days == 0 {
            return;
        }
        // An invalid day of week becomes Sunday at the next day, as 7 does.
        let w = if (1..=7).contains(&self.wday) {
            u64::from(self.wday - 1)
        } else {
            6
        };
        self.wday = ((w + days) % 7 + 1) as u8;
        while days > 0 {
            let left = u64::from(days_in_month(self.month, self.year).saturating_sub(self.mday));
            if days <= left {
                self.mday += days as u8;
                return;
            }
            days -= left + 1;
            self.mday = 1;
            if self.month < 12 {
                self.month += 1;
                continue;
            }
            self.month = 1;
            if self.year < 99 {
                self.year += 1;
                continue;
            }
            self.year = 0;
            self.century = if self.century < 99 {
                self.century + 1
            } else {
                0
            };
        }
    }
}

/// Saved state of the RTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The 128 bytes of registers and CMOS RAM, as stored (register A without UIP).
    pub cmos: Vec<u8>,
    /// The index port as last written (bit 7: NMI mask).
    pub index: u8,
    /// Virtual time the RTC was last brought to, in ns.
    pub now_ns: u64,
    /// Tick residue (mod 32768) at which the divider chain last started: periodic flags
    /// come at multiples of the period from it, updates half a second after it.
    pub divider_phase: u64,
}

/// The MC146818 RTC. See the module documentation.
#[derive(Debug, Clone)]
pub struct Rtc {
    cmos: [u8; CMOS_SIZE],
    index: u8,
    now_ns: u64,
    divider_phase: u64,
    /// The tick of `now_ns` and the first ns of the next one (derived: the run loop
    /// advances the RTC on every exit, nearly always within one 30.5 us tick).
    tick: u64,
    next_tick_ns: u64,
    /// The IRQ 8 level last reported to the interrupt controller (host-side: `None` until
    /// the first report, and after a restore).
    reported: Option<bool>,
}

/// Two RTCs are equal when their guest-visible state is.
impl PartialEq for Rtc {
    fn eq(&self, other: &Self) -> bool {
        (self.cmos, self.index, self.now_ns, self.divider_phase)
            == (other.cmos, other.index, other.now_ns, other.divider_phase)
    }
}

impl Eq for Rtc {}

impl Default for Rtc {
    fn default() -> Self {
        Self::new(RtcTime::default())
    }
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

impl Rtc {
    /// The RTC at virtual time 0 showing `start` (BCD, 24-hour mode), its first update at
    /// virtual time 1 s.
    pub fn new(start: RtcTime) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[REG_A] = A_DV_32KHZ | 0x06;
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        let b = to_bcd;
        cmos[SECONDS] = b(start.second);
        cmos[MINUTES] = b(start.minute);
        cmos[HOURS] = b(start.hour);
        cmos[DAY_OF_WEEK] = start.weekday();
        cmos[DAY_OF_MONTH] = b(start.day);
        cmos[MONTH] = b(start.month);
        cmos[YEAR] = b((start.year % 100) as u8);
        cmos[CENTURY] = b((start.year / 100) as u8);
        Self {
            cmos,
            index: 0,
            now_ns: 0,
            // Updates at whole seconds of virtual time.
            divider_phase: HALF_SEC_TICKS,
            tick: 0,
            next_tick_ns: checked_ticks_to_ns(1).unwrap_or(u64::MAX),
            reported: None,
        }
    }

    /// Current virtual time in ns.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Whether the index port's NMI-mask bit (7) is set.
    pub fn nmi_masked(&self) -> bool {
        self.index & 0x80 != 0
    }

    /// The time the clock shows, if its registers hold a valid time.
    pub fn time(&self) -> Option<RtcTime> {
        let c = self.clock();
        let t = RtcTime {
            year: u16::from(c.century) * 100 + u16::from(c.year),
            month: c.month,
            day: c.mday,
            hour: c.hour,
            minute: c.min,
            second: c.sec,
        };
        (RtcTime::from_unix(t.to_unix()) == Ok(t)).then_some(t)
    }

    /// Level of the IRQ 8 output (IRQF).
    pub fn irq_level(&self) -> bool {
        self.cmos[REG_C] & C_IRQF != 0
    }

    fn tick(&self) -> u64 {
        self.tick
    }

    fn running(&self) -> bool {
        self.cmos[REG_A] & A_DV == A_DV_32KHZ
    }

    fn updating(&self) -> bool {
        self.running() && self.cmos[REG_B] & B_SET == 0
    }

    fn update_residue(&self) -> u64 {
        (self.divider_phase + HALF_SEC_TICKS) % TICKS_PER_SEC
    }

    /// Ticks of the periodic flag for the selected rate, if one is selected.
    fn periodic_ticks(&self) -> Option<u64> {
        match self.cmos[REG_A] & A_RS {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            rs => Some(1 << (rs - 1)),
        }
    }

    /// Whether an update is less than 244 us away (UIP).
    fn uip(&self) -> bool {
        if !self.updating() {
            return false;
        }
        let t = self.tick();
        next_tick_after(t, TICKS_PER_SEC, self.update_residue()).is_some_and(|u| u - t <= UIP_TICKS)
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B] & B_BINARY != 0
    }

    fn decode(&self, raw: u8) -> u8 {
        if self.binary() {
            raw
        } else {
            from_bcd(raw)
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode_hour(&self, raw: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.decode(raw);
        }
        let h12 = self.decode(raw & 0x7f) % 12;
        if raw & 0x80 != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    fn encode_hour(&self, h24: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(h24);
        }
        let h12 = match h24 % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if h24 >= 12 { 0x80 } else { 0 }
    }

    fn clock(&self) -> Clock {
        Clock {
            sec: self.decode(self.cmos[SECONDS]),
            min: self.decode(self.cmos[MINUTES]),
            hour: self.decode_hour(self.cmos[HOURS]),
            wday: self.decode(self.cmos[DAY_OF_WEEK]),
            mday: self.decode(self.cmos[DAY_OF_MONTH]),
            month: self.decode(self.cmos[MONTH]),
            year: self.decode(self.cmos[YEAR]),
            century: self.decode(self.cmos[CENTURY]),
        }
    }

    /// Write back the fields of `new` that differ from `old` (a register the update did not
    /// touch keeps its bytes, valid or not).
    fn store_clock(&mut self, old: &Clock, new: &Clock) {
        let fields = [
            (SECONDS, old.sec, new.sec),
            (MINUTES, old.min, new.min),
            (DAY_OF_WEEK, old.wday, new.wday),
            (DAY_OF_MONTH, old.mday, new.mday),
            (MONTH, old.month, new.month),
            (YEAR, old.year, new.year),
            (CENTURY, old.century, new.century),
        ];
        for (reg, was, now) in fields {
            if was != now {
                self.cmos[reg] = self.encode(now);
            }
        }
        if old.hour != new.hour {
            self.cmos[HOURS] = self.encode_hour(new.hour);
        }
    }

    /// The alarm fields: `None` for "don't care" (bits 7:6 = 11).
    fn alarm(&self) -> [Option<u8>; 3] {
        let field = |reg: usize, hour: bool| {
            let raw = self.cmos[reg];
            if raw & 0xc0 == 0xc0 {
                None
            } else if hour {
                Some(self.decode_hour(raw))
            } else {
                Some(self.decode(raw))
            }
        };
        [
            field(SECONDS_ALARM, false),
            field(MINUTES_ALARM, false),
            field(HOURS_ALARM, true),
        ]
    }

    fn alarm_matches(alarm: &[Option<u8>; 3], c: &Clock) -> bool {
        let eq = |a: Option<u8>, v: u8| a.is_none_or(|a| a == v);
        eq(alarm[0], c.sec) && eq(alarm[1], c.min) && eq(alarm[2], c.hour)
    }

    /// `n` update cycles: the clock advances `n` seconds, UF is set, and AF if the alarm
    /// matched after any of them.
    fn update_cycles(&mut self, n: u64) {
        let old = self.clock();
        let mut c = old;
        let alarm = self.alarm();
        let af_pending = self.cmos[REG_C] & C_AF != 0;
        let mut af = false;
        if af_pending || n > STEPWISE_MAX_SECS {
            c.advance_seconds(n);
            // Within a day every valid alarm time comes round.
            af = !af_pending
                && alarm[0].is_none_or(|s| s < 60)
                && alarm[1].is_none_or(|m| m < 60)
                && alarm[2].is_none_or(|h| h < 24);
        } else {
            for _ in 0..n {
                c.step_second();
                af |= Self::alarm_matches(&alarm, &c);
            }
        }
        self.store_clock(&old, &c);
        self.cmos[REG_C] |= C_UF | if af { C_AF } else { 0 };
    }

    fn update_irqf(&mut self) {
        let c = self.cmos[REG_C];
        let b = self.cmos[REG_B];
        let irqf = (c & C_PF != 0 && b & B_PIE != 0)
            || (c & C_AF != 0 && b & B_AIE != 0)
            || (c & C_UF != 0 && b & B_UIE != 0);
        if irqf {
            self.cmos[REG_C] |= C_IRQF;
        } else {
            self.cmos[REG_C] &= !C_IRQF;
        }
    }

    /// Bring the RTC to virtual time `now_ns` (earlier times are ignored): the periodic
    /// flags and update cycles in between happen.
    pub fn advance_to(&mut self, now_ns: u64) {
        if now_ns <= self.now_ns {
            return;
        }
        self.now_ns = now_ns;
        if now_ns < self.next_tick_ns {
            return; // the same tick: no flag, update or UIP change
        }
        let t0 = self.tick;
        self.tick = ns_to_ticks(now_ns);
        self.next_tick_ns = checked_ticks_to_ns(self.tick + 1).unwrap_or(u64::MAX);
        let t1 = self.tick;
        if t1 == t0 || !self.running() {
            return;
        }
        let phase = self.divider_phase;
        if let Some(p) = self.periodic_ticks() {
            if ticks_between(t0, t1, p, phase % p) > 0 {
                self.cmos[REG_C] |= C_PF;
            }
        }
        if self.updating() {
            let n = ticks_between(t0, t1, TICKS_PER_SEC, self.update_residue());
            if n > 0 {
                self.update_cycles(n);
            }
        }
        self.update_irqf();
    }

    /// Virtual time (ns) of the next periodic flag or update cycle that can raise IRQ 8, if
    /// one is scheduled (none while IRQF is already set: the line is high until register C
    /// is read).
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let b = self.cmos[REG_B];
        if self.irq_level() || !self.running() || b & (B_PIE | B_UIE | B_AIE) == 0 {
            return None;
        }
        let t = self.tick();
        let periodic = self
            .periodic_ticks()
            .filter(|_| b & B_PIE != 0)
            .and_then(|p| next_tick_after(t, p, self.divider_phase % p));
        let update = (b & (B_UIE | B_AIE) != 0 && b & B_SET == 0)
            .then(|| next_tick_after(t, TICKS_PER_SEC, self.update_residue()))
            .flatten();
        [periodic, update]
            .into_iter()
            .flatten()
            .min()
            .and_then(checked_ticks_to_ns)
    }

    /// Guest write of the index port.
    pub fn write_index(&mut self, value: u8) {
        self.index = value;
    }

    /// Guest read of the data port: the register the index selects.
    pub fn read_data(&mut self) -> u8 {
        let reg = usize::from(self.index & 0x7f);
        match reg {
            REG_A => (self.cmos[REG_A] & !A_UIP) | if self.uip() { A_UIP } else { 0 },
            REG_C => {
                let v = self.cmos[REG_C];
                self.cmos[REG_C] = 0;
                v
            }
            REG_D => D_VRT,
            _ => self.cmos[reg],
        }
    }

    /// Guest write of the data port: the register the index selects.
    pub fn write_data(&mut self, value: u8) {
        let reg = usize::from(self.index & 0x7f);
        match reg {
            REG_A => {
                let was_running = self.running();
                self.cmos[REG_A] = value & !A_UIP;
                if !was_running && self.running() {
                    // The divider starts now: first update half a second later.
                    self.divider_phase = self.tick() % TICKS_PER_SEC;
                }
            }
            REG_B => {
                let mut v = value;
                if v & B_SET != 0 && self.cmos[REG_B] & B_SET == 0 {
                    // Setting SET clears UIE (and ends any update in progress).
                    v &= !B_UIE;
                }
                self.cmos[REG_B] = v;
                self.update_irqf();
            }
            REG_C | REG_D => {} // read-only
            _ => self.cmos[reg] = value,
        }
    }
}

impl Persist for Rtc {
    type State = RtcState;
    type Error = RtcError;
    const STATE_VERSION: u32 = 1;

    fn save(&self) -> RtcState {
        RtcState {
            cmos: self.cmos.to_vec(),
            index: self.index,
            now_ns: self.now_ns,
            divider_phase: self.divider_phase,
        }
    }

    fn restore(&mut self, state: &RtcState) -> Result<(), RtcError> {
        let cmos: [u8; CMOS_SIZE] = state.cmos.as_slice().try_into().map_err(|_| {
            RtcError::InvalidState(format!(
                "{} bytes of CMOS, the part has {CMOS_SIZE}",
                state.cmos.len()
            ))
        })?;
        if state.divider_phase >= TICKS_PER_SEC {
            return Err(RtcError::InvalidState(format!(
                "divider phase {} is not below {TICKS_PER_SEC}",
                state.divider_phase
            )));
        }
        let tick = ns_to_ticks(state.now_ns);
        *self = Self {
            cmos,
            index: state.index,
            now_ns: state.now_ns,
            divider_phase: state.divider_phase,
            tick,
            next_tick_ns: checked_ticks_to_ns(tick + 1).unwrap_or(u64::MAX),
            reported: None,
        };
        Ok(())
    }
}

impl Rtc {
    /// Drive IRQ 8 to IRQF, telling the controller only of changes (the run loop calls
    /// `advance_to` on every exit).
    fn report_irq(&mut self, cx: &mut DeviceContext<'_>) {
        let level = self.irq_level();
        if self.reported != Some(level) {
            self.reported = Some(level);
            cx.set_irq(RTC_IRQ, level);
        }
    }
}

/// The RTC on the platform: ports 0x70-0x71 (byte-wide), IRQ 8.
impl Device for Rtc {
    fn id(&self) -> &str {
        RTC_ID
    }

    fn port_regions(&self) -> Vec<PortRegion> {
        vec![PortRegion::bytewise(RTC_INDEX_PORT, 2)]
    }

    fn hooks(&self) -> Hooks {
        Hooks::CLOCK
    }

    fn io_read(
        &mut self,
        _base: u16,
        offset: u16,
        data: &mut [u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        Rtc::advance_to(self, cx.now_ns());
        let v = match offset {
            0 => 0xff,
            _ => self.read_data(),
        };
        data.fill(v);
        self.report_irq(cx);
        Access::Handled
    }

    fn io_write(
        &mut self,
        _base: u16,
        offset: u16,
        data: &[u8],
        cx: &mut DeviceContext<'_>,
    ) -> Access {
        Rtc::advance_to(self, cx.now_ns());
        if let Some(&v) = data.first() {
            match offset {
                0 => self.write_index(v),
                _ => self.write_data(v),
            }
        }
        self.report_irq(cx);
        Access::Handled
    }

    fn advance_to(&mut self, now_ns: u64, cx: &mut DeviceContext<'_>) {
        Rtc::advance_to(self, now_ns);
        self.report_irq(cx);
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        Rtc::next_deadline_ns(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::IrqSink;

    /// IRQ 8 as the PIC sees it: rising edges counted.
    #[derive(Default)]
    struct Line {
        level: bool,
        edges: u32,
    }
    impl IrqSink for Line {
        fn set_level(&mut self, irq: u8, level: bool) {
            assert_eq!(irq, RTC_IRQ);
            if level && !self.level {
                self.edges += 1;
            }
            self.level = level;
        }
    }

    /// Drives an RTC through the port interface at virtual times.
    struct Bench {
        rtc: Rtc,
        line: Line,
        now: u64,
    }

    impl Bench {
        fn new() -> Self {
            Self::at(RtcTime::default())
        }
        fn at(start: RtcTime) -> Self {
            Self {
                rtc: Rtc::new(start),
                line: Line::default(),
                now: 0,
            }
        }
        fn advance(&mut self, now: u64) {
            self.now = now;
            let mut cx = DeviceContext::new(now, &mut self.line);
            Device::advance_to(&mut self.rtc, now, &mut cx);
        }
        fn read(&mut self, reg: u8) -> u8 {
            let mut cx = DeviceContext::new(self.now, &mut self.line);
            self.rtc.io_write(0x70, 0, &[reg], &mut cx);
            let mut b = [0u8];
            self.rtc.io_read(0x70, 1, &mut b, &mut cx);
            b[0]
        }
        fn write(&mut self, reg: u8, v: u8) {
            let mut cx = DeviceContext::new(self.now, &mut self.line);
            self.rtc.io_write(0x70, 0, &[reg], &mut cx);
            self.rtc.io_write(0x70, 1, &[v], &mut cx);
        }
        fn time_regs(&mut self) -> [u8; 10] {
            let mut r = [0u8; 10];
            for (i, v) in r.iter_mut().enumerate() {
                *v = self.read(i as u8);
            }
            r
        }
        /// Linux's `mc146818_get_time` (via `mc146818_avoid_UIP`): poll UIP, waiting 1 ms
        /// between tries, at most 10 tries. Returns the seconds register and the tries used.
        fn linux_read_time(&mut self) -> Option<(u8, u32)> {
            for i in 0..10 {
                let sec = self.read(0);
                if self.read(0x0a) & 0x80 != 0 {
                    self.advance(self.now + 1_000_000);
                    continue;
                }
                if sec != self.read(0) {
                    continue;
                }
                let _ = (self.read(2), self.read(4), self.read(7), self.read(8));
                let _ = (self.read(9), self.read(0x0b));
                if self.read(0x0a) & 0x80 != 0 {
                    self.advance(self.now + 1_000_000);
                    continue;
                }
                if sec != self.read(0) {
                    continue;
                }
                return Some((sec, i + 1));
            }
            None
        }
    }

    fn at(tick: u64) -> u64 {
        checked_ticks_to_ns(tick).unwrap()
    }

    #[test]
    fn tick_conversions_agree_on_both_paths() {
        let slow_ticks = |ns: u64| (u128::from(ns) * 32_768 / 1_000_000_000) as u64;
        let slow_ns = |t: u64| (u128::from(t) * 1_000_000_000).div_ceil(32_768) as u64;
        for ns in [0, 1, 30_517, 30_518, 1_000_000_000, (1 << 57) - 1, 1 << 57, u64::MAX] {
            assert_eq!(ns_to_ticks(ns), slow_ticks(ns), "{ns} ns");
        }
        for t in [0, 1, 32_767, 32_768, (1 << 40) - 1, 1 << 40, 1 << 45] {
            assert_eq!(checked_ticks_to_ns(t), Some(slow_ns(t)), "tick {t}");
            let ns = checked_ticks_to_ns(t).unwrap();
            assert_eq!(ns_to_ticks(ns), t);
            assert_eq!(ns_to_ticks(ns - u64::from(t > 0)), t.saturating_sub(1));
        }
        assert_eq!(checked_ticks_to_ns(u64::MAX), None);
    }

    #[test]
    fn power_on_registers_as_linux_expects_them() {
        let mut b = Bench::new();
        // 2026-01-01 00:00:00, Thursday, BCD.
        assert_eq!(b.time_regs(), [0, 0, 0, 0, 0, 0, 5, 0x01, 0x01, 0x26]);
        assert_eq!(b.read(0x32), 0x20, "century");
        assert_eq!(b.read(0x0a), 0x26, "32.768 kHz time base, 1024 Hz rate");
        assert_eq!(b.read(0x0b), 0x02, "24-hour BCD, no interrupts");
        assert_eq!(b.read(0x0c), 0x00);
        // rtc-cmos: VRT set and bit 6 clear ("the RTC is accessible").
        assert_eq!(b.read(0x0d), 0x80);
        assert_eq!(b.rtc.time(), Some(RtcTime::default()));
        assert_eq!(b.rtc.next_deadline_ns(), None, "no interrupt enabled");
        assert_eq!(b.line.edges, 0);
    }

    #[test]
    fn the_clock_follows_virtual_time_with_carries() {
        let start: RtcTime = "1999-12-31T23:59:58".parse().unwrap();
        let mut b = Bench::at(start);
        b.advance(1_000_000_000 - 1);
        assert_eq!(b.read(0), 0x58);
        b.advance(1_000_000_000);
        assert_eq!(b.read(0), 0x59);
        b.advance(2_000_000_000);
        // 2000-01-01 00:00:00, a Saturday (7); the century carries.
        assert_eq!(b.time_regs(), [0, 0, 0, 0, 0, 0, 7, 0x01, 0x01, 0x00]);
        assert_eq!(b.read(0x32), 0x20);
        assert_eq!(b.rtc.time().unwrap().to_string(), "2000-01-01T00:00:00");
        // One jump of 60 days and 5 s lands where 60 days of single steps do (2000 leaps).
        b.advance(2_000_000_000 + (60 * 86_400 + 5) * 1_000_000_000);
        assert_eq!(b.rtc.time().unwrap().to_string(), "2000-03-01T00:00:05");
        assert_eq!(b.read(6), 4, "a Wednesday");
    }

    #[test]
    fn bulk_catch_up_matches_second_by_second() {
        let start: RtcTime = "2023-02-27T22:58:30".parse().unwrap();
        let mut stepped = Bench::at(start);
        let mut jumped = Bench::at(start);
        let end = (3 * 86_400 + 3_723) * 1_000_000_000;
        for s in 1..=end / 1_000_000_000 {
            stepped.advance(s * 1_000_000_000);
        }
        jumped.advance(end);
        assert_eq!(stepped.time_regs(), jumped.time_regs());
        assert_eq!(jumped.rtc.time().unwrap().to_string(), "2023-03-03T00:00:33");
        // Years at once (past the stepwise alarm window).
        jumped.advance(end + 400 * 86_400 * 1_000_000_000);
        assert_eq!(jumped.rtc.time().unwrap().to_string(), "2024-04-06T00:00:33");
        assert_eq!(jumped.rtc.time().unwrap().weekday(), jumped.read(6));
    }

    #[test]
    fn bcd_and_binary_round_trip_and_12_hour_mode() {
        let mut b = Bench::new();
        // Binary, 24 h: write 23:59:59 on 2024-02-28 (a Wednesday) and watch it roll.
        b.write(0x0b, 0x86); // SET | binary | 24h while writing
        for (reg, v) in [(0, 59), (2, 59), (4, 23), (6, 4), (7, 28), (8, 2), (9, 24)] {
            b.write(reg, v);
            assert_eq!(b.read(reg), v, "register {reg} reads back as written");
        }
        b.write(0x0b, 0x06);
        b.advance(1_000_000_000);
        assert_eq!(b.time_regs()[..10], [0, 0, 0, 0, 0, 0, 5, 29, 2, 24], "leap day");
        // BCD again: the bytes stay as they are until rewritten (no conversion).
        b.write(0x0b, 0x02);
        assert_eq!(b.read(7), 29);
        // Binary 29 and 24 read as BCD: 0x1d is 23, 0x18 is 18.
        assert_eq!(b.rtc.time().unwrap().to_string(), "2018-02-23T00:00:00");
        b.write(7, 0x29);
        b.write(9, 0x24);
        assert_eq!(b.rtc.time().unwrap().to_string(), "2024-02-29T00:00:00");
        // 12-hour BCD: 11:59:59 PM, then 12:00:00 AM of the next day.
        b.write(0x0b, 0x80);
        b.write(4, 0x80 | 0x11);
        b.write(2, 0x59);
        b.write(0, 0x59);
        b.write(0x0b, 0x00);
        assert_eq!(b.rtc.time().unwrap().to_string(), "2024-02-29T23:59:59");
        b.advance(2_000_000_000);
        assert_eq!((b.read(4), b.read(7), b.read(8)), (0x12, 0x01, 0x03));
        b.advance(2_000_000_000 + 12 * 3_600 * 1_000_000_000);
        assert_eq!(b.read(4), 0x80 | 0x12, "noon is 12 PM");
        b.advance(2_000_000_000 + 13 * 3_600 * 1_000_000_000);
        assert_eq!(b.read(4), 0x80 | 0x01);
    }

    #[test]
    fn uip_is_high_for_244_us_before_each_update() {
        let mut b = Bench::new();
        let update = TICKS_PER_SEC; // at 1 s
        b.advance(at(update - UIP_TICKS) - 1);
        assert_eq!(b.read(0x0a) & 0x80, 0, "just before the window");
        b.advance(at(update - UIP_TICKS));
        assert_eq!(b.read(0x0a) & 0x80, 0x80, "244 us before the update");
        assert_eq!(
            1_000_000_000 - at(update - UIP_TICKS),
            244_140,
            "the window is 244.14 us"
        );
        b.advance(at(update) - 1);
        assert_eq!((b.read(0x0a) & 0x80, b.read(0)), (0x80, 0x00));
        b.advance(at(update));
        assert_eq!((b.read(0x0a) & 0x80, b.read(0)), (0, 0x01));
        // Linux reads a stable time within two tries from anywhere, window included.
        for offset_ns in [0, 100_000, 244_140, 500_000] {
            let mut b = Bench::new();
            b.advance(5_000_000_000 - offset_ns);
            let (_, tries) = b.linux_read_time().expect("time read");
            assert!(tries <= 2, "{tries} tries {offset_ns} ns before an update");
        }
        // With the divider stopped or SET, UIP stays low (no update is coming).
        b.write(0x0b, 0x82);
        b.advance(at(2 * update - 1));
        assert_eq!(b.read(0x0a) & 0x80, 0);
    }

    #[test]
    fn periodic_interrupts_at_the_selected_rates() {
        for (rs, hz) in [(1u8, 256u64), (2, 128), (3, 8192), (6, 1024), (15, 2)] {
            let mut b = Bench::new();
            b.write(0x0a, 0x20 | rs);
            b.write(0x0b, 0x42); // PIE
            // The VMM loop: run to each deadline, take the interrupt, read C.
            let mut irqs = 0u64;
            while let Some(d) = b.rtc.next_deadline_ns() {
                if d > 1_000_000_000 {
                    break;
                }
                b.advance(d - 1);
                assert!(!b.line.level, "nothing before the deadline");
                b.advance(d);
                assert!(b.line.level, "rs {rs}: IRQ 8 at the deadline");
                // IRQF | PF (and UF at whole seconds).
                assert_eq!(b.read(0x0c) & 0xe0, 0xc0);
                assert!(!b.line.level);
                irqs += 1;
            }
            assert_eq!(irqs, hz, "rs {rs}: {hz} interrupts in a second");
            assert_eq!(u64::from(b.line.edges), hz);
        }
        // RS = 0: no periodic flag at all.
        let mut b = Bench::new();
        b.write(0x0a, 0x20);
        b.write(0x0b, 0x42);
        assert_eq!(b.rtc.next_deadline_ns(), None);
        b.advance(3_000_000_000);
        assert_eq!(b.read(0x0c) & 0x40, 0);
    }

    #[test]
    fn flags_without_enables_and_c_read_clears() {
        let mut b = Bench::new();
        b.advance(1_500_000_000);
        // PF (1024 Hz) and UF are flagged though no interrupt is enabled.
        assert_eq!(b.read(0x0c), 0x50);
        assert_eq!(b.read(0x0c), 0x00, "reading C cleared it");
        assert_eq!(b.line.edges, 0);
        // Enabling UIE with UF pending raises IRQF and the line at once.
        b.advance(2_000_000_000);
        b.write(0x0b, 0x12);
        assert!(b.line.level);
        assert_eq!(b.rtc.next_deadline_ns(), None, "the line is already high");
        assert_eq!(b.read(0x0c) & 0x90, 0x90);
        assert!(!b.line.level, "reading C lowers IRQ 8");
        assert_eq!(b.rtc.next_deadline_ns(), Some(3_000_000_000));
    }

    #[test]
    fn alarm_interrupts() {
        let mut b = Bench::new();
        b.write(1, 0x05); // 00:00:05
        b.write(3, 0x00);
        b.write(5, 0x00);
        b.write(0x0b, 0x22); // AIE
        let mut seen = Vec::new();
        while let Some(d) = b.rtc.next_deadline_ns() {
            if d > 70_000_000_000 {
                break;
            }
            b.advance(d);
            if b.line.level {
                seen.push((d / 1_000_000_000, b.read(0x0c)));
            }
        }
        // IRQF | PF | AF | UF once, at 00:00:05 (PF: the 1024 Hz rate runs without PIE).
        assert_eq!(seen, [(5, 0xf0)]);
        // Don't-care minutes and hours: every minute at :05.
        b.write(3, 0xc0);
        b.write(5, 0xff);
        while let Some(d) = b.rtc.next_deadline_ns() {
            if d > 190_000_000_000 {
                break;
            }
            b.advance(d);
            if b.line.level {
                seen.push((d / 1_000_000_000, b.read(0x0c) & 0xa0));
            }
        }
        assert_eq!(seen[1..], [(125, 0xa0), (185, 0xa0)]);
        // Catch-up without stops finds the alarm too (AF without AIE).
        let mut b = Bench::new();
        b.write(1, 0x30);
        b.write(3, 0x01);
        b.write(5, 0xc0);
        b.advance(60_000_000_000);
        assert_eq!(b.read(0x0c) & 0x20, 0, "00:01:30 not yet");
        b.advance(100_000_000_000);
        assert_eq!(b.read(0x0c) & 0x20, 0x20);
        b.advance(30 * 86_400 * 1_000_000_000);
        assert_eq!(b.read(0x0c) & 0x20, 0x20, "within a long jump");
    }

    #[test]
    fn set_freezes_updates_and_divider_reset_restarts_half_a_second_later() {
        let mut b = Bench::new();
        b.advance(500_000_000);
        b.write(0x0b, 0x92); // SET (and UIE, which SET clears)
        assert_eq!(b.read(0x0b), 0x82);
        b.advance(3_500_000_000);
        assert_eq!(b.read(0), 0x00, "no updates while SET");
        assert_eq!(b.read(0x0c) & 0x10, 0);
        // Linux's mc146818_set_time: SET, divider reset, write, restore.
        b.write(0x0a, 0x70);
        b.write(0, 0x42);
        b.write(0x0b, 0x02);
        b.advance(5_000_000_000);
        assert_eq!(b.read(0), 0x42, "the divider is held in reset");
        b.advance(5_250_000_000);
        b.write(0x0a, 0x26);
        b.advance(5_750_000_000 - 1);
        assert_eq!(b.read(0), 0x42);
        b.advance(5_750_000_000);
        assert_eq!(b.read(0), 0x43, "first update half a second after the release");
        b.advance(6_750_000_000);
        assert_eq!(b.read(0), 0x44);
        // Other DV values stop the clock as well.
        b.write(0x0a, 0x06);
        b.advance(20_000_000_000);
        assert_eq!(b.read(0), 0x44);
    }

    #[test]
    fn cmos_ram_index_and_nmi_mask() {
        let mut b = Bench::new();
        for i in 0x0e..0x80u8 {
            b.write(i | 0x80, i ^ 0x5a);
        }
        assert!(b.rtc.nmi_masked());
        for i in 0x0e..0x80u8 {
            assert_eq!(b.read(i), i ^ 0x5a);
        }
        assert!(!b.rtc.nmi_masked());
        let mut v = [0u8];
        let mut cx = DeviceContext::new(0, &mut b.line);
        b.rtc.io_read(0x70, 0, &mut v, &mut cx);
        assert_eq!(v, [0xff], "the index port reads all-ones");
        // C and D are read-only.
        b.write(0x0c, 0xff);
        b.write(0x0d, 0x00);
        assert_eq!((b.read(0x0c), b.read(0x0d)), (0, 0x80));
    }

    #[test]
    fn save_restore_mid_update_continues_identically() {
        let mut a = Bench::new();
        a.write(0x0a, 0x23); // 8192 Hz
        a.write(0x0b, 0x52); // PIE | UIE
        a.write(0x40, 0x99);
        a.advance(at(3 * TICKS_PER_SEC - 3)); // inside the UIP window
        assert_eq!(a.read(0x0a) & 0x80, 0x80);
        let json = serde_json::to_string(&Persist::save(&a.rtc)).unwrap();
        let mut b = Bench::new();
        Persist::restore(&mut b.rtc, &serde_json::from_str(&json).unwrap()).unwrap();
        b.line.level = a.line.level;
        assert_eq!(a.rtc, b.rtc);
        for step in 1..200u64 {
            let t = a.now + step * 37_013;
            a.advance(t);
            b.advance(t);
            assert_eq!(a.rtc.next_deadline_ns(), b.rtc.next_deadline_ns());
            for reg in [0x0a, 0x00, 0x0c, 0x40] {
                assert_eq!(a.read(reg), b.read(reg), "register {reg:#x} at step {step}");
            }
            assert_eq!(a.line.level, b.line.level);
        }
        assert_eq!(a.rtc, b.rtc);
        // Bad states are refused and change nothing.
        let mut st = Persist::save(&a.rtc);
        st.cmos.pop();
        assert!(Persist::restore(&mut b.rtc, &st).is_err());
        let mut st = Persist::save(&a.rtc);
        st.divider_phase = TICKS_PER_SEC;
        let e = Persist::restore(&mut b.rtc, &st).unwrap_err();
        assert!(e.to_string().contains("divider phase"), "{e}");
        assert_eq!(a.rtc, b.rtc);
    }

    #[test]
    fn start_times_parse_and_convert() {
        let t: RtcTime = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(t, RtcTime::default());
        assert_eq!(t.to_unix(), 1_767_225_600);
        assert_eq!(RtcTime::from_unix(1_767_225_600), Ok(t));
        assert_eq!(t.weekday(), 5);
        assert_eq!("1970-01-01 00:00:00".parse::<RtcTime>().unwrap().to_unix(), 0);
        assert_eq!(
            RtcTime::from_unix(-1).unwrap().to_string(),
            "1969-12-31T23:59:59"
        );
        for bad in ["2026-02-30T00:00:00", "2026-01-01T24:00:00", "2026-1-01T00:00:00", "x"] {
            assert!(matches!(bad.parse::<RtcTime>(), Err(RtcError::Syntax(_))), "{bad}");
        }
        assert!(matches!(
            "2100-01-01T00:00:00".parse::<RtcTime>(),
            Err(RtcError::OutOfRange(_))
        ));
        assert!(RtcTime::from_unix(i64::MIN / 2).is_err());
        let e = "yesterday".parse::<RtcTime>().unwrap_err().to_string();
        assert!(e.contains("YYYY-MM-DDTHH:MM:SS"), "{e}");
    }

    #[test]
    fn end_of_time_and_odd_register_values_do_not_panic() {
        let mut b = Bench::new();
        b.write(0x0b, 0x72);
        for reg in 0..10 {
            b.write(reg, 0xff);
        }
        b.advance(u64::MAX - 5);
        b.advance(u64::MAX);
        assert!(b.rtc.next_deadline_ns().is_none_or(|d| d > u64::MAX - 5));
        let _ = b.time_regs();
    }
}
