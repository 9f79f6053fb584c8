//! Throughput measurements of LAUNCH_UPDATE_DATA and SEND/RECEIVE_UPDATE_DATA
//! beside the machine's own limit, measured in the same run with the same
//! crates on the same buffers (raw AES-128-CTR, HMAC-SHA256 and SHA-256).
//!
//! A page re-wrap (SEND or RECEIVE) is one AES-128-CTR pass plus one
//! HMAC-SHA256 pass over the data, so its per-core limit is
//! `1 / (1/aes + 1/hmac)`; LAUNCH_UPDATE_DATA is a SHA-256 pass, so its
//! limit is the raw SHA-256 rate. `esvm bench psp` prints [`BenchFigures`].

use std::time::{Duration, Instant};

use aes::cipher::{KeyIvInit, StreamCipher};
use hmac::Mac;
use sha2::{Digest, Sha256};

use crate::crypto::{new_hmac, random_array, Aes128Ctr};
use crate::memory::{FlatMemory, GuestMemoryAccess};
use crate::nv::{EmulatedAmdCa, FirmwareVersion};
use crate::platform::{LaunchStart, Psp};
use crate::session::{PacketHeader, Policy};

/// What to measure.
#[derive(Copy, Clone, Debug)]
pub struct BenchConfig {
    /// Guest memory moved per round, in bytes.
    pub buffer_bytes: usize,
    /// Bytes per packet (one SEND_UPDATE_DATA call).
    pub packet_bytes: usize,
    /// Worker threads for SEND/RECEIVE.
    pub threads: usize,
    /// Rounds; the best round is reported.
    pub rounds: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            buffer_bytes: 256 << 20,
            packet_bytes: 4096,
            threads: 1,
            rounds: 3,
        }
    }
}

/// Results, in GiB/s (2^30 bytes per second).
#[derive(Copy, Clone, Debug)]
pub struct BenchFigures {
    /// The configuration measured.
    pub config: BenchConfig,
    /// Raw AES-128-CTR on one core (packet-sized calls, fresh IV each).
    pub raw_aes_ctr: f64,
    /// Raw HMAC-SHA256 on one core (packet-sized calls).
    pub raw_hmac_sha256: f64,
    /// Raw SHA-256 on one core (streamed over the buffer).
    pub raw_sha256: f64,
    /// Per-core limit of a page re-wrap: 1 / (1/aes + 1/hmac).
    pub rewrap_limit: f64,
    /// Raw re-wrap (AES-128-CTR then HMAC-SHA256 per packet, no firmware)
    /// measured with `threads` threads at once: the machine's limit for the
    /// SEND/RECEIVE figures, taken in the same run under the same load.
    pub raw_rewrap_threads: f64,
    /// LAUNCH_UPDATE_DATA over the whole buffer (one core).
    pub launch_update_data: f64,
    /// SEND_UPDATE_DATA with `threads` workers.
    pub send_update_data: f64,
    /// RECEIVE_UPDATE_DATA with `threads` workers.
    pub receive_update_data: f64,
}

impl BenchFigures {
    /// SEND rate as a fraction of the raw re-wrap rate with as many threads.
    pub fn send_efficiency(&self) -> f64 {
        self.send_update_data / self.raw_rewrap_threads
    }
    /// RECEIVE rate as a fraction of the raw re-wrap rate with as many threads.
    pub fn receive_efficiency(&self) -> f64 {
        self.receive_update_data / self.raw_rewrap_threads
    }
    /// LAUNCH_UPDATE_DATA as a fraction of the raw SHA-256 rate.
    pub fn launch_efficiency(&self) -> f64 {
        self.launch_update_data / self.raw_sha256
    }
}

impl std::fmt::Display for BenchFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "buffer {} MiB, packets {} B, {} thread(s), best of {} round(s)",
            c.buffer_bytes >> 20,
            c.packet_bytes,
            c.threads,
            c.rounds
        )?;
        writeln!(
            f,
            "raw AES-128-CTR (1 core)      {:7.2} GiB/s",
            self.raw_aes_ctr
        )?;
        writeln!(
            f,
            "raw HMAC-SHA256 (1 core)      {:7.2} GiB/s",
            self.raw_hmac_sha256
        )?;
        writeln!(
            f,
            "raw SHA-256 (1 core)          {:7.2} GiB/s",
            self.raw_sha256
        )?;
        writeln!(
            f,
            "re-wrap limit (1 core)        {:7.2} GiB/s",
            self.rewrap_limit
        )?;
        writeln!(
            f,
            "raw re-wrap x{} (measured)     {:7.2} GiB/s",
            c.threads, self.raw_rewrap_threads
        )?;
        writeln!(
            f,
            "LAUNCH_UPDATE_DATA            {:7.2} GiB/s  ({:.0}% of SHA-256)",
            self.launch_update_data,
            100.0 * self.launch_efficiency()
        )?;
        writeln!(
            f,
            "SEND_UPDATE_DATA    x{}        {:7.2} GiB/s  ({:.0}% of raw re-wrap x{})",
            c.threads,
            self.send_update_data,
            100.0 * self.send_efficiency(),
            c.threads
        )?;
        write!(
            f,
            "RECEIVE_UPDATE_DATA x{}        {:7.2} GiB/s  ({:.0}% of raw re-wrap x{})",
            c.threads,
            self.receive_update_data,
            100.0 * self.receive_efficiency(),
            c.threads
        )
    }
}

fn gibs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / (1u64 << 30) as f64
}

fn fill(mem: &FlatMemory, len: usize) -> Result<(), String> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let n = chunk.len().min(len - off);
        mem.write(off as u64, &chunk[..n])
            .map_err(|e| e.to_string())?;
        off += n;
    }
    Ok(())
}

/// Raw one-core rates of AES-128-CTR, HMAC-SHA256 (packet-sized calls) and
/// SHA-256 over `buf`.
fn raw_rates(buf: &mut [u8], packet: usize) -> (f64, f64, f64) {
    let key: [u8; 16] = random_array();
    let t = Instant::now();
    for (i, chunk) in buf.chunks_mut(packet).enumerate() {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&(i as u64).to_le_bytes());
        Aes128Ctr::new(&key.into(), &iv.into()).apply_keystream(chunk);
    }
    let aes = gibs(buf.len(), t.elapsed());
    let proto = new_hmac(&key);
    let t = Instant::now();
    let mut acc = 0u8;
    for chunk in buf.chunks(packet) {
        let mut m = proto.clone();
        m.update(chunk);
        acc ^= m.finalize().into_bytes()[0];
    }
    let hmac = gibs(buf.len(), t.elapsed());
    let t = Instant::now();
    let d = Sha256::digest(&*buf);
    let sha = gibs(buf.len(), t.elapsed());
    std::hint::black_box((acc, d));
    (aes, hmac, sha)
}

/// Raw re-wrap with `threads` threads: AES-128-CTR then HMAC-SHA256 over
/// each packet of `buf`, the crypto a SEND or RECEIVE does, without the firmware.
fn raw_rewrap(buf: &mut [u8], packet: usize, threads: usize) -> f64 {
    let key: [u8; 16] = random_array();
    let proto = new_hmac(&key);
    let per = buf.len().div_ceil(packet).div_ceil(threads) * packet;
    let len = buf.len();
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in buf.chunks_mut(per) {
            let proto = proto.clone();
            s.spawn(move || {
                let mut acc = 0u8;
                for (i, chunk) in part.chunks_mut(packet).enumerate() {
                    let mut iv = [0u8; 16];
                    iv[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    Aes128Ctr::new(&key.into(), &iv.into()).apply_keystream(chunk);
                    let mut m = proto.clone();
                    m.update(chunk);
                    acc ^= m.finalize().into_bytes()[0];
                }
                std::hint::black_box(acc);
            });
        }
    });
    gibs(len, t.elapsed())
}

/// Runs the measurements. Takes a few seconds for the default 256 MiB.
pub fn run(cfg: BenchConfig) -> Result<BenchFigures, String> {
    let cfg = BenchConfig {
        buffer_bytes: cfg.buffer_bytes.max(cfg.packet_bytes) / cfg.packet_bytes * cfg.packet_bytes,
        threads: cfg.threads.max(1),
        rounds: cfg.rounds.max(1),
        ..cfg
    };
    if cfg.packet_bytes == 0 || cfg.packet_bytes > crate::transport::MAX_PACKET_LEN {
        return Err(format!(
            "packet size must be 1..={} bytes",
            crate::transport::MAX_PACKET_LEN
        ));
    }
    let len = cfg.buffer_bytes;
    let pkt = cfg.packet_bytes;
    let ca = EmulatedAmdCa::generate(2048).map_err(|e| e.to_string())?;
    let mut src = Psp::ephemeral(&ca, FirmwareVersion::default()).map_err(|e| e.to_string())?;
    let mut dst = Psp::ephemeral(&ca, FirmwareVersion::default()).map_err(|e| e.to_string())?;
    src.init().map_err(|e| e.to_string())?;
    dst.init().map_err(|e| e.to_string())?;
    let src_mem = FlatMemory::new(len);
    let dst_mem = FlatMemory::new(len);
    fill(&src_mem, len)?;
    // Fault in every buffer before any timing: first-touch page faults would otherwise
    // count against whichever measurement writes a buffer first.
    fill(&dst_mem, len)?;
    let target = dst.pdh_cert_export().map_err(|e| e.to_string())?.to_bytes();
    let npk = len / pkt;
    let mut out = vec![1u8; len];
    let mut headers = vec![PacketHeader::default(); npk];
    let (mut best_launch, mut best_send, mut best_recv) = (0f64, 0f64, 0f64);
    // The raw limits are measured in the same rounds, right after the firmware figures,
    // so both see the same load on the machine (their ratios are not skewed by the load
    // changing between two separate series).
    let (mut aes, mut hmac, mut sha, mut rewrap) = (0f64, 0f64, 0f64, 0f64);
    let e = |e: crate::PspError| e.to_string();
    for _ in 0..cfg.rounds {
        let h = src
            .launch_start(&LaunchStart {
                policy: Policy(0),
                owner: None,
                share_key_with: None,
            })
            .map_err(e)?;
        src.activate(h, 1).map_err(e)?;
        let t = Instant::now();
        src.launch_update_data(h, &src_mem, 0, len).map_err(e)?;
        best_launch = best_launch.max(gibs(len, t.elapsed()));
        src.launch_measure(h).map_err(e)?;
        src.launch_finish(h).map_err(e)?;
        let so = src.send_start(h, &target).map_err(e)?;
        let r = dst
            .receive_start(so.policy, so.pdh.as_bytes(), &so.session.to_bytes())
            .map_err(e)?;
        dst.activate(r, 1).map_err(e)?;
        let sw = src.send_worker(h).map_err(e)?;
        let rw = dst.receive_worker(r).map_err(e)?;
        let per = npk.div_ceil(cfg.threads);

        let t = Instant::now();
        std::thread::scope(|s| -> Result<(), String> {
            let mut joins = Vec::new();
            for (ti, (o, hs)) in out
                .chunks_mut(per * pkt)
                .zip(headers.chunks_mut(per))
                .enumerate()
            {
                let sw = sw.clone();
                let mem = &src_mem;
                joins.push(s.spawn(move || -> Result<(), String> {
                    for (j, (c, hd)) in o.chunks_mut(pkt).zip(hs.iter_mut()).enumerate() {
                        let gpa = ((ti * per + j) * pkt) as u64;
                        *hd = sw
                            .send_update_data_into(mem, gpa, c)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }));
            }
            for j in joins {
                j.join().map_err(|_| "send worker panicked".to_string())??;
            }
            Ok(())
        })?;
        best_send = best_send.max(gibs(len, t.elapsed()));

        let t = Instant::now();
        std::thread::scope(|s| -> Result<(), String> {
            let mut joins = Vec::new();
            for (ti, (o, hs)) in out.chunks(per * pkt).zip(headers.chunks(per)).enumerate() {
                let rw = rw.clone();
                let mem = &dst_mem;
                joins.push(s.spawn(move || -> Result<(), String> {
                    for (j, (c, hd)) in o.chunks(pkt).zip(hs.iter()).enumerate() {
                        let gpa = ((ti * per + j) * pkt) as u64;
                        rw.receive_update_data(mem, gpa, hd, c)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }));
            }
            for j in joins {
                j.join()
                    .map_err(|_| "receive worker panicked".to_string())??;
            }
            Ok(())
        })?;
        best_recv = best_recv.max(gibs(len, t.elapsed()));

        let (x, y, z) = raw_rates(&mut out, pkt);
        aes = aes.max(x);
        hmac = hmac.max(y);
        sha = sha.max(z);
        rewrap = rewrap.max(raw_rewrap(&mut out, pkt, cfg.threads));

        let tag = src.send_finish(h).map_err(e)?;
        dst.receive_finish(r, &tag).map_err(e)?;
        for (p, g) in [(&mut src, h), (&mut dst, r)] {
            p.deactivate(g).map_err(e)?;
            p.decommission(g).map_err(e)?;
        }
    }
    // Sanity: the destination holds the source's memory.
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = a.len().min(len - off);
        src_mem
            .read(off as u64, &mut a[..n])
            .map_err(|e| e.to_string())?;
        dst_mem
            .read(off as u64, &mut b[..n])
            .map_err(|e| e.to_string())?;
        if a[..n] != b[..n] {
            return Err(format!("received memory differs near offset 0x{off:x}"));
        }
        off += n;
    }
    Ok(BenchFigures {
        config: cfg,
        raw_aes_ctr: aes,
        raw_hmac_sha256: hmac,
        raw_sha256: sha,
        rewrap_limit: 1.0 / (1.0 / aes + 1.0 / hmac),
        raw_rewrap_threads: rewrap,
        launch_update_data: best_launch,
        send_update_data: best_send,
        receive_update_data: best_recv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_produces_positive_figures() {
        let f = run(BenchConfig {
            buffer_bytes: 1 << 20,
            packet_bytes: 4096,
            threads: 2,
            rounds: 1,
        })
        .unwrap();
        for v in [
            f.raw_aes_ctr,
            f.raw_hmac_sha256,
            f.raw_sha256,
            f.launch_update_data,
            f.send_update_data,
            f.receive_update_data,
        ] {
            assert!(v.is_finite() && v > 0.0);
        }
        assert!(f.rewrap_limit < f.raw_hmac_sha256);
        assert!(f.raw_rewrap_threads > 0.0);
        assert!(f.to_string().contains("SEND_UPDATE_DATA"));
    }
}
