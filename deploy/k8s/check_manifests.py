"""Checks the rendered overlays of deploy/k8s (run by validate.sh, which documents the rules).

Usage: check_manifests.py DIR OVERLAY...  (reads DIR/OVERLAY.yaml, the output of kubectl kustomize)
"""

import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
SERVICES = {"catalog", "sharing", "region"}  # `imaged <service>`


def pod_spec(obj):
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("spec") or {}


def pod_labels(obj):
    return ((obj.get("spec") or {}).get("template", {}).get("metadata") or {}).get("labels") or {}


def service_of(container):
    args = (container.get("command") or [])[1:2] + (container.get("args") or [])[:1]
    return next((a for a in args if a in SERVICES), None)


def env_of(container, configmaps):
    env = {}
    for source in container.get("envFrom") or []:
        ref = (source.get("configMapRef") or {}).get("name")
        if ref is not None:
            env.update(configmaps.get(ref, {}))
    for var in container.get("env") or []:
        env[var["name"]] = var.get("value")
    return env


def check_overlay(name, objects):
    errors = []

    def err(obj, msg):
        errors.append(f"overlay {name}: {obj['kind']}/{obj['metadata']['name']}: {msg}")

    configmaps = {
        o["metadata"]["name"]: o.get("data") or {} for o in objects if o["kind"] == "ConfigMap"
    }
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    by_service = {}  # service -> [(workload, container, env)]
    redis = []
    cluster_regions = set()

    for obj in workloads:
        spec = pod_spec(obj)
        pod_security = spec.get("securityContext") or {}
        init = [("init container", c) for c in spec.get("initContainers") or []]
        main = [("container", c) for c in spec.get("containers") or []]
        for what, c in init + main:
            cname = f"{what} {c['name']}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for key in ("cpu", "memory"):
                    if key not in (res.get(part) or {}):
                        err(obj, f"{cname} has no {part}.{key}")
            sec = c.get("securityContext") or {}
            if not (sec.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
                err(obj, f"{cname} may run as root (runAsNonRoot is not set)")
            if sec.get("allowPrivilegeEscalation") is not False:
                err(obj, f"{cname} does not set allowPrivilegeEscalation: false")
            if "ALL" not in ((sec.get("capabilities") or {}).get("drop") or []):
                err(obj, f"{cname} does not drop ALL capabilities")
            if sec.get("readOnlyRootFilesystem") is not True:
                err(obj, f"{cname} has a writable root filesystem")
            if what != "container" or obj["kind"] not in LONG_RUNNING:
                continue
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    err(obj, f"{cname} has no {probe}")
            service = service_of(c)
            if service is None:
                if "redis" in (c.get("image") or ""):
                    redis.append((obj, c))
                continue
            env = env_of(c, configmaps)
            by_service.setdefault(service, []).append((obj, c, env))
            cluster_regions.update(
                r for r in (env.get("IMAGEFLEET_CLUSTER_REGIONS") or "").split(",") if r
            )
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            grpc_port = ports.get("grpc")
            if grpc_port is None:
                err(obj, f"{cname} has no container port named grpc")
            probes = ["readinessProbe", "livenessProbe"]
            if service == "region":
                probes.append("startupProbe")
            for probe in probes:
                p = c.get(probe)
                if p is None:
                    if probe == "startupProbe":
                        err(obj, f"{cname} has no startupProbe")
                    continue
                command = (p.get("exec") or {}).get("command") or []
                if "grpc" in p:
                    if p["grpc"].get("port") != grpc_port:
                        err(obj, f"{cname}: {probe} asks port {p['grpc'].get('port')}, not the gRPC port {grpc_port}")
                elif command[:2] == ["imaged", "health"]:
                    url = command[command.index("--url") + 1] if "--url" in command else ""
                    if not url.endswith(f":{grpc_port}"):
                        err(obj, f"{cname}: {probe} asks {url or 'no --url'}, not the gRPC port {grpc_port}")
                else:
                    err(obj, f"{cname}: {probe} is neither a grpc probe nor `imaged health`")
            if ports.get("metrics") != 9100 or not env.get("IMAGEFLEET_METRICS_LISTEN", "").endswith(":9100"):
                err(obj, f"{cname} does not serve metrics on a port named metrics (9100)")
            annotations = (obj["spec"]["template"].get("metadata") or {}).get("annotations") or {}
            if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != "9100":
                err(obj, "the pod is not annotated for scraping (prometheus.io/scrape, prometheus.io/port)")
            for var in ("IMAGEFLEET_LISTEN", "IMAGEFLEET_TLS_CERT", "IMAGEFLEET_TLS_KEY", "IMAGEFLEET_TLS_CA"):
                if not env.get(var):
                    err(obj, f"{cname} does not set {var}")
            if not (env.get("IMAGEFLEET_SERVICE_KEY_FILE") or env.get("IMAGEFLEET_SERVICE_KEY")):
                err(obj, f"{cname} has no service key")
            if service in ("catalog", "region"):
                data_dir = env.get("IMAGEFLEET_DATA_DIR") or ""
                claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates") or []}
                claims |= {
                    v["name"] for v in spec.get("volumes") or [] if "persistentVolumeClaim" in v
                }
                mounts = [
                    m["mountPath"].rstrip("/")
                    for m in c.get("volumeMounts") or []
                    if m["name"] in claims
                ]
                if not any(data_dir == m or data_dir.startswith(m + "/") for m in mounts):
                    err(obj, f"{cname}: the data directory {data_dir or '(unset)'} is not on a persistent volume")

    for service, kind in (("catalog", "Deployment"), ("sharing", "Deployment"), ("region", "StatefulSet")):
        for obj, _, _ in by_service.get(service, []):
            if obj["kind"] != kind:
                err(obj, f"runs `imaged {service}` but is a {obj['kind']}, not a {kind}")
    for service in ("catalog", "sharing"):
        if not by_service.get(service):
            errors.append(f"overlay {name}: no workload runs `imaged {service}`")
    regions = {}
    for obj, c, env in by_service.get("region", []):
        region = env.get("IMAGEFLEET_REGION")
        if not region:
            err(obj, "the region container does not set IMAGEFLEET_REGION")
        elif region in regions:
            err(obj, f"region {region} also runs in {regions[region]['metadata']['name']}")
        else:
            regions[region] = obj
            if not obj["spec"].get("volumeClaimTemplates"):
                err(obj, "a region StatefulSet without volumeClaimTemplates")
    if not cluster_regions:
        errors.append(f"overlay {name}: IMAGEFLEET_CLUSTER_REGIONS is not set")
    for region in sorted(cluster_regions - regions.keys()):
        errors.append(f"overlay {name}: region {region} (IMAGEFLEET_CLUSTER_REGIONS) has no StatefulSet")
    for region in sorted(regions.keys() - cluster_regions):
        errors.append(f"overlay {name}: region {region} is not in IMAGEFLEET_CLUSTER_REGIONS")

    if not redis:
        errors.append(f"overlay {name}: no Redis container")
    for obj, c in redis:
        args = " ".join((c.get("command") or []) + (c.get("args") or []))
        if obj["kind"] != "StatefulSet" or not obj["spec"].get("volumeClaimTemplates"):
            err(obj, "Redis is not a StatefulSet with a volume claim")
        if "--appendonly yes" not in args or "--appendfsync always" not in args:
            err(obj, "Redis runs without `--appendonly yes --appendfsync always`")

    def covered(obj):
        labels = pod_labels(obj)
        namespace = obj["metadata"].get("namespace")
        for pdb in pdbs:
            if pdb["metadata"].get("namespace") != namespace:
                continue
            selector = pdb["spec"].get("selector") or {}
            match = selector.get("matchLabels") or {}
            if match and not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items()):
                return True
        return False

    for service, entries in sorted(by_service.items()):
        for obj, _, _ in entries:
            if not covered(obj):
                err(obj, f"no PodDisruptionBudget selects its pods ({service})")
    return errors


def main():
    out, overlays = sys.argv[1], sys.argv[2:]
    errors = []
    for name in overlays:
        with open(f"{out}/{name}.yaml") as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        errors += check_overlay(name, objects)
    for e in errors:
        print(f"deploy/k8s: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
