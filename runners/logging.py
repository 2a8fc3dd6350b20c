"""Where metrics go: metrics.jsonl always, wandb when enabled, and the console."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metarun.runners.build import choice

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
        job_type: str = "train",
        extra_config: dict | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)  # Hydra made it; from Python, maybe not
        if resume_step is not None:
            self._truncate_after(resume_step)
        self.wandb = None
        if cfg.logger.get("name") == "wandb":
            self.wandb = self._start_wandb(cfg, wandb_id, job_type, extra_config or {})

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

    def _start_wandb(self, cfg: DictConfig, wandb_id: str | None, job_type: str, extra: dict):
        import wandb  # imported here: it is slow to import and optional at run time

        lc = cfg.logger
        run = wandb.init(
            project=lc.project,
            entity=lc.get("entity"),
            group=extra.pop("group", None) or lc.get("group") or sweep_group(),
            name=lc.get("run_name") or run_name(cfg, job_type),
            job_type=job_type,
            tags=[*(lc.get("tags") or []), *run_tags(cfg)],
            dir=str(self.run_dir),
            mode=wandb_mode(lc),
            id=wandb_id,
            resume="allow" if wandb_id else None,
            config={
                **OmegaConf.to_container(cfg, resolve=True),
                "overrides": command_line(),
                **extra,
            },
        )
        define_metrics(run)
        return run

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    @property
    def wandb_group(self) -> str | None:
        return (self.wandb.group or None) if self.wandb is not None else None

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.wandb is None:
            return
        import wandb

        self.wandb.log({key: wandb.Table(columns=columns, data=rows)}, commit=False)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({dashboard_key(k): v for k, v in metrics.items()}, step=step)

    @property
    def wants_media(self) -> bool:
        return self.wandb is not None

    def episode_image(self, episodes, caption: str) -> None:
        """One training episode as the learner sees it (after augmentation), once per run."""
        if self.wandb is None:
            return
        grid = episode_grid(episodes)
        if grid is None:
            return
        import wandb

        self.wandb.log({"train/episode": wandb.Image(grid, caption=caption)}, commit=False)

    def episode_table(self, metric: str, scores: list[float]) -> None:
        """Every test episode's score, as a wandb Table."""
        if self.wandb is None:
            return
        import wandb

        table = wandb.Table(
            columns=["episode", metric], data=[[i, s] for i, s in enumerate(scores)]
        )
        self.wandb.log({"test/episodes": table}, commit=False)

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

    wandb_id = wandb_group = None
    wants_media = False

    def episode_image(self, episodes, caption: str) -> None:
        pass

    def episode_table(self, metric: str, scores: list[float]) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

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
    return group_name(Path(HydraConfig.get().sweep.dir))


def group_name(sweep_dir: Path) -> str:
    """A sweep's wandb group: its folder's name with its parent's (<date>_<time>)."""
    sweep_dir = Path(sweep_dir)
    return f"{sweep_dir.parent.name}_{sweep_dir.name}" if sweep_dir.parent.name else sweep_dir.name


def dashboard_key(key: str) -> str:
    """metrics.jsonl's names, grouped for the dashboard: train/, val/, test/."""
    for prefix in ("val", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return key if "/" in key else f"train/{key}"


def define_metrics(run) -> None:
    """Summaries that mean something: the best validation score, the lowest training loss
    (the best validation step is set by the trainer: val/best_step)."""
    run.define_metric("val/acc", summary="max")
    run.define_metric("val/mse", summary="min")
    run.define_metric("train/loss", summary="min")


def run_name(cfg: DictConfig, job_type: str) -> str:
    """<preset> or <algo>-<data>-<way>w<shot>s-seed<seed> (test runs: their test shape)."""
    preset = hydra_choice("experiment")
    base = preset or (
        f"{choice(cfg, 'algo')}-{choice(cfg, 'data')}-{cfg.eval.way}w{cfg.eval.shot}s-seed{cfg.seed}"
    )
    return base if job_type == "train" else f"{base}-{job_type}"


def hydra_choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return None if choice in (None, "null") else str(choice)


def command_line() -> list[str]:
    """The command-line overrides of this run (Hydra's own excluded)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def episode_grid(episodes, max_classes: int = 10, max_query: int = 5):
    """The first task of a meta-batch as one uint8 image: a row per class, its support
    images, a gap, then its query images. None for data that are not images."""
    import numpy as np

    support_x = getattr(episodes, "support_x", None)
    if support_x is None or support_x.dim() != 5:
        return None
    sx, sy = support_x[0].detach().float().cpu(), episodes.support_y[0].cpu()
    qx, qy = episodes.query_x[0].detach().float().cpu(), episodes.query_y[0].cpu()
    channels, height, width = sx.shape[1:]
    if channels not in (1, 3):
        return None
    classes = list(range(min(int(sy.max()) + 1, max_classes)))
    shots = max(int((sy == c).sum()) for c in classes)
    queries = min(max(int((qy == c).sum()) for c in classes), max_query)
    pad, columns = 2, shots + queries + 1  # one blank column between support and query
    grid = np.full(
        (len(classes) * (height + pad) + pad, columns * (width + pad) + pad, channels),
        255,
        dtype=np.uint8,
    )

    def put(image, row, column):
        array = image.permute(1, 2, 0).numpy()
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        grid[top : top + height, left : left + width] = (255 * array).round().astype(np.uint8)

    for row, c in enumerate(classes):
        for column, image in enumerate(sx[sy == c][:shots]):
            put(image, row, column)
        for column, image in enumerate(qx[qy == c][:queries]):
            put(image, row, shots + 1 + column)
    return grid[..., 0] if channels == 1 else grid


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags to filter a dashboard by: learner, data set and the test episode shape."""
    return [
        f"algo:{choice(cfg, 'algo')}",
        f"data:{choice(cfg, 'data')}",
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
