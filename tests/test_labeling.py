"""Image-level labels, the published checkpoint and next-sample choice (medclass.labeling)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from medclass.errors import MedClassError
from medclass.inference import PublishedModel
from medclass.labeling import (
    RESERVED_KEY,
    choose_next,
    encode_label,
    label_payload,
    labelled_set,
    parse_label,
    reserved_ids,
)
from medclass.tasks import Task

BIN = Task("binary", ["no tumour", "tumour"])
MULTI = Task("multilabel", ["effusion", "nodule", "pneumonia"])
ORD = Task("ordinal", ["0", "1", "2", "3", "4"])


@pytest.mark.parametrize("payload,task,expected", [
    ({"label": "tumour"}, BIN, ["tumour"]),
    ('{"label": "no tumour"}', BIN, ["no tumour"]),
    (b'{"labels": ["nodule", "effusion"]}', MULTI, ["nodule", "effusion"]),
    ({"labels": []}, MULTI, []),
    ({"labels": "nodule|pneumonia"}, MULTI, ["nodule", "pneumonia"]),
    ({"label": "3"}, ORD, ["3"]),
])
def test_parse_label_accepts_the_documented_forms(payload, task, expected):
    assert parse_label(payload, task) == expected
    names = parse_label(label_payload(expected, task), task) if expected else []
    assert names == expected


def test_label_may_come_in_params():
    assert parse_label("", BIN, {"label": "tumour"}) == ["tumour"]
    assert parse_label({}, MULTI, {"labels": ["nodule"]}) == ["nodule"]


@pytest.mark.parametrize("payload,task,needle", [
    ({"label": "glioma"}, BIN, "unknown class 'glioma'"),
    ({}, BIN, "no label"),
    ("{not json", BIN, "not json"),
    ([1, 2], BIN, "json object"),
    ({"labels": ["tumour", "no tumour"]}, BIN, "exactly one class"),
    ({"labels": ["nodule", "mass"]}, MULTI, "unknown class 'mass'"),
    ({"label": "5"}, ORD, "unknown class '5'"),
])
def test_parse_label_rejects_bad_labels_with_the_allowed_names(payload, task, needle):
    with pytest.raises(MedClassError) as e:
        parse_label(payload, task)
    assert needle in e.value.message.lower()
    assert task.classes[0] in e.value.remedy


def test_encode_label_and_labelled_set():
    assert encode_label(["tumour"], BIN) == 1
    assert encode_label(["pneumonia", "effusion"], MULTI) == [1, 0, 1]
    ds = labelled_set("x", [("a", "a.png", ["tumour"]), ("b", "b.png", ["no tumour"])], BIN)
    assert [s.label for s in ds.samples] == [1, 0] and ds.task is BIN
    with pytest.raises(MedClassError, match="no labelled image of class no tumour"):
        labelled_set("x", [("a", "a.png", ["tumour"])], BIN)
    with pytest.raises(MedClassError, match="no labelled images"):
        labelled_set("x", [], BIN)


def test_published_model_reloads_after_publication(tmp_path, trained):
    slot = PublishedModel(tmp_path / "served" / "model.pt", device="cpu")
    assert slot.version is None
    with pytest.raises(MedClassError, match="no trained model"):
        slot.classifier()
    v1 = slot.publish(trained / "model.pt")
    first = slot.classifier()
    assert slot.classifier() is first  # cached while unchanged
    time.sleep(0.01)
    # Publish a checkpoint with other weights: the next call serves it.
    import torch

    from medclass.checkpoint import read_card, save_checkpoint

    card = read_card(trained / "model.pt")
    model = first.loaded.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    other = save_checkpoint(tmp_path / "other" / "model.pt", model, card)
    v2 = slot.publish(other)
    assert v2 != v1 and slot.classifier() is not first


def test_reserved_ids_expire():
    now = 1000.0
    infos = {"a": {RESERVED_KEY: {"ts": now - 10}}, "b": {RESERVED_KEY: {"ts": now - 700}}, "c": {}}
    assert reserved_ids(infos, 600, now) == {"a"}


def test_choose_next_ranks_by_stored_scores_and_skips_failures():
    scores = {"a": {"scores": {"entropy": 0.2}}, "b": {"scores": {"entropy": 0.9}}, "c": {"error": "corrupt"},
              "d": {"scores": {"entropy": 0.95}}}
    image, detail = choose_next("entropy", ["a", "b", "c"], scores)
    assert image == "b" and detail["failed"] == 1  # d is not a candidate; c failed, never a score
    with pytest.raises(MedClassError, match="no margin scores"):
        choose_next("margin", ["a", "b"], scores)
    assert choose_next("entropy", [], scores) is None


def test_choose_next_coreset_goes_far_from_the_labelled():
    emb = {"l1": np.array([0.0, 0.0]), "near": np.array([0.1, 0.0]), "far": np.array([5.0, 5.0])}
    image, _ = choose_next("coreset", ["near", "far"], embeddings=emb, labelled=["l1"])
    assert image == "far"
    with pytest.raises(MedClassError, match="no embeddings"):
        choose_next("coreset", ["near"], embeddings={}, labelled=[])


@pytest.mark.parametrize("strategy", ["random", "entropy", "margin", "least-confidence", "bald", "coreset",
                                      "hybrid", "typiclust"])
def test_what_a_strategy_needs_is_what_the_table_says(strategy):
    from medclass.active import NEEDS_EMBEDDINGS, NEEDS_SCORES, STRATEGIES

    # The app scores the pool only for strategies in these tables: each must match what choose_next asks for.
    assert strategy in STRATEGIES and NEEDS_SCORES | NEEDS_EMBEDDINGS <= set(STRATEGIES)
    ids = [f"img{i}" for i in range(12)]
    rng = np.random.default_rng(0)
    scores = {i: {"scores": {m: float(rng.random()) for m in ("entropy", "margin", "least-confidence", "bald")}}
              for i in ids}
    emb = {i: rng.normal(size=4) for i in ids}
    for given_scores, given_emb in ((None, None), (scores, None), (None, emb), (scores, emb)):
        needed = (strategy not in NEEDS_SCORES or given_scores) and (strategy not in NEEDS_EMBEDDINGS or given_emb)
        if needed:
            assert choose_next(strategy, ids[4:], given_scores, given_emb, labelled=ids[:4], seed=1)[0] in ids[4:]
        else:
            with pytest.raises(MedClassError):
                choose_next(strategy, ids[4:], given_scores, given_emb, labelled=ids[:4], seed=1)


def test_choose_next_random_and_unknown_strategy():
    picks = {choose_next("random", ["a", "b", "c"], seed=s)[0] for s in range(30)}
    assert picks == {"a", "b", "c"}
    with pytest.raises(MedClassError, match="unknown strategy"):
        choose_next("uncertainty", ["a"])
    assert json.dumps(label_payload("tumour", BIN)) == '{"label": "tumour"}'
