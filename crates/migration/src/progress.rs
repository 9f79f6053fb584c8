//! Progress of an outgoing migration: a serialisable snapshot for status APIs, and a terminal
//! renderer on `indicatif`.

use crate::sender::{SendError, SendOutcome};
use indicatif::{BinaryBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Hello/Config exchange (and the SEV-ES session start).
    Handshake,
    /// Pre-copy passes while the guest runs.
    PreCopy,
    /// The guest is paused; the last dirty pages and the state are sent.
    StopAndCopy,
    /// Post-copy: the guest runs at the destination; the remaining pages are pushed in the
    /// background and on demand. The source is paused and can no longer resume.
    PostCopy,
    /// `Complete` was sent; waiting for the destination's commit.
    Committing,
    /// The destination committed; the source is dead.
    Completed,
    /// The migration failed; see the error.
    Failed,
}

/// A snapshot of an outgoing migration, reported through the sender's progress callback.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub phase: Phase,
    /// Current pass, from 1 (the full pass); 0 during the handshake.
    pub pass: u32,
    /// Pages scheduled for the current pass.
    pub pass_pages_total: u64,
    /// Pages of the current pass already sent.
    pub pass_pages_sent: u64,
    /// Dirty pages known and not yet sent (the rest of this pass plus what the last dirty
    /// log added).
    pub pages_remaining: u64,
    /// Pages sent in all passes.
    pub pages_sent: u64,
    /// Bytes written to the connection (headers included).
    pub bytes_sent: u64,
    /// Guest memory size in pages.
    pub mem_pages: u64,
    /// Measured transfer bandwidth (bytes per second, acknowledged data), 0 before the first
    /// pass ends.
    pub bandwidth_bytes_per_sec: f64,
    /// Pages the guest dirtied per second during the last pass.
    pub dirty_pages_per_sec: f64,
    /// Estimated downtime if stop-and-copy started now (remaining bytes / bandwidth).
    pub estimated_downtime_ms: Option<f64>,
    pub downtime_limit_ms: f64,
    /// The bandwidth cap in bytes per second, if any (it and the downtime limit may change
    /// during the migration).
    #[serde(default)]
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    /// Time since the migration started.
    pub elapsed_ms: u64,
    /// Post-copy: time from the start of the migration to the switch (when the destination
    /// confirmed that the guest runs there); `None` before a switch.
    #[serde(default)]
    pub postcopy_switch_ms: Option<u64>,
    /// Post-copy: pages the destination requested because its guest faulted on them.
    #[serde(default)]
    pub postcopy_requests: u64,
}

impl Progress {
    pub(crate) fn new(downtime_limit_ms: f64, max_bandwidth_bytes_per_sec: Option<u64>) -> Self {
        Progress {
            phase: Phase::Handshake,
            pass: 0,
            pass_pages_total: 0,
            pass_pages_sent: 0,
            pages_remaining: 0,
            pages_sent: 0,
            bytes_sent: 0,
            mem_pages: 0,
            bandwidth_bytes_per_sec: 0.0,
            dirty_pages_per_sec: 0.0,
            estimated_downtime_ms: None,
            downtime_limit_ms,
            max_bandwidth_bytes_per_sec,
            elapsed_ms: 0,
            postcopy_switch_ms: None,
            postcopy_requests: 0,
        }
    }

    /// A one-line human summary.
    pub fn summary(&self) -> String {
        let est = match self.estimated_downtime_ms {
            Some(ms) => format!("{ms:.1} ms"),
            None => "?".to_string(),
        };
        format!(
            "{:?} pass {} | {} remaining | {}/s | dirty {:.0} pages/s | est. downtime {} \
             (limit {:.0} ms)",
            self.phase,
            self.pass,
            BinaryBytes(self.pages_remaining * crate::PAGE_SIZE),
            BinaryBytes(self.bandwidth_bytes_per_sec as u64),
            self.dirty_pages_per_sec,
            est,
            self.downtime_limit_ms
        )
    }
}

/// Renders [`Progress`] as a terminal progress bar (on stderr; drawn only when stderr is a
/// terminal). Use [`TerminalProgress::callback`] as the sender's progress callback.
#[derive(Clone)]
pub struct TerminalProgress {
    bar: ProgressBar,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self::with_target(ProgressDrawTarget::stderr())
    }

    /// A renderer that draws nothing (tests, `--quiet`).
    pub fn hidden() -> Self {
        Self::with_target(ProgressDrawTarget::hidden())
    }

    fn with_target(target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), target);
        // The template is a constant known to parse; fall back to the default on error
        // rather than panic.
        let style =
            ProgressStyle::with_template("{prefix:>12} [{bar:32}] {bytes}/{total_bytes} {msg}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        TerminalProgress { bar }
    }

    /// Show one progress snapshot.
    pub fn update(&self, p: &Progress) {
        let prefix = match p.phase {
            Phase::Handshake => "handshake".to_string(),
            Phase::PreCopy => format!("pass {}", p.pass),
            Phase::StopAndCopy => "stop+copy".to_string(),
            Phase::PostCopy => "post-copy".to_string(),
            Phase::Committing => "committing".to_string(),
            Phase::Completed => "done".to_string(),
            Phase::Failed => "failed".to_string(),
        };
        self.bar.set_prefix(prefix);
        self.bar.set_length(p.pass_pages_total * crate::PAGE_SIZE);
        self.bar.set_position(p.pass_pages_sent * crate::PAGE_SIZE);
        let est = match p.estimated_downtime_ms {
            Some(ms) => format!("{ms:.0} ms"),
            None => "?".into(),
        };
        self.bar.set_message(format!(
            "{}/s, dirty {:.0} p/s, est. downtime {est}",
            BinaryBytes(p.bandwidth_bytes_per_sec as u64),
            p.dirty_pages_per_sec
        ));
    }

    /// A progress callback for [`Sender::on_progress`](crate::Sender::on_progress).
    pub fn callback(&self) -> impl FnMut(&Progress) + Send + 'static {
        let me = self.clone();
        move |p: &Progress| me.update(p)
    }

    /// Finish the bar with a summary of the outcome.
    pub fn finish(&self, result: &Result<SendOutcome, SendError>) {
        match result {
            Ok(o) => self.bar.finish_with_message(format!(
                "migrated {} in {} passes, {:.1} ms downtime",
                BinaryBytes(o.bytes_sent),
                o.passes,
                o.downtime.as_secs_f64() * 1e3
            )),
            Err(e) => self.bar.abandon_with_message(format!("failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_hidden_renderer() {
        let mut p = Progress::new(300.0, None);
        p.phase = Phase::PreCopy;
        p.pass = 2;
        p.pages_remaining = 256;
        p.estimated_downtime_ms = Some(1.5);
        let s = p.summary();
        assert!(
            s.contains("pass 2") && s.contains("1.00 MiB") && s.contains("1.5 ms"),
            "{s}"
        );
        let t = TerminalProgress::hidden();
        let mut cb = t.callback();
        cb(&p);
        assert_eq!(t.bar.length(), Some(0));
        p.pass_pages_total = 10;
        p.pass_pages_sent = 4;
        cb(&p);
        assert_eq!(t.bar.position(), 4 * crate::PAGE_SIZE);
        let json = serde_json::to_string(&p).unwrap();
        let back: Progress = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(json.contains("\"phase\":\"PreCopy\""), "{json}");
    }
}
