"""A plain (non-editable) install ships one package, `metarun`, with its configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (path,) = out.glob("metarun-*.whl")
    return path


def test_wheel_holds_only_the_metarun_package_and_its_yaml(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"metarun", next(t for t in top if t.endswith(".dist-info"))}
    for expected in (
        "metarun/conf/config.yaml",
        "metarun/conf/algo/protonet.yaml",
        "metarun/conf/data/omniglot_small.yaml",
        "metarun/conf/hydra/default.yaml",
        "metarun/data/episodes.py",
        "metarun/algorithms/protonet.py",
        "metarun/runners/cli.py",
        "metarun/__main__.py",
    ):
        assert expected in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"metarun = metarun.__main__:main" in entry_points


def test_installed_wheel_composes_its_config(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import metarun.conf, metarun.data;"
        "from hydra import compose, initialize_config_module;"
        "initialize_config_module(config_module='metarun.conf', version_base='1.3');"
        "cfg = compose(config_name='config', overrides=['data=omniglot']);"
        "print(metarun.conf.__file__, metarun.data.__file__, cfg.algo._target_, cfg.data._target_)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    conf_file, data_file, algo, data = proc.stdout.split()
    assert conf_file.startswith(str(target)) and data_file.startswith(str(target))
    assert (algo, data) == (
        "metarun.algorithms.protonet.ProtoNet",
        "metarun.data.omniglot.omniglot",
    )
