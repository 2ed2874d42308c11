"""Self-supervised pretraining on real Br35H images: short runs (1 epoch, 32 px, a small
encoder), the encoder's card, resuming, and unusable files skipped with a count."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medclass.checkpoint import load_checkpoint, read_card
from medclass.cli import main
from medclass.errors import MedClassError
from medclass.pretrain import MIN_IMAGES, PretrainConfig, pretrain, simclr_augment

SMALL = {"model": "cbam-resnet18", "model_args": {"width": 8}, "image_size": 32, "batch_size": 32,
         "progress": False, "device": "cpu"}


def _unlabelled_folder(root: Path, br35h_dir: Path, n: int) -> Path:
    """``n`` real Br35H images in nested folders, no class structure."""
    yes = sorted((br35h_dir / "yes").glob("*.jpg"))[: n // 2]
    no = sorted((br35h_dir / "no").glob("*.jpg"))[: n - len(yes)]
    (root / "scan" / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for p in yes:
        shutil.copy(p, root / "scan" / "a" / f"y_{p.name}")
    for p in no:
        shutil.copy(p, root / "b" / f"n_{p.name}")
    return root


def test_pretrain_writes_an_encoder_card_skips_bad_files_and_resumes(tmp_path, br35h_dir):
    from pydicom.data import get_testdata_file

    data = _unlabelled_folder(tmp_path / "unlabelled", br35h_dir, 60)
    (data / "notes.txt").write_text("not an image")
    good = next((data / "b").glob("*.jpg"))
    (data / "b" / "corrupt.jpg").write_bytes(good.read_bytes()[:400])  # a truncated JPEG
    shutil.copy(get_testdata_file("rtplan.dcm"), data / "scan" / "plan.dcm")  # DICOM without pixels
    out = tmp_path / "enc"
    cfg = PretrainConfig(data=str(data), out=str(out), epochs=1, **SMALL)
    res = pretrain(cfg)
    assert res.images == 60 and res.epochs == 1
    card = read_card(res.encoder)
    assert card["kind"] == "encoder" and card["task"] is None
    assert card["pretraining"] == {"method": "simclr", "data_fingerprint": card["data"]["fingerprint"],
                                   "images": 60, "epochs": 1}
    assert card["data"]["skipped"] == {"not-an-image": 1, "unreadable": 1, "no-pixels": 1}
    assert card["training"]["method"] == "simclr" and card["model"]["name"] == "cbam-resnet18"
    with pytest.raises(MedClassError, match="encoder"):
        load_checkpoint(res.encoder, "cpu")  # predict's loader: an encoder cannot classify
    first = torch.load(out / "pretrain_state.pt", weights_only=False)

    # Running again with more epochs continues from the saved state, not from scratch.
    res2 = pretrain(PretrainConfig(data=str(data), out=str(out), epochs=2, **SMALL))
    assert res2.epochs == 2 and len(res2.history) == 2
    assert res2.history[0] == first["history"][0]
    assert read_card(res2.encoder)["pretraining"]["epochs"] == 2
    # A re-run of a finished run trains nothing more.
    assert pretrain(PretrainConfig(data=str(data), out=str(out), epochs=2, **SMALL)).epochs == 2

    # Other settings than the saved state's: one line, not a silent restart.
    with pytest.raises(MedClassError, match="image_size"):
        pretrain(PretrainConfig(data=str(data), out=str(out), epochs=3, **{**SMALL, "image_size": 48}))


def test_too_few_images_is_a_clear_message(tmp_path, br35h_dir, capsys):
    data = _unlabelled_folder(tmp_path / "few", br35h_dir, 12)
    with pytest.raises(MedClassError, match=f"only 12 readable image.*at least {MIN_IMAGES}"):
        pretrain(PretrainConfig(data=str(data), out=str(tmp_path / "o"), **SMALL))
    assert main(["pretrain", "--data", str(data), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 50" in err[0]


def test_a_folder_without_images_is_one_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    assert main(["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable image" in err[0]


def test_views_differ_and_keep_the_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32)  # behaviour of the augmentation, not data, is under test
    v1, v2 = simclr_augment(x, g), simclr_augment(x, g)
    assert v1.shape == x.shape and torch.isfinite(v1).all()
    assert not torch.allclose(v1, v2)
