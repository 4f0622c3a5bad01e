//! The agents' connections: TCP secured by mutual TLS 1.3 (the default), or
//! plain TCP when the operator asks for it by name.
//!
//! Certificates live in one directory laid out as libvirt and QEMU lay out
//! their migration TLS files: `ca-cert.pem` (the CA both hosts trust),
//! `server-cert.pem` + `server-key.pem` (used by the receiving agent) and
//! `client-cert.pem` + `client-key.pem` (used by the sending agent). Each
//! side checks that the other's certificate chains to the CA and, when an
//! allow-list is given, that it is valid for one of the allowed names (DNS
//! or IP subject alternative names, as TLS checks a server's name).
//!
//! Nothing here knows the migration protocol: a [`Conn`] is a byte stream.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The CA certificate both hosts trust.
pub const CA_CERT: &str = "ca-cert.pem";
/// The receiving agent's certificate.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The receiving agent's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The sending agent's certificate.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The sending agent's private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// Where the agents look for their certificates unless told otherwise.
pub const DEFAULT_TLS_DIR: &str = "/etc/pki/dbmigrate";
/// How long a peer may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of setting up or securing a connection.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot use {path}: {problem} (see README, Security: each host needs the CA certificate and its own certificate and key in --tls-dir)")]
    Pki {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The files were read but do not make a TLS configuration.
    #[error("the TLS files in {dir} do not fit together: {problem}")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// What rustls said.
        problem: String,
    },
    /// An allowed name is neither a DNS name nor an IP address.
    #[error("`{0}` is not a DNS name or IP address, so no certificate can be valid for it")]
    BadName(String),
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed: no certificate, another CA, a wrong name,
    /// or not TLS at all.
    #[error("TLS handshake with {peer} failed")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// What rustls said.
        #[source]
        source: io::Error,
    },
    /// The peer did not complete the handshake in time.
    #[error("{peer} did not complete the TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer's certificate is signed by the CA but is not for an allowed name.
    #[error("the certificate of {peer} is valid for none of the allowed names ({allowed}): give that host a certificate for one of them, or allow its name with --tls-allow")]
    NotAllowed {
        /// The peer.
        peer: SocketAddr,
        /// The allow-list.
        allowed: String,
    },
}

/// Peer names a certificate must be valid for (any one of them); empty:
/// any certificate the CA signed.
#[derive(Clone, Debug, Default)]
pub struct AllowList(Arc<[ServerName<'static>]>);

impl AllowList {
    /// Parses DNS names and IP addresses.
    pub fn parse(names: &[String]) -> Result<Self, TransportError> {
        let parsed = names
            .iter()
            .map(|n| {
                ServerName::try_from(n.clone()).map_err(|_| TransportError::BadName(n.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(parsed.into()))
    }

    /// Whether `cert` (DER) is valid for one of the names; true when the list is empty.
    pub fn admits(&self, cert: &CertificateDer<'_>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        self.0
            .iter()
            .any(|n| ee.verify_is_valid_for_subject_name(n).is_ok())
    }

    fn check(
        &self,
        peer: SocketAddr,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<(), TransportError> {
        match certs.and_then(|c| c.first()) {
            Some(leaf) if self.admits(leaf) => Ok(()),
            _ => Err(TransportError::NotAllowed {
                peer,
                allowed: self.describe(),
            }),
        }
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.0.iter().map(|n| n.to_str().into_owned()).collect();
        names.join(", ")
    }
}

/// How the sending agent secures its connections.
#[derive(Clone)]
pub enum Connector {
    /// Mutual TLS 1.3.
    Tls {
        /// Client configuration (CA, client certificate and key).
        config: Arc<ClientConfig>,
        /// The name the receiver's certificate must be valid for.
        server_name: ServerName<'static>,
        /// Further names the receiver's certificate must match (any one).
        allow: AllowList,
    },
    /// Plain TCP: RAM and device state in clear text, any host believed.
    InsecurePlaintext,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls {
                server_name, allow, ..
            } => f
                .debug_struct("Tls")
                .field("server_name", server_name)
                .field("allow", allow)
                .finish_non_exhaustive(),
            Self::InsecurePlaintext => f.write_str("InsecurePlaintext"),
        }
    }
}

impl Connector {
    /// Loads the CA and the client certificate and key from `dir`; the
    /// receiver must present a certificate valid for `server_name`.
    pub fn tls(dir: &Path, server_name: &str, allow: AllowList) -> Result<Self, TransportError> {
        let roots = load_roots(dir)?;
        let (certs, key) = load_identity(dir, CLIENT_CERT, CLIENT_KEY)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| {
                b.with_root_certificates(roots)
                    .with_client_auth_cert(certs, key)
            })
            .map_err(|e| config_error(dir, e))?;
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TransportError::BadName(server_name.to_string()))?;
        Ok(Self::Tls {
            config: Arc::new(config),
            server_name,
            allow,
        })
    }

    /// Whether connections are encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }

    /// Secures a fresh TCP connection to the receiver.
    pub async fn secure(&self, tcp: TcpStream, peer: SocketAddr) -> Result<Conn, TransportError> {
        tcp.set_nodelay(true).ok();
        match self {
            Self::InsecurePlaintext => Ok(Conn::Plain(tcp)),
            Self::Tls {
                config,
                server_name,
                allow,
            } => {
                let c = tokio_rustls::TlsConnector::from(config.clone());
                let s = handshake(peer, c.connect(server_name.clone(), tcp)).await?;
                allow.check(peer, s.get_ref().1.peer_certificates())?;
                Ok(Conn::Client(Box::new(s)))
            }
        }
    }

    /// Connects to `addr` and secures the connection.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TransportError::Connect { addr, source })?;
        self.secure(tcp, addr).await
    }
}

/// How the receiving agent secures the connections it accepts.
#[derive(Clone)]
pub enum Acceptor {
    /// Mutual TLS 1.3: the peer must present a certificate the CA signed.
    Tls {
        /// Server side of the handshake.
        acceptor: tokio_rustls::TlsAcceptor,
        /// Names the peer's certificate must be valid for (any one).
        allow: AllowList,
    },
    /// Plain TCP: any host that reaches the port is believed.
    InsecurePlaintext,
}

impl Acceptor {
    /// Loads the CA and the server certificate and key from `dir`.
    pub fn tls(dir: &Path, allow: AllowList) -> Result<Self, TransportError> {
        let roots = load_roots(dir)?;
        let (certs, key) = load_identity(dir, SERVER_CERT, SERVER_KEY)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| config_error(dir, e))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(dir, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| config_error(dir, e))?;
        // Sessions are not resumed; a ticket would only sit unread in the
        // sender's buffer (its data connections never read).
        config.send_tls13_tickets = 0;
        Ok(Self::Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            allow,
        })
    }

    /// Whether connections are encrypted and authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }

    /// Secures an accepted TCP connection: the handshake, bounded in time,
    /// and the allow-list.
    pub async fn secure(&self, tcp: TcpStream, peer: SocketAddr) -> Result<Conn, TransportError> {
        tcp.set_nodelay(true).ok();
        match self {
            Self::InsecurePlaintext => Ok(Conn::Plain(tcp)),
            Self::Tls { acceptor, allow } => {
                let s = handshake(peer, acceptor.accept(tcp)).await?;
                allow.check(peer, s.get_ref().1.peer_certificates())?;
                Ok(Conn::Server(Box::new(s)))
            }
        }
    }
}

/// A TLS handshake with `peer`, bounded by [`HANDSHAKE_TIMEOUT`].
async fn handshake<S>(
    peer: SocketAddr,
    shake: impl std::future::Future<Output = io::Result<S>>,
) -> Result<S, TransportError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, shake)
        .await
        .map_err(|_| TransportError::HandshakeTimeout { peer })?
        .map_err(|source| TransportError::Handshake { peer, source })
}

/// A random number from the TLS library's generator (an id that a peer
/// cannot guess); from the clock and pid only if that generator fails.
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if provider().secure_random.fill(&mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    #[allow(clippy::cast_possible_truncation)] // mixing bits, truncation intended
    let id = (t as u64) ^ (u64::from(std::process::id()) << 32);
    id
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn config_error(dir: &Path, e: impl std::fmt::Display) -> TransportError {
    TransportError::Config {
        dir: dir.to_path_buf(),
        problem: e.to_string(),
    }
}

fn pki_error(path: &Path, problem: impl std::fmt::Display) -> TransportError {
    TransportError::Pki {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pki_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pki_error(path, e))?;
    if certs.is_empty() {
        return Err(pki_error(path, "it holds no PEM certificate"));
    }
    Ok(certs)
}

fn load_roots(dir: &Path) -> Result<RootCertStore, TransportError> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for c in load_certs(&path)? {
        roots.add(c).map_err(|e| pki_error(&path, e))?;
    }
    Ok(roots)
}

fn load_identity(
    dir: &Path,
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TransportError> {
    let certs = load_certs(&dir.join(cert))?;
    let key_path = dir.join(key);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pki_error(&key_path, e))?;
    Ok((certs, key))
}

/// One agent connection, encrypted or not.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, this side connected.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS, this side accepted.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The reading half of a [`Conn`].
pub type ConnReader = tokio::io::ReadHalf<Conn>;
/// The writing half of a [`Conn`].
pub type ConnWriter = tokio::io::WriteHalf<Conn>;

impl Conn {
    /// The peer's certificate (DER), on a TLS connection.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        let certs = match self {
            Conn::Plain(_) => None,
            Conn::Client(s) => s.get_ref().1.peer_certificates(),
            Conn::Server(s) => s.get_ref().1.peer_certificates(),
        };
        certs.and_then(|c| c.first()).map(|c| c.as_ref())
    }

    /// Halves that can be used from different tasks.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        tokio::io::split(self)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
