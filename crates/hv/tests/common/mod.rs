//! Shared by the SEV-ES scenario tests: platforms under one emulated AMD root, and the
//! load + launch sequence of a real SEV-ES guest from `guests/`.

#![allow(dead_code)]

use std::sync::{Arc, Mutex, OnceLock};

use esvm_abi::boot::FLAG_PROTECTED_STATE;
use esvm_hv::emu::EmuVm;
use esvm_hv::sev::{Launcher, Started};
use esvm_hv::{Vcpu, Vm, VmConfig, VmType};
use esvm_loader::LoadOptions;
use esvm_psp::{EmulatedAmdCa, LaunchStart, Policy, Psp};

pub fn ca() -> &'static EmulatedAmdCa {
    static CA: OnceLock<EmulatedAmdCa> = OnceLock::new();
    CA.get_or_init(|| EmulatedAmdCa::generate(2048).expect("emulated CA"))
}

/// A platform (a host's secure processor) under the shared emulated AMD root.
pub fn platform() -> Arc<Mutex<Psp>> {
    let mut psp = Psp::ephemeral(ca(), Default::default()).unwrap();
    psp.init().unwrap();
    Arc::new(Mutex::new(psp))
}

pub fn sev_config(mem_size: u64, vcpus: u32) -> VmConfig {
    let mut cfg = VmConfig::plain(mem_size, vcpus);
    cfg.vm_type = VmType::SevEs;
    cfg
}

/// LAUNCH_START (policy ES, no owner) of `vm` on `psp`.
pub fn launch_start(
    vm: &Arc<EmuVm>,
    psp: Arc<Mutex<Psp>>,
) -> Result<Launcher<Started>, esvm_hv::HvError> {
    Launcher::new(vm.clone())?.start(
        psp,
        &LaunchStart {
            policy: Policy(Policy::ES),
            owner: None,
            share_key_with: None,
        },
    )
}

/// Load `name` into a one-vCPU SEV-ES VM of `mem_size` bytes and run the whole launch
/// sequence on `psp` (policy ES); `before_launch` may change the vCPU's initial state (it is
/// synced into the VMSA by LAUNCH_UPDATE_VMSA).
pub fn launch_sev(
    name: &str,
    args: &str,
    mem_size: u64,
    psp: Arc<Mutex<Psp>>,
    before_launch: impl FnOnce(&mut dyn Vcpu),
) -> (Arc<EmuVm>, Box<dyn Vcpu>) {
    launch_sev_with(sev_config(mem_size, 1), name, args, psp, before_launch)
}

/// [`launch_sev`] into a VM of `config` (an SEV-ES one-vCPU config, e.g. with a CPUID
/// table of its own).
pub fn launch_sev_with(
    config: VmConfig,
    name: &str,
    args: &str,
    psp: Arc<Mutex<Psp>>,
    before_launch: impl FnOnce(&mut dyn Vcpu),
) -> (Arc<EmuVm>, Box<dyn Vcpu>) {
    let vm = Arc::new(EmuVm::new(&config).unwrap());
    let guest = esvm_guests::builtin(name).unwrap_or_else(|| panic!("guest {name}"));
    let boot = esvm_loader::load_elf_with_c_bit(
        vm.memory().mmap(),
        guest.elf,
        &LoadOptions {
            args,
            vcpus: 1,
            flags: FLAG_PROTECTED_STATE,
        },
        Some(esvm_hv::sev::C_BIT),
    )
    .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_sregs(&boot.sregs).unwrap();
    vcpu.set_regs(&boot.regs).unwrap();
    before_launch(vcpu.as_mut());
    let mut launcher = launch_start(&vm, psp).unwrap();
    let start = boot.boot_info.image_start & !0xfff;
    let end = (boot.boot_info.image_end + 0xfff) & !0xfff;
    launcher.update_data(0, 0x10_0000).unwrap();
    launcher.update_data(start, end - start).unwrap();
    launcher.update_vmsa(vcpu.as_mut()).unwrap();
    launcher.measure().unwrap().finish().unwrap();
    (vm, vcpu)
}
