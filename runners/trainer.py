"""The episodic loop: sample, step, log, validate, checkpoint; then test.

It never branches on the algorithm: every learner is driven through
`meta_train_step` and `predict`.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import shutil
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.base import NonFiniteLoss
from metarun.data.episodes import fixed_episodes
from metarun.data.errors import ConfigError, StoppedError
from metarun.runners import checkpoint, distributed
from metarun.runners.build import build_learner, build_stores, train_sampler
from metarun.runners.evaluate import evaluate, higher_is_better
from metarun.runners.logging import NullLogger, Progress, RunLogger
from metarun.runners.stopping import StopSignals

log = logging.getLogger("metarun")

# settings a resumed run must share with its checkpoint (trainer.steps may grow)
RESUME_MUST_MATCH = (
    "algo",
    "backbone",
    "data",
    "way",
    "shot",
    "query",
    "seed",
    "trainer.meta_batch",
    "trainer.lr",
)


def eval_episodes(cfg: DictConfig, store, n: int, device, split: str):
    """The fixed episodes every algorithm is scored on, in the evaluation shape."""
    e = cfg.eval
    return fixed_episodes(store, n, e.way, e.shot, e.query, seed=e.seed, device=device, split=split)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.ckpt_dir = self.run_dir / "checkpoints"
        stores = build_stores(cfg.data)
        # every shape check happens here, before the first step
        self.sampler = train_sampler(cfg, stores["train"], device)
        self.val = eval_episodes(cfg, stores["val"], cfg.trainer.val_episodes, device, "val")
        self.test_episodes = eval_episodes(cfg, stores["test"], cfg.eval.episodes, device, "test")
        torch.manual_seed(cfg.seed)
        self.learner = build_learner(cfg).to(device)
        self.learner.set_precision(cfg.trainer.amp)
        self.learner.nan_policy = cfg.trainer.get("nan_policy", "stop")
        if cfg.trainer.get("compile"):
            check_compiler(device)
            self.learner.compile_network()
        self.learner.configure_optimizer(cfg.trainer.lr)
        tc = cfg.trainer
        self.schedule = lr_schedule(
            self.learner.optimizer,
            tc.schedule,
            tc.steps,
            tc.get("decay_every"),
            tc.get("decay_factor", 0.5),
        )
        self.step, self.best_val, self.best_step, self.elapsed = 0, -math.inf, 0, 0.0
        self.wandb_id = None
        # several processes (torchrun): this rank's share of each meta-batch, gradients
        # averaged before every update, rank 0 alone validates, logs and writes
        self.parallel = distributed.launched()
        self.main = distributed.is_main()
        self.tasks = distributed.local_tasks(tc.meta_batch) if self.parallel else None
        if self.parallel:
            self.learner.grad_sync = distributed.average_gradients
            distributed.broadcast_state(self.learner)

    # -- checkpoints ------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.learner.state_dict(),
            "optimizer": self.learner.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": checkpoint.rng_state(),
            "step": self.step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "wandb_id": self.wandb_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def restore(self, path: str | Path) -> None:
        state = checkpoint.load(path)
        check_compatible(self.cfg, OmegaConf.create(state["config"]), state["path"])
        self.learner.load_state_dict(state["model"])
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        # the learning rate of the next step from this run's schedule: the stored one came
        # from the checkpoint's, which differs when trainer.steps grew (cosine, linear)
        epoch = self.schedule.last_epoch
        lrs = [base * f(epoch) for base, f in zip(self.schedule.base_lrs, self.schedule.lr_lambdas)]
        for group, lr in zip(self.learner.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.schedule._last_lr = lrs
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.best_val, self.best_step = (
            state["step"],
            state["best_val"],
            state["best_step"],
        )
        self.elapsed, self.wandb_id = state["elapsed"], state.get("wandb_id")
        log.info("resumed from %s at step %d", state["path"], self.step)

    # -- the loop -----------------------------------------------------------------
    def fit(self, resume_from: str | Path | None = None) -> dict:
        if resume_from:
            self.restore(resume_from)
        tc = self.cfg.trainer
        logger = (
            RunLogger(
                self.run_dir,
                self.cfg,
                resume_step=self.step if resume_from else None,
                wandb_id=self.wandb_id,
            )
            if self.main
            else NullLogger()
        )
        self.wandb_id = logger.wandb_id
        progress = Progress(tc.steps, start=self.step, enabled=None if self.main else False)
        window, started = [], time.perf_counter() - self.elapsed
        try:
            with StopSignals() as signals:
                while self.step < tc.steps:
                    episodes = self.sampler.sample(tc.meta_batch)
                    if self.tasks is not None:
                        episodes = episodes[self.tasks]
                    try:
                        window.append(self.learner.meta_train_step(episodes))
                    except NonFiniteLoss as err:
                        self.stop_non_finite(err, logger)
                    if self.parallel:  # batch-norm running statistics: rank 0's
                        distributed.broadcast_buffers(self.learner)
                    self.schedule.step()
                    self.step += 1
                    self.elapsed = time.perf_counter() - started
                    row = self.after_step(window, logger)
                    progress.update(self.step, row)
                    signum = signals.requested(self.parallel)
                    if signum is not None:
                        self.stop_for_signal(signum)
            progress.close()  # before the test summary is printed
            results = self.test(logger) if self.main else {}
        finally:
            progress.close()
            logger.finish()
        return results

    # -- stopping on purpose -----------------------------------------------------------
    def write_last(self, state: dict) -> None:
        """last.pt; with trainer.keep_last=N > 1 also step-<N>.pt files, the newest N kept."""
        keep = int(self.cfg.trainer.get("keep_last", 1))
        if keep <= 1:
            checkpoint.save_atomic(state, self.ckpt_dir / "last.pt")
        else:
            checkpoint.save_rotating(state, self.ckpt_dir, self.step, keep)

    def save_last(self) -> Path:
        """last.pt at the current step (rank 0 writes)."""
        if self.main:
            self.write_last(self.state())
        return self.ckpt_dir / "last.pt"

    def resume_hint(self) -> str:
        """The command that continues this run."""
        words = ["metarun", *command_overrides(), f"resume={self.run_dir}"]
        return " ".join(words)

    def stop_for_signal(self, signum: int) -> None:
        tc = self.cfg.trainer
        if not (self.step % tc.ckpt_every == 0 or self.step == tc.steps):  # not yet written
            self.save_last()
        name = signal.Signals(signum).name
        raise StoppedError(
            f"interrupted by {name} at step {self.step} of {self.cfg.trainer.steps}; "
            f"checkpoint written to {self.ckpt_dir / 'last.pt'}. Resume with:\n"
            f"  {self.resume_hint()}",
            exit_code=128 + signum,
        )

    def stop_non_finite(self, err: NonFiniteLoss, logger) -> None:
        """trainer.nan_policy=stop: the weights are still those of the last good step."""
        path = self.save_last()
        logger.log(self.step + 1, {"nonfinite": 1.0})
        raise StoppedError(
            f"{err} at step {self.step + 1}: training stopped, and {path} holds the weights "
            f"after step {self.step}, the last good one. Likely causes: the outer learning "
            f"rate (trainer.lr={self.cfg.trainer.lr}) or an inner step size "
            f"(algo.inner_lr={self.cfg.algo.get('inner_lr')}) too large for this model and "
            "data, or trainer.amp=fp16 overflowing. Start a new run with smaller values; or "
            "trainer.nan_policy=skip skips such updates and counts them.",
            exit_code=3,
        )

    def after_step(self, window: list, logger: RunLogger) -> dict | None:
        """Log, validate and checkpoint on their schedules; returns what was logged."""
        tc, step = self.cfg.trainer, self.step
        last = step == tc.steps
        row = {}
        if step % tc.log_every == 0 or last:
            # one host sync per log interval: stack the window's scalars, then average
            means = torch.stack(
                [torch.stack([m[k].float().mean() for m in window]).mean() for k in window[0]]
            )
            if self.parallel:  # every rank logs at the same steps: average over all tasks
                means = distributed.average(means)
            row = dict(zip(window[0], means.tolist()))
            row["lr"] = self.schedule.get_last_lr()[0]
            if self.learner.skipped_updates:  # trainer.nan_policy=skip
                row["skipped_updates"] = self.learner.skipped_updates
            row["seconds"] = round(self.elapsed, 3)
            window.clear()
        save_best = False
        if not self.main:  # rank 0 alone validates, logs and writes checkpoints
            return row or None
        if step % tc.val_every == 0 or last:
            val = evaluate(self.learner, self.val, self.cfg.eval.batch)
            row.update({f"val_{val['metric']}": val[val["metric"]], "val_ci95": val["ci95"]})
            score = higher_is_better(val)  # accuracy, or minus the MSE
            if math.isfinite(score) and score > self.best_val:
                self.best_val, self.best_step, save_best = score, step, True
        if row:  # before the checkpoint: a checkpoint at step N implies its metrics are written
            logger.log(step, row)
        save_last = step % tc.ckpt_every == 0 or last
        if save_best or save_last:
            state = self.state()  # gathered once, after best_val is updated, for both files
            if save_best:
                checkpoint.save_atomic(state, self.ckpt_dir / "best.pt")
            if save_last:
                self.write_last(state)
        return row or None

    def test(self, logger: RunLogger) -> dict:
        """Score the best-validation weights on the fixed test episodes."""
        path = self.ckpt_dir / "best.pt"
        if not path.exists():  # no validation score was finite (e.g. nan_policy=skip)
            log.warning("no finite validation score in this run: testing the last weights")
            path, self.best_step = self.ckpt_dir / "last.pt", None
        self.learner.load_state_dict(checkpoint.load(path)["model"])
        result = evaluate(self.learner, self.test_episodes, self.cfg.eval.batch)
        metric = result["metric"]
        results = results_record(
            self.cfg,
            result,
            steps=self.step,
            seconds=self.elapsed,
            best_step=self.best_step,
            **{f"best_val_{metric}": self.best_val if metric == "acc" else -self.best_val},
            **self.learner.test_report(self.test_episodes, self.cfg.eval.batch),
        )
        write_results(self.run_dir, results)
        summary = {f"test_{metric}": results[f"test_{metric}"], "ci95": results["ci95"]}
        for k, acc in results.get("instance_acc", {}).items():  # MANN: accuracy by instance
            summary[f"test_acc_inst{k}"] = acc
        logger.summary(summary)
        if self.cfg.logger.get("log_checkpoint"):
            logger.log_checkpoint(
                path, self.best_step or self.step, {"step": self.best_step, **summary}
            )
        return results


def lr_schedule(
    optimizer, kind: str, steps: int, decay_every: int | None = None, decay_factor: float = 0.5
) -> torch.optim.lr_scheduler.LambdaLR:
    """constant; cosine or linear decay from trainer.lr to 0 over trainer.steps; or step decay,
    trainer.lr times decay_factor after every decay_every steps."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
    if kind == "linear":  # e.g. Reptile's outer step size, annealed to 0
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1 - min(step, steps) / steps)
        )
    if kind == "step":
        if isinstance(decay_every, bool) or not isinstance(decay_every, int) or decay_every < 1:
            raise ConfigError(
                f"trainer.schedule=step needs trainer.decay_every, a positive number of steps, "
                f"got {decay_every!r}; e.g. trainer.decay_every=100000 trainer.decay_factor=0.5"
            )
        if not 0 < decay_factor <= 1:
            raise ConfigError(
                f"trainer.decay_factor={decay_factor!r} must be in (0, 1]; e.g. 0.5 halves the lr"
            )
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: decay_factor ** (step // decay_every)
        )
    raise ConfigError(f"trainer.schedule={kind!r}; choose constant, cosine, linear or step")


def command_overrides() -> list[str]:
    """This job's command-line overrides (quoted for a shell), or [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [shlex.quote(o) for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code generator (inductor) builds C++; say so before any work."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        raise ConfigError(
            "trainer.compile=true on the CPU needs a C++ compiler (g++ or clang++) for "
            "torch.compile's inductor backend, and none is on PATH; install one "
            "(e.g. apt install g++) or set trainer.compile=false"
        )


def check_compatible(cfg: DictConfig, stored: DictConfig, path: str) -> None:
    """A checkpoint only continues the run it came from."""
    diffs = []
    for key in RESUME_MUST_MATCH:
        a, b = OmegaConf.select(stored, key), OmegaConf.select(cfg, key)
        a = OmegaConf.to_container(a, resolve=True) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b, resolve=True) if OmegaConf.is_config(b) else b
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    if diffs:
        raise checkpoint.CheckpointError(
            f"cannot resume from {path}: its config differs from this run's ({'; '.join(diffs)}). "
            "Resume with the same overrides, or start a new run without resume=."
        )


def results_record(cfg: DictConfig, result: dict, **extra) -> dict:
    metric = result["metric"]
    return {
        f"test_{metric}": result[metric],
        "ci95": result["ci95"],
        "episodes": result["episodes"],
        "way": cfg.eval.way,
        "shot": cfg.eval.shot,
        "query": cfg.eval.query,
        "algo": cfg.algo.name,
        "data": cfg.data.name,
        **extra,
    }


def write_results(run_dir: Path, results: dict) -> None:
    path = Path(run_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    if "test_mse" in results:
        log.info(
            "test MSE %.4f ± %.4f (95%% CI, %d tasks of %d-shot regression) -> %s",
            results["test_mse"],
            results["ci95"],
            results["episodes"],
            results["shot"],
            path,
        )
        return
    log.info(
        "test accuracy %.2f%% ± %.2f%% (95%% CI, %d episodes of %d-way %d-shot) -> %s",
        100 * results["test_acc"],
        100 * results["ci95"],
        results["episodes"],
        results["way"],
        results["shot"],
        path,
    )
