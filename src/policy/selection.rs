//! Which policy applies to a namespace: a pure function of the TracingPolicies, the namespace's
//! labels and the fallback (the `--policy` file, or the embedded default).
//!
//! The rule, in full:
//! 1. Only valid TracingPolicies take part (those [`crate::policy::resource::resolve`] accepts); an
//!    invalid one never applies, whatever its priority.
//! 2. Among those whose `namespaceSelector` matches the namespace's labels, the highest
//!    `priority` wins.
//! 3. On equal priority, the policy whose `metadata.name` sorts first (byte order) wins. Names are
//!    unique in a cluster-scoped resource, so the order is total: every replica, and
//!    `mutate --policy-dir`, picks the same policy.
//! 4. When none matches, or the namespace's labels are not known (not yet in the cache), the
//!    fallback applies in `inject` mode.
//!
//! A [`Snapshot`] is built once per change of the policies: they are resolved and sorted by
//! (priority descending, name ascending) there, so an admission only walks the list to the first
//! match and never validates anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::policy::Policy;
use crate::policy::resource::{PolicyMode, Rejected, Resolved};

/// The TracingPolicies at one point in time, resolved and in the order selection tries them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    valid: Vec<Resolved>,
    invalid: Vec<Rejected>,
}

impl Snapshot {
    /// Sorts the valid policies for [`select`] and keeps the invalid ones for reports.
    pub fn build(resolutions: impl IntoIterator<Item = Result<Resolved, Rejected>>) -> Snapshot {
        let (mut valid, mut invalid) = (Vec::new(), Vec::new());
        for r in resolutions {
            match r {
                Ok(p) => valid.push(p),
                Err(e) => invalid.push(e),
            }
        }
        valid.sort_by(|a: &Resolved, b: &Resolved| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        invalid.sort_by(|a: &Rejected, b: &Rejected| a.name.cmp(&b.name));
        Snapshot { valid, invalid }
    }

    /// The valid policies, in selection order.
    pub fn valid(&self) -> &[Resolved] {
        &self.valid
    }

    /// The policies that never apply, by name.
    pub fn invalid(&self) -> &[Rejected] {
        &self.invalid
    }
}

/// The policy an admission uses, how, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selected<'a> {
    pub policy: &'a Policy,
    pub mode: PolicyMode,
    pub choice: Choice<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Choice<'a> {
    /// The first matching TracingPolicy in selection order.
    TracingPolicy(&'a Resolved),
    /// The file or embedded policy.
    Fallback(Fallback),
}

/// Why the file or embedded policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// TracingPolicies are not watched (`serve` without `--watch-tracing-policies`, or `mutate`
    /// without `--policy-dir`).
    NotWatching,
    /// No valid TracingPolicy matches the namespace.
    NoMatch,
    /// The namespace is not in the cache (created a moment ago, or the cache is behind).
    NamespaceUnknown,
}

impl Fallback {
    /// The label used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NotWatching => "not-watching",
            Fallback::NoMatch => "no-match",
            Fallback::NamespaceUnknown => "namespace-not-cached",
        }
    }
}

impl<'a> Selected<'a> {
    /// The file or embedded policy, in inject mode.
    pub fn fallback(policy: &'a Policy, why: Fallback) -> Selected<'a> {
        Selected {
            policy,
            mode: PolicyMode::Inject,
            choice: Choice::Fallback(why),
        }
    }

    /// The TracingPolicy's name, when one was chosen.
    pub fn tracing_policy(&self) -> Option<&'a str> {
        match self.choice {
            Choice::TracingPolicy(r) => Some(&r.name),
            Choice::Fallback(_) => None,
        }
    }
}

/// Chooses the policy for a namespace; `labels` is `None` when the namespace is not known.
pub fn select<'a>(
    snapshot: &'a Snapshot,
    labels: Option<&BTreeMap<String, String>>,
    fallback: &'a Policy,
) -> Selected<'a> {
    match (labels, select_tracing_policy(snapshot, labels)) {
        (_, Some(chosen)) => chosen,
        (None, None) => Selected::fallback(fallback, Fallback::NamespaceUnknown),
        (Some(_), None) => Selected::fallback(fallback, Fallback::NoMatch),
    }
}

/// The TracingPolicy for a namespace, rules 1 to 3 of [`select`]; `None` where the fallback
/// would apply. For a server that has no fallback (its policy file is invalid).
pub fn select_tracing_policy<'a>(
    snapshot: &'a Snapshot,
    labels: Option<&BTreeMap<String, String>>,
) -> Option<Selected<'a>> {
    let labels = labels?;
    let p = snapshot.valid.iter().find(|p| p.selector.matches(labels))?;
    Some(Selected {
        policy: &p.policy,
        mode: p.mode,
        choice: Choice::TracingPolicy(p),
    })
}

/// The explanation `mutate --explain` prints: which policy applies and why, which others match
/// and lose, and which are ignored as invalid. `snapshot` is `None` when no TracingPolicies are
/// in play at all.
pub fn explain(
    snapshot: Option<&Snapshot>,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
    fallback: &Policy,
    fallback_source: &str,
) -> String {
    let mut out = String::new();
    let empty = Snapshot::default();
    let selected = match snapshot {
        Some(s) => select(s, labels, fallback),
        None => Selected::fallback(fallback, Fallback::NotWatching),
    };
    let snapshot = snapshot.unwrap_or(&empty);
    let shown_labels = labels.map(|l| {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    // Writing to a String cannot fail.
    match selected.choice {
        Choice::TracingPolicy(chosen) => {
            let _ = writeln!(
                out,
                "policy: TracingPolicy {} (generation {}, priority {}, mode {}): selects namespace {namespace}",
                chosen.name,
                chosen.generation,
                chosen.priority,
                chosen.mode.as_str()
            );
            let losers = snapshot
                .valid
                .iter()
                .filter(|p| p.name != chosen.name)
                .filter(|p| labels.is_some_and(|l| p.selector.matches(l)));
            for p in losers {
                let why = if p.priority < chosen.priority {
                    format!("lower priority ({} < {})", p.priority, chosen.priority)
                } else {
                    format!(
                        "same priority {}, and {:?} sorts before {:?}",
                        p.priority, chosen.name, p.name
                    )
                };
                let _ = writeln!(out, "  also matches: {}: not chosen, {why}", p.name);
            }
        }
        Choice::Fallback(why) => {
            let reason = match why {
                Fallback::NotWatching => "no TracingPolicy given".to_owned(),
                Fallback::NoMatch => format!(
                    "no valid TracingPolicy selects namespace {namespace} (labels {})",
                    shown_labels.as_deref().unwrap_or("")
                ),
                Fallback::NamespaceUnknown => format!("namespace {namespace} is not known"),
            };
            let _ = writeln!(
                out,
                "policy: {} from {fallback_source}, mode inject: {reason}",
                fallback.name
            );
        }
    }
    for r in &snapshot.invalid {
        let _ = writeln!(
            out,
            "  ignored: TracingPolicy {} (generation {}) is invalid: {}",
            r.name, r.generation, r.error
        );
    }
    out
}
