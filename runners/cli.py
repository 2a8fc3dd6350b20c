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
import signal
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from metarun.errors import ConfigError, MetarunError, StoppedError
from metarun.runners import checkpoint, distributed, rundir
from metarun.runners.build import (
    NAMED_GROUPS,
    build_store,
    choice,
    configure_tf32,
    resolve_device,
)
from metarun.runners.files import os_error, write_text_atomic
from metarun.runners.logging import RunLogger
from metarun.runners.results import score
from metarun.runners.stopping import Interrupted, stop_signals
from metarun.runners.sweep import CONTINUED_FILE, ERROR_FILE
from metarun.runners.trainer import Trainer, eval_episodes
from metarun.runners.validate import check_protocol_fits_data, validate

log = logging.getLogger("metarun")

# what `mode=test` may change in a checkpoint's stored config
TEST_OVERRIDABLE = ("way", "shot", "query", "eval.", "data.root", "data.download", "device")


def overrides() -> list[str]:
    """This job's command-line overrides (Hydra's own excluded)."""
    return list(HydraConfig.get().overrides.task)


def override_keys() -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides()]


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


def resume_point(cfg: DictConfig, run_dir: Path) -> tuple[Path, Path | None]:
    """The run folder to write into and the checkpoint to continue from (or None).

    A single run was pointed at the resumed run's folder by the RunFolder callback
    (runners/rundir.py); a sweep's job that continues an earlier run writes into that
    run's folder, and its log goes there too."""
    ckpt = rundir.resume_checkpoint(
        cfg.get("resume"), overrides(), Path(cfg.paths.output_root), run_dir
    )
    if ckpt is None:
        if cfg.get("resume") == "auto":
            log.info("resume=auto: no earlier run with these overrides; starting a new run")
        return run_dir, None
    run = rundir.run_folder_of(ckpt)
    if rundir.requeued(run_dir) and not cfg.get("resume"):
        log.info("requeued job (submitit): continuing from its own %s", ckpt)
    if run is None or run.resolve() == run_dir.resolve():
        log.info("continuing from %s in %s", ckpt, run_dir)
        return run_dir, ckpt
    rundir.acquire(run)
    write_text_atomic(run_dir / CONTINUED_FILE, f"{run}\n", "pointer file")
    log_into(run)
    log.info("continuing run %s", run)
    return run, ckpt


def log_into(run: Path) -> None:
    """Send this job's log lines to `run`'s log as well (until the job ends)."""
    handler = logging.FileHandler(run / "metarun.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    _extra_logs.append(handler)


def close_extra_logs() -> None:
    while _extra_logs:
        handler = _extra_logs.pop()
        logging.getLogger().removeHandler(handler)
        handler.close()


_extra_logs: list[logging.Handler] = []


def test(cfg: DictConfig, run_dir: Path) -> dict:
    """Evaluate a checkpoint with its own config; only evaluation settings may change.
    Several checkpoints (ckpt=[A,B,...]) are scored as one ensemble, with the first one's
    config."""
    states = checkpoint.load_states(cfg.ckpt, trust=cfg.get("trust_checkpoint", False))
    state = states[0]
    stored = OmegaConf.create(state["config"])
    for key in override_keys():
        if key in ("mode", "ckpt", "resume", "trust_checkpoint") or key.startswith(
            ("logger", "paths.")
        ):
            continue
        if not key.startswith(TEST_OVERRIDABLE):
            raise ConfigError(
                f"mode=test uses the checkpoint's config; {key}= cannot be changed "
                f"(allowed: way, shot, query, eval.*, data.root, data.download, device)"
            )
        target = f"eval.{key}" if key in ("way", "shot", "query") else key
        OmegaConf.update(stored, target, OmegaConf.select(cfg, key), merge=False)
        if target.startswith("eval.") and stored.get("paper") is not None:
            stored.paper = None  # the paper's figure is for the preset's own test setting
    validate(OmegaConf.merge(stored, {"mode": "test", "ckpt": cfg.ckpt}))
    check_protocol_fits_data(stored)
    device = resolve_device(stored.device)
    if len(states) == 1:
        learner = checkpoint.load_learner(state, device=device)
        extra = {"steps": state["step"], "ckpt": state["path"]}
    else:
        learner = checkpoint.ensemble_of(states, device=device)
        members = [OmegaConf.create(s["config"]) for s in states]
        extra = {
            "algo": f"ensemble of {len(states)} ({', '.join(sorted({choice(m, 'algo') for m in members}))})",
            "steps": [s["step"] for s in states],
            "ckpt": [s["path"] for s in states],
        }
    episodes = eval_episodes(
        stored, build_store(stored.data, "test"), stored.eval.episodes, device, "test"
    )
    # on the dashboard: a `test` run in the training run's group, naming the training run
    stored.logger = cfg.logger
    logger = RunLogger(
        run_dir,
        stored,
        job_type="test",
        extra_config={
            "group": state.get("wandb_group"),
            "train_run_id": state.get("wandb_id"),
            "ckpt": extra["ckpt"],
        },
    )
    try:
        return score(
            learner,
            episodes,
            stored,
            run_dir,
            logger,
            extra,
        )
    finally:
        logger.finish()


def predict(cfg: DictConfig, run_dir: Path) -> list[dict]:
    from metarun.runners.predict import predict_folder, print_predictions

    learner = checkpoint.load_learner(
        cfg.ckpt, device=resolve_device(cfg.device), trust=cfg.get("trust_checkpoint", False)
    )
    out = run_dir / "predictions.csv"
    rows = predict_folder(learner, cfg.support, cfg.query, out, cfg.eval.assignment)
    print_predictions(rows, out)
    if cfg.logger.get("name") == "wandb":
        stored = OmegaConf.merge(learner.config, {"logger": cfg.logger, "mode": "predict"})
        ckpt = checkpoint.paths_of(cfg.ckpt)
        logger = RunLogger(
            run_dir,
            stored,
            job_type="predict",
            extra_config={"ckpt": ckpt[0] if len(ckpt) == 1 else ckpt},
        )
        try:
            columns = list(rows[0]) if rows else ["query", "predicted", "score"]
            logger.table("predictions", columns, [[r[c] for c in columns] for r in rows])
        finally:
            logger.finish()
    return rows


def continual(cfg: DictConfig, run_dir: Path) -> dict:
    from metarun.runners.continual import ContinualRun

    run_dir, ckpt = resume_point(cfg, run_dir)  # resume= as for mode=train
    return ContinualRun(cfg, run_dir, resolve_device(cfg.device)).run(ckpt)


MODES = {"train": train, "test": test, "predict": predict, "continual": continual}


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
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        with stop_signals():
            try:
                if multirun and distributed.is_main():
                    rundir.take_job_folder(run_dir, rundir.requeued(run_dir))
                record_choices(cfg)
                validate(cfg)
                configure_tf32(cfg.get("tf32", False))
                if distributed.launched() and cfg.mode != "train":
                    raise ConfigError(
                        f"mode={cfg.mode} runs in one process; run it without torchrun "
                        "(only meta-training is split over processes)"
                    )
                out = MODES[cfg.mode](cfg, run_dir)
            except Interrupted as stop:
                raise interrupted(stop, cfg, run_dir) from None
            except OSError as err:  # one that no part of metarun explained: say which path
                raise os_error(err, f"mode={cfg.mode} failed") from err
        return sweep_objective(out) if optimizing() else out
    except Exception as err:
        return failed(err, run_dir, multirun)
    finally:
        close_extra_logs()
        rundir.release(run_dir)


def record_choices(cfg: DictConfig) -> None:
    """cfg.choices: which option of each group that changes the computation this run
    uses (Hydra's runtime choices, e.g. algo: maml even when a preset chose it), so that
    results, run names and checkpoints name the learner without a key in its node."""
    chosen = HydraConfig.get().runtime.choices
    with open_dict(cfg):
        cfg.choices = {group: chosen.get(group) for group in NAMED_GROUPS}


def interrupted(stop: Interrupted, cfg: DictConfig, run_dir: Path) -> StoppedError:
    """A signal outside the training loop (which explains its own): nothing to resume."""
    doing = {
        "train": "before training started",
        "test": "during the test; nothing was written",
        "predict": "during prediction; nothing was written",
    }.get(cfg.mode, "")
    return StoppedError(
        f"interrupted by {stop.name} {doing}; run the command again to start over",
        exit_code=128 + stop.signum,
    )


def failed(err: Exception, run_dir: Path, multirun: bool):
    """Print a user-facing error (a traceback only for a bug) and exit, or, for a job of a
    sweep, record it and let the other jobs run."""
    if os.environ.get("METARUN_DEBUG"):
        raise err
    if isinstance(err, MetarunError):  # the run's log says how it ended, too
        to_log_files(logging.WARNING if isinstance(err, StoppedError) else logging.ERROR, str(err))
    if isinstance(err, StoppedError) and err.exit_code >= 128:
        # a signal (Ctrl-C, pre-emption) stops the whole command, a sweep too
        print(f"metarun: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    if multirun:
        # one job of a sweep: record the error and let the other jobs run; the sweep
        # summary (runners/sweep.py) reports it and the sweep exits non-zero
        message = str(err) if isinstance(err, MetarunError) else f"{type(err).__name__}: {err}"
        if not isinstance(err, MetarunError):
            log.exception("job failed")
        try:
            write_text_atomic(run_dir / ERROR_FILE, message + "\n", "error file")
        except MetarunError as also:
            print(f"metarun: {also}", file=sys.stderr)
        print(f"metarun: error in job {run_dir.name}: {message}", file=sys.stderr)
        return float("nan") if optimizing() else None  # Optuna records a failed trial
    if not isinstance(err, MetarunError):
        raise err
    print(f"metarun: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code if isinstance(err, StoppedError) else 2)


def to_log_files(level: int, message: str) -> None:
    """A line in the run's log file (metarun.log) only: the console gets the message once,
    on stderr."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main() -> None:
    if distributed.launched():
        torchrun_arguments()
    sys.argv[1:] = checkpoint_data_overrides(sys.argv[1:])
    try:
        with stop_signals():
            app()
    except (Interrupted, KeyboardInterrupt) as stop:  # before the run started
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"metarun: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)


def checkpoint_data_overrides(args: list[str]) -> list[str]:
    """mode=test takes its data set from the checkpoint, while Hydra composes the default
    one (synthetic, without a root): `data.root=DIR` / `data.download=...` would be refused
    as keys that data set lacks, so they become `++data.root=DIR` (set whether or not the
    composed data set has the key), to be applied to the checkpoint's data config."""
    if "mode=test" not in args:
        return args
    return [f"++{a}" if a.startswith(("data.root=", "data.download=")) else a for a in args]


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
