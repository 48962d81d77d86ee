"""Tests of imaml_ext.data: Omniglot, MiniImageNet, sinusoids, the task sampler.

Tests on the real Omniglot need the shared copy (``$IMAML_EXT_DATA`` or
``<repo>/../shared/data``, holding ``omniglot/``) and are skipped without it;
everything else builds small fixtures in ``tmp_path``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from imaml_ext.data import (DamagedFileError, DatasetNotFoundError, MiniImageNet, Omniglot, SinusoidTasks, TaskSampler,
                            TaskStream, load_omniglot_arrays, omniglot_split, sinusoid, to_float,
                            worker_seed)
from imaml_ext.data.omniglot import (OmniglotArrays, read_omniglot_npz, read_omniglot_set,
                                     rotate_classes)
from imaml_ext.data.paths import atomic_file

Image = pytest.importorskip("PIL.Image", reason="Pillow decodes the PNG fixtures: pip install pillow")

IMAGE_KEYS = ("alphabet", "character", "char_id", "alphabet_names")


def _shared_omniglot() -> Path | None:
    """The shared Omniglot folder, or None if this checkout has none."""
    roots = [Path(os.environ["IMAML_EXT_DATA"])] if os.environ.get("IMAML_EXT_DATA") else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in roots:
        folder = root / "omniglot"
        if all((folder / name).is_file() for name in
               ("omniglot28.npz", "images_background.zip", "images_evaluation.zip")):
            return folder
    return None


SHARED = _shared_omniglot()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="shared Omniglot copy not found in $IMAML_EXT_DATA/omniglot or ../shared/data/omniglot")


@pytest.fixture(scope="module")
def shared_npz():
    return read_omniglot_npz(SHARED / "omniglot28.npz")


@pytest.fixture(scope="module")
def shared_arrays(shared_npz):
    return OmniglotArrays.from_cache(shared_npz)


# ----------------------------------------------------------------- Omniglot, shared copy

@needs_shared
def test_npz_counts_shapes_and_order(shared_npz):
    for set_name, chars, alphabets, first_id in (("background", 964, 30, 1), ("evaluation", 659, 20, 965)):
        images = shared_npz[set_name]
        assert images.shape == (chars, 20, 28, 28) and images.dtype == np.uint8
        assert images.min() == 0 and images.max() == 255
        assert (images.min(axis=(2, 3)) < 128).all(), "every drawing has ink"
        assert len(shared_npz[f"{set_name}_alphabet_names"]) == alphabets
        keys = list(zip(shared_npz[f"{set_name}_alphabet"], shared_npz[f"{set_name}_character"]))
        assert keys == sorted(keys)
        ids = np.sort(shared_npz[f"{set_name}_char_id"])
        assert (ids == np.arange(first_id, first_id + chars)).all()


@needs_shared
def test_zips_rebuild_the_npz_exactly_and_are_cached(tmp_path, shared_npz, monkeypatch):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        (folder / name).symlink_to(SHARED / name)
    built = load_omniglot_arrays(tmp_path)           # all 32,460 PNGs, about 10 s
    cache = folder / "omniglot28.npz"
    assert cache.is_file()
    rebuilt = read_omniglot_npz(cache)
    for key in shared_npz:
        if key != "info":
            assert rebuilt[key].dtype.kind == shared_npz[key].dtype.kind, key
            np.testing.assert_array_equal(rebuilt[key], shared_npz[key], err_msg=key)
    expected = OmniglotArrays.from_cache(shared_npz)
    np.testing.assert_array_equal(built.images, expected.images)
    assert built.names == expected.names

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been read, not the zips")
    monkeypatch.setattr("imaml_ext.data.omniglot.read_omniglot_files", no_decoding)
    assert load_omniglot_arrays(tmp_path).names == expected.names
    assert not list(folder.glob(".*part")), "no temporary files left"


@needs_shared
def test_extracted_folders_match_the_npz(tmp_path, shared_npz):
    for set_name, alphabets in (("background", ("Greek", "Tifinagh")), ("evaluation", ("Angelic",))):
        with zipfile.ZipFile(SHARED / f"images_{set_name}.zip") as archive:
            members = [n for n in archive.namelist() if n.count("/") > 1 and n.split("/")[1] in alphabets]
            archive.extractall(tmp_path, members)
        part = read_omniglot_set(tmp_path / f"images_{set_name}")
        rows = np.isin(shared_npz[f"{set_name}_alphabet"], alphabets)
        assert rows.sum() == len(part["images"]) > 0
        np.testing.assert_array_equal(part["images"], shared_npz[set_name][rows])
        for key in ("alphabet", "character", "char_id"):
            np.testing.assert_array_equal(part[key], shared_npz[f"{set_name}_{key}"][rows])
        assert list(part["alphabet_names"]) == sorted(alphabets)


@needs_shared
def test_standard_split_is_fixed_disjoint_and_order_free(shared_arrays):
    names = shared_arrays.names
    split = omniglot_split(names)
    assert [len(split[s]) for s in ("train", "val", "test")] == [1200, 0, 423]
    assert not set(split["train"]) & set(split["test"])
    assert sorted(np.concatenate([split["train"], split["test"]])) == list(range(1623))
    # Pinned: changing the split silently would change every reported number.
    digest = hashlib.sha256("\n".join(names[i] for i in split["test"]).encode()).hexdigest()
    assert digest[:16] == "538f2c2828f660be"

    shuffled = [names[i] for i in np.random.RandomState(1).permutation(len(names))]
    again = omniglot_split(shuffled)
    assert {shuffled[i] for i in again["test"]} == {names[i] for i in split["test"]}
    assert set(omniglot_split(names, split_seed=1)["test"]) != set(split["test"])

    with_val = omniglot_split(names, val_classes=100)
    assert [len(with_val[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert set(with_val["train"]) | set(with_val["val"]) == set(split["train"])
    assert not set(with_val["train"]) & set(with_val["val"])


@needs_shared
def test_lake_split(shared_arrays):
    split = omniglot_split(shared_arrays.names, shared_arrays.background, split="lake", val_classes=64)
    assert [len(split[s]) for s in ("train", "val", "test")] == [900, 64, 659]
    assert shared_arrays.background[split["train"]].all() and shared_arrays.background[split["val"]].all()
    assert not shared_arrays.background[split["test"]].any()


@needs_shared
def test_omniglot_subsets_and_rotations(shared_arrays):
    test = Omniglot(SHARED.parent, subset="test")
    assert test.images.shape == (423, 20, 1, 28, 28) and test.images.dtype == torch.uint8
    np.testing.assert_array_equal(test.images[:, :, 0].numpy(), 255 - shared_arrays.images[test.characters])
    train = Omniglot.from_arrays(shared_arrays, "train", rotations=(0, 90, 180, 270))
    assert len(train) == 4800 and train.images.shape == (4800, 20, 1, 28, 28)
    assert not {n.rsplit("/", 1)[0] for n in train.class_names} & {n.rsplit("/", 1)[0] for n in test.class_names}
    base = 255 - torch.from_numpy(shared_arrays.images[train.characters[7]])
    for r, angle in enumerate((0, 90, 180, 270)):
        assert train.class_names[7 * 4 + r] == f"{shared_arrays.names[train.characters[7]]}/rot{angle}"
        assert torch.equal(train.images[7 * 4 + r, :, 0], torch.rot90(base, angle // 90, dims=(-2, -1)))
    x = TaskSampler(test.images, ways=5, shots=1, queries=1).sample(2).support_x
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() == 1
    assert x.mean() < 0.5, "ink = 1 on a paper = 0 background"


def test_rotations_are_validated():
    images = torch.zeros(2, 3, 1, 4, 4, dtype=torch.uint8)
    for bad in ((), (0, 0), (45,), (360,)):
        with pytest.raises(ValueError, match="rotations"):
            rotate_classes(images, bad)


def test_missing_omniglot_says_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_omniglot_arrays(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "omniglot") in message and "download=True" in message
    monkeypatch.setenv("IMAML_EXT_DATA", str(tmp_path))
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "images_background.zip").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="has images_background.zip") as info:
        Omniglot(subset="train")
    assert str(tmp_path / "omniglot") in str(info.value)


# ----------------------------------------------------------------- Omniglot, download

FIXTURE_SETS = {"background": {"Alpha": 2, "Beta_(b)": 1}, "evaluation": {"Gamma": 2}}


def _fixture_zips(folder: Path) -> dict:
    """Small official-layout zips of random binary 105×105 drawings; returns the
    expected cache arrays of each set (28×28, as the loader should make them)."""
    rng = np.random.RandomState(0)
    expected, char_id = {}, 1
    folder.mkdir(parents=True, exist_ok=True)
    for set_name, alphabets in FIXTURE_SETS.items():
        images = []
        with zipfile.ZipFile(folder / f"images_{set_name}.zip", "w") as archive:
            for alphabet, count in sorted(alphabets.items()):
                for c in range(1, count + 1):
                    drawings = []
                    for drawer in range(1, 21):
                        ink = rng.rand(105, 105) > 0.2
                        buffer = io.BytesIO()
                        Image.fromarray(ink).save(buffer, format="PNG")
                        archive.writestr(f"images_{set_name}/{alphabet}/character{c:02d}/"
                                         f"{char_id:04d}_{drawer:02d}.png", buffer.getvalue())
                        small = Image.fromarray(ink).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
                        drawings.append(np.asarray(small))
                    images.append(drawings)
                    char_id += 1
        expected[set_name] = np.array(images, dtype=np.uint8)
    return expected


@pytest.fixture
def http_folder(tmp_path):
    """A folder served on 127.0.0.1; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/python"
    server.shutdown()
    thread.join()
    server.server_close()


def test_download_fetches_verifies_and_caches(tmp_path, http_folder):
    served, url = http_folder
    expected = _fixture_zips(served / "python")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (served / "python").glob("*.zip")}
    root = tmp_path / "data"
    arrays = load_omniglot_arrays(root, download=True, base_url=url, sha256=digests)
    folder = root / "omniglot"
    assert sorted(p.name for p in folder.iterdir()) == [
        "images_background.zip", "images_evaluation.zip", "omniglot28.npz"]
    cache = read_omniglot_npz(folder / "omniglot28.npz")
    for set_name in FIXTURE_SETS:
        np.testing.assert_array_equal(cache[set_name], expected[set_name])
    assert arrays.names == ("Alpha/character01", "Alpha/character02", "Beta_(b)/character01",
                            "Gamma/character01", "Gamma/character02")
    assert list(arrays.background) == [True, True, True, False, False]

    test = Omniglot(root, subset="test", split="lake", download=True, base_url=url + "/missing")
    assert test.class_names == ["Gamma/character01/rot0", "Gamma/character02/rot0"]
    np.testing.assert_array_equal(test.images[:, :, 0].numpy(), 255 - expected["evaluation"])


def test_download_rejects_wrong_checksum_and_bad_files(tmp_path, http_folder):
    served, url = http_folder
    _fixture_zips(served / "python")
    root = tmp_path / "data"
    with pytest.raises(RuntimeError, match="SHA-256"):
        load_omniglot_arrays(root, download=True, base_url=url, sha256={"images_background.zip": "0" * 64})
    assert list((root / "omniglot").iterdir()) == [], "nothing half-written is left"

    with pytest.raises(RuntimeError, match="downloading .*/nothing/images_background.zip failed"):
        load_omniglot_arrays(root, download=True, base_url=url.replace("/python", "/nothing"))

    (served / "junk").mkdir()
    (served / "junk" / "images_background.zip").write_bytes(b"not a zip" * 100)
    with pytest.raises(RuntimeError, match="did not return a zip"):
        load_omniglot_arrays(root, download=True, base_url=url.replace("/python", "/junk"))
    assert list((root / "omniglot").iterdir()) == []


def test_incomplete_character_is_reported(tmp_path):
    _fixture_zips(tmp_path)
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip") as archive:
        members = [n for n in archive.namelist() if not n.endswith("_07.png")]
        archive.extractall(tmp_path / "x", members)
    with pytest.raises(ValueError, match="Gamma/character01 has drawers"):
        read_omniglot_set(tmp_path / "x" / "images_evaluation")


# ----------------------------------------------------------------- MiniImageNet

def _mini_fixture(rng, classes=3, per_class=4, size=84):
    """Images [C, M, 3, S, S] uint8 and class names, class names unsorted on purpose."""
    names = [f"n0{9 - c}000000" for c in range(classes)]
    return names, rng.randint(0, 256, (classes, per_class, 3, size, size), dtype=np.uint8)


def _write_pickle(folder: Path, subset: str, names, images, rng):
    flat = images.reshape(-1, *images.shape[2:]).transpose(0, 2, 3, 1)     # [N, H, W, 3]
    order = rng.permutation(len(flat))                                      # storage order ≠ class order
    position = np.argsort(order)
    class_dict = {name: [int(position[c * images.shape[1] + m]) for m in range(images.shape[1])]
                  for c, name in enumerate(names)}
    with open(folder / f"mini-imagenet-cache-{subset}.pkl", "wb") as f:
        pickle.dump({"image_data": flat[order], "class_dict": class_dict}, f)


def _write_csv(folder: Path, subset: str, names, images):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for m in range(images.shape[1]):                                        # classes interleaved
        for c, name in enumerate(names):
            filename = f"{name}{m:08d}.png"
            Image.fromarray(images[c, m].transpose(1, 2, 0)).save(folder / "images" / filename)
            rows.append(f"{filename},{name}")
    (folder / f"{subset}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")


def test_miniimagenet_layouts_agree(tmp_path):
    rng = np.random.RandomState(0)
    names, images = _mini_fixture(rng)
    (tmp_path / "a" / "miniimagenet").mkdir(parents=True)
    _write_pickle(tmp_path / "a" / "miniimagenet", "val", names, images, rng)
    (tmp_path / "b").mkdir()
    _write_csv(tmp_path / "b", "val", names, images)
    from_pickle = MiniImageNet(tmp_path / "a", subset="val")
    from_csv = MiniImageNet(tmp_path / "b", subset="val")
    order = np.argsort(names)
    expected = torch.from_numpy(images[order])
    for data in (from_pickle, from_csv):
        assert data.class_names == sorted(names)
        assert data.images.shape == (3, 4, 3, 84, 84) and data.images.dtype == torch.uint8
        assert torch.equal(data.images, expected)
    x = TaskSampler(from_csv.images, ways=2, shots=1, queries=1).sample(1).support_x
    assert x.shape == (1, 2, 3, 84, 84) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1


def test_miniimagenet_resizes_folder_images_and_checks_input(tmp_path):
    rng = np.random.RandomState(1)
    names, images = _mini_fixture(rng, classes=2, per_class=2, size=100)
    _write_csv(tmp_path, "train", names, images)
    assert MiniImageNet(tmp_path, subset="train").images.shape == (2, 2, 3, 84, 84)
    with open(tmp_path / "train.csv", "a") as f:
        f.write(f"{names[0]}00000000.png,{names[1]}\n")
    with pytest.raises(ValueError, match="different numbers of images"):
        MiniImageNet(tmp_path, subset="train")
    with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-test.pkl"):
        MiniImageNet(tmp_path, subset="test")


# ----------------------------------------------------------------- task sampler

def _coded_data(classes=10, per_class=20):
    """[C, M, 2, 2] float data whose value is 100·class + example."""
    code = 100 * torch.arange(classes)[:, None] + torch.arange(per_class)[None, :]
    return code[:, :, None, None].expand(classes, per_class, 2, 2).double()


def _decode(x):
    value = x[..., 0, 0].long()
    return value // 100, value % 100


def test_sampler_shapes_labels_and_distinct_classes():
    sampler = TaskSampler(_coded_data(), ways=5, shots=2, queries=3, seed=0)
    sx, sy, qx, qy = sampler.sample(meta_batch=40)
    assert sx.shape == (40, 10, 2, 2) and qx.shape == (40, 15, 2, 2)
    assert sx.dtype == torch.float32 and sy.dtype == qy.dtype == torch.int64
    assert torch.equal(sy, torch.arange(5).repeat_interleave(2).expand(40, -1))
    assert torch.equal(qy, torch.arange(5).repeat_interleave(3).expand(40, -1))
    s_class, s_example = _decode(sx)
    q_class, q_example = _decode(qx)
    first_class = []
    for t in range(40):
        classes = [set(s_class[t][sy[t] == j].tolist()) | set(q_class[t][qy[t] == j].tolist()) for j in range(5)]
        assert all(len(c) == 1 for c in classes), "one class per label"
        classes = [c.pop() for c in classes]
        assert len(set(classes)) == 5, "no class repeated within a task"
        for j, c in enumerate(classes):
            drawn = s_example[t][sy[t] == j].tolist() + q_example[t][qy[t] == j].tolist()
            assert len(set(drawn)) == 5, "no example repeated within a class"
        first_class.append(classes[0])
    assert len(set(first_class)) > 3, "labels are assigned to classes at random"


def test_sampler_is_deterministic_and_resumable():
    data = _coded_data()
    a = TaskSampler(data, ways=3, shots=1, queries=2, seed=7)
    b = TaskSampler(data, ways=3, shots=1, queries=2, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.sample(4), b.sample(4)))
    assert not torch.equal(a.sample(4).support_x, TaskSampler(data, 3, 1, 2, seed=8).sample(4).support_x)
    state = a.state_dict()
    after = a.sample(4)
    fresh = TaskSampler(data, ways=3, shots=1, queries=2, seed=0)
    fresh.load_state_dict(state)
    assert fresh.seed == 7
    assert all(torch.equal(x, y) for x, y in zip(after, fresh.sample(4)))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(a.sample(2, generator=g).query_x,
                       a.sample(2, generator=torch.Generator().manual_seed(1)).query_x)


def test_sampler_per_class_lists_uint8_and_options():
    sizes = [3, 7, 4, 9, 5]
    per_class = [np.full((n, 1, 3, 3), 10 * c + 1, dtype=np.uint8) for c, n in enumerate(sizes)]
    sampler = TaskSampler(per_class, ways=5, shots=2, queries=1, seed=0, dtype=torch.float64, device="cpu")
    batch = sampler.sample(8)
    assert batch.support_x.dtype == torch.float64 and batch.support_x.shape == (8, 10, 1, 3, 3)
    values = torch.cat([batch.support_x.flatten(1), batch.query_x.flatten(1)], 1) * 255
    assert set(values.round().long().unique().tolist()) == {1, 11, 21, 31, 41}
    with pytest.raises(ValueError, match="class 0 has 3 examples"):
        TaskSampler(per_class, ways=2, shots=2, queries=2)
    with pytest.raises(ValueError, match="only 5 classes"):
        TaskSampler(per_class, ways=6, shots=1, queries=0)
    with pytest.raises(TypeError, match="uint8"):
        to_float(torch.zeros(2, dtype=torch.int32))


def test_task_stream_main_process_and_workers():
    sampler = TaskSampler(_coded_data(), ways=2, shots=1, queries=1, seed=3)
    twin = TaskSampler(_coded_data(), ways=2, shots=1, queries=1, seed=3)
    batches = list(TaskStream(sampler, meta_batch=2, num_batches=3))
    assert len(batches) == 3
    for batch in batches:
        assert torch.equal(batch.support_x, twin.sample(2).support_x)

    loader = torch.utils.data.DataLoader(TaskStream(sampler, 2, num_batches=4), batch_size=None, num_workers=2)
    first, second = list(loader), list(loader)
    assert len(first) == 4
    assert all(torch.equal(x.support_x, y.support_x) for x, y in zip(first, second))
    assert not torch.equal(first[0].support_x, first[1].support_x), "workers draw distinct tasks"
    assert worker_seed(0, 0) != worker_seed(0, 1) != worker_seed(1, 0)
    assert worker_seed(0, 0) == 7896617691693857887


# ----------------------------------------------------------------- sinusoid

def test_sinusoid_tasks():
    tasks = SinusoidTasks(shots=5, queries=7, seed=0)
    amplitude, phase = tasks.sample_tasks(1000)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5 and 0 <= phase.min() and phase.max() <= np.pi
    sx, sy, qx, qy = tasks.sample_points(amplitude[:3], phase[:3])
    assert sx.shape == sy.shape == (3, 5, 1) and qx.shape == qy.shape == (3, 7, 1)
    assert sx.dtype == torch.float32 and -5 <= sx.min() and sx.max() <= 5
    torch.testing.assert_close(qy, sinusoid(qx.double(), amplitude[:3], phase[:3]).float())

    a, b = SinusoidTasks(seed=4), SinusoidTasks(seed=4, dtype=torch.float64)
    state = a.state_dict()
    first = a.sample(2)
    torch.testing.assert_close(first.support_y, b.sample(2).support_y.float())
    a.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(first, a.sample(2)))


# ----------------------------------------------------------------- damaged files, file modes

def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _omniglot_folder_with_cache(tmp_path: Path) -> Path:
    folder = tmp_path / "omniglot"
    _fixture_zips(folder)
    load_omniglot_arrays(tmp_path)
    assert (folder / "omniglot28.npz").is_file()
    return folder


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_cache_is_named_with_how_to_rebuild_it(tmp_path, damage):
    cache = _omniglot_folder_with_cache(tmp_path) / "omniglot28.npz"
    if damage == "truncated":
        _truncate(cache)
    else:
        cache.write_bytes(np.random.RandomState(0).bytes(5000))
    with pytest.raises(DamagedFileError, match="omniglot28.npz is damaged") as info:
        load_omniglot_arrays(tmp_path)
    message = str(info.value)
    assert info.value.path == cache and "Delete it" in message and "rebuilds it" in message
    assert "allow_pickle" not in message
    cache.unlink()                                      # the advice works
    assert len(load_omniglot_arrays(tmp_path).names) == 5


def test_truncated_zip_is_named_with_the_download_command(tmp_path):
    folder = tmp_path / "omniglot"
    _fixture_zips(folder)
    _truncate(folder / "images_evaluation.zip", 0.7)
    with pytest.raises(DamagedFileError, match="images_evaluation.zip is damaged") as info:
        load_omniglot_arrays(tmp_path)
    assert f"download_omniglot('{folder}')" in str(info.value)


def test_broken_png_in_an_extracted_folder_is_named(tmp_path):
    _fixture_zips(tmp_path / "zips")
    with zipfile.ZipFile(tmp_path / "zips" / "images_background.zip") as archive:
        archive.extractall(tmp_path / "x")
    png = tmp_path / "x" / "images_background" / "Alpha" / "character02" / "0002_05.png"
    _truncate(png, 0.3)
    with pytest.raises(DamagedFileError, match="0002_05.png is damaged") as info:
        read_omniglot_set(tmp_path / "x" / "images_background")
    assert "Extract images_background.zip" in str(info.value)


def test_damaged_miniimagenet_pickle_is_named(tmp_path):
    rng = np.random.RandomState(0)
    names, images = _mini_fixture(rng, classes=2, per_class=2)
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    _write_pickle(folder, "test", names, images, rng)
    _truncate(folder / "mini-imagenet-cache-test.pkl")
    with pytest.raises(DamagedFileError, match="mini-imagenet-cache-test.pkl is damaged"):
        MiniImageNet(tmp_path, "test")


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_files_written_atomically_follow_the_umask(tmp_path):
    """The Omniglot cache built from the zips (and any atomic_file) gets 0666 less the umask, not 0600."""
    previous = os.umask(0o027)
    try:
        cache = _omniglot_folder_with_cache(tmp_path) / "omniglot28.npz"
        assert cache.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        with atomic_file(tmp_path / "other.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "other.txt").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(previous)
    assert not list(tmp_path.rglob("*.part"))
