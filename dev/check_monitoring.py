#!/usr/bin/env python3
"""Checks the monitoring files (k8s/monitoring/) against Prometheus and the metric catalogue.

- the alert rules: `promtool check rules`, `promtool test rules` (every alert has a test that
  fires it), and every metric and label they name exists;
- the Prometheus configuration of docker-compose.yml: `promtool check config`, and every iotp
  service of docker-compose.yml is scraped once, labelled service=<name>;
- the Grafana dashboards: every panel's and variable's PromQL parses (written as recording
  rules into a temporary file for `promtool check rules`), names only metrics of the catalogue
  (services/iotp-core/src/metrics.rs), recording rules of the rule file or standard series,
  and labels they carry, and uses only variables the dashboard defines;
- docs/metrics.md lists exactly the catalogue's metrics, with their types and labels;
- k8s/monitoring/prometheus-rule.yaml carries exactly the rule file's groups
  (`--write` regenerates it).

    ~/.cache/iotp/venv/bin/python dev/check_monitoring.py [--write]

Prints one line per check, then `N passed, M failed`; exits 1 if any check failed. Needs
promtool (dev/setup.sh installs it) and PyYAML.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "rules" / "iotp.rules.yml"
RULE_TESTS = MONITORING / "tests" / "iotp.rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
PROMETHEUS_RULE = MONITORING / "prometheus-rule.yaml"
DASHBOARDS = MONITORING / "dashboards"
METRICS_RS = ROOT / "services" / "iotp-core" / "src" / "metrics.rs"
METRICS_DOC = ROOT / "docs" / "metrics.md"
COMPOSE = ROOT / "docker-compose.yml"

# Series Prometheus makes itself: a target's health, the alerts.
STANDARD_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                   "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                   "scrape_series_added"}
# Labels every scraped series has (job, instance; service: prometheus.yml and the PodMonitor),
# histogram buckets, the alerts' own.
STANDARD_LABELS = {"__name__", "job", "instance", "service", "le", "alertname", "alertstate",
                   "severity"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "inf", "nan", "atan2"}
# The Rust service binaries (k8s/iotp-manifests checks.rs SERVICES): compose services running
# one of them must be scraped.
SERVICE_BINARIES = {"iotp-mqtt-bridge", "iotp-parser", "iotp-enricher", "iotp-upserter",
                    "iotp-aggregator", "iotp-dlq-handler"}
METRIC_TYPES = {"IntCounter": "counter", "Counter": "counter", "IntCounterVec": "counter",
                "CounterVec": "counter", "IntGauge": "gauge", "Gauge": "gauge",
                "IntGaugeVec": "gauge", "GaugeVec": "gauge", "Histogram": "histogram",
                "HistogramVec": "histogram"}


class Checks:
    """Runs checks, prints one line each, counts."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def run(self, name: str, check: Callable[[], list[str]]) -> None:
        try:
            problems = check()
        except (OSError, KeyError, TypeError, ValueError, AttributeError, IndexError,
                yaml.YAMLError) as e:
            problems = [f"malformed input ({type(e).__name__}: {e})"]
        if problems:
            self.failed += 1
            print(f"FAIL {name}:\n  " + "\n  ".join(problems))
        else:
            self.passed += 1
            print(f"PASS {name}")


def promtool(*args: str) -> list[str]:
    """Runs promtool; its output as the problems if it failed."""
    try:
        run = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return ["promtool not found (dev/setup.sh installs the Debian package prometheus)"]
    if run.returncode == 0:
        return []
    out = (run.stdout + run.stderr).strip().splitlines()
    return [f"promtool {' '.join(args)} exited {run.returncode}:"] + out[-40:]


# ---------------------------------------------------------------------------------------------
# The catalogue


def catalogue() -> dict[str, dict[str, Any]]:
    """Every metric `Metrics::new` builds: name -> type, labels, help."""
    text = METRICS_RS.read_text()
    body = text[text.index("fn new()"):text.index("fn render(")]
    inits = list(re.finditer(r"^\s{12}(\w+): (\w+)::(?:new|with_opts)\(", body, re.M))
    metrics: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(inits):
        end = inits[i + 1].start() if i + 1 < len(inits) else body.index("registry,", m.end())
        chunk = body[m.start():end]
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', chunk)
        labels = re.search(r"&\[([^\]]*)\]", chunk)
        if m[2] not in METRIC_TYPES or len(strings) < 2:
            raise ValueError(f"metrics.rs: cannot read the definition of field {m[1]}")
        name = strings[0]
        if name in metrics:
            raise ValueError(f"metrics.rs: {name} is defined twice")
        metrics[name] = {"type": METRIC_TYPES[m[2]], "help": strings[1],
                         "labels": re.findall(r'"(\w+)"', labels[1]) if labels else []}
    registered = len(re.findall(r"\.register\(", body))
    if registered != len(metrics):
        raise ValueError(f"metrics.rs registers {registered} metrics but {len(metrics)} "
                         "definitions were read: the parser needs updating")
    return metrics


def series_names(metrics: dict[str, dict[str, Any]]) -> set[str]:
    out = set()
    for name, m in metrics.items():
        out.add(name)
        if m["type"] == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return out


# ---------------------------------------------------------------------------------------------
# PromQL: the names and labels an expression uses (promtool checks the syntax)


def promql_refs(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names in `expr`."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", s):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    s = re.sub(r"\{[^}]*\}", " ", s)
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for body in re.findall(grouping, s):
        labels |= set(re.findall(r"[A-Za-z_]\w*", body))
    s = re.sub(grouping, " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    names = {m[1] for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", s)
             if m[1].lower() not in PROMQL_KEYWORDS}
    return names, labels


def reference_problems(where: str, expr: str, known_series: set[str],
                       known_labels: set[str]) -> list[str]:
    names, labels = promql_refs(expr)
    problems = [f"{where}: {n} is not in metrics.rs, the rule file's recordings or the "
                f"standard series" for n in sorted(names - known_series)]
    problems += [f"{where}: label {lb} is on no metric of the catalogue nor a target label"
                 for lb in sorted(labels - known_labels)]
    if not names and "vector(" not in expr:
        problems.append(f"{where}: names no metric")
    return problems


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def known(metrics: dict[str, dict[str, Any]]) -> tuple[set[str], set[str]]:
    recorded = {r["record"] for r in rules() if "record" in r}
    labels = STANDARD_LABELS | {lb for m in metrics.values() for lb in m["labels"]}
    return series_names(metrics) | STANDARD_SERIES | recorded, labels


# ---------------------------------------------------------------------------------------------
# Checks


def check_rules(checks: Checks, metrics: dict[str, dict[str, Any]]) -> None:
    checks.run(f"promtool check rules {RULES.relative_to(ROOT)}",
               lambda: promtool("check", "rules", str(RULES)))
    checks.run(f"promtool test rules {RULE_TESTS.relative_to(ROOT)}",
               lambda: promtool("test", "rules", str(RULE_TESTS)))

    def tested() -> list[str]:
        tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
        fired = {t["alertname"] for test in tests for t in test.get("alert_rule_test", [])
                 if t.get("exp_alerts")}
        quiet = {t["alertname"] for test in tests for t in test.get("alert_rule_test", [])
                 if not t.get("exp_alerts")}
        alerts = [r["alert"] for r in rules() if "alert" in r]
        return ([f"alert {a} has no test that fires it" for a in alerts if a not in fired]
                + [f"alert {a} has no test where it stays quiet" for a in alerts if a not in quiet])

    checks.run("every alert has a unit test that fires it and one that does not", tested)

    def references() -> list[str]:
        series, labels = known(metrics)
        return [p for r in rules()
                for p in reference_problems(r.get("alert") or r.get("record"), r["expr"],
                                            series, labels)]

    checks.run("alert and recording rules name only catalogue metrics and their labels", references)


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    out = []

    def panels(items: list[dict[str, Any]]) -> None:
        for p in items:
            panels(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}",
                            t.get("expr", "")))
    panels(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query")
            out.append((f"variable {v['name']}", query or ""))
    return out


def grafana_to_promql(expr: str, variables: set[str]) -> tuple[str, list[str]]:
    """Grafana's macros and variables replaced by values Prometheus parses; the unknown ones."""
    unknown = [v for v in re.findall(r"\$\{?(\w+)", expr)
               if not v.startswith("__") and v not in variables]
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", "x", expr)
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.S)
    if match:
        expr = f"count by ({match[2]}) ({match[1]})"
    return expr, unknown


def check_dashboards(checks: Checks, metrics: dict[str, dict[str, Any]]) -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    checks.run("k8s/monitoring/dashboards holds dashboards",
               lambda: [] if files else ["no *.json"])
    for path in files:
        name = path.relative_to(ROOT)

        def load() -> tuple[dict[str, Any], list[tuple[str, str, list[str]]]]:
            dashboard = json.loads(path.read_text())
            variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
            return dashboard, [(where, *grafana_to_promql(expr, variables))
                               for where, expr in dashboard_queries(dashboard)]

        def parses() -> list[str]:
            _, queries = load()
            problems = [f"{where}: empty expression" for where, expr, _ in queries
                        if not expr.strip()]
            problems += [f"{where}: variable ${v} is not defined" for where, _, unknown in queries
                         for v in unknown]
            group = {"groups": [{"name": "dashboard", "rules": [
                {"record": f"dashboard:query_{i}", "expr": expr}
                for i, (_, expr, _) in enumerate(queries)]}]}
            with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
                yaml.safe_dump(group, f)
                f.flush()
                out = promtool("check", "rules", f.name)
            # Name the panel behind each failing recording.
            for i, (where, _, _) in enumerate(queries):
                out = [line.replace(f"dashboard:query_{i}\"", f"dashboard:query_{i}\" ({where})")
                       for line in out]
            return problems + out

        def references() -> list[str]:
            _, queries = load()
            series, labels = known(metrics)
            return [p for where, expr, _ in queries
                    for p in reference_problems(where, expr, series, labels)]

        def shape() -> list[str]:
            dashboard, queries = load()
            ids: list[Any] = []

            def walk(items: list[dict[str, Any]]) -> None:
                for p in items:
                    ids.append(p.get("id"))
                    walk(p.get("panels", []))
            walk(dashboard.get("panels", []))
            problems = [] if len(ids) == len(set(ids)) else [f"panel ids repeat: {ids}"]
            if not dashboard.get("uid"):
                problems.append("no uid (provisioning would create a new dashboard each time)")
            if len(queries) < 10:
                problems.append(f"only {len(queries)} queries: the dashboard lost its panels?")
            return problems

        checks.run(f"{name}: unique panel ids, a uid, its panels", shape)
        checks.run(f"{name}: every query parses (promtool check rules) and uses defined variables",
                   parses)
        checks.run(f"{name}: queries name only catalogue metrics, recordings and their labels",
                   references)


def check_docs(checks: Checks, metrics: dict[str, dict[str, Any]]) -> None:
    def check() -> list[str]:
        rows = {}
        for line in METRICS_DOC.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            name = re.fullmatch(r"`(\w+)`", cells[0]) if len(cells) >= 4 else None
            if name:
                if name[1] in rows:
                    return [f"{name[1]} is listed twice"]
                rows[name[1]] = {"type": cells[1],
                                 "labels": re.findall(r"`(\w+)`", cells[2]),
                                 "meaning": cells[3]}
        problems = [f"{n} (metrics.rs) is not in docs/metrics.md" for n in metrics if n not in rows]
        problems += [f"{n} is in docs/metrics.md but not in metrics.rs" for n in rows
                     if n not in metrics]
        for n in set(rows) & set(metrics):
            doc, code = rows[n], metrics[n]
            if doc["type"] != code["type"]:
                problems.append(f"{n}: docs say {doc['type']}, metrics.rs defines a {code['type']}")
            if doc["labels"] != code["labels"]:
                problems.append(f"{n}: docs list labels {doc['labels']}, metrics.rs {code['labels']}")
            if len(doc["meaning"]) < 10:
                problems.append(f"{n}: no meaning given")
        return problems

    checks.run("docs/metrics.md lists every metric of metrics.rs (and no other), types and labels",
               check)


def prometheus_rule_text() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "iotp", "namespace": "iotp",
                     "labels": {"app.kubernetes.io/part-of": "iotp"}},
        "spec": {"groups": groups},
    }
    header = ("# GENERATED from rules/iotp.rules.yml by `dev/check_monitoring.py --write`: edit "
              "the rule file,\n# then regenerate. The pipeline's alert rules for "
              "prometheus-operator (see kustomization.yaml).\n")
    return header + yaml.dump(resource, Dumper=BlockDumper, sort_keys=False, width=100,
                              allow_unicode=True)


class BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, as in the rule file."""


BlockDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def check_prometheus_rule(checks: Checks) -> None:
    def check() -> list[str]:
        have = yaml.safe_load(PROMETHEUS_RULE.read_text())
        want = yaml.safe_load(prometheus_rule_text())
        if have != want:
            return [f"{PROMETHEUS_RULE.relative_to(ROOT)} differs from rules/iotp.rules.yml: "
                    "run dev/check_monitoring.py --write"]
        return []

    checks.run("k8s/monitoring/prometheus-rule.yaml carries the rule file's groups", check)


def check_compose(checks: Checks) -> None:
    checks.run(f"promtool check config {PROMETHEUS_CONFIG.relative_to(ROOT)}",
               lambda: promtool("check", "config", str(PROMETHEUS_CONFIG)))

    def scraped() -> list[str]:
        compose = yaml.safe_load(COMPOSE.read_text())
        services = {name for name, svc in compose["services"].items()
                    if any(str(a).split("/")[-1] in SERVICE_BINARIES
                           for a in (svc.get("command") or [])[:1])}
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        jobs = [j for j in config["scrape_configs"] if j["job_name"] == "iotp"]
        if len(jobs) != 1:
            return [f"{len(jobs)} scrape jobs named iotp, want 1"]
        job = jobs[0]
        problems = [] if job.get("honor_labels") else ["job iotp lacks honor_labels (iotp_up's "
                                                       "own service label would be renamed)"]
        targets: dict[str, list[str]] = {}
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                targets.setdefault(t, []).append((sc.get("labels") or {}).get("service"))
        for name in sorted(services):
            want = f"{name}:9100"
            if targets.get(want) != [name]:
                problems.append(f"compose service {name}: target {want} with service={name} "
                                f"wanted once, found {targets.get(want)}")
        problems += [f"target {t} is not an iotp service of docker-compose.yml"
                     for t in targets if t.split(":")[0] not in services]
        if len(services) != len(SERVICE_BINARIES):
            problems.append(f"found {len(services)} iotp services in docker-compose.yml: {services}")
        return problems

    def mounted() -> list[str]:
        compose = yaml.safe_load(COMPOSE.read_text())
        mounts = {str(v).split(":")[0].removeprefix("./")
                  for svc in compose["services"].values() for v in svc.get("volumes", [])}
        wanted = [PROMETHEUS_CONFIG, RULES, *sorted(DASHBOARDS.glob("*.json")),
                  *sorted((MONITORING / "grafana").glob("*.yml"))]
        return [f"docker-compose.yml does not mount {p.relative_to(ROOT)}" for p in wanted
                if str(p.relative_to(ROOT)) not in mounts]

    checks.run("compose Prometheus scrapes every iotp service once, labelled by service", scraped)
    checks.run("compose mounts the Prometheus config, the rules, Grafana's provisioning and "
               "dashboards", mounted)


def main() -> int:
    if "--write" in sys.argv[1:]:
        PROMETHEUS_RULE.write_text(prometheus_rule_text())
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
    checks = Checks()
    try:
        metrics = catalogue()
    except (OSError, ValueError) as e:
        print(f"FAIL reading the metric catalogue: {e}")
        print("0 passed, 1 failed")
        return 1
    print(f"== {len(metrics)} metrics in {METRICS_RS.relative_to(ROOT)}")
    check_rules(checks, metrics)
    check_dashboards(checks, metrics)
    check_docs(checks, metrics)
    check_prometheus_rule(checks)
    check_compose(checks)
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
