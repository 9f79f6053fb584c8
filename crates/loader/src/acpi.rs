//! ACPI tables for a Linux guest, built with rust-vmm's `acpi_tables`: RSDP, XSDT, FADT (with
//! FACS and DSDT), MADT. They describe the platform esvm's devices model:
//!
//! - MADT: one local APIC per vCPU at `layout::LAPIC_ADDR` (processor UID = APIC ID = vCPU
//!   number), the I/O APIC at `layout::IOAPIC_ADDR` (ID 0, GSI base 0), the interrupt source
//!   overrides of a PC (ISA IRQ 0 -> GSI 2; the SCI, IRQ 9, level and active high), LINT1 as
//!   the NMI input, and PCAT_COMPAT (the 8259 pair is there too).
//! - FADT: *not* hardware-reduced, so the 8259, the PIT and the i8042 stay usable (a
//!   hardware-reduced FADT makes Linux drop the legacy PIC and PIT, which the built-in guests
//!   and esvm's timekeeping use). PM1a event block at port 0x600, PM1a control at 0x604
//!   (`esvm_devices::acpi_pm`), SCI on IRQ 9, no SMI command port (always in ACPI mode), no PM
//!   timer, no GPE blocks; IAPC_BOOT_ARCH says legacy devices and an 8042 exist.
//! - DSDT: only `\_S5` (SLP_TYP 5), so that `poweroff` in the guest writes SLP_TYP=5|SLP_EN
//!   to PM1a control, which ends the VM with status 0.
//!
//! The tables are one blob at `layout::ACPI_ADDR` (the e820 map marks its pages as ACPI
//! tables): a page, more only for a MADT of very many vCPUs.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use esvm_arch::layout;

/// PM1a event block port (`esvm_devices::ACPI_PM1A_EVT`).
pub const PM1A_EVT_PORT: u32 = 0x600;
/// PM1a control block port (`esvm_devices::ACPI_PM1A_CNT`).
pub const PM1A_CNT_PORT: u32 = 0x604;
/// The SCI's ISA IRQ.
pub const SCI_IRQ: u16 = 9;
/// SLP_TYP of S5 in `\_S5` (`esvm_devices::ACPI_SLP_TYP_S5`).
pub const SLP_TYP_S5: u8 = 5;

const OEM_ID: [u8; 6] = *b"ESVM  ";
const OEM_TABLE_ID: [u8; 8] = *b"ESVMACPI";
const OEM_REVISION: u32 = 1;

/// Offsets of the tables in the ACPI page.
const XSDT_OFF: u64 = 0x40;
const FACS_OFF: u64 = 0x100;
const FADT_OFF: u64 = 0x200;
const DSDT_OFF: u64 = 0x400;
/// The MADT comes last: it grows with the vCPUs (8 bytes each).
const MADT_OFF: u64 = 0x600;
/// Size of the blob for up to 300 vCPUs; more make it larger (whole pages).
pub const ACPI_BLOB_SIZE: usize = 0x1000;

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt() -> Vec<u8> {
    use acpi_tables::aml::{Name, Package, Path};
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5: {SLP_TYPa, SLP_TYPb, reserved, reserved}.
    let (a, b, z): (u8, u8, u8) = (SLP_TYP_S5, SLP_TYP_S5, 0);
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&a, &b, &z, &z]));
    t.append_slice(&bytes(&s5));
    t.as_slice().to_vec()
}

/// The MADT. Built on the crate's generic table (`Sdt`) because its `MADT` type has no
/// interrupt-source-override or local-APIC-NMI structure and no way to set PCAT_COMPAT;
/// the structures are the ACPI 6.5 section 5.2.12 layouts.
fn madt(vcpus: u32) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, layout::LAPIC_ADDR as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    for id in 0..vcpus.min(255) {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        t.append_slice(&[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, ID 0, reserved, address, GSI base 0.
    let mut io = vec![1, 12, 0, 0];
    io.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&io);
    // Interrupt source overrides: type 2, length 10, bus 0 (ISA), source IRQ, GSI, flags.
    for (irq, gsi, flags) in [(0u8, 2u32, 0u16), (SCI_IRQ as u8, 9, 0x000d)] {
        let mut iso = vec![2, 10, 0, irq];
        iso.extend_from_slice(&gsi.to_le_bytes());
        iso.extend_from_slice(&flags.to_le_bytes());
        t.append_slice(&iso);
    }
    // Local APIC NMI: type 4, length 6, all processors (0xff), flags 0, LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.as_slice().to_vec()
}

fn fadt(base: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(base + DSDT_OFF)
        .firmware_ctrl_64(base + FACS_OFF)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sci_int = SCI_IRQ.into();
    f.pm1a_evt_blk = PM1A_EVT_PORT.into();
    f.pm1a_cnt_blk = PM1A_CNT_PORT.into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    // Legacy devices (bit 0) and an 8042 (bit 1).
    f.iapc_boot_arch = 0x3u16.into();
    bytes(&f.finalize())
}

/// The tables for `vcpus` vCPUs (at most 255 are described: xAPIC IDs), laid out for
/// guest-physical `base` (16-byte aligned, below 4 GiB): the bytes to write there, whole
/// pages. The RSDP is at its start.
pub fn acpi_tables(base: u64, vcpus: u32) -> Vec<u8> {
    let madt = madt(vcpus);
    let size = (MADT_OFF as usize + madt.len()).next_multiple_of(0x1000);
    let mut blob = vec![0u8; size.max(ACPI_BLOB_SIZE)];
    let mut put = |off: u64, data: &[u8]| {
        let off = off as usize;
        blob[off..off + data.len()].copy_from_slice(data);
    };
    let mut xsdt = acpi_tables::xsdt::XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(base + FADT_OFF);
    xsdt.add_entry(base + MADT_OFF);
    put(
        0,
        &bytes(&acpi_tables::rsdp::Rsdp::new(OEM_ID, base + XSDT_OFF)),
    );
    put(XSDT_OFF, &bytes(&xsdt));
    put(FACS_OFF, &bytes(&acpi_tables::facs::FACS::new()));
    put(FADT_OFF, &fadt(base));
    put(MADT_OFF, &madt);
    put(DSDT_OFF, &dsdt());
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(blob: &[u8], off: u64) -> &[u8] {
        let off = off as usize;
        let len = u32::from_le_bytes(blob[off + 4..off + 8].try_into().unwrap()) as usize;
        &blob[off..off + len]
    }

    #[test]
    fn checksums_lengths_and_pointers() {
        let base = layout::ACPI_ADDR;
        let blob = acpi_tables(base, 1);
        // RSDP: v1 checksum over 20 bytes, extended over 36.
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0);
        assert_eq!(sum(&blob[..36]), 0);
        assert_eq!(blob[15], 2, "ACPI 2.0+ RSDP");
        let xsdt_addr = u64::from_le_bytes(blob[24..32].try_into().unwrap());
        assert_eq!(xsdt_addr, base + XSDT_OFF);
        let xsdt = table(&blob, XSDT_OFF);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, [base + FADT_OFF, base + MADT_OFF]);
        for (off, sig) in [
            (FADT_OFF, b"FACP"),
            (MADT_OFF, b"APIC"),
            (DSDT_OFF, b"DSDT"),
        ] {
            let t = table(&blob, off);
            assert_eq!(&t[..4], sig);
            assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert!(off as usize + t.len() <= ACPI_BLOB_SIZE);
        }
        assert_eq!(&blob[FACS_OFF as usize..FACS_OFF as usize + 4], b"FACS");
        // Tables do not overlap.
        assert!(XSDT_OFF as usize + xsdt.len() <= FACS_OFF as usize);
        assert!(FADT_OFF as usize + table(&blob, FADT_OFF).len() <= DSDT_OFF as usize);
        assert!(DSDT_OFF as usize + table(&blob, DSDT_OFF).len() <= MADT_OFF as usize);
        // Many vCPUs: the MADT grows the blob by whole pages, nothing overlaps.
        let big = acpi_tables(base, 1000);
        assert_eq!(big.len() % 0x1000, 0);
        let m = table(&big, MADT_OFF);
        assert_eq!(sum(m), 0);
        assert_eq!(
            m.len(),
            44 + 255 * 8 + 12 + 2 * 10 + 6,
            "255 local APICs at most"
        );
    }

    #[test]
    fn fadt_points_at_the_pm_ports_and_is_not_hardware_reduced() {
        let blob = acpi_tables(layout::ACPI_ADDR, 1);
        let f = table(&blob, FADT_OFF);
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), SCI_IRQ);
        assert_eq!(u32_at(48), 0, "no SMI command port");
        assert_eq!(u32_at(56), PM1A_EVT_PORT);
        assert_eq!(u32_at(64), PM1A_CNT_PORT);
        assert_eq!((f[88], f[89]), (4, 2));
        assert_eq!(u32_at(112) & (1 << 20), 0, "not HW_REDUCED_ACPI");
        let x_dsdt = u64::from_le_bytes(f[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, layout::ACPI_ADDR + DSDT_OFF);
    }

    #[test]
    fn madt_lists_lapics_ioapic_and_overrides() {
        let blob = acpi_tables(layout::ACPI_ADDR, 2);
        let m = table(&blob, MADT_OFF);
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let mut kinds = Vec::new();
        let mut i = 44;
        while i < m.len() {
            kinds.push((m[i], m[i + 1]));
            if m[i] == 2 {
                let gsi = u32::from_le_bytes(m[i + 4..i + 8].try_into().unwrap());
                assert!(matches!((m[i + 3], gsi), (0, 2) | (9, 9)));
            }
            i += usize::from(m[i + 1]);
        }
        assert_eq!(i, m.len());
        assert_eq!(kinds, [(0, 8), (0, 8), (1, 12), (2, 10), (2, 10), (4, 6)]);
    }

    #[test]
    fn dsdt_holds_s5() {
        let blob = acpi_tables(layout::ACPI_ADDR, 1);
        let d = table(&blob, DSDT_OFF);
        // NameOp "_S5_" PackageOp len 4-elements BytePrefix 5 BytePrefix 5 ...
        let aml = &d[36..];
        assert_eq!(&aml[..5], &[0x08, b'_', b'S', b'5', b'_']);
        assert_eq!(aml[5], 0x12, "PackageOp");
        assert!(aml.windows(2).any(|w| w == [0x0a, 5]), "{aml:x?}");
    }
}
