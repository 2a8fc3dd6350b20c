"""Bad input fails before any training, with a message that names the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, run_cli


def fails(tmp_path, *overrides, env=None):
    proc = run_cli(
        *FAST,
        *overrides,
        f"paths.output_root={tmp_path / 'out'}",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list((tmp_path / "out").glob("**/checkpoints/*.pt")), "training started anyway"
    return proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["way=201"], "way=201 is larger than the 200 classes in the 'train' split"),
        (["eval.way=51"], "way=51 is larger than the 50 classes in the 'val' split"),
        (["shot=10", "query=11"], "shot+query=21"),
        (["way=0"], "way must be a positive integer"),
        (["trainer.steps=-5"], "trainer.steps must be a positive integer"),
        (["mode=test"], "mode=test needs a checkpoint: add ckpt="),
        (["mode=fly"], "mode='fly' is unknown"),
        (["trainer.amp=fp8"], "trainer.amp='fp8'"),
        (["trainer.augment=mixup"], "unknown augmentation 'mixup'"),
        (["algo.distance=manhattan"], "unknown distance 'manhattan'"),
        (["backbone.variant=fancy"], "unknown conv4 variant 'fancy'"),
        (["data=sinusoid", "backbone=mlp"], "algo=protonet is classification-only"),
        (["data=sinusoid"], "data=sinusoid gives vectors but backbone=conv4 takes images"),
    ],
)
def test_bad_settings_get_a_clear_message(tmp_path, overrides, message):
    assert message in fails(tmp_path, *overrides)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "choice"),
    [
        ("algo=nosuchalgo", "protonet"),
        ("data=omniglott", "omniglot_small"),
        ("backbone=resnet99", "resnet12"),
    ],
)
def test_unknown_algorithm_data_or_backbone_lists_the_choices(tmp_path, override, choice):
    stderr = fails(tmp_path, override)
    assert override.split("=")[1] in stderr and "Available options" in stderr and choice in stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_without_cuda(tmp_path):
    assert "CUDA is not available here; use device=cpu" in fails(tmp_path, "device=cuda")


def test_missing_omniglot_files_name_the_files_the_folder_and_the_url(tmp_path):
    stderr = fails(
        tmp_path, "data=omniglot_small", f"data.root={tmp_path / 'empty'}", "data.download=false"
    )
    assert "images_background_small1.zip" in stderr and str(tmp_path / "empty") in stderr
    assert "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/" in stderr


@pytest.mark.slow
def test_corrupt_archive_is_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for i in (1, 2):
        (root / f"images_background_small{i}.zip").write_bytes(b"not a zip at all")
    stderr = fails(tmp_path, "data=omniglot_small", f"data.root={root}", "data.download=false")
    assert "images_background_small1.zip is corrupt" in stderr


@pytest.mark.slow
def test_missing_or_corrupt_checkpoint(tmp_path):
    assert "does not exist" in fails(tmp_path, "mode=test", f"ckpt={tmp_path / 'nope.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert f"checkpoint {bad} is corrupt or truncated" in fails(
        tmp_path, "mode=test", f"ckpt={bad}"
    )


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_and_keeps_the_checkpoint(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    stderr = fails(tmp_path, "way=4", f"resume={last}")
    assert "cannot resume from" in stderr and "way: checkpoint 5 vs now 4" in stderr
    assert last.read_bytes() == before


@pytest.mark.slow
def test_tf32_must_be_a_boolean(tmp_path):
    assert "tf32 must be true or false, got 'maybe'; use tf32=true or tf32=false" in fails(
        tmp_path, "tf32=maybe"
    )


def test_tf32_switch_sets_both_cuda_flags():
    from metarun.runners.build import configure_tf32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        configure_tf32(True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        configure_tf32(False)
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk mid-write: the error reaches the caller, the old file still loads, and no
    temporary file is left behind."""
    import torch

    from metarun.errors import CheckpointError
    from metarun.runners import checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(3)}, "config": {}, "step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(
        CheckpointError, match="No space left on device.*previous last.pt is intact"
    ):
        checkpoint.save_atomic({"model": {"w": torch.zeros(3)}, "config": {}, "step": 2}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
