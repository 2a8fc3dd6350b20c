"""Lake's within-alphabet one-shot protocol (eval.protocol=within_alphabet): episodes of one
alphabet's unrotated characters, the support by some people and the queries by others.

Most tests run on stores whose pixels say what each image is, or on tiny fake Omniglot
archives with the real file names; one reads the real small archives when they are there.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import HAVE_OMNIGLOT, OMNIGLOT_DIR, compose_with, run_cli
from fakes import write_zip
from omegaconf import OmegaConf

import metarun.data.omniglot as om
from metarun.data import ClassStore, ConfigError, FixedEpisodes
from metarun.data.episodes import EpisodeSampler, fixed_episodes
from metarun.data.omniglot import omniglot_small
from metarun.data.sinusoid import sinusoid
from metarun.data.synthetic import synthetic
from metarun.errors import CheckpointError
from metarun.runners.report import collect, comparisons, groups_of
from metarun.runners.results import episode_set, results_record
from metarun.runners.trainer import ADDED_SETTINGS, check_compatible
from metarun.runners.validate import check_protocol_fits_data, check_training_episodes, validate

OFFICIAL = om.CONTENTS  # before a test replaces it with the fakes' contents
SMALL1, SMALL2 = om.SMALL_ARCHIVES
# the fakes: 6 characters per alphabet in the first archive, 4 in the second (so the test
# split has Early_Aramaic with 6 and Tagalog with 4), each drawn by 6 people
FAKE_CHARS = {SMALL1: 6, SMALL2: 4}
FAKE_DRAWERS = 6


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METARUN_DATA", raising=False)
    om._load_archive.cache_clear()
    yield
    om._load_archive.cache_clear()


@pytest.fixture
def fake_root(tmp_path, monkeypatch) -> Path:
    """Both small archives, with the real layout and file names `<id>_<drawer>.png`."""
    root = tmp_path / "omniglot"
    root.mkdir()
    contents = {}
    for name, chars in FAKE_CHARS.items():
        write_zip(root / name, OFFICIAL[name], chars=chars, images=FAKE_DRAWERS)
        contents[name] = dict.fromkeys(OFFICIAL[name], chars)
    monkeypatch.setattr(om, "CONTENTS", {**OFFICIAL, **contents})
    monkeypatch.setattr(om, "DRAWINGS", FAKE_DRAWERS)
    return root


# ---------------------------------------------------------------- tagged stores


def tagged_store(alphabets=None, drawers=6, rotations=4) -> ClassStore:
    """Classes "<Alphabet>/cNN"; each image's pixels say which it is: [0,0] its base class,
    [0,1] its drawer, [5,5] a corner marker that a rotation moves. Each class stores its
    drawers' images in its own shuffled order, so position and drawer differ."""
    alphabets = alphabets or {"Aaa": 6, "Bbb": 4, "Ccc": 5}
    per_class, who, names = [], [], []
    gen = torch.Generator().manual_seed(0)
    for alphabet, chars in alphabets.items():
        for c in range(chars):
            ids = torch.randperm(drawers, generator=gen) + 1  # drawers 1..D, shuffled
            x = torch.zeros(drawers, 1, 6, 6, dtype=torch.uint8)
            x[:, 0, 0, 0] = len(names)
            x[:, 0, 0, 1] = ids.to(torch.uint8)
            x[:, 0, 5, 5] = 200
            per_class.append(x)
            who.append(ids)
            names.append(f"{alphabet}/c{c + 1:02d}")
    return ClassStore.from_classes(per_class, names, rotations, drawers=who)


def tags(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base class, drawer) of tagged float images [..., 1, 6, 6]."""
    t = (x[..., 0, 0, :2] * 255).round().long()
    return t[..., 0], t[..., 1]


def within(store, n=30, way=3, shot=1, query=1, seed=0, **kw) -> FixedEpisodes:
    return FixedEpisodes(store, n, way, shot, query, seed, protocol="within_alphabet", **kw)


def test_every_episode_is_one_alphabets_unrotated_characters():
    store = tagged_store()
    episodes = within(store, n=30, way=4, shot=2, query=3)
    batch = next(episodes.batches(30))
    support_class, _ = tags(batch.support_x)  # [30, way*shot]
    query_class, _ = tags(batch.query_x)
    alphabets = store.alphabets
    for s, q in zip(support_class.tolist(), query_class.tolist()):
        assert len({alphabets[c] for c in s + q}) == 1
        assert len(set(s)) == 4  # `way` different characters
    # no rotation-made class and no turned image, though the store has rotations=4
    assert int(episodes.classes.max()) < store.n_base
    for x in (batch.support_x, batch.query_x):
        assert bool((x[..., 0, 5, 5] == 200 / 255).all())
    # labels name the characters: label i is the episode's i-th class
    assert torch.equal(support_class.view(30, 4, 2)[..., 0], episodes.classes)
    assert torch.equal(batch.support_y.view(30, 4, 2)[..., 0], torch.arange(4).expand(30, 4))
    # the random protocol, on the same store, does draw rotated classes
    random = FixedEpisodes(store, 30, 4, 2, 3, seed=0)
    assert int(random.classes.max()) >= store.n_base


def test_each_alphabet_gets_its_share_of_the_episodes():
    store = tagged_store()  # Aaa, Bbb, Ccc
    episodes = within(store, n=31, way=3)
    first = [store.alphabets[c] for c in episodes.classes[:, 0].tolist()]
    assert sorted(first.count(a) for a in ("Aaa", "Bbb", "Ccc")) == [10, 10, 11]


@pytest.mark.parametrize(("shot", "query"), [(1, 1), (2, 3), (1, 5)])
def test_support_by_some_people_and_queries_by_others(shot, query):
    way, n = 3, 120
    batch = next(within(tagged_store(), n=n, way=way, shot=shot, query=query).batches(n))
    _, support = tags(batch.support_x)
    _, queries = tags(batch.query_x)
    support = support.view(n, way, shot)  # [episode, class, shot]
    queries = queries.view(n, way, query)
    # the j-th support image of every class is by the same person, and so is each query's
    assert bool((support == support[:, :1]).all()) and bool((queries == queries[:, :1]).all())
    people = torch.cat([support[:, 0], queries[:, 0]], 1)  # [n, shot + query]
    assert all(len(set(p)) == shot + query for p in people.tolist())  # all different people
    # over the episodes, every one of the 6 people draws a support set at some point
    assert set(support[:, 0].flatten().tolist()) == set(range(1, 7))


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others():
    store = tagged_store()

    def drawn(seed, **kw):
        e = within(store, n=20, way=3, shot=1, query=2, seed=seed, **kw)
        return torch.cat([e.classes.flatten(), e.samples.flatten()])

    assert torch.equal(drawn(0), drawn(0))
    assert not torch.equal(drawn(0), drawn(1))
    # the order in which eval.alphabets names the alphabets does not change the episodes
    assert torch.equal(drawn(3, alphabets=["Aaa", "Ccc"]), drawn(3, alphabets=["Ccc", "Aaa"]))
    # nor does the number of episodes per forward pass
    e = within(store, n=20, way=3, shot=1, query=2, seed=0)
    assert torch.equal(torch.cat([b.query_x for b in e.batches(7)]), next(e.batches(20)).query_x)


def test_eval_alphabets_restricts_the_episodes_and_names_what_the_split_holds():
    store = tagged_store()
    e = within(store, n=12, way=3, alphabets=["Bbb"])
    assert {store.alphabets[c] for c in e.classes.flatten().tolist()} == {"Bbb"}
    with pytest.raises(
        ConfigError, match=r"eval.alphabets names Zzz.*its alphabets: Aaa, Bbb, Ccc"
    ):
        within(store, alphabets=["Aaa", "Zzz"], split="test")
    with pytest.raises(ConfigError, match="eval.protocol=within_alphabet"):
        FixedEpisodes(store, 5, 3, 1, 1, alphabets=["Aaa"])  # alphabets with random episodes


def test_an_alphabet_with_fewer_characters_than_way_is_named_with_the_fixes():
    store = tagged_store()  # Aaa 6, Bbb 4, Ccc 5
    with pytest.raises(ConfigError) as err:
        within(store, way=5, split="test")
    text = str(err.value)
    assert "in the 'test' split Bbb has only 4" in text
    assert "use eval.way<=4 or eval.alphabets=[Aaa,Ccc]" in text
    # validation episodes use every alphabet of their split: only eval.way helps there
    with pytest.raises(ConfigError) as err:
        within(store, way=6, split="val")
    assert "Bbb has only 4, Ccc has only 5" in str(err.value)
    assert str(err.value).endswith("use eval.way<=4")


def test_only_people_who_drew_every_character_of_the_alphabet_are_drawn():
    # character 1 drawn by people 1, 2, 3; character 2 by 2, 3, 4 (twice by 3)
    x = torch.zeros(7, 1, 6, 6, dtype=torch.uint8)
    x[:, 0, 0, 1] = torch.tensor([1, 2, 3, 2, 3, 3, 4], dtype=torch.uint8)
    drawers = [torch.tensor([1, 2, 3]), torch.tensor([2, 3, 3, 4])]
    store = ClassStore.from_classes([x[:3], x[3:]], ["A/c1", "A/c2"], drawers=drawers)
    batch = next(within(store, n=10, way=2, shot=1, query=1).batches(10))
    _, support = tags(batch.support_x)
    _, queries = tags(batch.query_x)
    assert set(support.flatten().tolist()) | set(queries.flatten().tolist()) == {2, 3}
    with pytest.raises(ConfigError) as err:
        within(store, way=2, shot=1, query=2, split="test")
    text = str(err.value)
    assert "shot+query=3 images (shot=1, query=2) from a different person" in text
    assert "(A: 2); use eval.shot+eval.query<=2 (Lake's protocol" in text


def test_data_that_does_not_know_its_drawers_is_refused_naming_the_data_sets_that_do():
    with pytest.raises(ConfigError, match=r"data=omniglot, data=omniglot_small"):
        within(synthetic("test"))
    with pytest.raises(ConfigError, match=r"data=omniglot, data=omniglot_small"):
        fixed_episodes(sinusoid("test"), 5, 1, 5, 5, protocol="within_alphabet")
    # before any work: the config check knows which data sets record drawers
    with pytest.raises(ConfigError) as err:
        validate(compose_with("eval.protocol=within_alphabet"))
    assert "data=synthetic does not record" in str(err.value)
    assert "use data=omniglot or data=omniglot_small, or eval.protocol=random" in str(err.value)
    validate(compose_with("eval.protocol=within_alphabet", "data=omniglot_small"))  # fine


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.protocol=lake"], "eval.protocol='lake'; choose random, within_alphabet"),
        (
            ["data=omniglot_small", "eval.protocol=within_alphabet", "eval.alphabets=Greek"],
            "eval.alphabets must be a list of names, e.g. eval.alphabets=[Early_Aramaic]",
        ),
        (
            ["data=omniglot_small", "eval.alphabets=[Greek]"],
            "eval.alphabets chooses the alphabets of within-alphabet episodes, but "
            "eval.protocol=random",
        ),
    ],
)
def test_bad_protocol_settings_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_with(*overrides))
    assert message in str(err.value)


def test_mode_test_checks_the_protocol_against_the_checkpoints_data_set():
    stored = compose_with("data=omniglot_small")
    OmegaConf.update(stored, "eval.protocol", "within_alphabet")
    check_protocol_fits_data(stored)  # the checkpoint's data set knows its drawers
    stored = compose_with("data=synthetic")
    OmegaConf.update(stored, "eval.protocol", "within_alphabet")
    with pytest.raises(ConfigError, match="data=synthetic does not record"):
        check_protocol_fits_data(stored)


# ---------------------------------------------------------------- recording and reports


def test_results_and_the_episode_definition_record_the_protocol():
    cfg = compose_with(
        "data=omniglot_small",
        "eval.protocol=within_alphabet",
        "eval.alphabets=[Tagalog,Early_Aramaic]",
        "eval.way=5",
        "eval.query=1",
    )
    result = {"metric": "acc", "acc": 0.5, "ci95": 0.1, "episodes": 10}
    record = results_record(cfg, result)
    assert record["protocol"] == "within_alphabet"
    assert record["alphabets"] == ["Early_Aramaic", "Tagalog"]  # sorted: the same episodes
    defined = episode_set(cfg, 10)
    assert (defined["protocol"], defined["alphabets"]) == ("within_alphabet", record["alphabets"])
    plain = compose_with("data=omniglot_small", "eval.way=5", "eval.query=1")
    assert results_record(plain, result)["protocol"] == "random"
    assert "alphabets" not in results_record(plain, result)
    assert episode_set(plain, 10) != defined


def write_job(folder: Path, algo: str, scores: list[float], episodes: dict) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- algo={algo}\n")
    with open(folder / "test_episodes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["episode", "acc"], *enumerate(scores)])
    results = {
        "test_acc": sum(scores) / len(scores),
        "ci95": 0.1,
        "episodes": len(scores),
        "test_episodes": {"file": "test_episodes.csv", "set": episodes},
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_runs_with_other_protocols_are_never_paired(tmp_path):
    base = {"data": "omniglot_small", "split": "test", "way": 5, "shot": 1, "query": 1}
    base |= {"seed": 0, "episodes": 4}
    scores = [1.0, 0.0, 1.0, 1.0]
    sweep = tmp_path / "sweep"
    write_job(sweep / "0", "protonet", scores, {**base, "protocol": "random"})
    write_job(sweep / "1", "matching", scores, {**base, "protocol": "within_alphabet"})
    pairs, unpaired = comparisons(groups_of(collect([str(sweep)])[0]))
    assert pairs == [] and len(unpaired) == 1
    # a run recorded before the protocol was (no "protocol" key) had random episodes
    older = tmp_path / "older"
    write_job(older / "0", "protonet", scores, {**base, "protocol": "random"})
    write_job(older / "1", "matching", [0.0, 0.0, 1.0, 1.0], base)
    pairs, unpaired = comparisons(groups_of(collect([str(older)])[0]))
    assert len(pairs) == 1 and unpaired == []


@pytest.mark.parametrize(
    ("key", "other"),
    [
        ("eval.protocol", "within_alphabet"),
        ("eval.alphabets", "[Tagalog]"),
        ("eval.assignment", "balanced"),
        ("trainer.episodes", "within_alphabet"),
        ("eval.tta", "4"),
        ("trainer.val_assignment", "balanced"),
    ],
)
def test_a_checkpoint_from_before_a_setting_existed_resumes_as_its_default(key, other):
    """Every setting added after checkpoints were first written (ADDED_SETTINGS): a
    checkpoint without it resumes under the default, and another value is refused."""
    assert key in ADDED_SETTINGS
    now = compose_with()
    before = OmegaConf.to_container(now, resolve=True)
    group, name = key.split(".")
    del before[group][name]
    check_compatible(now, OmegaConf.create(before), "last.pt", 0)
    with pytest.raises(CheckpointError, match=f"{key}: checkpoint {ADDED_SETTINGS[key]!r}"):
        check_compatible(compose_with(f"{key}={other}"), OmegaConf.create(before), "last.pt", 0)


# ---------------------------------------------------------------- training episodes


def test_within_alphabet_training_episodes_take_one_alphabets_classes_rotations_included():
    store = tagged_store()  # Aaa 6, Bbb 4, Ccc 5 characters, 4 rotations
    sampler = EpisodeSampler(store, 18, 1, 1, seed=3, split="train", classes="within_alphabet")
    seen, rotated = [], False
    for _ in range(20):
        ep = sampler.sample(8)
        base = ep.classes % store.n_base
        alphabets = [{store.alphabets[b] for b in task.tolist()} for task in base]
        assert all(len(a) == 1 for a in alphabets)  # one alphabet per task
        assert all(len(set(task.tolist())) == 18 for task in ep.classes)  # distinct classes
        seen += [a.pop() for a in alphabets]
        rotated |= bool((ep.classes >= store.n_base).any())
        base_tags, _ = tags(ep.support_x)
        upright = ep.classes < store.n_base  # a rotation moves the tag pixel
        assert torch.equal(base_tags[upright], base[upright])  # the images are those classes'
    # 18-way needs 18 classes: Bbb (16 with rotations) never, the other two both
    assert set(seen) == {"Aaa", "Ccc"} and rotated


def test_within_alphabet_training_is_repeatable_and_resumes_from_its_state():
    store = tagged_store()
    make = lambda seed: EpisodeSampler(store, 5, 1, 2, seed=seed, classes="within_alphabet")  # noqa: E731
    a, b = make(0), make(0)
    assert torch.equal(a.sample(4).classes, b.sample(4).classes)
    state = a.state_dict()
    after = a.sample(4)
    c = make(7)
    c.load_state_dict(state)
    assert torch.equal(c.sample(4).classes, after.classes)
    assert not torch.equal(make(1).sample(4).classes, make(0).sample(4).classes)


def test_alphabets_too_small_for_way_are_named_with_the_fixes():
    with pytest.raises(ConfigError) as err:
        EpisodeSampler(tagged_store(), 25, 1, 1, split="train", classes="within_alphabet")
    message = str(err.value)
    assert "the largest alphabet of the 'train' split, Aaa, has 24" in message
    assert "set way<=24, or trainer.episodes=random" in message


def test_within_alphabet_training_needs_alphabets_and_episodes():
    with pytest.raises(ConfigError, match="data=synthetic does not have; use data=omniglot"):
        check_training_episodes(compose_with("trainer.episodes=within_alphabet"))
    with pytest.raises(
        ConfigError, match="trains on batches of images; use trainer.episodes=random"
    ):
        check_training_episodes(
            compose_with("trainer.episodes=within_alphabet", "algo=baseline", "data=omniglot_small")
        )
    check_training_episodes(compose_with("trainer.episodes=within_alphabet", "data=omniglot_small"))
    with pytest.raises(ConfigError, match="trainer.episodes"):
        validate(compose_with("trainer.episodes=alphabet"))


# ---------------------------------------------------------------- Omniglot


def test_omniglot_stores_keep_each_images_drawer_through_splits_and_the_cache(
    fake_root, monkeypatch
):
    test = omniglot_small(fake_root, "test", download=False)
    assert test.alphabets == ["Early_Aramaic"] * 6 + ["Tagalog"] * 4
    # `<id>_<drawer>.png`: every character drawn once by each of the 6 people
    assert test.drawers.tolist() == list(range(1, 7)) * 10
    val = omniglot_small(fake_root, "val", download=False)  # Greek: in both archives, once
    assert val.names == [f"Greek/character{c:02d}" for c in range(1, 7)]
    assert val.drawers.tolist() == list(range(1, 7)) * 6
    # a second process reads the cache, drawers included
    om._load_archive.cache_clear()
    monkeypatch.setattr(om, "_decode_archive", lambda *a: pytest.fail("decoded again"))
    again = omniglot_small(fake_root, "test", download=False)
    assert torch.equal(again.drawers, test.drawers) and torch.equal(again.images, test.images)


def test_a_cache_written_before_drawers_were_kept_is_not_served(fake_root, monkeypatch):
    omniglot_small(fake_root, "test", download=False)
    om._load_archive.cache_clear()
    monkeypatch.setattr(om, "CACHE_FORMAT", om.CACHE_FORMAT - 1)  # an older metarun's key
    decoded = []
    real = om._decode_archive
    monkeypatch.setattr(om, "_decode_archive", lambda *a: decoded.append(1) or real(*a))
    omniglot_small(fake_root, "test", download=False)
    assert decoded == [1, 1]  # both archives decoded: the newer cache files are not its


def test_within_alphabet_on_fake_omniglot_end_to_end(fake_root, tmp_path):
    """mode=train scores validation and test by the protocol; mode=test applies it to a
    checkpoint, restricted by eval.alphabets, and both record it."""
    om._load(fake_root, om.SMALL_ARCHIVES, download=False, image_size=28)  # the checked decode
    common = ["logger=none", "device=cpu", "eval.protocol=within_alphabet", "eval.query=1"]
    train = tmp_path / "train"
    run_cli(
        *common,
        "data=omniglot_small",  # mode=test below: the checkpoint's data set and root
        f"data.root={fake_root}",
        "data.download=false",
        "way=3",
        "query=2",
        "eval.way=4",
        "trainer.episodes=within_alphabet",
        "trainer.steps=2",
        "trainer.val_every=2",
        "trainer.val_episodes=4",
        "eval.episodes=6",
        f"hydra.run.dir={train}",
        cwd=tmp_path,
    )
    results = json.loads((train / "results.json").read_text())
    assert (results["protocol"], results["way"], results["query"]) == ("within_alphabet", 4, 1)
    assert results["test_episodes"]["set"]["protocol"] == "within_alphabet"
    assert "alphabets" not in results and results["best_val_acc"] is not None
    # the archives moved: mode=test is told where with data.root=, as a user would
    moved = fake_root.rename(tmp_path / "moved")
    om._load(moved, om.SMALL_ARCHIVES, download=False, image_size=28)
    test = tmp_path / "test"
    run_cli(
        *common,
        "mode=test",
        f"ckpt={train / 'checkpoints' / 'best.pt'}",
        f"data.root={moved}",
        "data.download=false",
        "eval.way=6",
        "eval.alphabets=[Early_Aramaic]",  # Tagalog has 4 characters, too few for 6-way
        "eval.episodes=5",
        f"hydra.run.dir={test}",
        cwd=tmp_path,
    )
    results = json.loads((test / "results.json").read_text())
    assert (results["protocol"], results["alphabets"]) == ("within_alphabet", ["Early_Aramaic"])
    assert results["test_episodes"]["set"]["alphabets"] == ["Early_Aramaic"]
    assert results["episodes"] == 5 and 0.0 <= results["test_acc"] <= 1.0
    refused = run_cli(
        *common,
        "mode=test",
        f"ckpt={train}",
        f"data.root={moved}",
        "eval.way=6",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode != 0
    assert (
        "Tagalog has only 4" in refused.stderr
        and "eval.alphabets=[Early_Aramaic]" in refused.stderr
    )


@pytest.mark.skipif(
    not HAVE_OMNIGLOT,
    reason=f"the real small Omniglot zips are not in {OMNIGLOT_DIR} (set METARUN_OMNIGLOT_DIR)",
)
def test_lakes_protocol_on_the_real_small_archives():
    test = omniglot_small(OMNIGLOT_DIR, "test", download=False)
    assert test.rotations == 4 and test.n_base == 39
    for c in range(test.n_base):  # 20 people drew every character
        o, n = int(test.offsets[c]), int(test.counts[c])
        assert sorted(test.drawers[o : o + n].tolist()) == list(range(1, 21))
    with pytest.raises(ConfigError) as err:
        within(test, way=20, split="test")
    text = str(err.value)
    assert "Tagalog has only 17" in text and "Early_Aramaic: 22" in text
    assert "use eval.way<=17 or eval.alphabets=[Early_Aramaic]" in text
    with pytest.raises(ConfigError, match=r"eval.shot\+eval.query<=20"):
        within(test, way=5, shot=1, query=20, split="test")
    # 20-way 1-shot, one query each: one person's drawings against another's
    episodes = within(test, n=10, way=20, alphabets=["Early_Aramaic"])
    assert {test.names[c].split("/")[0] for c in episodes.classes.flatten().tolist()} == {
        "Early_Aramaic"
    }
    rows = test.offsets[episodes.classes][..., None] + episodes.samples  # [10, 20, 2]
    who = test.drawers[rows]
    assert bool((who == who[:, :1]).all()) and bool((who[..., 0] != who[..., 1]).all())
    batch = next(episodes.batches(10))
    assert torch.equal(batch.support_x[:, :, 0], test.images[rows[..., 0]].float()[:, :, 0] / 255)
