"""Episode sampling: the invariants every learner relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.data import ClassStore, ConfigError, EpisodeSampler, FixedEpisodes
from metarun.data.augment import (
    affine_matrices,
    elastic_field,
    random_affine,
    random_distortion,
    random_shift,
    random_stroke,
)
from metarun.data.episodes import ImageBatchSampler, sample_indices


def tagged_store(n_classes=12, counts=None, rotations=1) -> ClassStore:
    """Images whose pixels say which (class, sample) they are: [0,0]=class, [0,1]=sample."""
    counts = counts or [10] * n_classes
    per_class = []
    for c, n in enumerate(counts):
        x = torch.zeros(n, 1, 6, 6, dtype=torch.uint8)
        x[:, 0, 0, 0] = c
        x[:, 0, 0, 1] = torch.arange(n)
        x[:, 0, 5, 5] = 200  # a corner marker to check rotations
        per_class.append(x)
    return ClassStore.from_classes(per_class, [f"c{i}" for i in range(len(counts))], rotations)


def ids(x: torch.Tensor) -> torch.Tensor:
    """(class, sample) ids from tagged float images [..., 1, 6, 6] -> [..., 2]."""
    return (x[..., 0, 0, :2] * 255).round().long()


@pytest.mark.parametrize("way,shot,query", [(5, 1, 3), (3, 4, 2), (12, 2, 8)])
def test_shapes_labels_and_classes(way, shot, query):
    episodes = EpisodeSampler(tagged_store(), way, shot, query, seed=1).sample(7)
    assert episodes.support_x.shape == (7, way * shot, 1, 6, 6)
    assert episodes.query_x.shape == (7, way * query, 1, 6, 6)
    assert episodes.support_x.dtype == torch.float32
    assert episodes.support_y.shape == (7, way * shot) and episodes.query_y.shape == (
        7,
        way * query,
    )
    assert episodes.classes.shape == (7, way) and episodes.way == way
    for y, per in ((episodes.support_y, shot), (episodes.query_y, query)):
        assert y.min() == 0 and y.max() == way - 1
        assert torch.all(torch.bincount(y[0], minlength=way) == per)
    # a task's classes are distinct
    assert all(len(set(row.tolist())) == way for row in episodes.classes)


def test_labels_match_classes_and_support_query_are_disjoint():
    episodes = EpisodeSampler(tagged_store(), 4, 3, 5, seed=2).sample(16)
    s_ids, q_ids = ids(episodes.support_x), ids(episodes.query_x)  # [B, n, 2]
    for b in range(16):
        # label k always shows images of class classes[b, k]
        assert torch.equal(s_ids[b, :, 0], episodes.classes[b][episodes.support_y[b]])
        assert torch.equal(q_ids[b, :, 0], episodes.classes[b][episodes.query_y[b]])
        pairs = [tuple(p) for p in torch.cat([s_ids[b], q_ids[b]]).tolist()]
        assert len(pairs) == len(set(pairs)), "an image appears twice in one task"


def test_uneven_class_sizes_never_index_past_a_class():
    store = tagged_store(counts=[3, 9, 4, 20, 5, 3])
    episodes = EpisodeSampler(store, 6, 1, 2, seed=0).sample(200)
    got = ids(torch.cat([episodes.support_x, episodes.query_x], 1)).reshape(-1, 2)
    counts = torch.tensor([3, 9, 4, 20, 5, 3])
    assert torch.all(got[:, 1] < counts[got[:, 0]])


def test_rotated_classes_are_rotated_copies():
    store = tagged_store(n_classes=5, rotations=4)
    assert store.num_classes == 20
    sampler = EpisodeSampler(store, 20, 1, 1, seed=0)
    episodes = sampler.sample(1)
    for k in range(20):
        image = episodes.support_x[0, k]  # label k is class classes[0, k]
        cls = int(episodes.classes[0, k])
        base = (image * 255).round().to(torch.uint8)
        unrotated = torch.rot90(base, -(cls // 5), dims=(-2, -1))
        assert unrotated[0, 0, 0] == cls % 5 and unrotated[0, 5, 5] == 200


def test_same_seed_same_episodes_other_seed_other_episodes():
    store = tagged_store()
    a = EpisodeSampler(store, 5, 1, 3, seed=7).sample(4)
    b = EpisodeSampler(store, 5, 1, 3, seed=7).sample(4)
    c = EpisodeSampler(store, 5, 1, 3, seed=8).sample(4)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.classes, c.classes)


def test_sampler_state_round_trip_continues_the_stream():
    store = tagged_store()
    sampler = EpisodeSampler(store, 5, 1, 3, seed=3, augment="affine")
    sampler.sample(2)
    state = sampler.state_dict()
    expected = sampler.sample(2)
    other = EpisodeSampler(store, 5, 1, 3, seed=99, augment="affine")
    other.load_state_dict(state)
    assert torch.equal(other.sample(2).query_x, expected.query_x)


def test_fixed_episodes_do_not_depend_on_batch_size_or_instance():
    store = tagged_store()
    one = torch.cat([e.support_x for e in FixedEpisodes(store, 10, 5, 2, 3, seed=0).batches(3)])
    two = torch.cat([e.support_x for e in FixedEpisodes(store, 10, 5, 2, 3, seed=0).batches(10)])
    assert one.shape[0] == 10 and torch.equal(one, two)
    other = torch.cat([e.support_x for e in FixedEpisodes(store, 10, 5, 2, 3, seed=1).batches(10)])
    assert not torch.equal(one, other)


def test_augmentation_keeps_shapes_and_labels():
    store = tagged_store()
    plain = EpisodeSampler(store, 5, 1, 3, seed=0).sample(3)
    aug = EpisodeSampler(store, 5, 1, 3, seed=0, augment="affine").sample(3)
    assert aug.support_x.shape == plain.support_x.shape
    assert torch.equal(aug.classes, plain.classes) and torch.equal(aug.query_y, plain.query_y)
    assert not torch.equal(aug.query_x, plain.query_x)


def test_shift_moves_each_image_by_whole_pixels_within_the_limit():
    x = torch.zeros(200, 1, 10, 10)
    x[:, 0, 4, 5] = 1.0  # one lit pixel
    shifted = random_shift(x, torch.Generator().manual_seed(0), translate=0.2)  # up to 2 px
    assert shifted.shape == x.shape and torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    where = shifted[:, 0].flatten(1).argmax(1)
    dy, dx = where // 10 - 4, where % 10 - 5
    assert dy.abs().max() == 2 and dx.abs().max() == 2  # every offset in [-2, 2] is drawn
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25
    edge = torch.zeros(50, 1, 10, 10)
    edge[:, 0, :, 0] = 1.0  # a stroke on the left border: shifted out of frame, or kept
    out = random_shift(edge, torch.Generator().manual_seed(1), translate=0.2)
    assert out.sum() < edge.sum() and out.max() == 1.0


def strokes(n=64, side=14) -> torch.Tensor:
    """n images of one bright cross on a dark ground, [n, 1, side, side]."""
    x = torch.zeros(n, 1, side, side)
    x[:, 0, side // 2, 2:-2] = 1.0
    x[:, 0, 2:-2, side // 2] = 0.6
    return x


def test_stroke_moves_each_image_between_its_erosion_and_dilation():
    x = strokes()
    out = random_stroke(x, torch.Generator().manual_seed(0), strength=0.5)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    assert out.shape == x.shape
    assert torch.all(out >= eroded - 1e-6) and torch.all(out <= dilated + 1e-6)
    ink = out.sum((1, 2, 3)) - x.sum((1, 2, 3))  # > 0 thicker, < 0 thinner
    assert (ink > 0).any() and (ink < 0).any()  # both ways are drawn
    # the largest step is halfway to the dilation (strength 0.5, |t| < 1)
    grown = (out - x) / (dilated - x).clamp_min(1e-6)
    assert grown[dilated > x].max() <= 0.5 + 1e-6 and grown[dilated > x].max() > 0.4
    again = random_stroke(x, torch.Generator().manual_seed(0), strength=0.5)
    assert torch.equal(out, again)  # the draws come from the generator alone


def test_elastic_field_is_smooth_bounded_and_passes_through_its_lattice():
    g = torch.Generator().manual_seed(0)
    field = elastic_field(50, (28, 28), g, magnitude=0.1, cells=3)
    assert field.shape == (50, 28, 28, 2)
    coarse = 0.1 * (2 * torch.rand(50, 2, 3, 3, generator=torch.Generator().manual_seed(0)) - 1)
    corners = field[:, [0, 0, -1, -1], [0, -1, 0, -1]].permute(0, 2, 1)  # [n, 2, 4]
    assert torch.allclose(corners, coarse[:, :, [0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-6)
    assert field.abs().max() < 0.15  # bicubic overshoots the lattice's 0.1 a little at most
    step = (field[:, 1:] - field[:, :-1]).abs().max()  # neighbours move almost together
    assert step < 0.02  # under a third of a pixel (a pixel is 2/28 = 0.071 grid units)


def test_distortion_resamples_affine_and_elastic_once_and_affine_alone_is_unchanged():
    x = strokes(8, 28)
    a = random_distortion(x, torch.Generator().manual_seed(3), affine=True, elastic=False)
    assert torch.equal(a, random_affine(x, torch.Generator().manual_seed(3)))
    same = random_distortion(x, torch.Generator().manual_seed(3), affine=False, elastic=False)
    assert torch.allclose(same, x, atol=1e-5)  # neither: the identity grid
    both = random_distortion(x, torch.Generator().manual_seed(3), affine=True, elastic=True)
    assert not torch.allclose(both, a, atol=1e-3)  # the elastic field bends the affine image
    # one resampling of the summed grids, the affine draws first, then the field's
    g = torch.Generator().manual_seed(3)
    theta = affine_matrices(8, g)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False) + elastic_field(8, (28, 28), g)
    assert torch.allclose(both, F.grid_sample(x, grid, align_corners=False), atol=1e-6)


def test_new_augmentations_combine_in_a_fixed_order_in_the_samplers():
    store = tagged_store()
    a = EpisodeSampler(store, 5, 1, 3, seed=0, augment="elastic+stroke+affine").sample(3)
    b = EpisodeSampler(store, 5, 1, 3, seed=0, augment=["stroke", "affine", "elastic"]).sample(3)
    plain = EpisodeSampler(store, 5, 1, 3, seed=0).sample(3)
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.classes, plain.classes)
    assert not torch.equal(a.query_x, plain.query_x)
    for name in ("stroke", "elastic"):
        batch = ImageBatchSampler(store, seed=0, augment=name).sample(8)
        assert batch.support_x.shape == (8, 1, 1, 6, 6)


def test_mirror_flips_whole_classes_and_episodes_keep_their_labels():
    store = tagged_store()
    plain = EpisodeSampler(store, 5, 2, 3, seed=0).sample(40)
    aug = EpisodeSampler(store, 5, 2, 3, seed=0, augment="mirror").sample(40)
    assert torch.equal(aug.classes, plain.classes) and torch.equal(aug.query_y, plain.query_y)
    x = torch.cat([aug.support_x.unflatten(1, (5, 2)), aug.query_x.unflatten(1, (5, 3))], 2)
    p = torch.cat([plain.support_x.unflatten(1, (5, 2)), plain.query_x.unflatten(1, (5, 3))], 2)
    mirrored = (x == p.flip(-1)).flatten(2).all(-1)  # [tasks, way]: every image of the class
    kept = (x == p).flatten(2).all(-1)
    assert torch.all(mirrored ^ kept)  # a class is mirrored whole or not at all
    assert 0.3 < mirrored.float().mean() < 0.7


def test_augmentations_combine_and_bad_names_are_refused():
    store = tagged_store()
    a = EpisodeSampler(store, 5, 1, 3, seed=0, augment="mirror+shift").sample(3)
    b = EpisodeSampler(store, 5, 1, 3, seed=0, augment=["mirror", "shift"]).sample(3)
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.query_y, b.query_y)
    with pytest.raises(ConfigError, match="unknown augmentation 'flip'.*mirror\\+shift"):
        EpisodeSampler(store, 5, 1, 3, augment="mirror+flip")
    with pytest.raises(ConfigError, match="needs episodes.*trainer.augment=shift or affine"):
        ImageBatchSampler(store, augment="mirror")
    batch = ImageBatchSampler(store, seed=0, augment="shift").sample(8)
    assert batch.support_x.shape == (8, 1, 1, 6, 6)


def test_sample_indices_draws_distinct_samples_per_class():
    gen = torch.Generator().manual_seed(0)
    classes, samples = sample_indices(torch.tensor([6, 6, 6]), 4, 50, 12, 6, gen)
    assert classes.shape == (50, 12) and samples.shape == (50, 12, 6)
    assert torch.all(samples.sort(-1).values == torch.arange(6))


@pytest.mark.parametrize(
    "way,shot,query,message",
    [
        (13, 1, 1, "way=13 is larger than the 12 classes"),
        (5, 6, 5, r"shot\+query=11 .* larger than the 10 samples"),
        (0, 1, 1, "way must be a positive integer"),
        (5, 1, -2, "query must be a positive integer"),
    ],
)
def test_impossible_episode_shapes_are_refused(way, shot, query, message):
    with pytest.raises(ConfigError, match=message):
        EpisodeSampler(tagged_store(), way, shot, query)
