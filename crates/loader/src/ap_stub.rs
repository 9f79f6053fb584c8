//! The SEV-ES AP start stub: where the application processors of an SEV-ES guest with more
//! than one vCPU wait until the guest starts them (docs/sev-es-guest.md, "Several vCPUs").
//!
//! The hypervisor cannot set a protected vCPU's registers, so an SEV-ES AP cannot start at a
//! SIPI's vector as a plain one does. On real machines the firmware (OVMF) parks the APs in
//! its own code, in the GHCB AP reset hold, and registers an AP jump table (AP_JUMP_TABLE
//! SET); the guest kernel asks for the table (GET), writes the real-mode far pointer of its
//! AP entry into it and sends INIT-SIPI-SIPI; the hypervisor completes the hold at the SIPI
//! and the AP, in firmware code, jumps through the table. esvm plays the firmware's part
//! with this stub:
//!
//! - it is placed at [`layout::AP_STUB_ADDR`] (below 1 MiB: it runs in real mode), with the
//!   jump table in the next page ([`layout::AP_JUMP_TABLE_ADDR`], zero at launch); both are
//!   encrypted and measured with LAUNCH_UPDATE_DATA like the rest of the image;
//! - each AP's initial VMSA starts at its first byte in real mode ([`ap_initial_state`]);
//! - the stub loops: AP reset hold through the GHCB MSR protocol (GHCB MSR = 0x006,
//!   VMGEXIT, read the MSR back: response 0x007 with a non-zero GHCBData = released), then
//!   reads the jump table: zero (nobody wrote it yet) -> hold again; else far jump to the
//!   CS:IP in it (IP at offset 0, CS at offset 2, as Linux writes them).
//!
//! Only the MSR protocol works here: with paging off every data access of an SEV-ES vCPU is
//! private (encrypted), so real-mode code cannot use a (shared) GHCB page. That is also why
//! the stub does not register the table with AP_JUMP_TABLE SET itself (a GHCB-page request):
//! the VMM registers [`layout::AP_JUMP_TABLE_ADDR`] through the hypervisor at launch, as the
//! firmware's SET would have.
//!
//! The code is 20 instructions of 16-bit real-mode x86, hand-assembled below (each with its
//! mnemonic; the tests decode it with iced-x86 and check every instruction): an assembler
//! dependency in the loader for 68 bytes would cost more than it saves, and the bytes are
//! generated here at build time, never committed as a binary.

use esvm_arch::layout;
use esvm_arch::msr::APIC_BASE_DEFAULT_BSP;
use esvm_arch::VcpuSnapshot;

/// The GHCB MSR (MSR_AMD64_SEV_ES_GHCB).
const MSR_GHCB: u32 = 0xC001_0130;
/// GHCB MSR protocol: AP reset hold request / response (GHCBInfo).
const AP_RESET_HOLD_REQ: u32 = 0x006;
const AP_RESET_HOLD_RESP: u32 = 0x007;
/// The APIC base MSR's BSP flag (bit 8).
const APIC_BASE_BSP: u64 = 1 << 8;

/// A byte sequence with backward short jumps to one label (the hold loop).
struct Asm {
    code: Vec<u8>,
}

impl Asm {
    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    /// `opcode rel8` jumping back to `target` (an offset already emitted).
    fn jump_back(&mut self, opcode: u8, target: usize) {
        let next = self.code.len() + 2;
        let rel = i8::try_from(target as isize - next as isize).expect("short jump in range");
        self.emit(&[opcode, rel as u8]);
    }
}

/// The stub's code, to be placed at [`layout::AP_STUB_ADDR`] (it runs with CS.base there
/// and IP 0; it addresses the jump table with DS = 0).
pub fn code() -> Vec<u8> {
    let table = u16::try_from(layout::AP_JUMP_TABLE_ADDR).expect("jump table below 64 KiB");
    let [t0, t1] = table.to_le_bytes();
    let [m0, m1, m2, m3] = MSR_GHCB.to_le_bytes();
    let mut a = Asm { code: Vec::new() };
    a.emit(&[0xFA]); // cli
    a.emit(&[0x31, 0xC0]); // xor ax, ax
    a.emit(&[0x8E, 0xD8]); // mov ds, ax
    let hold = a.code.len();
    a.emit(&[0x66, 0xB9, m0, m1, m2, m3]); // mov ecx, MSR_GHCB
    a.emit(&[0x66, 0xB8]); // mov eax, AP_RESET_HOLD_REQ
    a.emit(&AP_RESET_HOLD_REQ.to_le_bytes());
    a.emit(&[0x66, 0x31, 0xD2]); // xor edx, edx
    a.emit(&[0x0F, 0x30]); // wrmsr
    a.emit(&[0xF3, 0x0F, 0x01, 0xD9]); // vmgexit (rep vmmcall)
    a.emit(&[0x0F, 0x32]); // rdmsr
    a.emit(&[0x66, 0x89, 0xC3]); // mov ebx, eax
    a.emit(&[0x66, 0x81, 0xE3, 0xFF, 0x0F, 0x00, 0x00]); // and ebx, 0xfff
    a.emit(&[0x66, 0x83, 0xFB, AP_RESET_HOLD_RESP as u8]); // cmp ebx, AP_RESET_HOLD_RESP
    a.jump_back(0x75, hold); // jne hold
    a.emit(&[0x66, 0x25, 0x00, 0xF0, 0xFF, 0xFF]); // and eax, 0xfffff000
    a.emit(&[0x66, 0x09, 0xD0]); // or eax, edx
    a.jump_back(0x74, hold); // jz hold (GHCBData = 0: still held)
    a.emit(&[0x66, 0xA1, t0, t1]); // mov eax, [table]
    a.emit(&[0x66, 0x85, 0xC0]); // test eax, eax
    a.jump_back(0x74, hold); // jz hold (no entry written yet)
    a.emit(&[0xFF, 0x2E, t0, t1]); // jmp far [table] (IP at +0, CS at +2)
    a.code
}

/// The page at [`layout::AP_STUB_ADDR`]: [`code`], zero-filled; the jump table page after
/// it starts zero.
pub fn page() -> Vec<u8> {
    let mut page = code();
    page.resize(layout::AP_STUB_SIZE as usize, 0);
    page
}

/// The guest-physical range of the stub and its jump table (what an SEV-ES launch measures
/// for them and a Linux guest's e820 map reports reserved): start, length.
pub const fn range() -> (u64, u64) {
    (
        layout::AP_STUB_ADDR,
        layout::AP_JUMP_TABLE_ADDR + layout::AP_JUMP_TABLE_SIZE - layout::AP_STUB_ADDR,
    )
}

/// An AP's initial state (its initial VMSA): power-on state, but CS:IP at the stub's first
/// byte in real mode (CS selector = address >> 4, base = address, IP 0, as after a SIPI)
/// and the APIC enabled at its default base without the BSP flag.
pub fn ap_initial_state() -> VcpuSnapshot {
    let mut s = VcpuSnapshot::reset();
    s.sregs.cs.selector = (layout::AP_STUB_ADDR >> 4) as u16;
    s.sregs.cs.base = layout::AP_STUB_ADDR;
    s.sregs.cs.limit = 0xffff;
    s.regs.rip = 0;
    s.sregs.apic_base = APIC_BASE_DEFAULT_BSP & !APIC_BASE_BSP;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, FastFormatter, Instruction};

    fn listing() -> Vec<(u64, String)> {
        let code = code();
        let mut decoder = Decoder::with_ip(16, &code, 0, DecoderOptions::NONE);
        let mut fmt = FastFormatter::new();
        let mut out = Vec::new();
        let mut instr = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            assert!(
                !instr.is_invalid(),
                "invalid instruction at {:#x}",
                instr.ip()
            );
            let mut text = String::new();
            fmt.format(&instr, &mut text);
            out.push((instr.ip(), text));
        }
        out
    }

    /// The hand-assembled bytes are exactly the instructions the comments name.
    #[test]
    fn the_stub_decodes_to_the_documented_instructions() {
        let text: Vec<String> = listing().into_iter().map(|(_, t)| t).collect();
        let expected = [
            "cli",
            "xor ax,ax",
            "mov ds,ax",
            "mov ecx,0C0010130h",
            "mov eax,6h",
            "xor edx,edx",
            "wrmsr",
            "vmgexit",
            "rdmsr",
            "mov ebx,eax",
            "and ebx,0FFFh",
            "cmp ebx,7h",
            "jne 5h",
            "and eax,0FFFFF000h",
            "or eax,edx",
            "je 5h",
            "mov eax,[6000h]",
            "test eax,eax",
            "je 5h",
            // m16:16: IP, then CS.
            "jmpf dword ptr [6000h]",
        ];
        assert_eq!(text, expected, "{text:#?}");
        // The loop target is the MOV ECX after the DS set-up.
        assert_eq!(listing()[3].0, 5);
    }

    #[test]
    fn the_stub_fits_its_page_and_the_table_follows() {
        assert!(code().len() < layout::AP_STUB_SIZE as usize);
        assert_eq!(page().len(), 4096);
        assert_eq!(range(), (0x5000, 0x2000));
        assert_eq!(layout::AP_JUMP_TABLE_ADDR, layout::AP_STUB_ADDR + 0x1000);
    }

    #[test]
    fn an_ap_starts_at_the_stub_in_real_mode_without_the_bsp_flag() {
        let s = ap_initial_state();
        assert_eq!(s.sregs.cs.base + s.regs.rip, layout::AP_STUB_ADDR);
        assert_eq!(u64::from(s.sregs.cs.selector) << 4, s.sregs.cs.base);
        assert_eq!(s.sregs.cr0 & 1, 0, "real mode");
        assert_eq!(s.sregs.apic_base, 0xfee0_0800);
    }
}
