"""Small helpers for the deploy tests: PromQL metric names, exposition names, dashboard queries."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "kvc-dashboard.json"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Words in PromQL that are not metric names when they stand outside label matchers.
_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
    "unless", "inf", "nan", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk",
    "bottomk", "quantile", "count_values", "group",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)                      # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                     # range and subquery selectors
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)         # offset 1d
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", s)
    s = re.sub(r"(?<![A-Za-z_:])[0-9][0-9.eE+-]*", " ", s)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0).lower() not in _NOT_METRICS:
            names.add(m.group(0))
    return names


def selectors(expr: str) -> set[str]:
    """The instant-vector selectors of an expression, matchers kept: {'kvc_x_total{tier="cpu"}', ...}."""
    out = set()
    for name in metric_names(expr):
        for m in re.finditer(r"(?<![A-Za-z0-9_:])" + re.escape(name) + r"\s*(\{[^}]*\})?", expr):
            out.add(name + (m.group(1) or ""))
    return out


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics page can carry: sampled names, and each `# TYPE` family with
    its histogram/summary suffixes (labelled families show only their TYPE until first use)."""
    names = set()
    for line in exposition.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, kind = m.groups()
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "summary":
                names |= {name, name + "_sum", name + "_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[^{\s]+", line).group(0))
    return names


def sampled_names(exposition: str) -> set[str]:
    """Names that have at least one sample on the page."""
    return {re.match(r"[^{\s]+", ln).group(0) for ln in exposition.splitlines() if ln and not ln.startswith("#")}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(dash: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every query in the dashboard, rows included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))
    walk((dash or dashboard())["panels"])
    return out


def panel_expr(title: str, legend: str | None = None) -> str:
    """The expr of one dashboard query, by panel title (and legend when the panel has several)."""
    def walk(panels):
        for p in panels:
            if p.get("title") == title:
                return p
            found = walk(p.get("panels", []))
            if found:
                return found
    p = walk(dashboard()["panels"])
    assert p is not None, f"dashboard has no panel {title!r}"
    ts = [t for t in p["targets"] if legend is None or t.get("legendFormat") == legend]
    assert len(ts) == 1, f"panel {title!r}: {len(ts)} queries match legend {legend!r}"
    return ts[0]["expr"]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
