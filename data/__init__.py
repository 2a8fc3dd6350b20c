"""Few-shot data: class stores, episode sampling, data sets."""

from metarun.errors import CheckpointError, ConfigError, DataError, MetarunError

from .episodes import Episodes, EpisodeSampler, FixedEpisodes, check_episode_shape
from .images import Preprocess, decode_image
from .store import ClassStore, cache_dir

__all__ = [
    "CheckpointError",
    "ClassStore",
    "ConfigError",
    "DataError",
    "MetarunError",
    "EpisodeSampler",
    "Episodes",
    "FixedEpisodes",
    "Preprocess",
    "cache_dir",
    "check_episode_shape",
    "decode_image",
]
