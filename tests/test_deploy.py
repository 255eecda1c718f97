"""`gen-repo deploy`: the rendered files checked against published schemas and parsed like their tools would.

- compose.yaml: the Compose specification's JSON schema (vendored by check-jsonschema);
- Kubernetes Deployment / Service: kubernetes-validate's strict schemas;
- LeaderWorkerSet (a CRD): its pod templates as core/v1 PodTemplateSpec (wrapped in a PodTemplate), its own
  fields against the explicit schema below (from LWS's leaderworkerset.x-k8s.io/v1 API reference);
- Dockerfile: its instructions, line by line.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from kubernetes_validate import utils as kubernetes_validate

from generator.build.trtllm import TRTLLM_CONTAINER
from generator.cli import main, serve_command
from generator.errors import ConfigError, GenRepoError
from generator.serving.deploy import (
    DeploySettings,
    _tools,
    lws_hosts,
    multinode_launch_command,
    render_deploy,
)
from generator.serving.serve import ServeSettings, TritonInstall

KUBERNETES_VERSION = "1.33.0"

LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None", "Default"]},
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                    },
                },
                "networkConfig": {"type": "object"},
                "rolloutStrategy": {"type": "object"},
            },
        },
    },
}


def make_job(root: Path, world_size: int) -> Path:
    """A job output dir (engine/, tokenizer/, triton_repo/) with the config files deploy reads; no weights."""
    engine, tokenizer = root / "engine", root / "tokenizer"
    engine.mkdir(parents=True)
    tokenizer.mkdir()
    (engine / "config.json").write_text(json.dumps({
        "version": "1.2.1", "build_config": {"max_batch_size": 8},
        "pretrained_config": {"architecture": "DbrxForCausalLM", "dtype": "bfloat16",
                              "mapping": {"world_size": world_size, "tp_size": world_size, "pp_size": 1}}}))
    for model, key, value in (("tensorrt_llm", "gpt_model_path", engine),
                              ("preprocessing", "tokenizer_dir", tokenizer)):
        (root / "triton_repo" / model).mkdir(parents=True)
        (root / "triton_repo" / model / "config.pbtxt").write_text(
            f'name: "{model}"\nbackend: "python"\nmax_batch_size: 8\n'
            f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n')
    return root / "triton_repo"


def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def validate_kubernetes(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def validate_pod_template(template: dict[str, Any]) -> None:
    """A PodTemplateSpec, checked as the `template` of a core/v1 PodTemplate."""
    validate_kubernetes({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                         "template": template})


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, "dangling line continuation"
    return instructions


def serve_args(repository: Path) -> list[str]:
    return ["serve", "--model-repository", str(repository), "--host", "0.0.0.0", "--http-port", "8000",
            "--grpc-port", "8001", "--metrics-port", "8002"]


@pytest.mark.parametrize("world_size", [1, 4])
def test_single_node(tmp_path: Path, world_size: int) -> None:
    repository = make_job(tmp_path / "job", world_size)
    written = render_deploy(DeploySettings(model_repository=repository, output_dir=tmp_path / "out",
                                           image="registry.example/llm:1", name="mpt"))
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "Dockerfile", "README.md", "compose.yaml", "k8s/deployment.yaml"]
    data_root = str((tmp_path / "job").resolve())

    compose = yaml.safe_load((out / "compose.yaml").read_text())
    jsonschema.Draft202012Validator(compose_schema()).validate(compose)
    service = compose["services"]["triton"]
    assert service["image"] == "registry.example/llm:1"
    assert service["command"] == serve_args(repository.resolve())
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": world_size, "capabilities": ["gpu"]}]
    assert service["ports"] == ["8000:8000", "8001:8001", "8002:8002"]
    assert service["volumes"] == [{"type": "bind", "source": data_root, "target": data_root, "read_only": True}]
    assert "/v2/health/ready" in service["healthcheck"]["test"][-1]
    # the command is one the real CLI accepts
    serve_command.make_context("serve", service["command"][1:])

    deployment, k8s_service = yaml.safe_load_all((out / "k8s" / "deployment.yaml").read_text())
    validate_kubernetes(deployment)
    validate_kubernetes(k8s_service)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": str(world_size)}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["args"] == serve_args(repository.resolve())
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "models", "mountPath": data_root, "readOnly": True} in container["volumeMounts"]
    assert deployment["spec"]["selector"]["matchLabels"] == k8s_service["spec"]["selector"]
    assert [p["port"] for p in k8s_service["spec"]["ports"]] == [8000, 8001, 8002]


def test_dockerfile(tmp_path: Path) -> None:
    repository = make_job(tmp_path / "job", 2)
    render_deploy(DeploySettings(model_repository=repository, output_dir=tmp_path / "out"))
    instructions = dockerfile_instructions((tmp_path / "out" / "Dockerfile").read_text())
    keywords = [keyword for keyword, _ in instructions]
    assert keywords[0] == "FROM" and instructions[0][1] == TRTLLM_CONTAINER
    assert instructions[0][1] == "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
    args = dict(instructions)
    assert args["COPY"] == "gen-repo /opt/gen-repo"
    assert any(keyword == "RUN" and "pip install --no-cache-dir /opt/gen-repo tiktoken" in arguments
               for keyword, arguments in instructions)
    assert args["EXPOSE"].split() == ["8000", "8001", "8002"]
    assert json.loads(args["ENTRYPOINT"]) == ["gen-repo"]
    assert json.loads(args["CMD"]) == serve_args(repository.resolve())
    health = args["HEALTHCHECK"]
    assert health.startswith("--interval=") and "/v2/health/ready" in health
    assert json.loads(health[health.index("CMD ") + 4:])[0] == "python3"
    assert keywords.index("FROM") < keywords.index("COPY") < keywords.index("CMD")
    # the build context holds what `pip install` needs, without byte code
    context = tmp_path / "out" / "gen-repo"
    assert (context / "pyproject.toml").is_file() and (context / "generator" / "serving" / "deploy.py").is_file()
    assert (context / "templates").is_dir()
    assert not list(context.rglob("__pycache__"))


def test_multi_node_leaderworkerset(tmp_path: Path) -> None:
    repository = make_job(tmp_path / "job", 8)
    written = render_deploy(DeploySettings(model_repository=repository, output_dir=tmp_path / "out",
                                           gpus_per_node=4, name="dbrx"))
    assert sorted(p.name for p in written) == ["Dockerfile", "README.md", "leaderworkerset.yaml"]
    lws, service = yaml.safe_load_all((tmp_path / "out" / "k8s" / "leaderworkerset.yaml").read_text())
    jsonschema.Draft202012Validator(LWS_SCHEMA).validate(lws)
    validate_kubernetes(service)
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2
    for role in ("leaderTemplate", "workerTemplate"):
        validate_pod_template(group[role])
        (container,) = group[role]["spec"]["containers"]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in group[role]["spec"]["volumes"]
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    assert leader["command"][:4] == ["python3", "-m", "generator.serving.deploy", "lws-leader"]
    # the leader's command is one the module's CLI accepts
    context = _tools.commands["lws-leader"].make_context("lws-leader", leader["command"][4:])
    assert (context.params["nodes"], context.params["gpus_per_node"]) == (2, 4)
    assert leader["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    assert worker["command"][:2] == ["/usr/sbin/sshd", "-D"]
    assert service["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": "dbrx", "role": "leader"}


def test_leader_mpirun_spans_the_pods() -> None:
    hosts = lws_hosts("dbrx-0.dbrx.default", 2)
    assert hosts == ["dbrx-0.dbrx.default", "dbrx-0-1.dbrx.default"]
    install = TritonInstall(binary=Path("/opt/tritonserver/bin/tritonserver"), backend_directory=None)
    settings = ServeSettings(model_repository=Path("/models/triton_repo"), host="0.0.0.0", world_size=8,
                             cpu_only=False, oversubscribe=False, master_port=29500)
    argv, _ = multinode_launch_command(settings, ["dbrx-0", *hosts[1:]], 4, hosts[0], install)
    assert argv[1:7] == ["--allow-run-as-root", "--host", "dbrx-0:4,dbrx-0-1.dbrx.default:4",
                         "--mca", "plm_rsh_args",
                         "-p 2222 -i /etc/gen-repo-ssh/id_ed25519 -o StrictHostKeyChecking=no "
                         "-o UserKnownHostsFile=/dev/null"]
    assert "MASTER_ADDR=dbrx-0.dbrx.default" in argv and "MASTER_ADDR=127.0.0.1" not in argv
    assert argv.count("/opt/tritonserver/bin/tritonserver") == 8
    assert argv.count("--load-model=tensorrt_llm") == 7


@pytest.mark.parametrize("overrides, error, message", [
    ({"nodes": 3}, ConfigError, "3 node"),
    ({"gpus_per_node": 3}, ConfigError, "GPU"),
    ({"name": "Bad_Name"}, ConfigError, "DNS label"),
])
def test_rejects_bad_shapes(tmp_path: Path, overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    repository = make_job(tmp_path / "job", 8)
    with pytest.raises(error, match=message):
        render_deploy(DeploySettings(model_repository=repository, output_dir=tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_rejects_a_dir_that_is_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(GenRepoError, match="not a gen-repo Triton repository"):
        render_deploy(DeploySettings(model_repository=tmp_path, output_dir=tmp_path / "out"))


def test_cli(tmp_path: Path) -> None:
    repository = make_job(tmp_path / "job", 2)
    result = CliRunner().invoke(main, ["deploy", "--model-repository", str(repository), "--output",
                                       str(tmp_path / "out"), "--image", "me/llm:2", "--name", "mpt7b",
                                       "--base-image", "nvcr.io/nvidia/tritonserver:26.03-trtllm-python-py3"])
    assert result.exit_code == 0, result.output
    assert dockerfile_instructions((tmp_path / "out" / "Dockerfile").read_text())[0] == (
        "FROM", "nvcr.io/nvidia/tritonserver:26.03-trtllm-python-py3")
    assert f"wrote {tmp_path / 'out' / 'compose.yaml'}" in result.output
    assert yaml.safe_load((tmp_path / "out" / "compose.yaml").read_text())["name"] == "mpt7b"
    result = CliRunner().invoke(main, ["deploy", "--model-repository", str(repository), "--output",
                                       str(tmp_path / "out2"), "--nodes", "4"])
    assert result.exit_code == 2
    assert "4 node(s) x 1 GPU(s) per node" in result.output


def test_real_repository(tiny_mpt_job: Any, tmp_path: Path) -> None:
    """A repository rendered by the whole job: the mount covers the engine and tokenizer dirs it names."""
    render_deploy(DeploySettings(model_repository=tiny_mpt_job.triton_repo, output_dir=tmp_path / "out"))
    compose = yaml.safe_load((tmp_path / "out" / "compose.yaml").read_text())
    jsonschema.Draft202012Validator(compose_schema()).validate(compose)
    service = compose["services"]["triton"]
    assert service["volumes"][0]["source"] == str(tiny_mpt_job.output_dir)
    for path in (tiny_mpt_job.engine_dir, tiny_mpt_job.tokenizer_dir, tiny_mpt_job.triton_repo):
        assert Path(path).resolve().is_relative_to(service["volumes"][0]["target"])
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert service["command"] == serve_args(Path(tiny_mpt_job.triton_repo).resolve())


def test_lws_leader_waits_for_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["lws-leader", "--model-repository", "/models/triton_repo", "--nodes", "2", "--gpus-per-node", "4",
            "--wait-timeout", "0"]
    monkeypatch.delenv("LWS_LEADER_ADDRESS", raising=False)
    result = CliRunner().invoke(_tools, args)
    assert result.exit_code == 1 and "LWS_LEADER_ADDRESS is not set" in result.output
    monkeypatch.setenv("LWS_LEADER_ADDRESS", "gen-repo-0.gen-repo.invalid")
    result = CliRunner().invoke(_tools, args)
    assert result.exit_code == 1
    assert "gen-repo-0-1.gen-repo.invalid:2222 did not answer" in result.output
