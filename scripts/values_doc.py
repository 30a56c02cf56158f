"""Generate the values table of docs/chart.md from the chart's values.yaml.

Each key in values.yaml carries a `# --` comment (helm-docs' convention); the comment lines
right above a key, starting at `# --`, are its description. A key without one must be a
mapping whose keys all have one. The table sits between two markers in docs/chart.md.

    python scripts/values_doc.py          # rewrite the table
    python scripts/values_doc.py --check  # exit 1 if the table is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "charts/bloomrun-operator/values.yaml"
DOC = ROOT / "docs/chart.md"
START, END = "<!-- values:start -->", "<!-- values:end -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")


@dataclass(frozen=True)
class ValueDoc:
    path: str
    default: object
    description: str


def parse_values(text: str) -> list[ValueDoc]:
    """Every documented key of a values file, in file order, with its default."""
    values = yaml.safe_load(text) or {}
    docs: list[ValueDoc] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    comment: list[str] | None = None  # the `# --` block being read, if any
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped[1:].strip())
            continue
        match = KEY_LINE.match(line)
        if not match or stripped.startswith("-"):
            comment = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [key for _, key in stack] + [match["key"]]
        # Keys inside an already documented value (e.g. resources.requests) are its default.
        if not any(doc.path == ".".join(path[:n]) for doc in docs for n in range(1, len(path))):
            if comment is not None:
                docs.append(ValueDoc(".".join(path), _lookup(values, path), " ".join(comment)))
        stack.append((indent, match["key"]))
        comment = None
    return docs


def undocumented_keys(text: str) -> list[str]:
    """Keys that neither have a description nor lie inside a documented key."""
    documented = {doc.path for doc in parse_values(text)}
    missing: list[str] = []

    def walk(node: object, prefix: str) -> None:
        if prefix in documented:
            return
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(child, f"{prefix}.{key}" if prefix else str(key))
        else:
            missing.append(prefix)

    walk(yaml.safe_load(text) or {}, "")
    return missing


def render_table(docs: list[ValueDoc]) -> str:
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for doc in docs:
        default = _escape(json.dumps(doc.default, separators=(", ", ": ")))
        rows.append(f"| `{doc.path}` | `{default}` | {_escape(doc.description)} |")
    return "\n".join(rows)


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def updated_doc(doc_text: str, table: str) -> str:
    if START not in doc_text or END not in doc_text:
        raise ValueError(f"{DOC} must contain the markers {START} and {END}")
    head, rest = doc_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def _lookup(values: dict, path: list[str]) -> object:
    node: object = values
    for key in path:
        node = node[key]  # type: ignore[index]
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/chart.md is stale")
    args = parser.parse_args(argv)
    text = VALUES.read_text()
    missing = undocumented_keys(text)
    if missing:
        print(f"values.yaml keys without a '# --' description: {', '.join(missing)}", file=sys.stderr)
        return 1
    current = DOC.read_text()
    wanted = updated_doc(current, render_table(parse_values(text)))
    if args.check:
        if current != wanted:
            print(f"{DOC.relative_to(ROOT)} is out of date: run python scripts/values_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
