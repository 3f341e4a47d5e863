//! The exporter's writes on a run, as JSON Patches built from the cached object: pure, so each
//! precondition is tested without a server.
//!
//! Every patch starts with a `test` of `metadata.uid` (a run deleted and created again under the
//! same name is another run), then tests the part of the object it changes, so it can never
//! clobber what another controller wrote since the cache saw the run: adding the finalizer tests
//! the whole `metadata.finalizers` array (or its absence: the API server's JSON Patch passes a
//! `test` of `null` on a missing member) and appends; removing it tests the element at its index
//! and removes that one. A failed test is a 422 (a changed uid a 409): the caller reads the cache
//! again and tries later.

use json_patch::{AddOperation, PatchOperation, RemoveOperation, TestOperation};
use jsonptr::{PointerBuf, Token};
use serde_json::{Value, json};

use super::EXPORT_FINALIZER;
use crate::spans::objects::Metadata;

/// What to write on a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunWrite {
    /// Add the exporter's finalizer.
    Hold,
    /// Remove the exporter's finalizer.
    Release,
    /// Set these annotations and, in the same patch, remove the finalizer if it is there.
    Mark(Vec<(String, String)>),
}

/// The JSON Patch for `write` on the run as cached, or `None` when there is nothing to write (the
/// finalizer is already there, or already gone) or the run has no uid to condition it on.
pub fn run_patch(metadata: &Metadata, write: &RunWrite) -> Option<Vec<PatchOperation>> {
    let uid = metadata.uid.as_deref()?;
    let mut ops = vec![test(pointer(&["metadata", "uid"]), json!(uid))];
    let index = metadata
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == EXPORT_FINALIZER);
    match write {
        RunWrite::Hold => {
            if index.is_some() {
                return None;
            }
            let finalizers = pointer(&["metadata", "finalizers"]);
            match &metadata.finalizers {
                Some(list) => {
                    ops.push(test(finalizers.clone(), json!(list)));
                    ops.push(add(
                        pointer(&["metadata", "finalizers", "-"]),
                        json!(EXPORT_FINALIZER),
                    ));
                }
                None => {
                    ops.push(test(finalizers.clone(), Value::Null));
                    ops.push(add(finalizers, json!([EXPORT_FINALIZER])));
                }
            }
        }
        RunWrite::Release => {
            release(&mut ops, index?);
        }
        RunWrite::Mark(annotations) => {
            match &metadata.annotations {
                Some(_) => {
                    for (key, value) in annotations {
                        ops.push(add(
                            pointer(&["metadata", "annotations", key]),
                            json!(value),
                        ));
                    }
                }
                None => {
                    let map: serde_json::Map<String, Value> = annotations
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .collect();
                    let path = pointer(&["metadata", "annotations"]);
                    ops.push(test(path.clone(), Value::Null));
                    ops.push(add(path, Value::Object(map)));
                }
            }
            if let Some(index) = index {
                release(&mut ops, index);
            }
        }
    }
    Some(ops)
}

/// Removes the finalizer at `index`, if it is still ours there.
fn release(ops: &mut Vec<PatchOperation>, index: usize) {
    let at = pointer(&["metadata", "finalizers", &index.to_string()]);
    ops.push(test(at.clone(), json!(EXPORT_FINALIZER)));
    ops.push(PatchOperation::Remove(RemoveOperation { path: at }));
}

/// A pointer from tokens: `/` and `~` in a key (`lightstep-tekton.io/exported`) are escaped.
fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().map(|t| Token::new(*t)))
}

fn test(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Test(TestOperation { path, value })
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(finalizers: Option<&[&str]>, annotations: bool) -> Metadata {
        Metadata {
            uid: Some("u-1".into()),
            finalizers: finalizers.map(|f| f.iter().map(|s| (*s).to_owned()).collect()),
            annotations: annotations.then(Default::default),
            ..Metadata::default()
        }
    }

    fn apply(object: &Value, ops: Vec<PatchOperation>) -> Result<Value, json_patch::PatchError> {
        let mut object = object.clone();
        json_patch::patch(&mut object, &json_patch::Patch(ops)).map(|()| object)
    }

    #[test]
    fn holding_appends_to_the_finalizers_the_cache_saw_and_only_to_those() {
        let cached = meta(Some(&["chains.tekton.dev"]), false);
        let ops = run_patch(&cached, &RunWrite::Hold).unwrap();
        let object = json!({"metadata": {"uid": "u-1", "finalizers": ["chains.tekton.dev"]}});
        let held = apply(&object, ops.clone()).unwrap();
        assert_eq!(
            held["metadata"]["finalizers"],
            json!(["chains.tekton.dev", EXPORT_FINALIZER])
        );
        // Another controller changed the list since: refused, nothing clobbered.
        let changed = json!({"metadata": {"uid": "u-1", "finalizers": ["chains.tekton.dev", "x"]}});
        assert!(apply(&changed, ops.clone()).is_err());
        // Another run under the same name: refused.
        let other = json!({"metadata": {"uid": "u-2", "finalizers": ["chains.tekton.dev"]}});
        assert!(apply(&other, ops).is_err());
        // Already held: nothing to write.
        assert!(run_patch(&meta(Some(&[EXPORT_FINALIZER]), false), &RunWrite::Hold).is_none());
    }

    #[test]
    fn holding_a_run_without_finalizers_tests_that_there_are_none() {
        let ops = run_patch(&meta(None, false), &RunWrite::Hold).unwrap();
        assert_eq!(
            serde_json::to_value(&ops).unwrap()[1],
            json!({"op": "test", "path": "/metadata/finalizers", "value": null})
        );
        assert_eq!(
            serde_json::to_value(&ops).unwrap()[2],
            json!({"op": "add", "path": "/metadata/finalizers", "value": [EXPORT_FINALIZER]})
        );
    }

    #[test]
    fn the_mark_removes_the_finalizer_in_the_same_patch_and_leaves_others() {
        let cached = meta(Some(&["a", EXPORT_FINALIZER, "b"]), true);
        let annotations = vec![("lightstep-tekton.io/exported".to_owned(), "abc".to_owned())];
        let ops = run_patch(&cached, &RunWrite::Mark(annotations.clone())).unwrap();
        let object = json!({"metadata": {"uid": "u-1", "annotations": {"x": "y"},
                                         "finalizers": ["a", EXPORT_FINALIZER, "b"]}});
        let marked = apply(&object, ops.clone()).unwrap();
        assert_eq!(marked["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            marked["metadata"]["annotations"],
            json!({"x": "y", "lightstep-tekton.io/exported": "abc"})
        );
        // "a" went meanwhile: ours moved, and the test at its old index fails.
        let moved = json!({"metadata": {"uid": "u-1", "annotations": {},
                                        "finalizers": [EXPORT_FINALIZER, "b"]}});
        assert!(apply(&moved, ops).is_err());
        // Without annotations the map is created, conditional on there being none.
        let bare = meta(None, false);
        let ops = run_patch(&bare, &RunWrite::Mark(annotations)).unwrap();
        // (The crate's `test` wants the member present, where the API server's passes a null
        // for a missing one: compare the operations themselves.)
        assert_eq!(
            serde_json::to_value(&ops).unwrap()[1],
            json!({"op": "test", "path": "/metadata/annotations", "value": null})
        );
        assert_eq!(
            serde_json::to_value(&ops).unwrap()[2],
            json!({"op": "add", "path": "/metadata/annotations",
                   "value": {"lightstep-tekton.io/exported": "abc"}})
        );
        assert!(run_patch(&meta(None, true), &RunWrite::Release).is_none());
    }
}
