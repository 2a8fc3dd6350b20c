"""Config -> objects: device, data stores, learner, preprocessing.

Everything here is driven by `_target_` nodes, so no function branches on
an algorithm's or data set's name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.base import MetaLearner
from metarun.data.episodes import ImageBatchSampler, episode_sampler
from metarun.data.images import Preprocess
from metarun.data.store import ClassStore
from metarun.errors import ConfigError, MetarunError

SPLITS = ("train", "val", "test")


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


# data settings that say where the data is, not what it is: they do not change the episodes
# (results.episode_set) nor a checkpoint's data (checkpoint.check_members)
WHERE_DATA_IS = ("root", "download")


def build_store(data_cfg: DictConfig, split: str) -> ClassStore:
    """Decode (or load from the cache) one split of the configured data set: the data
    node is the loader's call (its `images` sub-node the Preprocess it decodes with)."""
    return instantiate_clean(data_cfg, split=split)


def build_stores(data_cfg: DictConfig, splits=SPLITS) -> dict[str, ClassStore]:
    return {split: build_store(data_cfg, split) for split in splits}


def build_learner(cfg: DictConfig, **from_data) -> MetaLearner:
    """The configured algorithm around the configured backbone: each node is exactly the
    call it makes; `from_data` are the arguments the training data supplies (see
    data_arguments), which a checkpoint records beside its config."""
    return instantiate_clean(cfg.algo, backbone=instantiate_clean(cfg.backbone), **from_data)


def data_arguments(cfg: DictConfig, train_store) -> dict:
    """Constructor arguments that come from the training data rather than the config: a
    learner pretrained over all training classes (`trains_on = "images"`, e.g. Baseline)
    gets num_classes from the training split when algo.num_classes is null; a set value
    must cover every training class. The config itself is never rewritten."""
    if getattr(learner_class(cfg), "trains_on", "episodes") != "images":
        return {}
    have, need = OmegaConf.select(cfg, "algo.num_classes"), train_store.num_classes
    if have is None:
        return {"num_classes": need}
    if have < need:
        raise ConfigError(
            f"algo.num_classes={have} but the training split has {need} classes; leave "
            "algo.num_classes unset (null) and it is taken from the data"
        )
    return {}


# the groups whose option changes what is computed; the CLI records which option of each a
# run uses (Hydra's runtime choices) in the config's `choices`
NAMED_GROUPS = ("algo", "backbone", "data", "optimizer")


def choice(cfg: DictConfig, group: str) -> str:
    """Which option of `group` the run uses (e.g. "maml" for algo): Hydra's runtime choice,
    recorded by the CLI in cfg.choices; for a config composed otherwise (the compose API in
    tests and notebooks), the last part of the node's _target_."""
    named = OmegaConf.select(cfg, f"choices.{group}")
    if named:
        return str(named)
    target = OmegaConf.select(cfg, f"{group}._target_")
    return str(target).rsplit(".", 1)[-1] if target else "?"


def describes(node, key: str, default):
    """What a data set or backbone declares about itself on its callable (e.g. sinusoid's
    task = "regression", mlp's inputs = "vectors"), read without building it."""
    try:
        return getattr(get_method(node["_target_"]), key, default)
    except Exception:  # an unknown target fails at build time, with Hydra's own message
        return default


def learner_class(cfg: DictConfig) -> type | None:
    """The configured learner's class, or None when its target cannot be imported (that
    fails later, with Hydra's own message)."""
    try:
        return get_class(cfg.algo._target_)
    except Exception:
        return None


def learners_that(flag: str) -> list[str]:
    """The names of the learners (conf/algo/*.yaml) whose class sets `flag`, e.g.
    supports_regression: read from the registry, each composed by Hydra as a run would
    compose it, so a new learner is listed where it fits."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class

    names = sorted(
        p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "algo").glob("*.yaml")
    )

    def targets() -> dict[str, str]:
        return {
            n: compose(config_name="config", overrides=[f"algo={n}"]).algo._target_ for n in names
        }

    if GlobalHydra.instance().is_initialized():  # inside the metarun app
        found = targets()
    else:
        with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
            found = targets()
    return [n for n in names if getattr(get_class(found[n]), flag, False)]


def data_sets_with(protocol: str) -> list[str]:
    """The data sets (conf/data/*.yaml) whose loader declares the evaluation `protocol`
    among its `eval_protocols` (every one has "random")."""
    folder = Path(__file__).resolve().parents[1] / "conf" / "data"
    return [
        p.stem
        for p in sorted(folder.glob("*.yaml"))
        if protocol in describes(OmegaConf.load(p), "eval_protocols", ("random",))
    ]


def train_sampler(cfg: DictConfig, store, device):
    """What the trainer draws each step: random episodes (way, shot, query), or, for
    learners that pretrain a classifier over all training classes (`trains_on = "images"`,
    e.g. Baseline), mini-batches of images labelled by global class id."""
    augment = cfg.trainer.get("augment")
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
            classes=cfg.trainer.get("episodes", "random"),
        )
    return ImageBatchSampler(store, device, seed=cfg.seed, augment=augment)


def preprocess_of(data_cfg: DictConfig) -> Preprocess:
    """How raw image files must be turned into this data set's tensors: its `images` node
    (checkpoints written before that node: the data node's image_size, channels, invert)."""
    if "images" in data_cfg:
        return instantiate_clean(data_cfg.images)
    return Preprocess(
        size=int(data_cfg.image_size), channels=int(data_cfg.channels), invert=bool(data_cfg.invert)
    )
