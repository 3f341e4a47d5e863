//! The process's Prometheus registry: one sub-registry per component, each with its own prefix.
//!
//! Every metric name starts with `PREFIX` and the component's name (`lightstep_tekton_webhook_`
//! for the webhook), so dashboards can find a component's metrics and two components in one
//! process cannot register the same name. The registry is built before serving and read-only
//! after: components keep handles to their counters, and the admin port encodes the whole tree.
//! It is not a global, so tests can run several servers side by side.

/// Start of every metric name: the product, before the component's name.
const PREFIX: &str = "lightstep_tekton";

/// The component names, each a sub-registry (and the second word of its metric names).
pub(crate) const WEBHOOK: &str = "webhook";
pub(crate) const EXPORTER: &str = "exporter";

/// Every component's metrics.
#[derive(Debug)]
pub struct Registry {
    root: prometheus_client::registry::Registry,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            root: prometheus_client::registry::Registry::with_prefix(PREFIX),
        }
    }

    /// The sub-registry where `component` registers its metrics (one call per component).
    pub(crate) fn component(
        &mut self,
        component: &'static str,
    ) -> &mut prometheus_client::registry::Registry {
        self.root.sub_registry_with_prefix(component)
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.root)
            .expect("metrics encode to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn a_component_prefixes_its_metrics_with_the_product_and_its_name() {
        let mut registry = Registry::new();
        let webhook = Counter::<u64>::default();
        registry
            .component(WEBHOOK)
            .register("reloads", "help", webhook.clone());
        let other = Counter::<u64>::default();
        registry
            .component("exporter")
            .register("reloads", "help", other.clone());
        webhook.inc();
        other.inc_by(2);
        let text = registry.encode();
        assert!(
            text.contains("lightstep_tekton_webhook_reloads_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lightstep_tekton_exporter_reloads_total 2\n"),
            "{text}"
        );
    }
}
