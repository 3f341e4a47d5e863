//! Load tool: drives `lightstep-tekton-webhook serve` over TLS with keep-alive connections and
//! reports throughput, latency percentiles and the server's peak memory.
//!
//! ```text
//! cargo bench --bench load                       # the three standard scenarios (about 40 s)
//! cargo bench --bench load -- --scenario throughput --concurrency 32 --duration 20
//! cargo bench --bench load -- --scenario custom --rate 5000 --fixture tests/fixtures/plain-pod.json
//! cargo bench --bench load -- --target 127.0.0.1:8443 --ca certs/dev/ca.crt --server-pid 1234
//! ```
//!
//! Without `--target`, it starts the release binary (`serve --dev` on 127.0.0.1, fresh
//! certificates in a temporary directory, logs to /dev/null) and stops it with SIGTERM at the
//! end. Traffic goes to loopback only, and every run is bounded by `--duration`.
//!
//! Each connection sends one review at a time (as the API server does on a connection) and
//! measures from writing the request to having read the whole reply. With `--rate`, the rate is
//! split evenly over the connections and each one paces its sends; latency is measured from the
//! actual send, so the timer's millisecond granularity does not count as server latency.
//! Peak RSS is VmHWM from /proc/PID/status of the server process.
//!
//! The standard scenarios and their targets (this project's issue 3, on a 2-core machine with the
//! load tool on the same machine):
//! - `throughput`: the 14-28 KB Tekton fixtures as fast as possible: at least 10,000 reviews/s;
//! - `rate`: the same fixtures at 1,000 reviews/s: p99 under 1 ms;
//! - `large`: the 40-step pod (360 KB) at 100 reviews/s: p99 under 10 ms;
//! - and the server's peak RSS under 50 MB across all of them.
//!
//! Two worst cases of issue 14 (D2), run alone on a fresh server so its peak RSS is theirs:
//! - `one-byte-chunks`: one review padded to the 6 MiB body limit and sent as one-byte chunks
//!   (`1\r\nX\r\n`, 36 MB on the wire): its status, the time to the answer and the peak RSS;
//! - `stalled-bodies`: `--concurrency` connections (say 40) that each send 6 MiB − 1 bytes of a
//!   6 MiB body and stall until the server answers them (`--read-timeout` later).
//!
//! ```text
//! cargo bench --bench load -- --scenario one-byte-chunks --read-timeout 60
//! cargo bench --bench load -- --scenario stalled-bodies --concurrency 40 --read-timeout 5
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

mod https;
use https::{client_config, connect};

/// The "16 KB fixtures" are the Tekton pods between these sizes (14 to 28 KB): the plain pods
/// (3 KB, skipped at once) would flatter the figures, and the 40-step pod (360 KB) is its own
/// scenario.
const SMALL_FIXTURE_MIN: u64 = 8 * 1024;
const SMALL_FIXTURE_MAX: u64 = 64 * 1024;

/// The longest a run may last whatever the arguments say, so a mistake cannot leave traffic
/// running: ten minutes.
const MAX_DURATION_S: u64 = 600;

#[derive(Debug, Parser)]
#[command(name = "load", about = "Load tool for lightstep-tekton-webhook serve")]
struct Args {
    /// Which scenario to run; `all` runs throughput, rate and large one after the other.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,

    /// Keep-alive connections (custom scenario; the standard ones choose their own).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,

    /// Reviews per second over all connections; 0 = as fast as they go (custom scenario).
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// Seconds to measure, per scenario.
    #[arg(long, default_value_t = 10)]
    duration: u64,

    /// Seconds of unmeasured traffic before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,

    /// AdmissionReview files to post, round robin (custom scenario) [default: every fixture
    /// of 8 to 64 KiB in tests/fixtures].
    #[arg(long)]
    fixture: Vec<PathBuf>,

    /// Path to post to.
    #[arg(long, default_value = "/mutate")]
    path: String,

    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,

    /// An already running server to target instead of starting one (needs --ca).
    #[arg(long, requires = "ca")]
    target: Option<SocketAddr>,

    /// CA certificate that signed the target's serving certificate.
    #[arg(long)]
    ca: Option<PathBuf>,

    /// Process id of the target server, to report its peak RSS.
    #[arg(long)]
    server_pid: Option<u32>,

    /// `--read-timeout` of the server this tool starts (seconds).
    #[arg(long, default_value_t = 10)]
    read_timeout: u64,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Throughput,
    Rate,
    Large,
    Custom,
    /// One 6 MiB review in one-byte chunks.
    OneByteChunks,
    /// `--concurrency` near-limit bodies that stall.
    StalledBodies,
}

/// The server's body limit (`serve::MAX_BODY`), which the attack scenarios fill.
const MAX_BODY: usize = 6 * 1024 * 1024;

/// A target as text, and its check.
type Target = (&'static str, fn(&Report) -> bool);

struct Plan {
    name: &'static str,
    fixtures: Vec<(String, Bytes)>,
    concurrency: usize,
    rate: u64,
    /// The target to check, as text, and the check.
    target: Option<Target>,
}

struct Report {
    reviews: usize,
    errors: usize,
    seconds: f64,
    /// Microseconds, sorted.
    latencies: Vec<u32>,
}

impl Report {
    fn per_second(&self) -> f64 {
        self.reviews as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1] as f64 / 1000.0
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let duration = Duration::from_secs(args.duration.clamp(1, MAX_DURATION_S));
    let warmup = Duration::from_secs(args.warmup.min(MAX_DURATION_S));
    let plans = plans(&args)?;

    let mut server = None;
    let (addr, ca, pid) = match args.target {
        Some(addr) => {
            let ca = std::fs::read_to_string(args.ca.as_ref().unwrap())
                .map_err(|e| format!("--ca: {e}"))?;
            (addr, ca, args.server_pid)
        }
        None => {
            let s = Spawned::start(args.read_timeout).await?;
            let info = (s.addr, s.ca.clone(), Some(s.pid));
            server = Some(s);
            info
        }
    };
    let tls = client_config(&ca)?;
    if matches!(
        args.scenario,
        Scenario::OneByteChunks | Scenario::StalledBodies
    ) {
        let outcome = match args.scenario {
            Scenario::OneByteChunks => one_byte_chunks(addr, &tls).await,
            _ => stalled_bodies(addr, &tls, args.concurrency.max(1)).await,
        };
        if let Some(pid) = pid {
            match https::proc_status_kib(pid, "VmHWM") {
                Some(kib) => println!(
                    "server peak RSS (VmHWM): {:.1} MB",
                    kib as f64 * 1024.0 / 1e6
                ),
                None => println!("server peak RSS: /proc/{pid}/status not readable"),
            }
        }
        if let Some(s) = server {
            s.stop().await;
        }
        return outcome;
    }
    println!(
        "load: server {addr}{}, {} client threads, {} s per scenario after {} s warm-up",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        args.client_threads,
        duration.as_secs(),
        warmup.as_secs()
    );
    println!(
        "{:<11} {:>4} {:>6} {:>8} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8}  target",
        "scenario",
        "conn",
        "rate",
        "reviews",
        "errors",
        "reviews/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms"
    );
    let mut all_met = true;
    for plan in &plans {
        if !warmup.is_zero() {
            drive(addr, &tls, plan, &args.path, warmup).await?;
        }
        let report = drive(addr, &tls, plan, &args.path, duration).await?;
        let verdict = match plan.target {
            Some((text, check)) => {
                let ok = check(&report) && report.errors == 0;
                all_met &= ok;
                format!("{text}: {}", if ok { "met" } else { "MISSED" })
            }
            None => String::new(),
        };
        println!(
            "{:<11} {:>4} {:>6} {:>8} {:>6} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3}  {verdict}",
            plan.name,
            plan.concurrency,
            if plan.rate == 0 {
                "max".to_string()
            } else {
                plan.rate.to_string()
            },
            report.reviews,
            report.errors,
            report.per_second(),
            report.percentile(0.50),
            report.percentile(0.99),
            report.percentile(0.999),
            report.latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
        );
    }
    if let Some(pid) = pid {
        match https::proc_status_kib(pid, "VmHWM") {
            Some(kib) => {
                let mb = kib as f64 * 1024.0 / 1e6;
                let ok = mb < 50.0;
                all_met &= ok;
                println!(
                    "server peak RSS (VmHWM): {mb:.1} MB  (target < 50 MB: {})",
                    if ok { "met" } else { "MISSED" }
                );
            }
            None => println!("server peak RSS: /proc/{pid}/status not readable"),
        }
    }
    if let Some(s) = server {
        s.stop().await;
    }
    if args.scenario != Scenario::Custom {
        println!(
            "targets: {}",
            if all_met { "all met" } else { "some MISSED" }
        );
    }
    Ok(())
}

fn plans(args: &Args) -> Result<Vec<Plan>, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let small = || -> Result<Vec<(String, Bytes)>, String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let p = entry.map_err(|e| e.to_string())?.path();
            let small = std::fs::metadata(&p)
                .is_ok_and(|m| (SMALL_FIXTURE_MIN..=SMALL_FIXTURE_MAX).contains(&m.len()));
            if p.extension().is_some_and(|x| x == "json") && small {
                out.push(read_fixture(&p)?);
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    };
    let large = || read_fixture(&dir.join("tekton-40-steps.json")).map(|f| vec![f]);
    let throughput = || -> Result<Plan, String> {
        Ok(Plan {
            name: "throughput",
            fixtures: small()?,
            concurrency: 16,
            rate: 0,
            target: Some((">= 10000 reviews/s", |r| r.per_second() >= 10_000.0)),
        })
    };
    let rate = || -> Result<Plan, String> {
        Ok(Plan {
            name: "rate",
            fixtures: small()?,
            concurrency: 4,
            rate: 1000,
            target: Some(("p99 < 1 ms", |r| r.percentile(0.99) < 1.0)),
        })
    };
    let large_plan = || -> Result<Plan, String> {
        Ok(Plan {
            name: "large",
            fixtures: large()?,
            concurrency: 4,
            rate: 100,
            target: Some(("p99 < 10 ms", |r| r.percentile(0.99) < 10.0)),
        })
    };
    Ok(match args.scenario {
        Scenario::All => vec![throughput()?, rate()?, large_plan()?],
        Scenario::Throughput => vec![throughput()?],
        Scenario::Rate => vec![rate()?],
        Scenario::Large => vec![large_plan()?],
        Scenario::OneByteChunks | Scenario::StalledBodies => Vec::new(),
        Scenario::Custom => {
            let fixtures = if args.fixture.is_empty() {
                small()?
            } else {
                args.fixture
                    .iter()
                    .map(|p| read_fixture(p))
                    .collect::<Result<_, _>>()?
            };
            vec![Plan {
                name: "custom",
                fixtures,
                concurrency: args.concurrency.max(1),
                rate: args.rate,
                target: None,
            }]
        }
    })
}

/// A raw TLS stream to the server, for requests hyper's client would not send.
async fn tls_stream(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS to {addr}: {e}"))
}

/// The status line of the server's answer, read until the connection closes.
async fn status_of<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") && stream.read(&mut byte).await.is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    match String::from_utf8_lossy(&head).split(' ').nth(1) {
        Some(status) => status.to_string(),
        None => "closed".into(),
    }
}

/// The `one-byte-chunks` scenario.
async fn one_byte_chunks(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Result<(), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (_, review) = read_fixture(&dir.join("tekton-pipeline-task-traced.json"))?;
    // JSON allows trailing whitespace: the same review, padded to the limit.
    let mut body = review.to_vec();
    body.resize(MAX_BODY, b' ');
    let mut wire = Vec::with_capacity(body.len() * 6 + 128);
    wire.extend_from_slice(
        b"POST /mutate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for byte in &body {
        wire.extend_from_slice(b"1\r\n");
        wire.push(*byte);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let stream = tls_stream(addr, tls).await?;
    let (mut rx, mut tx) = tokio::io::split(stream);
    let started = Instant::now();
    let writer = tokio::spawn(async move { tx.write_all(&wire).await.map(|_| tx) });
    let status = status_of(&mut rx).await;
    let seconds = started.elapsed().as_secs_f64();
    writer.abort();
    println!(
        "one-byte-chunks: {} MiB body as {} one-byte chunks: status {status} after {seconds:.2} s",
        MAX_BODY / (1024 * 1024),
        body.len()
    );
    Ok(())
}

/// The `stalled-bodies` scenario.
async fn stalled_bodies(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    connections: usize,
) -> Result<(), String> {
    let length = MAX_BODY - 1;
    let body = Arc::new(vec![b' '; length - 1]);
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..connections {
        let (mut rx, mut tx) = tokio::io::split(tls_stream(addr, tls).await?);
        let body = body.clone();
        let writer = tokio::spawn(async move {
            let head =
                format!("POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n");
            tx.write_all(head.as_bytes()).await?;
            tx.write_all(&body).await?;
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(tx)
        });
        clients.push(tokio::spawn(async move {
            let status = status_of(&mut rx).await;
            writer.abort();
            status
        }));
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for c in clients {
        *statuses
            .entry(c.await.map_err(|e| e.to_string())?)
            .or_default() += 1;
    }
    println!(
        "stalled-bodies: {connections} connections x {length} bytes of a {length}-byte body, all answered after {:.2} s: {statuses:?}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn read_fixture(path: &Path) -> Result<(String, Bytes), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path.display().to_string(), Bytes::from(bytes)))
}

/// Runs one plan for `duration` and collects the latencies.
async fn drive(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    plan: &Plan,
    path: &str,
    duration: Duration,
) -> Result<Report, String> {
    let fixtures: Arc<Vec<Bytes>> = Arc::new(plan.fixtures.iter().map(|f| f.1.clone()).collect());
    let period = (plan.rate > 0)
        .then(|| Duration::from_secs_f64(plan.concurrency as f64 / plan.rate as f64));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    let concurrency = plan.concurrency;
    for worker in 0..concurrency {
        let tls = tls.clone();
        let fixtures = fixtures.clone();
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr, &tls).await.map_err(|e| e.to_string())?;
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut next = worker;
            // Spread the paced connections over one period so they do not send in lockstep.
            let mut due = period.map(|p| {
                tokio::time::Instant::now() + p.mul_f64(worker as f64 / concurrency as f64)
            });
            while Instant::now() < end {
                if let (Some(p), Some(d)) = (period, due.as_mut()) {
                    tokio::time::sleep_until(*d).await;
                    *d += p;
                }
                let body = fixtures[next % fixtures.len()].clone();
                next += 1;
                let request = hyper::Request::post(path.as_str())
                    .header("host", "localhost")
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .map_err(|e| e.to_string())?;
                let sent = Instant::now();
                let ok = match sender.send_request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        match response.into_body().collect().await {
                            Ok(_) => status == 200,
                            Err(_) => false,
                        }
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    errors += 1;
                    // A broken connection is replaced so the run goes on.
                    sender = connect(addr, &tls).await.map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>((latencies, errors))
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())??;
        latencies.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Report {
        reviews: latencies.len(),
        errors,
        seconds,
        latencies,
    })
}

/// The server this tool started.
struct Spawned {
    child: tokio::process::Child,
    addr: SocketAddr,
    ca: String,
    pid: u32,
    dir: PathBuf,
}

impl Spawned {
    async fn start(read_timeout: u64) -> Result<Spawned, String> {
        let dir = std::env::temp_dir().join(format!("ltw-load-{}", std::process::id()));
        let mut child =
            tokio::process::Command::new(env!("CARGO_BIN_EXE_lightstep-tekton-webhook"))
                .args([
                    "serve",
                    "--dev",
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    "127.0.0.1:0",
                    "--read-timeout",
                ])
                .arg(read_timeout.to_string())
                .arg("--dev-dir")
                .arg(&dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting the server: {e}"))?;
        let pid = child.id().ok_or("server exited at once")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("Development server on https://") {
                    return rest.split_whitespace().next().and_then(|a| a.parse().ok());
                }
            }
            None
        })
        .await
        .map_err(|_| "the server did not start within 60 s")?
        .ok_or("the server did not print its address")?;
        // Keep reading its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ca = std::fs::read_to_string(dir.join("ca.crt")).map_err(|e| e.to_string())?;
        Ok(Spawned {
            child,
            addr,
            ca,
            pid,
            dir,
        })
    }

    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
