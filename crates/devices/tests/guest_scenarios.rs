//! Scenario tests: the devices driven the way a guest kernel and the VMM drive them.

use esvm_devices::pit::{ns_to_ticks, ticks_to_ns};
use esvm_devices::{Devices, DevicesState, Pic, Serial, SharedBuffer, PIT_FREQUENCY_HZ};

fn outb(d: &mut Devices, port: u16, v: u8) {
    d.io_write(port, &[v]).unwrap();
}

fn inb(d: &mut Devices, port: u16) -> u8 {
    let mut b = [0u8];
    d.io_read(port, &mut b).unwrap();
    b[0]
}

/// The 8259A programming of Linux's init_8259A / SeaBIOS: vectors 0x20 and 0x28.
fn init_pics(d: &mut Devices) {
    for (p, v) in [
        (0x21, 0xff),
        (0xa1, 0xff),
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 0x02),
        (0xa1, 0x01),
    ] {
        outb(d, p, v);
    }
}

/// COM1 at 115200 8N1 with OUT2, as the Linux 8250 driver sets it up.
fn init_serial(d: &mut Devices, ier: u8) {
    outb(d, 0x3fb, 0x80);
    outb(d, 0x3f8, 0x01);
    outb(d, 0x3f9, 0x00);
    outb(d, 0x3fb, 0x03);
    outb(d, 0x3fc, 0x0b);
    outb(d, 0x3f9, ier);
}

fn puts(d: &mut Devices, s: &[u8]) {
    for &b in s {
        // Polled output: wait for THRE like a early console does.
        assert_ne!(inb(d, 0x3fd) & 0x20, 0, "THR must be empty");
        outb(d, 0x3f8, b);
    }
}

#[test]
fn periodic_timer_tick_at_100hz_with_console_output() {
    let buf = SharedBuffer::new();
    let mut d = Devices::new(Box::new(buf.clone()));
    init_pics(&mut d);
    init_serial(&mut d, 0x00);
    // PIT channel 0, rate generator, LATCH for HZ=100.
    let latch: u64 = PIT_FREQUENCY_HZ.div_ceil(100);
    outb(&mut d, 0x43, 0x34);
    outb(&mut d, 0x40, (latch & 0xff) as u8);
    outb(&mut d, 0x40, (latch >> 8) as u8);
    outb(&mut d, 0x21, 0xfe); // unmask IRQ0 only

    // The VMM loop: run the vCPU up to the next deadline, then deliver.
    let mut ticks = 0u64;
    let mut last = 0u64;
    while let Some(deadline) = d.next_deadline_ns() {
        if deadline > 1_000_000_000 {
            break;
        }
        assert!(deadline > last, "deadlines move forward");
        last = deadline;
        d.advance_to(deadline - 1);
        assert_eq!(d.pending_interrupt(), None, "nothing before the deadline");
        d.advance_to(deadline);
        assert_eq!(d.acknowledge_interrupt(), 0x20);
        ticks += 1;
        if ticks.is_multiple_of(10) {
            puts(&mut d, b"T");
        }
        outb(&mut d, 0x20, 0x20);
    }
    // Written in tick 0, loaded at edge 1, edges at 1 + k * latch within one second.
    let expected = (ns_to_ticks(1_000_000_000) - 1) / latch;
    assert_eq!(ticks, expected);
    assert_eq!(buf.contents(), vec![b'T'; (expected / 10) as usize]);
    assert_eq!(d.bus_stats().unclaimed_writes, 0);
}

#[test]
fn linux_style_pit_calibration_on_channel_2() {
    let mut d = Devices::new(Box::new(std::io::sink()));
    let start = 3_000_000u64;
    d.advance_to(start);
    // Gate high, speaker off; channel 2 mode 0, 50 ms worth of ticks.
    let v = inb(&mut d, 0x61);
    outb(&mut d, 0x61, (v & !0x02) | 0x01);
    let cal_latch = PIT_FREQUENCY_HZ / 20;
    outb(&mut d, 0x43, 0xb0);
    outb(&mut d, 0x42, (cal_latch & 0xff) as u8);
    outb(&mut d, 0x42, (cal_latch >> 8) as u8);
    // Busy-poll OUT2 with the vCPU's clock advancing 1 us per iteration.
    let mut now = start;
    let mut polls = 0u64;
    while inb(&mut d, 0x61) & 0x20 == 0 {
        now += 1_000;
        d.advance_to(now);
        polls += 1;
        assert!(polls < 1_000_000, "OUT2 never went high");
    }
    let edge = ticks_to_ns(ns_to_ticks(start) + 1 + cal_latch);
    assert!(
        now >= edge && now < edge + 1_000,
        "OUT2 rose at {now}, terminal count at {edge}"
    );
    // About 50 ms of virtual time.
    assert!((49_000..51_000).contains(&polls));
    // Channel 0 untouched: no timer interrupt scheduled.
    assert_eq!(d.next_deadline_ns(), None);
}

/// Linux's rtc-cmos with a 1024 Hz periodic interrupt (`hpet_rtc`-less x86): IRQ 8 arrives
/// through the slave PIC, and each handler reads register C to rearm it.
#[test]
fn rtc_periodic_interrupt_through_the_cascade() {
    let mut d = Devices::new(Box::new(std::io::sink()));
    init_pics(&mut d);
    outb(&mut d, 0x21, 0xfb); // the cascade only
    outb(&mut d, 0xa1, 0xfe); // IRQ 8
                              // Wall clock as mc146818_get_time reads it: UIP clear, then the time registers.
    outb(&mut d, 0x70, 0x0a);
    assert_eq!(
        inb(&mut d, 0x71) & 0x80,
        0,
        "no update in progress at time 0"
    );
    let read = |d: &mut Devices, reg: u8| {
        outb(d, 0x70, reg);
        inb(d, 0x71)
    };
    let date: Vec<u8> = [9, 8, 7, 4, 2, 0]
        .iter()
        .map(|r| read(&mut d, *r))
        .collect();
    assert_eq!(
        date,
        [0x26, 0x01, 0x01, 0x00, 0x00, 0x00],
        "2026-01-01 00:00:00"
    );
    // cmos_do_probe: 1024 Hz; then PIE on.
    outb(&mut d, 0x70, 0x0a);
    outb(&mut d, 0x71, 0x26);
    outb(&mut d, 0x70, 0x0b);
    outb(&mut d, 0x71, 0x42);
    let mut ticks = 0u64;
    while let Some(deadline) = d.next_deadline_ns() {
        if deadline > 1_000_000_000 {
            break;
        }
        d.advance_to(deadline);
        assert_eq!(d.acknowledge_interrupt(), 0x28, "IRQ 8 on the slave's base");
        assert_ne!(read(&mut d, 0x0c) & 0xc0, 0, "IRQF | PF");
        outb(&mut d, 0xa0, 0x20);
        outb(&mut d, 0x20, 0x20);
        ticks += 1;
    }
    assert_eq!(ticks, 1024);
    assert_eq!(read(&mut d, 0), 0x01, "one second later");
    // Without reading C, no second interrupt: the line stays high.
    d.advance_to(1_100_000_000);
    assert_eq!(d.acknowledge_interrupt(), 0x28);
    outb(&mut d, 0xa0, 0x20);
    outb(&mut d, 0x20, 0x20);
    d.advance_to(1_200_000_000);
    assert_eq!(d.pending_interrupt(), None);
    assert_eq!(d.next_deadline_ns(), None);
}

/// Linux 6.1's `pci_direct_probe` on esvm's empty bus (arch/x86/pci/direct.c): the type 1
/// address register works, `pci_sanity_check` (no DMI) finds neither a host bridge nor a
/// known vendor on bus 0, the type 2 registers are absent. Nothing panics or hangs.
#[test]
fn linux_pci_probe_finds_an_empty_bus() {
    let mut d = Devices::new(Box::new(std::io::sink()));
    let outl = |d: &mut Devices, port: u16, v: u32| d.io_write(port, &v.to_le_bytes()).unwrap();
    let inl = |d: &mut Devices, port: u16| {
        let mut b = [0u8; 4];
        d.io_read(port, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    let inw = |d: &mut Devices, port: u16| {
        let mut b = [0u8; 2];
        d.io_read(port, &mut b).unwrap();
        u16::from_le_bytes(b)
    };
    // pci_check_type1.
    outb(&mut d, 0xcfb, 0x01);
    let saved = inl(&mut d, 0xcf8);
    outl(&mut d, 0xcf8, 0x8000_0000);
    assert_eq!(inl(&mut d, 0xcf8), 0x8000_0000, "type 1 address register");
    // pci_sanity_check: class (reg 0x0a) and vendor (reg 0x00) of every devfn on bus 0.
    for devfn in 0..0x100u32 {
        outl(&mut d, 0xcf8, 0x8000_0000 | devfn << 8 | 0x08);
        assert_eq!(inw(&mut d, 0xcfc + 2), 0xffff, "class of 00:{devfn:02x}");
        outl(&mut d, 0xcf8, 0x8000_0000 | devfn << 8);
        assert_eq!(inw(&mut d, 0xcfc), 0xffff, "vendor of 00:{devfn:02x}");
    }
    outl(&mut d, 0xcf8, saved);
    assert_eq!(inl(&mut d, 0xcf8), 0);
    // pci_check_type2: the byte registers at 0xcf8 and 0xcfa read back 0xff, not 0.
    outb(&mut d, 0xcfb, 0x00);
    outb(&mut d, 0xcf8, 0x00);
    outb(&mut d, 0xcfa, 0x00);
    assert_eq!((inb(&mut d, 0xcf8), inb(&mut d, 0xcfa)), (0xff, 0xff));
    // The byte accesses were ordinary I/O that nobody answered.
    let s = d.bus_stats();
    assert_eq!((s.unclaimed_reads, s.unclaimed_writes), (2, 4));
}

/// A deterministic guest workload: timer at ~1.7 kHz, serial THRE interrupts, delayed EOIs,
/// counter reads. Returns everything the guest observed in this step.
fn guest_step(d: &mut Devices, i: u64) -> Vec<u64> {
    let mut log = Vec::new();
    let now = d.now_ns() + 180_000 + (i % 7) * 13_001;
    d.advance_to(now);
    log.push(now);
    log.push(d.next_deadline_ns().unwrap_or(u64::MAX));
    outb(d, 0x43, 0x00); // latch channel 0
    log.push(u64::from(inb(d, 0x40)));
    log.push(u64::from(inb(d, 0x40)));
    if d.pending_interrupt().is_some() {
        let v = d.acknowledge_interrupt();
        log.push(u64::from(v));
        if v == 0x24 {
            log.push(u64::from(inb(d, 0x3fa)));
        }
    }
    if i % 3 == 2 {
        outb(d, 0x20, 0x20);
    }
    if i.is_multiple_of(5) {
        outb(d, 0x3f8, b'a' + (i % 26) as u8);
    }
    if i % 11 == 4 {
        d.enqueue_serial_input(&[i as u8]);
        log.push(u64::from(inb(d, 0x3fd)));
    }
    if i % 13 == 6 {
        outb(d, 0x20, 0x0b);
        log.push(u64::from(inb(d, 0x20)));
        outb(d, 0x20, 0x0a);
        log.push(u64::from(inb(d, 0x20)));
    }
    log
}

fn boot_workload(d: &mut Devices) {
    init_pics(d);
    init_serial(d, 0x03);
    outb(d, 0x43, 0x34);
    outb(d, 0x40, 0xbc); // 700 = 0x2bc: ~1.7 kHz
    outb(d, 0x40, 0x02);
    outb(d, 0x21, 0xec); // IRQ0, IRQ1, IRQ4 unmasked
    outb(d, 0xa1, 0xff);
}

#[test]
fn snapshot_mid_activity_continues_identically() {
    // Find a step at which the timer is mid-count, an IRQ is in service and the UART has an
    // interrupt pending, so the snapshot really is taken in the middle of things.
    let mut probe = Devices::new(Box::new(std::io::sink()));
    boot_workload(&mut probe);
    let mut cut = None;
    for i in 0..200 {
        guest_step(&mut probe, i);
        let st = probe.save();
        let uart_pending = st.get::<Serial>("com1").unwrap().interrupt_identification & 1 == 0;
        let in_service = st.get::<Pic>("pic").unwrap().master.isr != 0;
        let counting = probe.next_deadline_ns().is_some();
        if uart_pending && in_service && counting {
            cut = Some(i + 1);
            break;
        }
    }
    let cut = cut.expect("workload reaches a busy state");
    let steps = cut + 150;

    // Uninterrupted run.
    let buf_a = SharedBuffer::new();
    let mut a = Devices::new(Box::new(buf_a.clone()));
    boot_workload(&mut a);
    let trace_a: Vec<Vec<u64>> = (0..steps).map(|i| guest_step(&mut a, i)).collect();

    // Run to the cut, snapshot through JSON, continue on a fresh instance.
    let buf_b = SharedBuffer::new();
    let mut b = Devices::new(Box::new(buf_b.clone()));
    boot_workload(&mut b);
    let mut trace_b: Vec<Vec<u64>> = (0..cut).map(|i| guest_step(&mut b, i)).collect();
    let json = serde_json::to_vec(&b.save()).unwrap();
    drop(b);
    let state: DevicesState = serde_json::from_slice(&json).unwrap();
    let buf_c = SharedBuffer::new();
    let mut c = Devices::from_state(&state, Box::new(buf_c.clone())).unwrap();
    assert_eq!(c.save(), state);
    trace_b.extend((cut..steps).map(|i| guest_step(&mut c, i)));

    assert_eq!(trace_a, trace_b);
    let mut out_bc = buf_b.contents();
    out_bc.extend(buf_c.contents());
    assert_eq!(buf_a.contents(), out_bc);
    assert!(
        !buf_c.contents().is_empty(),
        "the restored UART keeps transmitting"
    );
    assert_eq!(a.save(), c.save());
    // Timer interrupts were taken on both sides of the cut.
    let timer_after_cut = trace_a[cut as usize..]
        .iter()
        .filter(|s| s.get(4) == Some(&0x20))
        .count();
    assert!(timer_after_cut > 0);
}

#[test]
fn state_serialises_with_version() {
    let mut d = Devices::new(Box::new(std::io::sink()));
    boot_workload(&mut d);
    let json = serde_json::to_value(d.save()).unwrap();
    assert_eq!(json["version"], esvm_devices::DEVICES_STATE_VERSION);
    assert_eq!(json["devices"]["pit"]["version"], 1);
    assert!(
        json["devices"]["pit"]["state"]["channels"]
            .as_array()
            .unwrap()
            .len()
            == 3
    );
}
