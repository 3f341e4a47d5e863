//! Soak: two `serve` replicas under a steady load for minutes while everything a cluster does to
//! them happens at once, counting every request that did not get a good reply.
//!
//! ```text
//! make soak                                        # 3 minutes at 200 reviews/s
//! cargo bench --bench soak -- --duration 600 --rate 400
//! ```
//!
//! What runs, all on 127.0.0.1 and all bounded by `--duration` (at most ten minutes):
//! - two replicas of the release binary (`serve` with a certificate, a policy file,
//!   `--reload-interval 1`, `--shutdown-delay`), reading the same certificate and policy
//!   directories, as two pods mounting the same Secret and ConfigMap;
//! - the certificate directory laid out the way the kubelet mounts a Secret (`tls.crt ->
//!   ..data/tls.crt`, `..data -> ..<timestamp>`), with a new serving certificate from the same CA
//!   swapped in through the `..data` symlink every `--rotate-every` seconds;
//! - the policy directory laid out like a ConfigMap mount and rewritten the same way every
//!   `--policy-every` seconds: valid versions (each one distinct), and every fourth write an
//!   invalid one that the replicas must refuse while they keep the previous policy;
//! - every `--restart-every` seconds, one replica (in turn) gets SIGTERM, must exit 0 after its
//!   drain, and is started again; the next restart waits until it is ready, as a rolling update
//!   waits for the new pod. A replica whose policy file is the invalid version at that moment
//!   starts all the same (without a file policy, answering `allowed` untouched); a start that
//!   fails anyway is retried after a second, as the kubelet restarts a crashing container, and
//!   counted as a failure;
//! - with `--restart-both-invalid`, the first restart is instead an invalid-policy window: an
//!   invalid version is written and held (no other policy write until the window closes), both
//!   replicas are restarted one after the other inside it, then a valid version is written.
//!   The replies to pods while no replica has a policy are `allowed` without a patch (counted
//!   as "answered without a policy", which must then be above zero), and the valid version
//!   must reach the replies afterwards, as every other one;
//! - an endpoints controller: it polls each replica's `/readyz` every `--probe-ms` over a fresh
//!   TLS connection, and the load only goes to replicas that answered 200. A replica that turned
//!   unready has its connections dropped by the load workers, so (with `--shutdown-delay` longer
//!   than a probe period) nothing is sent to a replica that is about to stop accepting. Nothing
//!   is retried: a request that fails is counted.
//! - the load: `--workers` paced tasks sharing `--rate` reviews/s, the Tekton and plain fixtures
//!   round robin, each with a fresh uid, alternately to `/mutate` and `/enforce`, over
//!   keep-alive connections to the ready replicas.
//!
//! Every reply is checked with the test suite's own rules (`tests/support/review.rs`: v1
//! AdmissionReview, uid echoed, patch with its type, base64, short warnings; the patch applies to
//! the pod and leaves a pod the API server accepts). The run fails (exit 1) unless failed
//! requests, connection errors (TCP or TLS, to a replica marked ready), bad replies, requests
//! with no ready replica, starts that failed and unclean exits all count zero, every valid policy version reached
//! the replies, the invalid ones were refused, and no replica's resident memory grew by more
//! than `--rss-growth-mb` between its first sample (a few seconds after it became ready) and its
//! last.

mod https;
#[path = "../tests/support/review.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use lightstep_tekton_webhook::policy::Policy;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::Value;

/// The longest a run may last whatever the arguments say: ten minutes.
const MAX_DURATION_S: u64 = 600;
/// The highest rate accepted, so a typo cannot turn a soak into a load test of the machine.
const MAX_RATE: u64 = 5_000;
/// How long a replica may take to become ready, or to exit after SIGTERM (beyond its shutdown
/// delay), before the run counts it as a failure: far above what either takes.
const PROCESS_DEADLINE: Duration = Duration::from_secs(60);
/// Memory is first sampled this long after a replica became ready, so start-up allocation is not
/// counted as growth.
const RSS_WARMUP: Duration = Duration::from_secs(5);
/// The kubelet's default probe timeout is 1 s; a loaded two-core machine gets more.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The annotation that names the policy which patched a pod.
const INJECTED: &str = "lightstep-tekton.io/injected";
/// How long a policy version stays before the invalid-policy window replaces it: two polls of
/// the replicas' `--reload-interval 1`, so it reaches the replies as every version must.
const POLICY_SEEN: Duration = Duration::from_secs(2);
/// The words of the warning on a pod a replica without a policy let through.
const NO_POLICY_WARNING: &str = "policy file is invalid";

#[derive(Debug, Parser)]
#[command(name = "soak", about = "Soak run for lightstep-tekton-webhook serve")]
struct Args {
    /// Seconds of load (at most 600).
    #[arg(long, default_value_t = 180)]
    duration: u64,
    /// Reviews per second over all workers.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Load tasks; each keeps one keep-alive connection per ready replica.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Seconds between certificate rotations.
    #[arg(long, default_value_t = 3)]
    rotate_every: u64,
    /// Seconds between policy rewrites (every fourth is invalid).
    #[arg(long, default_value_t = 5)]
    policy_every: u64,
    /// Seconds between restarts (the two replicas in turn).
    #[arg(long, default_value_t = 30)]
    restart_every: u64,
    /// The replicas' --shutdown-delay, in seconds; must exceed the probe period.
    #[arg(long, default_value_t = 2)]
    shutdown_delay: u64,
    /// Milliseconds between readiness probes of each replica.
    #[arg(long, default_value_t = 250)]
    probe_ms: u64,
    /// Largest accepted growth of a replica's RSS, first sample to last, in MB.
    #[arg(long, default_value_t = 8)]
    rss_growth_mb: u64,
    /// Make the first restart an invalid-policy window in which both replicas restart.
    #[arg(long)]
    restart_both_invalid: bool,
    /// Keep the scratch directory (certificates, policies, the replicas' logs).
    #[arg(long)]
    keep: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What a replica is doing, as the controller and the restarter see it.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting = 0,
    Running = 1,
    Terminating = 2,
    Down = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Terminating,
            _ => Phase::Down,
        }
    }
}

/// Shared between the controller, the workers and the restarter.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    metrics: SocketAddr,
    /// In the endpoints: the last probe answered 200.
    ready: AtomicBool,
    phase: AtomicU8,
    /// Bumped at every start, so workers drop connections to an older process.
    generation: AtomicU64,
}

impl Backend {
    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }
    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    sent_enforce: AtomicU64,
    ok: AtomicU64,
    patched: AtomicU64,
    /// Allowed untouched with the webhook's "policy file is invalid" warning.
    no_policy: AtomicU64,
    failed: AtomicU64,
    connect_errors: AtomicU64,
    bad_replies: AtomicU64,
    unavailable: AtomicU64,
    probe_tls_errors: AtomicU64,
    rotations: AtomicU64,
    start_failures: AtomicU64,
    unclean_exits: AtomicU64,
}

/// One process's life, for the memory report.
#[derive(Clone)]
struct Life {
    replica: &'static str,
    pid: u32,
    ready_at: Option<Instant>,
    first_rss_kib: Option<u64>,
    last_rss_kib: Option<u64>,
    peak_kib: Option<u64>,
    seconds: f64,
    /// From its /metrics just before SIGTERM.
    tls_applied: f64,
    tls_refused: f64,
    policy_applied: f64,
    policy_refused: f64,
    handshake_failures: f64,
}

struct Process {
    child: tokio::process::Child,
    life: Life,
    started: Instant,
}

struct Scratch {
    dir: PathBuf,
    certs: PathBuf,
    policies: PathBuf,
    ca: Issuer<'static, KeyPair>,
    ca_pem: String,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let duration = Duration::from_secs(args.duration.clamp(10, MAX_DURATION_S));
    let rate = args.rate.clamp(1, MAX_RATE);
    let scratch = Arc::new(Scratch::create()?);
    let tls = https::client_config(&scratch.ca_pem)?;
    let fixtures = fixtures()?;
    let counters = Arc::new(Counters::default());
    let markers: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    // The first certificate and policy version, before anything starts.
    scratch.rotate(0)?;
    let policies = Arc::new(Mutex::new(Policies::default()));
    policies
        .lock()
        .unwrap()
        .write(&scratch, Some(true))?
        .ok_or("policy version 0 is valid")?;

    let backends: Vec<Arc<Backend>> = ["a", "b"]
        .into_iter()
        .map(|name| {
            Ok(Arc::new(Backend {
                name,
                addr: free_port()?,
                metrics: free_port()?,
                ready: AtomicBool::new(false),
                phase: AtomicU8::new(Phase::Down as u8),
                generation: AtomicU64::new(0),
            }))
        })
        .collect::<Result<_, String>>()?;

    println!(
        "soak: {} s at {rate} reviews/s, {} workers, replicas {} and {}, certificate every {} s, \
         policy every {} s, restart every {} s{}, shutdown delay {} s, probes every {} ms",
        duration.as_secs(),
        args.workers,
        backends[0].addr,
        backends[1].addr,
        args.rotate_every,
        args.policy_every,
        args.restart_every,
        if args.restart_both_invalid {
            " (the first: both replicas, inside an invalid-policy window)"
        } else {
            ""
        },
        args.shutdown_delay,
        args.probe_ms
    );

    let controller = tokio::spawn(endpoints_controller(
        backends.clone(),
        tls.clone(),
        counters.clone(),
        Duration::from_millis(args.probe_ms.max(10)),
        stop.clone(),
    ));
    let mut processes: Vec<Process> = Vec::new();
    for b in &backends {
        processes.push(start_ready(&scratch, b, &args, &counters).await?);
    }

    let started = Instant::now();
    let end = started + duration;
    let period = Duration::from_secs_f64(args.workers.max(1) as f64 / rate as f64);
    let fixtures = Arc::new(fixtures);
    let mut workers = Vec::new();
    for w in 0..args.workers.max(1) {
        workers.push(tokio::spawn(worker(
            w,
            args.workers.max(1),
            backends.clone(),
            tls.clone(),
            fixtures.clone(),
            counters.clone(),
            markers.clone(),
            period,
            end,
        )));
    }

    // The kubelet's side: Secret and ConfigMap updates, on their own timeline.
    let writer = tokio::spawn(rotate_and_rewrite(
        scratch.clone(),
        policies.clone(),
        Duration::from_secs(args.rotate_every.max(1)),
        Duration::from_secs(args.policy_every.max(1)),
        counters.clone(),
        end,
    ));

    // The rollout's side: restarts one replica at a time, and memory samples.
    let mut lives: Vec<Life> = Vec::new();
    let mut next_restart = Instant::now() + Duration::from_secs(args.restart_every.max(5));
    let mut restarts = 0u64;
    let mut turn = 0usize;
    let mut window_done = !args.restart_both_invalid;
    while Instant::now() < end {
        for p in &mut processes {
            sample_rss(&mut p.life);
        }
        let now = Instant::now();
        // A restart needs time to finish inside the run: none in the last 20 s.
        let time_left = end.saturating_duration_since(now) > Duration::from_secs(20);
        if now >= next_restart && time_left && !window_done {
            window_done = true;
            // Held invalid: no other policy write until both replicas have restarted on it. The
            // version before it gets its time to reach the replies first, as every version does.
            let last_write = policies.lock().unwrap().stop_writer();
            tokio::time::sleep(POLICY_SEEN.saturating_sub(last_write.elapsed())).await;
            let invalid = policies.lock().unwrap().hold(&scratch)?;
            println!("  invalid-policy window: version {invalid} written; restarting both");
            // Long enough for the running replicas to poll it (--reload-interval 1).
            tokio::time::sleep(Duration::from_secs(2)).await;
            for i in 0..backends.len() {
                let old = stop_process(&backends[i], &mut processes[i], &counters).await;
                lives.push(old);
                processes[i] = start_ready(&scratch, &backends[i], &args, &counters).await?;
                restarts += 1;
            }
            // Both serve without a file policy now; let the load see it, then repair.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let valid = policies.lock().unwrap().release(&scratch)?;
            println!("  invalid-policy window closed: valid version {valid} written");
            next_restart = Instant::now() + Duration::from_secs(args.restart_every.max(5));
        } else if now >= next_restart && time_left {
            let i = turn % backends.len();
            turn += 1;
            let old = stop_process(&backends[i], &mut processes[i], &counters).await;
            lives.push(old);
            processes[i] = start_ready(&scratch, &backends[i], &args, &counters).await?;
            restarts += 1;
            next_restart = Instant::now() + Duration::from_secs(args.restart_every.max(5));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    for w in workers {
        w.await.map_err(|e| e.to_string())?;
    }
    writer.await.map_err(|e| e.to_string())??;
    let (written_markers, invalid_writes) = {
        let p = policies.lock().unwrap();
        (p.written.clone(), p.invalid)
    };
    let seconds = started.elapsed().as_secs_f64();
    for (b, mut p) in backends.iter().zip(processes) {
        lives.push(stop_process(b, &mut p, &counters).await);
    }
    stop.store(true, Ordering::SeqCst);
    let _ = controller.await;

    let ok = report(
        &args,
        seconds,
        &counters,
        &markers.lock().unwrap(),
        &written_markers,
        invalid_writes,
        restarts,
        &lives,
    );
    if args.keep {
        println!("scratch directory kept: {}", scratch.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch.dir);
    }
    Ok(ok)
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    seconds: f64,
    c: &Counters,
    markers: &BTreeMap<String, u64>,
    written: &[String],
    invalid_writes: u64,
    restarts: u64,
    lives: &[Life],
) -> bool {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut ok = true;
    let mut check = |what: &str, value: u64| {
        let good = value == 0;
        ok &= good;
        println!(
            "  {what:<44} {value:>8}{}",
            if good { "" } else { "  FAIL" }
        );
    };
    println!(
        "requests sent {} in {seconds:.1} s ({:.0}/s; /mutate {}, /enforce {}); good replies {} \
         (patched {}, answered without a policy {})",
        get(&c.sent),
        get(&c.sent) as f64 / seconds,
        get(&c.sent) - get(&c.sent_enforce),
        get(&c.sent_enforce),
        get(&c.ok),
        get(&c.patched),
        get(&c.no_policy)
    );
    check("failed requests (transport error, non-200)", get(&c.failed));
    check(
        "connection errors to a ready replica",
        get(&c.connect_errors),
    );
    check(
        "bad replies (rules, patch, pod validity)",
        get(&c.bad_replies),
    );
    check("requests with no ready replica", get(&c.unavailable));
    check(
        "TLS errors of probes to a running replica",
        get(&c.probe_tls_errors),
    );
    check("unclean exits after SIGTERM", get(&c.unclean_exits));
    check(
        "starts that failed (exited before ready)",
        get(&c.start_failures),
    );
    println!(
        "certificate rotations {}, policy writes {} valid + {invalid_writes} invalid, restarts \
         {restarts}",
        get(&c.rotations),
        written.len(),
    );
    if args.restart_both_invalid && get(&c.no_policy) == 0 {
        println!("  FAIL: both replicas restarted on an invalid policy, but no reply says so");
        ok = false;
    }
    let total = |f: fn(&Life) -> f64| lives.iter().map(f).sum::<f64>();
    println!(
        "replicas' own counts: tls reloads applied {} refused {}, policy reloads applied {} \
         refused {}, handshake failures {}",
        total(|l| l.tls_applied),
        total(|l| l.tls_refused),
        total(|l| l.policy_applied),
        total(|l| l.policy_refused),
        total(|l| l.handshake_failures)
    );
    let unseen: Vec<&String> = written
        .iter()
        .filter(|m| !markers.contains_key(*m))
        .collect();
    println!(
        "policy versions seen in patches: {} of {} written{}",
        markers.len(),
        written.len(),
        if unseen.is_empty() {
            String::new()
        } else {
            format!("; never seen: {unseen:?}")
        }
    );
    // A version replaced before the next reload poll may be skipped by a replica; it must still
    // reach some reply unless it was the last one written just before the end.
    let missing = unseen
        .iter()
        .filter(|m| written.last() != Some(**m))
        .count();
    if missing > 0 {
        println!("  FAIL: {missing} valid policy versions never reached a reply");
        ok = false;
    }
    if invalid_writes > 0 && total(|l| l.policy_refused) == 0.0 {
        println!("  FAIL: invalid policies were written but no replica refused one");
        ok = false;
    }
    println!(
        "{:<8} {:>8} {:>9} {:>12} {:>12} {:>12}  memory",
        "replica", "pid", "life s", "first MB", "last MB", "peak MB"
    );
    let mb = |kib: Option<u64>| kib.map_or(f64::NAN, |k| k as f64 * 1024.0 / 1e6);
    for l in lives {
        let growth = match (l.first_rss_kib, l.last_rss_kib) {
            (Some(f), Some(last)) => last.saturating_sub(f) as f64 * 1024.0 / 1e6,
            _ => 0.0,
        };
        let grew = growth > args.rss_growth_mb as f64;
        ok &= !grew;
        println!(
            "{:<8} {:>8} {:>9.1} {:>12.1} {:>12.1} {:>12.1}  {}",
            l.replica,
            l.pid,
            l.seconds,
            mb(l.first_rss_kib),
            mb(l.last_rss_kib),
            mb(l.peak_kib),
            if grew {
                format!("GREW {growth:.1} MB: FAIL")
            } else {
                format!("{growth:+.1} MB")
            }
        );
    }
    println!("soak: {}", if ok { "passed" } else { "FAILED" });
    ok
}

impl Scratch {
    fn create() -> Result<Scratch, String> {
        let dir = std::env::temp_dir().join(format!("ltw-soak-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = dir.join("certs");
        let policies = dir.join("policy");
        for d in [&certs, &policies, &dir.join("logs")] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "soak CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Scratch {
            ca_pem: cert.pem(),
            ca: Issuer::new(params, key),
            dir,
            certs,
            policies,
        })
    }

    /// A new serving certificate from the same CA, swapped in as the kubelet does.
    fn rotate(&self, n: u64) -> Result<(), String> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("localhost rotation {n}"));
        params.subject_alt_names = vec![
            SanType::DnsName(
                "localhost"
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.ca)
            .map_err(|e| e.to_string())?;
        swap_data(
            &self.certs,
            n,
            &[("tls.crt", &cert.pem()), ("tls.key", &key.serialize_pem())],
        )
    }
}

/// Kubernetes' atomic update of a Secret or ConfigMap volume: the files go into a new
/// `..<version>` directory, a `..data_tmp` symlink to it is renamed over `..data`, and the old
/// directory is removed. The visible names are symlinks through `..data`, made once.
fn swap_data(dir: &Path, version: u64, files: &[(&str, &str)]) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    let name = format!("..v{version:06}");
    let new = dir.join(&name);
    std::fs::create_dir(&new).map_err(|e| err("creating the version directory", e))?;
    for (file, contents) in files {
        std::fs::write(new.join(file), contents).map_err(|e| err(file, e))?;
    }
    let previous = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp).map_err(|e| err("..data_tmp", e))?;
    std::fs::rename(&tmp, dir.join("..data")).map_err(|e| err("renaming ..data", e))?;
    for (file, _) in files {
        let link = dir.join(file);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(file), &link)
                .map_err(|e| err(file, e))?;
        }
    }
    if let Some(old) = previous {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// The policy versions written so far, and the invalid-policy window's hold.
struct Policies {
    /// The next version number.
    next: u64,
    /// The markers of the valid versions written, in order.
    written: Vec<String>,
    invalid: u64,
    /// While set, the periodic writer writes nothing.
    held: bool,
    last_write: Instant,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            next: 0,
            written: Vec::new(),
            invalid: 0,
            held: false,
            last_write: Instant::now(),
        }
    }
}

impl Policies {
    /// Stops the periodic writer; returns when the last version was written.
    fn stop_writer(&mut self) -> Instant {
        self.held = true;
        self.last_write
    }

    /// Writes the next version: valid or invalid as `valid` says, or by the rotation (every
    /// fourth invalid) when `None`. Returns the marker of a valid version.
    fn write(&mut self, scratch: &Scratch, valid: Option<bool>) -> Result<Option<String>, String> {
        let n = self.next;
        self.next += 1;
        self.last_write = Instant::now();
        let marker = write_policy(scratch, n, valid.unwrap_or(n % 4 != 3))?;
        match &marker {
            Some(m) => self.written.push(m.clone()),
            None => self.invalid += 1,
        }
        Ok(marker)
    }

    /// Writes an invalid version and holds it; returns its number.
    fn hold(&mut self, scratch: &Scratch) -> Result<u64, String> {
        self.held = true;
        self.write(scratch, Some(false))?;
        Ok(self.next - 1)
    }

    /// Writes a valid version and lets the periodic writer go on; returns its number.
    fn release(&mut self, scratch: &Scratch) -> Result<u64, String> {
        self.held = false;
        self.write(scratch, Some(true))?;
        Ok(self.next - 1)
    }
}

/// Writes policy version `n`, a distinct valid policy or an invalid one. Returns the marker a
/// valid version puts on pods.
fn write_policy(scratch: &Scratch, n: u64, valid: bool) -> Result<Option<String>, String> {
    let (text, marker) = if !valid {
        let text = format!("# soak version {n}: invalid on purpose\nsampling:\n  ratio: 2\n");
        (text, None)
    } else {
        let text = format!(
            "name: soak\nprofile: lightstep\nsampling:\n  ratio: {}\nresourceAttributes:\n  \
             soak.version: \"{n}\"\n",
            if n.is_multiple_of(2) { "1.0" } else { "0.5" }
        );
        let policy = Policy::from_yaml(&text).map_err(|e| format!("soak policy {n}: {e}"))?;
        (text, Some(policy.marker().to_owned()))
    };
    swap_data(&scratch.policies, n, &[("policy.yaml", &text)])?;
    Ok(marker)
}

/// Rotates the certificate and rewrites the policy (unless held) until `end`.
async fn rotate_and_rewrite(
    scratch: Arc<Scratch>,
    policies: Arc<Mutex<Policies>>,
    rotate_every: Duration,
    policy_every: Duration,
    counters: Arc<Counters>,
    end: Instant,
) -> Result<(), String> {
    let mut rotation = 1u64;
    let mut next_rotation = Instant::now() + rotate_every;
    let mut next_policy = Instant::now() + policy_every;
    loop {
        let next = next_rotation.min(next_policy);
        if next >= end {
            return Ok(());
        }
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= next_rotation {
            scratch.rotate(rotation)?;
            rotation += 1;
            counters.rotations.fetch_add(1, Ordering::Relaxed);
            next_rotation += rotate_every;
        }
        if Instant::now() >= next_policy {
            let mut p = policies.lock().unwrap();
            if !p.held {
                p.write(&scratch, None)?;
            }
            next_policy += policy_every;
        }
    }
}

fn free_port() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

/// The fixtures as (object, review) pairs; the 40-step pod is left out (it is the load tool's).
fn fixtures() -> Result<Vec<(Value, Value)>, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| !p.to_string_lossy().contains("40-steps"))
        .collect();
    names.sort();
    for p in names {
        let review: Value = serde_json::from_slice(
            &std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?,
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
        out.push((review["request"]["object"].clone(), review));
    }
    Ok(out)
}

/// Starts a replica and waits until the controller has it in the endpoints. A process that exits
/// before it is ready (the policy file holds the invalid version at that moment, say) is started
/// again after a second, as the kubelet restarts a container that exits.
async fn start_ready(
    scratch: &Scratch,
    b: &Backend,
    args: &Args,
    counters: &Counters,
) -> Result<Process, String> {
    loop {
        let generation = b.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let log = scratch
            .dir
            .join("logs")
            .join(format!("{}-{generation}.log", b.name));
        let log = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        b.set_phase(Phase::Starting);
        let mut child =
            tokio::process::Command::new(env!("CARGO_BIN_EXE_lightstep-tekton-webhook"))
                .arg("serve")
                .arg("--listen")
                .arg(b.addr.to_string())
                .arg("--metrics-listen")
                .arg(b.metrics.to_string())
                .arg("--tls-cert")
                .arg(scratch.certs.join("tls.crt"))
                .arg("--tls-key")
                .arg(scratch.certs.join("tls.key"))
                .arg("--policy")
                .arg(scratch.policies.join("policy.yaml"))
                .args(["--reload-interval", "1", "--log-format", "json"])
                .args(["--shutdown-delay", &args.shutdown_delay.to_string()])
                .args(["--drain-timeout", "20"])
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting replica {}: {e}", b.name))?;
        let pid = child.id().ok_or("the replica exited at once")?;
        let started = Instant::now();
        let deadline = started + PROCESS_DEADLINE;
        loop {
            if b.ready.load(Ordering::SeqCst) && b.phase() == Phase::Running {
                return Ok(Process {
                    child,
                    started,
                    life: Life {
                        replica: b.name,
                        pid,
                        ready_at: Some(Instant::now()),
                        first_rss_kib: None,
                        last_rss_kib: None,
                        peak_kib: None,
                        seconds: 0.0,
                        tls_applied: 0.0,
                        tls_refused: 0.0,
                        policy_applied: 0.0,
                        policy_refused: 0.0,
                        handshake_failures: 0.0,
                    },
                });
            }
            if Instant::now() > deadline {
                return Err(format!("replica {} not ready within 60 s", b.name));
            }
            if let Ok(Some(status)) = child.try_wait() {
                counters.start_failures.fetch_add(1, Ordering::Relaxed);
                println!(
                    "  replica {} (pid {pid}) exited before it was ready ({status}); \
                     starting it again in 1 s",
                    b.name
                );
                b.set_phase(Phase::Down);
                tokio::time::sleep(Duration::from_secs(1)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sample_rss(life: &mut Life) {
    let Some(ready) = life.ready_at else { return };
    let Some(rss) = https::proc_status_kib(life.pid, "VmRSS") else {
        return;
    };
    if ready.elapsed() >= RSS_WARMUP && life.first_rss_kib.is_none() {
        life.first_rss_kib = Some(rss);
    }
    life.last_rss_kib = Some(rss);
    life.peak_kib = https::proc_status_kib(life.pid, "VmHWM").or(life.peak_kib);
}

/// Scrapes the replica's counters, sends SIGTERM and waits for a clean exit.
async fn stop_process(b: &Backend, p: &mut Process, counters: &Counters) -> Life {
    sample_rss(&mut p.life);
    if let Some(text) = scrape(b.metrics).await {
        let m = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        const R: &str = "lightstep_tekton_webhook_reloads_total";
        p.life.tls_applied = m(&format!("{R}{{file=\"tls\",result=\"applied\"}}"));
        p.life.tls_refused = m(&format!("{R}{{file=\"tls\",result=\"refused\"}}"));
        p.life.policy_applied = m(&format!("{R}{{file=\"policy\",result=\"applied\"}}"));
        p.life.policy_refused = m(&format!("{R}{{file=\"policy\",result=\"refused\"}}"));
        p.life.handshake_failures = m("lightstep_tekton_webhook_tls_handshake_failures_total");
    }
    b.set_phase(Phase::Terminating);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &p.life.pid.to_string()])
        .status();
    let wait = tokio::time::timeout(PROCESS_DEADLINE, p.child.wait()).await;
    let clean = matches!(&wait, Ok(Ok(s)) if s.success());
    if !clean {
        counters.unclean_exits.fetch_add(1, Ordering::Relaxed);
        println!("  replica {} (pid {}) exit: {wait:?}", b.name, p.life.pid);
        let _ = p.child.kill().await;
    }
    b.set_phase(Phase::Down);
    b.ready.store(false, Ordering::SeqCst);
    p.life.seconds = p.started.elapsed().as_secs_f64();
    p.life.clone()
}

/// GET /metrics over plain HTTP.
async fn scrape(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    String::from_utf8(out).ok()
}

/// Probes every replica's /readyz and keeps `ready` up to date, as the endpoints controller
/// does from the kubelet's probes.
async fn endpoints_controller(
    backends: Vec<Arc<Backend>>,
    tls: Arc<rustls::ClientConfig>,
    counters: Arc<Counters>,
    period: Duration,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        for b in &backends {
            let phase = b.phase();
            let ready = match probe(b.addr, &tls).await {
                Ok(status) => status == 200,
                Err(https::ConnectError::Tls(_, e)) => {
                    // A replica that is starting or stopping may reset a connection; one that
                    // runs must complete every handshake.
                    if phase == Phase::Running && b.phase() == Phase::Running {
                        counters.probe_tls_errors.fetch_add(1, Ordering::Relaxed);
                        println!("  probe of replica {}: {e}", b.name);
                    }
                    false
                }
                Err(_) => false,
            };
            b.ready.store(ready, Ordering::SeqCst);
            if ready && b.phase() == Phase::Starting {
                b.set_phase(Phase::Running);
            }
        }
        tokio::time::sleep(period).await;
    }
}

async fn probe(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<u16, https::ConnectError> {
    let timed_out = || https::ConnectError::Tcp(addr, std::io::Error::other("probe timed out"));
    let mut sender = tokio::time::timeout(PROBE_TIMEOUT, https::connect(addr, tls))
        .await
        .map_err(|_| timed_out())??;
    let request = hyper::Request::get("/readyz")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(PROBE_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| timed_out())?
        .map_err(https::ConnectError::Http)?;
    Ok(response.status().as_u16())
}

/// One paced load task: each tick, the next ready replica in turn gets one review.
#[allow(clippy::too_many_arguments)]
async fn worker(
    id: usize,
    workers: usize,
    backends: Vec<Arc<Backend>>,
    tls: Arc<rustls::ClientConfig>,
    fixtures: Arc<Vec<(Value, Value)>>,
    c: Arc<Counters>,
    markers: Arc<Mutex<BTreeMap<String, u64>>>,
    period: Duration,
    end: Instant,
) {
    // One connection per replica, with the process generation it was opened to.
    let mut conns: Vec<Option<(u64, https::Sender)>> = backends.iter().map(|_| None).collect();
    let mut due = tokio::time::Instant::now() + period.mul_f64(id as f64 / workers as f64);
    let mut n = id as u64;
    let mut turn = id;
    while Instant::now() < end {
        tokio::time::sleep_until(due).await;
        due += period;
        // Honour the endpoints: connections to a replica that left them are closed.
        for (i, b) in backends.iter().enumerate() {
            let current = b.generation.load(Ordering::SeqCst);
            let keep = b.ready.load(Ordering::SeqCst)
                && conns[i].as_ref().is_some_and(|(g, _)| *g == current);
            if !keep {
                conns[i] = None;
            }
        }
        let Some(i) = (0..backends.len())
            .map(|k| (turn + k) % backends.len())
            .find(|&i| backends[i].ready.load(Ordering::SeqCst))
        else {
            c.unavailable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        turn += 1;
        if conns[i].is_none() {
            let generation = backends[i].generation.load(Ordering::SeqCst);
            let connected =
                tokio::time::timeout(PROBE_TIMEOUT, https::connect(backends[i].addr, &tls)).await;
            match connected {
                Ok(Ok(s)) => conns[i] = Some((generation, s)),
                Err(_) => {
                    c.connect_errors.fetch_add(1, Ordering::Relaxed);
                    println!(
                        "  worker {id}: replica {}: connect timed out",
                        backends[i].name
                    );
                    continue;
                }
                Ok(Err(e)) => {
                    c.connect_errors.fetch_add(1, Ordering::Relaxed);
                    println!("  worker {id}: replica {}: {e}", backends[i].name);
                    continue;
                }
            }
        }
        let (object, review) = &fixtures[n as usize % fixtures.len()];
        let uid = format!("soak-{id}-{n}");
        n += workers as u64;
        let mut review = review.clone();
        review["request"]["uid"] = Value::String(uid.clone());
        let body = serde_json::to_vec(&review).expect("review serializes");
        // Both pod paths, alternately: neither may fail, whatever the policy file holds.
        let enforce = (n / workers as u64) % 2 == 1;
        let path = if enforce { "/enforce" } else { "/mutate" };
        let request = hyper::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        c.sent.fetch_add(1, Ordering::Relaxed);
        if enforce {
            c.sent_enforce.fetch_add(1, Ordering::Relaxed);
        }
        let sender = &mut conns[i].as_mut().expect("connected").1;
        let reply = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        }
        .await;
        match reply {
            Ok((200, body)) => match check(&body, &uid, object) {
                Ok(reply) => {
                    c.ok.fetch_add(1, Ordering::Relaxed);
                    match reply {
                        Reply::Patched(marker) => {
                            c.patched.fetch_add(1, Ordering::Relaxed);
                            if let Some(m) = marker {
                                *markers.lock().unwrap().entry(m).or_default() += 1;
                            }
                        }
                        Reply::NoPolicy => {
                            c.no_policy.fetch_add(1, Ordering::Relaxed);
                        }
                        Reply::Untouched => {}
                    }
                }
                Err(why) => {
                    c.bad_replies.fetch_add(1, Ordering::Relaxed);
                    println!("  worker {id}: bad reply to {uid}: {why}");
                }
            },
            Ok((status, body)) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                println!(
                    "  worker {id}: {uid}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
                conns[i] = None;
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                println!("  worker {id}: {uid} to replica {}: {e}", backends[i].name);
                conns[i] = None;
            }
        }
    }
}

/// What a good reply did to its pod.
enum Reply {
    /// Patched by the policy with this marker.
    Patched(Option<String>),
    /// Allowed untouched because the replica has no policy (its warning says so).
    NoPolicy,
    /// Allowed untouched for any other reason (not a TaskRun pod, already injected).
    Untouched,
}

/// The test suite's rules for a reply, and what it did.
fn check(body: &[u8], uid: &str, object: &Value) -> Result<Reply, String> {
    std::panic::catch_unwind(|| {
        let (v, patch) = support::check_reply(body, uid);
        if patch.0.is_empty() {
            let warned = v["response"]["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|w| w.as_str().is_some_and(|w| w.contains(NO_POLICY_WARNING)));
            assert_eq!(v["response"]["allowed"], true, "{v}");
            return if warned {
                Reply::NoPolicy
            } else {
                Reply::Untouched
            };
        }
        let pod = support::validated_pod(&support::apply(object, &patch));
        Reply::Patched(
            pod.metadata
                .annotations
                .and_then(|a| a.get(INJECTED).cloned()),
        )
    })
    .map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "check panicked".into())
    })
}
