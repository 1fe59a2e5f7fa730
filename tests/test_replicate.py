"""``scripts/replicate.py --quick`` end to end: every model evaluated, KV bytes measured = formula."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "scripts" / "replicate.py")]

MODELS = {
    "dense",
    "streaming_llm",
    "cla",
    "pod",
    "pod_adapted",
    "pod_adapted+snapkv",
    "cla_adapted",
    "cla_pairs_all_tokens",
    "cla_pairs_all_tokens_adapted",
    "dense+same-steps",
}


@pytest.mark.slow
def test_quick_replication_runs_and_renders(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = subprocess.run(
        [*SCRIPT, "--quick", "--threads", "1", "--out", str(out), "--cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in res["table"]}
    assert MODELS <= set(rows), sorted(rows)
    assert len(rows) == len(MODELS) + 3  # plus the equal-budget StreamingLLM and CLA, and the latter adapted
    for name, row in rows.items():
        assert row["kv_bytes_measured"] == row["kv_bytes"], name  # the cache holds what the formula says
        assert 0.0 <= row["passkey"] <= 1.0
    assert rows["dense"]["kv_saved"] == 0.0
    assert rows["streaming_llm"]["kv_saved"] > rows["pod"]["kv_saved"] > 0.0
    seq = res["settings"]["eval_seq_len"]  # the paper's CLA: layer pairs, all but the current token shared
    assert rows["cla_pairs_all_tokens"]["kv_saved"] == pytest.approx(0.5 * (seq - 1) / seq)
    budget = rows["pod"]["kv_bytes"]
    for name, row in rows.items():
        if "@pod_budget" in name:
            assert 0.95 * budget <= row["kv_bytes"] <= budget, name
    # The adaptation really trained (first vs last losses of a tiny run: noisy, so a loose bound).
    for losses in [res["adapt_losses"], *res["cla_adapt_losses"].values()]:
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    for png in ("results_niah.png", "results_loss_by_position.png", "results_similarity.png"):
        assert (out / "img" / png).stat().st_size > 1000, png
    cached = list(cache.iterdir())  # the pretrained base model, reused by later runs with its settings
    assert len(cached) == 1 and (cached[0] / "DONE").is_file()

    # --render rebuilds the report from results.json alone (no training).
    (out / "results.md").unlink()
    again = subprocess.run([*SCRIPT, "--render", str(out / "results.json")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    text = (out / "results.md").read_text()
    assert "| pod_adapted |" in text and "Against the control" in text and "- `cla_adapted`:" in text

    # Pretraining interrupted after step 20 of 40 (its state saved at step 20) resumes there and
    # ends with the same losses, to the last bit, as the uninterrupted run above.
    other = tmp_path / "cache_interrupted"
    quick = [*SCRIPT, "--quick", "--threads", "1", "--out", str(tmp_path / "out2"), "--cache", str(other)]
    stopped = subprocess.run([*quick, "--set", "pretrain_stop_after=20"], capture_output=True, text=True)
    assert stopped.returncode == 3 and "pretrain stopped after step 20 of 40" in stopped.stderr, (
        stopped.stderr[-2000:]
    )
    assert [p.name for p in other.iterdir()] == [f"{cached[0].name}.resume.pt"]
    resumed = subprocess.run(quick, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "pretrain: resuming at step 20 of 40" in resumed.stderr
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert again["base_losses"] == res["base_losses"] and again["base"]["resumed_at_step"] == 20
    assert [p.name for p in other.iterdir()] == [cached[0].name]  # the state file is gone


def test_bad_arguments_fail_with_the_reason(tmp_path: Path) -> None:
    bad = subprocess.run([*SCRIPT, "--set", "no_such_field=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown setting 'no_such_field'" in bad.stderr
    missing = subprocess.run(
        [*SCRIPT, "--render", str(tmp_path / "nope.json")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
