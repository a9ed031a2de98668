#!/usr/bin/env python3
"""Checks of the deploy files that a schema cannot make: that the Kubernetes
manifests agree with the worker (its version, settings, health endpoints and
rules reload) and with each other, and that the compose file pins its images
and checks /readyz.

  check_manifests.py k8s BASE.yaml OVERLAY.yaml   (rendered by kubectl kustomize)
  check_manifests.py compose COMPOSE.yaml         (rendered by docker-compose config)

Prints one line per problem and exits 1 if there is any.
"""

import os
import re
import sys

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
problems = []


def check(ok, message):
    if not ok:
        problems.append(message)
    return ok


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def cargo_version():
    match = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', read("Cargo.toml"), re.M | re.S)
    return match.group(1)


def seconds(duration):
    """A duration as the settings write it: 30s, 2m, 500ms, 1h."""
    match = re.fullmatch(r"(\d+)\s*(ms|s|m|h)", str(duration).strip())
    value, unit = int(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def image_uid():
    """The numeric user the runtime image runs as (Dockerfile USER)."""
    users = re.findall(r"^USER\s+(\S+)", read("Dockerfile"), re.M)
    return users[-1].split(":")[0] if users else None


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s(base_path, overlay_path):
    base = docs(base_path)
    by_kind = {}
    for d in base:
        by_kind.setdefault(d["kind"], []).append(d)
    check(set(by_kind) == {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"},
          f"the base renders {sorted(by_kind)}; expected Deployment, Service, PodDisruptionBudget, ConfigMap "
          "(never a Secret: secret.example.yaml stays out of the kustomization)")
    [deployment] = by_kind["Deployment"]
    [service] = by_kind["Service"]
    [pdb] = by_kind["PodDisruptionBudget"]
    [rules_map] = by_kind["ConfigMap"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    value = lambda name: env.get(name, {}).get("value")

    version = cargo_version()
    check(container["image"] == f"alert-router:{version}",
          f"image is {container['image']}; Cargo.toml's version makes it alert-router:{version}")
    check(container.get("args") == ["run"], "the container's args are not [run]")
    check(deployment["spec"].get("replicas", 1) >= 2, "fewer than 2 replicas")
    check(labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels),
          "the Deployment's selector does not match its pods")

    # Graceful stop: the grace period outlives delivery.drain_timeout.
    settings = yaml.safe_load(read("config/alert-router.yaml"))
    drain = seconds(settings["delivery"]["drain_timeout"])
    if "ALERT_ROUTER__DELIVERY__DRAIN_TIMEOUT" in env:
        drain = seconds(value("ALERT_ROUTER__DELIVERY__DRAIN_TIMEOUT"))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace >= drain + 10,
          f"terminationGracePeriodSeconds {grace} is not at least 10 s longer than delivery.drain_timeout ({drain:g} s)")

    # Health: probes on the port http.listen binds, on all interfaces.
    listen = value("ALERT_ROUTER__HTTP__LISTEN") or ""
    host, _, port = listen.rpartition(":")
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check(host == "0.0.0.0", f"ALERT_ROUTER__HTTP__LISTEN is {listen!r}; the probes need 0.0.0.0:PORT")
    check(port.isdigit() and ports.get("http") == int(port),
          f"the container port http ({ports.get('http')}) is not http.listen's port ({port})")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") in ("http", ports.get("http")),
              f"{probe} is not GET {path} on the http port")
    check(value("ALERT_ROUTER__LOG__FORMAT") == "json", "logs are not JSON (ALERT_ROUTER__LOG__FORMAT)")

    # Hardening.
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    check(pod_sc.get("runAsNonRoot") is True, "runAsNonRoot is not set")
    check(str(pod_sc.get("runAsUser")) == image_uid(),
          f"runAsUser {pod_sc.get('runAsUser')} is not the image's numeric USER ({image_uid()})")
    check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp is not RuntimeDefault")
    check(sc.get("readOnlyRootFilesystem") is True, "the root filesystem is not read-only")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities do not drop ALL")
    resources = container.get("resources", {})
    for kind, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        check(key in resources.get(kind, {}), f"no resources.{kind}.{key}")

    # Rules: a ConfigMap mounted as a directory (no subPath, so updates reach
    # the pod and hot reload sees them), holding the file rules.path names.
    rules_path = value("ALERT_ROUTER__RULES__PATH") or ""
    rules_dir, rules_file = os.path.split(rules_path)
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == rules_dir]
    if check(len(mounts) == 1, f"no volume is mounted at {rules_dir!r}, the directory of ALERT_ROUTER__RULES__PATH"):
        [mount] = mounts
        check("subPath" not in mount, "the rules are mounted with subPath: ConfigMap updates would never reach the pod")
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        check(volume.get("configMap", {}).get("name") == rules_map["metadata"]["name"],
              "the rules volume is not the rendered rules ConfigMap")
        check(rules_file in rules_map.get("data", {}), f"the rules ConfigMap has no key {rules_file!r}")

    # Secrets: every key the Deployment reads is in secret.example.yaml and
    # the other way round; only the broker and Redis URLs are required.
    example = yaml.safe_load(read("deploy/kubernetes/secret.example.yaml"))
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env.values()
            if "secretKeyRef" in e.get("valueFrom", {})}
    check({r["name"] for r in refs.values()} == {example["metadata"]["name"]},
          "the Deployment reads a Secret other than the one secret.example.yaml describes")
    check({r["key"] for r in refs.values()} == set(example["stringData"]),
          f"secret keys read {sorted(r['key'] for r in refs.values())} differ from "
          f"secret.example.yaml's {sorted(example['stringData'])}")
    required = {n for n, r in refs.items() if not r.get("optional", False)}
    check(required == {"ALERT_ROUTER__AMQP__URL", "ALERT_ROUTER__REDIS__URL"},
          f"required secret values are {sorted(required)}; expected the AMQP and Redis URLs only")
    for name in ("ALERT_ROUTER__AMQP__URL", "ALERT_ROUTER__REDIS__URL", "SLACK_BOT_TOKEN",
                 "SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET", "SLACK_SIGNING_SECRET"):
        check(name in refs, f"{name} does not come from the Secret")

    # Service and PodDisruptionBudget select the pods.
    check(labels_match(service["spec"].get("selector"), pod_labels), "the Service does not select the pods")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    check(service_ports.get("http", {}).get("targetPort") in ("http", ports.get("http")),
          "the Service has no port http to the container's http port")
    check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels),
          "the PodDisruptionBudget does not select the pods")
    check(pdb["spec"].get("minAvailable") == 1, "the PodDisruptionBudget's minAvailable is not 1")

    # The overlay: the base unchanged plus a ServiceMonitor on the Service.
    overlay = docs(overlay_path)
    monitors = [d for d in overlay if d["kind"] == "ServiceMonitor"]
    check([d for d in overlay if d["kind"] != "ServiceMonitor"] == base,
          "the servicemonitor overlay changes the base")
    if check(len(monitors) == 1, "the servicemonitor overlay renders no single ServiceMonitor"):
        [monitor] = monitors
        check(monitor["apiVersion"] == "monitoring.coreos.com/v1", "the ServiceMonitor is not monitoring.coreos.com/v1")
        check(set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"},
              f"unexpected ServiceMonitor spec fields {sorted(monitor['spec'])}")
        check(labels_match(monitor["spec"]["selector"].get("matchLabels"), service["metadata"].get("labels", {})),
              "the ServiceMonitor does not select the Service")
        for endpoint in monitor["spec"]["endpoints"]:
            check(set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"},
                  f"unexpected ServiceMonitor endpoint fields {sorted(endpoint)}")
            check(endpoint.get("port") in service_ports, f"ServiceMonitor port {endpoint.get('port')} is not a Service port")
            check(endpoint.get("path") == "/metrics", "the ServiceMonitor does not scrape /metrics")
            if "interval" in endpoint and "scrapeTimeout" in endpoint:
                check(seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"]),
                      "the ServiceMonitor's scrapeTimeout is longer than its interval")


def check_compose(path):
    [compose] = docs(path)
    services = compose["services"]
    for name, service in services.items():
        if "image" in service:
            image = service["image"]
            tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
            check(re.search(r"\d+\.\d+\.\d+", tag) is not None,
                  f"{name}: image {image} is not pinned to an exact version")
    worker = services["alert-router"]
    test = " ".join(worker.get("healthcheck", {}).get("test", []))
    listen = worker.get("environment", {}).get("ALERT_ROUTER__HTTP__LISTEN", "")
    check(f"http://127.0.0.1:{listen.rpartition(':')[2]}/readyz" in test,
          f"the worker's healthcheck ({test!r}) does not GET /readyz on http.listen ({listen})")
    tool = test.split()[1] if test.startswith("CMD ") else ""
    runtime = read("Dockerfile").rsplit("FROM ", 1)[1]
    check(tool and re.search(rf"apt-get install[^\n]*\b{re.escape(tool)}\b", runtime),
          f"the healthcheck runs {tool!r}, which the runtime image does not install")

    # The monitoring profile: Prometheus with the alert rules, Grafana with the dashboard.
    prometheus, grafana = services.get("prometheus", {}), services.get("grafana", {})
    for name, service in (("prometheus", prometheus), ("grafana", grafana)):
        check(service.get("profiles") == ["monitoring"], f"{name} is not in the monitoring profile only")
    prom_config = yaml.safe_load(read("deploy/compose/prometheus.yml"))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus.get("volumes", [])}
    [rule_glob] = prom_config["rule_files"]
    rules_dir = os.path.dirname(rule_glob)
    check(mounts.get(rules_dir, "").endswith("/deploy/prometheus"),
          f"Prometheus loads {rule_glob}, but deploy/prometheus is not mounted at {rules_dir}")
    targets = [t for job in prom_config["scrape_configs"] for c in job.get("static_configs", []) for t in c["targets"]]
    check(f"alert-router:{listen.rpartition(':')[2]}" in targets, "Prometheus does not scrape the worker's http.listen")

    gmounts = {v.split(":")[1]: v.split(":")[0] for v in grafana.get("volumes", [])}
    genv = grafana.get("environment", {})
    provisioning = genv.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    grafana_root = next((c for c, h in gmounts.items() if h.endswith("/deploy/grafana")), None)
    if check(grafana_root is not None, "deploy/grafana is not mounted into Grafana"):
        check(provisioning == f"{grafana_root}/provisioning", "Grafana's provisioning path is not deploy/grafana/provisioning")
        providers = yaml.safe_load(read("deploy/grafana/provisioning/dashboards/alert-router.yml"))["providers"]
        check(any(p["options"]["path"] == grafana_root for p in providers),
              "no dashboard provider loads deploy/grafana (where alert-router.json is)")
    sources = yaml.safe_load(read("deploy/grafana/provisioning/datasources/prometheus.yml"))["datasources"]
    check(any(s.get("url") == "http://prometheus:9090" for s in sources), "Grafana's data source is not the prometheus service")


def main():
    kind, *paths = sys.argv[1:]
    {"k8s": check_k8s, "compose": check_compose}[kind](*paths)
    for problem in problems:
        print(f"check_manifests: {problem}")
    if problems:
        sys.exit(1)
    print(f"check_manifests: {kind}: ok")


if __name__ == "__main__":
    main()
