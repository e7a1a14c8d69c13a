"""What a finished run shows: training curves as a PNG, and the final summary as a plain-text table.

Everything is read back from the `metrics.jsonl` files the training workers write, so a report can be
redrawn for any finished run without touching Ray or a model.
"""

from __future__ import annotations

import json
from pathlib import Path

DPO_PANELS = (  # (metric, title) for the DPO rows of the figure
    ("loss", "dDPO loss"),
    ("rewards/accuracies", "dDPO reward accuracy"),
    ("rewards/margins", "dDPO reward margin (chosen - rejected)"),
)


def read_metrics(metrics_file: str | Path) -> dict[str, list[dict]]:
    """Records by split ("train", "eval"), one per step: a step logged twice (a resumed run) keeps its later line."""
    by_step: dict[tuple[str, int], dict] = {}
    from ray_zephyr.storage import read_text

    for line in (read_text(str(metrics_file)) or "").splitlines():
        record = json.loads(line)
        by_step[(record["split"], record["step"])] = record
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for (split, _), record in sorted(by_step.items(), key=lambda kv: kv[0][1]):
        out.setdefault(split, []).append(record)
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def first_last(records: list[dict], key: str) -> tuple[float, float] | None:
    _, values = series(records, key)
    return (values[0], values[-1]) if values else None


def plot_curves(sft: dict[str, list[dict]] | None, dpo: dict[str, list[dict]], path: str | Path,
                title: str = "ray-zephyr: dSFT then dDPO on the embedded task") -> Path:
    """One figure, four panels: SFT loss (train and eval), then DPO loss, reward accuracy and reward margin; without
    an SFT run (`sft=None`, a DPO run from an instruct model) its panel is left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in Ray jobs and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(sft, "loss", "dSFT loss (assistant tokens)"), *((dpo, key, name) for key, name in DPO_PANELS)]
    for ax, (metrics, key, name) in zip(axes.flat, panels, strict=True):
        if metrics is None:
            ax.axis("off")
            continue
        ax.plot(*series(metrics["train"], key), label="train", color="tab:blue", alpha=0.8)
        ax.plot(*series(metrics["eval"], f"eval_{key}"), "o-", label="held-out eval", color="tab:orange")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1, 0].axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    axes[1, 0].set_ylim(-0.02, 1.02)
    axes[1, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[tuple[str, str]], header: tuple[str, str] = ("metric", "value")) -> str:
    """A two-column text table that reads the same in a terminal, a log file and a markdown page."""
    width = max(len(name) for name, _ in [header, *rows])
    lines = [f"| {header[0]:<{width}} | {header[1]}", f"|{'-' * (width + 2)}|{'-' * 24}"]
    lines += [f"| {name:<{width}} | {value}" for name, value in rows]
    return "\n".join(lines)


def arrow(pair: tuple[float, float] | None, digits: int = 3) -> str:
    return "n/a" if pair is None else f"{pair[0]:.{digits}f} -> {pair[1]:.{digits}f}"
