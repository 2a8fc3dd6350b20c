"""metrics.jsonl on resume: later rows dropped, a row torn by a kill skipped."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from metarun.runners.logging import RunLogger


def test_resume_truncates_later_rows_and_skips_a_torn_line(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "lo'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    cfg = OmegaConf.create({"logger": {"name": "none"}})
    logger = RunLogger(tmp_path, cfg, resume_step=20)
    logger.log(30, {"loss": 0.5})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
