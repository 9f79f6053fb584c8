//! What went wrong in a TLS handshake or on an established connection, said for the
//! operator: which end refused what, and what to do about it.
//!
//! rustls reports a failed verification on the end that verified (`InvalidCertificate`,
//! `NoCertificatesPresented`) and sends the other end an alert, which arrives there as
//! `AlertReceived`. Both are mapped here, so each end says what happened from its side.

use std::fmt;

use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError};
use thiserror::Error;

/// Which end of a migration the *other* side is, for messages ("the destination's
/// certificate expired").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The end sending the VM (the TLS client).
    Source,
    /// The end receiving the VM (`esvm receive`, the TLS server).
    Destination,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "the source",
            Role::Destination => "the destination",
        })
    }
}

impl Role {
    /// The flags that give this end's certificate.
    fn cert_flags(self) -> &'static str {
        match self {
            Role::Source => "`esvm ctl migrate --tls-cert/--tls-key`",
            Role::Destination => "`esvm receive --tls-cert/--tls-key`",
        }
    }
}

/// A time as UTC text (RFC 3339), for certificate validity messages.
pub fn utc(t: UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s after 1970"))
}

/// Why a TLS handshake with a migration peer failed. `peer` is the other end.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant is documented by its #[error] message.
pub enum HandshakeError {
    #[error(
        "{peer}'s certificate expired at {not_after} (it is now {now}); renew it (for a lab: \
         `esvm certs`) and give it to {}",
        peer.cert_flags()
    )]
    PeerCertExpired {
        peer: Role,
        not_after: String,
        now: String,
    },
    #[error(
        "{peer}'s certificate is not valid before {not_before} (it is now {now}); check the \
         clocks of both hosts"
    )]
    PeerCertNotYetValid {
        peer: Role,
        not_before: String,
        now: String,
    },
    #[error(
        "{peer}'s certificate is for {presented}, not for {expected}: connect with a name the \
         certificate holds, or give the name it should be checked against with --tls-name"
    )]
    PeerCertWrongName {
        peer: Role,
        expected: String,
        presented: String,
    },
    #[error(
        "{peer}'s certificate does not chain to the CA given with --tls-ca (it is self-signed \
         or issued by another CA): give both ends certificates from the same CA"
    )]
    PeerCertUnknownIssuer { peer: Role },
    #[error("{peer}'s certificate was refused: {0}", .source)]
    PeerCertInvalid {
        peer: Role,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "the source presented no client certificate, and this destination admits only \
         authenticated sources: migrate with `esvm ctl migrate --tls-cert FILE --tls-key FILE \
         --tls-ca FILE`"
    )]
    NoClientCert,
    #[error("{peer} refused this end's certificate: {why}")]
    RefusedByPeer { peer: Role, why: String },
    #[error("{peer} ended the TLS handshake with the alert {alert:?}")]
    Alert { peer: Role, alert: AlertDescription },
    #[error("{}", plain_migration(*peer))]
    PlainMigration { peer: Role },
    #[error("{peer} does not speak TLS: {what}")]
    NotTls { peer: Role, what: String },
    #[error(
        "{peer} closed the connection during the TLS handshake (it may not speak TLS, or it \
         refused this end)"
    )]
    ClosedInHandshake { peer: Role },
    #[error(
        "no TLS handshake from {peer} within {secs} s; is it an esvm migration endpoint with \
         TLS configured?"
    )]
    Timeout { peer: Role, secs: u64 },
    #[error("the TLS handshake with {peer} failed: {source}")]
    Tls {
        peer: Role,
        #[source]
        source: rustls::Error,
    },
    #[error("the TLS handshake with {peer} failed: {source}")]
    Io {
        peer: Role,
        #[source]
        source: std::io::Error,
    },
}

fn plain_migration(peer: Role) -> String {
    match peer {
        Role::Source => "the source sent a plain (unencrypted, unauthenticated) migration \
                         stream, and this destination accepts only TLS: migrate with `esvm ctl \
                         migrate --tls-cert FILE --tls-key FILE --tls-ca FILE`"
            .into(),
        Role::Destination => "the destination answered without TLS (a plain esvm migration \
                              frame): it listens without --tls-cert/--tls-key/--tls-ca; \
                              restart `esvm receive` with them (or, on a trusted network \
                              only, migrate without --tls-*)"
            .into(),
    }
}

/// Explain an alert received from `peer`: what it says about this end's certificate, or
/// None when it is not about certificates.
fn alert_reason(peer: Role, alert: AlertDescription) -> Option<String> {
    let this_flags = match peer {
        Role::Source => Role::Destination.cert_flags(),
        Role::Destination => Role::Source.cert_flags(),
    };
    Some(match alert {
        AlertDescription::CertificateExpired => format!(
            "it expired (or is not yet valid) by {peer}'s clock; renew it and give it to \
             {this_flags}"
        ),
        AlertDescription::UnknownCA => format!(
            "it does not chain to the CA {peer} trusts (--tls-ca there): give both ends \
             certificates from the same CA"
        ),
        AlertDescription::BadCertificate => format!(
            "{peer} found it unacceptable (wrong name, or wrong key usage); check that it \
             holds the name {peer} connects with (or --tls-name there)"
        ),
        AlertDescription::CertificateRequired => {
            format!("{peer} requires a certificate and this end presented none: give {this_flags}")
        }
        AlertDescription::UnsupportedCertificate | AlertDescription::CertificateUnknown => {
            format!("{peer} could not use it ({alert:?})")
        }
        AlertDescription::DecryptError => {
            "its signature did not verify: the certificate and key do not belong together, \
             or it was altered"
                .to_string()
        }
        _ => return None,
    })
}

/// rustls prints presented names as `DnsName("x")` / `IpAddress(x)`: keep the `x`.
fn bare_name(n: &str) -> &str {
    n.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            n.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(n)
}

/// Map a rustls error from a handshake with `peer` to what the operator should read.
pub fn map_handshake_error(peer: Role, e: rustls::Error) -> HandshakeError {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(ref c) => match c {
            CertificateError::ExpiredContext { time, not_after } => {
                HandshakeError::PeerCertExpired {
                    peer,
                    not_after: utc(*not_after),
                    now: utc(*time),
                }
            }
            CertificateError::Expired => HandshakeError::PeerCertExpired {
                peer,
                not_after: "an earlier time".into(),
                now: utc(UnixTime::now()),
            },
            CertificateError::NotValidYetContext { time, not_before } => {
                HandshakeError::PeerCertNotYetValid {
                    peer,
                    not_before: utc(*not_before),
                    now: utc(*time),
                }
            }
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => HandshakeError::PeerCertWrongName {
                peer,
                expected: expected.to_str().into_owned(),
                presented: if presented.is_empty() {
                    "no name".into()
                } else {
                    presented
                        .iter()
                        .map(|n| bare_name(n))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            },
            CertificateError::NotValidForName => HandshakeError::PeerCertWrongName {
                peer,
                expected: "the name connected to".into(),
                presented: "other names".into(),
            },
            CertificateError::UnknownIssuer => HandshakeError::PeerCertUnknownIssuer { peer },
            _ => HandshakeError::PeerCertInvalid { peer, source: e },
        },
        E::NoCertificatesPresented if peer == Role::Source => HandshakeError::NoClientCert,
        E::AlertReceived(alert) => match alert_reason(peer, alert) {
            Some(why) => HandshakeError::RefusedByPeer { peer, why },
            None => HandshakeError::Alert { peer, alert },
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => HandshakeError::NotTls {
            peer,
            what: format!("its answer is not a TLS 1.3 handshake ({e})"),
        },
        other => HandshakeError::Tls {
            peer,
            source: other,
        },
    }
}

/// A failure on an established connection, as the text of the `io::Error` the engine sees.
pub(crate) fn explain_stream_error(peer: Role, e: &rustls::Error) -> String {
    match e {
        rustls::Error::DecryptError => format!(
            "a TLS record from {peer} failed authentication: the connection was altered in \
             transit"
        ),
        rustls::Error::AlertReceived(alert) => match alert_reason(peer, *alert) {
            Some(why) => format!("{peer} refused this end's certificate: {why}"),
            None => format!("{peer} ended the TLS connection with the alert {alert:?}"),
        },
        other => format!("TLS error on the connection with {peer}: {other}"),
    }
}
