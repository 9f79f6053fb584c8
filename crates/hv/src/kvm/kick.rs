//! Kicking a vCPU out of KVM_RUN from another thread.
//!
//! Two mechanisms together, as rust-vmm VMMs do: the kicker sets `kvm_run.immediate_exit`
//! (so a KVM_RUN that has not entered the guest yet returns EINTR at once) and then sends a
//! real-time signal to the thread inside KVM_RUN (so a running guest is forced out with EINTR).
//! The signal handler does nothing; it only has to exist so the signal does not kill the
//! process. It is registered once per process.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use super::KvmError;
use crate::{Kicker, Result};

/// The kick signal is `SIGRTMIN() + KICK_SIGNAL_OFFSET` (Firecracker and Cloud Hypervisor use
/// SIGRTMIN-based signals the same way). Embedders must not use it for anything else.
pub const KICK_SIGNAL_OFFSET: c_int = 0;

pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick_signal(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Nothing to do: delivering the signal is what makes KVM_RUN return EINTR.
}

static HANDLER: OnceLock<vmm_sys_util::errno::Result<()>> = OnceLock::new();

/// Register the kick signal handler (once per process).
pub fn ensure_handler() -> Result<()> {
    (*HANDLER.get_or_init(|| register_signal_handler(kick_signal(), on_kick_signal)))
        .map_err(|source| KvmError::KickHandler { source }.into())
}

thread_local! {
    static UNBLOCKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Make sure the kick signal is not blocked on the calling (vCPU) thread.
pub fn ensure_unblocked_here() {
    UNBLOCKED.with(|u| {
        if !u.get() {
            // An error only means it was not blocked or the number is invalid, which
            // ensure_handler() has already ruled out.
            let _ = unblock_signal(kick_signal());
            u.set(true);
        }
    });
}

struct Target {
    /// Address of `kvm_run.immediate_exit`; None once the vCPU is gone.
    immediate_exit: Option<usize>,
    /// The thread inside `KvmVcpu::run`, if any.
    thread: Option<libc::pthread_t>,
}

/// State shared by a vCPU and its kickers.
pub struct KickState {
    target: Mutex<Target>,
    /// A kick arrived that the vCPU has not yet reported as `Interrupted`.
    pending: AtomicBool,
}

impl KickState {
    /// The kick state of the vCPU whose `kvm_run.immediate_exit` byte is at `immediate_exit`.
    ///
    /// # Safety
    /// `immediate_exit` must point at the `immediate_exit` byte of the vCPU's `kvm_run`
    /// mapping, which must stay mapped until [`KickState::detach`] is called; the byte is
    /// only ever accessed atomically (by KVM with READ_ONCE, by kickers through this state).
    pub unsafe fn new(immediate_exit: *mut u8) -> Self {
        KickState {
            target: Mutex::new(Target {
                immediate_exit: Some(immediate_exit as usize),
                thread: None,
            }),
            pending: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store_immediate_exit(t: &Target, v: u8) {
        if let Some(addr) = t.immediate_exit {
            // SAFETY: `addr` points at kvm_run.immediate_exit, a byte in the vCPU's mmap'd
            // kvm_run page that stays mapped while `immediate_exit` is Some (cleared by
            // detach() under this lock before the mapping goes away). KVM reads it with
            // READ_ONCE; all our accesses are atomic byte stores.
            unsafe { AtomicU8::from_ptr(addr as *mut u8) }.store(v, Ordering::SeqCst);
        }
    }

    /// The vCPU thread is about to enter KVM_RUN. Returns with `immediate_exit` set if a kick
    /// is pending.
    pub fn enter(&self) {
        let mut t = self.lock();
        // SAFETY: pthread_self has no preconditions.
        t.thread = Some(unsafe { libc::pthread_self() });
        if self.pending.load(Ordering::SeqCst) {
            Self::store_immediate_exit(&t, 1);
        }
    }

    /// The vCPU thread left KVM_RUN.
    pub fn leave(&self) {
        self.lock().thread = None;
    }

    /// KVM_RUN returned EINTR: the pending kick (if any) has been honoured.
    pub fn acknowledge(&self) {
        let t = self.lock();
        self.pending.store(false, Ordering::SeqCst);
        Self::store_immediate_exit(&t, 0);
    }

    /// Set `immediate_exit` for a completion-only KVM_RUN, or restore it afterwards.
    pub fn set_immediate_exit(&self, on: bool) {
        let t = self.lock();
        let v = on || self.pending.load(Ordering::SeqCst);
        Self::store_immediate_exit(&t, v as u8);
    }

    /// The vCPU is being destroyed: forget the kvm_run address.
    pub fn detach(&self) {
        let mut t = self.lock();
        t.immediate_exit = None;
        t.thread = None;
    }
}

/// The [`Kicker`] of a KVM vCPU.
pub struct KvmKicker(pub std::sync::Arc<KickState>);

impl Kicker for KvmKicker {
    fn kick(&self) {
        let s = &self.0;
        s.pending.store(true, Ordering::SeqCst);
        let t = s.lock();
        KickState::store_immediate_exit(&t, 1);
        if let Some(thread) = t.thread {
            // SAFETY: `thread` is registered only between enter() and leave(), which the vCPU
            // thread calls around KVM_RUN while alive; we hold the lock, so it cannot leave
            // (and exit) meanwhile. The signal has a no-op handler installed.
            unsafe {
                libc::pthread_kill(thread, kick_signal());
            }
        }
    }
}
