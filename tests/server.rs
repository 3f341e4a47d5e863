//! The real server, over real TLS on 127.0.0.1:0, with certificates generated per test.
//!
//! Timing: nothing here asserts on latency. Waits poll a condition with a generous deadline
//! ([`DEADLINE`]), so a loaded two-core machine makes the tests slower, not red.

mod support {
    pub mod http;
    pub mod poll;
    pub mod review;
    pub mod tmp;
}

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use lightstep_tekton_webhook::certs;
use lightstep_tekton_webhook::runtime::tls::TlsPaths;
use lightstep_tekton_webhook::serve::{Server, Settings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use support::http::client_config;
use support::poll::{DEADLINE, eventually};
use support::review::{fixture_bytes, fixture_names};
use support::tmp::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

fn bundle() -> certs::Bundle {
    certs::generate(&["localhost".into(), "127.0.0.1".into()], 30).unwrap()
}

/// A scratch directory holding a fresh bundle's serving pair, the bundle, and settings that serve
/// it on 127.0.0.1:0.
fn local(tag: &str) -> (TempDir, certs::Bundle, Settings) {
    let dir = TempDir::new(tag);
    let b = bundle();
    let settings = Settings::local(write_pair(&dir, &b));
    (dir, b, settings)
}

/// Replaces a file the way a careful writer does (write aside, rename over).
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes a bundle's serving pair as plain files; returns the paths.
fn write_pair(dir: &TempDir, b: &certs::Bundle) -> TlsPaths {
    let (cert, key) = (dir.path("tls.crt"), dir.path("tls.key"));
    replace(&cert, &b.cert_pem);
    replace(&key, &b.key_pem);
    TlsPaths {
        cert,
        key,
        client_ca: None,
    }
}

struct Running {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(settings: Settings) -> Running {
        let server = Server::bind(settings).await.unwrap();
        let addr = server.local_addr();
        let metrics_addr = server.metrics_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            metrics_addr,
            stop: Some(stop),
            done,
        }
    }

    /// Fires the same shutdown path SIGTERM takes in `serve`.
    fn shutdown(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }

    async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }

    /// The value of one metric line (exact name and labels), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        metric_of(&self.metrics().await, series)
    }
}

/// GET /metrics over plain HTTP.
async fn scrape(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

/// The value of one metric line (exact name and labels) in a scrape, 0 when absent.
fn metric_of(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// A keep-alive HTTP/1.1 client over one TLS connection.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Client> {
        let tls = connect(addr, config).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Client { sender })
    }

    async fn post(&mut self, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), hyper::Error> {
        self.sender.ready().await?;
        let request = hyper::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    async fn get(&mut self, path: &str) -> Result<u16, hyper::Error> {
        self.sender.ready().await?;
        let request = hyper::Request::get(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// Whether a client with `config` is refused: at the handshake or, on TLS 1.3, where the
/// server's refusal arrives with the first read.
async fn refused(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, body: &[u8]) -> bool {
    match Client::connect(addr, config).await {
        Err(_) => true,
        Ok(mut c) => c.post("/mutate", body.to_vec()).await.is_err(),
    }
}

/// One request on a fresh connection.
async fn post_once(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
    body: Vec<u8>,
) -> (u16, Bytes) {
    let mut c = Client::connect(addr, config).await.unwrap();
    c.post(path, body).await.unwrap()
}

/// Reads one HTTP/1.1 message head and its Content-Length body off a raw stream.
async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await?;
    Ok((head, body))
}

/// Reads one HTTP/1.1 response: its status and body.
/// The response on `s`, which must arrive whole within [`DEADLINE`].
async fn response_of<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, Vec<u8>) {
    tokio::time::timeout(DEADLINE, read_response(s))
        .await
        .unwrap()
        .unwrap()
}

async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<(u16, Vec<u8>)> {
    let (head, body) = read_message(s).await?;
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Ok((status, body))
}

/// The real binary running `serve --dev` on a loopback port, certificates in `certs`.
struct DevServer {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    /// Standard output after the line that named the address.
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl DevServer {
    /// Starts it; `configure` adds arguments (at least `--metrics-listen`) and environment.
    async fn start(
        certs: &Path,
        configure: impl FnOnce(&mut tokio::process::Command),
    ) -> DevServer {
        use std::process::Stdio;
        use tokio::io::AsyncBufReadExt;
        let mut command =
            tokio::process::Command::new(env!("CARGO_BIN_EXE_lightstep-tekton-webhook"));
        command
            .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--dev-dir"])
            .arg(certs)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = tokio::time::timeout(DEADLINE, stdout.next_line())
                .await
                .unwrap()
                .unwrap()
                .expect("serve --dev exited before naming its address");
            if let Some(rest) = line.strip_prefix("Development server on https://") {
                let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                return DevServer {
                    child,
                    addr,
                    stdout,
                };
            }
        }
    }

    /// Sends SIGTERM and returns the exit status.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap()
            .unwrap()
    }
}

/// The leaf certificate the server presents to a new connection.
async fn served_certificate(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Option<Vec<u8>> {
    let tls = connect(addr, config).await.ok()?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn fixtures() -> Vec<(String, Vec<u8>)> {
    fixture_names()
        .into_iter()
        .map(|name| {
            let bytes = fixture_bytes(&name);
            (name, bytes)
        })
        .collect()
}

/// The review of a pipeline's TaskRun pod.
fn task_review() -> Vec<u8> {
    fixture_bytes("tekton-pipeline-task-traced.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_gets_a_reply_whose_patch_applies() {
    let (_dir, b, settings) = local("fixtures");
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    // One keep-alive connection for everything, as the API server does.
    let mut client = Client::connect(server.addr, &config).await.unwrap();
    let mut patched = 0;
    for (name, body) in fixtures() {
        let review: Value = serde_json::from_slice(&body).unwrap();
        for path in ["/mutate", "/enforce"] {
            let (status, reply) = client.post(path, body.clone()).await.unwrap();
            assert_eq!(status, 200, "{name} {path}");
            let reply: Value = serde_json::from_slice(&reply).unwrap();
            assert_eq!(reply["apiVersion"], "admission.k8s.io/v1", "{name}");
            assert_eq!(reply["kind"], "AdmissionReview", "{name}");
            assert_eq!(
                reply["response"]["uid"], review["request"]["uid"],
                "{name}: uid echoed"
            );
            let response = &reply["response"];
            if let Some(patch) = response.get("patch") {
                assert_eq!(response["patchType"], "JSONPatch", "{name}");
                let patch = base64::engine::general_purpose::STANDARD
                    .decode(patch.as_str().unwrap())
                    .unwrap();
                let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
                let mut pod = review["request"]["object"].clone();
                json_patch::patch(&mut pod, &patch)
                    .unwrap_or_else(|e| panic!("{name} {path}: patch does not apply: {e}"));
                assert!(
                    pod.to_string().contains("TRACEPARENT"),
                    "{name}: nothing injected"
                );
                patched += 1;
            } else {
                assert!(
                    response.get("patchType").is_none(),
                    "{name}: type without patch"
                );
            }
        }
    }
    assert!(patched >= 8, "only {patched} replies carried a patch");
    assert!(
        server
            .metric(
                "lightstep_tekton_webhook_admissions_total{mode=\"enforce\",outcome=\"patched\"}"
            )
            .await
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_stalled_clients_get_their_answer_while_others_are_served() {
    let (_dir, b, mut settings) = local("bad");
    // Short enough for the test to see them fire, long enough for any honest step here.
    settings.limits.header_timeout = Duration::from_secs(2);
    settings.limits.body_timeout = Duration::from_secs(2);
    settings.limits.handshake_timeout = Duration::from_secs(2);
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    let good = task_review();

    // Three stalled clients, opened first and left hanging: no TLS handshake, no headers, and a
    // body that stops half-way.
    let mut no_handshake = TcpStream::connect(server.addr).await.unwrap();
    let mut no_headers = connect(server.addr, &config).await.unwrap();
    no_headers
        .write_all(b"POST /mutate HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut half_body = connect(server.addr, &config).await.unwrap();
    half_body
        .write_all(
            format!(
                "POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
                good.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    half_body.write_all(&good[..good.len() / 2]).await.unwrap();

    // Meanwhile, every kind of bad body gets a one-line 400 on a shared connection, and good
    // reviews in between are answered.
    let mut client = Client::connect(server.addr, &config).await.unwrap();
    let truncated = good[..good.len() - 10].to_vec();
    let wrong_kind = String::from_utf8(good.clone())
        .unwrap()
        .replacen("\"admission.k8s.io/v1\"", "\"admission.k8s.io/v1beta1\"", 1)
        .into_bytes();
    let not_review = br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}"#.to_vec();
    for (what, body) in [
        ("garbage", b"\x00\xffnot json at all".to_vec()),
        ("empty", Vec::new()),
        ("truncated", truncated),
        ("wrong apiVersion", wrong_kind),
        ("wrong kind", not_review),
    ] {
        let (status, reply) = client.post("/mutate", body).await.unwrap();
        assert_eq!(status, 400, "{what}");
        let text = String::from_utf8(reply.to_vec()).unwrap();
        assert_eq!(text.trim_end().lines().count(), 1, "{what}: {text}");
        let (status, _) = client.post("/enforce", good.clone()).await.unwrap();
        assert_eq!(status, 200, "good review after {what}");
    }

    // Not TLS at all: the handshake fails, the server carries on.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"POST /mutate HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut sink))
        .await
        .unwrap();

    // Over 6 MiB, declared up front: 413 without reading the body.
    let mut big = connect(server.addr, &config).await.unwrap();
    big.write_all(b"POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 7340032\r\n\r\n")
        .await
        .unwrap();
    big.write_all(&vec![b' '; 64 * 1024]).await.unwrap();
    let (status, _) = response_of(&mut big).await;
    assert_eq!(status, 413);
    // Over 6 MiB, chunked (no length given): 413 once the limit is passed.
    let chunked = connect(server.addr, &config).await.unwrap();
    let (mut rx, mut tx) = tokio::io::split(chunked);
    let writer = tokio::spawn(async move {
        tx.write_all(b"POST /mutate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            .await?;
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..7 {
            tx.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            tx.write_all(&chunk).await?;
            tx.write_all(b"\r\n").await?;
        }
        tx.write_all(b"0\r\n\r\n").await
    });
    let (status, _) = response_of(&mut rx).await;
    assert_eq!(status, 413);
    // The writer may or may not have finished before the server closed: either is fine.
    let _ = writer.await;

    // The stalled clients are cut off: the half body gets 408, the others are closed.
    let (status, _) = response_of(&mut half_body).await;
    assert_eq!(status, 408);
    let closed = tokio::time::timeout(DEADLINE, read_response(&mut no_headers))
        .await
        .unwrap();
    assert!(
        closed.is_err() || closed.unwrap().0 >= 400,
        "stalled headers not cut off"
    );
    let mut rest = Vec::new();
    // Ok (EOF) or a reset: either way the server let go of it.
    let _ = tokio::time::timeout(DEADLINE, no_handshake.read_to_end(&mut rest))
        .await
        .expect("a client that never does TLS is not cut off");

    // And the server still serves, on a new connection.
    let (status, _) = post_once(server.addr, &config, "/mutate", good).await;
    assert_eq!(status, 200);
    assert!(
        server
            .metric("lightstep_tekton_webhook_http_rejections_total{reason=\"bad-request\"}")
            .await
            >= 5.0
    );
    assert!(
        server
            .metric("lightstep_tekton_webhook_tls_handshake_failures_total")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificate_files_are_served_and_bad_ones_refused() {
    let dir = TempDir::new("reload");
    let (first, second) = (bundle(), bundle());
    let paths = write_pair(&dir, &first);
    let server = Running::start(Settings::local(paths.clone())).await;
    let both = client_config(&[&first.ca_cert_pem, &second.ca_cert_pem], None);
    assert_eq!(
        served_certificate(server.addr, &both).await.unwrap(),
        der_of(&first.cert_pem)
    );

    // Replaced in place (key first, as a careless writer might; the half-way state is refused).
    replace(&paths.key, &second.key_pem);
    replace(&paths.cert, &second.cert_pem);
    let want = der_of(&second.cert_pem);
    eventually("the new certificate is served", || async {
        served_certificate(server.addr, &both).await.as_ref() == Some(&want)
    })
    .await;
    let expiry = server
        .metric("lightstep_tekton_webhook_tls_certificate_expiry_timestamp_seconds")
        .await;
    assert!(expiry > 1.7e9, "expiry metric {expiry}");

    // A broken certificate, then a mismatched pair: both refused, the last good pair kept.
    let refused = "lightstep_tekton_webhook_reloads_total{file=\"tls\",result=\"refused\"}";
    let before = server.metric(refused).await;
    replace(
        &paths.cert,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    eventually("the broken certificate is refused", || async {
        server.metric(refused).await > before
    })
    .await;
    assert_eq!(served_certificate(server.addr, &both).await.unwrap(), want);
    let before = server.metric(refused).await;
    replace(&paths.cert, &first.cert_pem);
    eventually("the mismatched pair is refused", || async {
        server.metric(refused).await > before
    })
    .await;
    assert_eq!(served_certificate(server.addr, &both).await.unwrap(), want);
    let (status, _) = post_once(server.addr, &both, "/mutate", fixtures()[0].1.clone()).await;
    assert_eq!(status, 200);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_data_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    // The layout the kubelet writes for a Secret volume.
    let dir = TempDir::new("symlink");
    let (first, second) = (bundle(), bundle());
    let version = |name: &str, b: &certs::Bundle| {
        let v = dir.path(name);
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("tls.crt"), &b.cert_pem).unwrap();
        std::fs::write(v.join("tls.key"), &b.key_pem).unwrap();
    };
    version("..2026_11_25_10_00_00.1", &first);
    symlink("..2026_11_25_10_00_00.1", dir.path("..data")).unwrap();
    symlink("..data/tls.crt", dir.path("tls.crt")).unwrap();
    symlink("..data/tls.key", dir.path("tls.key")).unwrap();
    let paths = TlsPaths {
        cert: dir.path("tls.crt"),
        key: dir.path("tls.key"),
        client_ca: None,
    };
    let server = Running::start(Settings::local(paths)).await;
    let both = client_config(&[&first.ca_cert_pem, &second.ca_cert_pem], None);
    assert_eq!(
        served_certificate(server.addr, &both).await.unwrap(),
        der_of(&first.cert_pem)
    );

    version("..2026_11_25_11_00_00.2", &second);
    symlink("..2026_11_25_11_00_00.2", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    std::fs::remove_dir_all(dir.path("..2026_11_25_10_00_00.1")).unwrap();
    let want = der_of(&second.cert_pem);
    eventually("the swapped certificate is served", || async {
        served_certificate(server.addr, &both).await.as_ref() == Some(&want)
    })
    .await;
    assert_eq!(
        server
            .metric("lightstep_tekton_webhook_reloads_total{file=\"tls\",result=\"applied\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_requires_a_client_certificate_signed_by_it() {
    let dir = TempDir::new("mtls");
    let b = bundle();
    // A client CA of its own, and a client certificate it signs.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "apiserver client CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params =
        rcgen::CertificateParams::new(vec!["kube-apiserver".to_string()]).unwrap();
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
    // A certificate from another CA must not do.
    let stranger = bundle();

    let mut paths = write_pair(&dir, &b);
    let ca_path = dir.path("client-ca.crt");
    replace(&ca_path, &ca_cert.pem());
    paths.client_ca = Some(ca_path);
    let server = Running::start(Settings::local(paths)).await;
    let body = fixtures()[0].1.clone();

    let anonymous = client_config(&[&b.ca_cert_pem], None);
    assert!(
        refused(server.addr, &anonymous, &body).await,
        "a client without a certificate was served"
    );

    let wrong = client_config(
        &[&b.ca_cert_pem],
        Some((&stranger.cert_pem, &stranger.key_pem)),
    );
    assert!(
        refused(server.addr, &wrong, &body).await,
        "a client certificate from another CA was accepted"
    );

    let known = client_config(
        &[&b.ca_cert_pem],
        Some((&client_cert.pem(), &client_key.serialize_pem())),
    );
    let (status, _) = post_once(server.addr, &known, "/mutate", body).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_turns_readiness_off() {
    let (_dir, b, mut settings) = local("shutdown");
    // Long enough to observe /readyz failing while requests are still served.
    settings.shutdown_delay = Duration::from_secs(5);
    // The bodies are sent only after the drain has started: give them all the time they need.
    settings.limits.body_timeout = DEADLINE;
    let mut server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    let body = task_review();

    // Requests in flight: headers sent with `Expect: 100-continue`; the server's "100 Continue"
    // proves the handler is running and waiting for the body.
    let mut in_flight = Vec::new();
    for _ in 0..8 {
        let mut s = connect(server.addr, &config).await.unwrap();
        s.write_all(
            format!(
                "POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (status, _) = response_of(&mut s).await;
        assert_eq!(status, 100);
        in_flight.push(s);
    }
    let mut idle = Client::connect(server.addr, &config).await.unwrap();
    assert_eq!(idle.get("/readyz").await.unwrap(), 200);

    server.shutdown();
    // Readiness turns false while the server still answers.
    eventually("/readyz fails", || async {
        match Client::connect(server.addr, &config).await {
            Ok(mut c) => c.get("/readyz").await.is_ok_and(|s| s == 503),
            Err(_) => false,
        }
    })
    .await;
    // Then it stops accepting connections.
    eventually("the listener closes", || async {
        TcpStream::connect(server.addr).await.is_err()
    })
    .await;

    // Every request in flight completes with a full reply.
    for mut s in in_flight {
        s.write_all(&body).await.unwrap();
        let (status, reply) = response_of(&mut s).await;
        assert_eq!(status, 200);
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert!(reply["response"]["patch"].is_string());
    }
    tokio::time::timeout(DEADLINE, &mut server.done)
        .await
        .unwrap()
        .unwrap();
}

/// The binary itself: `serve --dev` prints where it listens, and a real SIGTERM ends it with 0.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero() {
    let dir = TempDir::new("sigterm");
    let mut server = DevServer::start(&dir.path("certs"), |c| {
        c.args(["--metrics-listen", "127.0.0.1:0"]);
    })
    .await;
    let curl = tokio::time::timeout(DEADLINE, server.stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(curl.trim_start().starts_with("curl "), "{curl}");
    assert!(curl.contains("/mutate"), "{curl}");
    let ca = std::fs::read_to_string(dir.path("certs").join("ca.crt")).unwrap();
    let config = client_config(&[&ca], None);
    let (status, _) = post_once(server.addr, &config, "/mutate", fixtures()[0].1.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(server.terminate().await.code(), Some(0));
}

/// With the standard OTLP variables set, the server exports its spans, continuing the
/// `traceparent` it was sent, and flushes them when SIGTERM stops it.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_otlp_endpoint_and_continue_traceparent() {
    // A collector that records what is posted to it.
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let (posted_tx, mut posted) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = collector.accept().await else {
                return;
            };
            let posted_tx = posted_tx.clone();
            tokio::spawn(async move {
                while let Ok(message) = read_message(&mut s).await {
                    let _ = posted_tx.send(message);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });

    let dir = TempDir::new("otlp");
    let mut server = DevServer::start(&dir.path("certs"), |c| {
        c.args(["--metrics-listen", "127.0.0.1:0"])
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{collector_addr}"),
            )
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SDK_DISABLED");
    })
    .await;
    let addr = server.addr;
    let ca = std::fs::read_to_string(dir.path("certs").join("ca.crt")).unwrap();
    let config = client_config(&[&ca], None);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = fixtures()[0].1.clone();
    let mut s = connect(addr, &config).await.unwrap();
    s.write_all(
        format!(
            "POST /mutate HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&body).await.unwrap();
    let (status, _) = response_of(&mut s).await;
    assert_eq!(status, 200);
    drop(s);
    assert_eq!(server.terminate().await.code(), Some(0));

    // The span carries the caller's trace id (raw bytes in the protobuf).
    let want: Vec<u8> = (0..trace_id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&trace_id[i..i + 2], 16).unwrap())
        .collect();
    let (head, export) = tokio::time::timeout(DEADLINE, posted.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(head.starts_with("POST /v1/traces "), "{head}");
    assert!(
        export.windows(want.len()).any(|w| w == want.as_slice()),
        "the exported span does not continue the traceparent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_file_is_used_and_an_invalid_one_refused() {
    let (dir, b, mut settings) = local("policy");
    let policy = dir.path("policy.yaml");
    let endpoint = |host: &str| {
        format!(
            "profile: otlp\nexporter:\n  endpoint: http://{host}:4318\n  protocol: http/protobuf\n"
        )
    };
    replace(&policy, &endpoint("collector-one"));
    settings.policy = Some(policy.clone());
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    let body = task_review();
    let patch_of = |reply: Bytes| -> String {
        let v: Value = serde_json::from_slice(&reply).unwrap();
        let patch = v["response"]["patch"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(patch)
                .unwrap(),
        )
        .unwrap()
    };
    let (_, reply) = post_once(server.addr, &config, "/mutate", body.clone()).await;
    assert!(patch_of(reply).contains("http://collector-one:4318"));

    replace(&policy, &endpoint("collector-two"));
    eventually("the new policy is used", || async {
        let (_, reply) = post_once(server.addr, &config, "/mutate", body.clone()).await;
        patch_of(reply).contains("http://collector-two:4318")
    })
    .await;

    let refused = "lightstep_tekton_webhook_reloads_total{file=\"policy\",result=\"refused\"}";
    replace(
        &policy,
        "profile: otlp\nexporter:\n  protocol: carrier-pigeon\n",
    );
    eventually("the invalid policy is refused", || async {
        server.metric(refused).await >= 1.0
    })
    .await;
    let (status, reply) = post_once(server.addr, &config, "/mutate", body.clone()).await;
    assert_eq!(status, 200);
    assert!(patch_of(reply).contains("http://collector-two:4318"));
}

/// The binary started on an invalid policy file (a ConfigMap applied with a typo, then a
/// restart): it comes up and stays ready, answers every pod on /mutate and /enforce with
/// `allowed: true`, no patch and a warning (never the embedded Lightstep default), says so in
/// its log at every poll and in `policy_valid`, and serves the file once it is fixed.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_on_an_invalid_policy_file_and_takes_the_fixed_one() {
    let dir = TempDir::new("invalid-start");
    let policy = dir.path("policy.yaml");
    let log = dir.path("serve.log");
    let collector = "profile: otlp\nexporter:\n  endpoint: http://collector-one:4318\n";
    replace(&policy, &format!("{collector}sampling:\n  ratio: 2\n"));
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut server = DevServer::start(&dir.path("certs"), |c| {
        c.arg("--policy")
            .arg(&policy)
            .args(["--metrics-listen", &metrics_addr.to_string()])
            .args(["--reload-interval", "1"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap());
    })
    .await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ca = std::fs::read_to_string(dir.path("certs").join("ca.crt")).unwrap();
    let config = client_config(&[&ca], None);
    let mut client = Client::connect(server.addr, &config).await.unwrap();
    assert_eq!(client.get("/readyz").await.unwrap(), 200, "{}", log_text());

    let body = task_review();
    for path in ["/mutate", "/enforce"] {
        let (status, reply) = client.post(path, body.clone()).await.unwrap();
        assert_eq!(status, 200, "{path}");
        let v: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(v["response"]["allowed"], true, "{path}: {v}");
        assert!(v["response"].get("patch").is_none(), "{path}: {v}");
        let warnings = v["response"]["warnings"].to_string();
        assert!(warnings.contains("policy file is invalid"), "{path}: {v}");
    }
    // Still ready: an enforced namespace keeps creating pods.
    assert_eq!(client.get("/readyz").await.unwrap(), 200);

    let text = scrape(metrics_addr).await;
    assert_eq!(
        metric_of(&text, "lightstep_tekton_webhook_policy_valid"),
        0.0,
        "{text}"
    );
    for mode in ["inject", "enforce"] {
        let series = format!(
            "lightstep_tekton_webhook_admissions_total{{mode=\"{mode}\",outcome=\"no-policy\"}}"
        );
        assert_eq!(metric_of(&text, &series), 1.0, "{series}\n{text}");
    }
    // Said at the start and again at every poll, naming the field.
    eventually("the log repeats the problem", || async {
        log_text()
            .lines()
            .filter(|l| l.contains("policy file invalid") && l.contains("sampling.ratio"))
            .count()
            >= 2
    })
    .await;

    // Fixed: the file's policy is served from the next poll on.
    replace(&policy, collector);
    eventually("the fixed policy is served", || async {
        let (_, reply) = post_once(server.addr, &config, "/mutate", body.clone()).await;
        let v: Value = serde_json::from_slice(&reply).unwrap();
        let patch = v["response"]["patch"].as_str().unwrap_or_default();
        let patch = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        String::from_utf8_lossy(&patch).contains("http://collector-one:4318")
    })
    .await;
    let text = scrape(metrics_addr).await;
    assert_eq!(
        metric_of(&text, "lightstep_tekton_webhook_policy_valid"),
        1.0
    );
    assert!(log_text().contains("policy reloaded"), "{}", log_text());
    drop(client);
    assert_eq!(server.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_replies_is_cut_off() {
    let (_dir, b, mut settings) = local("no-read");
    settings.limits.write_timeout = Duration::from_secs(2);
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    let big = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tekton-40-steps.json"),
    )
    .unwrap();

    // Pipelined reviews of the 40-step pod, whose replies (about 60 KB each) are never read:
    // the socket buffers fill, and the server's reply write has to wait.
    let stream = connect(server.addr, &config).await.unwrap();
    let (unread, mut tx) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            big.len()
        );
        for _ in 0..100 {
            tx.write_all(head.as_bytes()).await?;
            tx.write_all(&big).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let open = "lightstep_tekton_webhook_open_connections";
    eventually("the server closes the connection", || async {
        server.metric(open).await == 0.0
    })
    .await;
    // The writer fails once the server has closed (it cannot get through 36 MB otherwise).
    let written = tokio::time::timeout(DEADLINE, writer)
        .await
        .unwrap()
        .unwrap();
    assert!(
        written.is_err(),
        "the server read every request without the replies being read"
    );
    drop(unread);

    // Others are served.
    let (status, _) = post_once(server.addr, &config, "/mutate", fixtures()[0].1.clone()).await;
    assert_eq!(status, 200);
}

/// More silent connections than `--max-connections` (some after their TLS handshake, the rest
/// not even that) cannot keep an honest client out: each holds its slot only until its timeout,
/// then it is cut off, and the client waiting in the accept queue is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_limit_cannot_starve_a_client() {
    const SLOTS: u32 = 4;
    let (_dir, b, mut settings) = local("idle");
    settings.limits.max_connections = SLOTS;
    settings.limits.handshake_timeout = Duration::from_secs(1);
    settings.limits.header_timeout = Duration::from_secs(1);
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);

    // Every slot taken by a client that completed TLS and then sends nothing...
    let mut silent_tls = Vec::new();
    for _ in 0..SLOTS {
        silent_tls.push(connect(server.addr, &config).await.unwrap());
    }
    // ...and twice as many behind them in the accept queue that never start TLS.
    let mut silent_tcp = Vec::new();
    for _ in 0..2 * SLOTS {
        silent_tcp.push(TcpStream::connect(server.addr).await.unwrap());
    }

    // The honest client queues behind all of them and is served once their timeouts free slots.
    let body = fixtures()[0].1.clone();
    let (status, _) =
        tokio::time::timeout(DEADLINE, post_once(server.addr, &config, "/mutate", body))
            .await
            .expect("an honest client was kept out by idle connections");
    assert_eq!(status, 200);

    // Every silent connection was cut off (EOF or reset), none is held open.
    for mut s in silent_tls {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a silent TLS connection was kept open");
    }
    for mut s in silent_tcp {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a silent TCP connection was kept open");
    }
    eventually("no connection left open", || async {
        server
            .metric("lightstep_tekton_webhook_open_connections")
            .await
            == 0.0
    })
    .await;
    assert!(
        server
            .metric("lightstep_tekton_webhook_tls_handshake_failures_total")
            .await
            >= (2 * SLOTS) as f64
    );
}

/// A request head over `MAX_HEADER_BYTES` gets 431 and its connection closed; others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused() {
    use lightstep_tekton_webhook::serve::MAX_HEADER_BYTES;
    let (_dir, b, settings) = local("big-head");
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);

    let mut s = connect(server.addr, &config).await.unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(MAX_HEADER_BYTES + 1)
    );
    // The server may answer and close before it has read all of it.
    let _ = s.write_all(head.as_bytes()).await;
    let (status, _) = response_of(&mut s).await;
    assert_eq!(status, 431);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("the connection is closed after 431");

    // A head just under the limit is fine.
    let mut ok = Client::connect(server.addr, &config).await.unwrap();
    let request = hyper::Request::post("/mutate")
        .header("host", "localhost")
        .header("x-padding", "a".repeat(MAX_HEADER_BYTES / 2))
        .body(Full::new(Bytes::from(fixtures()[0].1.clone())))
        .unwrap();
    let response = ok.sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
}

/// TLS 1.2 is offered only with AEAD suites (each TLS 1.2 suite the client knows is tried
/// alone); TLS 1.3 works; and the only application protocol is HTTP/1.1: a client that offers
/// ALPN `h2` only is refused, one that offers both gets `http/1.1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_offers_aead_suites_on_1_2_and_1_3_and_http1_only() {
    let (_dir, b, settings) = local("tls-params");
    let server = Running::start(settings).await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(b.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let client = |suites: Vec<rustls::SupportedCipherSuite>,
                  versions: &[&'static rustls::SupportedProtocolVersion],
                  alpn: &[&[u8]]| {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..rustls::crypto::ring::default_provider()
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    };

    let mut accepted = Vec::new();
    for suite in rustls::crypto::ring::ALL_CIPHER_SUITES {
        if suite.version() != &rustls::version::TLS12 {
            continue;
        }
        let config = client(vec![*suite], &[&rustls::version::TLS12], &[]);
        if let Ok(tls) = connect(server.addr, &config).await {
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_2)
            );
            let negotiated = conn.negotiated_cipher_suite().unwrap().suite();
            let name = format!("{negotiated:?}");
            assert!(
                name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"),
                "TLS 1.2 suite without AEAD: {name}"
            );
            accepted.push(name);
        }
    }
    assert!(!accepted.is_empty(), "no TLS 1.2 suite accepted");

    let tls13 = client(
        rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec(),
        &[&rustls::version::TLS13],
        &[],
    );
    let tls = connect(server.addr, &tls13).await.unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    let h2_only = client(suites.clone(), versions, &[b"h2"]);
    let refused = connect(server.addr, &h2_only)
        .await
        .expect_err("a client offering only h2 was accepted");
    assert!(
        refused.to_string().contains("NoApplicationProtocol"),
        "{refused}"
    );
    let both = client(suites, versions, &[b"h2", b"http/1.1"]);
    let tls = connect(server.addr, &both).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

/// A real-looking token, planted where a user could put one: an annotation, env values (one as
/// the user's own OTLP headers), and a field of the wrong type. It may come back only inside
/// the pod where the user put it (`mutate --output pod`), never in anything the webhook makes:
/// replies, patches, error replies, logs in text and JSON (at debug), /metrics, `--explain`.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_of_a_run_contains_a_secret_value() {
    use std::process::Stdio;
    const TOKEN: &str = "lsat_7Hq2v9XkR4mN8pW3zL6yT1cB5dJ0fG2s";
    let dir = TempDir::new("secret");
    let mut review: Value = serde_json::from_slice(&task_review()).unwrap();
    let object = &mut review["request"]["object"];
    object["metadata"]["annotations"]["team.example.com/debug-token"] = TOKEN.into();
    let env = object["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap();
    env.push(serde_json::json!({"name": "MY_TOKEN", "value": TOKEN}));
    env.push(serde_json::json!({"name": "OTEL_EXPORTER_OTLP_HEADERS",
                                "value": format!("lightstep-access-token={TOKEN}")}));
    env.push(serde_json::json!({"name": "LS_ACCESS_TOKEN", "value": TOKEN}));
    env.push(serde_json::json!({"name": "API_KEY",
                                "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}}));
    let planted = serde_json::to_vec(&review).unwrap();
    let in_input = String::from_utf8_lossy(&planted).matches(TOKEN).count();
    // The token where a string does not belong: the decoder's error would quote it.
    let mut mistyped = review.clone();
    mistyped["request"]["object"]["spec"]["containers"] = TOKEN.into();
    let mistyped = serde_json::to_vec(&mistyped).unwrap();
    let not_a_review = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":"{TOKEN}"}}"#
    )
    .into_bytes();

    let mut outputs: Vec<(String, String)> = Vec::new();
    for format in ["text", "json"] {
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut server = DevServer::start(&dir.path("certs"), |c| {
            c.args(["--log-format", format])
                .arg("--metrics-listen")
                .arg(metrics_addr.to_string())
                .env("RUST_LOG", "debug")
                .stderr(Stdio::piped());
        })
        .await;
        let mut stderr = server.child.stderr.take().unwrap();
        let logs = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = stderr.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        });
        let addr = server.addr;
        let ca = std::fs::read_to_string(dir.path("certs").join("ca.crt")).unwrap();
        let config = client_config(&[&ca], None);
        let mut client = Client::connect(addr, &config).await.unwrap();
        for path in ["/mutate", "/enforce"] {
            let (status, body) = client.post(path, planted.clone()).await.unwrap();
            assert_eq!(status, 200);
            let v: Value = serde_json::from_slice(&body).unwrap();
            let patch = base64::engine::general_purpose::STANDARD
                .decode(v["response"]["patch"].as_str().unwrap())
                .unwrap();
            // Every reference the patch adds is a reference only.
            let ops: Value = serde_json::from_slice(&patch).unwrap();
            let text = ops.to_string();
            // Enforce mode replaces the user's exporter settings and token with the policy's.
            if path == "/enforce" {
                assert!(text.contains("secretKeyRef"), "no token reference: {text}");
            }
            for op in ops.as_array().unwrap() {
                let values = match &op["value"] {
                    Value::Array(a) => a.clone(),
                    other => vec![other.clone()],
                };
                for e in values {
                    if e.get("valueFrom").is_some() {
                        assert!(e.get("value").is_none(), "value beside valueFrom: {e}");
                    }
                }
            }
            outputs.push((
                format!("{path} reply ({format})"),
                String::from_utf8_lossy(&body).into(),
            ));
            outputs.push((
                format!("{path} patch ({format})"),
                String::from_utf8_lossy(&patch).into(),
            ));
            for (what, body) in [("mistyped", &mistyped), ("not a review", &not_a_review)] {
                let (status, body) = client.post(path, body.clone()).await.unwrap();
                assert!(status == 200 || status == 400, "{what}: {status}");
                outputs.push((
                    format!("{path} {what} reply ({format})"),
                    String::from_utf8_lossy(&body).into(),
                ));
            }
        }
        let page = scrape(metrics_addr).await;
        assert!(
            page.contains("allowed-on-error") || page.contains("denied"),
            "{page}"
        );
        outputs.push((format!("/metrics ({format})"), page));

        server.terminate().await;
        let logs = tokio::time::timeout(DEADLINE, logs).await.unwrap().unwrap();
        assert!(logs.contains("pod could not be decoded"), "{logs}");
        outputs.push((format!("log ({format})"), logs));
    }

    // The preview command, on the same inputs.
    let planted_file = dir.path("planted.json");
    std::fs::write(&planted_file, &planted).unwrap();
    let mistyped_file = dir.path("mistyped.json");
    std::fs::write(&mistyped_file, &mistyped).unwrap();
    let mutate = |args: &[&str], file: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lightstep-tekton-webhook"))
            .arg("mutate")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for mode in ["inject", "enforce"] {
        for output in ["patch", "review"] {
            let (stdout, stderr) = mutate(
                &["--explain", "--mode", mode, "--output", output],
                &planted_file,
            );
            assert!(stderr.contains("step-"), "no explanation: {stderr}");
            outputs.push((format!("mutate --output {output} --mode {mode}"), stdout));
            outputs.push((format!("mutate --explain --mode {mode}"), stderr));
        }
        let (stdout, stderr) = mutate(&["--mode", mode], &mistyped_file);
        outputs.push((format!("mutate mistyped --mode {mode}"), stdout + &stderr));
        // The patched pod echoes the user's pod: the token only where the user put it.
        let (pod, _) = mutate(&["--mode", mode, "--output", "pod"], &planted_file);
        let in_pod = pod.matches(TOKEN).count();
        // (Enforce mode replaces the user's own token and headers, so it may be fewer.)
        assert!(
            in_pod <= in_input,
            "the token was copied within the pod: {in_pod} times, {in_input} in the input"
        );
    }

    for (what, text) in &outputs {
        assert!(!text.contains(TOKEN), "{what} contains the token:\n{text}");
    }
}

/// A chunked body whose framing is malformed is the client's mistake, not a slow client: each
/// kind gets 400 and counts as `reason="bad-framing"`, never 408 or `body-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_framing_gets_400_of_its_own() {
    let (_dir, b, settings) = local("framing");
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    // hyper refuses chunk extensions past 16 KiB in one body.
    let long_extension = format!("3;{}\r\nabc\r\n0\r\n\r\n", "e".repeat(20 * 1024));
    let cases = [
        ("chunk size not hex", "zz\r\nabc\r\n0\r\n\r\n".to_string()),
        (
            "chunk size overflows",
            "1ffffffffffffffff\r\nabc\r\n0\r\n\r\n".to_string(),
        ),
        ("bare LF after the size", "3\nabc\r\n0\r\n\r\n".to_string()),
        ("over-long chunk extension", long_extension),
    ];
    for (what, body) in &cases {
        let mut s = connect(server.addr, &config).await.unwrap();
        let request =
            format!("POST /mutate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{body}");
        // The server may answer and close before it has read all of it.
        let _ = s.write_all(request.as_bytes()).await;
        let (status, reply) = response_of(&mut s).await;
        assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&reply));
    }
    let metric = |reason: &str| {
        format!("lightstep_tekton_webhook_http_rejections_total{{reason=\"{reason}\"}}")
    };
    assert_eq!(
        server.metric(&metric("bad-framing")).await,
        cases.len() as f64
    );
    assert_eq!(server.metric(&metric("body-timeout")).await, 0.0);
}

/// A figure of the process's /proc status in KiB (`VmHWM` is its peak RSS).
fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Connections that each send a body just under the 6 MiB limit and stall cannot make the
/// server hold more than its body budget (24 MiB by default): the real binary's peak RSS stays
/// far under what 32 such bodies weigh (192 MiB; the install's memory limit is 128 MiB).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_near_limit_bodies_are_bounded_by_the_body_budget() {
    const CONNECTIONS: usize = 32;
    const BODY: usize = 6 * 1024 * 1024 - 1;
    // The budget (24 MiB), the read buffers of 32 connections, and the process itself.
    const PEAK_BOUND_KIB: u64 = 96 * 1024;
    let dir = TempDir::new("budget");
    let mut server = DevServer::start(&dir.path("certs"), |c| {
        c.args(["--metrics-listen", "127.0.0.1:0", "--read-timeout", "3"]);
    })
    .await;
    let pid = server.child.id().unwrap();
    let ca = std::fs::read_to_string(dir.path("certs").join("ca.crt")).unwrap();
    let config = client_config(&[&ca], None);
    let body = Arc::new(vec![b' '; BODY - 1]);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let (mut rx, mut tx) = tokio::io::split(connect(server.addr, &config).await.unwrap());
        let body = body.clone();
        // Every byte but the last; the write stops where the server stops reading.
        let writer = tokio::spawn(async move {
            let head =
                format!("POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-length: {BODY}\r\n\r\n");
            tx.write_all(head.as_bytes()).await?;
            tx.write_all(&body).await?;
            // Keep the connection open (and the body incomplete) until the server answers.
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(tx)
        });
        clients.push(tokio::spawn(async move {
            let answer = read_response(&mut rx).await;
            writer.abort();
            answer
        }));
    }
    // Each is answered once its body timeout passes: 408 while reading, 503 while waiting.
    for client in clients {
        let (status, _) = tokio::time::timeout(DEADLINE, client)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(status == 408 || status == 503, "{status}");
    }
    let peak = proc_status_kib(pid, "VmHWM");
    assert!(
        peak < PEAK_BOUND_KIB,
        "peak RSS {peak} KiB with {CONNECTIONS} stalled bodies"
    );
    assert_eq!(server.terminate().await.code(), Some(0));
}

/// A review sent as one-byte chunks is answered like the same review sent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_in_one_byte_chunks_is_answered() {
    let (_dir, b, settings) = local("one-byte-chunks");
    let server = Running::start(settings).await;
    let config = client_config(&[&b.ca_cert_pem], None);
    let review = task_review();
    let (_, whole) = post_once(server.addr, &config, "/mutate", review.clone()).await;
    let mut request =
        b"POST /mutate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for byte in &review {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut s = connect(server.addr, &config).await.unwrap();
    s.write_all(&request).await.unwrap();
    let (status, chunked) = response_of(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(chunked, whole.to_vec());
}

/// The metrics port is served within the same limits as the webhook's: a request head that
/// stalls is cut off after the header timeout, one past 32 KiB gets 431, silent connections
/// beyond its connection limit do not keep a scrape out, and only HTTP/1.1 is spoken (an h2c
/// prior-knowledge preface gets no HTTP/2 SETTINGS frame back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_is_bounded_like_the_webhook_port() {
    const SLOTS: u32 = 4;
    let (_dir, _b, mut settings) = local("admin-limits");
    settings.limits.max_connections = SLOTS;
    settings.limits.header_timeout = Duration::from_secs(1);
    let server = Running::start(settings).await;
    let addr = server.metrics_addr;

    // h2c first, while there are free slots: an HTTP/2 server would answer with SETTINGS.
    let mut h2c = TcpStream::connect(addr).await.unwrap();
    h2c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, h2c.read_to_end(&mut answer))
        .await
        .expect("an h2c connection is closed");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "h2c answered: {:?}",
        &answer[..answer.len().min(16)]
    );

    // A head past the size limit: 431 (or closed), not buffered.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let mut head = b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-padding: ".to_vec();
    head.resize(head.len() + 400 * 1024, b'a');
    let _ = big.write_all(&head).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, big.read_to_end(&mut answer))
        .await
        .expect("an oversized head is not cut off");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(64)])
    );

    // Partial heads in every slot, and more silent connections queued behind them.
    let mut partial = Vec::new();
    for _ in 0..SLOTS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        partial.push(s);
    }
    let mut silent = Vec::new();
    for _ in 0..2 * SLOTS {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // The scrape queues behind them and is answered once their header timeouts free slots.
    let text = tokio::time::timeout(DEADLINE, server.metrics())
        .await
        .expect("a scrape was kept out by idle connections");
    assert!(text.contains("open_connections"), "{text}");
    for mut s in partial.into_iter().chain(silent) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a partial or silent head was kept open");
    }
}

/// Every metric docs/metrics.md lists is on a fresh server's first scrape, with its HELP and
/// TYPE, and every label set the table names is a series at 0: an alert on `increase(…)` then
/// sees the first event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_shows_every_documented_metric_and_label_set() {
    const PREFIX: &str = "lightstep_tekton_webhook_";
    let (_dir, _b, settings) = local("fresh-metrics");
    let server = Running::start(settings).await;
    let text = server.metrics().await;
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"))
            .unwrap();

    // Label values as the table gives them: `label` (`a`, `b`: ...), or a label named earlier.
    let mut known: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut checked = 0;
    for row in docs.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (name, kind, labels) = (cells[1].trim_matches('`'), cells[2], cells[3]);
        let mut sets: Vec<Vec<(String, String)>> = vec![Vec::new()];
        let mut rest = labels;
        while let Some(start) = rest.find('`') {
            let after = &rest[start + 1..];
            let end = after.find('`').unwrap();
            let label = after[..end].to_string();
            rest = &after[end + 1..];
            if let Some(list) = rest.strip_prefix(" (") {
                let close = list.find(')').unwrap();
                let values: Vec<String> = list[..close]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(String::from)
                    .collect();
                known.insert(label.clone(), values);
                rest = &list[close + 1..];
            }
            let values = known
                .get(&label)
                .unwrap_or_else(|| panic!("{name}: values of {label}"));
            let mut product = Vec::new();
            for set in &sets {
                for value in values {
                    let mut set = set.clone();
                    set.push((label.clone(), value.clone()));
                    product.push(set);
                }
            }
            sets = product;
        }
        let family = name.strip_suffix("_total").unwrap_or(name);
        for line in [
            format!("# HELP {PREFIX}{family} "),
            format!("# TYPE {PREFIX}{family} {kind}"),
        ] {
            assert!(text.contains(&line), "{line:?} missing:\n{text}");
        }
        if kind == "gauge" {
            continue;
        }
        let series = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        for set in sets {
            let labels: Vec<String> = set.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", labels.join(","))
            };
            let line = format!("{PREFIX}{series}{labels} 0\n");
            assert!(text.contains(&line), "{line:?} missing:\n{text}");
            checked += 1;
        }
    }
    // 10 admission outcomes, 8 skips, 2 warnings, 2 + 2 histograms, 6 rejections, 1 handshake
    // counter, 4 reloads: the table was read.
    assert!(checked >= 30, "only {checked} series checked");
}
