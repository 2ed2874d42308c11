"""Remote inference on a real Triton Inference Server (tritonserver from the nvidia-pytriton wheel).

The checkpoint trained on real Br35H images (conftest ``trained``) is exported with
``medclass export --format triton --backend python`` and served on loopback; the tests
drive the server only through ``tritonclient``, as a production Triton would be driven.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc")
from peers import TritonServer, free_port, tritonserver_dist  # noqa: E402

from medclass.cli import main  # noqa: E402
from medclass.errors import InferenceUnavailable, MedClassError  # noqa: E402

pytestmark = pytest.mark.skipif(tritonserver_dist() is None, reason="tritonserver (nvidia-pytriton) not installed")

MODEL = "br35h"


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["export", "--checkpoint", str(trained / "model.pt"), "--format", "triton", "--backend", "python",
                 "--model-name", MODEL, "--max-batch-size", "16", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    with TritonServer(tmp_path_factory.mktemp("tritonserver"), repo) as s:
        yield s


@pytest.fixture(scope="module")
def images(br35h_dir) -> list[Path]:
    return sorted((br35h_dir / "yes").glob("*.jpg"))[:12] + sorted((br35h_dir / "no").glob("*.jpg"))[:12]


def test_parse_url():
    from medclass.remote import is_remote, parse_url

    u = parse_url("triton://10.0.0.5:8101/chest/3")
    assert (u.host, u.port, u.model, u.version) == ("10.0.0.5", 8101, "chest", "3")
    assert parse_url("triton://gpu-box/chest").port == 8001
    assert (parse_url("triton://[::1]:9000/m").host, parse_url("triton://[::1]/m").port) == ("::1", 8001)
    assert is_remote("triton://h/m") and not is_remote("local") and not is_remote(None)
    for bad in ("triton://", "triton://host", "triton://host:port/m", "triton://h/m/v1", "http://h/m"):
        with pytest.raises(MedClassError):
            parse_url(bad)


def test_export_round_trip(repo, trained):
    """config.pbtxt parses as Triton's ModelConfig, with the card, shapes, batcher and priorities."""
    from medclass.checkpoint import read_card
    from medclass.export import parse_triton_config

    folder = repo / MODEL
    assert (folder / "1" / "model.onnx").is_file() and (folder / "1" / "model.py").is_file()
    cfg = parse_triton_config((folder / "config.pbtxt").read_text())
    card = read_card(trained / "model.pt")
    assert cfg.name == MODEL and cfg.backend == "python" and cfg.max_batch_size == 16
    assert json.loads(cfg.parameters["medclass_card"].string_value) == card
    assert json.loads((folder / "1" / "model.onnx.json").read_text()) == card  # the card beside the model too
    assert [i.name for i in cfg.input] == ["image"] and list(cfg.input[0].dims) == [1, 32, 32]
    assert list(cfg.output[0].dims) == [len(card["task"]["classes"])]
    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8, 16]
    assert db.priority_levels == 2 and db.default_priority_level == 2
    assert db.default_queue_policy.allow_timeout_override


def test_outputs_equal_local(server, trained, images):
    """Probabilities through Triton equal the local forward pass within 1e-4 on real images,
    with the checkpoint (card checked) and without it (card from the server)."""
    from medclass.inference import Classifier

    local = Classifier(trained / "model.pt", "cpu")
    x = torch.stack([local.preprocess(local.read(p)) for p in images])
    expected = local.forward(x)
    with_ckpt = Classifier(trained / "model.pt", inference=server.url(MODEL))
    assert with_ckpt.remote is not None and with_ckpt.inference == server.url(MODEL)
    got = with_ckpt.forward(x, batch_size=5)  # several requests, batched again by the server
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
    card_only = Classifier(inference=server.url(MODEL))
    assert card_only.classes == local.classes
    assert np.abs(card_only.forward(x, priority="urgent") - expected).max() < 1e-4
    study = card_only.classify_study(images, priority="urgent")
    assert abs(study.probabilities["tumour"] - float(local.classify_study(images).probabilities["tumour"])) < 1e-4


def test_card_mismatch_is_a_clear_error(server, trained):
    from medclass.checkpoint import load_checkpoint
    from medclass.errors import InferenceUnavailable as Unavailable
    from medclass.inference import Classifier

    loaded = load_checkpoint(trained / "model.pt", "cpu")
    other = copy.deepcopy(loaded.card)
    other["task"]["classes"] = ["normal", "abnormal"]
    other["preprocess"]["image_size"] = 64
    loaded.card = other
    clf = Classifier(loaded, inference=server.url(MODEL))
    with pytest.raises(MedClassError) as e:
        clf.forward(torch.zeros(2, 1, 32, 32))
    assert not isinstance(e.value, Unavailable)  # a refusal to fix, not a server to wait for
    msg = str(e.value)
    assert "not this checkpoint" in msg and "classes" in msg and "'abnormal'" in msg and "image_size" in msg
    assert "medclass export --format triton" in msg


def test_server_down(trained, images, capsys):
    """Nothing listens: InferenceUnavailable, and the CLI says so on one line with a non-zero exit."""
    from medclass.inference import Classifier

    url = f"triton://127.0.0.1:{free_port()}/{MODEL}"
    with pytest.raises(InferenceUnavailable) as e:
        Classifier(inference=url)  # no checkpoint: the card is fetched at once
    assert e.value.url == url and "retried" in str(e.value)
    clf = Classifier(trained / "model.pt", inference=url)  # with one: connects on the first forward
    with pytest.raises(InferenceUnavailable):
        clf.forward(torch.zeros(1, 1, 32, 32))
    capsys.readouterr()
    for args in (["--inference", url], ["--checkpoint", str(trained / "model.pt"), "--inference", url]):
        assert main(["predict", *args, str(images[0])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("medclass: error: inference server") and "\n" not in err, err


def test_cli_predict_and_evaluate_through_triton(server, trained, images, capsys, tmp_path):
    paths = [str(p) for p in images[:6]]
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), "--device", "cpu", *paths]) == 0
    local = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", "--inference", server.url(MODEL), "--priority", "urgent", *paths]) == 0
    remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in remote] == paths
    for a, b in zip(local, remote):
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 1e-4
    assert main(["evaluate", "--inference", server.url(MODEL), "--out", str(tmp_path / "ev"),
                 "--bootstrap", "20"]) == 0
    remote_m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert main(["evaluate", "--checkpoint", str(trained / "model.pt"), "--device", "cpu",
                 "--out", str(tmp_path / "ev_local"), "--bootstrap", "20"]) == 0
    local_m = json.loads((tmp_path / "ev_local" / "metrics.json").read_text())
    assert remote_m["inference"] == server.url(MODEL)
    assert abs(remote_m["auc"] - local_m["auc"]) < 1e-4 and remote_m["n"] == local_m["n"]


def test_urgent_served_before_routine_under_load(server):
    """Flood the queue with routine requests, then send one urgent and one last routine request:
    the urgent one completes among the first, the routine one sent with it among the last.

    (Concurrent gRPC calls may reach the server slightly out of order, so the routine requests
    do not complete in exactly the order they were sent.)"""
    import tritonclient.grpc as grpcclient

    from medclass.remote import PRIORITIES

    client = grpcclient.InferenceServerClient(server.grpc_address)
    x = np.random.default_rng(0).random((16, 1, 32, 32), dtype=np.float32)
    done: list[str] = []
    lock = threading.Lock()
    finished = threading.Event()
    n_routine = 60

    def send(tag: str, priority: str) -> None:
        inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        def callback(result, error, tag=tag):
            with lock:
                done.append(tag if error is None else f"{tag}!{error}")
                if len(done) == n_routine + 2:
                    finished.set()

        client.async_infer(MODEL, [inp], callback, priority=PRIORITIES[priority])

    for i in range(n_routine):
        send(f"r{i}", "routine")
    send("urgent", "urgent")
    send("last", "routine")
    assert finished.wait(300)
    client.close()
    assert not [d for d in done if "!" in d], done
    position, last = done.index("urgent"), done.index("last")
    print(f"urgent completed {position + 1}th, the routine request sent with it {last + 1}th of {len(done)}")
    # Requests already executing or batched when it arrived finish first; the rest of the queue waits.
    assert position < n_routine // 4, f"urgent finished {position + 1}th of {len(done)}: {done}"
    assert last > n_routine // 2, done
