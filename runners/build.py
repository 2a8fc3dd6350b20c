"""Config -> objects: device, data stores, learner, preprocessing.

Everything here is driven by `_target_` nodes, so no function branches on
an algorithm's or data set's name.
"""

from __future__ import annotations

import inspect

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.base import NAN_POLICIES, MetaLearner
from metarun.data.episodes import ImageBatchSampler, episode_sampler
from metarun.data.errors import ConfigError, MetarunError
from metarun.data.images import Preprocess
from metarun.data.store import ClassStore

# keys of a data config that describe the images rather than configure the loader
DATA_META_KEYS = ("name", "channels", "invert", "augment", "task", "inputs", "input_dim")
BACKBONE_META_KEYS = ("name", "inputs")
SPLITS = ("train", "val", "test")
MODES = ("train", "test", "predict")


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a usable torch.device, or a clear error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name} was requested but CUDA is not available here; "
                "use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def configure_tf32(enabled: bool) -> None:
    """tf32=false (the default): float32 matrix products and convolutions on CUDA in full
    float32. PyTorch lets cuDNN use TF32 (a 10-bit mantissa) for convolutions by default,
    which on an H200 made second-order MAML's meta-gradient differ from the float32 one by
    20-40% (relative) on benchmarks/bench_maml.py's tasks, for 1.2x speed; tf32=true opts in."""
    if not isinstance(enabled, bool):
        raise ConfigError(f"tf32={enabled!r}: use tf32=true or tf32=false")
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def instantiate_clean(node: dict, **kwargs):
    """hydra's instantiate, but a user-facing error from the target comes out unwrapped."""
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, MetarunError):
            raise err.__cause__ from None
        raise


def build_store(data_cfg: DictConfig, split: str) -> ClassStore:
    """Decode (or load from the cache) one split of the configured data set. Descriptive
    keys (channels, invert, ...) go to the loader too when it takes them (data=folder
    decodes with them; Omniglot's are fixed)."""
    try:
        takes = set(inspect.signature(get_method(data_cfg._target_)).parameters)
    except Exception:  # an unknown target fails below, with Hydra's own message
        takes = set()
    return instantiate_clean(
        without(data_cfg, [k for k in DATA_META_KEYS if k not in takes]), split=split
    )


def build_stores(data_cfg: DictConfig, splits=SPLITS) -> dict[str, ClassStore]:
    return {split: build_store(data_cfg, split) for split in splits}


def without(node: DictConfig, keys) -> dict:
    """A config node as a plain dict, resolved, minus descriptive keys."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys}


def build_learner(cfg: DictConfig) -> MetaLearner:
    """The configured algorithm around the configured backbone."""
    backbone = instantiate_clean(without(cfg.backbone, BACKBONE_META_KEYS))
    return instantiate_clean(without(cfg.algo, ("name",)), backbone=backbone)


def learner_class(cfg: DictConfig) -> type | None:
    """The configured learner's class, or None when its target cannot be imported (that
    fails later, with Hydra's own message)."""
    try:
        return get_class(cfg.algo._target_)
    except Exception:
        return None


def train_sampler(cfg: DictConfig, store, device):
    """What the trainer draws each step: random episodes (way, shot, query), or, for
    learners that pretrain a classifier over all training classes (`trains_on = "images"`,
    e.g. Baseline), mini-batches of images labelled by global class id. For the latter,
    algo.num_classes is set here from the data (it must cover every training class)."""
    augment = cfg.data.get("augment")
    if getattr(learner_class(cfg), "trains_on", "episodes") != "images":
        return episode_sampler(
            store,
            cfg.way,
            cfg.shot,
            cfg.query,
            device,
            seed=cfg.seed,
            split="train",
            augment=augment,
        )
    sampler = ImageBatchSampler(store, device, seed=cfg.seed, augment=augment)
    have, need = OmegaConf.select(cfg, "algo.num_classes"), store.num_classes
    if have is None:
        OmegaConf.update(cfg, "algo.num_classes", need, force_add=True)
    elif have < need:
        raise ConfigError(
            f"algo.num_classes={have} but the training split has {need} classes; leave "
            "algo.num_classes unset (null) and it is taken from the data"
        )
    return sampler


def preprocess_of(data_cfg: DictConfig) -> Preprocess:
    """How raw image files must be turned into this data set's tensors."""
    return Preprocess(
        size=int(data_cfg.image_size), channels=int(data_cfg.channels), invert=bool(data_cfg.invert)
    )


def positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}; e.g. {key}=5")
    return value


def validate(cfg: DictConfig) -> None:
    """Fail before any work on settings that cannot run."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is unknown; choose one of {', '.join(MODES)}")
    if cfg.mode in ("test", "predict") and not cfg.get("ckpt"):
        raise ConfigError(f"mode={cfg.mode} needs a checkpoint: add ckpt=PATH/TO/best.pt")
    if cfg.mode == "predict":
        if not cfg.get("support") or not isinstance(cfg.query, str):
            raise ConfigError(
                "mode=predict needs support=DIR (one subfolder per class) and query=DIR "
                "(the images to classify)"
            )
        return
    keys = ["way", "shot", "query", "eval.way", "eval.shot", "eval.query", "eval.episodes"]
    if cfg.mode == "train":
        keys += [
            "trainer.steps",
            "trainer.meta_batch",
            "trainer.val_every",
            "trainer.val_episodes",
            "trainer.log_every",
            "trainer.ckpt_every",
        ]
    for key in keys:
        positive_int(cfg, key)
    head = OmegaConf.select(cfg, "algo.way")  # learners with a classifier head of fixed size
    if isinstance(head, int) and cfg.eval.way > head:
        raise ConfigError(
            f"algo={cfg.algo.name} has a {head}-way classifier head (algo.way), so it cannot "
            f"be scored on {cfg.eval.way}-way tasks; set eval.way <= {head}, or train with "
            f"way={cfg.eval.way}"
        )
    check_learner_fits_data(cfg)
    if cfg.mode == "train" and not float(cfg.trainer.lr) > 0:
        raise ConfigError(f"trainer.lr must be positive, got {cfg.trainer.lr}")
    if cfg.trainer.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"trainer.amp={cfg.trainer.amp!r}; choose off, bf16 or fp16")
    if cfg.trainer.get("nan_policy", "stop") not in NAN_POLICIES:
        raise ConfigError(
            f"trainer.nan_policy={cfg.trainer.nan_policy!r}; choose {', '.join(NAN_POLICIES)}"
        )
    if cfg.mode == "train" and "keep_last" in cfg.trainer:
        positive_int(cfg, "trainer.keep_last")


def check_learner_fits_data(cfg: DictConfig) -> None:
    """Regression data needs a learner with an output head, and each backbone its inputs."""
    data_inputs = cfg.data.get("inputs", "images")
    backbone_inputs = cfg.backbone.get("inputs", "images")
    if data_inputs != backbone_inputs:
        hint = "backbone=mlp" if data_inputs == "vectors" else "an image backbone, e.g. conv4"
        raise ConfigError(
            f"data={cfg.data.name} gives {data_inputs} but backbone={cfg.backbone.name} takes "
            f"{backbone_inputs}; use {hint}"
        )
    if cfg.data.get("task", "classification") == "regression":
        learner = learner_class(cfg)
        if learner is not None and not getattr(learner, "supports_regression", False):
            raise ConfigError(
                f"algo={cfg.algo.name} is classification-only and data={cfg.data.name} is "
                "regression; use algo=maml, fomaml, metasgd, anil, reptile or imaml"
            )
