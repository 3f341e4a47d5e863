//! The routes: `POST /mutate` (inject mode), `POST /enforce` (enforce mode), `POST /validate`
//! (the validating webhook for the policy ConfigMap and TracingPolicies), `GET /healthz`,
//! `GET /readyz`.
//!
//! The handler is glue: read the body within limits, take the current policy, call
//! [`admission::review_with`], record one log line and the metrics, send the reply. Everything a
//! client can get wrong has an answer that does not involve the decision: 400 for a body that is
//! not an AdmissionReview or whose chunked framing is malformed, 413 over the body limit, 503 with `Retry-After` when the bodies in flight fill
//! their budget (`body`), 408 for a body that stalls, 500 (for that
//! request alone) if deciding panics. `/readyz` fails while shutting down and, with
//! `--watch-tracing-policies`, until the caches have their first lists.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tracing::Instrument as _;

use crate::admission;
use crate::admission::decide::Mode;
use crate::cluster::Cluster;
use crate::policy::loader::PolicyStore;
use crate::policy::selection::{self, Fallback, Selected};
use crate::runtime::telemetry::clipped;
use crate::serve::Limits;
use crate::serve::body::{self, BodyBudget};
use crate::serve::metrics::{self, PolicyMetrics, Rejection, WebhookMetrics};

/// What the handlers share.
pub(super) struct AppState {
    pub(super) policy: Arc<PolicyStore>,
    /// The watch caches, with `--watch-tracing-policies`.
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) metrics: Arc<WebhookMetrics>,
    pub(super) policy_metrics: PolicyMetrics,
    pub(super) ready: AtomicBool,
    pub(super) limits: Limits,
    /// The bytes all request bodies being read may hold together.
    pub(super) budget: BodyBudget,
}

pub(super) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/enforce", post(enforce))
        .route("/validate", post(validate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

// The whole request rather than a `HeaderMap` extractor, which would copy the headers.
async fn mutate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    admit(&state, Mode::Inject, &parts.headers, body).await
}

async fn enforce(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    admit(&state, Mode::Enforce, &parts.headers, body).await
}

/// One validating AdmissionReview: read the body within limits, judge, record, reply.
async fn validate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match body::read_body(&state.limits, &state.budget, &parts.headers, body).await {
        Ok(body) => body,
        Err((rejection, detail)) => return reject(&state, VALIDATE, rejection, &detail),
    };
    let started = Instant::now();
    // `validate` is written not to panic; if a bug makes it, this request fails alone.
    let result = std::panic::catch_unwind(|| admission::validate::validate(body.bytes()));
    match result {
        Ok(Ok(v)) => {
            metrics::record_validation(&state.policy_metrics, &v, started.elapsed());
            json_response(v.body)
        }
        Ok(Err(bad)) => reject(&state, VALIDATE, Rejection::BadRequest, &bad.to_string()),
        Err(_) => reject(
            &state,
            VALIDATE,
            Rejection::Internal,
            "validating failed unexpectedly",
        ),
    }
}

/// The label of `/validate` in the rejection log line, beside the modes of the pod paths.
const VALIDATE: &str = "validate";

fn json_response(body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if state.cluster.as_ref().is_some_and(|c| !c.synced()) {
        let waiting = "waiting for the first list of TracingPolicies and namespaces\n";
        (StatusCode::SERVICE_UNAVAILABLE, waiting).into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

/// One AdmissionReview: read the body within limits, decide, record, reply.
async fn admit(state: &AppState, mode: Mode, headers: &HeaderMap, body: Body) -> Response {
    let span = metrics::admission_span(mode, headers);
    // Held until this function returns, when the reply has been built.
    let body = match body::read_body(&state.limits, &state.budget, headers, body)
        .instrument(span.clone())
        .await
    {
        Ok(body) => body,
        Err((rejection, detail)) => return reject(state, mode.as_str(), rejection, &detail),
    };

    let started = Instant::now();
    let policy = state.policy.current();
    let snapshot = state.cluster.as_ref().map(|c| c.snapshot());
    // Cached state only: choosing a policy makes no API call.
    // Without a file policy (invalid since the start), TracingPolicies still apply; where none
    // does, the pod passes untouched (see `admission::review_or_pass`).
    let select = |namespace: &str| match (&state.cluster, &snapshot, policy.as_deref()) {
        (Some(cluster), Some(snapshot), Some(policy)) => {
            Some(cluster.select(snapshot, namespace, policy))
        }
        (Some(cluster), Some(snapshot), None) => {
            selection::select_tracing_policy(snapshot, cluster.labels(namespace).as_ref())
        }
        (_, _, policy) => policy.map(|p| Selected::fallback(p, Fallback::NotWatching)),
    };
    // `review` is written not to panic; if a bug makes it, this request fails alone.
    let result = span.in_scope(|| {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            admission::review_or_pass(body.bytes(), mode, select)
        }))
    });
    match result {
        Ok(Ok(reply)) => {
            span.record("uid", tracing::field::display(clipped(&reply.uid)));
            span.record("decision", reply.outcome.as_str());
            metrics::record_admission(&state.metrics, &reply, started.elapsed());
            let mut response = Response::new(Body::from(reply.body));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Ok(Err(bad)) => reject(
            state,
            mode.as_str(),
            Rejection::BadRequest,
            &bad.to_string(),
        ),
        Err(_) => reject(
            state,
            mode.as_str(),
            Rejection::Internal,
            "deciding failed unexpectedly",
        ),
    }
}

/// A plain-text, one-line answer for a request that gets no AdmissionReview.
fn reject(state: &AppState, mode: &'static str, rejection: Rejection, detail: &str) -> Response {
    let line = detail.replace(['\n', '\r'], " ");
    metrics::record_rejection(&state.metrics, mode, rejection, &line);
    let status = match rejection {
        Rejection::BadRequest | Rejection::BadFraming => StatusCode::BAD_REQUEST,
        Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        Rejection::Busy => StatusCode::SERVICE_UNAVAILABLE,
        Rejection::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = (status, format!("{line}\n")).into_response();
    if matches!(
        rejection,
        Rejection::TooLarge | Rejection::BodyTimeout | Rejection::BadFraming | Rejection::Busy
    ) {
        // The rest of the body is never read, so the connection cannot carry another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if rejection == Rejection::Busy {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(body::RETRY_AFTER.as_secs()),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::metrics::Registry;
    use tower::ServiceExt as _;

    fn state() -> (Arc<AppState>, Registry) {
        let mut registry = Registry::new();
        let state = Arc::new(AppState {
            policy: Arc::new(PolicyStore::load(None)),
            cluster: None,
            metrics: Arc::new(WebhookMetrics::register(&mut registry)),
            policy_metrics: PolicyMetrics::register(&mut registry),
            ready: AtomicBool::new(true),
            limits: Limits::default(),
            budget: BodyBudget::new(Limits::default().body_budget),
        });
        (state, registry)
    }

    async fn call(app: Router, method: &str, uri: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes.to_vec())
    }

    #[tokio::test]
    async fn router_answers_reviews_and_refuses_the_rest() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tekton-pipeline-task-traced.json"
        ))
        .unwrap();
        let (s, registry) = state();
        let (status, body) = call(router(s.clone()), "POST", "/mutate", fixture.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["response"]["patchType"], "JSONPatch");

        let (status, body) = call(router(s.clone()), "POST", "/enforce", b"{".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 1);

        let (status, _) = call(router(s.clone()), "GET", "/mutate", Vec::new()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        let (status, _) = call(
            router(s.clone()),
            "POST",
            "/mutate",
            vec![b' '; Limits::default().max_body + 1],
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

        let (status, _) = call(router(s.clone()), "GET", "/readyz", Vec::new()).await;
        assert_eq!(status, StatusCode::OK);
        s.ready.store(false, Ordering::SeqCst);
        let (status, _) = call(router(s.clone()), "GET", "/readyz", Vec::new()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _) = call(router(s.clone()), "GET", "/healthz", Vec::new()).await;
        assert_eq!(status, StatusCode::OK);

        let metrics = registry.encode();
        assert!(metrics.contains("admissions_total{mode=\"inject\",outcome=\"patched\"} 1"));
        assert!(metrics.contains("http_rejections_total{reason=\"too-large\"} 1"));
    }

    /// A request's uid or pod name with a newline, NUL or U+2028 cannot forge a log line, and a
    /// 1 MiB uid does not make a 1 MiB line: each request is one bounded line, in both formats.
    #[tokio::test]
    async fn request_values_reach_the_log_escaped_and_clipped() {
        use crate::runtime::telemetry::LogFormat;
        use crate::runtime::telemetry::tests::captured;
        let fixture: serde_json::Value = serde_json::from_slice(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tekton-pipeline-task-traced.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let forged = "x\nINFO lightstep_tekton_webhook::admission: admission uid=forged\0\u{2028}y";
        let mut newline = fixture.clone();
        newline["request"]["uid"] = forged.into();
        newline["request"]["object"]["metadata"]["name"] = forged.into();
        let mut huge = fixture.clone();
        huge["request"]["uid"] = "u".repeat(1 << 20).into();

        for format in [LogFormat::Text, LogFormat::Json] {
            let (subscriber, out) = captured(format);
            let guard = tracing::subscriber::set_default(subscriber);
            let (s, _registry) = state();
            for review in [&newline, &huge] {
                let body = serde_json::to_vec(review).unwrap();
                let (status, _) = call(router(s.clone()), "POST", "/mutate", body).await;
                assert_eq!(status, StatusCode::OK);
            }
            drop(guard);
            let text = out.text();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "{format:?}: {text}");
            for line in lines {
                assert!(
                    line.len() < 4096,
                    "{format:?}: a line of {} bytes",
                    line.len()
                );
                // JSON escapes control characters itself and may carry U+2028 raw: JSON allows
                // it, and a JSON-lines reader splits on `\n` only.
                let forbidden: &[char] = match format {
                    LogFormat::Text => &['\0', '\r', '\u{2028}'],
                    LogFormat::Json => &['\0', '\r'],
                };
                assert!(
                    !line.contains(forbidden),
                    "{format:?}: {}",
                    line.escape_debug()
                );
                if format == LogFormat::Json {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    assert!(v["uid"].as_str().unwrap().chars().count() <= 257, "{line}");
                }
            }
            if format == LogFormat::Text {
                // The newline is still there, written as `\n`.
                assert!(text.contains("uid=x\\nINFO"), "{text}");
            }
        }
    }

    #[tokio::test]
    async fn validate_judges_the_policy_config_map_and_counts_it() {
        let (s, registry) = state();
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "v", "operation": "CREATE",
                        "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
                        "object": {"metadata": {"name": "p", "namespace": "lightstep-tekton",
                                                "labels": {"lightstep-tekton.io/policy": "true"}},
                                   "data": {"policy.yaml": "sampling: {ratio: 2}"}}}
        });
        let body = serde_json::to_vec(&review).unwrap();
        let (status, reply) = call(router(s.clone()), "POST", "/validate", body).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(v["response"]["allowed"], false);
        let (status, _) = call(router(s.clone()), "POST", "/validate", b"{".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let metrics = registry.encode();
        assert!(
            metrics.contains("validations_total{kind=\"policy-configmap\",verdict=\"invalid\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("http_rejections_total{reason=\"bad-request\"} 1"));
    }
}
