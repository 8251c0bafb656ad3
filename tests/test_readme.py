"""The README and docs/ say only true things about the command line: every ``mixersnn``
command line in them parses with the real parser, every ``--flag`` they name exists, the
generated configuration reference is current, and the first screen gets a newcomer to the main
job. Parse only: nothing here trains."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAIN_COMMAND = "bash scripts/setup.sh && .venv/bin/mixersnn search --config configs/search_fashion_mnist.yaml"
TEST_COMMAND = "bash scripts/setup.sh --tests && .venv/bin/python -m pytest -q"

#: Flags the docs name that belong to other programs, and where each is defined.
OTHER_FLAGS = {
    "--backend-store-uri": "mlflow ui", "--host": "mlflow ui", "--port": "mlflow ui",
    "--generate": "ray get-auth-token", "--working-dir": "ray job submit",
}


def _config_reference():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _code_lines(path: Path) -> Iterator[str]:
    """The lines of a Markdown file's code blocks (indented or fenced), continuations joined."""
    fenced, buf = False, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^( {4,})(\S.*)$", line)
        if not (fenced or m):
            buf = ""
            continue
        code = line.strip() if fenced else m.group(2)  # type: ignore[union-attr]
        code = code.split("  #", 1)[0].rstrip()  # a trailing comment
        buf = f"{buf} {code.rstrip(chr(92)).strip()}" if buf else code.rstrip(chr(92)).strip()
        if code.endswith("\\"):
            continue
        if buf and not buf.startswith("#"):
            yield buf
        buf = ""


def _mixersnn_argvs(path: Path) -> Iterator[list[str]]:
    """Each ``mixersnn ...`` invocation in a file's code blocks (also after ``ray job submit --``)."""
    for line in _code_lines(path):
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                tokens = shlex.split(part)
            except ValueError:
                continue
            for i, tok in enumerate(tokens):
                if tok.rsplit("/", 1)[-1] == "mixersnn" and (i == 0 or tokens[i - 1] in ("--",) or "=" in tokens[0]):
                    yield tokens[i + 1:]
                    break


def _all_argvs() -> list[tuple[str, list[str]]]:
    return [(p.name, argv) for p in [README, *DOCS] for argv in _mixersnn_argvs(p)]


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _parsers(sub)


def _known_flags() -> set[str]:
    from mixersnn.cli import build_parser

    return {s for p in _parsers(build_parser()) for a in p._actions for s in a.option_strings}


def test_every_mixersnn_command_line_in_the_docs_parses() -> None:
    from mixersnn.cli import COMMANDS, build_parser

    parser = build_parser()
    argvs = _all_argvs()
    assert len(argvs) >= 25, f"found only {len(argvs)} command lines: the extractor is broken"
    assert {argv[0] for _, argv in argvs} >= set(COMMANDS), "a command the README never shows"
    for where, argv in argvs:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            if e.code == 0 and "--help" in argv:  # `mixersnn train --help` prints and exits 0
                continue
            raise AssertionError(f"{where}: `mixersnn {' '.join(argv)}` does not parse (exit {e.code})") from None
        for flag, value in zip(argv, argv[1:]):
            if flag == "--config" and value.startswith("configs/"):
                assert (ROOT / value).is_file(), f"{where}: `mixersnn {' '.join(argv)}`: no {value}"


def test_the_command_lines_in_the_configs_comments_parse() -> None:
    """The configs' headers show how to run them: those lines parse too (``[...]`` is optional)."""
    from mixersnn.cli import build_parser

    parser = build_parser()
    seen = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            code = re.sub(r"\[[^\]]*\]", "", line.lstrip("# ").split("  #", 1)[0]).rstrip(" \\")
            tokens = shlex.split(code) if re.match(r"(\.venv/bin/)?mixersnn ", code) else []
            if tokens:
                seen += 1
                try:
                    parser.parse_args(tokens[1:])
                except SystemExit:
                    raise AssertionError(f"{path.name}: `{code}` does not parse") from None
    assert seen >= 5


def test_the_extractor_catches_a_flag_that_does_not_exist(tmp_path: Path) -> None:
    from mixersnn.cli import build_parser

    doc = tmp_path / "x.md"
    doc.write_text("Text.\n\n    .venv/bin/mixersnn train --epochs 2 \\\n        --no-such-flag 3\n")
    (argv,) = list(_mixersnn_argvs(doc))
    assert argv == ["train", "--epochs", "2", "--no-such-flag", "3"]
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(argv)


def test_every_flag_the_docs_name_exists() -> None:
    """Each ``--flag`` is a mixersnn flag, a flag of one of the repository's scripts (benchmarks/,
    scripts/; found in its source), or one of the few other programs' in OTHER_FLAGS."""
    known = _known_flags()
    scripts = [p for d in ("benchmarks", "scripts") for p in (ROOT / d).iterdir() if p.suffix in (".py", ".sh")]
    script_text = "\n".join(p.read_text() for p in scripts)
    for path in [README, *DOCS]:
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", path.read_text()))):
            if flag in known or re.search(rf"""["']{re.escape(flag)}["'=)]|{re.escape(flag)}\)""", script_text):
                continue
            where = OTHER_FLAGS.get(flag)
            assert where, f"{path.name} names {flag}, which no mixersnn command or repository script takes"
            if (ROOT / where).is_file():
                assert flag in (ROOT / where).read_text(), f"{path.name}: {flag} is not in {where}"


def test_the_docs_use_no_deprecated_spelling() -> None:
    from mixersnn.cli import DeprecatedAlias, build_parser

    old = {s for p in _parsers(build_parser()) for a in p._actions if isinstance(a, DeprecatedAlias)
           for s in a.option_strings}
    assert old >= {"--time-budget", "--workers"}
    for path in (README, *[p for p in DOCS if p.name != "configuration.md"]):
        for argv in _mixersnn_argvs(path):
            assert not (argv[0] == "data" and "--workers" in argv), f"{path.name}: `mixersnn {' '.join(argv)}`"
            assert "--time-budget" not in argv, f"{path.name}: `mixersnn {' '.join(argv)}` (use --time-budget-s)"


def test_the_configuration_reference_is_current() -> None:
    ref = _config_reference()
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == ref.render(), "docs/configuration.md is stale: run .venv/bin/python scripts/config_reference.py"


def test_the_configuration_reference_covers_every_key_and_flag() -> None:
    import dataclasses

    from search.config import Asha, Budget, Constraints, Objective, SearchConfig, Select
    from trainers.config import ScaleConfig, TrainConfig

    text = (ROOT / "docs" / "configuration.md").read_text()
    for cls in (TrainConfig, ScaleConfig, SearchConfig):
        for f in dataclasses.fields(cls):
            if f.name != "shape":
                assert f"| `{f.name}` |" in text, f"{cls.__name__}.{f.name} is missing"
    for key, cls in (("objective", Objective), ("budget", Budget), ("asha", Asha), ("constraints", Constraints),
                     ("select", Select)):
        for f in dataclasses.fields(cls):
            assert f"| `{key}.{f.name}` |" in text, f"{key}.{f.name} is missing"
    for flag in _known_flags() - {"-h", "--help", "--version", "--debug"}:
        assert f"`{flag}" in text or f", {flag}" in text, f"{flag} is missing"
    ref = _config_reference()
    for cls in (TrainConfig, ScaleConfig, SearchConfig):  # every field documented in its docstring
        docs = ref.attribute_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs and f.name != "shape"]
        assert not missing, f"{cls.__name__} documents no {missing} in its Attributes: section"


def test_the_environment_variables_the_code_reads_are_documented() -> None:
    ref = _config_reference()
    internal = {"RANK", "WORLD_SIZE", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"}
    pattern = re.compile(r"""environ(?:\.get)?[(\[]\s*["']([A-Z][A-Z0-9_]+)["']|_ENV\s*=\s*["']([A-Z][A-Z0-9_]+)["']""")
    read = set()
    for pkg in ("mixersnn", "trainers", "search"):
        for py in (ROOT / pkg).rglob("*.py"):
            for m in pattern.finditer(py.read_text()):
                read.add(m.group(1) or m.group(2))
    read = {v for v in read if v not in internal and not v.startswith("MIXERSNN_TEST_")}
    assert read <= set(ref.ENVIRONMENT), f"undocumented in scripts/config_reference.py: {sorted(read - set(ref.ENVIRONMENT))}"
    readme = README.read_text()
    for var in ("MIXERSNN_FASHION_MNIST", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        assert f"`{var}`" in readme


def test_the_first_screen_gets_a_newcomer_to_the_main_job() -> None:
    lines = README.read_text().splitlines()
    first = "\n".join(lines[:40])
    assert f"    {MAIN_COMMAND}" in first.splitlines()
    assert f"    {TEST_COMMAND}" in first.splitlines()
    assert "](docs/pareto_front.png)" in first
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [TEST_COMMAND], ".ci/run must run exactly the README's test command"


def test_the_pareto_image_and_every_relative_link_exist() -> None:
    image = ROOT / "docs" / "pareto_front.png"
    assert image.is_file() and image.stat().st_size < 200_000
    for path in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_readme_sections_come_in_the_order_a_user_meets_them() -> None:
    heads = [h for h in re.findall(r"^## (.+)$", README.read_text(), flags=re.M)]
    order = ["Run it", "What you get", "Train", "Search", "Review", "Retrain and grow a found model", "Scaling",
             "Configuration", "When something goes wrong"]
    assert [h for h in heads if h in order] == order, heads
