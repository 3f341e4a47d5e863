//! Noticing that mounted files changed: poll the paths, compare the contents.
//!
//! Kubernetes updates a mounted Secret or ConfigMap by writing a new timestamped directory and
//! swapping the `..data` symlink to it; the file the process opened keeps its old inode, and
//! inotify on that inode sees nothing (kubewarden's reload bugs came from there). Re-reading the
//! paths every few seconds costs a few microseconds for files of a few kilobytes and follows
//! whatever the symlinks point at now, whichever way the files were replaced.
//!
//! Only a SHA-256 digest of the last contents is kept, so a private key is not held twice in
//! memory, and a bad new version is reported once, not at every poll.

use std::fs;
use std::io;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// What one poll found.
#[derive(Debug)]
pub(crate) enum Change {
    /// The same contents (or the same read error) as last time.
    Unchanged,
    /// New contents, one entry per path, in the order given to [`FileSet::new`].
    Changed(Vec<Vec<u8>>),
    /// A path could not be read (say, mid-swap); reported once per distinct error.
    Unreadable(String),
}

/// A fixed set of paths read together, and the digest of what they held last time.
#[derive(Debug)]
pub(crate) struct FileSet {
    paths: Vec<PathBuf>,
    last: Option<[u8; 32]>,
}

impl FileSet {
    pub(crate) fn new(paths: Vec<PathBuf>) -> FileSet {
        FileSet { paths, last: None }
    }

    /// Reads every path now and remembers the contents as seen (used at startup).
    pub(crate) fn read(&mut self) -> Result<Vec<Vec<u8>>, (PathBuf, io::Error)> {
        let contents = self.read_all()?;
        self.last = Some(digest(&contents));
        Ok(contents)
    }

    /// Reads every path and says whether anything differs from the last poll.
    pub(crate) fn poll(&mut self) -> Change {
        match self.read_all() {
            Ok(contents) => {
                let d = digest(&contents);
                if self.last == Some(d) {
                    return Change::Unchanged;
                }
                self.last = Some(d);
                Change::Changed(contents)
            }
            Err((path, e)) => {
                let message = format!("{}: {e}", path.display());
                let d = digest(&[message.as_bytes().to_vec()]);
                if self.last == Some(d) {
                    return Change::Unchanged;
                }
                self.last = Some(d);
                Change::Unreadable(message)
            }
        }
    }

    /// Makes the next poll report the contents as changed even if they are the same: for a
    /// version refused for a reason that time alone can remove.
    pub(crate) fn forget(&mut self) {
        self.last = None;
    }

    fn read_all(&self) -> Result<Vec<Vec<u8>>, (PathBuf, io::Error)> {
        self.paths
            .iter()
            .map(|p| fs::read(p).map_err(|e| (p.clone(), e)))
            .collect()
    }
}

fn digest(contents: &[Vec<u8>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for c in contents {
        // The length keeps ("ab", "c") apart from ("a", "bc").
        h.update((c.len() as u64).to_le_bytes());
        h.update(c);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_change_once_and_an_error_once() {
        let dir = std::env::temp_dir().join(format!("reload-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        fs::write(&a, "one").unwrap();
        let mut set = FileSet::new(vec![a.clone()]);
        assert_eq!(set.read().unwrap(), vec![b"one".to_vec()]);
        assert!(matches!(set.poll(), Change::Unchanged));
        fs::write(&a, "two").unwrap();
        assert!(matches!(set.poll(), Change::Changed(c) if c == vec![b"two".to_vec()]));
        assert!(matches!(set.poll(), Change::Unchanged));
        fs::remove_file(&a).unwrap();
        assert!(matches!(set.poll(), Change::Unreadable(_)));
        assert!(matches!(set.poll(), Change::Unchanged));
        fs::write(&a, "two").unwrap();
        assert!(matches!(set.poll(), Change::Changed(_)));
        fs::remove_dir_all(&dir).unwrap();
    }
}
