"""Write docs/configuration.md: every YAML key and every command-line flag, read from the code.

The YAML keys come from the config dataclasses (their fields, defaults and the ``Attributes:``
sections of their docstrings); the flags from the real ``argparse`` parsers. So the reference
cannot drift: ``tests/test_readme.py`` fails when the file differs from what this writes.

    .venv/bin/python scripts/config_reference.py            # rewrite docs/configuration.md
    .venv/bin/python scripts/config_reference.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"

#: Environment variables the code reads: name -> (default, meaning). Checked against the source
#: by tests/test_readme.py, so a variable the code starts reading must be added here.
ENVIRONMENT = {
    "MIXERSNN_FASHION_MNIST": ("/usr/share/datasets/fashion-mnist",
                               "the folder holding the four Fashion-MNIST idx `.gz` files (Debian's "
                               "`dataset-fashion-mnist` puts them at the default); `fashion-mnist` shards are built "
                               "from it on first use"),
    "MIXERSNN_DATA": ("~/.cache/mixersnn/data", "where the embedded data set's shards are built and kept"),
    "MIXERSNN_CACHE": ("~/.cache/mixersnn", "compiled CPU kernels (`kernels/lif_cpu_<hash>.so`)"),
    "MIXERSNN_CPU_POOL_MB": ("2048", "the most idle memory the CPU kernels' buffer pool keeps (MB)"),
    "MIXERSNN_KEEP_HEAP": ("1", "0 leaves glibc's malloc at its defaults; else training on the CPU keeps "
                           "freed heap memory mapped (`keep_heap_pages`)"),
    "MLFLOW_TRACKING_URI": ("sqlite:///./mlflow.db", "the MLflow store when neither `--tracking-uri` nor "
                            "`tracking_uri:` is given"),
    "MLFLOW_EXPERIMENT_NAME": ("`mixersnn` (train), `mixersnn-search` (search)",
                               "the MLflow experiment when neither `--experiment` nor `experiment:` is given"),
    "RAY_ADDRESS": ("a new local Ray runtime", "the Ray cluster `train` and `search` join when `--address` is not "
                    "given (`ray job submit` sets it)"),
    "AWS_ENDPOINT_URL": ("AWS S3", "an S3-compatible store (MinIO, Ceph) for `s3://` data"),
    "AWS_ENDPOINT_URL_S3": ("`$AWS_ENDPOINT_URL`", "the same for S3 only (AWS's own variable); wins over it"),
    "FSSPEC_S3_ENDPOINT_URL": ("`$AWS_ENDPOINT_URL_S3`", "the same, fsspec's variable; wins over both"),
    "CXX": ("g++", "the C++ compiler that builds the CPU kernels"),
}


# --------------------------------------------------------------------------------- docstrings
def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style class docstring: name -> one-line text.
    ``a, b: text`` documents both names."""
    doc = cls.__doc__ or ""
    m = re.search(r"^(\s*)Attributes:\s*\n", doc, re.M)
    if not m:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent: Optional[int] = None
    for line in doc[m.end():].splitlines():
        if not line.strip():
            continue
        ind = len(line) - len(line.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            break
        item = re.match(r"([\w, ]+):\s*(.*)", line.strip()) if ind == indent else None
        if item:
            names = [n.strip() for n in item.group(1).split(",")]
            for n in names:
                out[n] = item.group(2).strip()
        else:
            for n in names:
                out[n] += " " + line.strip()
    return {k: _md(v) for k, v in out.items()}


def _md(text: str) -> str:
    """reST to Markdown for a table cell: ``x`` -> `x`, :class:`X` -> `X`; pipes and, outside
    code spans, ``<`` escaped (``<storage_path>`` is not an HTML tag)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`").replace("|", "\\|")
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("<", "\\<") for i, part in enumerate(parts))


def _default(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        v = f.default
        return "none" if v is None else f"`{str(v).lower() if isinstance(v, bool) else v}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        return f"`{v}`" if isinstance(v, (dict, list, tuple)) else "see below"
    return "required"


def field_table(cls: type, *, skip: tuple[str, ...] = (), prefix: str = "", default: Optional[str] = None,
                sections: tuple[str, ...] = ()) -> list[str]:
    """A Markdown table of a dataclass's fields: key, default (or ``default`` for every field),
    meaning; the fields in ``sections`` are described by a section of their own."""
    docs = attribute_docs(cls)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meaning = f"the [`{f.name}:` section](#{f.name}) below" if f.name in sections else docs.get(f.name, "")
        rows.append(f"| `{prefix}{f.name}` | {default or _default(f)} | {meaning} |")
    return rows


# ------------------------------------------------------------------------------------- flags
def _flag_rows(parser: argparse.ArgumentParser) -> Iterator[str]:
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help is argparse.SUPPRESS:
            continue
        if a.option_strings:
            names = ", ".join(a.option_strings)
            value = "" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}"
            flag = f"`{names}{value}`"
        else:
            flag = f"`{a.metavar or a.dest.upper()}`"
        parts = [a.help or ""]
        if a.choices:
            parts.append("one of " + ", ".join(f"`{c}`" for c in a.choices))
        if a.default not in (None, False, argparse.SUPPRESS) and "default" not in parts[0] and a.nargs != 0:
            parts.append(f"default: `{a.default}`")
        yield f"| {flag} | {_md('; '.join(p for p in parts if p))} |"


def _aliases(parser: argparse.ArgumentParser) -> Iterator[str]:
    from mixersnn.cli import DeprecatedAlias

    for a in parser._actions:
        if isinstance(a, DeprecatedAlias):
            yield f"`{', '.join(a.option_strings)}` (use `{a.new}`)"


def command_sections(root: argparse.ArgumentParser) -> list[str]:
    """A table of flags per command (and per action of ``data``), in the parser's order."""
    lines: list[str] = []
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    todo = [(f"mixersnn {name}", p) for name, p in sub.choices.items()]
    while todo:
        title, p = todo.pop(0)
        lines += ["", f"### `{title}`", "", p.description or "", "", "| flag | meaning |", "|---|---|",
                  *_flag_rows(p)]
        old = list(_aliases(p))
        if old:
            lines += ["", "Deprecated spellings, still accepted: " + ", ".join(old) + "."]
        for n in (a for a in p._actions if isinstance(a, argparse._SubParsersAction)):
            helps = {c.dest: c.help for c in n._choices_actions}
            for sp_name, sp in n.choices.items():
                sp.description = sp.description or helps.get(sp_name)
            todo[0:0] = [(f"{title} {name}", sp) for name, sp in n.choices.items()]
    return lines


# ------------------------------------------------------------------------------------ render
def render() -> str:
    """The whole of docs/configuration.md."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return "\n".join([*_header(), *_training_yaml(), *_search_yaml(), *_flags_and_environment()])


def _header() -> list[str]:
    return [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the config dataclasses and the command-line parsers;",
        "     do not edit by hand: run `.venv/bin/python scripts/config_reference.py` (a test checks it). -->",
        "",
        "Every YAML key and every flag. A value is taken from the first of: the flag, the YAML file, the",
        "environment variable where one is named, the default below. Flags are the YAML key with dashes",
        "(`time_budget_s` is `--time-budget-s`), except where a table says otherwise. Unknown keys are an error",
        "that lists the valid ones.",
        "",
        "- [Training YAML](#training-yaml-mixersnn-train---config): `train:`, `scale:`, `model_overrides:`",
        "- [Search YAML](#search-yaml-mixersnn-search---config): top level, `objective:`, `budget:`, `asha:`, "
        "`constraints:`, `select:`, `space:`, `baselines:`",
        "- [Command-line flags](#command-line-flags)",
        "- [Environment variables](#environment-variables)",
        "",
    ]


def _training_yaml() -> list[str]:
    from mixersnn.models.config import MixerSNNConfig, NeuronConfig
    from mixersnn.models.scale import ModelScale
    from trainers.config import ScaleConfig, TrainConfig

    return [
        "## Training YAML (`mixersnn train --config`)",
        "",
        "A file with a `train:` section and an optional `scale:` section (or the `train:` keys at the top",
        "level). Example: `configs/fashion_mnist_15min.yaml`.",
        "",
        "### `train:`",
        "",
        *field_table(TrainConfig),
        "",
        "### `train.model_overrides:`",
        "",
        "The architecture, over the `model`'s registry variant (`mixersnn models`); `img_size`, `in_chans`",
        "and `num_classes` default to the data's.",
        "",
        *field_table(MixerSNNConfig, default="the variant's", sections=("neuron",)),
        "",
        "### `neuron:`",
        "",
        "The spiking neuron, `train.model_overrides.neuron:` (the paper's LIF by default).",
        "",
        *field_table(NeuronConfig),
        "",
        "### `scale:`",
        "",
        "Ray resources, and the model's size as a family member of its architecture (`--scale`).",
        "",
        *field_table(ScaleConfig),
        *field_table(ModelScale)[2:],
        "",
    ]


def _search_yaml() -> list[str]:
    from search.config import (ARCH_KEYS, TRAIN_KEYS, Asha, Baseline, Budget, Constraints, Objective, OneShot,
                               ParamSpec, Prescreen, SearchConfig, Select)

    out = [
        "## Search YAML (`mixersnn search --config`)",
        "",
        "Example: `configs/search_fashion_mnist.yaml`. `train:` takes the training keys above (fixed for every",
        "trial; the per-trial time limit is `train.time_budget_s`, the whole search's `budget.time_budget_s`);",
        "`scale:` the `scale:` keys above, per trial.",
        "",
        "### Top level",
        "",
        *field_table(SearchConfig, skip=("shape",),
                     sections=("space", "objective", "budget", "asha", "constraints", "select", "baselines",
                               "oneshot", "prescreen")),
    ]
    for key, cls in (("objective", Objective), ("budget", Budget), ("asha", Asha), ("constraints", Constraints),
                     ("select", Select), ("oneshot", OneShot), ("prescreen", Prescreen)):
        out += ["", f"### `{key}:`", "", _md((cls.__doc__ or "").strip().splitlines()[0]), "",
                *field_table(cls, prefix=f"{key}.")]
    out += [
        "",
        "### `space:`",
        "",
        "One entry per searchable parameter: a constant (`T: 2`), a list of choices (`patch_size: [4, 7]`),",
        "or a range `{low, high[, step][, log]}`. Parameters left out take the defaults for the data's image",
        "size (`search.config.default_space`).",
        "",
        "Architecture: " + ", ".join(f"`{k}`" for k in ARCH_KEYS) + ". Training: "
        + ", ".join(f"`{k}`" for k in TRAIN_KEYS) + ".",
        "",
        *field_table(ParamSpec, skip=("name",)),
        "",
        "### `baselines:`",
        "",
        _md(" ".join((Baseline.__doc__ or "").split("Attributes:")[0].split())),
        "",
        *field_table(Baseline, prefix="- "),
        "",
    ]
    return out


def _flags_and_environment() -> list[str]:
    from mixersnn.cli import build_parser

    return [
        "## Command-line flags",
        "",
        "`mixersnn [--debug] COMMAND ...`; `--debug` shows the traceback of an error instead of its one line.",
        *command_sections(build_parser()),
        "",
        "## Environment variables",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
        *(f"| `{k}` | {d} | {m} |" for k, (d, m) in ENVIRONMENT.items()),
        "",
    ]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not current")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run .venv/bin/python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
