"""`bloomctl study report`: a self-contained folder with the study's table in the paper's form
and its curves.

    report.md      arms x tasks, mean and normalised mean, GPU-hours, loss at equal tokens,
                   the best arm and whether its lead exceeds the evaluation's standard error
    report.html    the same, with the plots inline (one file to send)
    loss.png/.svg  training loss against tokens, one line per arm
    accuracy.png/.svg   mean zero-shot accuracy against tokens, one line per arm
    results.json   the numbers behind the table and the plots

Building the rows and the documents is pure (rows in, text out); `write` reads the study
folder through bloomrun.study.local and writes the files. In the SVGs each arm's line is the
group `loss-<arm>` / `accuracy-<arm>` and text stays text, so the files can be checked and
restyled.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from bloomrun.study import local
from bloomrun.study.spec import ArmStatus, BloomStudy, compare, describe

PLOTS = (("loss", "training loss"), ("accuracy", "mean zero-shot accuracy"))


# ------------------------------------------------------------------------------ table


def task_names(statuses: list[ArmStatus]) -> list[str]:
    names: list[str] = []
    for status in statuses:
        names += [t for t in status.tasks if t not in names]
    return names


def table(study: BloomStudy, statuses: list[ArmStatus]) -> list[list[str]]:
    """Header and one row per arm: the change, tasks, means, loss and GPU-hours."""
    tasks = task_names(statuses)
    patches = {arm.name: local.describe_patch(arm.patch) + (" (changes basis)" if arm.changes_basis else "")
               for arm in study.spec.arms}
    rows = [["arm", "change", "phase", "tokens", *tasks, "mean acc", "± stderr", "normalised mean",
             f"loss at {study.spec.compare_at_tokens:,} tokens", "GPU-h (est.)"]]
    for s in statuses:
        rows.append([s.name, patches[s.name], s.phase, "-" if s.tokens is None else f"{s.tokens:,}",
                     *(local.fmt(s.tasks.get(t)) for t in tasks), local.fmt(s.mean), local.fmt(s.stderr),
                     local.fmt(s.normalised_mean), local.fmt(s.loss),
                     "-" if s.gpu_hours is None else f"{s.gpu_hours:.3g}"])
    return rows


def summary_lines(study: BloomStudy, statuses: list[ArmStatus]) -> list[str]:
    spec = study.spec
    shape = spec.base.model.shape()
    evaluated = ", ".join(spec.eval.task_names())
    limit = f", at most {spec.eval.limit} documents per task" if spec.eval.limit else ""
    estimate = sum(s.estimated_gpu_hours or 0 for s in statuses)
    return [
        f"{len(statuses)} arms of the base run ({spec.base.model.preset or 'custom'}: {shape.num_layers} layers x "
        f"{shape.hidden_size} hidden, {shape.num_heads} heads, sequence {shape.seq_length}), each trained to "
        f"{spec.compare_at_tokens:,} tokens and compared there.",
        f"Evaluation: zero-shot, lm-evaluation-harness on {evaluated}{limit}; the mean is over the tasks "
        "with an accuracy, the normalised mean averages (acc - random) / (1 - random).",
        f"Budget: {spec.budget.gpu_hours:,.4g} GPU-hours on {spec.budget.gpu}; the arms' estimate to the "
        f"comparison point is {estimate:,.4g} (8 x parameters x tokens at the GPU's achieved TFLOP/s). "
        "GPU-hours in the table are that estimate for the tokens each arm trained.",
    ]


# -------------------------------------------------------------------------- documents


def markdown(study: BloomStudy, statuses: list[ArmStatus]) -> str:
    rows = table(study, statuses)
    paragraphs = [part for line in summary_lines(study, statuses) for part in (line, "")]
    lines = [f"# Study {study.metadata.name}", "", *paragraphs,
             "| " + " | ".join(rows[0]) + " |", "|" + "|".join(" --- " for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    lines += ["", f"**{describe(compare(statuses))}**", ""]
    for name, title in PLOTS:
        lines += [f"![{title} against tokens]({name}.png)", ""]
    return "\n".join(lines)


def html_document(study: BloomStudy, statuses: list[ArmStatus], svgs: dict[str, str]) -> str:
    rows = table(study, statuses)
    esc = html.escape
    head = "".join(f"<th>{esc(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    plots = "".join(f'<figure>{_inline(svgs[name])}<figcaption>{esc(title)} against tokens</figcaption></figure>'
                    for name, title in PLOTS)
    paragraphs = "".join(f"<p>{esc(line)}</p>" for line in summary_lines(study, statuses))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>Study {esc(study.metadata.name)}</title><style>"
        "body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
        "td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}figure{display:inline-block;margin:1rem}"
        "</style></head><body>"
        f"<h1>Study {esc(study.metadata.name)}</h1>{paragraphs}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<p><strong>{esc(describe(compare(statuses)))}</strong></p>{plots}</body></html>\n"
    )


def _inline(svg: str) -> str:
    """An SVG file's text without its XML prolog and doctype, for inlining into HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


# ------------------------------------------------------------------------------ plots


def plot(series: dict[str, list[tuple[int, float]]], name: str, ylabel: str, compare_at_tokens: int,
         out: Path) -> None:
    """`name`.png and `name`.svg: one line per arm against tokens, the comparison point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bloomrun"}):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for arm, points in series.items():
            if not points:
                continue
            tokens, values = zip(*sorted(points))
            (line,) = ax.plot(tokens, values, marker="o", markersize=3, label=arm)
            line.set_gid(f"{name}-{arm}")
        ax.axvline(compare_at_tokens, color="grey", linestyle=":", linewidth=1, label="comparison point")
        ax.xaxis.set_major_formatter(EngFormatter())  # 160k, not 160000
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        fig.savefig(out / f"{name}.svg", metadata={"Date": None})
        plt.close(fig)


def write(study: BloomStudy, folder: local.StudyFolder, out: Path) -> Path:
    """Read the study folder, write the report folder; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    statuses = local.study_statuses(study, folder)
    curves = {arm.name: local.curves(study, folder, arm.name) for arm in study.spec.arms}
    plot({arm: losses for arm, (losses, _) in curves.items()}, "loss", "training loss",
         study.spec.compare_at_tokens, out)
    plot({arm: accuracies for arm, (_, accuracies) in curves.items()}, "accuracy", "mean zero-shot accuracy",
         study.spec.compare_at_tokens, out)
    svgs = {name: (out / f"{name}.svg").read_text() for name, _ in PLOTS}
    (out / "report.md").write_text(markdown(study, statuses))
    (out / "report.html").write_text(html_document(study, statuses, svgs))
    comparison = compare(statuses)
    (out / "results.json").write_text(json.dumps({
        "study": study.metadata.name, "compareAtTokens": study.spec.compare_at_tokens,
        "arms": [s.model_dump(mode="json", by_alias=True) for s in statuses],
        "comparison": comparison.model_dump(mode="json", by_alias=True) if comparison else None,
        "curves": {arm: {"loss": losses, "accuracy": accuracies} for arm, (losses, accuracies) in curves.items()},
    }, indent=2) + "\n")
    return out
