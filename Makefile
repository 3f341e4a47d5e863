# lightstep-tekton-webhook: every target has a one-line comment after '##'; `make help` lists them.
CARGO ?= cargo
BIN := target/release/lightstep-tekton-webhook

.DEFAULT_GOAL := help
.PHONY: help build test lint bench

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## Build the release binary
	$(CARGO) build --locked --release

test: ## Run the unit, fixture, property and HTTP tests
	$(CARGO) test --locked

lint: ## Check formatting and run clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

bench: ## Run the criterion benchmark of the decision
	$(CARGO) bench --locked --bench decide
