"""Draws docs/perf/*.png from the JSON lines that scripts/perf_curves.sh wrote (needs matplotlib).

Each figure: the backbone's training step (forward keeping the tape + input-gradient backward)
in seconds, and the process's peak RSS in MB, against one variable."""
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PERF = pathlib.Path(__file__).resolve().parent.parent / "docs" / "perf"

FIGURES = [
    ("seq_len", "len", "sequence length (tokens, batch 1)", True),
    ("prompt_len", "shared_prefix", "prompt length (virtual tokens, batch 8 × 32 text tokens)", False),
    ("batch", "batch", "batch (rows of 20 shared + 32 tokens)", True),
    ("width", "params_m", "parameters (millions, random Llama)", True),
]


def main():
    for name, key, label, log_x in FIGURES:
        path = PERF / f"{name}.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        xs = [r[key] for r in rows]
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        ax.plot(xs, [r["train_step_backbone_s"] for r in rows], "o-", color="tab:blue", label="training step (s)")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per training step", color="tab:blue")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(xs, [r["peak_rss_mb"] for r in rows], "s--", color="tab:red", label="peak RSS (MB)")
        ax2.set_ylabel("peak RSS (MB)", color="tab:red")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [l.get_label() for l in lines], loc="upper left")
        ax.set_title(f"softprompt bench: cost vs {name.replace('_', ' ')}")
        fig.tight_layout()
        fig.savefig(PERF / f"{name}.png")
        plt.close(fig)
        print(f"wrote {PERF / name}.png")


if __name__ == "__main__":
    main()
