"""Every setting checked for type, range and finiteness before any work.

Two sources of truth, so that nothing is checked in two places and a new setting is not
forgotten:
- the top-level knobs of conf/config.yaml (way, seed, trainer.*, eval.*, paths.*): the
  table `KNOBS` below; a key under those nodes that is not in the table is refused;
- the settings of the chosen learner, backbone and data set: the signature of the callable
  their `_target_` names, with the ranges written there (data/params.py).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.algorithms.base import NAN_POLICIES
from metarun.algorithms.continual import SCENARIOS
from metarun.data.episodes import PROTOCOLS, TRAIN_CLASSES, check_protocol
from metarun.data.params import Range, finite_number
from metarun.data.sequences import GROUPINGS, TRANSFORMS
from metarun.errors import ConfigError
from metarun.runners.build import choice as chosen
from metarun.runners.build import data_sets_with, describes, learner_class, learners_that
from metarun.runners.evaluate import ASSIGNMENTS

MODES = ("train", "test", "predict", "continual")
SEED_MAX = 2**63 - 1
Check = Callable[[str, Any], "str | None"]


# ------------------------------------------------------------------ value checks


def integer(low: int | None = None, high: int | None = None, optional: bool = False) -> Check:
    def check(key, value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} must be an integer, got {value!r}"
        if (low is not None and value < low) or (high is not None and value > high):
            what = "a positive integer" if low == 1 and high is None else f"in [{low}, {high}]"
            if low == 0 and high == SEED_MAX:
                what = f"an integer from 0 to 2**63-1 ({SEED_MAX})"
            return f"{key} must be {what}, got {value!r}"
        return None

    return check


def number(
    lo: float | None = None, hi: float | None = None, lo_open=False, optional=False, hi_open=False
) -> Check:
    bounds = Range(lo, hi, low_open=lo_open, high_open=hi_open)

    def check(key, value):
        if value is None and optional:
            return None
        if not finite_number(value):
            kind = "a finite number" if isinstance(value, float) else "a number"
            return f"{key} must be {kind}, got {value!r}"
        if not bounds.contains(value):
            return f"{key} must be {bounds.describe()}, got {value!r}"
        return None

    return check


def boolean(key, value):
    if not isinstance(value, bool):
        return f"{key} must be true or false, got {value!r}; use {key}=true or {key}=false"
    return None


def text(optional: bool = False) -> Check:
    def check(key, value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            return f"{key} must be a non-empty text, got {value!r}"
        return None

    return check


def choice(*options, optional: bool = False) -> Check:
    def check(key, value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or value not in options:
            listed = ", ".join(map(str, options)) + (" or null" if optional else "")
            return f"{key}={value!r}; choose {listed}"
        return None

    return check


def names(key, value):
    """null, or a non-empty list of texts (e.g. eval.alphabets=[Early_Aramaic,Tagalog])."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return f"{key} must be a list of names, e.g. {key}=[Early_Aramaic], or null; got {value!r}"
    return None


def paths(key, value):
    """null, a path, or a non-empty list of paths (ckpt=[RUN_A,RUN_B]: an ensemble)."""
    if value is None or (isinstance(value, str) and value):
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return None
    return f"{key} must be a path, or a list of paths (an ensemble: {key}=[RUN_A,RUN_B]); got {value!r}"


def anything(key, value):
    return None


def paper_figure(key, value):
    """A preset's published number: {acc or mse, ci95 (optional), citation}."""
    if value is None:
        return None
    known = {"acc", "mse", "ci95", "citation"}
    if not isinstance(value, dict) or not set(value) <= known or not ({"acc", "mse"} & set(value)):
        return f"{key} must be a mapping with acc or mse, and optionally ci95 and citation; got {value!r}"
    for name in ("acc", "mse", "ci95"):
        if name in value and value[name] is not None and not finite_number(value[name]):
            return f"{key}.{name} must be a finite number, got {value[name]!r}"
    return None


# The top-level knobs (conf/config.yaml). way/shot/query of mode=predict are folders.
KNOBS: dict[str, Check] = {
    "mode": choice(*MODES),
    "way": integer(1),
    "shot": integer(1),
    "query": integer(1),
    "seed": integer(0, SEED_MAX),
    "device": text(),
    "tf32": boolean,
    "ckpt": paths,
    "resume": text(optional=True),
    "trust_checkpoint": boolean,
    "support": text(optional=True),
    "paper": paper_figure,
    "trainer.steps": integer(1),
    "trainer.meta_batch": integer(1),
    "trainer.lr": number(0, lo_open=True),
    "trainer.schedule": choice("constant", "cosine", "linear", "step"),
    "trainer.decay_every": integer(1, optional=True),
    "trainer.decay_factor": number(0, 1, lo_open=True),
    "trainer.val_every": integer(1),
    "trainer.val_episodes": integer(1),
    "trainer.log_every": integer(1),
    "trainer.ckpt_every": integer(1),
    "trainer.keep_last": integer(1),
    "trainer.grad_clip": number(0, lo_open=True, optional=True),
    # null, or augmentations joined by '+': checked against the known ones when the
    # sampler is built (data/episodes.py)
    "trainer.augment": text(optional=True),
    "trainer.episodes": choice(*TRAIN_CLASSES),
    "choices": anything,  # recorded by the CLI: which option of each group the run uses
    "trainer.nan_policy": choice(*NAN_POLICIES),
    "trainer.amp": choice("off", "bf16", "fp16"),
    "trainer.compile": boolean,
    "eval.episodes": integer(1),
    "eval.way": integer(1),
    "eval.shot": integer(1),
    "eval.query": integer(1),
    "eval.seed": integer(0, SEED_MAX),
    "eval.batch": integer(1, optional=True),
    "eval.protocol": choice(*PROTOCOLS),
    "eval.alphabets": names,
    "eval.assignment": choice(*ASSIGNMENTS),
    "trainer.val_assignment": choice(*ASSIGNMENTS, optional=True),
    "eval.tta": integer(1),
    "continual.scenario": choice(*SCENARIOS),
    "continual.tasks": integer(1),
    "continual.split": choice("train", "val", "test"),
    "continual.grouping": choice(*GROUPINGS),
    "continual.classes_per_task": integer(1, optional=True),
    "continual.transform": choice(*TRANSFORMS),
    "continual.classes": integer(2),
    "continual.test_fraction": number(0, 1, lo_open=True, hi_open=True),
    "continual.epochs": integer(1),
    "continual.batch": integer(1),
    "continual.ckpt_every": integer(1, optional=True),
    "paths.output_root": text(),
    "paths.if_exists": choice("refuse", "new"),
}
# nodes whose keys are the callables' parameters (checked from their signatures), or free
GROUPS = ("algo", "backbone", "data", "logger", "optimizer")
LOGGER: dict[str, Check] = {
    "name": choice("none", "wandb"),
    "project": text(),
    "entity": text(optional=True),
    "group": text(optional=True),
    "run_name": text(optional=True),
    "mode": choice("auto", "online", "offline", "disabled"),
    "log_checkpoint": boolean,
    "tags": anything,  # a list, checked below
}


# ------------------------------------------------------------------ the config


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data; a broken interpolation is a user error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"the config cannot be resolved: {err}") from None


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if (
            isinstance(value, dict)
            and key in ("trainer", "eval", "paths", "continual")
            and not prefix
        ):
            out.update(flat(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# what mode=predict reads (its query= is a folder of images, not a count)
PREDICT_KEYS = (
    "mode",
    "ckpt",
    "support",
    "device",
    "tf32",
    "trust_checkpoint",
    "paths.",
    "eval.assignment",
)


def check_knobs(plain: dict, mode: str) -> list[str]:
    """Errors in the top-level knobs; an unknown key is one too."""
    errors = []
    for key, value in flat(plain).items():
        if key in GROUPS or key == "hydra":
            continue
        if mode == "predict" and not key.startswith(PREDICT_KEYS):
            continue
        check = KNOBS.get(key)
        if check is None:
            if mode == "train":  # a checkpoint's stored config may hold an older version's keys
                errors.append(f"{key} is not a metarun setting (see docs/configuration.md)")
            continue
        errors.append(check(key, value))
    return [e for e in errors if e]


def check_classes(plain: dict) -> list[str]:
    """A classification task needs two classes at least; regression has one output."""
    if describes(plain.get("data") or {}, "task", "classification") == "regression":
        return []
    errors = []
    way, eval_way = plain.get("way"), plain.get("eval", {}).get("way")
    pairs = [("way", way)] + ([("eval.way", eval_way)] if eval_way != way else [])
    for key, value in pairs:
        if isinstance(value, int) and not isinstance(value, bool) and value == 1:
            errors.append(
                f"{key}=1: a 1-way classification task has one possible answer, so every "
                f"learner would score 100%; use {key}=2 or more"
            )
    return errors


def check_logger(node: dict) -> list[str]:
    errors = []
    for key, value in node.items():
        check = LOGGER.get(key)
        errors.append(
            check(f"logger.{key}", value)
            if check
            else f"logger.{key} is not a setting of logger={node.get('name')}"
        )
    tags = node.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append(f"logger.tags must be a list of texts, e.g. logger.tags=[a,b]; got {tags!r}")
    return [e for e in errors if e]


# ------------------------------------------------------------------ a callable's parameters


def target_of(node: dict) -> Callable | None:
    try:
        return get_method(node["_target_"])
    except Exception:  # an unknown target fails at build time, with Hydra's own message
        return None


def parameters(target: Callable) -> tuple[dict[str, inspect.Parameter], dict, bool]:
    """(parameters, their type hints with ranges, whether it takes **kwargs)."""
    fn = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(fn).parameters)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable annotations: check what can be checked
        hints = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return params, hints, takes_any


def check_group(group: str, node: dict) -> list[str]:
    """Each key of algo/backbone/data: a parameter of its target, of the right type."""
    target = target_of(node)
    if target is None:
        return []
    params, hints, takes_any = parameters(target)
    errors = []
    for key, value in node.items():
        name = f"{group}.{key}"
        if key in ("_target_", "_partial_"):
            continue
        if key not in params:
            if not takes_any:
                known = [p for p in params if p not in ("self", "backbone", "split", "params")]
                errors.append(
                    f"{name} is not a setting of {node['_target_'].rsplit('.', 1)[-1]}; "
                    f"its settings: {', '.join(known)}"
                )
            continue
        if isinstance(value, dict) and "_target_" in value:  # a call inside the call
            errors += check_group(name, value)
            continue
        errors.append(check_hint(name, value, hints.get(key, Any)))
    return [e for e in errors if e]


def check_hint(name: str, value, hint) -> str | None:
    """An error if `value` does not fit the annotation `hint` (with data/params.py ranges)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        error = check_hint(name, value, args[0])
        ranges = [a for a in args[1:] if isinstance(a, Range)]
        if error is None and finite_number(value):
            for r in ranges:
                if not r.contains(value):
                    return f"{name} must be {r.describe()}, got {value!r}"
        return error
    if origin in (Union, types.UnionType):
        errors = [check_hint(name, value, a) for a in args]
        if any(e is None for e in errors):
            return None
        return next(e for e in errors if e)  # the first member's message
    if hint is type(None):
        return None if value is None else f"{name} must be null, got {value!r}"
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"{name}={value!r}; choose {', '.join(map(str, args))}"
    if hint is bool:
        return boolean(name, value)
    if hint is int:
        return integer()(name, value)
    if hint is float:
        return number()(name, value)
    if hint is str:
        return None if isinstance(value, str) else f"{name} must be a text, got {value!r}"
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        return check_sequence(name, value, origin, args)
    if origin in (dict, Mapping) or hint is dict:
        return None if isinstance(value, dict) else f"{name} must be a mapping, got {value!r}"
    if isinstance(hint, type) and hint.__name__ == "PathLike":
        return None if isinstance(value, str) else f"{name} must be a path, got {value!r}"
    return None  # a type the config cannot hold (a module, a tensor): not configurable here


def check_sequence(name: str, value, origin, args) -> str | None:
    if not isinstance(value, list | tuple):
        return f"{name} must be a list, e.g. {name}=[1,2], got {value!r}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            return f"{name} must be a list of {len(args)} values, got {value!r}"
        members = args
    else:
        members = [args[0] if args else Any] * len(value)
    for i, (item, hint) in enumerate(zip(value, members)):
        error = check_hint(f"{name}[{i}]", item, hint)
        if error:
            return error
    return None


# ------------------------------------------------------------------ everything


def validate(cfg: DictConfig) -> None:
    """Fail before any work on settings that cannot run; every problem named at once."""
    check_inputs(cfg)  # first: a vector data set leaves an image backbone's keys unresolvable
    plain = resolved(cfg)
    mode = plain.get("mode")
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; choose one of {', '.join(MODES)}")
    if mode in ("test", "predict") and not plain.get("ckpt"):
        raise ConfigError(f"mode={mode} needs a checkpoint: add ckpt=PATH/TO/best.pt")
    errors = check_knobs(plain, mode)
    if mode == "predict":
        if not plain.get("support") or not isinstance(plain.get("query"), str):
            errors.append(
                "mode=predict needs support=DIR (one subfolder per class) and query=DIR "
                "(the images to classify)"
            )
        report(errors)
        return
    errors += check_classes(plain)
    for group in ("algo", "backbone", "data", "optimizer"):
        if group == "data" and mode == "test":
            continue  # the checkpoint's data set, checked with data.root= etc. applied to it
        errors += check_group(group, plain.get(group) or {})
    errors += check_logger(plain.get("logger") or {})
    report(errors)
    check_combinations(cfg, plain)


def report(errors: list[str]) -> None:
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} settings cannot work:\n  " + "\n  ".join(errors))


def check_combinations(cfg: DictConfig, plain: dict) -> None:
    """Settings that are each fine but do not fit together."""
    continual = getattr(learner_class(cfg), "continual", False)
    if plain["mode"] == "continual" and not continual:
        raise ConfigError(
            f"mode=continual needs a continual learner; algo={chosen(cfg, 'algo')} is a "
            f"meta-learner: use algo={'|'.join(learners_that('continual'))}"
        )
    if plain["mode"] in ("train", "test") and continual:
        raise ConfigError(
            f"algo={chosen(cfg, 'algo')} is a continual learner: run it with mode=continual "
            "(a task sequence from continual.*; see docs/continual.md)"
        )
    head = plain["algo"].get("way")  # learners with a classifier head of fixed size
    if isinstance(head, int) and plain["eval"]["way"] > head:
        raise ConfigError(
            f"algo={chosen(cfg, 'algo')} has a {head}-way classifier head (algo.way), so "
            f"it cannot be scored on {plain['eval']['way']}-way tasks; set eval.way <= {head}, "
            f"or train with way={plain['eval']['way']}"
        )
    trainer = plain["trainer"]
    if trainer["schedule"] == "step" and trainer.get("decay_every") is None:
        raise ConfigError(
            "trainer.schedule=step needs trainer.decay_every, a positive number of steps; "
            "e.g. trainer.decay_every=100000 trainer.decay_factor=0.5"
        )
    check_learner_fits_data(cfg)
    if plain["mode"] == "train":  # mode=test: the checkpoint's data set (runners/cli.py)
        check_protocol_fits_data(cfg)
        check_training_episodes(cfg)


def check_training_episodes(cfg: DictConfig) -> None:
    """trainer.episodes=within_alphabet needs episodes to train on and a data set whose
    classes are grouped in alphabets (those that offer eval.protocol=within_alphabet)."""
    if cfg.trainer.get("episodes", "random") != "within_alphabet":
        return
    learner = learner_class(cfg)
    if getattr(learner, "trains_on", "episodes") != "episodes":
        raise ConfigError(
            f"trainer.episodes=within_alphabet chooses the classes of training episodes, but "
            f"algo={chosen(cfg, 'algo')} trains on batches of images; use trainer.episodes=random"
        )
    check_data_offers(
        cfg, "within_alphabet", "trainer.episodes", "classes grouped in alphabets", "have"
    )


def check_data_offers(cfg: DictConfig, protocol: str, setting: str, needs: str, lacks: str):
    """`setting`=`protocol` needs `needs`: a data set that declares the protocol among its
    eval_protocols; otherwise the error names the data sets that do, and `setting`=random."""
    if protocol not in describes(cfg.data, "eval_protocols", ("random",)):
        raise ConfigError(
            f"{setting}={protocol} needs {needs}, which data={chosen(cfg, 'data')} does not "
            f"{lacks}; use data={' or data='.join(data_sets_with(protocol))}, or {setting}=random"
        )


def check_protocol_fits_data(cfg: DictConfig) -> None:
    """eval.protocol=within_alphabet needs a data set that knows drawers and alphabets;
    eval.alphabets means nothing without it. mode=test calls this on the checkpoint's
    config with the command line's eval.* settings: the data set is the checkpoint's."""
    protocol = cfg.eval.get("protocol", "random")
    check_protocol(protocol, cfg.eval.get("alphabets"))
    check_data_offers(
        cfg,
        protocol,
        "eval.protocol",
        "to know who drew each image and each class's alphabet",
        "record",
    )


def check_inputs(cfg: DictConfig) -> None:
    """The backbone takes what the data set gives (read without resolving the config)."""
    data, backbone = cfg.get("data"), cfg.get("backbone")
    if data is None or backbone is None:
        return
    try:
        data_inputs = describes(data, "inputs", "images")
        backbone_inputs = describes(backbone, "inputs", "images")
    except OmegaConfBaseException:
        return  # an interpolated value: resolved() names the problem
    if data_inputs != backbone_inputs:
        hint = "backbone=mlp" if data_inputs == "vectors" else "an image backbone, e.g. conv4"
        raise ConfigError(
            f"data={chosen(cfg, 'data')} gives {data_inputs} but backbone={chosen(cfg, 'backbone')} takes "
            f"{backbone_inputs}; use {hint}"
        )


def check_learner_fits_data(cfg: DictConfig) -> None:
    """Regression data needs a learner with an output head."""
    check_inputs(cfg)
    regression = describes(cfg.data, "task", "classification") == "regression"
    if cfg.eval.get("tta", 1) != 1:
        if regression or describes(cfg.data, "inputs", "images") != "images":
            raise ConfigError(
                f"eval.tta={cfg.eval.tta} averages class probabilities over views of images; "
                f"data={chosen(cfg, 'data')} is "
                f"{'regression' if regression else 'not images'}: use eval.tta=1"
            )
    if regression:
        for key, value in (
            ("eval.assignment", cfg.eval.get("assignment")),
            ("trainer.val_assignment", cfg.trainer.get("val_assignment")),
        ):
            if value not in (None, "independent"):
                raise ConfigError(
                    f"{key}={value} assigns classes to queries; data={chosen(cfg, 'data')} "
                    f"is regression: use {key}=independent"
                )
        learner = learner_class(cfg)
        if learner is not None and not getattr(learner, "supports_regression", False):
            raise ConfigError(
                f"algo={chosen(cfg, 'algo')} is classification-only and data={chosen(cfg, 'data')} is "
                f"regression; use algo={', '.join(learners_that('supports_regression'))}"
            )
