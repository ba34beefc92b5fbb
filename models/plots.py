"""training.png: loss and HR@K / NDCG@K per epoch."""

from __future__ import annotations

from pathlib import Path

from merlin_ncf.atomic import atomic_file


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    k = history[0]["k"] if history else 10
    fig, (loss_ax, hr_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [row["loss"] for row in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="BCE loss (train)", title="training loss")
    hr_ax.plot(epochs, [row["hr"] for row in history], marker="o", label=f"HR@{k}")
    hr_ax.plot(epochs, [row["ndcg"] for row in history], marker="s", label=f"NDCG@{k}")
    split = history[0]["split"] if history else "test"
    hr_ax.set(xlabel="epoch", ylabel="metric", title=f"{split} HR@{k} / NDCG@{k}", ylim=(0, 1))
    hr_ax.legend()
    for ax in (loss_ax, hr_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
