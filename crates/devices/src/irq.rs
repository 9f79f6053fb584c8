//! Interrupt request flags shared between a device and whoever delivers its interrupts.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;

/// A latched interrupt request: the device raises it, the interrupt router takes it (and turns
/// it into an edge on a PIC input). Clones share the flag.
///
/// It implements [`vm_superio::Trigger`], so it stands in for the eventfd that a KVM-based VMM
/// would hand to vm-superio devices: deterministic, no file descriptor, no syscalls.
#[derive(Debug, Clone, Default)]
pub struct IrqLine(Arc<AtomicBool>);

impl IrqLine {
    /// A lowered line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Request an interrupt.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a request is waiting to be taken.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Consume the request: returns whether one was waiting, and lowers the line.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }

    /// Force the flag (used when restoring saved state).
    pub fn set(&self, raised: bool) {
        self.0.store(raised, Ordering::SeqCst);
    }
}

impl Trigger for IrqLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.raise();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_take_is_latched_and_shared() {
        let a = IrqLine::new();
        let b = a.clone();
        assert!(!b.is_raised());
        a.trigger().unwrap();
        assert!(b.is_raised());
        assert!(b.take());
        assert!(!a.is_raised());
        assert!(!a.take());
        b.set(true);
        assert!(a.take());
    }
}
