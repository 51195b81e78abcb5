"""An operator's checks of the shipped deploy files against what kvc does (the operator audit):
the degraded-tier alert through the tiers' back-off gaps, the dashboard's disk-tier panel on
processes without a disk tier, and the image / manifests giving kvc a C compiler and writable
caches under a read-only root filesystem."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .promql import ALERTS, DEPLOY, panel_expr

K8S = DEPLOY / "k8s"
DISK_PANEL = "Disk tier file and filesystem"


def promtool_test(promtool: str, tmp_path: Path, tests: list[dict], rules: bool = True) -> subprocess.CompletedProcess:
    f = tmp_path / "audit_test.yml"
    doc = {"evaluation_interval": "10s", "tests": tests}
    if rules:
        doc["rule_files"] = [str(ALERTS)]
    f.write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run([promtool, "test", "rules", str(f)], capture_output=True, text=True, timeout=60)


DEGRADED = 'kvc_degraded{job="kvc-cache-server",instance="c:9400",component="cluster"}'
FIRING = [{"exp_labels": {"severity": "critical", "job": "kvc-cache-server", "instance": "c:9400",
                          "component": "cluster"},
           "exp_annotations": {"summary": "cluster tier of c:9400 is bypassed",
                               "description": "The tier failed and requests skip it; the cache still serves "
                                              "from the other tiers."}}]


def test_tier_degraded_fires_through_the_backoff_gaps(promtool, tmp_path):
    """A cluster that stays down: the gauge is 1 during each back-off (at most 5 s) and 0 from its
    end until the next call fails, so a 10 s scrape reads 0 now and then (one in six below, as a
    request every few seconds gives; test_cluster_gauge_reads_zero_between_backoffs shows the
    gaps). The alert must still fire, and clear once the tier is back."""
    minute = "1 1 1 1 1 0 "
    values = (minute * 15).strip() + " 0x60"  # 15 minutes down, then 10 minutes healthy
    r = promtool_test(promtool, tmp_path, [{
        "interval": "10s",
        "input_series": [{"series": DEGRADED, "values": values}],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "KvcTierDegraded", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "KvcTierDegraded", "exp_alerts": FIRING},
            {"eval_time": "14m", "alertname": "KvcTierDegraded", "exp_alerts": FIRING},
            {"eval_time": "20m", "alertname": "KvcTierDegraded", "exp_alerts": []},
        ]}])
    assert r.returncode == 0, r.stdout + r.stderr


def test_tier_degraded_stays_quiet_for_one_short_bypass(promtool, tmp_path):
    """One failed disk commit bypasses the tier for 30 s: not an alert."""
    r = promtool_test(promtool, tmp_path, [{
        "interval": "10s",
        "input_series": [{"series": DEGRADED.replace("cluster", "disk"), "values": "0x30 1x3 0x120"}],
        "alert_rule_test": [
            {"eval_time": f"{m}m", "alertname": "KvcTierDegraded", "exp_alerts": []} for m in (6, 8, 10, 15)
        ]}])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_cluster_gauge_reads_zero_between_backoffs(tmp_path):
    """What the alert sees: a cluster tier whose Redis never answers (nothing listens on its port),
    asked every 2 s, shows kvc_degraded{component="cluster"} at 0 between its back-offs."""
    import socket

    from kvc.config import load_config
    from kvc.hashing import Namespace, PageSpec
    from kvc.metrics import KvcMetrics
    from kvc.store import TieredStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, cpu_memory_size_GB=0.0625, disk_path=None, cluster_url=f"redis://127.0.0.1:{port}")
    m = KvcMetrics()
    store = TieredStore(cfg.kvc, metrics=m)
    ns = Namespace("a", PageSpec(num_layers=2, num_kv_heads=2, head_dim=8, page_size=16, dtype="float32"))
    seen = []
    try:
        t0 = next_call = time.monotonic()
        while time.monotonic() - t0 < 24:
            if time.monotonic() >= next_call:
                store.lookup(ns, tokens=list(range(64)))
                next_call += 2.0
            if time.monotonic() - t0 > 8:  # the back-off has reached its 5 s ceiling
                seen.append(m.registry.get_sample_value("kvc_degraded", {"component": "cluster"}))
            time.sleep(0.25)
    finally:
        store.close()
    errors = sum(s.value for s in m.cluster_errors.collect()[0].samples if s.name.endswith("_total"))
    assert errors >= 5, errors  # it kept failing the whole time
    assert 1.0 in seen and 0.0 in seen, seen


def test_kvc_serve_without_a_disk_tier_exports_the_disk_gauges_at_zero():
    """Why the dashboard's disk panel filters: KvcMetrics (every kvc serve) exports these at 0."""
    from kvc.metrics import KvcMetrics

    m = KvcMetrics()
    for name in ("kvc_lmdb_used_bytes", "kvc_lmdb_map_size_bytes", "kvc_disk_filesystem_free_bytes"):
        assert m.registry.get_sample_value(name) == 0.0, name


def test_disk_panel_shows_only_processes_with_a_disk_tier(promtool, tmp_path):
    """A kvc serve with --cache-url (or without a disk tier) must not show up as a disk with 0
    bytes free; a cache-server's disk tier shows its file, map and free space."""
    serve = '{job="kvc-serve",instance="s:30000"}'
    cache = '{job="kvc-cache-server",instance="c:9400"}'
    series = [("kvc_lmdb_used_bytes", 0, 2e8), ("kvc_lmdb_map_size_bytes", 0, 1.1e9),
              ("kvc_disk_filesystem_free_bytes", 0, 5e9)]
    inputs = []
    for name, at_serve, at_cache in series:
        inputs.append({"series": name + serve, "values": f"{at_serve:g}x10"})
        inputs.append({"series": name + cache, "values": f"{at_cache:g}x10"})
    legends = {"file {{instance}}": 2e8, "map {{instance}}": 1.1e9, "free {{instance}}": 5e9}
    exprs = [{"expr": panel_expr(DISK_PANEL, legend), "eval_time": "5m",
              "exp_samples": [{"labels": '{instance="c:9400"}', "value": value}]}
             for legend, value in legends.items()]
    r = promtool_test(promtool, tmp_path, [{"interval": "1m", "input_series": inputs, "promql_expr_test": exprs}],
                      rules=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the image and the manifests ---------------------------------------------------------------

def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_installs_a_c_compiler():
    """kvc builds its native code with the system compiler at first use (kvc/native.py: `cc`), and
    Triton builds its launchers with one; python:*-slim has none, so the image must install it
    (before it drops root)."""
    text = dockerfile()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    if "slim" not in base and "alpine" not in base:
        pytest.skip(f"base image {base} is not a slim one (python:3.x ships gcc)")
    user_at = text.index("\nUSER ")
    installs = [m for m in re.finditer(r"^RUN .*?(?<!\\)$", text, re.M | re.S)
                if "apt-get install" in m.group(0) and m.start() < user_at]
    assert any(re.search(r"\b(gcc|build-essential|clang)\b", m.group(0)) for m in installs), \
        "the Dockerfile installs no C compiler: kvc's native paths and Triton fall back or fail"


def _home() -> str:
    m = re.search(r"\bHOME=(\S+)", dockerfile())
    assert m, "the Dockerfile sets no HOME"
    return m.group(1)


def _pod(kind: str, name: str) -> dict:
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc["spec"]["template"]["spec"]
    raise AssertionError(f"no {kind} {name}")


def _writable(pod: dict, container: dict, path: str) -> bool:
    """Whether `path` lies on a writable volume of the container (emptyDir or a claim)."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}  # a name not here: a volumeClaimTemplate
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and not m.get("readOnly") and "subPath" not in m:
            v = vols.get(m["name"], {})
            if "emptyDir" in v or "persistentVolumeClaim" in v or not v:
                return True
    return False


def _native_dir(env: dict) -> str:
    from kvc import native
    old = dict(os.environ)
    try:
        for k in ("KVC_NATIVE_DIR", "XDG_CACHE_HOME"):
            os.environ.pop(k, None)
        os.environ.update(env)
        return str(native.cache_dir())
    finally:
        os.environ.clear()
        os.environ.update(old)


def _triton_cache(env: dict) -> str:
    if env.get("TRITON_CACHE_DIR"):
        return env["TRITON_CACHE_DIR"]
    return os.path.join(env.get("TRITON_HOME") or env["HOME"], ".triton", "cache")


@pytest.mark.parametrize("kind,name,needs", [
    ("StatefulSet", "kvc-cache", ("native",)),
    ("Deployment", "kvc-serve", ("native", "triton", "models")),
])
def test_k8s_read_only_root_leaves_kvc_its_writable_caches(kind, name, needs):
    """The containers run with readOnlyRootFilesystem: every directory kvc writes at run time
    (its native libraries, the builtin model, Triton's kernel cache on GPUs) must be a volume."""
    pod = _pod(kind, name)
    (c,) = pod["containers"]
    if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        pytest.skip("root filesystem writable")
    env = {"HOME": _home()}
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    paths = {"native": _native_dir(env), "triton": _triton_cache(env),
             "models": os.path.join(env["HOME"], ".cache", "kvc", "models")}
    for what in needs:
        assert _writable(pod, c, paths[what]), f"{name}: {what} dir {paths[what]} is on the read-only root filesystem"


def test_cache_server_refuses_a_tenant_secret_its_group_can_read(tmp_path):
    """The kvc side of the next test: a tenant secret with group bits (what a kubelet's fsGroup
    change makes of a 0600 file) stops the cache-server's start."""
    from kvc.config import ConfigError, load_config
    from server.tenant_secret import load_tenant_secret

    cfg = load_config(None, disk_path=str(tmp_path), auth_tokens={"t": "tenant"})
    load_tenant_secret(cfg, environ={})  # created, 0600
    (tmp_path / "tenant-secret").chmod(0o660)
    with pytest.raises(ConfigError, match="readable by others"):
        load_tenant_secret(cfg, environ={})


def test_k8s_cache_volume_keeps_the_tenant_secret_private():
    """With fsGroup and the default fsGroupChangePolicy (Always) the kubelet ORs rw-rw---- into the
    permissions of every file on the volume at each mount (Kubernetes' "Configure a Security
    Context"), so <disk_path>/tenant-secret, created 0600, is 0660 at the pod's next start and the
    cache-server (with server.auth_tokens) refuses to start. OnRootMismatch changes nothing once
    the volume's root is right."""
    pod = _pod("StatefulSet", "kvc-cache")
    sc = pod.get("securityContext", {})
    if "fsGroup" in sc:
        assert sc.get("fsGroupChangePolicy") == "OnRootMismatch", sc


ERRORS_PANEL = "Checksum failures, disk and cluster errors"
STATE_PANEL = "Degraded tiers, quarantines, forced unpins"


def test_first_event_counters_are_born_at_their_first_event():
    """Why the next test matters: these labelled counters have no series until their first event
    (a quarantine happens while the store opens, so its series is born at 1)."""
    from kvc.metrics import KvcMetrics

    m = KvcMetrics()
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    for name in ("kvc_quarantines_total", "kvc_disk_errors_total"):
        assert name not in names, name


@pytest.mark.parametrize("panel,legend,series,labels", [
    (STATE_PANEL, "quarantines {{reason}}", 'kvc_quarantines_total{job="kvc-cache-server",instance="c:9400",'
     'reason="startup_check"}', '{reason="startup_check"}'),
    (ERRORS_PANEL, "disk errors {{op}} {{kind}}", 'kvc_disk_errors_total{job="kvc-cache-server",instance="c:9400",'
     'op="commit",kind="enospc"}', '{op="commit",kind="enospc"}'),
    (ERRORS_PANEL, "cluster errors {{op}} {{kind}}", 'kvc_cluster_errors_total{job="kvc-cache-server",'
     'instance="c:9400",op="connect",kind="auth"}', '{op="connect",kind="auth"}'),
])
def test_dashboard_shows_a_counters_first_event(promtool, tmp_path, panel, legend, series, labels):
    """A quarantine at start, a first disk error, a first cluster auth failure: each is a series
    born at 1, which increase() reads as 0. The dashboard must show it (the alerts do)."""
    expr = panel_expr(panel, legend)
    r = promtool_test(promtool, tmp_path, [{
        "interval": "1m",
        "input_series": [{"series": series, "values": "_x5 1x30"}],
        "promql_expr_test": [{"expr": expr, "eval_time": "8m", "exp_samples": [{"labels": labels, "value": 1}]}],
    }], rules=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_cluster_init_waits_for_redis_to_answer():
    # depends_on a list waits for the nodes' containers to start, not for Redis to answer: a slow
    # node failed the init, and the cache-server waits for the init's success
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    deps = services["redis-cluster-init"]["depends_on"]
    assert isinstance(deps, dict) and len(deps) == 6
    for name, cond in deps.items():
        assert cond == {"condition": "service_healthy"}, name
        assert "redis-cli" in services[name]["healthcheck"]["test"], name
