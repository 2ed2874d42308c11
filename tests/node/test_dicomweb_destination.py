"""DICOMweb destinations: the SR and forwards go out by STOW-RS (dicomweb-client) to a real
Orthanc with its DICOMweb plugin, with basic authentication, under C-STORE's retry,
dead-letter and exactly-once rules (dicom_node.destination, dicom_node.sender)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pydicom
import pytest
from peers import DICOMWEB_PLUGIN

from dicom_node.config import load_config
from dicom_node.destination import DicomWebTarget
from medclass.sr import read_classification_sr

from .conftest import HOST, copy_study, needs_dcmtk, needs_orthanc, storescu, study_state, wait_until

needs_dicomweb = pytest.mark.skipif(not Path(DICOMWEB_PLUGIN).is_file(),
                                    reason="Orthanc's DICOMweb plugin (Debian: orthanc-dicomweb) is not installed")
pytestmark = [needs_dcmtk, needs_orthanc, needs_dicomweb]

USER, PASSWORD = "medclass", "stow-secret"


def _pacs_web(pacs, password_env: str = "PACS_WEB_PASSWORD") -> dict:
    return {"name": "pacs-web", "url": pacs.dicomweb_url, "username": USER, "password_env": password_env,
            "timeout_seconds": 20}


def _outbox(node) -> list:
    return node.db.query("SELECT * FROM outbox ORDER BY id")


def test_sr_returns_and_study_forwards_through_stow_with_basic_auth(node_factory, orthanc_factory, ct_study,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("PACS_WEB_PASSWORD", PASSWORD)
    pacs = orthanc_factory({}, dicomweb=True, users={USER: PASSWORD})  # every HTTP request needs the password
    review = orthanc_factory({}, dicomweb=True)  # no authentication: a bare URL, no [[dicomweb]] table
    node = node_factory(return_to="pacs-web", dicomweb=[_pacs_web(pacs)],
                        forward=[{"when": "pneumonia >= 0.0", "to": review.dicomweb_url + "/", "priority": "high"}])
    assert node.config.return_to == pacs.dicomweb_url  # the name is resolved to its URL at start
    assert node.config.forward[0]["to"] == review.dicomweb_url  # trailing / dropped
    study = copy_study(ct_study, tmp_path / "study")  # JPEG-LS, RLE and uncompressed instances
    study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, study).returncode == 0

    wait_until(lambda: study_state(node, study_uid) == "classified", 60, what="the study to be classified")
    wait_until(lambda: [r["state"] for r in _outbox(node)] == ["sent", "sent"], 60, 0.2, "both items sent")
    rows = {r["kind"]: r for r in _outbox(node)}
    assert rows["sr"]["destination"] == pacs.dicomweb_url and rows["sr"]["attempts"] == 1  # at the first try
    assert rows["forward"]["destination"] == review.dicomweb_url and rows["forward"]["urgency"] == "urgent"

    srs = pacs.datasets("SR")
    assert len(srs) == 1 and len(pacs.get("/instances")) == 1
    assert srs[0].StudyInstanceUID == study_uid
    assert read_classification_sr(srs[0])["algorithm"][0] == "resnet18"
    forwarded = review.datasets()
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study}
    assert {str(d.SOPInstanceUID) for d in forwarded} == sent  # every instance, once
    assert len(review.get("/instances")) == len(study)


def test_wrong_password_goes_to_the_dead_letter_with_a_remedy(node_factory, orthanc_factory, ct_study, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("PACS_WEB_PASSWORD", "not-the-password")
    pacs = orthanc_factory({}, dicomweb=True, users={USER: PASSWORD})
    node = node_factory(return_to="pacs-web", dicomweb=[_pacs_web(pacs)])
    study = copy_study(ct_study[:1], tmp_path / "study")
    assert storescu(node.port, study).returncode == 0

    row = wait_until(lambda: next((r for r in _outbox(node) if r["state"] == "dead"), None), 60, 0.2,
                     "the SR in the dead letter")
    assert row["attempts"] == 1  # 401 is not retried: the same password gets the same answer
    assert "HTTP 401" in row["last_error"]
    assert "check username 'medclass' and the password in $PACS_WEB_PASSWORD" in row["last_error"]
    assert "not-the-password" not in row["last_error"]  # the secret never reaches the database or the desk
    time.sleep(1.5)  # longer than the first retry delay: no other attempt
    assert node.db.query("SELECT attempts, state FROM outbox")[0]["attempts"] == 1
    assert pacs.get("/instances") == []


def test_an_instance_the_server_does_not_store_goes_to_the_dead_letter(node_factory, orthanc_factory, ct_study,
                                                                       tmp_path):
    # A real refusal: Orthanc's Lua filter rejects CT, and its DICOMweb plugin then answers the STOW
    # with the instance in neither the Referenced nor the Failed SOP Sequence. The SR (not CT) is stored.
    lua = tmp_path / "refuse-ct.lua"
    lua.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                   "  if dicom.Modality == 'CT' then error('this archive takes no CT') end\n"
                   "  return true\nend\n")
    pacs = orthanc_factory({}, dicomweb=True, LuaScripts=[str(lua)])
    node = node_factory(return_to=pacs.dicomweb_url, forward=[{"when": "normal >= 0.0", "to": pacs.dicomweb_url}])
    study = copy_study(ct_study[:1], tmp_path / "study")
    assert storescu(node.port, study).returncode == 0

    wait_until(lambda: sorted(r["state"] for r in _outbox(node)) == ["dead", "sent"], 60, 0.2,
               "the forward dead and the SR sent")
    forward = next(r for r in _outbox(node) if r["kind"] == "forward")
    assert forward["state"] == "dead" and forward["attempts"] == 1  # not retried: the same answer would come
    assert "did not list instance" in forward["last_error"] and "its log says why" in forward["last_error"]
    assert len(pacs.datasets("SR")) == 1 and len(pacs.get("/instances")) == 1


def test_orthanc_down_then_up_is_retried_and_stored_once(node_factory, orthanc_factory, ct_study, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("PACS_WEB_PASSWORD", PASSWORD)
    pacs = orthanc_factory({}, start=False, dicomweb=True, users={USER: PASSWORD})
    node = node_factory(return_to="pacs-web", dicomweb=[_pacs_web(pacs)])
    study = copy_study(ct_study[:2], tmp_path / "study")
    assert storescu(node.port, study).returncode == 0
    wait_until(lambda: (_outbox(node) or [{"attempts": 0}])[0]["attempts"] >= 2, 60, what="two failed attempts")
    row = _outbox(node)[0]
    assert row["state"] == "pending" and "did not answer" in row["last_error"]

    pacs.start()
    wait_until(lambda: _outbox(node)[0]["state"] == "sent", 60, 0.2, "the SR sent after Orthanc came back")
    time.sleep(2.5)  # longer than the largest retry delay: nothing more is sent
    assert len(pacs.datasets("SR")) == 1 and len(pacs.get("/instances")) == 1

    # A crash between Orthanc's answer and 'sent' in the database means the same STOW again:
    # the same SOP Instance UID, stored once.
    first_sent = _outbox(node)[0]["sent"]
    assert node.db.resend_item(row["id"])
    wait_until(lambda: _outbox(node)[0]["state"] == "sent" and _outbox(node)[0]["sent"] > first_sent, 30, 0.2,
               "the SR sent a second time")
    assert len(pacs.get("/instances")) == 1


def test_a_bearer_token_config_parses_and_reaches_the_request(tmp_path, monkeypatch, orthanc_factory, ct_study):
    """Orthanc cannot check a bearer token; what can be checked: the table parses, the token is taken
    from the environment into the Authorization header, and Orthanc with basic authentication refuses
    it with 401, which the node treats as permanent with the bearer remedy."""
    from dicom_node.destination import SendError, stow

    monkeypatch.setenv("PACS_TOKEN", "tok-123")
    pacs = orthanc_factory({}, dicomweb=True, users={USER: PASSWORD})
    toml = tmp_path / "node.toml"
    toml.write_text(f'checkpoint = "model.pt"\nreturn_to = "pacs-web"\n[[dicomweb]]\nname = "pacs-web"\n'
                    f'url = "{pacs.dicomweb_url}"\ntoken_env = "PACS_TOKEN"\nca = "ca.pem"\ntimeout_seconds = 5\n')
    (tmp_path / "ca.pem").write_text("")  # a path relative to the file; only an https:// URL reads it
    cfg = load_config(toml)
    assert cfg.return_destination == DicomWebTarget(pacs.dicomweb_url)
    ep = cfg.dicomweb_endpoint(cfg.return_to)
    assert (ep.auth, ep.token_env, ep.ca, ep.timeout_seconds) == ("bearer", "PACS_TOKEN", str(tmp_path / "ca.pem"), 5)
    session = ep.session()
    assert session.headers["Authorization"] == "Bearer tok-123" and session.auth is None
    assert session.verify == str(tmp_path / "ca.pem")
    assert "tok-123" not in repr(cfg)  # the token is not part of the configuration
    with pytest.raises(SendError) as e:
        stow(ep, [str(shutil.copy(ct_study[0], tmp_path / "ct.dcm"))])
    assert not e.value.transient and "HTTP 401" in str(e.value) and "check the token in $PACS_TOKEN" in str(e.value)


def test_node_toml_names_a_dicomweb_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("PW", "x")
    toml = tmp_path / "node.toml"
    toml.write_text(f'checkpoint = "model.pt"\nreturn_to = "https://{HOST}:8443/dicom-web/studies"\n'
                    '[[dicomweb]]\nname = "review"\nurl = "https://review.example.org/dicom-web"\n'
                    'username = "u"\npassword_env = "PW"\n'
                    '[[forward]]\nwhen = "uncertain"\nto = "review"\n')
    cfg = load_config(toml)
    assert cfg.return_to == f"https://{HOST}:8443/dicom-web"  # '/studies' belongs to STOW, not to the root
    assert cfg.forward[0]["to"] == "https://review.example.org/dicom-web"
    assert cfg.dicomweb_endpoint(cfg.return_to).auth == "none"  # a bare URL: no table, no credentials
    assert cfg.dicomweb_endpoint(cfg.forward[0]["to"]).name == "review"
