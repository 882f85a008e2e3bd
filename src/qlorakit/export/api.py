"""``export_run`` and ``check_export``: write an export, prove it against its source, record it.

Order of work: check every input (run folder, format, types, output path) before loading anything;
build the export in a staging folder; run the parity check; write ``export_report.json`` last. An
export that passes is renamed to ``OUT``; one that fails goes to ``OUT.failed`` (for inspection) and
``OUT`` is left as it was, so a bad export never sits where a good one is expected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..config import ExportConfig, Recipe, RecipeError, export_problems, load_recipe
from .common import (
    FORMATS,
    GGUF_QUANTS,
    MERGED_DTYPES,
    REPORT_NAME,
    ExportError,
    check_output_path,
    commit_output,
    file_entry,
    staging_dir,
    write_atomic,
)
from .parity import Golden, HFRunner, ParityReport, SourceAnswers, check_parity, golden_set, source_answers
from .source import Source, check_run_dir, end_of_turn_ids, open_source, tuned_full_precision

__all__ = ["ExportResult", "export_run", "check_export", "validate_request", "DEFAULT_QUANT", "DEFAULT_DTYPE"]

log = logging.getLogger(__name__)

DEFAULT_QUANT = "q8_0"
DEFAULT_DTYPE = "bf16"
RUNTIMES = ("auto", "llama.cpp", "transformers")


@dataclass
class ExportResult:
    out: Path  # where the export is (OUT, or OUT.failed when the check failed)
    format: str
    passed: bool
    reports: list[ParityReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # static checks and parity failures, with reasons
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return self.problems + [f"{r.artifact}: {f}" for r in self.reports for f in r.failures]


def _thresholds(cfg: ExportConfig, lossy: bool) -> tuple[float, float]:
    if lossy:
        return cfg.lossy_max_token_disagreement, cfg.lossy_max_loss_increase
    return cfg.max_token_disagreement, cfg.max_loss_increase


def _check_export_config(cfg: ExportConfig) -> None:
    errors = export_problems(cfg)
    if errors:
        raise ExportError("; ".join(errors))


def _recipe_with(run: Path, overrides: list[str] | tuple[str, ...]) -> Recipe:
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("export.")]
    if bad:
        raise ExportError(f"overrides {bad}: an export may change only export.* keys (the parity thresholds)")
    try:
        recipe = load_recipe(run / "recipe.yaml", list(overrides))
    except RecipeError as e:
        raise ExportError(str(e)) from e
    _check_export_config(recipe.export)
    return recipe


def validate_request(run_dir: str | Path, fmt: str, out: str | Path, *, dtype: str | None, quant: str | None,
                     force: bool, check: bool, runtime: str) -> tuple[Path, Path, str | None, str | None]:
    """Every input problem found before anything is loaded; returns (run, out, dtype, quant)."""
    import difflib

    if fmt not in FORMATS:
        close = difflib.get_close_matches(str(fmt), FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExportError(f"--format {fmt!r}: unknown format{hint}; expected one of {', '.join(FORMATS)}")
    if runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if fmt == "merged":
        if quant is not None:
            raise ExportError("--quant applies to --format gguf and ollama; a merged export takes --dtype "
                              f"({', '.join(MERGED_DTYPES)})")
        dtype = dtype or DEFAULT_DTYPE
        if dtype not in MERGED_DTYPES:
            close = difflib.get_close_matches(dtype, MERGED_DTYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ExportError(f"--dtype {dtype!r}: unknown type{hint}; expected one of {', '.join(MERGED_DTYPES)}")
        if dtype == "nf4" and not check:
            raise ExportError("--dtype nf4 merges into 4-bit weights, which loses quality; it needs the parity "
                              "check to measure how much (drop --no-check)")
    elif fmt in ("gguf", "ollama"):
        if dtype is not None:
            raise ExportError(f"--dtype applies to --format merged; a {fmt} export takes --quant "
                              f"({', '.join(GGUF_QUANTS)})")
        quant = quant or DEFAULT_QUANT
        if quant not in GGUF_QUANTS:
            close = difflib.get_close_matches(quant.lower(), GGUF_QUANTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ExportError(f"--quant {quant!r}: unknown or unsupported quant type{hint}; expected one of "
                              f"{', '.join(GGUF_QUANTS)} (k-quants such as q4_k_m need llama.cpp's llama-quantize "
                              "on an f16 export)")
    else:  # peft
        if dtype is not None or quant is not None:
            raise ExportError("--dtype and --quant do not apply to --format peft (the adapter is copied as trained)")
    run = check_run_dir(run_dir)
    out_p = Path(out)
    _check_not_inside(run, out_p)
    check_output_path(out_p, force)
    return run, out_p, dtype, quant


# what a run folder holds besides its exports: an export may not be written over or into any of it
RUN_ENTRIES = ("adapter", "checkpoints", "eval", "recipe.yaml", "data_manifest.json", "metrics.jsonl",
               "MODEL_CARD.md", "exports.json", "serve.db", "serve.db-wal", "serve.db-shm")


def _check_not_inside(run: Path, out: Path) -> None:
    r, o = run.resolve(), out.resolve()
    if o == r or r.is_relative_to(o):
        raise ExportError(f"-o {out}: would overwrite the run folder {run}; choose a path outside it")
    if o.is_relative_to(r):
        top = o.relative_to(r).parts[0]
        if top in RUN_ENTRIES or top.startswith("."):
            raise ExportError(f"-o {out}: would overwrite {r / top}, part of the run folder {run}; choose a path "
                              "outside the run folder or a new folder in it")


# -------------------------------------------------------------------------------------------- parity


def _source_runner(source: Source) -> HFRunner:
    """The tuned model: the run's NF4 base weights (dequantized once, exactly the values the 4-bit layers
    compute with) plus the LoRA layers, in fp32, so that activation rounding in the reference does not
    count against the export. A test pins its logits to the 4-bit model's with fp32 compute."""
    ld = source.loaded
    return HFRunner("tuned model (NF4 base + LoRA, fp32)", tuned_full_precision(source),
                    stop=end_of_turn_ids(ld.tokenizer), pad_id=ld.tokenizer.pad_token_id or 0)


# The source's answers depend only on the adapter, the base and the parity settings; a process that
# exports one run several times (the benchmark) computes them once.
_SOURCE_CACHE: dict[tuple[str, str, str], SourceAnswers] = {}


def _cached_source_answers(source: Source, golden: Golden, cfg: ExportConfig) -> SourceAnswers:
    from .common import file_digest

    key = (str(source.run_dir.resolve()), file_digest(source.adapter_dir / "adapter_model.safetensors"),
           json.dumps(dataclasses.asdict(cfg), sort_keys=True) + source.loaded.name + str(source.loaded.folder))
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()
        _SOURCE_CACHE[key] = source_answers(_source_runner(source), golden, cfg)
    return _SOURCE_CACHE[key]


def _run_parity(fmt: str, folder: Path, info: dict[str, Any], source: Source, runtime: str
                ) -> tuple[list[ParityReport], list[str], list[str], Golden]:
    from .artifacts import open_artifacts

    cfg = source.recipe.export
    golden = golden_set(source, cfg)
    opened = open_artifacts(fmt, folder, info, source, runtime=runtime, conversations=golden.conversations)
    reports: list[ParityReport] = []
    if opened.runners:
        src = _cached_source_answers(source, golden, cfg)
        max_dis, max_loss = _thresholds(cfg, opened.lossy)
        for artifact, runner in opened.runners:
            t0 = time.perf_counter()
            rep = check_parity(artifact, runner, src, golden, cfg, max_token_disagreement=max_dis,
                               max_loss_increase=max_loss, tokenizer=source.loaded.tokenizer)
            log.info("%s (%.1f s)", rep.summary(), time.perf_counter() - t0)
            reports.append(rep)
            close = getattr(runner, "close", None)
            if close is not None:
                close()
    elif not opened.problems:
        opened.problems.append("no runnable artifact was found to check")
    return reports, opened.problems, opened.notes, golden


# ------------------------------------------------------------------------------------------ on-device


def _on_device(fmt: str, folder: Path, info: dict[str, Any], source: Source, golden: Golden,
               n_tokens: int = 32) -> dict[str, Any]:
    from .ondevice import measure_adapter, measure_gguf, measure_merged
    from .parity import llama_cpp_available

    items: list[dict[str, Any]] = []
    prompt, ids = golden.prompts[0], golden.prompt_ids[0]
    adapter_files = {p.name: p.stat().st_size for p in sorted(source.adapter_dir.glob("adapter_model.*"))}
    if fmt in ("gguf", "ollama"):
        model = folder / (info["files"]["model"] if fmt == "gguf" else "model.gguf")
        if llama_cpp_available():
            items.append({"what": f"exported {model.name}", "files": {model.name: model.stat().st_size},
                          "measured": measure_gguf(model, ids, n_tokens)})
            if fmt == "gguf" and "base" in info:
                b, a = folder / info["files"]["base"], folder / info["files"]["adapter"]
                items.append({"what": "GGUF base + GGUF LoRA", "files": {b.name: b.stat().st_size,
                                                                         a.name: a.stat().st_size},
                              "measured": measure_gguf(b, ids, n_tokens, lora=a)})
        else:
            items.append({"what": f"exported {model.name}", "files": {model.name: model.stat().st_size},
                          "measured": {"error": "llama-cpp-python is not installed"}})
    elif fmt == "merged" and info.get("dtype") != "nf4":
        files = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
        items.append({"what": "exported merged folder", "files": files,
                      "measured": measure_merged(folder, prompt, n_tokens)})
    items.append({"what": "adapter served by qlorakit (4-bit base + LoRA)", "files": adapter_files,
                  "measured": measure_adapter(source.run_dir, prompt, n_tokens)})
    return {"tokens": n_tokens, "cpu_count": os.cpu_count(), "items": items}


# ------------------------------------------------------------------------------------------- exports


def _write(fmt: str, source: Source, folder: Path, dtype: str | None, quant: str | None) -> dict[str, Any]:
    from .artifacts import write_gguf, write_merged, write_ollama, write_peft

    if fmt == "merged":
        return write_merged(source, folder, dtype or DEFAULT_DTYPE)
    if fmt == "peft":
        return write_peft(source, folder)
    if fmt == "gguf":
        return write_gguf(source, folder, quant or DEFAULT_QUANT)
    return write_ollama(source, folder, quant or DEFAULT_QUANT)


def _failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def _park_failed(staging: Path, out: Path) -> Path:
    """Move a failed export beside OUT as OUT.failed (replacing only an earlier failed export there;
    anything else of that name is left alone and a dated name is used instead)."""
    target = _failed_path(out)
    if target.exists() or target.is_symlink():
        rep = target / REPORT_NAME
        try:
            ours = rep.is_file() and json.loads(rep.read_text(encoding="utf-8")).get("status") == "failed"
        except (OSError, json.JSONDecodeError):
            ours = False
        if ours:
            shutil.rmtree(target)
        else:
            target = out.with_name(f"{out.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(staging, target)
    return target


def _nf4_warning(reports: list[ParityReport]) -> list[str]:
    out = []
    for r in reports:
        out.append(f"merging into 4-bit NF4 weights is lossy: held-out loss {r.source_loss:.4f} (tuned) -> "
                   f"{r.export_loss:.4f} (merged nf4), {r.loss_increase:+.4f} nats; next-token agreement "
                   f"{r.forced_agreement:.1%} (free-running {r.token_agreement:.1%}). A bf16 merge keeps the tuned model's quality.")
    return out


def _card_entry(out: Path, fmt: str, report: dict[str, Any]) -> dict[str, Any]:
    return {"out": str(out.resolve()), "format": fmt, "status": report["status"], "created": report["created"],
            "dtype": report.get("dtype"), "quant": report.get("quant"), "files": report["files"],
            "parity": report.get("parity", []), "on_device": report.get("on_device")}


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, dtype: str | None = None,
               quant: str | None = None, force: bool = False, check: bool = True, measure: bool = True,
               runtime: str = "auto", overrides: list[str] | tuple[str, ...] = ()) -> ExportResult:
    """Export a finished run as ``fmt`` into ``out`` and check it against the tuned model.

    Raises :class:`ExportError` for bad input (nothing is written then). A finished export that
    fails its check is returned with ``passed=False`` and lies in ``OUT.failed``.
    """
    run, out_p, dtype, quant = validate_request(run_dir, fmt, out, dtype=dtype, quant=quant, force=force,
                                                check=check, runtime=runtime)
    recipe = _recipe_with(run, overrides)
    source = open_source(run)
    source.recipe = dataclasses.replace(source.recipe, export=recipe.export)
    staging = staging_dir(out_p)
    try:
        t0 = time.perf_counter()
        info = _write(fmt, source, staging, dtype, quant)
        write_s = time.perf_counter() - t0
        reports: list[ParityReport] = []
        problems: list[str] = []
        notes: list[str] = []
        warnings: list[str] = []
        on_device: dict[str, Any] | None = None
        if check:
            reports, problems, notes, golden = _run_parity(fmt, staging, info, source, runtime)
            if dtype == "nf4":
                warnings += _nf4_warning(reports)
            passed = not problems and all(r.passed for r in reports)
            if measure and passed:
                on_device = _on_device(fmt, staging, info, source, golden)
        else:
            notes.append("the parity check was skipped (--no-check)")
            passed = True
        report = {
            "status": ("passed" if passed else "failed") if check else "unchecked",
            "format": fmt, "dtype": dtype, "quant": quant, "run_dir": str(run.resolve()),
            "base": source.loaded.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "write_seconds": round(write_s, 1), "info": info,
            "thresholds": dataclasses.asdict(source.recipe.export),
            "tuned_heldout": _run_heldout(run),
            "files": [file_entry(p, staging) for p in sorted(staging.rglob("*")) if p.is_file()],
            "parity": [r.to_dict() for r in reports], "problems": problems, "warnings": warnings, "notes": notes,
            "on_device": on_device, "checks": [],
        }
        write_atomic(staging / REPORT_NAME, json.dumps(report, indent=2, default=str) + "\n")
        if passed:
            commit_output(staging, out_p, force)
            final = out_p
            from .card import record_export

            record_export(run, _card_entry(out_p, fmt, report))
        else:
            final = _park_failed(staging, out_p)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(final, fmt, passed, reports, problems, warnings, notes, report)


def _run_heldout(run: Path) -> dict[str, Any] | None:
    p = run / "eval" / "results.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("heldout")
    except json.JSONDecodeError:
        return None


def check_export(out: str | Path, *, run_dir: str | Path | None = None, runtime: str = "auto",
                 overrides: list[str] | tuple[str, ...] = ()) -> ExportResult:
    """Run the parity check again on an export folder (e.g. after copying or editing it)."""
    out_p = Path(out)
    rep_path = out_p / REPORT_NAME
    if not out_p.is_dir():
        raise ExportError(f"--check {out_p}: no such export folder")
    if not rep_path.is_file():
        raise ExportError(f"--check {out_p}: no {REPORT_NAME}; expected a folder written by 'qlorakit export'")
    try:
        report = json.loads(rep_path.read_text(encoding="utf-8"))
        fmt, info = report["format"], report["info"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ExportError(f"{rep_path}: unreadable export report ({e})") from e
    if runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    run = check_run_dir(run_dir or report["run_dir"])
    recipe = _recipe_with(run, overrides)
    source = open_source(run)
    source.recipe = dataclasses.replace(source.recipe, export=recipe.export)
    reports, problems, notes, _ = _run_parity(fmt, out_p, info, source, runtime)
    passed = not problems and all(r.passed for r in reports)
    report.setdefault("checks", []).append({
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "passed" if passed else "failed",
        "parity": [r.to_dict() for r in reports], "problems": problems, "notes": notes})
    write_atomic(rep_path, json.dumps(report, indent=2, default=str) + "\n")
    return ExportResult(out_p, fmt, passed, reports, problems, [], notes, report)
