//! The policy file being served: loaded at startup, re-read when it changes, a bad new version
//! refused with the previous one kept.
//!
//! Self-contained on purpose: the policy room's loader will take its place, and the server only
//! needs [`PolicyStore::load`], [`PolicyStore::current`] and [`PolicyStore::reload`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use crate::policy::Policy;
use crate::runtime::reload::{Change, FileSet};

/// The policy file cannot be served; names the flag and the file.
#[derive(Debug, thiserror::Error)]
#[error("--policy {path}: {reason}")]
pub struct PolicyFileError {
    path: String,
    reason: String,
}

/// The policy being served, and the file it came from.
pub(crate) struct PolicyStore {
    path: Option<PathBuf>,
    files: Mutex<FileSet>,
    current: RwLock<Arc<Policy>>,
}

impl PolicyStore {
    /// The policy in `path`, or the embedded default without one.
    pub(crate) fn load(path: Option<PathBuf>) -> Result<PolicyStore, PolicyFileError> {
        let mut files = FileSet::new(path.iter().cloned().collect());
        let policy = match &path {
            None => Policy::embedded_default(),
            Some(p) => {
                let refused = |reason: String| PolicyFileError {
                    path: p.display().to_string(),
                    reason,
                };
                let contents = files.read().map_err(|(_, e)| refused(e.to_string()))?;
                parse_policy(&contents[0]).map_err(refused)?
            }
        };
        Ok(PolicyStore {
            path,
            files: Mutex::new(files),
            current: RwLock::new(Arc::new(policy)),
        })
    }

    pub(crate) fn current(&self) -> Arc<Policy> {
        // A poisoned lock still holds a complete policy: writers only assign.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `None` when nothing changed; otherwise whether the new file was applied.
    pub(crate) fn reload(&self) -> Option<Result<(), String>> {
        self.path.as_ref()?;
        let change = self.files.lock().unwrap_or_else(|e| e.into_inner()).poll();
        match change {
            Change::Unchanged => None,
            Change::Unreadable(reason) => Some(Err(reason)),
            Change::Changed(contents) => Some(parse_policy(&contents[0]).map(|policy| {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
            })),
        }
    }
}

fn parse_policy(bytes: &[u8]) -> Result<Policy, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    Policy::from_yaml(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_store_keeps_the_old_policy_when_the_new_one_is_invalid() {
        let dir = std::env::temp_dir().join(format!("policy-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.yaml");
        std::fs::write(
            &path,
            "profile: otlp\nexporter:\n  endpoint: http://collector:4317\n",
        )
        .unwrap();
        let store = PolicyStore::load(Some(path.clone())).unwrap();
        let first = store.current().fingerprint();
        assert!(store.reload().is_none());
        std::fs::write(&path, "profile: nonsense\n").unwrap();
        assert!(matches!(store.reload(), Some(Err(_))));
        assert_eq!(store.current().fingerprint(), first);
        std::fs::write(&path, "profile: lightstep\n").unwrap();
        assert!(matches!(store.reload(), Some(Ok(()))));
        assert_ne!(store.current().fingerprint(), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
