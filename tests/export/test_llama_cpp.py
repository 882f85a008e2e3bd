"""The GGUF export of the default run in llama.cpp (slow: needs llama-cpp-python and a real run).

Install: ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install 'qlorakit[gguf-check]'``. Run with ``-m slow``.
Uses the finished default run in ``$QLORAKIT_EXPORT_RUN`` when set, else trains one (40 steps).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                            "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'qlorakit[gguf-check]'")
    env = os.environ.get("QLORAKIT_EXPORT_RUN")
    if env:
        return Path(env)
    from qlorakit.config import load_recipe
    from qlorakit.train import train

    out = tmp_path_factory.mktemp("default-run")
    return train(load_recipe(None, [f"output_dir={out}", "name=export-src", "train.max_steps=40",
                                    "train.progress=false"]), finish=False)


@pytest.fixture(scope="module")
def work(default_run, tmp_path_factory) -> Path:
    import shutil

    run = tmp_path_factory.mktemp("llama") / "run"
    shutil.copytree(default_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


def _export(run, quant, tmp_path):
    from qlorakit.export import export_run

    return export_run(run, "gguf", tmp_path / f"gguf-{quant}", quant=quant, runtime="llama.cpp", measure=False)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_agrees_with_the_source_in_llama_cpp(work, tmp_path, quant):
    res = _export(work, quant, tmp_path)
    assert res.passed, res.reasons
    merged, adapter = res.reports
    for r in (merged, adapter):  # the merged model, and the LoRA adapter over the base GGUF
        assert r.runtime == "llama.cpp"
        assert r.tokenizer_ok and r.template_ok
        # fed the source's greedy answers, llama.cpp picks the same next token at >= 95% of the first 32
        # positions, and ends every answer where the source ends it
        assert r.forced_agreement >= 0.95, r.summary()
        fs = r.forced_stops
        assert fs["source_stopped"] > 0 and fs["export_stops_there"] == fs["source_stopped"], r.summary()
        # every answer the source ended with <|im_end|> ends identically in llama.cpp, unless the two parted
        # earlier (then the check already counted the disagreement); a run-on answer fails the check itself
        st = r.stops
        assert st["source_stopped"] > 0 and st["same"] > 0, r.summary()
        assert st["same"] + st["diverged_before_stop"] == st["source_stopped"], r.summary()


def test_4bit_gguf_agreement_is_measured(work, tmp_path):
    res = _export(work, "q4_1", tmp_path)
    for r in res.reports:
        assert r.runtime == "llama.cpp" and r.tokenizer_ok and r.template_ok
        assert 0.0 <= r.token_agreement <= 1.0 and 0.0 <= r.forced_agreement <= 1.0
    assert res.report["parity"][0]["forced_agreement"] == res.reports[0].forced_agreement
