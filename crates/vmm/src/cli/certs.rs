//! `esvm certs`: a test CA and host certificates for migrations over TLS (labs and tests).

use std::path::PathBuf;

use clap::Args;
use esvm_tls::certs::{make, Validity};

use crate::cli::output::Format;

#[derive(Args, Debug)]
#[command(
    after_help = "FOR TESTS AND LABS ONLY: the keys are written unencrypted (mode 0600) \
                        and the CA has no revocation. Example: `esvm certs ./pki --host \
                        src --host dst,10.0.0.2` writes pki/ca.pem, pki/ca-key.pem, \
                        pki/src.pem, pki/src-key.pem, pki/dst.pem and pki/dst-key.pem; then \
                        `esvm receive --listen tcp://10.0.0.2:7000 --tls-cert pki/dst.pem \
                        --tls-key pki/dst-key.pem --tls-ca pki/ca.pem` and `esvm ctl \
                        migrate tcp://10.0.0.2:7000 --tls-cert pki/src.pem --tls-key \
                        pki/src-key.pem --tls-ca pki/ca.pem`. Copy each host's files (and \
                        ca.pem, never ca-key.pem) to that host."
)]
pub struct CertsArgs {
    /// The directory to write into (created if missing). Its CA (ca.pem and ca-key.pem) is
    /// made on first use and reused later, so more hosts can be added.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// A host certificate: NAME[,NAME..], written to DIR/NAME.pem and DIR/NAME-key.pem
    /// (NAME = the first name). Every name goes into the certificate: an IP address as an
    /// IP SAN, anything else as a DNS name; the certificate serves both as a destination
    /// (server) and as a source (client). Repeatable.
    #[arg(long = "host", value_name = "NAME[,NAME..]")]
    pub hosts: Vec<String>,
    /// How many days new host certificates are valid (from an hour ago).
    #[arg(long, value_name = "N", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Make the host certificates already expired (valid from two days ago until
    /// yesterday), to see how esvm refuses them.
    #[arg(long, conflicts_with = "days")]
    pub expired: bool,
    /// Make self-signed host certificates (not issued by the CA), to see how esvm refuses
    /// them.
    #[arg(long)]
    pub self_signed: bool,
}

#[derive(serde::Serialize)]
struct Written {
    ca: PathBuf,
    ca_created: bool,
    hosts: Vec<HostFiles>,
}

#[derive(serde::Serialize)]
struct HostFiles {
    cert: PathBuf,
    key: PathBuf,
}

pub fn run(args: CertsArgs, format: Format) -> Result<u8, Box<dyn std::error::Error>> {
    let validity = if args.expired {
        Validity::Expired
    } else {
        Validity::Days(args.days)
    };
    let made = make(&args.dir, &args.hosts, validity, args.self_signed)?;
    let w = Written {
        ca: made.ca,
        ca_created: made.ca_created,
        hosts: made
            .hosts
            .into_iter()
            .map(|(cert, key)| HostFiles { cert, key })
            .collect(),
    };
    format.emit(&w, |w| {
        let mut s = format!(
            "{} CA {}\n",
            if w.ca_created { "made" } else { "reused" },
            w.ca.display()
        );
        for h in &w.hosts {
            s += &format!("wrote {} and {}\n", h.cert.display(), h.key.display());
        }
        s
    })?;
    Ok(0)
}
