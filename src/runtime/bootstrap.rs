//! Starting and stopping a long-running command: the Tokio runtime, telemetry, and the signals.
//!
//! [`run`] owns the process's life so that no command calls `std::process::exit`: it builds the
//! runtime, installs telemetry, runs the command's future with a [`Shutdown`] that completes on
//! the first SIGTERM (what the kubelet sends) or SIGINT, and turns the result into an
//! [`ExitCode`] for `main` to return. A second signal means "now": the command's future is
//! dropped mid-drain and the process exits 1 without waiting for its connections or tasks.
//!
//! The telemetry guard is dropped after the command finished but while the runtime's workers
//! still run, because the span exporter is a task of that runtime: dropping it flushes the last
//! spans. After a second signal the runtime is stopped first, so the flush gives up at once
//! instead of waiting on a collector.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::watch;

use crate::runtime::args::TelemetryArgs;
use crate::runtime::telemetry::{self, LogFormat};

/// How long tasks still running after the command returned get to notice they are cancelled.
/// They are connection and poll tasks that stop at their next await; a second is plenty, and
/// bounds the exit if one is stuck in a blocking file read.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

/// Completes when the process is asked to stop (the first SIGTERM or SIGINT).
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub(crate) async fn requested(mut self) {
        // An error means the signal task is gone, which happens only after a second signal.
        let _ = self.0.wait_for(|asked| *asked).await;
    }
}

/// How the command's future ended.
enum Ending<E> {
    Finished(Result<(), E>),
    /// A second signal arrived before the command finished.
    Abandoned,
}

/// Runs one long-running command: `name` is its subcommand (it names the failure in the log).
/// Exit 0 after a clean finish, 1 when the command failed or was abandoned.
pub(crate) fn run<F, Fut, E>(name: &str, telemetry: &TelemetryArgs, command: F) -> ExitCode
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let guard = match runtime.block_on(async { telemetry::init(telemetry.log_format) }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ending = runtime.block_on(async {
        let (asked, shutdown) = watch::channel(false);
        let signals = tokio::spawn(watch_signals(asked));
        let ending = tokio::select! {
            result = command(Shutdown(shutdown)) => Ending::Finished(result),
            _ = signals => Ending::Abandoned,
        };
        ending
    });
    match ending {
        Ending::Abandoned => {
            runtime.shutdown_background();
            drop(guard);
            ExitCode::FAILURE
        }
        Ending::Finished(result) => {
            drop(guard);
            runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
            report(name, telemetry.log_format, result)
        }
    }
}

fn report<E: Display>(name: &str, format: LogFormat, result: Result<(), E>) -> ExitCode {
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    // One line either way: a JSON object for log pipelines, plain text for a person.
    match format {
        LogFormat::Json => tracing::error!(error = %e, "cannot {name}"),
        LogFormat::Text => eprintln!("error: {e}"),
    }
    ExitCode::FAILURE
}

/// Announces the first signal on `asked`, then completes on the second.
async fn watch_signals(asked: watch::Sender<bool>) {
    let mut signals = Signals::install();
    let first = signals.next().await;
    tracing::info!("{first} received");
    // Receivers live as long as the command; a command that has returned needs no telling.
    let _ = asked.send(true);
    signals.next().await;
    eprintln!("second signal: exiting without draining");
}

/// SIGTERM and SIGINT, listened to from startup so neither kills the process mid-request.
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        Signals {
            // Without a handler (it cannot fail on Linux) SIGTERM keeps its default action.
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .ok(),
        }
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        let interrupt = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let terminate = async {
            match &mut self.terminate {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = interrupt => "SIGINT",
            _ = terminate => "SIGTERM",
        }
    }
}
