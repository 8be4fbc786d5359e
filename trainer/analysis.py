"""After training: loss/accuracy curves, confusion matrix, per-class accuracy, failure modes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import torch

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] counts; row = true class, column = predicted class."""
    idx = y_true.long().cpu() * n + y_pred.long().cpu()
    return torch.bincount(idx, minlength=n * n).view(n, n)


def failure_modes(cm: torch.Tensor, classes: Sequence[str], top: int = 5) -> dict[str, Any]:
    """Per-class accuracy and the most-confused (true -> predicted) pairs."""
    totals = cm.sum(1).clamp(min=1)
    per_class = {c: round(100.0 * cm[i, i].item() / totals[i].item(), 2) for i, c in enumerate(classes)}
    off = cm.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    pairs = []
    for k in torch.argsort(flat, descending=True, stable=True)[:top].tolist():
        i, j = divmod(k, len(classes))
        if flat[k] == 0:
            break
        pairs.append({"true": classes[i], "predicted": classes[j], "count": int(flat[k]),
                      "rate": round(100.0 * flat[k].item() / totals[i].item(), 2)})
    worst = sorted(per_class, key=per_class.get)[:3]
    return {"per_class_top1": per_class, "most_confused": pairs, "worst_classes": worst}


def plot_curves(history: list[dict], path: Path) -> None:
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a2.plot(ep, [h["train_top1"] for h in history], label="train")
    for key, label in (("val", "val"), ("test", "test")):
        pts = [(h["epoch"], h[f"{key}_loss"], h[f"{key}_top1"]) for h in history if f"{key}_loss" in h]
        if pts:
            a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=label)
    a1.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    a2.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    norm = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out: Path, history: list[dict], y_true: torch.Tensor, y_pred: torch.Tensor,
                  classes: Sequence[str]) -> dict[str, str]:
    """Write curves.png, confusion.png, summary.json and summary.md into ``out``; return their paths."""
    out = Path(out)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    fm = failure_modes(cm, classes)
    paths = {"curves": out / "curves.png", "confusion": out / "confusion.png",
             "summary_json": out / "summary.json", "summary_md": out / "summary.md"}
    if history:
        plot_curves(history, paths["curves"])
    else:
        paths.pop("curves")
    plot_confusion(cm, classes, paths["confusion"])
    top1 = 100.0 * cm.diagonal().sum().item() / max(1, cm.sum().item())
    summary = {"test_top1": round(top1, 2), **fm, "confusion_matrix": cm.tolist(), "classes": list(classes),
               "history": history}
    paths["summary_json"].write_text(json.dumps(summary, indent=2))
    lines = ["# Training summary\n", f"Test top-1: **{top1:.2f}%** over {int(cm.sum())} images.\n",
             "## Per-class accuracy\n", "| class | top-1 % |", "|---|---|"]
    lines += [f"| {c} | {a:.2f} |" for c, a in fm["per_class_top1"].items()]
    lines += ["", "## Failure modes: most-confused pairs\n", "| true | predicted as | count | % of true class |",
              "|---|---|---|---|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['rate']:.2f} |" for p in fm["most_confused"]]
    lines += ["", f"Weakest classes: {', '.join(fm['worst_classes'])}.", ""]
    paths["summary_md"].write_text("\n".join(lines))
    return {k: str(v) for k, v in paths.items()}
