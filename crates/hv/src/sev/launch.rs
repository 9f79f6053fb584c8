//! The SEV-ES launch as a type-state sequence, after the virtee `sev` crate's
//! `Launcher<New | Started | Measured>`: each state has exactly the firmware commands the
//! guest's firmware state admits, and each transition consumes the launcher, so a command
//! out of order does not compile.
//!
//! ```text
//!  Launcher<New> ──start (LAUNCH_START)──▶ Launcher<Started>
//!                                            │ update_data (LAUNCH_UPDATE_DATA) ...
//!                                            │ update_vmsa (LAUNCH_UPDATE_VMSA) ...
//!                                            ▼
//!                          measure (LAUNCH_MEASURE)
//!                                            ▼
//!                                          Launcher<Measured>
//!                                            │ inject_secret (LAUNCH_SECRET), optional
//!                                            ▼
//!                          finish (LAUNCH_FINISH) ──▶ Launched
//! ```
//!
//! A launcher owns a reference to its VM (not a borrow), and every state is `Send`: a
//! `Launcher<Measured>` can be kept between API calls — e.g. by a VMM that stops after
//! LAUNCH_MEASURE, lets the guest owner check the measurement and send a secret, and
//! finishes later. A transition that fails consumes the launcher: the launch is abandoned,
//! and the guest context goes away with the VM. The commands that stay in a state
//! (`update_data`, `update_vmsa`, `inject_secret`) take `&mut self` and may be retried.
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use esvm_hv::sev::{Launched, Launcher};
//! # fn launch(
//! #     vm: Arc<dyn esvm_hv::Vm>,
//! #     vcpus: &mut [Box<dyn esvm_hv::Vcpu>],
//! #     psp: Arc<Mutex<esvm_psp::Psp>>,
//! #     req: &esvm_psp::LaunchStart,
//! # ) -> esvm_hv::Result<Launched> {
//! let mut started = Launcher::new(vm)?.start(psp, req)?;
//! started.update_data(0, 0x20_0000)?;
//! for vcpu in vcpus.iter_mut() {
//!     started.update_vmsa(vcpu.as_mut())?;
//! }
//! let measured = started.measure()?;
//! println!("measurement {:02x?}", measured.measurement().measure);
//! measured.finish()
//! # }
//! ```
//!
//! Out of order, it does not compile — LAUNCH_MEASURE before LAUNCH_START:
//!
//! ```compile_fail,E0599
//! # use esvm_hv::sev::{Launcher, New};
//! fn measure_too_early(launcher: Launcher<New>) {
//!     let _ = launcher.measure();
//! }
//! ```
//!
//! LAUNCH_SECRET before LAUNCH_MEASURE:
//!
//! ```compile_fail,E0599
//! # use esvm_hv::sev::{Launcher, Started};
//! # fn secret_too_early(mut launcher: Launcher<Started>, h: &esvm_psp::PacketHeader) {
//! launcher.inject_secret(0x4000, h, &[0u8; 16]);
//! # }
//! ```
//!
//! LAUNCH_UPDATE_DATA after LAUNCH_MEASURE, and LAUNCH_FINISH twice:
//!
//! ```compile_fail,E0599
//! # use esvm_hv::sev::{Launcher, Measured};
//! fn data_too_late(mut launcher: Launcher<Measured>) {
//!     let _ = launcher.update_data(0, 4096);
//! }
//! ```
//!
//! ```compile_fail,E0382
//! # use esvm_hv::sev::{Launcher, Measured};
//! fn finish_twice(launcher: Launcher<Measured>) {
//!     let _ = launcher.finish();
//!     let _ = launcher.finish();
//! }
//! ```

use std::sync::{Arc, Mutex};

use esvm_psp::{LaunchStart, Measurement, PacketHeader, Psp};

use super::{LaunchToken, SevVm};
use crate::{HvError, Result, Vcpu, Vm};

/// Launcher state: nothing sent to the firmware yet.
#[derive(Debug)]
pub struct New;

/// Launcher state: LAUNCH_START done (firmware state LUPDATE): guest memory and vCPU
/// states may be added to the launch.
#[derive(Debug)]
pub struct Started {
    handle: u32,
}

/// Launcher state: LAUNCH_MEASURE done (firmware state LSECRET): the measurement is
/// available; a secret may be injected before LAUNCH_FINISH.
#[derive(Debug)]
pub struct Measured {
    handle: u32,
    measurement: Measurement,
}

/// A finished launch: the guest may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launched {
    /// The guest's firmware handle.
    pub handle: u32,
    /// The launch measurement (LAUNCH_MEASURE).
    pub measurement: Measurement,
}

/// The launch of one SEV-ES VM, in state `S` ([`New`], [`Started`] or [`Measured`]); see
/// the module documentation.
pub struct Launcher<S> {
    vm: Arc<dyn Vm>,
    state: S,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Launcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("backend", &self.vm.backend())
            .field("state", &self.state)
            .finish()
    }
}

impl<S> Launcher<S> {
    /// The VM being launched.
    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    fn sev(&self) -> Result<&dyn SevVm> {
        sev_of(self.vm.as_ref())
    }
}

fn sev_of(vm: &dyn Vm) -> Result<&dyn SevVm> {
    vm.sev().ok_or(HvError::NoSevSupport {
        backend: vm.backend(),
    })
}

impl Launcher<New> {
    /// A launch of `vm`, whose backend must have the SEV-ES extension (the VM must have
    /// been created as SEV-ES: LAUNCH_START refuses a plain VM).
    pub fn new(vm: Arc<dyn Vm>) -> Result<Launcher<New>> {
        sev_of(vm.as_ref())?;
        Ok(Launcher { vm, state: New })
    }

    /// LAUNCH_START on `psp` with the owner's request (policy and, if any, session).
    pub fn start(self, psp: Arc<Mutex<Psp>>, req: &LaunchStart) -> Result<Launcher<Started>> {
        let handle = self.sev()?.launch_start(&LaunchToken::new(), psp, req)?;
        Ok(Launcher {
            vm: self.vm,
            state: Started { handle },
        })
    }
}

impl Launcher<Started> {
    /// The guest's firmware handle.
    pub fn handle(&self) -> u32 {
        self.state.handle
    }

    /// LAUNCH_UPDATE_DATA: encrypt `[gpa, gpa+len)` of guest memory in place and add it to
    /// the launch digest.
    pub fn update_data(&mut self, gpa: u64, len: u64) -> Result<()> {
        self.sev()?
            .launch_update_data(&LaunchToken::new(), gpa, len)
    }

    /// LAUNCH_UPDATE_VMSA: `vcpu` (a vCPU of this VM) becomes protected; its current state
    /// is its initial VMSA, added to the launch digest.
    pub fn update_vmsa(&mut self, vcpu: &mut dyn Vcpu) -> Result<()> {
        let backend = self.vm.backend();
        vcpu.sev_mut()
            .ok_or(HvError::NoSevSupport { backend })?
            .launch_update_vmsa(&LaunchToken::new())
    }

    /// LAUNCH_MEASURE: no more data or VMSAs; the measurement is taken.
    pub fn measure(self) -> Result<Launcher<Measured>> {
        let measurement = self.sev()?.launch_measure(&LaunchToken::new())?;
        Ok(Launcher {
            vm: self.vm,
            state: Measured {
                handle: self.state.handle,
                measurement,
            },
        })
    }
}

impl Launcher<Measured> {
    /// The guest's firmware handle.
    pub fn handle(&self) -> u32 {
        self.state.handle
    }

    /// The launch measurement, for the guest owner to verify.
    pub fn measurement(&self) -> &Measurement {
        &self.state.measurement
    }

    /// LAUNCH_SECRET: inject the owner's secret packet (bound to this measurement) at `gpa`.
    pub fn inject_secret(
        &mut self,
        gpa: u64,
        header: &PacketHeader,
        ciphertext: &[u8],
    ) -> Result<()> {
        self.sev()?
            .launch_secret(&LaunchToken::new(), gpa, header, ciphertext)
    }

    /// LAUNCH_FINISH: the guest may run.
    pub fn finish(self) -> Result<Launched> {
        self.sev()?.launch_finish(&LaunchToken::new())?;
        Ok(Launched {
            handle: self.state.handle,
            measurement: self.state.measurement,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launch can stop after LAUNCH_MEASURE and be finished from elsewhere (another
    /// thread, a later API call): every state is `Send` and owns what it needs.
    #[test]
    fn every_state_can_be_stored_and_sent() {
        fn storable<T: Send + Sync + 'static>() {}
        storable::<Launcher<New>>();
        storable::<Launcher<Started>>();
        storable::<Launcher<Measured>>();
        storable::<Launched>();
    }

    #[test]
    fn a_backend_without_sev_is_refused_at_once() {
        struct NoSev(crate::GuestMemory);
        impl Vm for NoSev {
            fn backend(&self) -> crate::BackendKind {
                crate::BackendKind::Kvm
            }
            fn vm_type(&self) -> crate::VmType {
                crate::VmType::Plain
            }
            fn memory(&self) -> &crate::GuestMemory {
                &self.0
            }
            fn create_vcpu(&self, _: u32) -> Result<Box<dyn Vcpu>> {
                Err(HvError::InvalidState("none".into()))
            }
            fn take_dirty_log(&self) -> Result<crate::DirtyBitmap> {
                Ok(self.0.take_dirty())
            }
        }
        let vm = Arc::new(NoSev(crate::GuestMemory::new(1 << 20).unwrap()));
        let e = Launcher::new(vm).unwrap_err();
        assert!(matches!(e, HvError::NoSevSupport { .. }), "{e}");
        assert!(e.to_string().contains("--backend emu"), "{e}");
    }
}
