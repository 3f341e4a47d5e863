//! One container's env as the precedence rules of [`super::env`] read it ([`EnvView`]), and
//! the patch operations they decide on it ([`Edits`]), emitted in an order that keeps every
//! index valid.

use json_patch::{PatchOperation, RemoveOperation};
use jsonptr::{PointerBuf, Token};
use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar};
use serde_json::Value;

use super::exporter::EXPORTER_GROUP;
use super::{add, replace};
use crate::admission::pod::Container;
use crate::policy::EnvFromPolicy;

/// One container's env as the rules read it.
pub(super) struct EnvView<'c> {
    pub(super) env: &'c [EnvVar],
    pub(super) env_from: &'c [EnvFromSource],
    pub(super) preserve_env_from: bool,
    /// The first exporter variable the container sets itself.
    pub(super) own_exporter: Option<&'static str>,
    /// Whether an `envFrom` source may set an exporter variable (`envFrom: preserve`).
    pub(super) exporter_from_env_from: bool,
}

impl<'c> EnvView<'c> {
    pub(super) fn new(container: &'c Container, env_from: EnvFromPolicy) -> EnvView<'c> {
        let mut view = EnvView {
            env: container.env.as_deref().unwrap_or_default(),
            env_from: container.env_from.as_deref().unwrap_or_default(),
            preserve_env_from: env_from == EnvFromPolicy::Preserve,
            own_exporter: None,
            exporter_from_env_from: false,
        };
        view.own_exporter = EXPORTER_GROUP
            .iter()
            .copied()
            .find(|n| view.defined(n).is_some());
        view.exporter_from_env_from = EXPORTER_GROUP
            .iter()
            .any(|name| view.may_come_from_env_from(name));
        view
    }

    /// The index of the entry that takes effect (the last one of that name).
    pub(super) fn defined(&self, name: &str) -> Option<usize> {
        self.env.iter().rposition(|e| e.name == name)
    }

    pub(super) fn positions(&self, name: &str) -> Vec<usize> {
        self.env
            .iter()
            .enumerate()
            .filter(|(_, e)| e.name == name)
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether `envFrom: preserve` leaves `name` to a source that may define it.
    pub(super) fn may_come_from_env_from(&self, name: &str) -> bool {
        self.preserve_env_from && self.env_from_may_define(name)
    }

    /// Whether an `envFrom` source's prefix can produce `name` (the webhook cannot read the
    /// source itself at admission time).
    pub(super) fn env_from_may_define(&self, name: &str) -> bool {
        self.env_from
            .iter()
            .any(|s| name.starts_with(s.prefix.as_deref().unwrap_or("")))
    }
}

/// One container's operations, kept apart so they can be emitted in a safe order: index-based
/// operations first, then removals (highest index first), then appends.
pub(super) struct Edits {
    pub(super) index: usize,
    pub(super) in_place: Vec<PatchOperation>,
    pub(super) removals: Vec<usize>,
    pub(super) appends: Vec<Value>,
}

impl Edits {
    pub(super) fn new(index: usize) -> Edits {
        Edits {
            index,
            in_place: Vec::new(),
            removals: Vec::new(),
            appends: Vec::new(),
        }
    }

    /// `/spec/containers/<index>/env/<at>`, or `/-` to append.
    pub(super) fn ptr(&self, at: Option<usize>) -> PointerBuf {
        PointerBuf::from_tokens([
            Token::new("spec"),
            Token::new("containers"),
            Token::from(self.index),
            Token::new("env"),
            at.map_or_else(|| Token::new("-"), Token::from),
        ])
    }

    /// Replaces every entry named `name` that differs from `value`; whether any did.
    pub(super) fn replace_differing(
        &mut self,
        view: &EnvView<'_>,
        name: &str,
        value: &Value,
    ) -> bool {
        let mut changed = false;
        for at in view.positions(name) {
            if !same_var(&view.env[at], value) {
                self.in_place
                    .push(replace(self.ptr(Some(at)), value.clone()));
                changed = true;
            }
        }
        changed
    }

    pub(super) fn finish(mut self, env_missing: bool, ops: &mut Vec<PatchOperation>) {
        if self.appends.is_empty() && self.in_place.is_empty() && self.removals.is_empty() {
            return;
        }
        ops.append(&mut self.in_place);
        self.removals.sort_unstable_by(|a, b| b.cmp(a));
        for &at in &self.removals {
            let path = self.ptr(Some(at));
            ops.push(PatchOperation::Remove(RemoveOperation { path }));
        }
        if env_missing {
            let mut env = self.ptr(None);
            env.pop_back();
            ops.push(add(env, Value::Array(Vec::new())));
        }
        let append = self.ptr(None);
        ops.extend(self.appends.into_iter().map(|v| add(append.clone(), v)));
    }
}

/// Whether an env entry already is exactly the variable this policy would write.
pub(super) fn same_var(existing: &EnvVar, desired: &Value) -> bool {
    match serde_json::to_value(existing) {
        Ok(v) => &v == desired,
        Err(_) => false,
    }
}
