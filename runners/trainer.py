"""The episodic loop: sample, step, log, validate, checkpoint; then test.

It never branches on the algorithm: every learner is driven through
`meta_train_step` and `predict`.
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms import second_order
from metarun.algorithms.base import NonFiniteLoss
from metarun.data.episodes import fixed_episodes
from metarun.errors import CheckpointError, ConfigError, StoppedError
from metarun.runners import checkpoint, distributed
from metarun.runners.build import (
    build_learner,
    build_stores,
    choice,
    data_arguments,
    instantiate_clean,
    train_sampler,
)
from metarun.runners.evaluate import eval_protocol, evaluate_as, higher_is_better, val_assignment
from metarun.runners.files import FileSystemError, remove_stale_temps
from metarun.runners.logging import NullLogger, Progress, RunLogger
from metarun.runners.results import score
from metarun.runners.stopping import Interrupted, stop_signals

log = logging.getLogger("metarun")

# Settings a resumed run may change: where things are read and written, how often progress
# is logged or saved, the device, how many test episodes go through one forward pass, and
# (growing only) trainer.steps. Every other setting changes what is computed or how it is
# scored, so it must equal the checkpoint's: the list of what must match is the whole
# config minus these, so a setting added later is checked without being listed anywhere.
RESUME_MAY_CHANGE = (
    "resume",
    "mode",
    "ckpt",
    "support",
    "trust_checkpoint",
    "paper",
    "paths",
    "logger",
    "device",
    "data.root",
    "data.download",
    "trainer.steps",
    "trainer.log_every",
    "trainer.ckpt_every",
    "trainer.keep_last",
    "eval.batch",
)


def eval_episodes(cfg: DictConfig, store, n: int, device, split: str):
    """The fixed episodes every algorithm is scored on, in the evaluation shape and by the
    evaluation protocol; eval.alphabets chooses the test episodes' alphabets (validation
    episodes use every alphabet of the val split, which holds other alphabets)."""
    e = cfg.eval
    protocol, alphabets = eval_protocol(cfg)
    return fixed_episodes(
        store,
        n,
        e.way,
        e.shot,
        e.query,
        seed=e.seed,
        device=device,
        split=split,
        protocol=protocol,
        alphabets=alphabets if split == "test" else None,
    )


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
        self.from_data = data_arguments(cfg, stores["train"])  # e.g. Baseline's num_classes
        self.learner = build_learner(cfg, **self.from_data).to(device)
        self.learner.set_precision(cfg.trainer.amp)
        self.learner.nan_policy = cfg.trainer.get("nan_policy", "stop")
        self.learner.grad_clip = cfg.trainer.get("grad_clip")
        if cfg.trainer.get("compile"):
            check_compiler(device)
            self.learner.compile_network()
        if device.type == "cpu" and any(
            isinstance(m, second_order.FusedConv2d) for m in self.learner.modules()
        ):
            second_order.extension()  # a first build (about 35 s) before the clock starts
        self.learner.configure_optimizer(instantiate_clean(cfg.optimizer))
        tc = cfg.trainer
        self.schedule = lr_schedule(
            self.learner.optimizer,
            tc.schedule,
            tc.steps,
            tc.get("decay_every"),
            tc.get("decay_factor", 0.5),
        )
        self.step, self.best_val, self.best_step, self.elapsed = 0, -math.inf, 0, 0.0
        self.wandb_id, self.pending = None, False
        self.trust = bool(cfg.get("trust_checkpoint", False))
        # several processes (torchrun): this rank's share of each meta-batch, gradients
        # averaged before every update, rank 0 alone validates, logs and writes
        self.parallel = distributed.launched()
        self.main = distributed.is_main()
        self.tasks = distributed.local_tasks(tc.meta_batch) if self.parallel else None
        self.show_episode = None  # the logger to show the first training episode to
        self.wandb_id = self.wandb_group = None
        if self.parallel:
            self.learner.grad_sync = distributed.average_gradients
            distributed.broadcast_state(self.learner)

    # -- checkpoints ------------------------------------------------------------
    def state(self, window: list, pending: bool = False, rng: dict | None = None) -> dict:
        """Everything a resumed run needs to go on exactly as this one would: tensors and
        plain data only, so that loading it runs no code (runners/checkpoint.py).

        window: the metrics of the steps since the last log row (a resumed run logs the
        same rows); pending: the bookkeeping of this step (validation, log row, checkpoint)
        is not done yet, and `rng` holds the generators' state from before it started."""
        scaler = self.learner.scaler
        return {
            "model": self.learner.state_dict(),
            "optimizer": self.learner.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng or checkpoint.rng_state(),
            "step": self.step,
            "pending": pending,
            "window": [{k: v.detach().cpu() for k, v in m.items()} for m in window],
            "skipped_updates": self.learner.skipped_updates,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "wandb_id": self.wandb_id,
            "wandb_group": self.wandb_group,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "from_data": self.from_data,
        }

    def restore(self, path: str | Path) -> list:
        """Continue from a checkpoint; returns the metrics window it held."""
        state = checkpoint.load(path, trust=self.trust)
        check_compatible(self.cfg, OmegaConf.create(state["config"]), state["path"], state["step"])
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
        if state.get("scaler") and self.learner.scaler is not None:
            self.learner.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.best_val, self.best_step = (
            state["step"],
            state["best_val"],
            state["best_step"],
        )
        self.elapsed, self.wandb_id = state["elapsed"], state.get("wandb_id")
        self.wandb_group = state.get("wandb_group")
        self.learner.skipped_updates = state.get("skipped_updates", 0)
        self.pending = bool(state.get("pending", False))
        log.info("resumed from %s at step %d", state["path"], self.step)
        device = self.device
        return [{k: v.to(device) for k, v in m.items()} for m in state.get("window", [])]

    def snapshot(self) -> dict:
        """What a step changes besides the weights and the optimizer state (which only the
        update changes): put back when a second signal cuts the step short."""
        return {
            "sampler": self.sampler.state_dict(),
            "rng": checkpoint.rng_state(),
            "buffers": {n: b.detach().clone() for n, b in self.learner.named_buffers()},
            "skipped_updates": self.learner.skipped_updates,
        }

    def put_back(self, snap: dict) -> None:
        self.sampler.load_state_dict(snap["sampler"])
        checkpoint.set_rng_state(snap["rng"])
        with torch.no_grad():
            for name, buffer in self.learner.named_buffers():
                buffer.copy_(snap["buffers"][name])
        self.learner.skipped_updates = snap["skipped_updates"]

    # -- the loop -----------------------------------------------------------------
    def fit(self, resume_from: str | Path | None = None) -> dict:
        if self.main:
            for tmp in remove_stale_temps(self.ckpt_dir):
                log.info("removed %s, left by a run stopped while writing it", tmp)
        window = self.restore(resume_from) if resume_from else []
        # a checkpoint written in the middle of a step's bookkeeping: that part runs again
        pending = resume_from is not None and self.pending
        logger = (
            RunLogger(
                self.run_dir,
                self.cfg,
                resume_step=(self.step - pending) if resume_from else None,
                wandb_id=self.wandb_id,
            )
            if self.main
            else NullLogger()
        )
        self.wandb_id, self.wandb_group = logger.wandb_id, logger.wandb_group
        self.show_episode = logger if logger.wants_media and self.step == 0 else None
        progress = Progress(
            self.cfg.trainer.steps, start=self.step, enabled=None if self.main else False
        )
        try:
            with stop_signals() as signals:
                hook = self.learner.optimizer.register_step_pre_hook(signals.begin_commit)
                try:
                    self.train_loop(signals, window, logger, progress, pending)
                finally:
                    hook.remove()
                progress.close()  # before the test summary is printed
                return self.final_test(logger) if self.main else {}
        finally:
            progress.close()
            logger.finish()

    def train_loop(self, signals, window: list, logger, progress, pending: bool) -> None:
        tc = self.cfg.trainer
        started = time.perf_counter() - self.elapsed
        with signals.training():
            if pending:
                self.bookkeeping(window, logger, signals)
            while self.step < tc.steps:
                self.one_step(window, signals, started)
                row = self.bookkeeping(window, logger, signals)
                progress.update(self.step, row)
                signum = signals.requested(self.parallel)
                if signum is not None:
                    self.stop_for_signal(signum, window)

    def one_step(self, window: list, signals, started: float) -> None:
        """Sample, update, count. The update (from the optimizer's first write to the step
        count) runs to its end even when a signal arrives inside it."""
        snap = self.snapshot()
        try:
            episodes = self.sampler.sample(self.cfg.trainer.meta_batch)
            if self.tasks is not None:
                episodes = episodes[self.tasks]
            if self.show_episode is not None:  # once, the run's first episode
                self.show_episode.episode_image(episodes, self.episode_caption())
                self.show_episode = None
            try:
                metrics = self.learner.meta_train_step(episodes)
            except NonFiniteLoss as err:  # the weights are those before this step
                self.put_back(snap)
                self.stop_non_finite(err, window)
            signals.committing = True  # from here on nothing is undone
        except Interrupted as stop:  # a second signal inside the step: back to its start
            signals.committing = False
            self.put_back(snap)
            self.stop_now(stop, window, pending=False)
        window.append(metrics)
        if self.parallel:  # batch-norm running statistics: rank 0's
            distributed.broadcast_buffers(self.learner)
        self.schedule.step()
        self.step += 1
        self.elapsed = time.perf_counter() - started
        try:
            signals.end_commit()
        except Interrupted as stop:  # arrived during the update: stop right after it
            self.stop_now(stop, window, pending=True)

    def episode_caption(self) -> str:
        c = self.cfg
        augment = c.trainer.get("augment") or "none"
        return (
            f"the first training task ({c.way}-way {c.shot}-shot, data={choice(c, 'data')}, "
            f"augment={augment}): one row per class, support | query, as the learner sees it"
        )

    def bookkeeping(self, window: list, logger, signals) -> dict | None:
        """after_step, which a second signal may cut short: then last.pt holds this step
        with its bookkeeping still to do, and the generators as they were before it."""
        before = (list(window), checkpoint.rng_state() if self.main else None)
        try:
            return self.after_step(window, logger)
        except Interrupted as stop:
            window[:] = before[0]
            self.stop_now(stop, window, pending=True, rng=before[1])

    # -- stopping on purpose -----------------------------------------------------------
    def write_last(self, state: dict) -> None:
        """last.pt; with trainer.keep_last=N > 1 also step-<N>.pt files, the newest N kept."""
        keep = int(self.cfg.trainer.get("keep_last", 1))
        if keep <= 1:
            checkpoint.save_atomic(state, self.ckpt_dir / "last.pt")
        else:
            checkpoint.save_rotating(state, self.ckpt_dir, self.step, keep)

    def save_last(self, window: list, pending: bool = False, rng: dict | None = None) -> Path:
        """last.pt at the current step (rank 0 writes); signals wait until it is written."""
        if self.main:
            with stop_signals() as signals, signals.shielded():
                self.write_last(self.state(window, pending, rng))
        return self.ckpt_dir / "last.pt"

    def resume_hint(self) -> str:
        """The command that continues this run."""
        return resume_command(self.run_dir)

    def stop_for_signal(self, signum: int, window: list) -> None:
        tc = self.cfg.trainer
        if not (self.step % tc.ckpt_every == 0 or self.step == tc.steps):  # not yet written
            self.check_finite_weights()
            self.save_last(window)
        name = signal.Signals(signum).name
        raise StoppedError(
            f"interrupted by {name} at step {self.step} of {self.cfg.trainer.steps}; "
            f"checkpoint written to {self.ckpt_dir / 'last.pt'}. Resume with:\n"
            f"  {self.resume_hint()}",
            exit_code=128 + signum,
        )

    def stop_now(self, stop: Interrupted, window: list, pending: bool, rng=None) -> None:
        """A second signal: last.pt at the last whole step, then stop."""
        self.check_finite_weights()
        self.save_last(window, pending, rng)
        lost = "" if pending else " (the step in progress was dropped)"
        raise StoppedError(
            f"stopped at once by a second signal ({stop.name}) at step {self.step} of "
            f"{self.cfg.trainer.steps}{lost}; checkpoint written to "
            f"{self.ckpt_dir / 'last.pt'}. Resume with:\n  {self.resume_hint()}",
            exit_code=128 + stop.signum,
        )

    def stop_non_finite(self, err: NonFiniteLoss, window: list) -> None:
        """trainer.nan_policy=stop: the weights are still those of the last good step,
        unless that step's update itself made them non-finite (then last.pt is left as it
        was: it holds the last step whose weights were finite)."""
        good = finite(self.learner)
        if good:
            path = self.save_last(window)
            kept = f"{path} holds the weights after step {self.step}, the last good one"
        else:
            kept = self.kept_checkpoint(
                f"the update of step {self.step} made the weights non-finite"
            )
        raise StoppedError(
            f"{err} at step {self.step + 1}: training stopped, and {kept}. Likely causes: "
            f"the outer learning rate (trainer.lr={self.cfg.trainer.lr}) or an inner step size "
            f"(algo.inner_lr={self.cfg.algo.get('inner_lr')}) too large for this model and "
            "data, or trainer.amp=fp16 overflowing. Start a new run with smaller values; or "
            "trainer.nan_policy=skip skips such updates and counts them.",
            exit_code=3,
        )

    def kept_checkpoint(self, what: str) -> str:
        """Says which checkpoint is the last good one, when the weights now are not."""
        last = self.ckpt_dir / "last.pt"
        if last.exists():
            try:
                step = checkpoint.load(last, trust=self.trust)["step"]
            except CheckpointError:
                step = "an earlier step"
            return f"{what}, so they were not saved: {last} still holds step {step}"
        return f"{what}, so they were not saved (no checkpoint was written before)"

    def check_finite_weights(self) -> None:
        """No checkpoint is ever written with NaN or inf weights (whatever nan_policy)."""
        if finite(self.learner):
            return
        raise StoppedError(
            f"the weights became NaN or inf by step {self.step}: training stopped, and "
            f"{self.kept_checkpoint('they')}. Likely causes: the outer learning rate "
            f"(trainer.lr={self.cfg.trainer.lr}) or an inner step size too large; start a new "
            "run with smaller values (trainer.nan_policy=stop, the default, stops at the first "
            "non-finite loss or gradient)",
            exit_code=3,
        )

    def after_step(self, window: list, logger: RunLogger) -> dict | None:
        """Validate, log and checkpoint on their schedules; returns what was logged. The
        window is read (and cleared) only after validation, so that a stop during
        validation keeps it for the resumed run."""
        tc, step = self.cfg.trainer, self.step
        last = step == tc.steps
        val_row, save_best, score = {}, False, None
        if self.main and (step % tc.val_every == 0 or last):
            val = evaluate_as(self.cfg, self.learner, self.val, val_assignment(self.cfg))
            val_row = {f"val_{val['metric']}": val[val["metric"]], "val_ci95": val["ci95"]}
            score = higher_is_better(val)  # accuracy, or minus the MSE
            if math.isfinite(score) and score > self.best_val:
                save_best = True
        row = {}
        if step % tc.log_every == 0 or last:
            row = self.train_row(window)
        if not self.main:  # rank 0 alone validates, logs and writes checkpoints
            return row or None
        row.update(val_row)
        if row:  # before the checkpoint: a checkpoint at step N implies its metrics are written
            logger.log(step, row)
        save_last = step % tc.ckpt_every == 0 or last
        if save_best or save_last:
            self.check_finite_weights()
            if save_best:
                self.best_val, self.best_step = score, step
            state = self.state(window)  # gathered once, after best_val is updated, for both
            if save_best:
                checkpoint.save_atomic(state, self.ckpt_dir / "best.pt")
            if save_last:
                self.write_last(state)
        return row or None

    def train_row(self, window: list) -> dict:
        """The mean of each metric over the steps since the last row (one host sync)."""
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
        return row

    def final_test(self, logger: RunLogger) -> dict:
        """The test; a signal during it stops at once (training is over and saved)."""
        try:
            return self.test(logger)
        except Interrupted as stop:
            raise StoppedError(
                f"interrupted by {stop.name} during the final test: training is complete "
                f"(step {self.step}; checkpoints in {self.ckpt_dir}). Run the test with:\n"
                f"  {self.resume_hint()}",
                exit_code=128 + stop.signum,
            ) from None

    def test(self, logger: RunLogger) -> dict:
        """Score the best-validation weights on the fixed test episodes."""
        path = self.ckpt_dir / "best.pt"
        if not path.exists():  # no validation score was finite (e.g. nan_policy=skip)
            log.warning("no finite validation score in this run: testing the last weights")
            path, self.best_step = self.ckpt_dir / "last.pt", None
        self.learner.load_state_dict(checkpoint.load(path, trust=self.trust)["model"])
        extra = {"steps": self.step, "seconds": self.elapsed, "best_step": self.best_step}
        try:
            results = score(
                self.learner,
                self.test_episodes,
                self.cfg,
                self.run_dir,
                logger,
                extra,
                best_val=self.best_val,
            )
        except FileSystemError as err:
            raise FileSystemError(
                f"{err}. Training is complete and its checkpoints are kept; once that is "
                f"fixed, test again with: metarun mode=test ckpt={path}"
            ) from err
        if self.cfg.logger.get("log_checkpoint"):
            metric = "mse" if "test_mse" in results else "acc"
            summary = {f"test_{metric}": results[f"test_{metric}"], "ci95": results["ci95"]}
            logger.log_checkpoint(
                path, self.best_step or self.step, {"step": self.best_step, **summary}
            )
        return results


def finite(learner) -> bool:
    """Whether every floating-point weight and buffer is finite (one host sync)."""
    checks = [
        torch.isfinite(t).all() for t in learner.state_dict().values() if t.is_floating_point()
    ]
    return bool(torch.stack(checks).all()) if checks else True


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


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: this job's overrides and resume=."""
    words = ["metarun", *command_overrides(), f"resume={shlex.quote(str(run_dir))}"]
    return " ".join(words)


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


def check_compatible(cfg: DictConfig, stored: DictConfig, path: str, step: int) -> None:
    """A checkpoint only continues the run it came from: every setting outside
    RESUME_MAY_CHANGE must be the checkpoint's, and trainer.steps may only grow."""
    now, then = flatten(to_plain(cfg)), flatten(to_plain(stored))
    then = {**ADDED_SETTINGS, **then}  # a checkpoint from before a setting ran without it
    diffs = [
        f"{key}: checkpoint {then.get(key, '(unset)')!r} vs now {now.get(key, '(unset)')!r}"
        for key in sorted(set(now) | set(then), key=lambda k: (k not in RESUME_ORDER, k))
        if not may_change(key) and now.get(key, MISSING) != then.get(key, MISSING)
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: settings that change what is computed or how it is "
            f"scored differ from the checkpoint's ({'; '.join(diffs)}). Resume with the same "
            "settings (only trainer.steps, logging, checkpoint frequency, paths, the device and "
            "eval.batch may change), or start a new run without resume=."
        )
    if cfg.trainer.steps < step:
        raise CheckpointError(
            f"cannot resume from {path}: it is at step {step}, past trainer.steps="
            f"{cfg.trainer.steps}; set trainer.steps={step} or more"
        )


MISSING = object()
# settings added after checkpoints were first written, with the value that gives what a
# run without them computed
ADDED_SETTINGS = {
    "eval.protocol": "random",
    "eval.alphabets": None,
    "eval.assignment": "independent",
    "eval.tta": 1,
    "trainer.episodes": "random",
    "trainer.val_assignment": None,
}
# listed first in a refusal (the episode shape), as users mostly change these
RESUME_ORDER = ("way", "shot", "query")


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def flatten(node: dict, prefix: str = "") -> dict:
    """{"trainer": {"lr": 1}} -> {"trainer.lr": 1}; lists stay values."""
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
