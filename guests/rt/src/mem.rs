//! The C memory primitives the compiler emits calls to, and a bump page allocator.
//!
//! The `x86_64-unknown-linux-gnu` build of `compiler_builtins` expects libc to provide
//! `memcpy`/`memmove`/`memset`/`memcmp`/`bcmp`. They are written with string instructions
//! and volatile reads so LLVM cannot recognise them as idioms and turn them back into
//! calls to themselves.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Copies `n` bytes from `src` to `dst` (non-overlapping).
///
/// # Safety
/// Standard `memcpy` contract: both ranges valid, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; DF is clear per the ABI.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    }
    dst
}

/// Copies `n` bytes from `src` to `dst`; the ranges may overlap.
///
/// # Safety
/// Standard `memmove` contract: both ranges valid.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0 {
        return dst;
    }
    let (d, s) = (dst as usize, src as usize);
    if d <= s || d >= s.wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
                 options(nostack, preserves_flags))
        }
    } else {
        // SAFETY: backward copy (DF=1) from the last byte; DF is cleared again before
        // leaving the asm block, as the ABI requires.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _, options(nostack))
        }
    }
    dst
}

/// Fills `n` bytes at `dst` with the low byte of `c`.
///
/// # Safety
/// Standard `memset` contract: the range is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; DF is clear per the ABI.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags))
    }
    dst
}

/// Compares `n` bytes; returns <0, 0 or >0 like C's `memcmp`.
///
/// # Safety
/// Standard `memcmp` contract: both ranges valid for reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes; volatile reads keep
        // LLVM from recognising the loop as a memcmp/bcmp idiom.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Like [`memcmp`] but only equality matters.
///
/// # Safety
/// Standard `bcmp` contract: both ranges valid for reads.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// `core` is precompiled with `panic=unwind` for this target and its unwind tables refer
/// to the personality routine. Guests are built with `panic=abort`, so no unwinding ever
/// starts and this is never called; if it were, the guest stops with exit status 102.
#[no_mangle]
pub extern "C" fn rust_eh_personality() -> ! {
    crate::exit(102)
}

/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;

static NEXT_FREE: AtomicU64 = AtomicU64::new(0);
static MEM_END: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init_allocator(free_start: u64, mem_end: u64) {
    NEXT_FREE.store(free_start.next_multiple_of(PAGE_SIZE), Ordering::Relaxed);
    MEM_END.store(mem_end, Ordering::Relaxed);
}

/// Allocates `count` zeroed, 4 KiB-aligned physical (= virtual) pages from the free
/// memory after the image. Returns `None` when memory is exhausted. Never freed.
pub fn alloc_pages(count: u64) -> Option<u64> {
    alloc_aligned(count.checked_mul(PAGE_SIZE)?, PAGE_SIZE)
}

/// Allocates `bytes` (rounded up to pages) of zeroed memory aligned to `align` (a power
/// of two, at least 4 KiB).
pub fn alloc_aligned(bytes: u64, align: u64) -> Option<u64> {
    let align = align.max(PAGE_SIZE);
    let size = bytes.checked_next_multiple_of(PAGE_SIZE)?;
    let start = NEXT_FREE
        .load(Ordering::Relaxed)
        .checked_next_multiple_of(align)?;
    let end = start.checked_add(size)?;
    if end > MEM_END.load(Ordering::Relaxed) {
        return None;
    }
    NEXT_FREE.store(end, Ordering::Relaxed);
    // SAFETY: [start, end) is free RAM below mem_size, identity-mapped, owned by nobody else.
    unsafe { memset(start as *mut u8, 0, size as usize) };
    Some(start)
}

/// Bytes still available to [`alloc_pages`].
pub fn free_bytes() -> u64 {
    MEM_END
        .load(Ordering::Relaxed)
        .saturating_sub(NEXT_FREE.load(Ordering::Relaxed))
}
