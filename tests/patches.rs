//! The replies to every captured review, pinned: a SHA-256 of each reply body, in both modes, under
//! the embedded default policy. A refactor must leave every byte of every patch as it was; a change
//! that means to alter a patch updates the pins on purpose with
//! `BLESS_PATCHES=1 cargo test --locked --test patches` and says why in its commit.

mod support {
    pub mod review;
}

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lightstep_tekton_webhook::admission;
use lightstep_tekton_webhook::admission::decide::Mode;
use lightstep_tekton_webhook::policy::Policy;
use sha2::{Digest, Sha256};

const PINS: &str = "tests/fixtures/patches.sha256";

/// Every review the tests hold: the admission fixtures and the pods of the captured runs.
fn reviews() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<PathBuf> = support::review::fixture_names()
        .iter()
        .map(|n| root.join(n))
        .collect();
    let runs = std::fs::read_dir(root.join("runs/reviews")).expect("tests/fixtures/runs/reviews");
    let mut run_pods: Vec<PathBuf> = runs.map(|e| e.unwrap().path()).collect();
    run_pods.sort();
    paths.extend(run_pods);
    paths
}

fn pins() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let policy = Policy::embedded_default();
    let mut out = String::new();
    for path in reviews() {
        let body = std::fs::read(&path).unwrap();
        let name = path.strip_prefix(root).unwrap().display().to_string();
        for mode in [Mode::Inject, Mode::Enforce] {
            let reply = admission::review(&body, &policy, mode).expect("a valid review");
            let digest = Sha256::digest(&reply.body);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(out, "{hex}  {name} {}", mode.as_str()).unwrap();
        }
    }
    out
}

#[test]
fn every_reply_is_byte_for_byte_as_pinned() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PINS);
    let now = pins();
    if std::env::var_os("BLESS_PATCHES").is_some() {
        std::fs::write(&path, &now).unwrap();
        return;
    }
    let pinned = std::fs::read_to_string(&path).unwrap_or_default();
    let changed: Vec<&str> = now
        .lines()
        .filter(|line| !pinned.lines().any(|p| p == *line))
        .collect();
    assert!(
        changed.is_empty() && pinned.lines().count() == now.lines().count(),
        "replies differ from {PINS} (regenerate on purpose with BLESS_PATCHES=1 cargo test --locked --test patches):\n{}",
        changed.join("\n")
    );
}
