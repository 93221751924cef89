"""Static checks of the Kubernetes manifests and the Dockerfile under deploy/.

Nothing here talks to a cluster or builds an image. The tests parse the files and check
the fields the deployment relies on: the Ray version, GPU requests, job limits that make
reruns safe, schedules, and that credentials only come from Secrets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement  # a pytest dependency

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there.
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = ROOT / "deploy"
DOCKERFILE = DEPLOY_DIR / "Dockerfile"

RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService"}
GPU_RESOURCE = "nvidia.com/gpu"

# Environment variables whose value is a credential. They may only be set through
# valueFrom.secretKeyRef or envFrom.secretRef, never as a literal value.
SECRET_ENV_NAMES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RAY_AUTH_TOKEN",
}

# AWS access key ids start with AKIA (long-term) or ASIA (temporary) followed by 16
# upper-case letters or digits. Secret access keys are 40 base64 characters.
AWS_KEY_ID_PATTERN = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
AWS_SECRET_KEY_PATTERN = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")

# Allowed numeric range of each field of a 5-field cron schedule.
CRON_FIELD_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
CRON_NAMES = [
    {},
    {},
    {},
    {
        name: number
        for number, name in enumerate(
            ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
            start=1,
        )
    },
    {name: number for number, name in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])},
]


def pinned_ray_version() -> str:
    """Return X from the ray==X requirement in pyproject.toml's dependencies."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dependency in pyproject["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name != "ray":
            continue
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if len(exact) == 1:
            return exact[0]
        raise AssertionError(f"ray dependency {dependency!r} is not pinned with ==")
    raise AssertionError("no ray dependency found in pyproject.toml")


def manifest_paths() -> list[Path]:
    return sorted(p for p in DEPLOY_DIR.rglob("*") if p.suffix in {".yaml", ".yml"})


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    """Load every non-empty YAML document under deploy/, labelled by file and index."""
    documents = []
    for path in manifest_paths():
        with path.open() as stream:
            for index, document in enumerate(yaml.safe_load_all(stream)):
                if document is None:
                    continue
                label = f"{path.relative_to(ROOT)}#{index}"
                documents.append((label, document))
    return documents


DOCUMENTS = load_documents()


def documents_of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(label, doc) for label, doc in DOCUMENTS if doc.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Return every RayClusterSpec, including those inside RayJobs and RayCronJob templates."""
    specs = [(label, doc["spec"]) for label, doc in documents_of_kind("RayCluster")]
    for label, job_spec in rayjob_specs():
        specs.append((f"{label}.rayClusterSpec", job_spec["rayClusterSpec"]))
    return specs


def rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    """Return every RayJob spec, including the job templates of RayCronJobs."""
    specs = [(label, doc["spec"]) for label, doc in documents_of_kind("RayJob")]
    for label, doc in documents_of_kind("RayCronJob"):
        specs.append((f"{label}.jobTemplate", doc["spec"]["jobTemplate"]))
    return specs


def ids(cases: list[tuple[str, Any]]) -> list[str]:
    return [label for label, _ in cases]


def resource_quantity(resources: dict[str, Any], section: str, name: str) -> int:
    """Return a whole-number resource quantity, or 0 when it is not set."""
    value = resources.get(section, {}).get(name, 0)
    return int(str(value))


def cron_field_is_valid(field: str, low: int, high: int, names: dict[str, int]) -> bool:
    """Return whether one cron field is valid.

    A field is a comma-separated list of *, N or N-M, each with an optional /STEP.
    """

    def parse_number(token: str) -> int | None:
        if token.upper() in names:
            return names[token.upper()]
        if token.isdigit():
            return int(token)
        return None

    for part in field.split(","):
        base, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            return False
        if base == "*":
            continue
        start_text, dash, end_text = base.partition("-")
        start = parse_number(start_text)
        end = parse_number(end_text) if dash else start
        if start is None or end is None:
            return False
        if not low <= start <= end <= high:
            return False
    return True


def cron_schedule_is_valid(schedule: str) -> bool:
    """Return whether a schedule is a valid 5-field cron expression.

    The fields are minute, hour, day of month, month and day of week.
    """
    fields = schedule.split()
    if len(fields) != 5:
        return False
    return all(
        cron_field_is_valid(field, low, high, names)
        for field, (low, high), names in zip(fields, CRON_FIELD_RANGES, CRON_NAMES, strict=True)
    )


def walk(node: Any) -> Iterator[Any]:
    """Yield every mapping, list and scalar in a parsed YAML document."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def dockerfile_base_image() -> str:
    """Return the image of the first FROM line, with ARG defaults substituted."""
    arg_defaults: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split(maxsplit=1)
        if not words:
            continue
        instruction = words[0].upper()
        argument = words[1] if len(words) > 1 else ""
        if instruction == "ARG" and "=" in argument:
            name, _, default = argument.partition("=")
            arg_defaults[name.strip()] = default.strip()
        elif instruction == "FROM":
            image = argument.split()[0]
            return re.sub(
                r"\$\{?(\w+)\}?", lambda match: arg_defaults.get(match[1], match[0]), image
            )
    raise AssertionError(f"no FROM line in {DOCKERFILE}")


def test_manifests_cover_all_kinds():
    kinds = {doc.get("kind") for _, doc in DOCUMENTS}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds


RAY_DOCUMENTS = [(label, doc) for label, doc in DOCUMENTS if doc.get("kind") in RAY_KINDS]


@pytest.mark.parametrize(("label", "doc"), RAY_DOCUMENTS, ids=ids(RAY_DOCUMENTS))
def test_ray_kinds_use_ray_io_v1(label, doc):
    assert doc.get("apiVersion") == "ray.io/v1"


@pytest.mark.parametrize(("label", "spec"), cluster_specs(), ids=ids(cluster_specs()))
def test_ray_version_matches_pin(label, spec):
    assert spec.get("rayVersion") == pinned_ray_version()


@pytest.mark.parametrize(("label", "spec"), cluster_specs(), ids=ids(cluster_specs()))
def test_gpu_worker_group(label, spec):
    gpu_groups = []
    for group in spec.get("workerGroupSpecs", []):
        containers = group["template"]["spec"]["containers"]
        requested = [
            resource_quantity(c.get("resources", {}), "requests", GPU_RESOURCE) for c in containers
        ]
        limited = [
            resource_quantity(c.get("resources", {}), "limits", GPU_RESOURCE) for c in containers
        ]
        if any(requested) or any(limited):
            gpu_groups.append((group, requested, limited))

    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group, requested, limited in gpu_groups:
        assert requested == limited, f"{group['groupName']}: GPU request differs from limit"
        assert group.get("maxReplicas", 0) >= 1, f"{group['groupName']}: maxReplicas below 1"
        assert group.get("minReplicas", 0) <= group["maxReplicas"]


@pytest.mark.parametrize(("label", "spec"), cluster_specs(), ids=ids(cluster_specs()))
def test_head_has_no_gpu_and_dashboard(label, spec):
    containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
    for container in containers:
        resources = container.get("resources", {})
        assert resource_quantity(resources, "requests", GPU_RESOURCE) == 0
        assert resource_quantity(resources, "limits", GPU_RESOURCE) == 0

    ports = [port["containerPort"] for c in containers for port in c.get("ports", [])]
    assert 8265 in ports


@pytest.mark.parametrize(("label", "spec"), cluster_specs(), ids=ids(cluster_specs()))
def test_ray_pods_get_s3_secret(label, spec):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            secret_refs = [ref for ref in container.get("envFrom", []) if "secretRef" in ref]
            assert secret_refs, f"container {container['name']} gets no Secret via envFrom"


@pytest.mark.parametrize(("label", "spec"), rayjob_specs(), ids=ids(rayjob_specs()))
def test_rayjob_guarantees(label, spec):
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("backoffLimit") == 0
    assert isinstance(spec.get("activeDeadlineSeconds"), int)
    assert spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int)
    assert spec.get("submissionMode") == "K8sJobMode"
    assert spec.get("entrypoint", "").startswith("sdi run ")
    assert "run_name=" in spec["entrypoint"]


@pytest.mark.parametrize(
    ("label", "doc"), documents_of_kind("RayCronJob"), ids=ids(documents_of_kind("RayCronJob"))
)
def test_raycronjob_schedule(label, doc):
    schedule = doc["spec"].get("schedule", "")
    assert cron_schedule_is_valid(schedule), f"invalid cron schedule {schedule!r}"
    assert isinstance(doc["spec"].get("jobTemplate"), dict)
    # RayCronJob has no concurrencyPolicy, so the deadline replaces Forbid: one run must
    # end before the next daily trigger.
    assert doc["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


@pytest.mark.parametrize(
    ("label", "doc"), documents_of_kind("CronJob"), ids=ids(documents_of_kind("CronJob"))
)
def test_cronjob_submits_without_overlap(label, doc):
    spec = doc["spec"]
    assert doc.get("apiVersion") == "batch/v1"
    assert cron_schedule_is_valid(spec.get("schedule", "")), spec.get("schedule")
    assert spec.get("concurrencyPolicy") == "Forbid"
    assert spec["jobTemplate"]["spec"].get("backoffLimit") == 0

    containers = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in containers)
    assert "sdi submit " in command
    assert "--wait" in command

    env = {var["name"]: var for c in containers for var in c.get("env", [])}
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token"
    assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {})


@pytest.mark.parametrize(("label", "doc"), DOCUMENTS, ids=ids(DOCUMENTS))
def test_no_inline_secrets(label, doc):
    assert doc.get("kind") != "Secret", "create Secrets with kubectl, not in deploy/"
    for node in walk(doc):
        if isinstance(node, dict) and node.get("name") in SECRET_ENV_NAMES:
            assert "value" not in node, f"{node['name']} has a literal value"
            assert "secretKeyRef" in node.get("valueFrom", {}), f"{node['name']}: no secretKeyRef"


@pytest.mark.parametrize(
    "path", sorted(p for p in DEPLOY_DIR.rglob("*") if p.is_file()), ids=lambda p: p.name
)
def test_no_credential_literals(path):
    text = path.read_text()
    assert not AWS_KEY_ID_PATTERN.search(text), "looks like an AWS access key id"
    assert not AWS_SECRET_KEY_PATTERN.search(text), "looks like an AWS secret access key"


def test_credential_patterns_match_examples():
    # The example key pair from the AWS documentation.
    assert AWS_KEY_ID_PATTERN.search("key: AKIAIOSFODNN7EXAMPLE")
    assert AWS_SECRET_KEY_PATTERN.search("secret: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not AWS_SECRET_KEY_PATTERN.search("image: registry.example.com/sdi-ray:0.1.0")


@pytest.mark.parametrize(
    ("schedule", "valid"),
    [
        ("0 2 * * *", True),
        ("*/15 0-6 1,15 JAN-MAR mon-fri", True),
        ("0 2 * *", False),
        ("60 2 * * *", False),
        ("0 24 * * *", False),
        ("0 2 0 * *", False),
        ("0 2 * * 8", False),
        ("0 2 * * */0", False),
        ("0 5-2 * * *", False),
        ("@daily", False),
    ],
)
def test_cron_validator(schedule, valid):
    assert cron_schedule_is_valid(schedule) is valid


def test_dockerfile_base_matches_pin():
    image = dockerfile_base_image()
    repository, _, tag = image.partition(":")
    assert repository == "rayproject/ray"
    assert tag.split("-")[0] == pinned_ray_version()


def test_dockerfile_user_and_configs():
    lines = [line.split() for line in DOCKERFILE.read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0].upper() == "USER"]
    assert users, "no USER line: the build would depend on the base image's user"
    assert users[-1] not in {"root", "0"}
    copies = [words for words in lines if words[0].upper() == "COPY"]
    assert any("configs" in words for words in copies)
    assert any(words[:2] == ["RUN", "pip"] and "." in words for words in lines)


def manifest_commands() -> list[tuple[str, str]]:
    """Return every `sdi run` or `sdi submit` command line in the manifests."""
    commands = [(f"{label}.entrypoint", spec["entrypoint"]) for label, spec in rayjob_specs()]
    for label, doc in documents_of_kind("CronJob"):
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for container in pod["containers"]:
            line = " ".join(container.get("command", []) + container.get("args", []))
            commands.append((f"{label}.{container['name']}", line))
    return commands


@pytest.mark.parametrize(("label", "line"), manifest_commands(), ids=ids(manifest_commands()))
def test_manifest_config_loads(label, line):
    from pipeline.config import load_config

    # The shell expands $(date -u +%F) in the pod; any date stands in for it here.
    words = line.replace("$(date -u +%F)", "2026-12-04").split()
    configs = [word for word in words if word.startswith("/home/ray/sdi/configs/")]
    assert len(configs) == 1, f"{label}: expected one config under /home/ray/sdi/configs"
    local = ROOT / configs[0].removeprefix("/home/ray/sdi/")
    assert local.is_file(), f"{label}: {configs[0]} is not in the image (no {local})"
    overrides = [word for word in words if "=" in word and not word.startswith("-")]
    config = load_config(local, overrides)
    assert config.run_name == "nightly-2026-12-04"
    assert config.store.startswith("s3://")
