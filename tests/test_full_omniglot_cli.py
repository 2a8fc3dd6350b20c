"""`metarun algo=<learner> data=omniglot way=20 shot=1` runs end to end for every learner.

The full Omniglot archives are not on this machine, so the loader reads fake archives with
the real layout and file names (tests/test_omniglot.py): 2 training alphabets x 3
characters x 4 rotations = 24 classes, enough for 20-way episodes. The loader refuses
archives that differ from the official ones, so the test decodes the fakes into the shared
decode cache first, with the table of official contents describing them; the CLI's
processes then read that (checked) cache.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, run_dirs
from fakes import FULL, expect, make_root
from omegaconf import OmegaConf

import metarun.data.omniglot as om

METRIC = ("protonet", "siamese", "matching", "relation")
OPTIMIZATION = ("maml", "fomaml", "metasgd", "anil", "reptile", "imaml")
LEARNERS = METRIC + OPTIMIZATION
# the paper's networks where they fit 28x28 images: relation's default is its embedding
# module, the optimization-based learners' is MAML's strided network
DEFAULT_BACKBONES = (
    {"relation": "conv4_relation"}
    | {a: "conv4_strided" for a in OPTIMIZATION}
    | {"anil": "conv4_strided_nhwc"}  # its backbone sees whole batches: NHWC is faster
)


@pytest.mark.slow
def test_every_learner_runs_20_way_1_shot_on_omniglot(tmp_path, monkeypatch):
    root = make_root(tmp_path / "omniglot", FULL, chars=3, images=4)
    expect(monkeypatch, FULL, chars=3, images=4)
    om._load(root, tuple(FULL), download=False, image_size=28)  # conf/data/omniglot.yaml's size
    out = tmp_path / "out"
    run_cli(
        "-m",
        f"algo={','.join(LEARNERS)}",
        "data=omniglot",
        "way=20",
        "shot=1",
        "query=2",  # 4 drawings per fake character: 1 support + 2 queries fit
        f"data.root={root}",
        "data.download=false",
        "trainer.steps=4",
        "trainer.val_every=2",
        "trainer.val_episodes=3",
        "eval.episodes=5",
        "logger=none",
        "device=cpu",
        f"hydra.sweep.dir={out}",
        cwd=tmp_path,
    )

    def chosen(run, group):  # Hydra's record of the options this job ran with
        return OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices[group]

    runs = {chosen(d, "algo"): d for d in run_dirs(out)}
    assert sorted(runs) == sorted(LEARNERS)
    for name, run in runs.items():
        result = json.loads((run / "results.json").read_text())
        assert (result["algo"], result["data"], result["way"], result["shot"]) == (
            name,
            "omniglot",
            20,
            1,
        )
        assert result["episodes"] == 5 and 0.0 <= result["test_acc"] <= 1.0
        assert (run / "checkpoints" / "best.pt").is_file()
        assert chosen(run, "backbone") == DEFAULT_BACKBONES.get(name, "conv4")
