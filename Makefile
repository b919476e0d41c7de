# Conclave: the two commands a newcomer needs are `make demo` and `make test`.
# Every target installs what it needs (Debian packages, a Python venv under
# $(CONCLAVE_CACHE)) and is idempotent. `make help` lists the targets.

SHELL := /bin/bash
export CONCLAVE_CACHE ?= $(HOME)/.cache/conclave
export CLUSTER_STATE ?= $(CONCLAVE_CACHE)/cluster
# Builds are kept outside the clone so a fresh clone (CI) reuses compiled
# dependencies; results the targets report still go under ./target.
export CARGO_TARGET_DIR ?= $(CONCLAVE_CACHE)/target
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Image tag; `make images TAG=...` builds another (e.g. for a helm upgrade).
TAG ?= $(VERSION)
# `make images REGISTRY=host:port/path` also pushes the images there.
REGISTRY ?=
E2E := e2e

.PHONY: help deps build check unit-test fuzz chart-test e2e-test test demo demo-down bench images \
        cluster-up cluster-down crds helm-lint

help: ## This list.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

deps: ## Install Debian packages and the Python venv (helm-python-sdk) the targets use.
	@bash -c 'source $(E2E)/lib.sh && timed packages ensure_packages && timed venv ensure_venv'

build: deps ## Build every binary (debug).
	cargo build --workspace --bins

check: ## Formatting and clippy -D warnings (CRD drift is a unit test of the operator).
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit-test: build ## Unit, property and process-level tests of every crate.
	cargo nextest run --workspace --no-fail-fast

fuzz: ## Short libFuzzer run of every fuzz target (stable toolchain; FUZZ_SECONDS=N e2e/fuzz.sh for longer runs).
	bash $(E2E)/fuzz.sh

chart-test: build ## Chart, dashboards and alert rules: real Helm engine, promtool, a real Prometheus.
	bash $(E2E)/chart-test.sh

e2e-test: deps ## End-to-end scenarios on the local cluster (brings it up and down).
	bash $(E2E)/run-e2e.sh

test: deps ## Everything CI runs: checks and builds, then unit, fuzz and chart tests beside the e2e scenarios.
	bash $(E2E)/test.sh

demo: deps ## Local cluster + Conclave + a short meeting, end to end.
	bash $(E2E)/demo.sh

demo-down: ## Remove what `make demo` left running (the local cluster, or on your own cluster the demo namespace and chart).
	bash $(E2E)/demo-down.sh

bench: build ## Run every benchmark; results in target/bench/results.json.
	bash $(E2E)/bench.sh

images: deps ## Static binaries -> minimal OCI images, imported into the local cluster (needs cluster-up).
	bash $(E2E)/images.sh "$(TAG)" "$(REGISTRY)"

cluster-up: ## Start the local single-node Kubernetes cluster (builds k8s once, cached).
	bash $(E2E)/cluster/up.sh

cluster-down: ## Stop the local cluster and remove everything it left behind.
	bash $(E2E)/cluster/down.sh

crds: ## Regenerate crds/ from the operator's types.
	cargo run -q -p operator --bin crdgen -- crds charts/conclave/files/crds

helm-lint: deps ## Lint and render the chart with the real Helm engine.
	$(CONCLAVE_CACHE)/venv/bin/python $(E2E)/helm.py lint
