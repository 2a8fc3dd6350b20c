"""`mode=predict`: classify a folder of query images from a folder of examples."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from metarun.data.images import list_folders, list_images, to_float
from metarun.errors import ConfigError
from metarun.runners.evaluate import balanced_labels, check_assignment

log = logging.getLogger("metarun")


def read_support(folder: Path, preprocess) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """support/<class>/<image> -> x [n, C, H, W] uint8, y [n], class names."""
    classes = list_folders(folder)  # hidden, special and broken entries skipped, and named
    if len(classes) < 2:
        raise ConfigError(
            f"support={folder} needs one subfolder per class (at least 2), found {len(classes)}"
        )
    xs, ys = [], []
    for label, class_dir in enumerate(classes):
        files = list_images(class_dir)
        if not files:
            raise ConfigError(f"support class folder {class_dir} has no images (.png, .jpg, ...)")
        xs += [preprocess(f) for f in files]
        ys += [label] * len(files)
    return torch.stack(xs), torch.tensor(ys), [c.name for c in classes]


def predict_folder(
    learner,
    support: str | Path,
    query: str | Path,
    out_csv: Path,
    assignment: str = "independent",
) -> list[dict]:
    """Predict every query image; write and return rows (file, predicted class, score).
    assignment (eval.assignment): "independent" gives each query its most likely class;
    "balanced" labels the queries together, each class the same number of them (the query
    folder must hold a multiple of the number of classes, e.g. one drawing of each, as in
    Lake's one-shot runs); a row's score is its class's softmax probability either way."""
    support, query = Path(support).expanduser(), Path(query).expanduser()
    for name, folder in (("support", support), ("query", query)):
        if not folder.is_dir():
            raise ConfigError(f"{name}={folder} is not a folder")
    support_x, support_y, names = read_support(support, learner.preprocess)
    query_files = list_images(query)
    if not query_files:
        raise ConfigError(f"query={query} holds no images (.png, .jpg, ...)")
    query_x = torch.stack([learner.preprocess(f) for f in query_files])
    device = learner.device
    with torch.no_grad():
        logits = learner.predict(
            to_float(support_x)[None].to(device),
            support_y[None].to(device),
            to_float(query_x)[None].to(device),
            len(names),
        )[0]  # [nq, way]
    check_assignment(assignment)
    confidence = learner.confidence(logits)
    if assignment == "balanced":
        way, n = len(names), len(query_files)
        if n % way:
            raise ConfigError(
                f"eval.assignment=balanced gives every class the same number of queries, but "
                f"query={query} holds {n} images for {way} classes; give it a multiple of {way} "
                "(e.g. one image of each class), or use eval.assignment=independent"
            )
        labels = balanced_labels(logits[None], n // way)[0]
        scores = confidence.gather(-1, labels[:, None])[:, 0]
    else:
        scores, labels = confidence.max(-1)
    rows = [
        {"query": f.name, "prediction": names[int(k)], "score": round(float(s), 6)}
        for f, k, s in zip(query_files, labels, scores)
    ]
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["query", "prediction", "score"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def print_predictions(rows: list[dict], out_csv: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("query", "prediction", "score", title=f"predictions ({out_csv})")
    for row in rows:
        table.add_row(row["query"], row["prediction"], f"{row['score']:.3f}")
    Console().print(table)
