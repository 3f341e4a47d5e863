//! Runs' observations as the OTLP metrics request an exporter sends
//! (`ExportMetricsServiceRequest`): one `ResourceMetrics` per run, one scope naming this
//! program, one metric per name, one **delta** data point per attribute set (observations with
//! the same attributes, say two failed attempts of one task, are aggregated into it).
//!
//! Delta, because each run is sent once, with its spans, before it is marked exported: a delta
//! point is exactly that run's contribution, so nothing the process remembers (and a restart or
//! a leader change forgets) is part of any value. A cumulative-only backend is served by a
//! Collector's `deltatocumulative` processor.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric as OtlpMetric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::{Metric, Observation, RunMetrics};

/// The instrumentation scope of run metrics.
pub const SCOPE_NAME: &str = "lightstep-tekton-webhook/run-metrics";

/// Histogram bucket bounds in seconds, for CI: a few seconds (a lint task) to hours (a release
/// pipeline), about two per decade with the round numbers people ask about (1 and 5 minutes,
/// 1 hour). Past four hours everything is in the last bucket; a run's `timeout` is 1 hour by
/// default.
pub const BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    14400.0,
];

/// The request that exports these runs' observations.
pub fn metrics_request<'a>(
    runs: impl IntoIterator<Item = &'a RunMetrics>,
) -> ExportMetricsServiceRequest {
    let resource_metrics = runs
        .into_iter()
        .filter(|run| !run.observations.is_empty())
        .map(|run| ResourceMetrics {
            resource: Some(Resource {
                attributes: std::iter::once(string("service.name", &run.resource.service_name))
                    .chain(run.resource.attributes.iter().map(|(k, v)| string(k, v)))
                    .collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                metrics: metrics(&run.observations),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

/// A metric's observations by attribute set: each entry is one data point.
type Series<'a> = BTreeMap<Vec<(&'a str, &'a str)>, Vec<&'a Observation>>;

/// One OTLP metric per metric observed, in [`Metric::ALL`]'s order.
fn metrics(observations: &[Observation]) -> Vec<OtlpMetric> {
    let mut by_metric: BTreeMap<Metric, Series<'_>> = BTreeMap::new();
    for observation in observations {
        let key = observation
            .attributes
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        by_metric
            .entry(observation.metric)
            .or_default()
            .entry(key)
            .or_default()
            .push(observation);
    }
    by_metric
        .into_iter()
        .map(|(metric, series)| {
            let data = if metric.is_histogram() {
                metric::Data::Histogram(Histogram {
                    data_points: series.values().map(|o| histogram_point(o)).collect(),
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                })
            } else {
                metric::Data::Sum(Sum {
                    data_points: series.values().map(|o| count_point(o)).collect(),
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                    is_monotonic: true,
                })
            };
            OtlpMetric {
                name: metric.name().to_owned(),
                description: metric.description().to_owned(),
                unit: metric.unit().to_owned(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect()
}

/// The interval the aggregated observations cover.
fn interval(observations: &[&Observation]) -> (u64, u64) {
    let start = observations.iter().map(|o| o.start).min().unwrap_or(0);
    let end = observations.iter().map(|o| o.end).max().unwrap_or(0);
    (start, end)
}

fn histogram_point(observations: &[&Observation]) -> HistogramDataPoint {
    let (start, end) = interval(observations);
    let mut bucket_counts = vec![0u64; BUCKETS.len() + 1];
    for o in observations {
        // OTLP buckets are upper-inclusive: (bound[i-1], bound[i]].
        let bucket = BUCKETS.partition_point(|bound| *bound < o.value);
        bucket_counts[bucket] += 1;
    }
    let values = observations.iter().map(|o| o.value);
    HistogramDataPoint {
        attributes: attributes(observations[0]),
        start_time_unix_nano: start,
        time_unix_nano: end,
        count: observations.len() as u64,
        sum: Some(values.clone().sum()),
        bucket_counts,
        explicit_bounds: BUCKETS.to_vec(),
        min: values.clone().reduce(f64::min),
        max: values.reduce(f64::max),
        ..Default::default()
    }
}

fn count_point(observations: &[&Observation]) -> NumberDataPoint {
    let (start, end) = interval(observations);
    let total: f64 = observations.iter().map(|o| o.value).sum();
    NumberDataPoint {
        attributes: attributes(observations[0]),
        start_time_unix_nano: start,
        time_unix_nano: end,
        value: Some(number_data_point::Value::AsInt(total as i64)),
        ..Default::default()
    }
}

fn attributes(observation: &Observation) -> Vec<KeyValue> {
    observation
        .attributes
        .iter()
        .map(|(k, v)| string(k, v))
        .collect()
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}
