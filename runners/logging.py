"""Where metrics go: metrics.jsonl always, wandb when enabled, and the console."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("metarun")


def wandb_mode(logger_cfg: DictConfig) -> str:
    """'auto' -> online with an API key, else offline; WANDB_MODE still wins if set."""
    mode = logger_cfg.get("mode", "auto")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    """Appends one JSON object per logged step to metrics.jsonl; mirrors to wandb."""

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        resume_step: int | None = None,
        wandb_id: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)  # Hydra made it; from Python, maybe not
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.wandb = None
        if cfg.logger.get("name") == "wandb":
            self.wandb = self._start_wandb(cfg, wandb_id)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from: they will be logged again."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def _start_wandb(self, cfg: DictConfig, wandb_id: str | None):
        import wandb  # imported here: it is slow to import and optional at run time

        lc = cfg.logger
        return wandb.init(
            project=lc.project,
            entity=lc.get("entity"),
            group=lc.get("group") or sweep_group(),
            name=lc.get("run_name"),
            tags=[*(lc.get("tags") or []), *run_tags(cfg)],
            dir=str(self.run_dir),
            mode=wandb_mode(lc),
            id=wandb_id,
            resume="allow" if wandb_id else None,
            config=OmegaConf.to_container(cfg, resolve=True),
        )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for key, value in values.items():
                self.wandb.summary[key] = value

    def log_checkpoint(self, path: Path, step: int, metadata: dict) -> None:
        """Upload a checkpoint as a wandb artifact of type "model", aliased "best" and by step
        (logger.log_checkpoint=true). Offline runs keep it for `wandb sync`."""
        if self.wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name=Path(path).name)
        self.wandb.log_artifact(artifact, aliases=["best", f"step-{step}"])

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class NullLogger:
    """What the other ranks of a multi-process run log: nothing (rank 0 logs)."""

    wandb_id = None

    def log(self, step: int, metrics: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_checkpoint(self, path: Path, step: int, metadata: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def sweep_group() -> str | None:
    """In a multirun, the sweep folder's name (its date and time), so a sweep's runs group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = Path(HydraConfig.get().sweep.dir)
    return f"{sweep.parent.name}_{sweep.name}" if sweep.parent.name else sweep.name


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags to filter a dashboard by: learner, data set and the test episode shape."""
    return [
        f"algo:{cfg.algo.name}",
        f"data:{cfg.data.name}",
        f"{cfg.eval.way}-way",
        f"{cfg.eval.shot}-shot",
    ]


class Progress:
    """A rich progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: bool | None = None):
        self.bar = None
        if enabled if enabled is not None else sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]meta-train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, metrics: dict | None = None) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, float))
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if metrics else {}))
        elif metrics:
            log.info("step %d  %s", step, info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
