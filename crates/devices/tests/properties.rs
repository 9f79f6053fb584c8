//! Property tests: arbitrary guest port traffic never panics, and snapshots taken at any
//! point continue exactly like the uninterrupted devices.

use esvm_devices::pit::ticks_to_ns;
use esvm_devices::{Devices, DevicesState, Pit, SharedBuffer};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { port: u16, width: usize, value: u32 },
    Read { port: u16, width: usize },
    Advance(u64),
    Ack,
    Input(Vec<u8>),
}

const INTERESTING: &[u16] = &[
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0xf4, 0xf5, 0x3f8, 0x3f9, 0x3fa, 0x3fb,
    0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x70, 0x71, 0x60, 0x64, 0x80, 0xcf8, 0xcfb, 0xcfc, 0xcfe,
];

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        8 => proptest::sample::select(INTERESTING),
        1 => any::<u16>(),
    ]
}

fn width() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(1usize), 1 => Just(2usize), 1 => Just(4usize), 1 => 0usize..8]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (port(), width(), any::<u32>()).prop_map(|(port, width, value)| Op::Write { port, width, value }),
        4 => (port(), width()).prop_map(|(port, width)| Op::Read { port, width }),
        3 => prop_oneof![
            6 => 0u64..2_000_000,
            2 => 0u64..200_000_000,
            1 => any::<u64>(),
        ].prop_map(Op::Advance),
        2 => Just(Op::Ack),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Op::Input),
    ]
}

/// Apply one op; returns what the guest / VMM observes.
fn apply(d: &mut Devices, op: &Op) -> Vec<u64> {
    let mut obs = Vec::new();
    match op {
        Op::Write { port, width, value } => {
            let bytes = value.to_le_bytes();
            let data = &bytes[..(*width).min(4)];
            obs.push(u64::from(d.io_write(*port, data).is_ok()));
        }
        Op::Read { port, width } => {
            let mut data = vec![0u8; *width];
            let ok = d.io_read(*port, &mut data).is_ok();
            obs.push(u64::from(ok));
            obs.extend(data.iter().map(|b| u64::from(*b)));
        }
        Op::Advance(delta) => {
            d.advance_to(d.now_ns().saturating_add(*delta));
            obs.push(d.now_ns());
        }
        Op::Ack => {
            obs.push(d.pending_interrupt().map_or(999, u64::from));
            obs.push(u64::from(d.acknowledge_interrupt()));
        }
        Op::Input(bytes) => obs.push(d.enqueue_serial_input(bytes) as u64),
    }
    obs.push(d.next_deadline_ns().unwrap_or(u64::MAX));
    obs.push(d.pending_interrupt().map_or(999, u64::from));
    obs.push(d.take_exit_request().map_or(999, u64::from));
    obs.push(u64::from(d.take_reset_request()));
    obs
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_port_traffic_never_panics(ops in proptest::collection::vec(op(), 0..300)) {
        let mut d = Devices::new(Box::new(std::io::sink()));
        for op in &ops {
            apply(&mut d, op);
            if let Some(deadline) = d.next_deadline_ns() {
                prop_assert!(deadline > d.now_ns());
            }
        }
        // The state always survives a serde round trip and restores.
        let json = serde_json::to_string(&d.save()).unwrap();
        let st: DevicesState = serde_json::from_str(&json).unwrap();
        let r = Devices::from_state(&st, Box::new(std::io::sink())).unwrap();
        prop_assert_eq!(r.save(), d.save());
    }

    #[test]
    fn snapshot_anywhere_continues_identically(
        ops in proptest::collection::vec(op(), 1..200),
        cut_frac in 0.0f64..1.0,
    ) {
        let cut = ((ops.len() as f64) * cut_frac) as usize;
        let buf_a = SharedBuffer::new();
        let mut a = Devices::new(Box::new(buf_a.clone()));
        let trace_a: Vec<Vec<u64>> = ops.iter().map(|op| apply(&mut a, op)).collect();

        let buf_b = SharedBuffer::new();
        let mut b = Devices::new(Box::new(buf_b.clone()));
        let mut trace_b: Vec<Vec<u64>> = ops[..cut].iter().map(|op| apply(&mut b, op)).collect();
        let json = serde_json::to_string(&b.save()).unwrap();
        let st: DevicesState = serde_json::from_str(&json).unwrap();
        let buf_c = SharedBuffer::new();
        let mut c = Devices::from_state(&st, Box::new(buf_c.clone())).unwrap();
        trace_b.extend(ops[cut..].iter().map(|op| apply(&mut c, op)));

        prop_assert_eq!(trace_a, trace_b);
        let mut out = buf_b.contents();
        out.extend(buf_c.contents());
        prop_assert_eq!(buf_a.contents(), out);
        prop_assert_eq!(a.save(), c.save());
    }

    /// For every counting mode and count, channel 0's deadline is exactly the first instant
    /// at which advancing reports an IRQ 0 edge.
    #[test]
    fn pit_deadline_is_the_first_edge(
        mode in prop_oneof![Just(0u8), Just(2u8), Just(3u8), Just(4u8)],
        count in any::<u16>(),
        bcd in any::<bool>(),
        start in 0u64..10_000_000_000,
        rounds in 1usize..5,
    ) {
        let mut pit = Pit::new();
        pit.advance_to(start);
        pit.write_reg(3, 0x30 | (mode << 1) | u8::from(bcd));
        pit.write_reg(0, count as u8);
        pit.write_reg(0, (count >> 8) as u8);
        for _ in 0..rounds {
            let Some(deadline) = pit.next_deadline_ns() else {
                prop_assert!(matches!(mode, 0 | 4), "periodic modes always have a deadline");
                break;
            };
            prop_assert!(deadline > pit.now_ns());
            prop_assert_eq!(pit.advance_to(deadline - 1), 0);
            prop_assert_eq!(pit.advance_to(deadline), 1);
        }
        // Deadlines are on the tick grid.
        if let Some(d) = pit.next_deadline_ns() {
            let t = esvm_devices::pit::ns_to_ticks(d);
            prop_assert_eq!(ticks_to_ns(t), d);
        }
    }
}
