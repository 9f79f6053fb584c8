//! Address translation in SEV-ES mode: the TLB fill with the view's backing, and
//! guest-physical accesses to the private view and to MMIO (#VC). The page walk itself is the
//! common one ([`super::walk`]) under the [`SevCbit`] policy.
//!
//! A translated guest-physical address carries the C-bit as a *tag* (`gpa | cmask`) when the
//! access goes to the private view; plain addresses at or above the RAM size then never take
//! the RAM fast paths of `phys_read`/`phys_write` and land in [`Cpu::sev_phys_read`] /
//! [`Cpu::sev_phys_write`].

use super::walk::SevCbit;
use super::Acc;
use crate::mem::{View, PAGE_SHIFT};
use crate::sev::exit_code;
use crate::{Cpu, R};

fn view_of(private: bool) -> View {
    if private {
        View::Private
    } else {
        View::Shared
    }
}

impl Cpu {
    /// Translate `lin` in SEV-ES mode (see `translate`): fills the TLB with the data view's
    /// backing and returns the guest-physical address, tagged with the C-bit for a private
    /// access. Fetches are private whatever the leaf says. Kept out of line, so that the
    /// SEV-ES instance of the walk does not share `translate`'s body (and registers) with the
    /// plain one.
    #[inline(never)]
    pub(crate) fn translate_sev(&mut self, lin: u64, acc: Acc, user: bool) -> R<u64> {
        let cmask = self.sev_cmask();
        let w = self.walk(SevCbit::new(cmask), lin, acc, user)?;
        let gpa = w.gpa;
        let private = w.private || acc == Acc::Exec;
        if gpa < self.ram_size {
            let vpn = lin >> PAGE_SHIFT;
            let gpn = gpa >> PAGE_SHIFT;
            let base = self.sev_view(gpn, view_of(private))?;
            let k = (vpn as usize & super::TLB_MASK) | if user { super::TLB_SIZE } else { 0 };
            if acc == Acc::Exec {
                // Fetches are private whatever the leaf's C-bit; the data TLB is not filled
                // (a C-bit-clear mapping's data accesses need the shared view).
                if w.x {
                    self.tlb.fill_exec(k, vpn, gpn, w.global);
                }
            } else {
                let host = base as usize + (gpn << PAGE_SHIFT) as usize;
                self.tlb.fill_data(k, vpn, host, gpn, w.w, w.global);
            }
        }
        Ok(gpa | (lin & 0xfff) | if private { cmask } else { 0 })
    }

    /// `phys_read` of an address that is not a plain RAM address in SEV-ES mode: a private
    /// (tagged) RAM access, a fatal private access outside RAM, or MMIO (#VC NPF).
    pub(crate) fn sev_phys_read(&mut self, gpa: u64, size: usize) -> R<u128> {
        let g = self.sev_phys_check(gpa, size)?;
        let base = self.sev_view(g >> PAGE_SHIFT, View::Private)?;
        let mut b = [0u8; 16];
        // SAFETY: `g..g+size` is inside RAM and one page (checked by `sev_phys_check`).
        unsafe { std::ptr::copy_nonoverlapping(base.add(g as usize), b.as_mut_ptr(), size) };
        Ok(u128::from_le_bytes(b))
    }

    /// `phys_write` counterpart of [`Cpu::sev_phys_read`].
    pub(crate) fn sev_phys_write(&mut self, gpa: u64, size: usize, v: u128) -> R {
        let g = self.sev_phys_check(gpa, size)?;
        let base = self.sev_view(g >> PAGE_SHIFT, View::Private)?;
        let b = v.to_le_bytes();
        // SAFETY: as in `sev_phys_read`; so `g`'s page is a RAM page.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(g as usize), size);
            self.note_write(g >> PAGE_SHIFT);
        }
        Ok(())
    }

    /// For a private access: the plain RAM address. Otherwise the access is fatal (private
    /// outside RAM) or MMIO (#VC with NPF).
    fn sev_phys_check(&mut self, gpa: u64, size: usize) -> R<u64> {
        let cmask = self.sev_cmask();
        if gpa & cmask == 0 {
            return Cpu::vc(exit_code::NPF);
        }
        let g = gpa & !cmask;
        if g + size as u64 > self.ram_size {
            return Err(self.sev_fatal(format!(
                "SEV-ES guest accessed guest-physical address {g:#x} (outside RAM, {:#x} bytes) \
                 through a mapping with the C-bit set (in the instruction before {:#x})",
                self.ram_size, self.next_rip
            )));
        }
        Ok(g)
    }

    /// `host_rmw_ptr` in SEV-ES mode, from the translated (possibly tagged) address.
    pub(crate) fn sev_rmw_ptr(&mut self, gpa: u64, size: usize) -> R<Option<(*mut u8, u64)>> {
        let cmask = self.sev_cmask();
        let private = gpa & cmask != 0;
        let g = gpa & !cmask;
        if g + size as u64 > self.ram_size {
            // The plain read/write path reports it (shutdown or #VC).
            return Ok(None);
        }
        let base = self.sev_view(g >> PAGE_SHIFT, view_of(private))?;
        // SAFETY: inside RAM-sized backing (checked).
        Ok(Some((unsafe { base.add(g as usize) }, g >> PAGE_SHIFT)))
    }
}

#[cfg(test)]
impl Cpu {
    /// Test hook: a page walk (plain, or SEV-ES in SEV-ES mode) without a TLB fill, as
    /// (guest-physical page, writable, executable, private view).
    pub(crate) fn test_walk(
        &mut self,
        lin: u64,
        write: bool,
        exec: bool,
        user: bool,
    ) -> Result<(u64, bool, bool, bool), crate::Stop> {
        let acc = if write {
            Acc::Write
        } else if exec {
            Acc::Exec
        } else {
            Acc::Read
        };
        let w = if self.sev.is_some() {
            self.walk(SevCbit::new(self.sev_cmask()), lin, acc, user)?
        } else {
            self.walk(super::walk::Plain, lin, acc, user)?
        };
        Ok((w.gpa, w.w, w.x, w.private))
    }
}
