//! Segment descriptor loads and checks.

use crate::{gp0, Cpu, Exc, Mode, Stop, CS, DS, ES, FS, GS, R, SS};
use esvm_arch::bits::vector;
use esvm_arch::{Segment, SegmentAttributes};

/// A raw descriptor and the linear address it was read from.
#[derive(Clone, Copy)]
pub(crate) struct Desc(pub u64, pub u64);

impl Cpu {
    /// Read the 8-byte descriptor for selector `sel` from the GDT or LDT (#GP(sel) when out
    /// of the table).
    pub(crate) fn read_descriptor(&mut self, sel: u16) -> R<Desc> {
        let idx = (sel & !7) as u64;
        let (base, limit) = if sel & 4 != 0 {
            if self.ldtr.selector & !3 == 0 || !self.ldtr.attrib.present() {
                return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
            }
            (self.ldtr.base, self.ldtr.limit as u64)
        } else {
            (self.gdtr.base, self.gdtr.limit as u64)
        };
        if idx + 7 > limit {
            return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
        }
        let lin = base.wrapping_add(idx);
        let v = self.rd_sys(lin, 8)?;
        Ok(Desc(v, lin))
    }

    /// Read the high 8 bytes of a 16-byte system descriptor.
    pub(crate) fn read_descriptor_high(&mut self, sel: u16) -> R<u64> {
        let idx = (sel & !7) as u64 + 8;
        if idx + 7 > self.gdtr.limit as u64 {
            return Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
        }
        self.rd_sys(self.gdtr.base.wrapping_add(idx), 8)
    }

    /// Set the accessed bit of a code/data descriptor.
    pub(crate) fn set_accessed(&mut self, _sel: u16, d: Desc) -> R {
        if d.0 & (1 << 40) == 0 {
            self.wr_sys(d.1 + 5, 1, ((d.0 >> 40) as u8 | 1) as u64)?;
        }
        Ok(())
    }

    /// MOV/POP to DS, ES, FS, GS or SS.
    pub(crate) fn load_data_seg(&mut self, seg: usize, sel: u16) -> R {
        if seg == CS {
            return crate::ud();
        }
        if self.mode == Mode::Real {
            let s = &mut self.seg[seg];
            s.selector = sel;
            s.base = (sel as u64) << 4;
            self.update_seg_bases();
            return Ok(());
        }
        if seg == SS {
            return self.load_ss_for(sel, self.cpl);
        }
        if sel & !3 == 0 {
            // Null selector: usable for data segments, faults on use. In 64-bit mode the
            // FS/GS base is kept (AMD behaviour).
            let keep = self.mode == Mode::Long64 && (seg == FS || seg == GS);
            let base = if keep { self.seg[seg].base } else { 0 };
            self.seg[seg] = Segment {
                selector: sel,
                base,
                limit: 0,
                attrib: SegmentAttributes(0),
            };
            self.update_seg_bases();
            return Ok(());
        }
        let d = self.read_descriptor(sel)?;
        let s = Segment::from_descriptor(sel, d.0, None);
        let a = s.attrib;
        let err = Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
        if !a.s() || (a.is_code() && a.seg_type() & 2 == 0) {
            return err;
        }
        let conforming_code = a.is_code() && a.seg_type() & 4 != 0;
        if !conforming_code && ((sel & 3) as u8 > a.dpl() || self.cpl > a.dpl()) {
            return err;
        }
        if !a.present() {
            return Err(Stop::Exc(Exc::ec(vector::NP, (sel & !3) as u32)));
        }
        self.set_accessed(sel, d)?;
        let mut s = s;
        s.attrib = SegmentAttributes(s.attrib.0 | 1);
        self.seg[seg] = s;
        self.update_seg_bases();
        Ok(())
    }

    /// Load SS for privilege level `cpl` (MOV SS, far returns, IRET).
    pub(crate) fn load_ss_for(&mut self, sel: u16, cpl: u8) -> R {
        if self.mode == Mode::Real {
            let s = &mut self.seg[SS];
            s.selector = sel;
            s.base = (sel as u64) << 4;
            self.update_seg_bases();
            return Ok(());
        }
        if sel & !3 == 0 {
            // A null SS is allowed in 64-bit mode below CPL 3 (RPL must equal CPL).
            if self.mode == Mode::Long64 && cpl < 3 && (sel & 3) as u8 == cpl {
                self.seg[SS] = Segment {
                    selector: sel,
                    base: 0,
                    limit: 0xffff_ffff,
                    attrib: SegmentAttributes::new(0x3, true, cpl, true, false, true, true),
                };
                self.update_seg_bases();
                self.set_cpl(cpl);
                return Ok(());
            }
            return gp0();
        }
        let d = self.read_descriptor(sel)?;
        let s = Segment::from_descriptor(sel, d.0, None);
        let a = s.attrib;
        let err = Err(Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32)));
        if !a.s() || a.is_code() || a.seg_type() & 2 == 0 {
            return err;
        }
        if (sel & 3) as u8 != cpl || a.dpl() != cpl {
            return err;
        }
        if !a.present() {
            return Err(Stop::Exc(Exc::ec(vector::SS, (sel & !3) as u32)));
        }
        self.set_accessed(sel, d)?;
        let mut s = s;
        s.attrib = SegmentAttributes(s.attrib.0 | 1);
        self.seg[SS] = s;
        self.update_seg_bases();
        self.set_cpl(cpl);
        Ok(())
    }

    /// After a return to an outer privilege level, data segments the new CPL may not use
    /// are nulled.
    pub(crate) fn drop_invalid_data_segs(&mut self) {
        for seg in [ES, DS, FS, GS] {
            let a = self.seg[seg].attrib;
            let conforming_code = a.is_code() && a.seg_type() & 4 != 0;
            if a.present()
                && !conforming_code
                && a.dpl() < self.cpl
                && self.seg[seg].selector & !3 != 0
            {
                let base = if seg == FS || seg == GS {
                    self.seg[seg].base
                } else {
                    0
                };
                self.seg[seg] = Segment {
                    base,
                    ..Segment::default()
                };
            }
        }
        self.update_seg_bases();
    }
}
