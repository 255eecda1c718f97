"""Deployment files for a generated repository: a Dockerfile, a docker compose file and Kubernetes manifests.

The image is NVIDIA's Triton TensorRT-LLM container (`generator.build.trtllm.TRTLLM_CONTAINER`: tritonserver,
the tensorrtllm and python backends, TensorRT-LLM, mpirun) with gen-repo installed; every pod or container runs
`gen-repo serve` on the repository. The repository's config.pbtxt files name the engine and tokenizer dirs by
absolute path, so the directory holding all of them (the job's output dir) is mounted at that same path.

Layouts, from the engine's world size (tp x pp) and `--gpus-per-node`:
- one node (world size <= GPUs per node): `compose.yaml` and `k8s/deployment.yaml` (Deployment + Service);
- several nodes: `k8s/leaderworkerset.yaml` (LeaderWorkerSet, leaderworkerset.x-k8s.io/v1, one pod per node).
  The leader runs `python3 -m generator.serving.deploy lws-leader`, which waits for the workers' sshd and execs the
  leader-mode `mpirun` of `gen-repo serve` with `--host` listing every pod; workers only run sshd.

The templates under deploy/templates/ hold the layout only; this module computes every value.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from generator import __version__
from generator.build.trtllm import TRTLLM_CONTAINER, TRTLLM_VERSION
from generator.errors import ConfigError, GenRepoError
from generator.serving import pbtxt
from generator.serving.serve import (
    ServeSettings,
    TritonInstall,
    find_tritonserver,
    launch_command,
    repository_world_size,
)

SSH_PORT = 2222
SSH_SECRET_DIR = "/etc/gen-repo-ssh"
HEALTH_PATH = "/v2/health/ready"     # the <name>-ssh Secret: id_ed25519 + authorized_keys
PROJECT_FILES = ("pyproject.toml", "README.md")
PROJECT_DIRS = ("generator", "templates")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


@dataclass(frozen=True)
class DeploySettings:
    """What `render_deploy` writes and for which cluster shape."""

    model_repository: Path
    output_dir: Path
    image: str = "gen-repo-triton:latest"     # the image the rendered Dockerfile builds, run by compose / k8s
    base_image: str = TRTLLM_CONTAINER
    gpus_per_node: int | None = None          # None: the whole world size on one node
    nodes: int | None = None                  # None: world size / gpus_per_node
    name: str = "gen-repo"                    # compose project, Kubernetes object and label name
    http_port: int = ServeSettings.http_port
    grpc_port: int = ServeSettings.grpc_port
    metrics_port: int = ServeSettings.metrics_port
    volume_claim: str | None = None           # Kubernetes PVC with the model files; default <name>-models


@dataclass(frozen=True)
class DeployPlan:
    """Everything the templates need, resolved from the settings and the repository."""

    settings: DeploySettings
    model_repository: Path                    # absolute
    data_root: Path                           # the dir holding the repository and every path it names
    world_size: int
    nodes: int
    gpus_per_node: int

    @property
    def volume_claim(self) -> str:
        return self.settings.volume_claim or f"{self.settings.name}-models"

    def serve_args(self) -> list[str]:
        """`gen-repo serve` arguments of the single-node container (all endpoints on all interfaces)."""
        s = self.settings
        return ["serve", "--model-repository", str(self.model_repository), "--host", "0.0.0.0",
                "--http-port", str(s.http_port), "--grpc-port", str(s.grpc_port),
                "--metrics-port", str(s.metrics_port)]

    def leader_args(self) -> list[str]:
        """The LeaderWorkerSet leader's command (see `lws_leader`)."""
        s = self.settings
        return ["python3", "-m", "generator.serving.deploy", "lws-leader", "--model-repository", str(self.model_repository),
                "--nodes", str(self.nodes), "--gpus-per-node", str(self.gpus_per_node),
                "--http-port", str(s.http_port), "--grpc-port", str(s.grpc_port),
                "--metrics-port", str(s.metrics_port)]


def repository_paths(model_repository: Path) -> list[Path]:
    """The absolute, existing paths the repository's config.pbtxt files name (engine, tokenizer dirs)."""
    paths = []
    for config_path in sorted(Path(model_repository).glob("*/config.pbtxt")):
        for value in pbtxt.parameters(pbtxt.read_model_config(config_path)).values():
            if value.startswith("/") and Path(value).exists():
                paths.append(Path(value))
    return paths


def plan_deploy(settings: DeploySettings) -> DeployPlan:
    """Check the settings against the repository and resolve the cluster shape."""
    repository = Path(settings.model_repository).resolve()
    if not (repository / "tensorrt_llm" / "config.pbtxt").is_file():
        raise GenRepoError(f"{repository} is not a gen-repo Triton repository (no tensorrt_llm/config.pbtxt)")
    if not _DNS_LABEL.match(settings.name):
        raise ConfigError(f"--name {settings.name!r} must be a DNS label: lowercase letters, digits and '-', "
                          "starting with a letter, at most 40 characters")
    world_size = repository_world_size(repository)
    gpus_per_node = settings.gpus_per_node or math.ceil(world_size / (settings.nodes or 1))
    nodes = settings.nodes or math.ceil(world_size / gpus_per_node)
    if gpus_per_node < 1 or nodes < 1 or nodes * gpus_per_node != world_size:
        raise ConfigError(f"the engine has {world_size} ranks (one GPU each); {nodes} node(s) x {gpus_per_node} "
                          "GPU(s) per node must equal that (adjust --nodes / --gpus-per-node)")
    root = Path(os.path.commonpath([repository, *repository_paths(repository)]))
    if root == Path(root.anchor):
        raise ConfigError(f"the repository and the dirs it names share no directory below {root}: keep the "
                          "job's output (engine/, tokenizer/, triton_repo/) under one directory")
    return DeployPlan(settings, repository, root, world_size, nodes, gpus_per_node)


def _template_environment() -> Any:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(project_root() / "deploy" / "templates")),
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    # JSON strings and lists are valid YAML flow scalars / sequences and Dockerfile exec forms
    environment.filters["json"] = json.dumps
    return environment


def project_root() -> Path:
    """The gen-repo source tree the Dockerfile installs (pyproject.toml beside generator/)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise GenRepoError(f"gen-repo deploy needs gen-repo's source tree (pyproject.toml next to {root / 'generator'});"
                           " install it with `pip install -e <checkout>`")
    return root


def copy_project(destination: Path) -> None:
    """Copy what `pip install` needs of gen-repo into the Docker build context."""
    root = project_root()
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for name in PROJECT_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_DIRS:
        shutil.copytree(root / name, destination / name, ignore=ignore)


def health_command(http_port: int) -> list[str]:
    """A readiness check that needs nothing but the image's python3 (exit 0 once /v2/health/ready is 200)."""
    return ["python3", "-c", "import urllib.request; "
            f"urllib.request.urlopen('http://127.0.0.1:{http_port}{HEALTH_PATH}', timeout=4)"]


def worker_args() -> list[str]:
    """A LeaderWorkerSet worker only runs sshd; the leader's mpirun starts its ranks."""
    return ["/usr/sbin/sshd", "-D", "-e", "-p", str(SSH_PORT),
            "-o", f"AuthorizedKeysFile={SSH_SECRET_DIR}/authorized_keys",
            # Secret volumes are not the 0700 dir StrictModes wants
            "-o", "StrictModes=no"]


def template_context(plan: DeployPlan) -> dict[str, Any]:
    s = plan.settings
    return {
        "gen_repo_version": __version__, "trtllm_version": TRTLLM_VERSION, "base_image": s.base_image,
        "image": s.image, "name": s.name, "world_size": plan.world_size, "nodes": plan.nodes,
        "gpus_per_node": plan.gpus_per_node, "model_repository": str(plan.model_repository),
        "data_root": str(plan.data_root), "volume_claim": plan.volume_claim,
        "http_port": s.http_port, "grpc_port": s.grpc_port, "metrics_port": s.metrics_port,
        "serve_args": plan.serve_args(), "leader_args": plan.leader_args(), "worker_args": worker_args(),
        "ssh_port": SSH_PORT, "ssh_secret": f"{s.name}-ssh", "ssh_secret_dir": SSH_SECRET_DIR,
        "health_path": HEALTH_PATH, "health_command": health_command(s.http_port),
    }


def render_deploy(settings: DeploySettings) -> list[Path]:
    """Write the Dockerfile (+ its build context), compose.yaml or the LeaderWorkerSet, and a README;
    returns the files written."""
    plan = plan_deploy(settings)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    environment = _template_environment()
    context = template_context(plan)
    targets = {"Dockerfile": "Dockerfile.j2", "README.md": "README.md.j2"}
    if plan.nodes == 1:
        targets.update({"compose.yaml": "compose.yaml.j2", "k8s/deployment.yaml": "k8s-deployment.yaml.j2"})
    else:
        targets.update({"k8s/leaderworkerset.yaml": "k8s-leaderworkerset.yaml.j2"})
    written = []
    for relative, template in targets.items():
        path = output / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(environment.get_template(template).render(**context))
        written.append(path)
    copy_project(output / "gen-repo")
    return written


# --- the LeaderWorkerSet leader, run inside the leader pod ---------------------------------------------------

def lws_hosts(leader_address: str, nodes: int) -> list[str]:
    """Pod addresses of one LWS group, leader first: the leader is `<lws>-<group>.<lws>.<namespace>` and
    worker i is `<lws>-<group>-<i>.<lws>.<namespace>` (LWS's default shared headless service)."""
    pod, _, domain = leader_address.partition(".")
    if not pod or not domain:
        raise GenRepoError(f"LWS_LEADER_ADDRESS {leader_address!r} is not <pod>.<service>.<namespace>")
    return [leader_address] + [f"{pod}-{index}.{domain}" for index in range(1, nodes)]


def multinode_launch_command(settings: ServeSettings, hosts: list[str], gpus_per_node: int, master_address: str,
                             install: TritonInstall | None = None) -> tuple[list[str], dict[str, str]]:
    """`gen-repo serve`'s leader-mode mpirun line, spread over `hosts` (gpus_per_node ranks on each, in order;
    the first is this machine) with the torch.distributed rendezvous at `master_address` (the leader's address
    as the other hosts reach it)."""
    argv, env = launch_command(settings, install)
    if len(argv) < 2 or Path(argv[0]).name != "mpirun" or argv[1] != "--allow-run-as-root":
        raise GenRepoError(f"unexpected launch line (want a leader-mode mpirun): {argv[:3]}")
    argv = [f"MASTER_ADDR={master_address}" if word == "MASTER_ADDR=127.0.0.1" else word for word in argv]
    placement = ["--host", ",".join(f"{host}:{gpus_per_node}" for host in hosts),
                 "--mca", "plm_rsh_args", f"-p {SSH_PORT} -i {SSH_SECRET_DIR}/id_ed25519 "
                 "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"]
    return argv[:2] + placement + argv[2:], env


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise GenRepoError(f"{host}:{port} did not answer within {timeout_s:.0f} s") from None
            time.sleep(2)


@click.group()
def _tools() -> None:
    """Helpers that run inside the deployed containers."""


@_tools.command("lws-leader")
@click.option("--model-repository", required=True, type=click.Path(path_type=Path))
@click.option("--nodes", type=int, required=True)
@click.option("--gpus-per-node", type=int, required=True)
@click.option("--http-port", type=int, default=ServeSettings.http_port)
@click.option("--grpc-port", type=int, default=ServeSettings.grpc_port)
@click.option("--metrics-port", type=int, default=ServeSettings.metrics_port)
@click.option("--wait-timeout", "wait_timeout_s", type=float, default=900.0)
def lws_leader(model_repository: Path, nodes: int, gpus_per_node: int, http_port: int, grpc_port: int,
               metrics_port: int, wait_timeout_s: float) -> None:
    """Wait for every worker pod's sshd, then exec the leader-mode mpirun over all pods."""
    leader_address = os.environ.get("LWS_LEADER_ADDRESS")
    if not leader_address:
        raise click.ClickException("LWS_LEADER_ADDRESS is not set: run this in a LeaderWorkerSet leader pod")
    try:
        workers = lws_hosts(leader_address, nodes)[1:]
        for host in workers:
            wait_for_port(host, SSH_PORT, wait_timeout_s)
    except GenRepoError as error:
        raise click.ClickException(str(error)) from None
    # this pod by its own name, so that mpirun starts the leader's ranks locally instead of over ssh
    hosts = [socket.gethostname(), *workers]
    settings = ServeSettings(model_repository=model_repository, host="0.0.0.0", http_port=http_port,
                             grpc_port=grpc_port, metrics_port=metrics_port, world_size=nodes * gpus_per_node,
                             cpu_only=False, oversubscribe=False, master_port=29500)
    argv, env = multinode_launch_command(settings, hosts, gpus_per_node, leader_address, find_tritonserver())
    print(" ".join(argv), flush=True)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    sys.exit(_tools())
