"""Assemble BENCHMARKS.md from the per-topic results in bench/results/ (each written by its benchmark).

    python bench/assemble.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["train_speed", "train_speed_dropout", "train_speed_epyc", "train_speed_dropout_epyc", "train_speed_nproc_epyc", "train_speed_avx2",
         "generation_speed", "generation_speed_epyc", "generation_speed_avx2", "generation_trained_epyc", "plan",
         "plan_135m", "plan_360m", "plan_epyc", "plan_avx2", "plan_nproc", "budget", "budget_long", "budget_finish", "gpu", "eval_agreement", "eval_speed", "data_check", "guards",
         "serve", "export"]


def main() -> None:
    res = ROOT / "bench" / "results"
    files = sorted(res.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    parts = ["# Benchmarks", "",
             "Every number below was produced by the command given with it, on the machine it names. Each "
             "section is copied from `bench/results/<topic>.md`, which its benchmark writes; "
             "`python bench/assemble.py` rebuilds this page.", ""]
    for f in files:
        text = f.read_text(encoding="utf-8").strip()
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):
            lines[0] = "#" + lines[0]  # a section of this page
        parts += ["\n".join(lines), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote BENCHMARKS.md from {len(files)} result files")


if __name__ == "__main__":
    main()
