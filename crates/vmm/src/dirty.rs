//! The machine's view of the dirty log: what migrations and snapshots take from it.
//!
//! The backend's log ([`Vm::take_dirty_log`]) records every guest and VMM write since the
//! previous take (the emu backend marks vm-memory's bitmap on each guest write; KVM's log
//! is merged with vm-memory's). Two things are kept on top of it:
//!
//! * **carry** — pages a failed migration handed back
//!   ([`MigrationSource::restore_dirty_log`](esvm_migration::MigrationSource::restore_dirty_log)),
//!   merged into the next take, so a failed pass loses nothing;
//! * **ever** — every page written since the VM was created: the OR of every take (the log
//!   starts empty at creation and logs the loader's writes too) plus pages that arrived by
//!   migration or from a snapshot, whose writes bypass or precede the log. A migration's
//!   first pass and a snapshot's memory file carry only these pages: the others are still
//!   zero, exactly as on a fresh destination. This is exact and costs one bit per page,
//!   unlike scanning all memory for zero pages (which reads the whole RAM, 1 GiB at a few
//!   GiB/s, on every migration).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use esvm_hv::{HvError, Vm};
use esvm_migration::PageSet;

/// See the module documentation.
pub struct DirtyTracker {
    vm: Arc<dyn Vm>,
    pages: u64,
    inner: Mutex<Sets>,
}

struct Sets {
    ever: PageSet,
    carry: PageSet,
}

impl DirtyTracker {
    /// The tracker of `vm`'s dirty log, with empty carry and written sets.
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        let pages = vm.memory().pages();
        DirtyTracker {
            vm,
            pages,
            inner: Mutex::new(Sets {
                ever: PageSet::new(pages),
                carry: PageSet::new(pages),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sets> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fold the backend's log into `ever` and `carry` (nothing is lost: the bits stay
    /// pending in `carry` for the next [`DirtyTracker::take`]).
    fn fold(&self, s: &mut Sets) -> Result<(), HvError> {
        let log = self.vm.take_dirty_log()?;
        // vCPUs on other threads store first and then check the page's dirty bit with a
        // plain load, which may pass their own buffered store: one that saw the bit still
        // set before this take cleared it may not have made its store visible yet. The
        // barrier drains every thread's store buffer, so the pages copied after this take
        // hold every write made before it (the software vCPU's documented requirement;
        // harmless on KVM, whose log the kernel keeps).
        esvm_cpu::process_barrier();
        let set = PageSet::from_words(self.pages, log.words());
        s.ever.union(&set);
        s.carry.union(&set);
        Ok(())
    }

    /// Return and clear the pages dirtied since the previous take (plus any handed back).
    pub fn take(&self) -> Result<PageSet, HvError> {
        let mut s = self.lock();
        self.fold(&mut s)?;
        Ok(std::mem::replace(&mut s.carry, PageSet::new(self.pages)))
    }

    /// Hand pages back: they are part of the next [`DirtyTracker::take`].
    pub fn give_back(&self, pages: &PageSet) {
        let mut s = self.lock();
        if pages.pages() == self.pages {
            s.carry.union(pages);
        } else {
            // A set of the wrong size cannot be merged page by page; be safe and mark all.
            s.carry = PageSet::full(self.pages);
        }
    }

    /// Every page written since the VM was created (or arrived by migration / snapshot).
    pub fn ever_written(&self) -> Result<PageSet, HvError> {
        let mut s = self.lock();
        self.fold(&mut s)?;
        Ok(s.ever.clone())
    }

    /// Record pages written behind the log's back (migration page data written in place).
    pub fn mark_written(&self, pages: &PageSet) {
        let mut s = self.lock();
        if pages.pages() == self.pages {
            s.ever.union(pages);
        } else {
            s.ever = PageSet::full(self.pages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esvm_hv::{BackendKind, VmConfig};

    fn vm() -> Arc<dyn Vm> {
        esvm_hv::open(BackendKind::Emu)
            .unwrap()
            .create_vm(&VmConfig::plain(64 * 4096, 1))
            .unwrap()
    }

    #[test]
    fn take_carry_and_ever() {
        let vm = vm();
        let t = DirtyTracker::new(vm.clone());
        vm.memory().write(3 * 4096, &[1]).unwrap();
        assert_eq!(t.ever_written().unwrap().iter().collect::<Vec<_>>(), [3]);
        // Folding for `ever` did not consume the bit.
        assert_eq!(t.take().unwrap().iter().collect::<Vec<_>>(), [3]);
        assert!(t.take().unwrap().is_empty());
        let mut back = PageSet::new(64);
        back.set(9);
        t.give_back(&back);
        vm.memory().write(5 * 4096, &[1]).unwrap();
        assert_eq!(t.take().unwrap().iter().collect::<Vec<_>>(), [5, 9]);
        assert_eq!(t.ever_written().unwrap().iter().collect::<Vec<_>>(), [3, 5]);
        t.mark_written(&back);
        assert_eq!(
            t.ever_written().unwrap().iter().collect::<Vec<_>>(),
            [3, 5, 9]
        );
    }
}
