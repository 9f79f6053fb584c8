//! Exception and interrupt delivery: 64-bit IDT gates (with TSS RSP0-2 and IST stacks),
//! 32/16-bit protected-mode gates, the real-mode IVT, and the double/triple-fault rules.

use crate::{Cpu, Exc, Mode, Stop, CS, R, SS};
use esvm_arch::bits::rflags::{AC, IF, NT, RF, TF, VM};
use esvm_arch::bits::vector;
use esvm_arch::{Segment, SegmentAttributes};

/// What is being delivered (decides DPL checks and the EXT bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// External interrupt or NMI.
    External,
    /// Processor exception.
    Exception,
    /// INT n.
    Software,
    /// INT3 / INTO: software exceptions (gate DPL checked).
    SoftException,
    /// INT1 (ICEBP): no DPL check.
    Privileged,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Class {
    Benign,
    Contributory,
    PageFault,
}

/// Fault-class exceptions push RFLAGS with RF set (so IRET back to the faulting
/// instruction does not re-trigger an instruction breakpoint).
fn pushes_rf(kind: Kind, v: u8) -> bool {
    kind == Kind::Exception
        && !matches!(
            v,
            vector::DB | vector::NMI | vector::BP | vector::OF | vector::DF | vector::MC
        )
}

fn class(v: u8) -> Class {
    match v {
        vector::DE | vector::TS | vector::NP | vector::SS | vector::GP => Class::Contributory,
        vector::PF => Class::PageFault,
        _ => Class::Benign,
    }
}

impl Cpu {
    /// Deliver a processor exception at the current instruction (RIP = faulting
    /// instruction), applying the double-fault rules. Err = shutdown reason.
    pub(crate) fn deliver_exception(&mut self, e: Exc) -> Result<(), String> {
        let mut cur = e;
        for _ in 0..8 {
            let ec = if self.mode == Mode::Real {
                None
            } else {
                cur.error_code()
            };
            let ret = self.rip;
            match self.deliver_event(cur.vector, ec, Kind::Exception, ret) {
                Ok(()) => return Ok(()),
                Err(Stop::Exc(e2)) => {
                    if cur.vector == vector::DF {
                        return Err(format!(
                            "triple fault: exception {} while delivering a double fault (rip {:#x})",
                            e2.vector, self.rip
                        ));
                    }
                    let (c1, c2) = (class(cur.vector), class(e2.vector));
                    cur = if (c1 == Class::Contributory && c2 == Class::Contributory)
                        || (c1 == Class::PageFault && c2 != Class::Benign)
                    {
                        Exc::ec(vector::DF, 0)
                    } else {
                        e2
                    };
                }
                Err(_) => {
                    return Err(format!(
                        "exception {} could not be delivered (IDT or stack outside RAM)",
                        cur.vector
                    ))
                }
            }
        }
        Err(format!("exception {} could not be delivered", e.vector))
    }

    /// A fault while delivering an external interrupt (benign class): deliver the fault.
    pub(crate) fn fault_during_delivery(&mut self, _first: u8, e: Exc) -> Result<(), String> {
        self.deliver_exception(e)
    }

    /// Deliver `vector` through the IDT/IVT; on success RIP/CS/RSP/RFLAGS point at the
    /// handler. `ret` is the RIP to push.
    pub(crate) fn deliver_event(&mut self, vector: u8, ec: Option<u32>, kind: Kind, ret: u64) -> R {
        self.flush_flags();
        let r = match self.mode {
            Mode::Real => self.deliver_real(vector, ret),
            Mode::Long64 | Mode::Compat16 | Mode::Compat32 => {
                self.deliver_long(vector, ec, kind, ret)
            }
            _ => self.deliver_prot(vector, ec, kind, ret),
        };
        if r.is_ok() {
            self.halted = false;
            self.pending |= crate::P_FLUSH;
        }
        r
    }

    fn deliver_real(&mut self, vector: u8, ret: u64) -> R {
        let idx = vector as u64 * 4;
        if idx + 3 > self.idtr.limit as u64 {
            return crate::gp0();
        }
        let ent = self.rd_sys(self.idtr.base.wrapping_add(idx), 4)?;
        let fl = self.get_rflags();
        let saved_sp = self.gpr[4];
        let cs = self.seg[CS].selector as u64;
        let r = (|| -> R {
            self.push(fl & 0xffff, 2)?;
            self.push(cs, 2)?;
            self.push(ret & 0xffff, 2)
        })();
        if let Err(e) = r {
            self.gpr[4] = saved_sp;
            return Err(e);
        }
        self.rflags &= !(IF | TF | AC);
        let sel = (ent >> 16) as u16;
        self.seg[CS].selector = sel;
        self.seg[CS].base = (sel as u64) << 4;
        self.update_seg_bases();
        self.rip = ent & 0xffff;
        self.cache.flush_lookup();
        Ok(())
    }

    fn idt_err(vector: u8, ext: u32) -> Stop {
        Stop::Exc(Exc::ec(vector::GP, vector as u32 * 8 + 2 + ext))
    }

    /// Load and check the target code segment of a gate. Returns (segment, new CPL).
    fn gate_cs(&mut self, sel: u16, ext: u32, long: bool) -> R<(Segment, u8)> {
        if sel & !3 == 0 {
            return Err(Stop::Exc(Exc::ec(vector::GP, ext)));
        }
        let d = self
            .read_descriptor(sel)
            .map_err(|_| Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32 + ext)))?;
        let s = Segment::from_descriptor(sel, d.0, None);
        let a = s.attrib;
        let err = Stop::Exc(Exc::ec(vector::GP, (sel & !3) as u32 + ext));
        if !a.is_code() || a.dpl() > self.cpl || (long && (!a.long() || a.db())) {
            return Err(err);
        }
        if !a.present() {
            return Err(Stop::Exc(Exc::ec(vector::NP, (sel & !3) as u32 + ext)));
        }
        let conforming = a.seg_type() & 4 != 0;
        let cpl = if conforming { self.cpl } else { a.dpl() };
        let mut s = s;
        s.selector = (sel & !3) | cpl as u16;
        s.attrib = SegmentAttributes(a.0 | 1);
        Ok((s, cpl))
    }

    fn tss_read(&mut self, off: u64, size: usize) -> R<u64> {
        if off + size as u64 - 1 > self.tr.limit as u64 {
            return Err(Stop::Exc(Exc::ec(
                vector::TS,
                (self.tr.selector & !3) as u32,
            )));
        }
        self.rd_sys(self.tr.base.wrapping_add(off), size)
    }

    fn deliver_long(&mut self, vector: u8, ec: Option<u32>, kind: Kind, ret: u64) -> R {
        let ext = matches!(kind, Kind::External | Kind::Exception) as u32;
        let idx = vector as u64 * 16;
        if idx + 15 > self.idtr.limit as u64 {
            return Err(Self::idt_err(vector, ext));
        }
        let lo = self.rd_sys(self.idtr.base.wrapping_add(idx), 8)?;
        let hi = self.rd_sys(self.idtr.base.wrapping_add(idx + 8), 8)?;
        let ty = (lo >> 40) & 0xf;
        if ty != 0xe && ty != 0xf {
            return Err(Self::idt_err(vector, ext));
        }
        let dpl = ((lo >> 45) & 3) as u8;
        if matches!(kind, Kind::Software | Kind::SoftException) && dpl < self.cpl {
            return Err(Self::idt_err(vector, 0));
        }
        if lo & (1 << 47) == 0 {
            return Err(Stop::Exc(Exc::ec(vector::NP, vector as u32 * 8 + 2 + ext)));
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let target = (lo & 0xffff) | ((lo >> 48) << 16) | (hi << 32);
        let ist = (lo >> 32) & 7;
        let (cs, new_cpl) = self.gate_cs(sel, ext, true)?;
        let old_cpl = self.cpl;
        let switch = new_cpl < old_cpl;
        let mut rsp = if ist != 0 {
            self.tss_read(0x24 + 8 * (ist - 1), 8)?
        } else if switch {
            self.tss_read(4 + 8 * new_cpl as u64, 8)?
        } else {
            self.gpr[4]
        };
        if ((target as i64) << 16 >> 16) as u64 != target {
            return Err(Stop::Exc(Exc::ec(vector::GP, ext)));
        }
        rsp &= !0xf;
        let fl = self.get_rflags();
        let pushed_fl = if pushes_rf(kind, vector) { fl | RF } else { fl };
        let mut frame = [
            self.seg[SS].selector as u64,
            self.gpr[4],
            pushed_fl,
            self.seg[CS].selector as u64,
            ret,
            0,
        ];
        let n = if let Some(c) = ec {
            frame[5] = c as u64;
            6
        } else {
            5
        };
        // Write the frame at the new privilege before changing any state.
        let user = new_cpl == 3;
        for (k, v) in frame[..n].iter().enumerate() {
            let a = rsp.wrapping_sub(8 * (k as u64 + 1));
            if user {
                self.wr_lin::<8>(a, *v)?;
            } else {
                self.wr_sys(a, 8, *v)?;
            }
        }
        rsp = rsp.wrapping_sub(8 * n as u64);
        let mut newf = fl & !(TF | NT | RF | VM);
        if ty == 0xe {
            newf &= !IF;
        }
        self.set_rflags_raw(newf);
        if switch {
            self.seg[SS] = Segment {
                selector: new_cpl as u16,
                base: 0,
                limit: 0xffff_ffff,
                attrib: SegmentAttributes::new(0x3, true, new_cpl, true, false, true, true),
            };
        }
        self.gpr[4] = rsp;
        self.seg[CS] = cs;
        self.cpl = new_cpl;
        self.mode_changed_keep_cpl();
        self.rip = target;
        Ok(())
    }

    fn deliver_prot(&mut self, vector: u8, ec: Option<u32>, kind: Kind, ret: u64) -> R {
        let ext = matches!(kind, Kind::External | Kind::Exception) as u32;
        let idx = vector as u64 * 8;
        if idx + 7 > self.idtr.limit as u64 {
            return Err(Self::idt_err(vector, ext));
        }
        let lo = self.rd_sys(self.idtr.base.wrapping_add(idx), 8)?;
        let ty = (lo >> 40) & 0xf;
        let wide = match ty {
            0xe | 0xf => true,
            0x6 | 0x7 => false,
            _ => return Err(Self::idt_err(vector, ext)),
        };
        let dpl = ((lo >> 45) & 3) as u8;
        if matches!(kind, Kind::Software | Kind::SoftException) && dpl < self.cpl {
            return Err(Self::idt_err(vector, 0));
        }
        if lo & (1 << 47) == 0 {
            return Err(Stop::Exc(Exc::ec(vector::NP, vector as u32 * 8 + 2 + ext)));
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let target = if wide {
            (lo & 0xffff) | ((lo >> 48) << 16)
        } else {
            lo & 0xffff
        };
        let (cs, new_cpl) = self.gate_cs(sel, ext, false)?;
        let old_cpl = self.cpl;
        let fl = self.get_rflags();
        let old_ss = self.seg[SS];
        let old_sp = self.gpr[4];
        let old_cs_sel = self.seg[CS].selector;
        let w = if wide { 4 } else { 2 };
        let mut frame: Vec<u64> = Vec::with_capacity(6);
        if new_cpl < old_cpl {
            let sp = self.tss_read(4 + 8 * new_cpl as u64, 4)?;
            let ss = self.tss_read(8 + 8 * new_cpl as u64, 2)? as u16;
            self.load_ss_for(ss, new_cpl).map_err(|e| match e {
                Stop::Exc(x) => Stop::Exc(Exc::ec(vector::TS, x.error_code().unwrap_or(0))),
                o => o,
            })?;
            self.gpr[4] = sp;
            frame.push(old_ss.selector as u64);
            frame.push(old_sp);
        }
        frame.push(if pushes_rf(kind, vector) { fl | RF } else { fl });
        frame.push(old_cs_sel as u64);
        frame.push(ret);
        if let Some(c) = ec {
            frame.push(c as u64);
        }
        let cpl_save = self.cpl;
        self.set_cpl(new_cpl);
        let sm = self.stack_mask();
        let mut sp = self.gpr[4];
        let mut res = Ok(());
        for v in &frame {
            sp = sp.wrapping_sub(w) & sm;
            let r = self.wr_sz(SS, sp, w as u8, *v);
            if r.is_err() {
                res = r;
                break;
            }
        }
        if let Err(e) = res {
            self.seg[SS] = old_ss;
            self.gpr[4] = old_sp;
            self.set_cpl(cpl_save);
            self.update_seg_bases();
            return Err(e);
        }
        self.gpr[4] = (self.gpr[4] & !sm) | sp;
        let mut newf = fl & !(TF | NT | RF | VM);
        if ty & 1 == 0 {
            newf &= !IF;
        }
        self.set_rflags_raw(newf);
        self.seg[CS] = cs;
        self.cpl = new_cpl;
        self.mode_changed_keep_cpl();
        self.rip = target;
        Ok(())
    }
}
