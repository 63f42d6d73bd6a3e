"""The leakage audit finds planted near-duplicates across a split and nothing on a clean one."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from breastnet.audit import THRESHOLDS, audit, crossing_pairs, load_descriptors, main
from breastnet.data.bach import find_images, read_rgb
from breastnet.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """24 distinct generated images and a clean split of them (12 train, 6 val, 6 test)."""
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("audit") / "data", n_per_class=6, width=192, height=144
    )
    ids = [p.relative_to(root).with_suffix("").as_posix() for p in find_images(root)]
    return root, {"train": ids[0::2], "val": ids[1::4], "test": ids[3::4]}


def jpeg(image: np.ndarray, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer)


COPIES = {  # a copy of a training image, as it might turn up again in an archive
    "flipped": lambda x: Image.fromarray(np.ascontiguousarray(np.rot90(x[:, ::-1]))),
    "rescaled": lambda x: Image.fromarray(x).resize((120, 90), Image.Resampling.BILINEAR),
    "reencoded": lambda x: jpeg(x, 60),
    "all": lambda x: jpeg(np.asarray(Image.fromarray(x[::-1]).resize((96, 72))), 50),
}


def test_a_clean_split_of_distinct_images_flags_nothing(generated, tmp_path: Path) -> None:
    root, split = generated
    ids = split["train"] + split["val"] + split["test"]
    descriptors, kind = load_descriptors(root, ids)
    assert kind == "images"
    matches = audit(descriptors, split, THRESHOLDS[kind])
    assert len(matches) == 12 and all(m.side in ("val", "test") for m in matches)
    assert max(m.similarity for m in matches) < THRESHOLDS["images"] - 0.1
    assert crossing_pairs(descriptors, split, THRESHOLDS[kind]) == []


def test_planted_copies_across_the_split_are_all_found(generated, tmp_path: Path) -> None:
    source, split = generated
    root = tmp_path / "data"
    for path in find_images(source):
        (root / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        (root / path.relative_to(source)).write_bytes(path.read_bytes())
    planted = {}
    for n, (name, copy) in enumerate(COPIES.items()):
        original = split["train"][3 * n]
        copy(read_rgb(source / f"{original}.png")[0]).convert("RGB").save(root / f"{name}.png")
        planted[name] = original
    leaky = {**split, "test": split["test"] + list(planted)}
    (tmp_path / "split.json").write_text(json.dumps(leaky))

    main([str(root), str(tmp_path / "split.json"), "--out", str(tmp_path / "audit.json")])
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["descriptor"] == "images" and saved["flagged"] == len(planted)
    found = {m["image_id"]: m["train_id"] for m in saved["matches"] if m["near_duplicates"]}
    assert found == planted
    assert {m["image_id"] for m in saved["matches"][:4]} == set(planted)  # most similar first
    with open(tmp_path / "audit.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(saved["matches"])


def test_features_file_near_duplicates(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {
        f"Benign/b{i:03d}": {"features": torch.from_numpy(rng.random((12, 64))).float()}
        for i in range(20)
    }
    original = images["Benign/b004"]["features"]
    # The same image's patches in another order (a flipped copy), each a little perturbed.
    copy = original[torch.randperm(12)] + 0.01 * torch.randn(12, 64)
    images["Benign/copy"] = {"features": copy}
    path = tmp_path / "features.pt"
    torch.save({"images": images}, path)
    split = {
        "train": [f"Benign/b{i:03d}" for i in range(10)],
        "val": [f"Benign/b{i:03d}" for i in range(10, 20)],
        "test": ["Benign/copy"],
    }
    descriptors, kind = load_descriptors(path, [i for side in split.values() for i in side])
    assert kind == "features"
    pairs = crossing_pairs(descriptors, split, THRESHOLDS[kind])
    assert [(m.image_id, m.train_id) for m in pairs] == [("Benign/copy", "Benign/b004")]
    assert crossing_pairs(descriptors, {**split, "test": []}, THRESHOLDS[kind]) == []


def test_prepare_warns_about_copies_across_its_split(
    generated, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each class gets a flipped copy of one of its images; prepare's audit flags exactly the
    copies its random split put on the other side of the train/val-test line."""
    from breastnet.cli import run_stages

    from conftest import compose_config

    source, _ = generated
    root = tmp_path / "data"
    copies = {}
    for path in find_images(source):
        target = root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        image_id = path.relative_to(source).with_suffix("").as_posix()
        if image_id.endswith("000"):
            copy = target.with_name(f"copy{target.name}")
            COPIES["flipped"](read_rgb(path)[0]).save(copy)
            copies[copy.relative_to(root).with_suffix("").as_posix()] = image_id
    cfg = compose_config(
        tmp_path,
        "stages=[prepare]",
        "experiment=demo",
        f"data.data_dir={root}",
        "data.tile_size=64",
        "data.stride=64",
        "data.patch_size=32",
        "data.prepare_workers=0",
        "logger=none",
    )
    with caplog.at_level("WARNING", logger="breastnet.audit"):
        metrics = run_stages(cfg)
    (split_path,) = (tmp_path / "work" / "splits").glob("*[0-9a-f].json")
    split = json.loads(split_path.read_text())
    side = {i: s for s, ids in split.items() for i in ids}
    across = {  # the val/test member of each pair split by the train line
        (a if side[a] != "train" else b)
        for a, b in copies.items()
        if (side[a] == "train") != (side[b] == "train")
    }
    saved = json.loads(split_path.with_suffix(".audit.json").read_text())
    assert {m["image_id"] for m in saved["matches"] if m["near_duplicates"]} == across
    assert metrics["data/near_duplicates"] == len(across) > 0
    assert f"{len(across)} of {len(saved['matches'])} val/test images" in caplog.text
