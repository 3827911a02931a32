#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in deploy/k8s.

    tests/interop/.venv/bin/python scripts/validate-k8s.py [--warren target/debug/warren]

No cluster is contacted. What is checked:

1. kustomization.yaml lists every manifest of the directory and nothing else;
   with `kubectl` on the PATH the manifests are rendered by `kubectl
   kustomize` (namespace and image set as a user gets them), else read as
   they are.
2. Every object of a built-in kind validates strictly (unknown fields
   refused) against the OpenAPI schemas that kubernetes-validate bundles, for
   the oldest and the newest Kubernetes version it knows.
3. KEDA's ScaledObject and TriggerAuthentication (custom resources, whose
   schemas are not bundled) against a schema of the fields used here,
   unknown fields refused: a structure check, not KEDA's own CRD schema.
4. What Warren needs: two scheduler replicas; on every container a startup
   and liveness probe on /healthz and a readiness probe on /readyz at a
   declared port, CPU and memory requests, a memory limit, a read-only root
   file system, no privilege escalation, a non-root pod; every
   terminationGracePeriodSeconds above worker.grace_period_ms; a
   PodDisruptionBudget selecting the scheduler's and the workers' pods; the
   ScaledObject scaling the worker Deployment (which leaves replicas to it)
   on a queue pattern that matches every work queue and lane of the
   configured topology and no other queue.
5. With --warren, the ConfigMap's warren.toml loads in Warren (a key it does
   not know is an error) and `warren topology show` gives the queue names
   of step 4.

Exits 1 with one line per problem.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
DEFAULT_GRACE_MS = 30000

problems = []


def problem(msg):
    problems.append(msg)


def obj_name(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ---- KEDA, the fields these manifests use ----

_STR = {"type": "string"}
_INT = {"type": "integer"}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _STR,
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
    },
    "additionalProperties": False,
}
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": _STR, "kind": _STR, "apiVersion": _STR},
                },
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "idleReplicaCount": _INT,
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _STR,
                                # autoscaling/v2 HorizontalPodAutoscalerBehavior,
                                # checked below against the bundled schema.
                                "behavior": {"type": "object"},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {"type": "object", "additionalProperties": _STR},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": _STR, "kind": _STR},
                            },
                        },
                    },
                },
            },
        },
    },
    "additionalProperties": False,
}
# The rabbitmq scaler's metadata keys (https://keda.sh/docs/latest/scalers/rabbitmq-queue/).
RABBITMQ_KEYS = {
    "host", "hostFromEnv", "protocol", "mode", "value", "activationValue", "queueName",
    "vhostName", "useRegex", "operation", "excludeUnacknowledged", "pageSize", "unsafeSsl",
    "timeout", "usernameFromEnv", "passwordFromEnv",
}
TRIGGER_AUTH = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {"parameter": _STR, "name": _STR, "key": _STR},
                    },
                }
            },
        },
    },
    "additionalProperties": False,
}


def load(files):
    """The manifests' objects: rendered by kubectl kustomize when it is here."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", K8S], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            problem(f"kubectl kustomize {K8S} failed: {out.stderr.strip()}")
            return [], False
        return [d for d in yaml.safe_load_all(out.stdout) if d], True
    docs = []
    for f in files:
        with open(os.path.join(K8S, f), encoding="utf-8") as fh:
            docs.extend(d for d in yaml.safe_load_all(fh) if d)
    return docs, False


def check_files():
    with open(os.path.join(K8S, "kustomization.yaml"), encoding="utf-8") as fh:
        kust = yaml.safe_load(fh)
    listed = kust.get("resources", [])
    present = sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(K8S, "*.yaml"))
        if os.path.basename(p) != "kustomization.yaml"
    )
    for f in sorted(set(present) - set(listed)):
        problem(f"{f} is not listed in kustomization.yaml resources")
    for f in sorted(set(listed) - set(present)):
        problem(f"kustomization.yaml lists {f}, which does not exist")
    return listed, kust


def check_schemas(docs):
    versions = kv_utils.all_versions()
    for version in sorted({versions[0], kv_utils.latest_version()}):
        for doc in docs:
            if doc.get("kind") in KEDA_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kv_utils.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problem(f"{obj_name(doc)} (Kubernetes {version}): {path}: {e.message}")
            except kv_utils.SchemaNotFoundError:
                problem(f"{obj_name(doc)}: no schema for {doc.get('apiVersion')} in Kubernetes {version}")
    for doc in docs:
        kind = doc.get("kind")
        if kind not in KEDA_KINDS:
            continue
        schema = SCALED_OBJECT if kind == "ScaledObject" else TRIGGER_AUTH
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
            path = ".".join(str(p) for p in e.path)
            problem(f"{obj_name(doc)}: {path}: {e.message}")
        if kind == "ScaledObject":
            spec = doc.get("spec", {})
            behavior = (
                spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
            )
            if behavior is not None:
                hpa = {
                    "apiVersion": "autoscaling/v2",
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "keda-hpa-check"},
                    "spec": {
                        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                        "maxReplicas": 1,
                        "behavior": behavior,
                    },
                }
                try:
                    kubernetes_validate.validate(hpa, kv_utils.latest_version(), strict=True)
                except kv_utils.ValidationError as e:
                    problem(f"{obj_name(doc)}: advanced.horizontalPodAutoscalerConfig.behavior: {e.message}")
            for t in spec.get("triggers", []):
                if t.get("type") == "rabbitmq":
                    for k in sorted(set(t.get("metadata", {})) - RABBITMQ_KEYS):
                        problem(f"{obj_name(doc)}: rabbitmq trigger: unknown metadata key {k}")


def port_names(container):
    names = set()
    for p in container.get("ports", []):
        names.add(p.get("name"))
        names.add(p.get("containerPort"))
    return names


def check_warren(docs, warren):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}

    # The configuration the pods mount.
    config_text = None
    for cm in by_kind.get("ConfigMap", []):
        if "warren.toml" in cm.get("data", {}):
            config_text = cm["data"]["warren.toml"]
    if config_text is None:
        problem("no ConfigMap with warren.toml")
        config = {}
    else:
        config = tomllib.loads(config_text)
    grace_ms = config.get("worker", {}).get("grace_period_ms", DEFAULT_GRACE_MS)
    prefix = config.get("prefix", "warren")

    sched = deployments.get("warren-scheduler")
    if not sched:
        problem("no Deployment warren-scheduler")
    elif sched["spec"].get("replicas") != 2:
        problem(f"warren-scheduler has {sched['spec'].get('replicas')} replicas, not 2")

    pod_workloads = list(deployments.values()) + by_kind.get("Job", [])
    for w in pod_workloads:
        name = obj_name(w)
        pod = w["spec"]["template"]["spec"]
        tg = pod.get("terminationGracePeriodSeconds", 30)
        if w["kind"] == "Deployment" and tg * 1000 <= grace_ms:
            problem(f"{name}: terminationGracePeriodSeconds {tg} is not above worker.grace_period_ms {grace_ms}")
        psc = pod.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            problem(f"{name}: pod securityContext.runAsNonRoot is not true")
        for c in pod["containers"]:
            cname = f"{name} container {c['name']}"
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem"):
                problem(f"{cname}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problem(f"{cname}: allowPrivilegeEscalation is not false")
            res = c.get("resources", {})
            for r in ("cpu", "memory"):
                if r not in res.get("requests", {}):
                    problem(f"{cname}: no {r} request")
            if "memory" not in res.get("limits", {}):
                problem(f"{cname}: no memory limit")
            if w["kind"] != "Deployment":
                continue
            for probe, path in (
                ("startupProbe", "/healthz"),
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
            ):
                get = c.get(probe, {}).get("httpGet")
                if not get:
                    problem(f"{cname}: no {probe} (httpGet {path})")
                    continue
                if get.get("path") != path:
                    problem(f"{cname}: {probe} probes {get.get('path')}, not {path}")
                if get.get("port") not in port_names(c):
                    problem(f"{cname}: {probe} port {get.get('port')} is not a declared port")

    # Disruption budgets.
    def selects(pdb, dep):
        want = pdb["spec"].get("selector", {}).get("matchLabels", {})
        have = dep["spec"]["template"]["metadata"].get("labels", {})
        return bool(want) and all(have.get(k) == v for k, v in want.items())

    for dname in ("warren-scheduler", "warren-worker"):
        dep = deployments.get(dname)
        if dep and not any(selects(p, dep) for p in by_kind.get("PodDisruptionBudget", [])):
            problem(f"no PodDisruptionBudget selects the pods of {dname}")

    # Autoscaling.
    worker = deployments.get("warren-worker")
    scaled = [
        s for s in by_kind.get("ScaledObject", [])
        if s["spec"]["scaleTargetRef"].get("name") == "warren-worker"
    ]
    if not worker:
        problem("no Deployment warren-worker")
    elif "replicas" in worker["spec"]:
        problem("warren-worker sets replicas, which its ScaledObject owns")
    if not scaled:
        problem("no ScaledObject scales warren-worker")
    patterns = []
    for s in scaled:
        for t in s["spec"]["triggers"]:
            md = t.get("metadata", {})
            if t.get("type") != "rabbitmq":
                continue
            if md.get("useRegex") == "true":
                if md.get("protocol") != "http":
                    problem(f"{obj_name(s)}: useRegex needs protocol http")
                patterns.append(re.compile(md["queueName"]))
            else:
                patterns.append(re.compile("^" + re.escape(md.get("queueName", "")) + "$"))
    auths = {a["metadata"]["name"] for a in by_kind.get("TriggerAuthentication", [])}
    for s in scaled:
        for t in s["spec"]["triggers"]:
            ref = t.get("authenticationRef", {}).get("name")
            if ref and ref not in auths:
                problem(f"{obj_name(s)}: authenticationRef {ref} names no TriggerAuthentication")

    queues = None
    if warren and config_text is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
            fh.write(config_text)
            path = fh.name
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN__")}
        out = subprocess.run(
            [warren, "--config", path, "topology", "show"],
            capture_output=True, text=True, env=env, check=False,
        )
        os.unlink(path)
        if out.returncode != 0:
            problem(f"warren.toml of the ConfigMap does not load: {out.stderr.strip()}")
        else:
            queues = [
                line.split()[1] for line in out.stdout.splitlines()
                if line.startswith("queue ")
            ]
    if queues is None:
        # Without the binary: the built-in queues and three lanes each.
        queues = [f"{prefix}.q.{q}" for q in ("io", "cpu", "diag")]
        queues += [f"{q}.lane.{k}" for q in list(queues) for k in range(3)]
        queues += [f"{prefix}.{q}" for q in ("dead", "unroutable", "delay.intake", "escrow")]
    work = re.compile("^" + re.escape(prefix) + r"\.q\.")
    if patterns:
        for q in queues:
            matched = any(p.search(q) for p in patterns)
            if work.search(q) and not matched:
                problem(f"the ScaledObject's queueName does not match work queue {q}")
            if not work.search(q) and matched:
                problem(f"the ScaledObject's queueName matches {q}, which is not a work queue")
    return len(queues)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warren", help="the warren binary, to load the ConfigMap's warren.toml")
    args = ap.parse_args()
    listed, _ = check_files()
    docs, rendered = load(listed)
    check_schemas(docs)
    nqueues = check_warren(docs, args.warren) if docs else 0
    if problems:
        for p in problems:
            print(f"deploy/k8s: {p}", file=sys.stderr)
        sys.exit(1)
    kinds = sorted({d["kind"] for d in docs})
    versions = sorted({kv_utils.all_versions()[0], kv_utils.latest_version()})
    print(
        f"deploy/k8s: {len(docs)} objects ({', '.join(kinds)}) valid "
        f"{'(rendered by kubectl kustomize)' if rendered else '(kubectl not found: files read as they are)'}; "
        f"built-in kinds strict against Kubernetes {' and '.join(versions)}; KEDA kinds against "
        f"the fields used; autoscaling pattern checked on {nqueues} queues"
        f"{'' if args.warren else ' (built-in list: no --warren)'}"
    )


if __name__ == "__main__":
    main()
