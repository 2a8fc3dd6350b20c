"""An experiment, not a metarun feature (issue 24, README "Toward a stronger learner"):
training episodes whose classes all come from one alphabet, each rotation of a character
its own class, made by patching the training EpisodeSampler before the usual CLI runs.

    python docs/experiments/within_alphabet_training.py FRACTION <metarun overrides...>
    python docs/experiments/within_alphabet_training.py 1.0 \
        experiment=protonet_omniglot_small_lake_fast data.root=DIR

FRACTION: the share of a meta-batch's tasks drawn within one alphabet (the rest random);
an alphabet is drawn with probability proportional to its number of characters, and only
alphabets with at least `way` classes (rotations counted) take part. Validation and test
episodes are untouched. Checkpoints of such a run resume without the patch as random
episodes: resume it with this script too."""

import sys

import torch

import metarun.data.episodes as E

FRACTION = float(sys.argv.pop(1))
orig_init, orig_sample = E.EpisodeSampler.__init__, E.EpisodeSampler.sample


def init(self, store, way, shot, query, device="cpu", seed=0, split="", augment=None):
    orig_init(self, store, way, shot, query, device, seed, split, augment)
    if split == "train":
        groups = E.alphabet_groups(self.store, None)
        self._groups = [g for g in groups.values() if len(g) * self.store.rotations >= way]
        sizes = torch.tensor([len(g) for g in self._groups], dtype=torch.float)
        self._weights = sizes / sizes.sum()
        sizes_by_name = {a: len(g) for a, g in groups.items()}
        print(f"within-alphabet training episodes ({FRACTION:.0%}): {sizes_by_name}", flush=True)


def sample(self, batch_size):
    if not hasattr(self, "_groups"):
        return orig_sample(self, batch_size)
    st, gen, way = self.store, self.generator, self.way
    classes, samples = E.sample_indices(
        st.counts, st.rotations, batch_size, way, self.shot + self.query, gen, self._s_max
    )
    within = torch.rand(batch_size, generator=gen) < FRACTION
    pick = torch.multinomial(self._weights, batch_size, replacement=True, generator=gen)
    for t in range(batch_size):
        if not within[t]:
            continue
        g = self._groups[int(pick[t])]
        ids = (g[None, :] + st.n_base * torch.arange(st.rotations)[:, None]).flatten()
        chosen = ids[torch.randperm(len(ids), generator=gen)[:way]]
        counts = st.counts[chosen % st.n_base]
        keys = torch.rand(way, self._s_max, generator=gen)
        keys = keys.masked_fill(torch.arange(self._s_max) >= counts[:, None], -1.0)
        classes[t] = chosen
        samples[t] = keys.topk(self.shot + self.query, dim=-1).indices
    return E.gather(st, classes, samples, self.shot, self.augment)


E.EpisodeSampler.__init__, E.EpisodeSampler.sample = init, sample
from metarun.runners.cli import main  # noqa: E402

main()
