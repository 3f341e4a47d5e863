//! The HTTPS client side of the bench tools (`load`, `soak`): a rustls configuration trusting
//! one CA, one keep-alive HTTP/1.1 connection per call to [`connect`], and the server's memory
//! read from /proc. Loopback only: the tools connect to the addresses they are given.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The sending half of one keep-alive connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Which step of opening a connection failed: the soak tool counts TLS failures apart from a
/// port that is not listening (a replica being restarted).
#[derive(Debug)]
pub enum ConnectError {
    Tcp(SocketAddr, std::io::Error),
    Tls(SocketAddr, std::io::Error),
    Http(hyper::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Tcp(addr, e) => write!(f, "connect {addr}: {e}"),
            ConnectError::Tls(addr, e) => write!(f, "TLS to {addr}: {e}"),
            ConnectError::Http(e) => write!(f, "HTTP/1.1 handshake: {e}"),
        }
    }
}

/// Opens one TLS connection (server name `localhost`) and starts HTTP/1.1 on it.
pub async fn connect(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Sender, ConnectError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::Tcp(addr, e))?;
    tcp.set_nodelay(true)
        .map_err(|e| ConnectError::Tcp(addr, e))?;
    let stream = TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| ConnectError::Tls(addr, e))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Http)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A client configuration trusting the CA certificates in `ca_pem`, TLS 1.2 and 1.3.
pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A `Vm*:` line of /proc/PID/status, in KiB (`VmHWM` peak, `VmRSS` now).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
