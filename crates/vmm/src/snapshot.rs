//! Snapshots of plain guests: `esvm ctl snapshot DIR` writes one, `esvm restore DIR` runs it.
//!
//! A snapshot directory holds two files:
//!
//! * `memory.img` — guest RAM as a **sparse** file of exactly the guest's memory size: only
//!   pages ever written ([`crate::dirty`]) are stored, at their guest-physical offsets; the
//!   rest are holes (zero, as in a fresh VM).
//! * `vm.state` — one header line `ESVM-SNAPSHOT <version> crc32c=<8 hex> len=<bytes>\n`
//!   followed by `len` bytes of JSON ([`Manifest`]): the VM's configuration, the
//!   [`MachineState`] (devices, virtual clock, instruction counts), every vCPU's
//!   [`VcpuSnapshot`], and the index of the stored memory: runs of at most 1024 pages, each
//!   with the CRC32C of its bytes.
//!
//! The guest is paused (an internal hold) while the snapshot is taken and resumes
//! afterwards. `memory.img` is written first and `vm.state` last, each under a temporary
//! name renamed into place after an fsync, so a crash leaves no half-written state file.
//! Restoring checks everything before the guest runs: the header, the state's checksum and
//! length (truncation), the JSON, the index (ascending, in range), the memory file's size and
//! every run's checksum. A corrupt or truncated snapshot is refused with a message naming
//! the file and what is wrong.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use esvm_arch::VcpuSnapshot;
use esvm_hv::{BackendKind, VmType};
use thiserror::Error;

use crate::machine::{Machine, MachineConfig, MachineHandle, MachineState};
use crate::runctl::{ControlError, PARK_TIMEOUT};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.img";
/// Snapshot format version.
pub const SNAPSHOT_VERSION: u32 = 1;
const MAGIC: &str = "ESVM-SNAPSHOT";
/// Largest state file accepted (the JSON of devices and vCPUs is far smaller).
const MAX_STATE_LEN: u64 = 256 << 20;
/// Most pages per stored run (4 MiB).
pub const MAX_RUN_PAGES: u64 = 1024;
const PAGE: u64 = 4096;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not an esvm snapshot directory: it has no {STATE_FILE}")]
    NotASnapshot(PathBuf),
    #[error("{path} is corrupt: {why}; the snapshot cannot be restored")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path} is truncated: {why}; the snapshot cannot be restored")]
    Truncated { path: PathBuf, why: String },
    #[error(
        "snapshot format version {0} is not supported (this esvm reads version {SNAPSHOT_VERSION})"
    )]
    Version(u32),
    #[error("{0}")]
    Unsupported(String),
    #[error("saving the VM state: {0}")]
    Save(String),
    #[error("restoring the VM: {0}")]
    Restore(#[from] crate::machine::MachineError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A stored run of pages in `memory.img`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub first: u64,
    pub count: u64,
    pub crc32c: u32,
}

/// The JSON part of `vm.state`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub vm_type: VmType,
    /// The backend the snapshot was taken on (plain state restores on either).
    pub backend: BackendKind,
    pub mem_size: u64,
    pub vcpus: u32,
    pub machine: MachineState,
    pub vcpu_states: Vec<VcpuSnapshot>,
    pub memory: Vec<Run>,
}

/// Write a snapshot of the machine behind `h` into `dir` (created if missing). The guest is
/// held stopped meanwhile. Returns the bytes written.
pub fn save(h: &MachineHandle, dir: &Path) -> Result<u64, SnapshotError> {
    if h.config.vm_type != VmType::Plain {
        return Err(SnapshotError::Unsupported(
            "snapshots of SEV-ES guests are not supported yet".into(),
        ));
    }
    h.control.hold()?;
    let result = (|| {
        h.control.wait_stopped(PARK_TIMEOUT)?;
        save_stopped(h, dir)
    })();
    h.control.release();
    result
}

fn save_stopped(h: &MachineHandle, dir: &Path) -> Result<u64, SnapshotError> {
    let (machine, vcpu_states) = h
        .control
        .run_job(|m| {
            let state = m.save_state();
            let vcpus: Result<Vec<_>, _> = (0..m.config().vcpus).map(|i| m.save_vcpu(i)).collect();
            vcpus.map(|v| (state, v)).map_err(|e| e.to_string())
        })?
        .map_err(SnapshotError::Save)?;
    let written = h
        .tracker
        .ever_written()
        .map_err(|e| SnapshotError::Save(format!("reading the dirty log: {e}")))?;

    fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem_tmp = dir.join(format!("{MEMORY_FILE}.tmp"));
    let mut runs = Vec::new();
    let mut bytes = 0u64;
    {
        let f = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
        f.set_len(h.config.mem_size).map_err(io(&mem_tmp))?;
        let mut buf = vec![0u8; (MAX_RUN_PAGES * PAGE) as usize];
        let mut cursor = 0;
        while let Some(first) = written.next_set(cursor) {
            let count = written.run_len(first, MAX_RUN_PAGES);
            let data = &mut buf[..(count * PAGE) as usize];
            h.vm.memory()
                .read(first * PAGE, data)
                .map_err(|e| SnapshotError::Save(format!("reading guest memory: {e}")))?;
            f.write_all_at(data, first * PAGE).map_err(io(&mem_tmp))?;
            runs.push(Run {
                first,
                count,
                crc32c: crc32c::crc32c(data),
            });
            bytes += data.len() as u64;
            cursor = first + count;
        }
        f.sync_all().map_err(io(&mem_tmp))?;
    }
    fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;

    let manifest = Manifest {
        vm_type: h.config.vm_type,
        backend: h.config.backend,
        mem_size: h.config.mem_size,
        vcpus: h.config.vcpus,
        machine,
        vcpu_states,
        memory: runs,
    };
    let json = serde_json::to_vec(&manifest)
        .map_err(|e| SnapshotError::Save(format!("encoding the state: {e}")))?;
    let header = format!(
        "{MAGIC} {SNAPSHOT_VERSION} crc32c={:08x} len={}\n",
        crc32c::crc32c(&json),
        json.len()
    );
    let state_path = dir.join(STATE_FILE);
    let state_tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        let mut f = File::create(&state_tmp).map_err(io(&state_tmp))?;
        f.write_all(header.as_bytes()).map_err(io(&state_tmp))?;
        f.write_all(&json).map_err(io(&state_tmp))?;
        f.sync_all().map_err(io(&state_tmp))?;
    }
    fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(bytes + (header.len() + json.len()) as u64)
}

/// Read and check `dir/vm.state`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotASnapshot(dir.to_path_buf()))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    if meta.len() > MAX_STATE_LEN {
        return Err(SnapshotError::Corrupt {
            path,
            why: format!("it is {} bytes, more than any VM state", meta.len()),
        });
    }
    let data = fs::read(&path).map_err(io(&path))?;
    parse_state(&path, &data)
}

fn parse_state(path: &Path, data: &[u8]) -> Result<Manifest, SnapshotError> {
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let Some(nl) = data.iter().take(128).position(|&b| b == b'\n') else {
        let magic = MAGIC.as_bytes();
        let prefix = data.starts_with(magic) || magic.starts_with(data);
        return Err(if data.len() < 128 && prefix {
            SnapshotError::Truncated {
                path: path.to_path_buf(),
                why: "its header line is incomplete".into(),
            }
        } else {
            corrupt("it does not start with an esvm snapshot header".into())
        });
    };
    let header =
        std::str::from_utf8(&data[..nl]).map_err(|_| corrupt("its header is not text".into()))?;
    let body = &data[nl + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, crc, len] = fields[..] else {
        return Err(corrupt(format!("unexpected header {header:?}")));
    };
    if magic != MAGIC {
        return Err(corrupt(
            "it does not start with an esvm snapshot header".into(),
        ));
    }
    let version: u32 = version
        .parse()
        .map_err(|_| corrupt(format!("bad version in header {header:?}")))?;
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version(version));
    }
    let crc = crc
        .strip_prefix("crc32c=")
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or_else(|| corrupt(format!("bad checksum field in header {header:?}")))?;
    let len: u64 = len
        .strip_prefix("len=")
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| corrupt(format!("bad length field in header {header:?}")))?;
    if (body.len() as u64) < len {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            why: format!(
                "the header announces {len} bytes of state, only {} follow",
                body.len()
            ),
        });
    }
    if body.len() as u64 > len {
        return Err(corrupt(format!(
            "{} bytes follow the {len} bytes of state the header announces",
            body.len() as u64 - len
        )));
    }
    if crc32c::crc32c(body) != crc {
        return Err(corrupt("the state fails its checksum".into()));
    }
    let m: Manifest = serde_json::from_slice(body)
        .map_err(|e| corrupt(format!("the state cannot be decoded: {e}")))?;
    check_manifest(&m).map_err(corrupt)?;
    Ok(m)
}

fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.mem_size == 0 || !m.mem_size.is_multiple_of(PAGE) {
        return Err(format!(
            "memory size {:#x} is not a multiple of 4 KiB",
            m.mem_size
        ));
    }
    if m.vcpus == 0 || m.vcpu_states.len() != m.vcpus as usize {
        return Err(format!(
            "{} vCPUs, but {} vCPU states",
            m.vcpus,
            m.vcpu_states.len()
        ));
    }
    if m.machine.instructions.len() != m.vcpus as usize {
        return Err(format!(
            "{} vCPUs, but instruction counts for {}",
            m.vcpus,
            m.machine.instructions.len()
        ));
    }
    let pages = m.mem_size / PAGE;
    let mut next = 0u64;
    for r in &m.memory {
        if r.count == 0 || r.count > MAX_RUN_PAGES || r.first < next {
            return Err(format!(
                "memory run {}+{} is empty, too long or out of order",
                r.first, r.count
            ));
        }
        if r.first.checked_add(r.count).is_none_or(|end| end > pages) {
            return Err(format!(
                "memory run {}+{} lies outside the {pages} pages of guest memory",
                r.first, r.count
            ));
        }
        next = r.first + r.count;
    }
    Ok(())
}

/// Build a machine from the snapshot in `dir` on `backend`, with COM1 writing to
/// `serial_out`: memory, vCPUs and devices restored, ready to run.
pub fn restore(
    dir: &Path,
    backend: BackendKind,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, SnapshotError> {
    let m = read_manifest(dir)?;
    if m.vm_type != VmType::Plain {
        return Err(SnapshotError::Unsupported(
            "this snapshot is of an SEV-ES guest, which esvm cannot restore yet".into(),
        ));
    }
    let mem_path = dir.join(MEMORY_FILE);
    let f = File::open(&mem_path).map_err(io(&mem_path))?;
    let size = f.metadata().map_err(io(&mem_path))?.len();
    if size < m.mem_size {
        return Err(SnapshotError::Truncated {
            path: mem_path,
            why: format!(
                "it is {size} bytes, the guest has {} bytes of memory",
                m.mem_size
            ),
        });
    }
    if size > m.mem_size {
        return Err(SnapshotError::Corrupt {
            path: mem_path,
            why: format!(
                "it is {size} bytes, the guest has only {} bytes of memory",
                m.mem_size
            ),
        });
    }
    let config = MachineConfig {
        backend,
        vm_type: VmType::Plain,
        mem_size: m.mem_size,
        vcpus: m.vcpus,
        max_instructions: None,
    };
    let mut machine = Machine::new(&config, serial_out)?;
    let mut buf = vec![0u8; (MAX_RUN_PAGES * PAGE) as usize];
    for r in &m.memory {
        let data = &mut buf[..(r.count * PAGE) as usize];
        f.read_exact_at(data, r.first * PAGE)
            .map_err(io(&mem_path))?;
        if crc32c::crc32c(data) != r.crc32c {
            return Err(SnapshotError::Corrupt {
                path: mem_path,
                why: format!(
                    "guest pages {:#x}..{:#x} fail their checksum",
                    r.first,
                    r.first + r.count
                ),
            });
        }
        machine
            .vm()
            .memory()
            .write(r.first * PAGE, data)
            .map_err(|e| SnapshotError::Save(format!("writing guest memory: {e}")))?;
    }
    for (i, s) in m.vcpu_states.iter().enumerate() {
        machine.restore_vcpu(i as u32, s)?;
    }
    machine.restore_state(&m.machine)?;
    Ok(machine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_errors_are_clear() {
        let p = Path::new("/x/vm.state");
        let e = parse_state(p, b"hello").unwrap_err();
        assert!(e.to_string().contains("does not start"), "{e}");
        let e = parse_state(p, b"ESVM-SNAP").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse_state(p, b"ESVM-SNAPSHOT 9 crc32c=0 len=0\n").unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let e = parse_state(p, b"ESVM-SNAPSHOT 1 crc32c=00000000 len=10\n{}").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let body = b"{}";
        let h = format!(
            "ESVM-SNAPSHOT 1 crc32c={:08x} len=2\n",
            crc32c::crc32c(body) ^ 1
        );
        let e = parse_state(p, &[h.as_bytes(), body].concat()).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let h = format!(
            "ESVM-SNAPSHOT 1 crc32c={:08x} len=2\n",
            crc32c::crc32c(body)
        );
        let e = parse_state(p, &[h.as_bytes(), body].concat()).unwrap_err();
        assert!(e.to_string().contains("cannot be decoded"), "{e}");
    }
}
