"""cluster.yaml and the README's Scaling commands: valid for Ray, and only things that exist.

* The cluster config goes through Ray's own ``prepare_config`` + ``validate_config`` (the
  autoscaler's JSON schema, what ``ray up`` runs first), and its AWS ``node_config`` keys and
  instance types through botocore's EC2 ``RunInstances`` model, so a typo fails here, not
  twenty minutes into ``ray up``.
* Every command the YAML runs and every command shown in the README's Scaling section is
  parsed by the real parser of the program it calls: ``mixersnn`` subcommands and flags by
  mixersnn's argparse parser, ``ray`` subcommands and flags by Ray's click CLI, ``mlflow
  server`` flags by MLflow's, and ``pip install`` extras against pyproject.toml.
* The dashboard binds to 127.0.0.1, the MLflow server to loopback or (stated) the head's
  private address, and every ``ray start`` uses token authentication.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
COMMAND_KEYS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def _segments(command: str) -> Iterator[tuple[dict[str, str], list[str]]]:
    """Simple commands of a shell line as ``(env assignments, argv)``; redirections dropped.

    Enough shell for the lines we write: ``;``, ``&&``, ``||``, ``|``, ``&``, sub-shells and
    redirections split or end a command; quotes are respected.
    """
    lex = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>")
    lex.whitespace_split = True
    seg: list[str] = []
    for tok in list(lex) + [";"]:
        if tok in _SEPARATORS:
            yield from _one(seg)
            seg = []
        else:
            seg.append(tok)


def _one(seg: list[str]) -> Iterator[tuple[dict[str, str], list[str]]]:
    for i, t in enumerate(seg):
        if t[0] in "<>" or t.startswith("&>"):
            # `2>&1` arrives as "2", ">&", "1" (the fd is not an argument); `--workers 2 > log`
            # keeps its "2" (shlex drops the spacing, so only the ">&" form is treated as an fd).
            seg = seg[: i - 1] if t in (">&", "<&") and i > 0 and seg[i - 1].isdigit() else seg[:i]
            break
    env: dict[str, str] = {}
    while seg and _ENV.match(seg[0]):
        k, v = seg.pop(0).split("=", 1)
        env[k] = v
    while seg and seg[0] in ("nohup", "sudo", "exec"):
        seg.pop(0)
    if seg:
        yield env, seg


def _yaml_commands(config: dict[str, Any]) -> list[tuple[str, dict[str, str], list[str]]]:
    out = []
    for key in COMMAND_KEYS:
        for line in config.get(key) or []:
            for env, argv in _segments(line):
                out.append((key, env, argv))
    return out


def _program(token: str) -> str:
    """``~/venv/bin/pip`` -> ``pip``."""
    return token.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- real parsers


def check_mixersnn(argv: list[str]) -> None:
    """Parse ``mixersnn ...`` with mixersnn's own parser (nothing runs); config files must exist."""
    from mixersnn.cli import COMMANDS, _build_parser

    assert argv and argv[0] in COMMANDS, f"`mixersnn {' '.join(argv)}`: {argv[:1]} is not one of {sorted(COMMANDS)}"
    try:
        _build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"`mixersnn {' '.join(argv)}` does not parse (exit {e.code})") from None
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" and value.startswith("configs/"):  # others are the user's own copies
            assert (ROOT / value).is_file(), f"`mixersnn {' '.join(argv)}`: {value} is not in the repository"


def check_ray(argv: list[str]) -> None:
    """Parse ``ray ...`` with Ray's click CLI, descending into groups (``ray job submit``)."""
    import click
    from ray.scripts.scripts import cli

    cmd: Any = cli
    args = list(argv)
    path = ["ray"]
    while isinstance(cmd, click.Group):
        assert args, f"`{' '.join(path)}` needs a subcommand"
        name = args.pop(0)
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"`{' '.join(path)} {name}`: no such subcommand ({sorted(cmd.list_commands(click.Context(cmd)))})"
        path.append(name)
        cmd = sub
    try:
        cmd.make_context(" ".join(path), list(args))
    except click.ClickException as e:
        raise AssertionError(f"`{' '.join(path)} {' '.join(args)}`: {e.format_message()}") from None
    if path[1:] == ["job", "submit"] and "--" in args:
        entry = args[args.index("--") + 1 :]
        if entry and _program(entry[0]) == "mixersnn":
            check_mixersnn(entry[1:])


def check_mlflow_server(argv: list[str]) -> Any:
    """Parse ``mlflow server ...`` with MLflow's click CLI; returns the parsed params."""
    import click
    from mlflow.cli import cli

    assert argv[:1] == ["server"], f"only `mlflow server` is expected here, got {argv}"
    server = cli.get_command(click.Context(cli), "server")
    try:
        return server.make_context("mlflow server", argv[1:]).params
    except click.ClickException as e:
        raise AssertionError(f"`mlflow {' '.join(argv)}`: {e.format_message()}") from None


def _extras() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("needs Python 3.11's tomllib")
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_pip(argv: list[str]) -> None:
    """``pip install`` lines: our extras must exist; the Ray pin must be the Ray under test."""
    import ray

    reqs = [a for a in argv[2:] if not a.startswith("-") and "://" not in a]
    for req in reqs:
        m = re.match(r"^(?P<name>[^\[=<>!~]+)(\[(?P<extras>[^\]]*)\])?(?P<spec>.*)$", req)
        assert m, req
        name, extras = m["name"], {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
        if name.rstrip("/").endswith("mixersnn"):
            assert extras <= _extras(), f"`pip install {req}`: extras {sorted(extras - _extras())} are not in pyproject.toml"
        if name == "ray" and m["spec"]:
            assert m["spec"] == f"=={ray.__version__}", (
                f"cluster nodes install {req} but the project is tested with ray {ray.__version__}; keep them equal"
            )
            assert {"default", "tune", "train"} <= extras, f"{req}: the project needs ray[default,tune,train]"


# ----------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_autoscaler_schema(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # fills Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    # A typo in a key is an error, not a silently ignored setting.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_8x"]["max_worker"] = broken["available_node_types"]["gpu_8x"].pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_node_types_and_aws_node_configs(config: dict[str, Any]) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types and any(t["resources"]["GPU"] == 8 for t in gpu_types.values()), "an 8-GPU node type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
        assert "IamInstanceProfile" in t["node_config"], f"{name}: workers read shards from S3 with an instance profile"
    botocore = pytest.importorskip("botocore.session")
    ec2 = botocore.get_session().get_service_model("ec2")
    run = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    for name, t in types.items():
        nc = t["node_config"]
        unknown = set(nc) - set(run.members)
        assert not unknown, f"{name}: node_config keys {sorted(unknown)} are not RunInstances parameters"
        assert nc["InstanceType"] in instance_types, f"{name}: {nc['InstanceType']} is not an EC2 instance type"


def test_placeholders_are_marked_and_listed(config: dict[str, Any]) -> None:
    text = CLUSTER.read_text()
    header = text.split("cluster_name:", 1)[0]
    for token in sorted(set(re.findall(r"REPLACE_[A-Z_]+", text.split("cluster_name:", 1)[1]))):
        assert f"#   {token}" in header, f"{token} is used but not explained in the header's REPLACE list"
    for name, t in config["available_node_types"].items():
        assert t["node_config"]["ImageId"] == "REPLACE_AMI_ID", f"{name}: the AMI is a placeholder, marked as such"


def check_command(argv: list[str]) -> Optional[str]:
    """Check one command line with its program's own parser (or, for ``bash FILE``, that the
    file exists); the program's name when it was checked, else None."""
    prog = _program(argv[0])
    if prog == "mixersnn":
        check_mixersnn(argv[1:])
    elif prog == "ray":
        check_ray(argv[1:])
    elif prog == "mlflow":
        check_mlflow_server(argv[1:])
    elif prog == "pip" and argv[1:2] == ["install"]:
        check_pip(argv)
    elif prog == "bash":
        assert (ROOT / argv[1]).is_file(), argv
    else:
        return None
    return prog


def test_every_command_names_real_subcommands_flags_and_extras(config: dict[str, Any]) -> None:
    seen = {check_command(argv) for _, _, argv in _yaml_commands(config)}
    assert {"ray", "pip", "mlflow"} <= seen
    # The project is installed with its GPU extra on every node.
    installs = " ".join(" ".join(a) for k, _, a in _yaml_commands(config) if k == "setup_commands")
    assert re.search(r"mixersnn\[[^\]]*\bgpu\b", installs), "setup_commands must install mixersnn[gpu]"
    # The synced checkout is what gets installed.
    assert config["file_mounts"]["~/mixersnn"] == "."


def test_dashboard_on_loopback_token_auth_and_mlflow_placement(config: dict[str, Any]) -> None:
    text = CLUSTER.read_text()
    assert "0.0.0.0" not in text, "nothing binds to every interface"
    starts = [(k, env, a) for k, env, a in _yaml_commands(config) if _program(a[0]) == "ray" and a[1:2] == ["start"]]
    assert {k for k, _, _ in starts} == {"head_start_ray_commands", "worker_start_ray_commands"}
    for key, env, argv in starts:
        assert env.get("RAY_AUTH_MODE") == "token", f"{key}: `ray start` without RAY_AUTH_MODE=token"
        if "--head" in argv:
            assert "--dashboard-host=127.0.0.1" in argv, "the dashboard binds to loopback (use `ray dashboard`)"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "every node gets the token"
    servers = [a for _, _, a in _yaml_commands(config) if _program(a[0]) == "mlflow"]
    assert len(servers) == 1
    params = check_mlflow_server(servers[0][1:])
    if params["host"] != "127.0.0.1":
        # Not loopback: must be the head's private address, and the file must say why.
        assert params["host"] == "$MIXERSNN_HEAD_IP", params["host"]
        assert "private address" in text and "security group" in text
    assert str(params["artifacts_destination"]).startswith("s3://"), "artefacts proxied to shared storage"
    assert int(params["workers"]) <= 2


# ----------------------------------------------------------------------------- README


def _readme_scaling_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Scaling\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, "README.md has no '## Scaling' section"
    lines, cmds = m.group(1).splitlines(), []
    buf = ""
    for line in lines:
        if not line.startswith("    "):
            buf = ""
            continue
        code = line[4:]
        buf = buf + " " + code.rstrip("\\").strip() if buf else code.rstrip("\\").strip()
        if code.rstrip().endswith("\\"):
            continue
        if buf and not buf.startswith("#"):
            cmds.append(buf)
        buf = ""
    return [argv for c in cmds for _, argv in _segments(c)]


def test_readme_scaling_commands_are_real() -> None:
    checked = {check_command(argv) for argv in _readme_scaling_commands()}
    assert {"mixersnn", "ray"} <= checked, checked


def test_readme_cluster_search_uses_the_gpu_cluster_config() -> None:
    """The search job the README submits runs the search config written for cluster.yaml, and
    that config's paths are the ones cluster.yaml sets up (EFS mount, MLflow port on the head)."""
    searches = [a for a in _readme_scaling_commands() if _program(a[0]) == "ray" and a[1:3] == ["job", "submit"]
                and "search" in a[a.index("--") + 2 : a.index("--") + 3]]
    assert searches, "the README submits no search job to the cluster"
    for argv in searches:
        entry = argv[argv.index("--") + 1 :]
        assert entry[entry.index("--config") + 1] == "configs/search_gpu_cluster.yaml", entry
    search = yaml.safe_load((ROOT / "configs" / "search_gpu_cluster.yaml").read_text())
    text = CLUSTER.read_text()
    assert search["storage_path"].startswith("/mnt/shared/") and "/mnt/shared" in text
    port = re.search(r"mlflow server .*?--port (\d+)", text, flags=re.S)
    assert port and search["tracking_uri"].endswith(f":{port.group(1)}")
    assert search["scale"]["use_gpu"] is True and 0 < search["scale"]["gpus_per_worker"] < 1


def test_the_shell_splitter_understands_our_lines() -> None:
    line = "ulimit -n 65536; RAY_AUTH_MODE=token ray start --head --port=6379 2>&1 > log && nohup mlflow server -w 2 > x &"
    got = list(_segments(line))
    assert got == [
        ({}, ["ulimit", "-n", "65536"]),
        ({"RAY_AUTH_MODE": "token"}, ["ray", "start", "--head", "--port=6379"]),
        ({}, ["mlflow", "server", "-w", "2"]),
    ]
    with pytest.raises(AssertionError, match="does not parse"):
        check_mixersnn(["train", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no such subcommand"):
        check_ray(["upp", "cluster.yaml"])
    with pytest.raises(AssertionError, match="no-such-option"):
        check_ray(["start", "--head", "--no-such-option"])
    assert sys.version_info >= (3, 10)
