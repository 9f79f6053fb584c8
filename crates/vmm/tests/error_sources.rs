//! Errors keep their source across the layers: what a lower crate reported stays reachable
//! through `std::error::Error::source()` of the error the VMM library returns.

use std::error::Error;

use esvm::machine::{Machine, MachineConfig, MachineError};
use esvm::sev_launch::{open_platform, SevLaunchError};
use esvm_devices::{DevicesError, StateError};
use esvm_hv::{BackendKind, VmType};
use esvm_psp::StorageError;

/// The chain of `e`'s sources, outermost first (`e` itself excluded).
fn sources<'a>(e: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut out = Vec::new();
    let mut s = e.source();
    while let Some(x) = s {
        out.push(x);
        s = x.source();
    }
    out
}

#[test]
fn a_device_state_that_does_not_decode_is_seen_through_the_machine_error() {
    let config = MachineConfig {
        backend: BackendKind::Emu,
        vm_type: VmType::Plain,
        mem_size: 4 << 20,
        vcpus: 1,
        max_instructions: None,
    };
    let mut m = Machine::new(&config, Box::new(std::io::sink())).unwrap();
    let mut state = m.save_state();
    let com1 = state
        .devices
        .devices
        .get_mut("com1")
        .expect("COM1 is saved");
    com1.state = serde_json::json!("not the state of a UART");
    let err = m.restore_state(&state).unwrap_err();
    assert!(matches!(err, MachineError::Devices(_)), "{err}");
    // MachineError -> DevicesError -> StateError -> serde_json::Error.
    let chain = sources(&err);
    assert!(
        matches!(
            chain.first().and_then(|e| e.downcast_ref::<DevicesError>()),
            Some(DevicesError::DeviceState { id, .. }) if id == "com1"
        ),
        "{err}"
    );
    assert!(
        matches!(
            chain.get(1).and_then(|e| e.downcast_ref::<StateError>()),
            Some(StateError::Decode(_))
        ),
        "{err}"
    );
    assert!(
        chain.get(2).is_some_and(|e| e.is::<serde_json::Error>()),
        "{err}"
    );
}

#[test]
fn a_missing_platform_is_seen_through_the_launch_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_platform(dir.path()).expect_err("no platform there");
    assert!(matches!(err, SevLaunchError::Platform { .. }), "{err}");
    // The text is what it was: the storage error's message inside the launch error's.
    assert!(
        err.to_string().contains("holds no platform identity"),
        "{err}"
    );
    let storage = err.source().and_then(|e| e.downcast_ref::<StorageError>());
    assert!(
        matches!(storage, Some(StorageError::NotInitialized(p)) if p == dir.path()),
        "{err}"
    );
}
