# lightstep-tekton-webhook: every target has a one-line comment after '##'; `make help` lists them.
CARGO ?= cargo
KUBECTL ?= kubectl
DOCKER ?= docker
# Helm 3 or 4 (`.ci/install-helm` puts both under /usr/local/lib/helm{3,4}/); both render alike.
HELM ?= $(shell command -v helm 2>/dev/null || echo /usr/local/lib/helm3/helm)
CHART := charts/lightstep-tekton-webhook
BIN := target/release/lightstep-tekton-webhook

# Cluster install: which overlay `deploy`/`undeploy` use (cert-manager or self-signed), and the
# Service the certificates are made for (the names manifests/base uses).
OVERLAY ?= cert-manager
SERVICE ?= lightstep-tekton-webhook
NAMESPACE ?= lightstep-tekton
CERT_DAYS ?= 365
# Git-ignored; the self-signed overlay reads tls.crt, tls.key and ca-bundle.yaml from here.
CERTS_DIR := manifests/overlays/self-signed/certs
RENDERED_DIR := target/manifests
IMAGE ?= ghcr.io/lightstep/lightstep-tekton-webhook:0.1.0
# Arguments for the load tool, e.g. LOAD_ARGS="--scenario throughput --concurrency 32";
# none runs its three standard scenarios (`cargo bench --bench load -- --help`).
LOAD_ARGS ?=
# Seconds per fuzz target for `make fuzz`, and arguments for the soak run, e.g.
# SOAK_ARGS="--duration 600 --rate 400" (`cargo bench --bench soak -- --help`).
FUZZ_SECONDS ?= 120
SOAK_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help build test lint run certs crd manifests manifests-base chart deploy undeploy bench soak fuzz image

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## Build the release binary
	$(CARGO) build --locked --release

test: ## Run every test: unit, contract, fixtures, patches, properties, preview, server, manifests, chart, tracing_policy, cluster, lease, watch, otlp, spans, export, release, docs
	$(CARGO) test --locked

lint: ## Check formatting and run clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

run: ## Serve on https://127.0.0.1:8443 with development certificates and the default policy
	$(CARGO) run --locked -- serve --dev

certs: ## Make (or rotate) the CA and serving certificate for the self-signed overlay
	$(CARGO) run --locked --quiet -- certs --service $(SERVICE) --namespace $(NAMESPACE) \
		--days $(CERT_DAYS) --out $(CERTS_DIR) >/dev/null

crd: ## Regenerate the chart's CRD from the Rust types, then manifests/base (tests check both)
	$(CARGO) run --locked --quiet -- crd > $(CHART)/crds/crd-tracingpolicy.yaml
	$(MAKE) manifests-base

# manifests/base, the cert-manager overlay's certificates.yaml and manifests/uninstall's Job are
# renderings of the chart
# (values: $(CHART)/ci/kustomize-base-values.yaml and ci/cert-manager-values.yaml), so the chart
# is the one place the install is written. Only kustomization.yaml, namespace.yaml and the
# example token Secret in manifests/base are kept by hand. tests/chart.rs runs this target into a
# temporary directory and fails when the checked-in files differ.
BASE_DIR ?= manifests/base
# The chart's hook that releases the exporter's finalizers is no part of the install: it goes to
# manifests/uninstall, which `undeploy` applies once the exporter is stopped.
RELEASE_HOOK := release-finalizers.yaml
UNINSTALL_DIR ?= manifests/uninstall
CERT_MANAGER_DIR ?= manifests/overlays/cert-manager
RENDER_DIR ?= target/chart-render
RENDERED_NOTE := \# Rendered from $(CHART) by `make manifests-base`; edit the chart, not this file.
manifests-base: ## Render manifests/base and the cert-manager overlay's certificates from the chart (a test checks them)
	@rm -rf $(RENDER_DIR) && mkdir -p $(RENDER_DIR)
	$(HELM) template $(SERVICE) $(CHART) --namespace $(NAMESPACE) --include-crds --skip-tests \
		-f $(CHART)/ci/kustomize-base-values.yaml --output-dir $(RENDER_DIR) >/dev/null
	@for f in $(RENDER_DIR)/*/crds/*.yaml $(RENDER_DIR)/*/templates/*.yaml; do \
		case "$$f" in */$(RELEASE_HOOK)) continue;; esac; \
		{ echo '$(RENDERED_NOTE)'; cat "$$f"; } > $(BASE_DIR)/$$(basename "$$f"); done
	@{ echo '$(RENDERED_NOTE)'; cat $(RENDER_DIR)/*/templates/$(RELEASE_HOOK); } \
		> $(UNINSTALL_DIR)/$(RELEASE_HOOK)
	@{ echo '$(RENDERED_NOTE)'; $(HELM) template $(SERVICE) $(CHART) --namespace $(NAMESPACE) \
		-f $(CHART)/ci/cert-manager-values.yaml --show-only templates/certificates.yaml; } \
		> $(CERT_MANAGER_DIR)/certificates.yaml

chart: ## Package the chart into target/ (lint it first with both Helm majors: cargo test --test chart)
	$(HELM) package $(CHART) --destination target

# The self-signed overlay cannot build without certificates; make them once if missing.
$(CERTS_DIR)/tls.crt:
	$(MAKE) certs

manifests: $(CERTS_DIR)/tls.crt ## Render both overlays into target/manifests/ with kubectl kustomize
	@mkdir -p $(RENDERED_DIR)
	$(KUBECTL) kustomize manifests/overlays/cert-manager > $(RENDERED_DIR)/cert-manager.yaml
	$(KUBECTL) kustomize manifests/overlays/self-signed > $(RENDERED_DIR)/self-signed.yaml
	@echo "rendered $(RENDERED_DIR)/cert-manager.yaml and $(RENDERED_DIR)/self-signed.yaml"

deploy: $(if $(filter self-signed,$(OVERLAY)),$(CERTS_DIR)/tls.crt) ## Apply an overlay to the current cluster (OVERLAY=cert-manager|self-signed)
	$(KUBECTL) apply -k manifests/overlays/$(OVERLAY)
	$(KUBECTL) -n $(NAMESPACE) rollout status deployment/$(SERVICE) --timeout=180s

# The webhook configurations go first: with the Deployment gone but the enforced webhook still
# registered, the API server would refuse every Tekton pod in enforced namespaces.
# Deleting needs no certificates: the self-signed overlay is the base plus the certificate Secret
# (and a caBundle patch), so that overlay is deleted as those two, and an empty certs directory
# is no reason to make a new CA. The Secret's name is fixed in that overlay's kustomization.
# KEEP_TRACING_POLICIES=1 deletes by name everything but the CRD, whose deletion would take every
# TracingPolicy in the cluster with it: the namespace (with all the namespaced objects of either
# overlay), and the cluster-scoped RBAC of the webhook and the exporter.
TLS_SECRET := lightstep-tekton-webhook-tls
KEEP_TRACING_POLICIES ?=
# Then the exporter stops (its Deployment deleted, waiting for its pods: a running exporter would
# put its finalizer back), and the Job in manifests/uninstall removes that finalizer from every
# run, with its own RBAC, before the exporter's RBAC and the namespace go: a finalizer nobody
# removes blocks the run's deletion, and its namespace's, forever.
RELEASE_JOB := job/$(SERVICE)-release-finalizers
undeploy: ## Delete what deploy applied, the TracingPolicy CRD too unless KEEP_TRACING_POLICIES=1 (OVERLAY=cert-manager|self-signed)
	$(KUBECTL) delete --ignore-not-found mutatingwebhookconfiguration,validatingwebhookconfiguration $(SERVICE)
	$(KUBECTL) -n $(NAMESPACE) delete --ignore-not-found --cascade=foreground --wait deployment $(SERVICE)-exporter
	@if $(KUBECTL) get namespace $(NAMESPACE) >/dev/null 2>&1; then \
		$(KUBECTL) delete --ignore-not-found -k manifests/uninstall >/dev/null && \
		$(KUBECTL) apply -k manifests/uninstall && \
		$(KUBECTL) -n $(NAMESPACE) wait --for=condition=complete --timeout=300s $(RELEASE_JOB) && \
		$(KUBECTL) -n $(NAMESPACE) logs $(RELEASE_JOB) --tail=3 && \
		$(KUBECTL) delete --ignore-not-found -k manifests/uninstall || { \
		echo "undeploy: the finalizers were not all released; see kubectl -n $(NAMESPACE) logs $(RELEASE_JOB)" \
		     "and docs/exporter.md, Uninstalling and stuck runs; nothing else was deleted" >&2; exit 1; }; fi
ifneq ($(KEEP_TRACING_POLICIES),)
	$(KUBECTL) delete --ignore-not-found namespace $(NAMESPACE)
	$(KUBECTL) delete --ignore-not-found clusterrolebinding,clusterrole $(SERVICE) $(SERVICE)-exporter
else ifeq ($(OVERLAY),self-signed)
	$(KUBECTL) -n $(NAMESPACE) delete --ignore-not-found secret $(TLS_SECRET)
	$(KUBECTL) delete --ignore-not-found -k manifests/base
else
	$(KUBECTL) delete --ignore-not-found -k manifests/overlays/$(OVERLAY)
endif

bench: ## Benchmark the decision (criterion), then load-test the HTTPS server (LOAD_ARGS=...)
	$(CARGO) bench --locked --bench decide
	$(CARGO) bench --locked --bench load -- $(LOAD_ARGS)

soak: ## Soak two replicas for 3 minutes under rotation, policy rewrites and restarts (SOAK_ARGS=...)
	$(CARGO) bench --locked --bench soak -- $(SOAK_ARGS)

# cargo-fuzz on the nightly toolchain (`cargo install cargo-fuzz --locked`). No sanitizer: the
# crate forbids unsafe code, and without ASan the targets run several times faster. The seeds are
# committed in fuzz/seeds/; what libFuzzer finds goes to fuzz/corpus/ and fuzz/artifacts/.
FUZZ_RUN = cargo +nightly fuzz run --sanitizer none --debug-assertions
fuzz: ## Fuzz the review path and the policy parser, FUZZ_SECONDS each (nightly, cargo-fuzz)
	@mkdir -p fuzz/corpus/review fuzz/corpus/policy
	$(FUZZ_RUN) review $(CURDIR)/fuzz/corpus/review $(CURDIR)/fuzz/seeds/review -- -dict=$(CURDIR)/fuzz/review.dict \
		-timeout=10 -rss_limit_mb=2048 -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1
	$(FUZZ_RUN) policy $(CURDIR)/fuzz/corpus/policy $(CURDIR)/fuzz/seeds/policy -- -dict=$(CURDIR)/fuzz/policy.dict \
		-timeout=10 -rss_limit_mb=2048 -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

image: ## Build the container image (needs Docker with BuildKit)
	$(DOCKER) build -t $(IMAGE) .
