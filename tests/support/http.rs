//! A blocking HTTP/1.1 client for tests that talk to the binary as a separate process: one
//! request per connection (`Connection: close`), over TLS with the trust a test chooses, or plain
//! for the metrics port. Written by hand so the test sees the server's own framing (chunked or
//! not) rather than a client library's interpretation of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How long one socket read may block before the request fails: far above what any reply needs,
/// so a loaded machine makes the test slower, never red.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// A client configuration (ring, safe defaults) that trusts the certificates in `ca_pems` and,
/// given an `identity` (certificate and key PEM), presents it for mutual TLS.
pub fn client_config(
    ca_pems: &[&str],
    identity: Option<(&str, &str)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca_pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

/// One HTTP/1.1 request on its own connection; returns the status and the body (dechunked).
/// `tls` is the client configuration and the server name to ask for (also sent as `Host`), as the
/// API server would; `None` speaks plain HTTP.
pub fn request(
    addr: SocketAddr,
    tls: Option<(&Arc<rustls::ClientConfig>, &str)>,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(READ_DEADLINE))?;
    let host = tls.map_or("localhost", |(_, name)| name);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut raw = Vec::new();
    let mut exchange = |stream: &mut dyn ReadWrite| -> std::io::Result<()> {
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        stream.flush()?;
        match stream.read_to_end(&mut raw) {
            // A server that closes without close_notify still sent a complete response.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(()),
            other => other.map(|_| ()),
        }
    };
    match tls {
        Some((config, name)) => {
            let name = ServerName::try_from(name.to_string()).unwrap();
            let connection = rustls::ClientConnection::new(config.clone(), name).unwrap();
            exchange(&mut rustls::StreamOwned::new(connection, tcp))?;
        }
        None => exchange(&mut { tcp })?,
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

/// A TLS or a plain stream, so one exchange serves both.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The body of a `Transfer-Encoding: chunked` response (chunk extensions ignored).
pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
