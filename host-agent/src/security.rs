//! The agents' security options: mutual TLS by default, plain TCP only when
//! asked for by name, and where each agent keeps its private sockets.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dbmigrate_core::transport::{Acceptor, AllowList, Connector, DEFAULT_TLS_DIR};

/// Options shared by `migrate` and `receive`.
#[derive(clap::Args, Clone, Debug)]
pub struct SecurityArgs {
    /// Directory with the TLS files, laid out as libvirt's and QEMU's
    /// migration TLS: ca-cert.pem, server-cert.pem and server-key.pem (used
    /// by `receive`), client-cert.pem and client-key.pem (used by `migrate`).
    /// `scripts/make-pki.sh` makes a set.
    #[arg(long, default_value = DEFAULT_TLS_DIR)]
    pub tls_dir: PathBuf,
    /// Accept a peer only if its certificate is valid for this DNS name or
    /// IP address (repeat for several; as QEMU's tls-authz). Without it, any
    /// certificate the CA signed is accepted.
    #[arg(long = "tls-allow", value_name = "NAME")]
    pub tls_allow: Vec<String>,
    /// DANGEROUS: plain TCP without TLS. Guest RAM and device state cross
    /// the network in clear text and any host that reaches the port is
    /// believed to be the peer. Only for a link nobody else can reach.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Where this agent makes its private directory (mode 0700) for QEMU's
    /// device-state socket.
    #[arg(long, default_value = "/run/dbmigrate")]
    pub run_dir: PathBuf,
}

impl SecurityArgs {
    fn allow(&self) -> Result<AllowList> {
        if self.insecure_plaintext && !self.tls_allow.is_empty() {
            bail!("--tls-allow needs TLS: drop --insecure-plaintext");
        }
        AllowList::parse(&self.tls_allow).context("--tls-allow")
    }

    fn warn_plaintext() {
        tracing::warn!("--insecure-plaintext: guest RAM crosses the network in clear text and the peer is not authenticated");
    }

    /// How `migrate` secures its connections to `to`; the destination's
    /// certificate must be valid for `hostname` (default: `to`'s address).
    pub fn connector(&self, to: SocketAddr, hostname: Option<&str>) -> Result<Connector> {
        let allow = self.allow()?;
        if self.insecure_plaintext {
            Self::warn_plaintext();
            return Ok(Connector::InsecurePlaintext);
        }
        let name = hostname.map_or_else(|| to.ip().to_string(), str::to_string);
        Connector::tls(&self.tls_dir, &name, allow)
            .context("setting up TLS (or pass --insecure-plaintext on both agents, on a link nobody else reaches)")
    }

    /// How `receive` secures the connections it accepts.
    pub fn acceptor(&self) -> Result<Acceptor> {
        let allow = self.allow()?;
        if self.insecure_plaintext {
            Self::warn_plaintext();
            return Ok(Acceptor::InsecurePlaintext);
        }
        Acceptor::tls(&self.tls_dir, allow)
            .context("setting up TLS (or pass --insecure-plaintext on both agents, on a link nobody else reaches)")
    }
}
