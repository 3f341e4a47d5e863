//! The docs cannot go stale: every example in README.md and docs/*.md that shows what the binary
//! prints is marked with `<!-- checked: KIND ARGS -->` right before its fenced block, and is
//! compared here with what the real binary prints today. Also: the TracingPolicy example equals
//! its manifest, the Rust example of docs/injection.md nests under a TRACEPARENT, every relative
//! link resolves to a file and heading, and the three descriptions of `make test` (README,
//! docs/development.md, `make help`) name every suite in `tests/`.
//!
//! The kinds of marker:
//! - `mutate ARGS`: the block is `$ lightstep-tekton-webhook mutate ARGS [>/dev/null]` and then
//!   exactly what that prints (standard error when standard output is discarded);
//! - `spans ARGS`: the same for `$ lightstep-tekton-webhook spans ARGS`;
//! - `file PATH`: the block is exactly that file;
//! - `trace-ids FIXTURE`: `printf … | sha256sum | cut` lines, each followed by `# <hex>`: the
//!   arithmetic holds, the uids are the fixture's labels, and the results are the ids
//!   `mutate --explain` derives for that fixture;
//! - `diagram FIXTURE`: the names, uid and id prefixes in the drawing are the fixture's and what
//!   the binary injects into it;
//! - `serve --dev --log-format json`: each line is what the server logs for the requests the text
//!   names, apart from the timestamp and the duration.

mod support {
    pub mod http;
    pub mod tmp;
}

/// The Rust example docs/injection.md shows, compiled into this suite so it can be run here.
#[path = "../examples/traceparent.rs"]
mod traceparent;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::http::{client_config, request};
use support::tmp::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_lightstep-tekton-webhook");
const MARKER: &str = "<!-- checked: ";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// One marked example: where it is, what the marker says, and the text inside its fence.
struct Example {
    place: String,
    kind: String,
    args: Vec<String>,
    block: String,
}

fn examples() -> Vec<Example> {
    let mut found = Vec::new();
    for page in pages() {
        let text = read(&page);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.strip_prefix(MARKER) else {
                continue;
            };
            let place = format!("{}:{}", page.display(), i + 1);
            let directive = rest
                .strip_suffix(" -->")
                .unwrap_or_else(|| panic!("{place}: the marker must end with ` -->`"));
            let mut words = directive.split_whitespace().map(str::to_owned);
            let kind = words.next().unwrap_or_default();
            let args = words.collect();
            assert!(
                lines.get(i + 1).is_some_and(|l| l.starts_with("```")),
                "{place}: a checked marker must be right before a fenced block"
            );
            let body: Vec<&str> = lines[i + 2..]
                .iter()
                .take_while(|l| !l.starts_with("```"))
                .copied()
                .collect();
            let mut block = body.join("\n");
            block.push('\n');
            found.push(Example {
                place,
                kind,
                args,
                block,
            });
        }
    }
    found
}

fn examples_of(kind: &str) -> Vec<Example> {
    let found: Vec<Example> = examples().into_iter().filter(|e| e.kind == kind).collect();
    assert!(
        !found.is_empty(),
        "no `{MARKER}{kind} …` example left in the docs"
    );
    found
}

/// Runs the binary in the repository root; returns (stdout, stderr) of a successful run.
fn run(args: &[String]) -> (String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    (stdout, stderr)
}

fn line_diff(expected: &str, actual: &str) -> String {
    let mut out = String::new();
    for (i, (e, a)) in expected.lines().zip(actual.lines()).enumerate() {
        if e != a {
            out.push_str(&format!(
                "first difference at line {}:\n  docs:   {e}\n  binary: {a}\n",
                i + 1
            ));
            break;
        }
    }
    let (e, a) = (expected.lines().count(), actual.lines().count());
    if e != a {
        out.push_str(&format!(
            "the docs have {e} lines, the binary printed {a}\n"
        ));
    }
    out
}

#[test]
fn every_marker_is_of_a_known_kind() {
    let known = ["mutate", "spans", "file", "trace-ids", "diagram", "serve"];
    for e in examples() {
        assert!(
            known.contains(&e.kind.as_str()),
            "{}: unknown kind {:?}; known: {known:?}",
            e.place,
            e.kind
        );
    }
}

#[test]
fn mutate_examples_print_what_the_binary_prints() {
    command_examples_print_what_the_binary_prints("mutate");
}

#[test]
fn spans_examples_print_what_the_binary_prints() {
    command_examples_print_what_the_binary_prints("spans");
}

/// Every `<!-- checked: COMMAND ARGS -->` example of one command: its block starts with the
/// command line and is then exactly what the binary prints.
fn command_examples_print_what_the_binary_prints(command_name: &str) {
    for e in examples_of(command_name) {
        let mut lines = e.block.lines();
        let command = lines.next().unwrap_or_default();
        let mut args = vec![command_name.to_owned()];
        args.extend(e.args.iter().cloned());
        let shown = format!("$ lightstep-tekton-webhook {}", args.join(" "));
        let (stdout, stderr) = run(&args);
        let actual = if command == format!("{shown} >/dev/null") {
            stderr
        } else if command == shown || command == format!("{shown} 2>/dev/null") {
            stdout
        } else {
            panic!(
                "{}: the block must start with `{shown}` (with `>/dev/null` to show standard \
                 error), not {command:?}",
                e.place
            );
        };
        let documented: String = lines.map(|l| format!("{l}\n")).collect();
        assert!(
            documented == actual,
            "{}: the example is stale; run `cargo run --locked -q -- {}` and paste its output.\n{}",
            e.place,
            args.join(" "),
            line_diff(&documented, &actual)
        );
    }
}

#[test]
fn file_examples_equal_their_file() {
    for e in examples_of("file") {
        let [path] = e.args.as_slice() else {
            panic!("{}: `file` takes one path", e.place);
        };
        let file = read(&root().join(path));
        assert!(
            e.block == file,
            "{}: the example differs from {path}; copy the file into the block.\n{}",
            e.place,
            line_diff(&e.block, &file)
        );
    }
}

/// A fixture's pod, and the trace context `mutate --explain` reports for it.
struct Decided {
    pod: Value,
    trace_id: String,
    parent: String,
    flags: String,
    explain: String,
}

fn decide(fixture: &str) -> Decided {
    let review: Value = serde_json::from_str(&read(&root().join(fixture))).unwrap();
    let pod = review["request"]["object"].clone();
    let (_, explain) = run(&["mutate".into(), "--explain".into(), fixture.into()]);
    let context = explain
        .lines()
        .find_map(|l| l.strip_prefix("trace context: "))
        .unwrap_or_else(|| panic!("{fixture}: no trace context in\n{explain}"));
    let parts: Vec<&str> = context.split('-').collect();
    let [_, trace_id, parent, flags] = parts.as_slice() else {
        panic!("{fixture}: trace context {context:?}");
    };
    Decided {
        trace_id: trace_id.to_string(),
        parent: parent.to_string(),
        flags: flags.to_string(),
        pod,
        explain,
    }
}

fn label<'a>(pod: &'a Value, key: &str) -> &'a str {
    pod["metadata"]["labels"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the fixture's pod has no label {key}"))
}

/// What `printf 'FORMAT' ARGS | sha256sum | cut -c1-N` prints, for the `%s` and `\n` the docs use.
fn shell_hash(line: &str) -> String {
    let rest = line
        .strip_prefix("printf '")
        .unwrap_or_else(|| panic!("not a printf line: {line}"));
    let (format, rest) = rest.split_once('\'').unwrap();
    let (args, cut) = rest
        .split_once("| sha256sum | cut -c1-")
        .unwrap_or_else(|| panic!("not `| sha256sum | cut -c1-N`: {line}"));
    let mut input = format.replace("\\n", "\n");
    for arg in args.split_whitespace() {
        input = input.replacen("%s", arg, 1);
    }
    assert!(!input.contains('%'), "unfilled format in {line}");
    let digest = Sha256::digest(input.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..cut.trim().parse::<usize>().unwrap()].to_owned()
}

#[test]
fn trace_id_arithmetic_matches_the_fixture_and_the_binary() {
    for e in examples_of("trace-ids") {
        let [fixture] = e.args.as_slice() else {
            panic!("{}: `trace-ids` takes one fixture", e.place);
        };
        let decided = decide(fixture);
        let lines: Vec<&str> = e.block.lines().collect();
        let mut seen = BTreeSet::new();
        for pair in lines.chunks(2) {
            let [command, result] = pair else {
                panic!("{}: each printf line is followed by `# <hex>`", e.place);
            };
            let shown = result.strip_prefix("# ").unwrap_or_default();
            assert_eq!(shell_hash(command), shown, "{}: {command}", e.place);
            if command.contains("/trace-id/v1") {
                let uid = label(&decided.pod, "tekton.dev/pipelineRunUID");
                assert!(
                    command.contains(uid),
                    "{}: hash the pipelineRunUID {uid}",
                    e.place
                );
                assert_eq!(
                    shown, decided.trace_id,
                    "{}: the trace id the binary injects",
                    e.place
                );
                let derived =
                    format!("trace id {shown}: derived from tekton.dev/pipelineRunUID {uid}");
                assert!(
                    decided.explain.contains(&derived),
                    "{}: the binary does not derive the trace id from the uid:\n{}",
                    e.place,
                    decided.explain
                );
                seen.insert("trace");
            } else {
                let uid = label(&decided.pod, "tekton.dev/taskRunUID");
                assert!(
                    command.contains(uid),
                    "{}: hash the taskRunUID {uid}",
                    e.place
                );
                assert_eq!(
                    shown, decided.parent,
                    "{}: the parent the binary injects",
                    e.place
                );
                let derived = format!("parent {shown}: derived from TaskRun {uid}, attempt 0");
                assert!(
                    decided.explain.contains(&derived),
                    "{}: the binary does not derive the parent from the uid:\n{}",
                    e.place,
                    decided.explain
                );
                seen.insert("span");
            }
        }
        assert_eq!(
            seen.len(),
            2,
            "{}: show both the trace id and the span id",
            e.place
        );
    }
}

/// The hex-like abbreviations (`79ab…`) in a drawing.
fn abbreviations(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_hexdigit() && c != '…')
        .filter_map(|w| w.strip_suffix('…'))
        .filter(|w| w.len() >= 4)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_diagram_shows_the_fixture_it_names() {
    for e in examples_of("diagram") {
        let [fixture] = e.args.as_slice() else {
            panic!("{}: `diagram` takes one fixture", e.place);
        };
        let d = decide(fixture);
        let run_uid = label(&d.pod, "tekton.dev/pipelineRunUID");
        let task_uid = label(&d.pod, "tekton.dev/taskRunUID");
        let line_with = |start: &str| {
            e.block
                .lines()
                .find(|l| l.trim_start_matches([' ', '└', '─']).starts_with(start))
                .unwrap_or_else(|| panic!("{}: no {start} line", e.place))
        };
        let run = line_with("PipelineRun");
        assert!(
            run.contains(label(&d.pod, "tekton.dev/pipelineRun")),
            "{}: {run}",
            e.place
        );
        assert!(
            run.contains(&format!("uid {}…", &run_uid[..4])),
            "{}: {run}",
            e.place
        );
        assert!(
            run.contains(&format!("trace {}…", &d.trace_id[..4])),
            "{}: {run}",
            e.place
        );
        let task = line_with("TaskRun");
        assert!(
            task.contains(&format!("uid {}…", &task_uid[..4])),
            "{}: {task}",
            e.place
        );
        assert!(
            task.contains(&format!("span {}…", &d.parent[..4])),
            "{}: {task}",
            e.place
        );
        let traceparent = format!(
            "TRACEPARENT=00-{}…-{}…-{}",
            &d.trace_id[..4],
            &d.parent[..4],
            d.flags
        );
        assert!(
            e.block.contains(&traceparent),
            "{}: shows no {traceparent}",
            e.place
        );
        for short in abbreviations(&e.block) {
            assert!(
                [&d.trace_id, &d.parent, run_uid, task_uid]
                    .iter()
                    .any(|full| full.starts_with(&short)),
                "{}: {short}… is none of the fixture's uids or ids",
                e.place
            );
        }

        let spec = &d.pod["spec"];
        let all: BTreeSet<String> = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default())
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        let mut drawn = BTreeSet::new();
        for line in e.block.lines() {
            let body = line.trim_start_matches([' ', '├', '└', '─', '│']);
            if let Some(inits) = body.strip_prefix("init ") {
                let names = inits.split("  ").next().unwrap();
                drawn.extend(names.split(", ").map(str::to_owned));
            } else if body.starts_with("step-") || body.starts_with("sidecar-") {
                drawn.insert(body.split_whitespace().next().unwrap().to_owned());
            }
        }
        assert_eq!(
            drawn, all,
            "{}: the drawing's containers are not the pod's",
            e.place
        );
    }
}

/// The links of a page outside fenced blocks: the targets of `](…)`.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let target = &rest[at + 2..];
            let end = target.find(')').unwrap_or(target.len());
            found.push(target[..end].to_owned());
            rest = &target[end..];
        }
    }
    found
}

/// GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
/// `-1`, `-2`… on repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while found.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        found.insert(unique);
    }
    found
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            }
            if let Some(anchor) = anchor
                && !anchors(&read(&target)).contains(anchor)
            {
                broken.push(format!("{}: {link}: no such heading", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_check_catches_a_missing_heading() {
    let text =
        "# Quick start\n## Previewing a pod: `mutate`\n```\n# not a heading\n```\n## Quick start\n";
    let found = anchors(text);
    let expected: BTreeSet<String> = ["quick-start", "previewing-a-pod-mutate", "quick-start-1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(found, expected);
    assert_eq!(
        links("[a](b.md#c) `x` [d](#e)\n```\n[f](g)\n```\n"),
        ["b.md#c", "#e"]
    );
}

/// The suites `make test` runs: the library's unit tests and one per file in tests/.
fn suites() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("tests"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    names.insert(0, "unit".to_owned());
    names
}

/// The suites a one-line description lists after `every test: `.
fn listed(place: &str, line: &str) -> BTreeSet<String> {
    let list = line
        .split_once("every test: ")
        .unwrap_or_else(|| panic!("{place}: say `every test: <suites>`: {line}"))
        .1;
    list.split(", ").map(|s| s.trim().to_owned()).collect()
}

#[test]
fn the_three_descriptions_of_make_test_name_every_suite() {
    let suites: BTreeSet<String> = suites().into_iter().collect();
    let mut descriptions = Vec::new();
    for page in ["README.md", "docs/development.md"] {
        let text = read(&root().join(page));
        let line = text
            .lines()
            .find(|l| l.starts_with("make test "))
            .unwrap_or_else(|| panic!("{page}: no `make test   # …` line"));
        descriptions.push((page, listed(page, line)));
    }
    let makefile = read(&root().join("Makefile"));
    let line = makefile
        .lines()
        .find(|l| l.starts_with("test: ## "))
        .expect("Makefile: no `test: ## …` help line");
    descriptions.push(("Makefile", listed("Makefile", line)));
    for (place, listed) in descriptions {
        assert_eq!(listed, suites, "{place}: the suites `make test` runs");
    }

    let development = read(&root().join("docs/development.md"));
    for suite in &suites {
        let row = if suite == "unit" {
            "| unit |".to_owned()
        } else {
            format!("| `{suite}` |")
        };
        assert!(
            development.lines().any(|l| l.starts_with(&row)),
            "docs/development.md: the table of suites has no row for {suite}"
        );
    }
}

/// The fields a log line may differ in from run to run.
const VOLATILE: [&str; 2] = ["timestamp", "duration_ms"];

#[test]
fn the_json_log_example_is_what_the_server_logs() {
    let examples = examples_of("serve");
    let dir = TempDir::new("docs");
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--dev-dir",
        ])
        .arg(&dir.0)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    // Standard output is read to its end, so the server never writes into a closed pipe.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (address, named) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("Development server on https://") {
                let _ = address.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    });
    let addr = named
        .recv()
        .expect("serve --dev exited before naming its address");

    let ca = std::fs::read_to_string(dir.path("ca.crt")).unwrap();
    let config = client_config(&[&ca], None);
    let addr: SocketAddr = addr.parse().unwrap();
    // The status is all this needs; the server logs the request before it replies.
    let post = |path: &str, body: &[u8]| {
        request(addr, Some((&config, "localhost")), "POST", path, body)
            .unwrap()
            .0
    };
    let fixture = read(&root().join("tests/fixtures/tekton-pipeline-task-traced.json"));
    assert_eq!(post("/enforce", fixture.as_bytes()), 200);
    assert_eq!(post("/mutate", b"not json"), 400);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
    let logged: Vec<Value> = logs
        .join()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    for e in examples {
        assert_eq!(e.args, ["--dev", "--log-format", "json"], "{}", e.place);
        for line in e.block.lines() {
            let documented: Value = serde_json::from_str(line).unwrap();
            let same_event = |v: &&Value| {
                v["message"] == documented["message"] && v["mode"] == documented["mode"]
            };
            let actual = logged.iter().find(same_event).unwrap_or_else(|| {
                panic!(
                    "{}: the server logged no such event:\n{line}\nit logged:\n{logged:#?}",
                    e.place
                )
            });
            let keys = |v: &Value| -> BTreeSet<String> {
                v.as_object().unwrap().keys().cloned().collect()
            };
            assert_eq!(
                keys(&documented),
                keys(actual),
                "{}: the fields of {line}",
                e.place
            );
            for (key, value) in documented.as_object().unwrap() {
                if VOLATILE.contains(&key.as_str()) {
                    continue;
                }
                assert_eq!(value, &actual[key], "{}: {key} in {line}", e.place);
            }
        }
    }
}

/// Set in the copy of this suite that [`the_rust_example_nests_under_the_injected_traceparent`]
/// starts, with a TRACEPARENT in its environment.
const RUST_EXAMPLE_CHILD: &str = "LIGHTSTEP_TEKTON_DOCS_RUST_EXAMPLE";

#[test]
fn the_rust_example_nests_under_the_injected_traceparent() {
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rust_example_in_a_step", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(RUST_EXAMPLE_CHILD, "1")
        .env("TRACEPARENT", format!("00-{trace}-{parent}-01"))
        .env("TRACESTATE", "tekton=1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("{trace}-{parent}\n")),
        "the example's current context is not the step's span:\n{stdout}"
    );
}

/// Runs the example as a step would, when started by the test above.
#[test]
fn rust_example_in_a_step() {
    if std::env::var_os(RUST_EXAMPLE_CHILD).is_some() {
        traceparent::main();
    }
}
