//! The demo guest's deterministic workload, shared verbatim by the `demo` guest and the
//! host crate `esvm-guests` (`demo::expected_checksum`), so a host test can predict the
//! exact `checksum=` line of any run. Integer-only, `core`-only.

// Both includers use a subset of the items.
#![allow(dead_code)]

/// Iterations when `iterations=` is not given: about 70 million instructions in the
/// guest (about 230 per iteration without a dirty buffer, about 410 with one).
pub const DEFAULT_ITERATIONS: u64 = 300_000;
/// Mixing rounds per iteration.
pub const ROUNDS: u64 = 32;
/// Buffer pages written per iteration (one word each, page stride).
pub const PAGES_PER_ITER: usize = 16;
/// 64-bit words per 4 KiB page.
pub const WORDS_PER_PAGE: usize = 512;
/// Number of `tick` lines for `iterations >= TICKS`.
pub const TICKS: u64 = 10;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Runs `iterations` iterations over `buf` (the dirty buffer, `dirty-mib` MiB of zeroed
/// 64-bit words; may be empty) and returns the checksum. Calls `on_tick(k)` for
/// k = 1..=10 after every `iterations / 10` iterations (after every iteration, when
/// there are fewer than 10).
///
/// Each iteration: `ROUNDS` rounds of add/xor/rotate/multiply mixing; then, with a
/// buffer, one word written in each of the next `PAGES_PER_ITER` pages (cycling through
/// the buffer, the word offset moving with the iteration) and one word read back from
/// a state-dependent page. The checksum is FNV-1a over 64-bit words of the final state
/// and of the whole buffer, finished with the SplitMix64 mixer.
pub fn run(iterations: u64, buf: &mut [u64], mut on_tick: impl FnMut(u64)) -> u64 {
    let pages = buf.len() / WORDS_PER_PAGE;
    let mut a: u64 = 0x243f_6a88_85a3_08d3 ^ iterations;
    let mut b: u64 = 0x1319_8a2e_0370_7344 ^ (pages as u64);
    let tick_every = if iterations >= TICKS {
        iterations / TICKS
    } else {
        1
    };
    let mut next_tick = tick_every;
    let mut ticks = 0;
    let mut page = 0usize;
    for i in 0..iterations {
        for r in 0..ROUNDS {
            a = a.wrapping_add(b ^ r).rotate_left(23);
            b = (b ^ a).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        if pages != 0 {
            let word = (i as usize) & (WORDS_PER_PAGE - 1);
            for j in 0..PAGES_PER_ITER {
                buf[page * WORDS_PER_PAGE + word] = a ^ (j as u64);
                page += 1;
                if page == pages {
                    page = 0;
                }
            }
            let q = (b % pages as u64) as usize;
            b ^= buf[q * WORDS_PER_PAGE + ((word * 7) & (WORDS_PER_PAGE - 1))];
        }
        if i + 1 == next_tick && ticks < TICKS {
            ticks += 1;
            on_tick(ticks);
            next_tick += tick_every;
        }
    }
    let mut h = FNV_OFFSET;
    for w in [a, b].iter().chain(buf.iter()) {
        h = (h ^ w).wrapping_mul(FNV_PRIME);
    }
    // SplitMix64 finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
