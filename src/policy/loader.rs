//! The one path from files to policies: a policy file (or the embedded default), a directory of
//! TracingPolicy documents, and the reloadable store `serve` answers from.
//!
//! `serve` and the `mutate` preview both load through here, so a file the preview accepts is a
//! file the server accepts, with the same one-line error naming the flag, the path and the field.
//!
//! The store re-reads its file through `FileSet` (paths polled, contents compared), so a
//! ConfigMap update that swaps the mounted `..data` symlink is seen. A new version that does not
//! validate is refused and the previous policy stays in force: an edit with a typo must not turn
//! tracing off, nor point it somewhere nobody chose.
//!
//! A file that is invalid (or unreadable) when the store is *created* does not stop the server:
//! the store starts with no file policy ([`PolicyStore::current`] is `None`) and the reason
//! ([`PolicyStore::refused`]), and takes the file as soon as a poll finds a valid version. A
//! webhook that refused to start would, after any restart, leave every namespace whose
//! webhook fails closed unable to create pods; the embedded default is no substitute either,
//! since it points at Lightstep with a token reference the platform team replaced by writing a
//! file. What is served meanwhile is the admission module's business
//! ([`crate::admission::review_or_pass`]). The last good policy is not kept across restarts
//! (docs/policy.md, "When a policy is invalid", says why).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::policy::Policy;
use crate::policy::resource::{self, FIRST_GENERATION, GROUP, KIND, Rejected, Resolved, VERSION};
use crate::policy::selection::Snapshot;
use crate::reload::{Change, FileSet};

/// Why a policy file or directory could not be loaded; the message names the flag and the path.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--policy {path}: {reason}")]
    File { path: String, reason: String },
    #[error("--policy-dir {path}: {reason}")]
    Dir { path: String, reason: String },
}

/// Reads and validates the policy file, or returns the embedded default when there is none.
pub fn read_policy(path: Option<&Path>) -> Result<Policy, LoadError> {
    let Some(path) = path else {
        return Ok(Policy::embedded_default());
    };
    let error = |reason: String| LoadError::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| error(e.to_string()))?;
    parse(&bytes).map_err(error)
}

/// Parses a policy file's contents; the reason names the field.
fn parse(bytes: &[u8]) -> Result<Policy, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    Policy::from_yaml(text).map_err(|e| e.to_string())
}

/// Reads every TracingPolicy in a directory (`*.yaml`, `*.yml`, `*.json`, several documents per
/// file; not its subdirectories), in file name order.
///
/// A document that does not decode is an error, although the API server would prune unknown
/// fields: a preview that silently differs from what was written would be worse. A policy that
/// decodes but does not validate is kept, as invalid, as the server keeps it.
pub fn read_policy_dir(dir: &Path) -> Result<Snapshot, LoadError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| dir_error(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    let mut names = BTreeSet::new();
    let mut resolutions = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).map_err(|e| dir_error(file, e.to_string()))?;
        for (index, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let at = |reason: String| dir_error(file, format!("document {}: {reason}", index + 1));
            let value = Value::deserialize(document).map_err(|e| at(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            let resolution = read_document(value, &mut names).map_err(at)?;
            resolutions.push(resolution);
        }
    }
    Ok(Snapshot::build(resolutions))
}

fn dir_error(path: &Path, reason: String) -> LoadError {
    LoadError::Dir {
        path: path.display().to_string(),
        reason,
    }
}

/// One document of a policy directory: a TracingPolicy with a name not seen before.
fn read_document(
    mut value: Value,
    names: &mut BTreeSet<String>,
) -> Result<Result<Resolved, Rejected>, String> {
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    let expected = format!("{GROUP}/{VERSION}");
    if api_version != Some(expected.as_str()) || kind != Some(KIND) {
        return Err(format!(
            "expected apiVersion {expected}, kind {KIND}; got apiVersion {}, kind {}",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        ));
    }
    // The API server gives a new object generation 1; a file usually names none.
    if value.pointer("/metadata/generation").is_none()
        && let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.insert("generation".into(), json!(FIRST_GENERATION));
    }
    let tp = resource::decode(value).map_err(|e| e.to_string())?;
    let name = tp.metadata.name.clone().unwrap_or_default();
    if !names.insert(name.clone()) {
        return Err(format!(
            "a second TracingPolicy named {name:?} (names are unique in a cluster)"
        ));
    }
    Ok(resource::resolve(&tp))
}

/// What one [`PolicyStore::reload`] found.
#[derive(Debug, PartialEq)]
pub enum PolicyReload {
    /// No file, or the same valid contents as last time.
    Unchanged,
    /// A new valid policy is in force; its fingerprint, for the log.
    Applied { fingerprint: String },
    /// The new contents were unreadable or invalid; the previous policy, if there was one,
    /// stays. The reason names the field (never a value that could be a secret: policies hold
    /// references only).
    Refused(String),
    /// The same refused contents as at the last poll: reported at every poll until fixed, so a
    /// broken file never goes quiet in the log.
    StillRefused(String),
}

/// The policy being served, and the file it came from (none: the embedded default, forever).
pub struct PolicyStore {
    path: Option<PathBuf>,
    files: Mutex<FileSet>,
    state: RwLock<State>,
}

/// The policy in force (none when the file has never been valid since the start) and why the
/// file's current contents are refused, if they are.
struct State {
    current: Option<Arc<Policy>>,
    refused: Option<String>,
}

impl PolicyStore {
    /// Reads and validates the file now. An unreadable or invalid file does not fail: the store
    /// starts without a file policy and says why ([`PolicyStore::refused`]); see the module docs.
    pub fn load(path: Option<PathBuf>) -> PolicyStore {
        let mut files = FileSet::new(path.iter().cloned().collect());
        let loaded = match &path {
            None => Ok(Policy::embedded_default()),
            Some(p) => {
                let error = |reason: String| {
                    LoadError::File {
                        path: p.display().to_string(),
                        reason,
                    }
                    .to_string()
                };
                files
                    .read()
                    .map_err(|(_, e)| error(e.to_string()))
                    .and_then(|contents| parse(&contents[0]).map_err(error))
            }
        };
        let state = match loaded {
            Ok(policy) => State {
                current: Some(Arc::new(policy)),
                refused: None,
            },
            Err(reason) => State {
                current: None,
                refused: Some(reason),
            },
        };
        PolicyStore {
            path,
            files: Mutex::new(files),
            state: RwLock::new(state),
        }
    }

    /// The policy in force; `None` while the file has not been valid once since the start.
    pub fn current(&self) -> Option<Arc<Policy>> {
        // A poisoned lock still holds a complete state: writers only assign.
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    /// Why the file's current contents are not in force (`--policy <path>: <field>: <reason>`),
    /// or `None` when they are.
    pub fn refused(&self) -> Option<String> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .refused
            .clone()
    }

    /// The file this store follows, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file and swaps in a valid new version. Reads block: call it off the
    /// request path (`spawn_blocking`).
    pub fn reload(&self) -> PolicyReload {
        let Some(path) = &self.path else {
            return PolicyReload::Unchanged;
        };
        let change = self.files.lock().unwrap_or_else(|e| e.into_inner()).poll();
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let refuse = |state: &mut State, reason: String| {
            let reason = LoadError::File {
                path: path.display().to_string(),
                reason,
            }
            .to_string();
            state.refused = Some(reason.clone());
            PolicyReload::Refused(reason)
        };
        match change {
            Change::Unchanged => match &state.refused {
                Some(reason) => PolicyReload::StillRefused(reason.clone()),
                None => PolicyReload::Unchanged,
            },
            // Unreadable already names the path.
            Change::Unreadable(reason) => {
                let reason = format!("--policy {reason}");
                state.refused = Some(reason.clone());
                PolicyReload::Refused(reason)
            }
            Change::Changed(contents) => match parse(&contents[0]) {
                Ok(policy) => {
                    let fingerprint = policy.fingerprint();
                    state.current = Some(Arc::new(policy));
                    state.refused = None;
                    PolicyReload::Applied { fingerprint }
                }
                Err(reason) => refuse(&mut state, reason),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("policy-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn store_keeps_the_old_policy_when_the_new_one_is_invalid() {
        let dir = Scratch::new("store");
        let path = dir.0.join("policy.yaml");
        fs::write(
            &path,
            "profile: otlp\nexporter:\n  endpoint: http://collector:4317\n",
        )
        .unwrap();
        let store = PolicyStore::load(Some(path.clone()));
        let first = store.current().unwrap().fingerprint();
        assert_eq!(store.reload(), PolicyReload::Unchanged);
        fs::write(&path, "sampling: {ratio: 2}\n").unwrap();
        match store.reload() {
            PolicyReload::Refused(reason) => assert!(reason.contains("sampling.ratio"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(store.current().unwrap().fingerprint(), first);
        // Said again at every poll until fixed, and readable by whoever asks.
        let refused = store.refused().unwrap();
        assert_eq!(store.reload(), PolicyReload::StillRefused(refused.clone()));
        assert!(refused.starts_with("--policy "), "{refused}");
        fs::write(&path, "profile: lightstep\n").unwrap();
        let applied = store.reload();
        assert_ne!(store.current().unwrap().fingerprint(), first);
        assert_eq!(
            applied,
            PolicyReload::Applied {
                fingerprint: store.current().unwrap().fingerprint()
            }
        );
        assert_eq!(store.refused(), None);
        assert_eq!(store.reload(), PolicyReload::Unchanged);
    }

    #[test]
    fn an_invalid_file_at_start_gives_no_policy_until_it_is_fixed() {
        let dir = Scratch::new("start");
        let path = dir.0.join("policy.yaml");
        fs::write(&path, "sampling: {ratio: 2}\n").unwrap();
        let store = PolicyStore::load(Some(path.clone()));
        assert_eq!(store.current(), None);
        let reason = store.refused().unwrap();
        assert_eq!(reason, read_policy(Some(&path)).unwrap_err().to_string());
        assert!(reason.contains("sampling.ratio"), "{reason}");
        assert_eq!(store.reload(), PolicyReload::StillRefused(reason));

        // Fixed: served from the next poll on.
        fs::write(
            &path,
            "profile: otlp\nexporter:\n  endpoint: http://collector:4317\n",
        )
        .unwrap();
        assert!(matches!(store.reload(), PolicyReload::Applied { .. }));
        assert_eq!(
            store.current().unwrap().exporter.endpoint,
            "http://collector:4317"
        );

        // A missing file at start is the same: no policy, and the reason.
        let missing = PolicyStore::load(Some(dir.0.join("absent.yaml")));
        assert_eq!(missing.current(), None);
        assert!(missing.refused().unwrap().starts_with("--policy "));
    }

    #[test]
    fn the_embedded_default_never_reloads() {
        let store = PolicyStore::load(None);
        assert_eq!(*store.current().unwrap(), Policy::embedded_default());
        assert_eq!(store.refused(), None);
        assert_eq!(store.reload(), PolicyReload::Unchanged);
    }

    #[test]
    fn a_file_and_the_store_give_the_same_policy_and_the_same_errors() {
        let dir = Scratch::new("same");
        let path = dir.0.join("policy.yaml");
        fs::write(&path, "sampling: {ratio: 0.25}\n").unwrap();
        let store = PolicyStore::load(Some(path.clone()));
        assert_eq!(*store.current().unwrap(), read_policy(Some(&path)).unwrap());

        fs::write(&path, [0xff, 0xfe]).unwrap();
        let from_file = read_policy(Some(&path)).unwrap_err().to_string();
        let from_store = PolicyStore::load(Some(path.clone())).refused().unwrap();
        assert_eq!(from_file, from_store);
        assert!(from_file.starts_with("--policy "), "{from_file}");
        assert!(from_file.contains("not UTF-8"), "{from_file}");
    }
}
