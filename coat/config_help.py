"""The config tree explained, from the help and bounds declared beside each field (`config.setting`).

`show` prints a resolved config as YAML a run would load, each field followed by its help and bounds as a
comment (`coat config show`); `reference` writes the defaults as the Markdown reference in docs/config.md, which
a test keeps equal to what this module generates.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields, is_dataclass
from typing import Any

import yaml

from coat.config import CoATConfig, MixtureEntry, StageConfig, SuiteRecipe, bounds_text

COMMENT_COLUMN = 48


def _flow(value: Any) -> str:
    """A value as one line of YAML (dataclasses as mappings)."""
    if is_dataclass(value):
        value = asdict(value)
    elif isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        plain = [(k, asdict(v) if is_dataclass(v) else v) for k, v in items]
        value = dict(plain) if isinstance(value, dict) else [v for _, v in plain]
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix(
        "...").strip()


def _explained(metadata) -> str:
    bounds = bounds_text(metadata)
    return metadata.get("help", "") + (f" [{bounds}]" if bounds else "")


def show(cfg: CoATConfig) -> str:
    """`cfg` as YAML, each field with its help and bounds as a comment; loads back to the same config."""
    lines: list[str] = []

    def walk(node: Any, depth: int) -> None:
        for f in fields(node):
            value, indent = getattr(node, f.name), "  " * depth
            if is_dataclass(value):
                lines.append(f"{indent}{f.name}:".ljust(COMMENT_COLUMN) + f"  # {_explained(f.metadata)}")
                walk(value, depth + 1)
            else:
                lines.append(f"{indent}{f.name}: {_flow(value)}".ljust(COMMENT_COLUMN)
                             + f"  # {_explained(f.metadata)}")

    walk(cfg, 0)
    return "\n".join(lines) + "\n"


def reference() -> str:
    """The Markdown configuration reference: every section of the defaults, a row per field."""
    out = ["# Configuration reference", "",
           "Generated from the config dataclasses (`coat/config.py`) by `coat config show --reference`; a test keeps "
           "it in sync. Set any field in a YAML file (`--config FILE`) or as a dotted override "
           "(`thinking.num_slots=8`, `train.stages.0.steps=40`); `coat config show [--config FILE] [overrides]` "
           "prints the resolved tree with this help beside each field. A value outside its bounds fails before "
           "anything runs, naming the field.", ""]

    def section(node: Any, prefix: str, title: str) -> None:
        out.extend([f"## `{prefix.rstrip('.')}`", "", title, "", "| field | type | default | bounds | help |",
                    "| --- | --- | --- | --- | --- |"])
        nested = []
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                nested.append((value, f"{prefix}{f.name}.", f.metadata.get("help", "")))
                continue
            cells = [f"`{prefix}{f.name}`", f"`{f.type}`", f"`{_flow(value)}`", bounds_text(f.metadata),
                     f.metadata.get("help", "")]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
        for value, path, title in nested:
            section(value, path, title)

    for f in fields(CoATConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        section(default, f"{f.name}.", f.metadata.get("help", ""))
    for entry, prefix in ((StageConfig(), "train.stages.<i>."), (MixtureEntry(), "data.mixture.<i>."),
                          (SuiteRecipe(), "eval.suites.<suite>.")):
        section(entry, prefix, (type(entry).__doc__ or "").split("\n\n")[0].replace("\n", " "))
    return "\n".join(out)
