"""The shipped deploy files, checked without a Docker engine or a cluster: promtool on the
Prometheus files, the dashboard's structure, `docker-compose config`, the k8s manifests."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from kvc.config import load_config

from .promql import (ALERTS, DASHBOARD, DEPLOY, PROM_CONFIG, ROOT, dashboard, dashboard_targets,
                     metric_names)

K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# --- Prometheus ---------------------------------------------------------------------------------

def test_promtool_checks_config_and_rules(promtool):
    r = run(promtool, "check", "config", str(PROM_CONFIG))  # loads alerts.yml through rule_files
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(promtool, "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout, r.stdout


def test_alert_rules_fire_as_documented(promtool):
    r = run(promtool, "test", "rules", "tests/deploy/alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


# --- dashboard and Grafana provisioning -------------------------------------------------------

def test_metric_name_extraction():
    assert metric_names('sum by (tier) (rate(kvc_lookup_hit_tokens_total{tier="cpu"}[5m]))'
                        " / ignoring(tier) group_left sum(rate(kvc_lookup_query_tokens_total[5m]))") == {
        "kvc_lookup_hit_tokens_total", "kvc_lookup_query_tokens_total"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(kvc_x_seconds_bucket[5m])))") == {
        "kvc_x_seconds_bucket"}
    assert metric_names("a_total unless a_total offset 10m > 0 or up == 0") == {"a_total", "up"}


def test_dashboard_covers_the_required_panels():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    exprs = [e for _, e in dashboard_targets(dash)]
    used = set().union(*(metric_names(e) for e in exprs))
    for name in ("kvc_request_cached_tokens_total", "kvc_request_prompt_tokens_total",  # hit rate
                 "kvc_lookup_hit_tokens_total", "kvc_lookup_query_tokens_total",      # by tier
                 "kvc_tier_used_bytes", "kvc_tier_capacity_bytes", "kvc_evictions_total",
                 "kvc_transfer_bytes_total", "kvc_checksum_failures_total", "kvc_disk_errors_total",
                 "kvc_time_to_first_token_seconds_bucket", "kvc_time_per_output_token_seconds_bucket",
                 "kvc_time_to_first_token_seconds_count",                            # request rate
                 "kvc_experts_tokens_total", "kvc_experts_resident",
                 "kvc_cluster_errors_total", "kvc_cluster_call_duration_seconds_bucket",  # cluster tier
                 "kvc_lmdb_used_bytes", "kvc_lmdb_map_size_bytes", "kvc_disk_filesystem_free_bytes",
                 "kvc_engine_requests"):
        assert name in used, f"no panel uses {name}"
    quantiles = [e for e in exprs if "kvc_time_to_first_token_seconds_bucket" in e]
    assert {e.split(",")[0] for e in quantiles} == {f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")}
    # the overall hit rate is a ratio of counters, never a gauge
    assert ("sum(rate(kvc_request_cached_tokens_total[5m])) / sum(rate(kvc_request_prompt_tokens_total[5m]))"
            in exprs)


def test_grafana_provisioning_points_at_the_dashboard_and_data_source():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p.get("targets", [])}
    uids |= {p["datasource"]["uid"] for p in dashboard()["panels"] if "datasource" in p}
    assert uids == {source["uid"]}, uids
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "kvc.yaml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 2)[:2] if v.endswith(":ro") else v.split(":", 1)
                  for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/kvc-dashboard.json"].startswith(provider["options"]["path"] + "/")
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# --- compose -------------------------------------------------------------------------------------

def test_compose_file_validates(docker_compose):
    r = run(docker_compose, "-f", "deploy/compose.yaml", "config")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(r.stdout)
    services = cfg["services"]
    redis = {f"redis-{i}" for i in range(1, 7)}
    assert set(services) == {"cache-server", "serve", "prometheus", "grafana", "redis-cluster-init"} | redis
    cache, serve = services["cache-server"], services["serve"]
    assert cache["command"][:1] == ["cache-server"] and serve["command"][:1] == ["serve"]
    assert cache["image"] == serve["image"], "one image for both commands"
    assert cache["build"]["dockerfile"] == "deploy/Dockerfile" and Path(cache["build"]["context"]) == ROOT
    i = serve["command"].index("--cache-url")
    assert serve["command"][i + 1] == "grpc://cache-server:50051"
    assert serve["depends_on"]["cache-server"]["condition"] == "service_healthy"
    # the cluster tier: 6 cluster-enabled nodes, created by the one-shot init before the cache-server
    i = cache["command"].index("--cluster-url")
    assert cache["command"][i + 1] == "redis://redis-1:6379"
    assert cache["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    for name in redis:
        assert "--cluster-enabled yes" in services[name]["command"][-1] and "allkeys-lru" in services[name]["command"][-1]
    assert "--cluster-replicas 1" in services["redis-cluster-init"]["command"][-1]

    # every bind mount exists in the repository; the disk tier is on a named volume
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if src.startswith("/"):
                assert Path(src).exists(), f"{name}: mount source {src} missing"
    disk_path = load_config(DEPLOY / "config" / "cache.yaml").kvc.disk_path
    named = {v.split(":")[0]: v.split(":")[1] for v in cache["volumes"] if not v.startswith("/")}
    assert named.get("kvc-pages") == disk_path and "kvc-pages" in cfg["volumes"]

    # Prometheus scrapes the ports the containers' configs listen on
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    serve_cfg = load_config(DEPLOY / "config" / "serve.yaml").server
    cache_cfg = load_config(DEPLOY / "config" / "cache.yaml").server
    assert targets == {"kvc-serve": [f"serve:{serve_cfg.http_port}"],
                       "kvc-cache-server": [f"cache-server:{cache_cfg.metrics_port}"]}


def test_container_configs_are_configs_with_only_the_container_changes():
    for shipped, ours, allowed in (("default.yaml", "serve.yaml", {"server.host", "kvc.disk_path"}),
                                   ("cache.yaml", "cache.yaml", {"server.host", "kvc.disk_path"})):
        base = leaves(yaml.safe_load((ROOT / "configs" / shipped).read_text()))
        mine = leaves(yaml.safe_load((DEPLOY / "config" / ours).read_text()))
        changed = {k for k in base.keys() | mine.keys() if base.get(k) != mine.get(k)}
        assert changed == allowed, f"deploy/config/{ours} vs configs/{shipped}: {sorted(changed)}"
        cfg = load_config(DEPLOY / "config" / ours)  # unknown keys and bad values are errors
        assert cfg.server.host == "0.0.0.0"
        assert cfg.kvc.disk_path == "/var/lib/kvc/pages"


def test_dockerfile_installs_with_the_readmes_command():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "bash scripts/setup.sh" in (ROOT / "README.md").read_text()
    assert "RUN bash scripts/setup.sh\n" in text
    assert 'ENTRYPOINT ["kvc"]' in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


# --- Kubernetes -----------------------------------------------------------------------------------

def k8s_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def test_k8s_manifests_parse_with_the_expected_kinds():
    objs = k8s_objects()
    assert sorted(objs) == [("ConfigMap", "kvc-cache-config"), ("ConfigMap", "kvc-serve-config"),
                            ("Deployment", "kvc-serve"), ("NetworkPolicy", "kvc-cache"),
                            ("Service", "kvc-cache"), ("Service", "kvc-cache-headless"),
                            ("Service", "kvc-serve"), ("StatefulSet", "kvc-cache")]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def test_k8s_configmaps_are_the_container_configs():
    objs = k8s_objects()
    assert objs[("ConfigMap", "kvc-cache-config")]["data"] == {
        "cache.yaml": (DEPLOY / "config" / "cache.yaml").read_text()}
    assert objs[("ConfigMap", "kvc-serve-config")]["data"] == {
        "serve.yaml": (DEPLOY / "config" / "serve.yaml").read_text()}


def test_k8s_cache_statefulset_and_serve_deployment_fit_together():
    from server.cache_server import SERVICE_NAME

    objs = k8s_objects()
    cache_cfg = load_config(DEPLOY / "config" / "cache.yaml")
    sts = objs[("StatefulSet", "kvc-cache")]["spec"]
    assert sts["serviceName"] == "kvc-cache-headless"
    (c,) = sts["template"]["spec"]["containers"]
    assert c["args"] == ["cache-server", "--config", "/etc/kvc/cache.yaml"]
    (claim,) = sts["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == cache_cfg.kvc.disk_path
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    size_gi = float(claim["spec"]["resources"]["requests"]["storage"].removesuffix("Gi"))
    assert size_gi > cache_cfg.kvc.disk_size_GB
    assert mounts["config"]["mountPath"] == "/etc/kvc/cache.yaml"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == cache_cfg.server.grpc_port, probe
    assert c["startupProbe"]["grpc"]["service"] == c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    mem_gi = float(c["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert mem_gi > cache_cfg.kvc.cpu_memory_size_GB
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cache_cfg.server.grpc_port, "metrics": cache_cfg.server.metrics_port}

    svc = objs[("Service", "kvc-cache")]["spec"]
    dep = objs[("Deployment", "kvc-serve")]["spec"]
    (s,) = dep["template"]["spec"]["containers"]
    grpc_port = next(p["port"] for p in svc["ports"] if p["name"] == "grpc")
    i = s["args"].index("--cache-url")
    assert s["args"][i + 1] == f"grpc://kvc-cache:{grpc_port}"
    assert svc["selector"] == sts["selector"]["matchLabels"]
    serve_cfg = load_config(DEPLOY / "config" / "serve.yaml")
    assert s["ports"] == [{"name": "http", "containerPort": serve_cfg.server.http_port}]
    assert s["readinessProbe"]["httpGet"]["path"] == "/health"
    pol = objs[("NetworkPolicy", "kvc-cache")]["spec"]
    assert pol["podSelector"]["matchLabels"] == sts["selector"]["matchLabels"]
    assert pol["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == dep["selector"]["matchLabels"]
