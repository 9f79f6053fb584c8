//! A recording [`GhcbServices`] mock shared by the GHCB tests. It asserts the handler's
//! guarantees on every call (argument ranges, shared-memory ranges, bounded call counts), so a
//! violating handler fails the test that drove it.

#![allow(dead_code)]

use esvm_hv::ghcb::page::GhcbPage;
use esvm_hv::ghcb::{
    CpuidRequest, GhcbField, GhcbServices, IoSize, ServiceError, VmmcallRegs, GHCB_PAGE_SIZE,
};
use std::collections::BTreeMap;

/// Shared guest RAM visible to the mock: [SHARED_BASE, SHARED_BASE + SHARED_SIZE).
pub const SHARED_BASE: u64 = 0x10_0000;
pub const SHARED_SIZE: usize = 256 * 1024;
/// Private (encrypted) guest RAM: accesses fail.
pub const PRIVATE_BASE: u64 = 0x20_0000;
pub const PRIVATE_SIZE: u64 = 64 * 1024;
/// Where the tests put the GHCB (inside shared RAM).
pub const GHCB_GPA: u64 = SHARED_BASE + 0x1_0000;
/// A page of shared RAM usable as an external scratch area.
pub const EXT_SCRATCH: u64 = SHARED_BASE + 0x2_0000;
/// Upper bound on service calls in one VMGEXIT with the default scratch limit.
pub const MAX_CALLS: usize = 65536 + 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Cpuid(CpuidRequest),
    IoIn(u16, IoSize),
    IoOut(u16, IoSize, u32),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    Rdmsr(u32),
    Wrmsr(u32, u64),
    Vmmcall(VmmcallRegs),
    Tsc,
    TscAux,
    GetJumpTable,
    SetJumpTable(u64),
    ReadShared(u64, usize),
    WriteShared(u64, usize),
}

pub struct Mock {
    pub calls: Vec<Call>,
    pub shared: Vec<u8>,
    pub ghcb_gpa: u64,
    pub scratch_limit: usize,
    pub msrs: BTreeMap<u32, u64>,
    pub jump_table: u64,
    pub tsc: u64,
    pub tsc_aux: u32,
    pub io_counter: u32,
    /// Make every device service refuse (port/MMIO/CPUID/VMMCALL).
    pub refuse_devices: bool,
    /// Count of service calls; bounded by [`MAX_CALLS`].
    pub count: usize,
}

impl Default for Mock {
    fn default() -> Self {
        Mock::new(GHCB_GPA)
    }
}

impl Mock {
    pub fn new(ghcb_gpa: u64) -> Self {
        let mut msrs = BTreeMap::new();
        msrs.insert(0xC000_0080, 0xD01); // EFER
        msrs.insert(0x1B, 0xFEE0_0900); // APIC base
        Mock {
            calls: Vec::new(),
            shared: vec![0; SHARED_SIZE],
            ghcb_gpa,
            scratch_limit: esvm_hv::ghcb::DEFAULT_SCRATCH_LIMIT as usize,
            msrs,
            jump_table: 0,
            tsc: 0x1122_3344_5566_7788,
            tsc_aux: 3,
            io_counter: 0,
            refuse_devices: false,
            count: 0,
        }
    }

    fn tick(&mut self) {
        self.count += 1;
        assert!(
            self.count <= MAX_CALLS,
            "more than {MAX_CALLS} service calls in one VMGEXIT"
        );
    }

    /// The value the `n`th `io_in` (from 1) returns for `port`. Its top byte is always set,
    /// so narrower accesses must be masked by the handler.
    pub fn io_value(port: u16, n: u32) -> u32 {
        ((u32::from(port) << 8) ^ n.wrapping_mul(0x9E37_79B9)) | 0xFF00_0000
    }

    /// The byte `mmio_read` returns at `gpa`.
    pub fn mmio_byte(gpa: u64) -> u8 {
        (gpa as u8) ^ 0x5A
    }

    fn check_shared(&self, gpa: u64, len: usize) -> Result<usize, ServiceError> {
        let end = gpa
            .checked_add(len as u64)
            .unwrap_or_else(|| panic!("shared access {gpa:#x}+{len:#x} wraps"));
        let whole_ghcb = gpa == self.ghcb_gpa && len == GHCB_PAGE_SIZE;
        if !whole_ghcb {
            assert!(
                len <= self.scratch_limit,
                "shared access of {len:#x} bytes beyond the scratch limit"
            );
            let g_end = self.ghcb_gpa + GHCB_PAGE_SIZE as u64;
            assert!(
                end <= self.ghcb_gpa || gpa >= g_end,
                "shared access {gpa:#x}..{end:#x} overlaps the GHCB page"
            );
        }
        if gpa >= SHARED_BASE && end <= SHARED_BASE + SHARED_SIZE as u64 {
            Ok((gpa - SHARED_BASE) as usize)
        } else if gpa < PRIVATE_BASE + PRIVATE_SIZE && end > PRIVATE_BASE {
            Err(ServiceError::refused("private page"))
        } else {
            Err(ServiceError::refused("not guest RAM"))
        }
    }

    pub fn shared_at(&self, gpa: u64, len: usize) -> &[u8] {
        let off = (gpa - SHARED_BASE) as usize;
        &self.shared[off..off + len]
    }

    pub fn shared_at_mut(&mut self, gpa: u64, len: usize) -> &mut [u8] {
        let off = (gpa - SHARED_BASE) as usize;
        &mut self.shared[off..off + len]
    }

    fn device(&self) -> Result<(), ServiceError> {
        if self.refuse_devices {
            Err(ServiceError::refused("device unavailable"))
        } else {
            Ok(())
        }
    }

    pub fn device_calls(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| !matches!(c, Call::ReadShared(..) | Call::WriteShared(..)))
            .count()
    }
}

impl GhcbServices for Mock {
    fn cpuid(&mut self, r: CpuidRequest) -> Result<[u32; 4], ServiceError> {
        self.tick();
        self.calls.push(Call::Cpuid(r));
        self.device()?;
        let xcr0 = r.xcr0.unwrap_or(0) as u32;
        Ok([
            r.function ^ 0xA0A0,
            r.index ^ 0xB0B0,
            xcr0,
            0xD0D0_0000 | r.function,
        ])
    }

    fn io_in(&mut self, port: u16, size: IoSize) -> Result<u32, ServiceError> {
        self.tick();
        self.calls.push(Call::IoIn(port, size));
        self.device()?;
        self.io_counter += 1;
        // Deliberately return more bits than the access carries: the handler must mask.
        Ok(Self::io_value(port, self.io_counter))
    }

    fn io_out(&mut self, port: u16, size: IoSize, value: u32) -> Result<(), ServiceError> {
        self.tick();
        assert_eq!(
            value & !size.mask(),
            0,
            "OUT value {value:#x} wider than {size:?}"
        );
        self.calls.push(Call::IoOut(port, size, value));
        self.device()
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), ServiceError> {
        self.tick();
        assert!(
            (1..=8).contains(&data.len()),
            "MMIO read of {} bytes",
            data.len()
        );
        assert!(
            gpa.checked_add(data.len() as u64).is_some(),
            "MMIO read wraps"
        );
        self.calls.push(Call::MmioRead(gpa, data.len()));
        self.device()?;
        for (i, b) in data.iter_mut().enumerate() {
            *b = Self::mmio_byte(gpa + i as u64);
        }
        Ok(())
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), ServiceError> {
        self.tick();
        assert!(
            (1..=8).contains(&data.len()),
            "MMIO write of {} bytes",
            data.len()
        );
        assert!(
            gpa.checked_add(data.len() as u64).is_some(),
            "MMIO write wraps"
        );
        self.calls.push(Call::MmioWrite(gpa, data.to_vec()));
        self.device()
    }

    fn rdmsr(&mut self, index: u32) -> Result<u64, ServiceError> {
        self.tick();
        self.calls.push(Call::Rdmsr(index));
        self.msrs
            .get(&index)
            .copied()
            .ok_or(ServiceError::GeneralProtection)
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> Result<(), ServiceError> {
        self.tick();
        self.calls.push(Call::Wrmsr(index, value));
        match self.msrs.get_mut(&index) {
            Some(v) => {
                *v = value;
                Ok(())
            }
            None => Err(ServiceError::GeneralProtection),
        }
    }

    fn vmmcall(&mut self, regs: &mut VmmcallRegs) -> Result<(), ServiceError> {
        self.tick();
        self.calls.push(Call::Vmmcall(*regs));
        self.device()?;
        if regs.cpl != 0 {
            return Err(ServiceError::InvalidOpcode);
        }
        regs.rax = regs.rbx.wrapping_add(regs.rcx);
        regs.rbx = 0xBB;
        Ok(())
    }

    fn tsc(&mut self) -> Result<u64, ServiceError> {
        self.tick();
        self.calls.push(Call::Tsc);
        Ok(self.tsc)
    }

    fn tsc_aux(&mut self) -> Result<u32, ServiceError> {
        self.tick();
        self.calls.push(Call::TscAux);
        Ok(self.tsc_aux)
    }

    fn ap_jump_table(&mut self) -> Result<u64, ServiceError> {
        self.tick();
        self.calls.push(Call::GetJumpTable);
        Ok(self.jump_table)
    }

    fn set_ap_jump_table(&mut self, gpa: u64) -> Result<(), ServiceError> {
        self.tick();
        self.calls.push(Call::SetJumpTable(gpa));
        self.jump_table = gpa;
        Ok(())
    }

    fn read_shared(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), ServiceError> {
        self.tick();
        self.calls.push(Call::ReadShared(gpa, buf.len()));
        let off = self.check_shared(gpa, buf.len())?;
        buf.copy_from_slice(&self.shared[off..off + buf.len()]);
        Ok(())
    }

    fn write_shared(&mut self, gpa: u64, data: &[u8]) -> Result<(), ServiceError> {
        self.tick();
        self.calls.push(Call::WriteShared(gpa, data.len()));
        let off = self.check_shared(gpa, data.len())?;
        self.shared[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// A guest-built GHCB page: standard usage, protocol version 2, the three exit fields valid.
pub fn request(code: u64, info1: u64, info2: u64) -> [u8; GHCB_PAGE_SIZE] {
    let mut b = [0u8; GHCB_PAGE_SIZE];
    let mut p = GhcbPage::new(&mut b);
    p.set_protocol_version(2);
    p.set_usage(0);
    p.set_sw_exit_code(code);
    p.set_sw_exit_info1(info1);
    p.set_sw_exit_info2(info2);
    b
}

/// Set a field (and its valid bit) in a page.
pub fn with(mut b: [u8; GHCB_PAGE_SIZE], field: GhcbField, v: u64) -> [u8; GHCB_PAGE_SIZE] {
    GhcbPage::new(&mut b).set(field, v);
    b
}

/// The fields whose valid bit is set.
pub fn valid_fields(b: &[u8; GHCB_PAGE_SIZE]) -> Vec<GhcbField> {
    let mut c = *b;
    let p = GhcbPage::new(&mut c);
    GhcbField::ALL
        .iter()
        .copied()
        .filter(|f| p.is_valid(*f))
        .collect()
}

/// Read a field regardless of its valid bit.
pub fn raw(b: &[u8; GHCB_PAGE_SIZE], field: GhcbField) -> u64 {
    let mut c = *b;
    GhcbPage::new(&mut c).raw(field)
}

/// A small SplitMix64 generator (deterministic, no dependency).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}
