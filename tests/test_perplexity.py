"""dzc perplexity equals transformers' perplexity (same chunks, same scored tokens) within 0.1% in f32."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dzc.cli import main
from dzc.driver import open_model
from dzc.perplexity import perplexity, token_nll
from tiny_models import hf_logits

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo-model"
CONTEXT = 128


def hf_perplexity(model_dir: Path, ids: list[int], context: int) -> float:
    """The llama-perplexity protocol computed on transformers' fp32 logits."""
    nll = []
    for c in range(len(ids) // context):
        chunk = np.asarray(ids[c * context:(c + 1) * context])
        logits = hf_logits(model_dir, chunk)
        nll.append(token_nll(logits[context // 2:-1], chunk[context // 2 + 1:]))
    return math.exp(float(np.concatenate(nll).mean()))


def test_demo_model_perplexity_matches_transformers():
    model = open_model(DEMO)
    text = (DEMO / "heldout.txt").read_text(encoding="utf-8")[:4000]
    ids = model.tokenizer.encode(text, add_special_tokens=False)[: 3 * CONTEXT]
    ours = perplexity(model.make_executor(CONTEXT), ids, CONTEXT)
    reference = hf_perplexity(DEMO, ids, CONTEXT)
    assert ours.chunks == 3 and ours.scored_tokens == 3 * (CONTEXT // 2 - 1)
    assert abs(ours.perplexity / reference - 1) < 1e-3, (ours.perplexity, reference)
    assert 5 < ours.perplexity < 200  # a trained model: far below the vocabulary size of 2048


def test_cli_reports_final_estimate(capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((DEMO / "heldout.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    assert main(["perplexity", str(DEMO), "--file", str(text), "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Final estimate: PPL = ")


def test_too_short_text_is_an_error(capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Hello.", encoding="utf-8")
    assert main(["perplexity", str(DEMO), "--file", str(text), "--context", "64"]) != 0
    assert "fewer than one chunk" in capsys.readouterr().err
