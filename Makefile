# Entry points. `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
VENV ?= $(HOME)/.cache/iotp/venv
# The Mosquitto dev/brokers.sh installs (tests start their own instances of it).
export IOTP_MOSQUITTO ?= $(HOME)/.cache/iotp/mosquitto-2.0.21/usr/sbin/mosquitto

.PHONY: setup up down status build test lint demo clean-run bench load-test

setup:            ## build tools and the fastavro venv
	dev/setup.sh

up: setup         ## start Mosquitto (:1884), RabbitMQ (:5672), Tansu (:9092); declare topology
	dev/brokers.sh up

down:             ## stop the brokers this project started
	dev/brokers.sh down

status:
	dev/brokers.sh status

build:
	$(CARGO) build --locked --workspace --bins

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings   # vendor/rumqttc and vendor/rdkafka allow clippy in their lib.rs: upstream code
	$(CARGO) deny check bans licenses sources   # deny.toml; advisories need github.com, unreachable here
	$(VENV)/bin/python dev/check_manifests.py   # docker-compose.yml and k8s/ against topology.toml and the upstream schemas
	dev/k8s_lint.sh   # the rendered k8s overlays: checkov, kubernetes-validate --strict
	$(VENV)/bin/python dev/check_monitoring.py   # alert rules (promtool check + unit tests), dashboard queries, docs/metrics.md against metrics.rs

test: up lint     ## everything CI runs
	$(CARGO) test --locked --workspace
	@if [ -n "$$MONGODB_URI" ]; then \
	  $(CARGO) test --locked -p iotp-store --test store_contract -- --ignored; \
	else \
	  echo "SKIPPED MongoDB store contract: MONGODB_URI is not set (no MongoDB server here); the embedded backend ran it"; \
	fi

demo: up build    ## run the pipeline end to end with a burst of simulated devices
	dev/demo.sh

SCENARIO ?= standard
REPEAT ?= 1
load-test: up     ## a load-tests/scenarios/$(SCENARIO).toml run (REPEAT=n: n runs and their spread) through the whole pipeline (release build), audited; report in load-tests/reports/
	$(CARGO) build --locked --release --workspace --bins
	$${CARGO_TARGET_DIR:-target}/release/iotp-load --scenario load-tests/scenarios/$(SCENARIO).toml --bin-dir $${CARGO_TARGET_DIR:-target}/release --repeat $(REPEAT)

bench:            ## criterion benchmarks of the hot paths, per-message times (no brokers needed; docs/benchmarks.md)
	$(CARGO) bench --locked --workspace --bench '*'
