"""The `metarun` command: one Hydra app that trains, tests or predicts.

metarun algo=protonet data=omniglot way=20 shot=1
metarun mode=test ckpt=outputs/<date>/<time>/checkpoints/best.pt
metarun -m algo=protonet shot=1,5
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metarun.data.errors import ConfigError, MetarunError, StoppedError
from metarun.runners import checkpoint, distributed
from metarun.runners.build import build_store, configure_tf32, resolve_device, validate
from metarun.runners.evaluate import evaluate
from metarun.runners.sweep import ERROR_FILE
from metarun.runners.trainer import Trainer, eval_episodes, results_record, write_results

log = logging.getLogger("metarun")

# what `mode=test` may change in a checkpoint's stored config
TEST_OVERRIDABLE = ("way", "shot", "query", "eval.", "data.root", "data.download", "device")


def overrides() -> list[str]:
    """This job's command-line overrides (Hydra's own excluded)."""
    return list(HydraConfig.get().overrides.task)


def override_keys() -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides()]


def find_resumable(output_root: Path, wanted: list[str]) -> Path | None:
    """The newest run under output_root launched with the same overrides, with a last.pt."""
    best = None
    for file in Path(output_root).glob("**/.hydra/overrides.yaml"):
        run = file.parent.parent
        last = run / "checkpoints" / "last.pt"
        if not last.exists():  # includes this job's own, brand-new folder
            continue
        if same_overrides(yaml.safe_load(file.read_text()) or [], wanted):
            if best is None or last.stat().st_mtime > best.stat().st_mtime:
                best = last
    return best


def same_overrides(a: list[str], b: list[str]) -> bool:
    def norm(items):
        return sorted(o for o in items if not o.startswith("resume="))

    return norm(a) == norm(b)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    device = resolve_device(cfg.device)
    if not distributed.launched():
        run_dir, resume_from = resume_point(cfg, run_dir)
        return Trainer(cfg, run_dir, device).fit(resume_from)
    distributed.local_tasks(cfg.trainer.meta_batch)  # an uneven split fails before any work
    device = distributed.init(device)
    try:
        if not distributed.is_main():  # rank 0 speaks for the run
            logging.getLogger("metarun").setLevel(logging.WARNING)
        # rank 0's run directory and checkpoint, for every rank
        run_dir, resume_from = distributed.from_main(
            resume_point(cfg, run_dir) if distributed.is_main() else None
        )
        results = Trainer(cfg, run_dir, device).fit(resume_from)
    except BaseException:
        distributed.close(wait=False)  # no barrier: the other ranks may never reach it
        raise
    distributed.close()
    return results


def requeued(run_dir: Path) -> bool:
    """A job that submitit (the submitit_local / slurm_gpu launchers) started again after a
    pre-emption or a time-out: it runs in the same job folder, which holds its last.pt."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) and (run_dir / "checkpoints/last.pt").exists()


def resume_point(cfg: DictConfig, run_dir: Path) -> tuple[Path, Path | None]:
    """The run directory to write into and the checkpoint to continue from (or None)."""
    resume_from = None
    if cfg.get("resume") == "auto":
        resume_from = find_resumable(Path(cfg.paths.output_root), overrides())
        if resume_from is None:
            log.info("resume=auto: no earlier run with these overrides; starting a new run")
    elif cfg.get("resume"):
        resume_from = Path(str(cfg.resume)).expanduser()
        if resume_from.is_dir():
            resume_from = resume_from / "checkpoints" / "last.pt"
    elif requeued(run_dir):
        resume_from = run_dir / "checkpoints" / "last.pt"
        log.info("requeued job (submitit): continuing from its own %s", resume_from)
    if resume_from is not None:
        run_dir = resume_from.parent.parent  # continue writing into the run being resumed
        log.info("continuing run %s", run_dir)
    return run_dir, resume_from


def test(cfg: DictConfig, run_dir: Path) -> dict:
    """Evaluate a checkpoint with its own config; only evaluation settings may change."""
    state = checkpoint.load(cfg.ckpt)
    stored = OmegaConf.create(state["config"])
    for key in override_keys():
        if key in ("mode", "ckpt", "resume", "paths.output_root") or key.startswith("logger"):
            continue
        if not key.startswith(TEST_OVERRIDABLE):
            raise ConfigError(
                f"mode=test uses the checkpoint's config; {key}= cannot be changed "
                f"(allowed: way, shot, query, eval.*, data.root, data.download, device)"
            )
        target = f"eval.{key}" if key in ("way", "shot", "query") else key
        OmegaConf.update(stored, target, OmegaConf.select(cfg, key), merge=False)
    validate(OmegaConf.merge(stored, {"mode": "test", "ckpt": cfg.ckpt}))
    device = resolve_device(stored.device)
    learner = checkpoint.load_learner(state["path"], device=device)
    episodes = eval_episodes(
        stored, build_store(stored.data, "test"), stored.eval.episodes, device, "test"
    )
    result = evaluate(learner, episodes, stored.eval.batch)
    results = results_record(
        stored,
        result,
        steps=state["step"],
        ckpt=state["path"],
        **learner.test_report(episodes, stored.eval.batch),
    )
    write_results(run_dir, results)
    return results


def predict(cfg: DictConfig, run_dir: Path) -> list[dict]:
    from metarun.runners.predict import predict_folder, print_predictions

    learner = checkpoint.load_learner(cfg.ckpt, device=resolve_device(cfg.device))
    out = run_dir / "predictions.csv"
    rows = predict_folder(learner, cfg.support, cfg.query, out)
    print_predictions(rows, out)
    return rows


MODES = {"train": train, "test": test, "predict": predict}


def optimizing() -> bool:
    """Under an optimizing sweeper (Optuna), the app returns the objective."""
    return "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


def sweep_objective(results) -> float:
    """The best validation score of the run: accuracy (maximize), or MSE for regression
    (set hydra.sweeper.direction=minimize). Never the test score."""
    if (
        not isinstance(results, dict)
        or "best_val_acc" not in results
        and "best_val_mse" not in results
    ):
        raise ConfigError("an optimizing sweep needs mode=train runs with validation")
    return float(results.get("best_val_acc", results.get("best_val_mse")))


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def app(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        configure_tf32(cfg.get("tf32", False))
        if distributed.launched() and cfg.mode != "train":
            raise ConfigError(
                f"mode={cfg.mode} runs in one process; run it without torchrun "
                "(only meta-training is split over processes)"
            )
        out = MODES[cfg.mode](cfg, run_dir)
        return sweep_objective(out) if optimizing() else out
    except Exception as err:
        if os.environ.get("METARUN_DEBUG"):
            raise
        if isinstance(err, StoppedError) and err.exit_code >= 128:
            # a signal (Ctrl-C, pre-emption) stops the whole command, a sweep too
            print(f"metarun: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # one job of a sweep: record the error and let the other jobs run; the sweep
            # summary (runners/sweep.py) reports it and the sweep exits non-zero
            message = str(err) if isinstance(err, MetarunError) else f"{type(err).__name__}: {err}"
            if not isinstance(err, MetarunError):
                log.exception("job failed")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ERROR_FILE).write_text(message + "\n")
            print(f"metarun: error in job {run_dir.name}: {message}", file=sys.stderr)
            return float("nan") if optimizing() else None  # Optuna records a failed trial
        if not isinstance(err, MetarunError):
            raise
        print(f"metarun: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code if isinstance(err, StoppedError) else 2)


def main() -> None:
    if distributed.launched():
        torchrun_arguments()
    app()


def torchrun_arguments() -> None:
    """Under torchrun, ranks other than 0 write nothing of their own: Hydra gets a throwaway
    run directory and logs to the console only (they use rank 0's run directory)."""
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        print(
            "metarun: error: a sweep (-m) cannot run under torchrun; launch torchrun once per "
            "job, or sweep with a launcher (hydra/launcher=slurm_gpu, local_gpu)",
            file=sys.stderr,
        )
        sys.exit(2)
    if distributed.is_main():
        return
    scratch = tempfile.mkdtemp(prefix=f"metarun-rank{distributed.world()[0]}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    sys.argv += [
        f"hydra.run.dir={scratch}",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
    ]


if __name__ == "__main__":
    main()
