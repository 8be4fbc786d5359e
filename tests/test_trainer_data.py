import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from trainer import data as D
from trainer.data import DataError, load_dataset

from conftest import make_tree


def test_tree_and_tar_load_the_same_images(tree, tar_of_tree):
    a = load_dataset(tree, download=False)
    b = load_dataset(tar_of_tree, download=False)
    assert a.classes == b.classes == ("cat", "dog", "ship")
    assert a.train_x.shape == (36, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (12, 3, 32, 32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_y.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    # pixels equal the PNG written for train/dog/0003.png
    png = torch.from_numpy(__import__("numpy").array(Image.open(tree / "train" / "dog" / "0003.png"))).permute(2, 0, 1)
    assert torch.equal(a.train_x[12 + 3], png)


def test_decoded_arrays_are_cached(tree, monkeypatch):
    load_dataset(tree, download=False)
    monkeypatch.setattr(D, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_dataset(tree, download=False)
    assert again.train_x.shape[0] == 36


def test_writers_sharing_a_cache_do_not_collide(tree, tmp_path, monkeypatch):
    """Trials on several machines decode into one shared cache at once: another writer finishing between this
    one's save and rename leaves this one's temporary file alone."""
    real_save, others = torch.save, []

    def save_then_another_writer(obj, f):
        real_save(obj, f)
        if not others:
            others.append(None)
            others[0] = D.load_raw(tree, download=False, cache_dir=tmp_path)
    monkeypatch.setattr(D.torch, "save", save_then_another_writer)
    out = D.load_raw(tree, download=False, cache_dir=tmp_path)
    assert out[0].shape[0] == others[0][0].shape[0] == 36
    assert len(list(tmp_path.rglob("*.pt"))) == 1 and not list(tmp_path.rglob("*.tmp"))


def test_finetune_subset_keeps_validation_and_test_whole():
    x = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 3, 32, 32).contiguous()
    y = torch.arange(200) % 4
    d = D.Dataset(x, y, x[:8], y[:8], ("a", "b", "c", "d"), "s", x[:12], y[:12])
    sub = d.with_train_subset(40, seed=0)
    assert len(sub.train_y) == 40 and torch.bincount(sub.train_y).tolist() == [10, 10, 10, 10]
    assert sub.val_x is d.val_x and sub.test_x is d.test_x  # what trials are measured on does not change
    assert set(sub.train_x[:, 0, 0, 0].tolist()) <= set(x[:, 0, 0, 0].tolist())
    assert torch.equal(d.with_train_subset(40, seed=0).train_y, sub.train_y)  # deterministic in the seed
    assert d.with_train_subset(500) is d
    with pytest.raises(DataError, match="subset=2 is too small"):
        d.with_train_subset(2)


def test_stratified_subset_and_validation_split(tree):
    d = load_dataset(tree, subset=30, val_size=9, seed=1, download=False)
    assert len(d.train_y) == 21 and len(d.val_y) == 9
    assert torch.bincount(d.val_y).tolist() == [3, 3, 3]
    assert torch.bincount(d.train_y).tolist() == [7, 7, 7]
    # deterministic in the seed, and validation images are not in train
    d2 = load_dataset(tree, subset=30, val_size=9, seed=1, download=False)
    assert torch.equal(d.val_x, d2.val_x)
    flat_tr = {bytes(x.flatten().tolist()) for x in d.train_x}
    assert not any(bytes(x.flatten().tolist()) in flat_tr for x in d.val_x)


def test_batch_augmentation_equals_torchvision():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    tops = torch.randint(0, 9, (16,), generator=g)
    lefts = torch.randint(0, 9, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    ours = D.normalize(D.crop_flip(x, tops, lefts, flips))
    norm = T.Normalize(D.CIFAR10_MEAN, D.CIFAR10_STD)
    for i in range(16):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        # RandomCrop(32, padding=4) = pad with 0 then crop at (top, left); then flip; ToTensor; Normalize
        ref = TF.crop(TF.pad(img, 4, fill=0), int(tops[i]), int(lefts[i]), 32, 32)
        if flips[i]:
            ref = TF.hflip(ref)
        ref = norm(TF.to_tensor(ref))
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-6)


def test_augment_draws_all_offsets_and_both_flips():
    """Each pixel says where it came from (channel 0 = row + 1, channel 1 = column + 1, 0 = padding): read
    back every augmented image's crop offset and flip; all 9 x 9 offsets and both flips occur."""
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    x = torch.stack([rows, rows.t(), torch.full((32, 32), 7)]).to(torch.uint8).repeat(2000, 1, 1, 1)
    out = D.augment(x, g)
    assert out.shape == (2000, 3, 32, 32)
    mean, std = torch.tensor(D.CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(D.CIFAR10_STD).view(1, 3, 1, 1)
    px = ((out * std + mean) * 255).round().long()
    assert (px[:, 2] == 7).logical_or(px[:, 2] == 0).all()  # pixels moved, never mixed
    top = px[:, 0, 8, 8] - 5  # output (8, 8) is inside the image for every offset: padded row top + 8
    flipped = px[:, 1, 8, 9] < px[:, 1, 8, 8]
    left = torch.where(flipped, px[:, 1, 8, 8] - 20, px[:, 1, 8, 8] - 5)
    assert set(top.tolist()) == set(range(9)) and set(left.tolist()) == set(range(9))
    assert len(set(zip(top.tolist(), left.tolist()))) == 81 and 0.4 < flipped.float().mean() < 0.6
    # test: only normalisation
    te = D.GpuLoader(x[:5].to(torch.uint8), torch.zeros(5, dtype=torch.long), 2, train=False)
    xb, _ = next(iter(te))
    torch.testing.assert_close(xb, D.normalize(x[:2].to(torch.uint8)))


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("non_image", "is not an image file"),
    ("bad_image", "not a readable image"),
    ("wrong_size", "expected 32x32"),
    ("empty_class", "is empty"),
    ("class_mismatch", "different class folders"),
    ("no_tree", "neither cifar-10-batches-py nor train/"),
    ("not_tar", "not a .tar"),
    ("corrupt_tar", "cannot read archive"),
])
def test_bad_data_gives_one_clear_error(tmp_path, breakage, message):
    root = make_tree(tmp_path / "d", n_train=2, n_test=1)
    path = root
    if breakage == "missing":
        path = tmp_path / "nope"
    elif breakage == "non_image":
        (root / "train" / "cat" / "notes.txt").write_text("hi")
    elif breakage == "bad_image":
        (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    elif breakage == "wrong_size":
        Image.new("RGB", (64, 48)).save(root / "test" / "dog" / "big.png")
    elif breakage == "empty_class":
        (root / "train" / "ship").mkdir(exist_ok=True)
        for f in (root / "train" / "ship").iterdir():
            f.unlink()
    elif breakage == "class_mismatch":
        (root / "test" / "ship").rename(root / "test" / "boat")
    elif breakage == "no_tree":
        path = tmp_path / "empty"
        path.mkdir()
    elif breakage == "not_tar":
        path = tmp_path / "x.zip"
        path.write_bytes(b"zip")
    elif breakage == "corrupt_tar":
        path = tmp_path / "x.tar.gz"
        path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=message) as e:
        load_dataset(path, download=False)
    assert "\n" not in str(e.value)


def test_missing_torchvision_data_without_network_says_how_to_pass_a_copy(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not be downloaded.*--data PATH"):
        load_dataset(tmp_path / "cifar", download=True)


def test_subset_too_small(tree):
    with pytest.raises(DataError, match="at least one image per class"):
        load_dataset(tree, subset=2, download=False)
