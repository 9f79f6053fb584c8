//! `esvm receive`: wait for one incoming live migration and run the guest it brings.

use std::path::PathBuf;

use clap::Args;
use esvm_hv::BackendKind;
use esvm_migration::{Receiver, ReceiverConfig};
use thiserror::Error;

use esvm::migrate::{MachineTarget, MigrationUrl, PostcopyStart};
use esvm::transport::{inherited_stream, Listener};

#[derive(Args, Debug)]
#[command(
    after_help = "Prints `esvm: listening on URL` on stderr once it listens (for tcp with \
                  port 0 the port the system chose, for unix the absolute path): the URL to \
                  give `esvm ctl migrate`. With fd:N it prints `esvm: receiving on fd:N` and \
                  takes the one migration arriving on that connection. A VM \
                  that was paused at the source arrives paused and stays paused until `esvm \
                  ctl resume` (with --api-socket; without one it runs, with a warning). An \
                  incoming migration that fails (cut \
                  connection, corrupt frame, incompatible VM, cancel) is discarded and esvm \
                  keeps listening for another, unless --once is given. Once a migration \
                  commits, the guest runs here: its serial console continues on stdout and \
                  the exit status is the guest's, as for `esvm run`.\n\n\
                  Post-copy (the source's `esvm ctl migrate --postcopy-after` or `esvm ctl \
                  postcopy`; emu backend only, offered automatically): the guest starts \
                  here before all its pages arrived; a page it touches is fetched from the \
                  source first, and the vCPU waits for it. If the migration fails after that \
                  switch (cut connection, source gone, a page refused), the guest is stopped \
                  — it never runs with a missing or wrong page — and esvm exits with status \
                  125 naming the failure: neither side holds the whole guest any more."
)]
pub struct ReceiveArgs {
    /// Where to listen: tcp://HOST:PORT (tcp:HOST:PORT is read the same), e.g.
    /// tcp://0.0.0.0:7000, port 0 lets the system choose one (printed); unix:PATH, a Unix
    /// socket for moves on this host, e.g. unix:/run/esvm/mig.sock (created here, removed
    /// when done; an existing file that is not a stale socket is refused); or fd:N, an
    /// already connected stream socket inherited on descriptor N (3 or more) from the
    /// process that started esvm, which receives the one migration on it (no --once needed:
    /// a failure ends esvm).
    #[arg(long, value_name = "URL", value_parser = parse_url)]
    pub listen: MigrationUrl,
    /// Where the guest's serial input (COM1) comes from once it runs here: `stdin` or
    /// `none` (the default), as for `esvm run --console`.
    #[arg(long, value_name = "stdin|none", value_parser = crate::cli::run::parse_console,
          default_value = "none")]
    pub console: crate::cli::run::ConsoleSource,
    /// The secure processor's platform directory (`esvm platform init`), needed to receive
    /// SEV-ES guests: its certificate chain goes to the source, which checks it against the
    /// root it trusts, and the guest's pages and VMSAs go through this platform's
    /// RECEIVE_* commands. Without it SEV-ES guests are refused.
    #[arg(long, value_name = "DIR")]
    pub platform: Option<PathBuf>,
    /// Serve the control API on this Unix socket once the guest runs here.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Keep the received guest paused until `esvm ctl resume` (needs --api-socket), e.g. to
    /// inspect it (`esvm ctl vcpus`) exactly as it arrived.
    #[arg(long, requires = "api_socket")]
    pub start_paused: bool,
    /// Backend for the received guest: 'emu' (default) or 'kvm'.
    #[arg(long, default_value = "emu", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Allocate all of the guest's memory as soon as the migration's configuration arrives
    /// (before any page), instead of as pages arrive: faster transfer, but the whole memory
    /// size is in use at once.
    #[arg(long)]
    pub prealloc: bool,
    /// Give up (exit status 125) if the first incoming migration fails, instead of waiting
    /// for another.
    #[arg(long)]
    pub once: bool,
    /// Accept migrations only over TLS 1.3 with this host's certificate (PEM), and only
    /// from sources presenting a certificate that chains to --tls-ca (mutual
    /// authentication; the source's name is not checked). tcp:// only. Needs --tls-key and
    /// --tls-ca; the files are checked before listening. Without --tls-*, a tcp:// listener
    /// is unauthenticated (a warning says so). Test certificates: `esvm certs`.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) a source's certificate must chain to.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    #[command(flatten)]
    pub scheduling: crate::cli::run::SchedulingChoice,
}

/// `--listen`: refused up front unless a migration URL (the one parser of them); a
/// relative unix: path is made absolute.
fn parse_url(s: &str) -> Result<MigrationUrl, String> {
    s.parse::<MigrationUrl>()
        .and_then(MigrationUrl::absolute)
        .map_err(|e| e.to_string())
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse().map_err(|e: esvm_hv::HvError| e.to_string())
}

#[derive(Debug, Error)]
pub enum ReceiveCliError {
    #[error(transparent)]
    Listen(#[from] esvm::transport::ListenError),
    #[error(transparent)]
    Fd(#[from] esvm::transport::FdError),
    #[error("accepting a connection on {addr} failed: {source}")]
    Accept {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the incoming migration from {peer} failed: {source}")]
    Failed {
        peer: String,
        #[source]
        source: esvm_migration::ReceiveError,
    },
    #[error(transparent)]
    TlsConfig(#[from] esvm::tls::ConfigError),
    #[error(transparent)]
    TlsTransport(#[from] esvm::tls::TlsTransportError),
    #[error("refused the connection from {peer}: {source}")]
    TlsRefused {
        peer: String,
        #[source]
        source: esvm::tls::TlsTransportError,
    },
    #[error(
        "the incoming migration from {peer} failed after the switch to post-copy: {source}; \
         the guest was stopped here and is lost (neither side holds all of it)"
    )]
    PostcopyFailed {
        peer: String,
        #[source]
        source: esvm_migration::ReceiveError,
    },
    #[error("the platform directory {0} does not exist (create it with `esvm platform init`)")]
    Platform(PathBuf),
}

pub fn run(args: ReceiveArgs) -> Result<u8, Box<dyn std::error::Error>> {
    // TLS files are checked before anything listens.
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            esvm::tls::check_url(&args.listen).map_err(ReceiveCliError::TlsTransport)?;
            Some(esvm::tls::TlsServer::load(cert, key, ca).map_err(ReceiveCliError::TlsConfig)?)
        }
        _ => None,
    };
    // fd:N first, before esvm opens anything else (the descriptor is checked and owned).
    let mut inherited = match &args.listen {
        MigrationUrl::Fd(fd) => Some(inherited_stream(*fd).map_err(ReceiveCliError::Fd)?),
        _ => None,
    };
    let platform = match &args.platform {
        Some(p) if !p.is_dir() => return Err(ReceiveCliError::Platform(p.clone()).into()),
        Some(p) => Some(esvm::sev_launch::open_platform(p)?),
        None => None,
    };
    let listener = match inherited {
        Some(_) => {
            eprintln!("esvm: receiving on {} for an incoming VM", args.listen);
            None
        }
        None => {
            let l = Listener::bind(&args.listen).map_err(ReceiveCliError::Listen)?;
            let local = l.local_url().unwrap_or_else(|_| args.listen.to_string());
            eprintln!("esvm: listening on {local} for an incoming VM");
            // unix: is local (file permissions decide who connects): no warning.
            if tls.is_none() && matches!(args.listen, MigrationUrl::Tcp(_)) {
                eprintln!(
                    "esvm: warning: {local} is plain TCP: unauthenticated and unencrypted. \
                     Anyone who can connect can offer this host a VM, and the guest's memory \
                     crosses the network in clear; use --tls-cert, --tls-key and --tls-ca \
                     (`esvm certs` makes test certificates)"
                );
            }
            Some((l, local))
        }
    };
    // An inherited connection carries one migration: its failure ends esvm.
    let once = args.once || inherited.is_some();
    let (mut machine, peer, arrived_paused, postcopy) = loop {
        let (stream, peer) = match (inherited.take(), &listener) {
            (Some(s), _) => (s, args.listen.to_string()),
            (None, Some((l, local))) => l.accept().map_err(|source| ReceiveCliError::Accept {
                addr: local.clone(),
                source,
            })?,
            // An inherited connection is used once (`once` ends the loop after it).
            (None, None) => return Err("no connection left to receive on (an esvm bug)".into()),
        };
        let stream = match &tls {
            None => stream,
            Some(server) => match esvm::tls::accept(server, stream, esvm::tls::HANDSHAKE_TIMEOUT) {
                Ok(s) => s,
                Err(source) if once => {
                    return Err(ReceiveCliError::TlsRefused { peer, source }.into());
                }
                Err(e) => {
                    eprintln!("esvm: refused the connection from {peer}: {e}; waiting for another");
                    continue;
                }
            },
        };
        let mut target = MachineTarget::new(
            args.backend,
            Box::new(|| Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>),
        )
        .with_prealloc(args.prealloc)
        .with_platform(platform.clone());
        // Post-copy is offered on the emu backend: the machine then comes through `rx`
        // while the receiver (on its own thread) keeps filling its pages.
        let (tx, rx) = std::sync::mpsc::channel::<PostcopyStart>();
        if args.backend == BackendKind::Emu {
            target = target.with_postcopy(tx);
        } else {
            drop(tx);
        }
        let worker = std::thread::Builder::new()
            .name("esvm-receive".into())
            .spawn(move || {
                let mut receiver = Receiver::new(ReceiverConfig::default());
                let r = receiver.run_stream(&mut target, stream);
                target.end_handoff();
                (r, target)
            })?;
        if let Ok(start) = rx.recv() {
            eprintln!(
                "esvm: switched to post-copy with {peer}: running the VM while {} pages \
                 are still arriving",
                start.missing.stats().remaining
            );
            break (
                start.machine,
                peer,
                start.arrived_paused,
                Some((worker, start.missing)),
            );
        }
        let (result, target) = worker
            .join()
            .map_err(|_| "the receiving thread panicked (an esvm bug)")?;
        match result {
            Ok(o) => {
                let paused = target.arrived_paused();
                let Some(machine) = target.into_machine() else {
                    return Err("the migration committed but left no machine (an esvm bug)".into());
                };
                tracing::info!(
                    %peer,
                    passes = o.passes,
                    pages = o.pages,
                    bytes = o.bytes,
                    "migration received"
                );
                eprintln!(
                    "esvm: received the VM from {peer}: {} pages in {} passes; running it",
                    o.pages, o.passes
                );
                break (machine, peer, paused, None);
            }
            Err(source) => {
                if once {
                    return Err(ReceiveCliError::Failed {
                        peer: peer.to_string(),
                        source,
                    }
                    .into());
                }
                eprintln!(
                    "esvm: the incoming migration from {peer} failed: {source}; everything \
                     received was discarded; waiting for another"
                );
            }
        }
    };
    // Stop listening (a unix: socket file goes with it).
    drop(listener);
    args.scheduling.apply(&mut machine);
    let mut start_paused = args.start_paused;
    if arrived_paused {
        match &args.api_socket {
            Some(sock) => {
                eprintln!(
                    "esvm: the VM was paused at the source and stays paused here; resume it \
                     with `esvm ctl --api-socket {} resume`",
                    sock.display()
                );
                start_paused = true;
            }
            None => eprintln!(
                "esvm: warning: the VM was paused at the source, but without --api-socket \
                 nothing could resume it here, so it runs"
            ),
        }
    }
    let _raw = crate::cli::run::attach_console(&mut machine, args.console);
    let status = crate::cli::run_session(
        &format!("from {peer}"),
        &mut machine,
        &esvm::session::RunOptions {
            api_socket: args.api_socket.clone(),
            start_paused,
            incoming_postcopy: postcopy.as_ref().map(|(_, m)| (peer.clone(), m.clone())),
        },
    );
    let Some((worker, missing)) = postcopy else {
        return status;
    };
    if let Err(e) = &status {
        // The guest could not run here: end the migration (the source learns it from the
        // receiver's refusal of the next page) rather than let it complete into nothing.
        missing.fail(format!("the destination could not run the guest: {e}"));
    }
    // Post-copy: the migration decides. If it failed, the guest was stopped (or ended
    // meanwhile) and is lost: say why and exit 125 whatever the guest did.
    let (result, _target) = worker
        .join()
        .map_err(|_| "the receiving thread panicked (an esvm bug)")?;
    match result {
        Ok(o) => {
            tracing::info!(%peer, pages = o.pages, bytes = o.bytes, "post-copy migration received");
            status
        }
        Err(source) => Err(ReceiveCliError::PostcopyFailed {
            peer: peer.to_string(),
            source,
        }
        .into()),
    }
}
