//! Wiring only: parse the command line and hand over to the module that owns the command.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lightstep_tekton_webhook::admission::preview;
use lightstep_tekton_webhook::policy::resource;
use lightstep_tekton_webhook::{certs, export, serve, spans};

/// mimalloc instead of glibc's malloc: decoding a review allocates many small strings and maps,
/// and glibc spent about a seventh of the server's CPU in malloc and free (consolidating its
/// fast bins for every 16 KB body). Measured with `benches/load.rs`: about 10% less CPU per
/// review. Built with `no_thp`: on transparent huge pages its segments made the server's peak
/// RSS 58 MB with the 40-step pod; without, 26 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kubernetes admission webhook that joins Tekton TaskRun steps to OpenTelemetry traces.
#[derive(Debug, Parser)]
#[command(name = "lightstep-tekton-webhook", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Preview the patch for an AdmissionReview or Pod (JSON or YAML) without a cluster.
    Mutate(preview::MutateArgs),
    /// Write a CA and a serving certificate for the webhook's Service, and the caBundle.
    Certs(certs::CertsArgs),
    /// Serve the webhook over HTTPS: POST /mutate, POST /enforce, GET /healthz, GET /readyz.
    Serve(Box<serve::ServeArgs>),
    /// Print the TracingPolicy CustomResourceDefinition (YAML), as the Helm chart's crds/ holds it.
    Crd,
    /// Preview the spans of finished PipelineRuns/TaskRuns (JSON or YAML) without a cluster.
    Spans(spans::preview::SpansArgs),
    /// Export finished PipelineRuns/TaskRuns of opted-in namespaces as spans, once each.
    ///
    /// Only runs under a policy whose `runSpans.enabled` is true are exported (run spans are
    /// opt-in in the policy; the Helm chart turns them on with the exporter).
    Export(Box<export::command::ExportArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Mutate(args) => preview::run(args),
        Command::Certs(args) => certs::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Spans(args) => spans::preview::run(args),
        Command::Export(args) => export::command::run(*args),
        Command::Crd => {
            print!("{}", resource::crd_yaml());
            ExitCode::SUCCESS
        }
    }
}
