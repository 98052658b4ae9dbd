"""``docker-compose.yml``, ``docker/Dockerfile`` and ``.env.example``, read as Docker reads them
(no Docker engine needed): each command runs a real module of this repository, each setting is
one the package reads, and the client secret reaches the workers only."""

from __future__ import annotations

import ast
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "docker" / "Dockerfile.dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
#: The file the compose file names; users make it from the template, which stands in for it here.
ENV_FILE = ".env"
WORKER_COMMAND = [
    "celery", "-A", "op_celery.worker", "worker",
    "--pool", "threads", "--concurrency", "32", "--loglevel", "INFO",
]  # fmt: skip
SECRET = "OPENPANEL_CLIENT_SECRET"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")
_SETTING_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, as compose reads an env_file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def commented_keys(path: Path) -> list[str]:
    """Settings offered commented out (``# KEY=value``)."""
    return re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE)


def interpolate(text: str, dotenv: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` against the .env file."""

    def replace(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        value = dotenv.get(name)
        if operator == ":-" and not value:
            return default
        if operator == "-" and value is None:
            return default
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def service_env(name: str) -> dict[str, str]:
    """The environment compose gives a service's container, with .env.example as the .env."""
    service = services()[name]
    dotenv = read_env_file(ENV_EXAMPLE)
    env: dict[str, str] = {}
    env_files = service.get("env_file", [])
    for entry in [env_files] if isinstance(env_files, (str, dict)) else env_files:
        path = entry["path"] if isinstance(entry, dict) else entry
        env.update(read_env_file(ENV_EXAMPLE if path == ENV_FILE else ROOT / path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    for key, value in environment.items():
        env[key] = interpolate("" if value is None else str(value), dotenv)
    return env


def known_settings() -> set[str]:
    """The environment variables the package reads: the names in ``_settings.py`` (and the
    metrics port in ``metrics.py``), and ``OPENPANEL_<KEY>`` for each key of a project."""
    names: set[str] = set()
    for module in ("_settings.py", "metrics.py"):
        tree = ast.parse((ROOT / "op_celery" / module).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _SETTING_NAME.match(node.value)
            ):
                names.add(node.value)
            if isinstance(node, ast.FunctionDef) and node.name == "project":
                for call in ast.walk(node):
                    if (
                        isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Name)
                        and call.func.id == "get"
                        and call.args
                        and isinstance(call.args[0], ast.Constant)
                        and isinstance(call.args[0].value, str)
                    ):
                        names.add("OPENPANEL_" + call.args[0].value.upper())
    return names


def command_of(name: str) -> list[str]:
    command = services()[name]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def option(command: list[str], name: str) -> str:
    for index, part in enumerate(command):
        if part == name:
            return command[index + 1]
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


# The Dockerfile, read instruction by instruction.


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def image_layout() -> tuple[dict[PurePosixPath, Path], list[tuple[PurePosixPath, list[str]]]]:
    """Where the COPY instructions put repository paths in the image, and each ``pip install``
    with the working directory it ran in."""
    copied: dict[PurePosixPath, Path] = {}
    installs: list[tuple[PurePosixPath, list[str]]] = []
    workdir = PurePosixPath("/")
    for keyword, rest in dockerfile_instructions():
        if keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            assert not any(s.startswith("--") for s in sources), "COPY options are not read here"
            target = workdir / dest
            for source in sources:
                repo_path = ROOT / source
                assert repo_path.exists(), f"COPY of a missing path: {source}"
                into_dir = dest.endswith("/") or len(sources) > 1
                copied[target / repo_path.name if into_dir else target] = repo_path
        elif keyword == "RUN":
            for step in rest.split("&&"):
                words = shlex.split(step)
                if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                    installs.append((workdir, words[words.index("install") + 1 :]))
    return copied, installs


def repo_path_of(container_path: PurePosixPath, copied: dict[PurePosixPath, Path]) -> Path | None:
    """The repository file or directory at ``container_path`` in the image, if one was copied."""
    for target, source in copied.items():
        if container_path == target:
            return source
        if target in container_path.parents:
            return source / container_path.relative_to(target)
    return None


def probe(env: dict[str, str], module: str, attribute: str, cwd: Path) -> dict[str, Any]:
    """Import ``module`` with the container's environment, as the service's command does, and
    report the app object's classes and the op-celery settings of that environment."""
    script = (
        "import importlib, json, sys\n"
        "sys.path.insert(0, '.')\n"
        "app = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])\n"
        "from op_celery import load_settings\n"
        "s = load_settings()\n"
        "print(json.dumps({'classes': [f'{c.__module__}.{c.__qualname__}' "
        "for c in type(app).__mro__], 'broker_url': s.broker_url, "
        "'broker_key_prefix': s.broker_key_prefix, 'queue': s.queue}))\n"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENPANEL_", "OP_CELERY_", "CELERY_", "REDIS_URL"))
    }
    result = subprocess.run(
        [sys.executable, "-c", script, module, attribute],
        env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def probe_service(name: str) -> dict[str, Any]:
    command = command_of(name)
    if command[0] == "celery":
        return probe(service_env(name), option(command, "-A"), "app", ROOT)
    assert command[0] == "gunicorn", command
    copied, _ = image_layout()
    chdir = repo_path_of(PurePosixPath(option(command, "--chdir")), copied)
    assert chdir is not None and chdir.is_dir(), f"--chdir is not a copied directory: {command}"
    module, _, attribute = command[-1].partition(":")
    assert (chdir / (module.replace(".", "/") + ".py")).exists()
    return probe(service_env(name), module, attribute or "application", chdir)


# The tests.


def test_the_services_are_redis_the_worker_the_web_app_and_flower() -> None:
    assert set(services()) == {"redis", "worker", "web", "flower"}


def test_redis_is_7_alpine_with_a_healthcheck_the_others_wait_for() -> None:
    redis = services()["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert "redis-cli" in redis["healthcheck"]["test"]
    for name in ("worker", "web", "flower"):
        assert services()[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_the_worker_runs_the_packages_worker_on_threads() -> None:
    assert command_of("worker") == WORKER_COMMAND
    assert services()["worker"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_the_worker_can_be_scaled() -> None:
    worker = services()["worker"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"`--scale worker=4` needs the worker without {key}"
    assert worker.get("deploy", {}).get("replicas") is None


def test_only_the_worker_gets_the_client_secret() -> None:
    assert SECRET in service_env("worker")
    for name, service in services().items():
        if name == "worker":
            continue
        assert "env_file" not in service, f"{name} would read the secret from the env file"
        assert not any("SECRET" in key for key in service_env(name)), name
        assert "SECRET" not in yaml.safe_dump(service), name


def test_every_setting_the_compose_file_names_is_one_the_package_reads() -> None:
    known = known_settings()
    text = COMPOSE_FILE.read_text()
    named = {match.group(1) for match in _INTERPOLATION.finditer(text)}
    for service in services().values():
        environment = service.get("environment", {})
        keys = (
            [item.partition("=")[0] for item in environment]
            if isinstance(environment, list)
            else list(environment)
        )
        named.update(keys)
    assert named, "the compose file names no settings"
    assert named <= known, sorted(named - known)


def test_every_key_of_env_example_is_a_setting_the_package_reads() -> None:
    keys = set(read_env_file(ENV_EXAMPLE)) | set(commented_keys(ENV_EXAMPLE))
    assert keys <= known_settings(), sorted(keys - known_settings())
    assert {
        "OPENPANEL_CLIENT_ID", SECRET, "OPENPANEL_API_URL", "OPENPANEL_RATE_LIMIT",
        "OP_CELERY_BROKER_URL",
    } <= keys  # fmt: skip
    assert read_env_file(ENV_EXAMPLE)["OP_CELERY_BROKER_URL"] == "redis://redis:6379/0"


def test_the_known_settings_are_read_from_the_package_source() -> None:
    known = known_settings()
    assert {"OP_CELERY_BROKER_URL", "OPENPANEL_CLIENT_ID", SECRET, "OP_CELERY_QUEUE"} <= known
    assert "OP_CELERY_NO_SUCH_SETTING" not in known


@pytest.mark.parametrize("name", ["worker", "flower"])
def test_each_celery_command_names_a_module_with_a_celery_app(name: str) -> None:
    assert probe_service(name)["classes"][-2:] == ["celery.app.base.Celery", "builtins.object"]


def test_the_web_command_serves_the_flask_example() -> None:
    command = command_of("web")
    assert command[0] == "gunicorn"
    assert option(command, "--bind").startswith("0.0.0.0:")
    assert "flask.app.Flask" in probe_service("web")["classes"]


def test_the_web_app_and_flower_publish_and_watch_where_the_workers_consume() -> None:
    worker = probe_service("worker")
    assert worker["broker_url"] == "redis://redis:6379/0"
    for name in ("web", "flower"):
        seen = probe_service(name)
        for key in ("broker_url", "broker_key_prefix", "queue"):
            assert seen[key] == worker[key], (name, key)


def test_the_dockerfile_installs_this_package_with_the_extras_the_services_use() -> None:
    copied, installs = image_layout()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras_defined = set(pyproject["project"]["optional-dependencies"])
    local = []
    for workdir, arguments in installs:
        for argument in arguments:
            if argument.startswith(("/", ".")):
                path, _, extras = argument.partition("[")
                local.append((PurePosixPath(posixpath.normpath(workdir / path)), extras))
    assert len(local) == 1, f"one pip install of the package's source, got {local}"
    source, extras = local[0]
    assert repo_path_of(source / "pyproject.toml", copied) == ROOT / "pyproject.toml"
    assert repo_path_of(source / "op_celery", copied) == ROOT / "op_celery"
    readme = pyproject["project"]["readme"]
    assert repo_path_of(source / readme, copied) == ROOT / readme
    wanted = set(extras.rstrip("]").split(",")) if extras else set()
    assert wanted <= extras_defined
    assert {"flask", "prometheus"} <= wanted  # the web example; the workers' metrics


def test_each_program_the_services_run_is_installed_in_the_image() -> None:
    _, installs = image_layout()
    installed = {
        re.split(r"[<>=!~\[ ]", argument, maxsplit=1)[0].lower()
        for _, arguments in installs
        for argument in arguments
        if not argument.startswith(("-", "/", "."))
    }
    installed.add("celery")  # a dependency of the package
    for name, service in services().items():
        if "build" not in service:
            continue
        command = command_of(name)
        assert command[0] in installed, (name, command[0])
        if command[0] == "celery" and "flower" in command:
            assert "flower" in installed


def test_the_image_runs_the_worker_by_default() -> None:
    cmd = [rest for keyword, rest in dockerfile_instructions() if keyword == "CMD"]
    assert len(cmd) == 1
    assert json.loads(cmd[0]) == WORKER_COMMAND


def test_the_build_context_leaves_out_the_env_file_and_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", "the context starts empty and names what it lets in"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert ENV_FILE not in allowed and ".venv" not in allowed
    copied, _ = image_layout()
    for source in copied.values():
        top = source.relative_to(ROOT).parts[0]
        assert top in allowed, f"COPY {top} but the ignore file leaves it out"
