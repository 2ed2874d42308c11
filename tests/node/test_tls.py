"""TLS: the node's [tls] config, a pynetdicom SCU trusting its self-signed certificate, plain
associations refused, and the node's own sends (SR, forwards) over TLS to Orthanc and dcmtk
storescp with DICOM TLS (certificates made with Debian's openssl in tmp_path)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from medclass.sr import read_classification_sr

from .conftest import HOST, free_port, needs_dcmtk, needs_orthanc, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def self_signed(folder, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key (P-256: fast to make)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def _associate(port: int, tls_context: ssl.SSLContext | None):
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate(HOST, port, ae_title="MEDCLASS", tls_args=(tls_context, HOST) if tls_context else None)


def _ct() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def test_tls_echo_and_store_succeed_and_plain_associations_fail(node_factory, tmp_path):
    cert, key = self_signed(tmp_path, "node")
    node = node_factory(tls={"cert": cert, "key": key}, stable_seconds=600)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cert)

    assoc = _associate(node.port, client)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        ct = _ct()
        assert assoc.send_c_store(ct).Status == 0
    finally:
        assoc.release()
    row = node.db.query("SELECT sop_uid, path FROM instances")[0]
    assert row["sop_uid"] == ct.SOPInstanceUID
    assert pydicom.dcmread(row["path"]).SOPInstanceUID == ct.SOPInstanceUID

    plain = _associate(node.port, None)
    assert not plain.is_established

    # A client that does not trust the node's certificate is refused too.
    assert not _associate(node.port, ssl.create_default_context(ssl.Purpose.SERVER_AUTH)).is_established

    # The node keeps serving TLS clients after the failed attempts.
    assoc = wait_until(lambda: (a := _associate(node.port, client)).is_established and a, 10,
                       what="a TLS association after the refused ones")
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1


def test_tls_with_ca_requires_a_client_certificate(node_factory, tmp_path):
    cert, key = self_signed(tmp_path, "node")
    client_cert, client_key = self_signed(tmp_path, "pacs")
    node = node_factory(tls={"cert": cert, "key": key, "ca": client_cert}, stable_seconds=600)

    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cert)
    assert not _associate(node.port, anonymous).is_established
    known = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cert)
    known.load_cert_chain(client_cert, client_key)
    assoc = _associate(node.port, known)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@needs_dcmtk
@needs_orthanc
def test_the_sr_and_forwards_go_out_over_tls_to_real_tls_peers(node_factory, orthanc_factory, storescp_factory,
                                                               tmp_path):
    """Orthanc (DICOM TLS) pushes a CT to the node over TLS and gets the SR back over TLS; the study is
    forwarded over TLS to a dcmtk storescp that accepts TLS only; a destination left out of ``send``
    gets plain DICOM; a peer whose certificate the node does not trust gets nothing."""
    node_crt, node_key = self_signed(tmp_path, "node")
    pacs_crt, pacs_key = self_signed(tmp_path, "pacs")
    urgent_crt, urgent_key = self_signed(tmp_path, "urgent")
    rogue_crt, rogue_key = self_signed(tmp_path, "rogue")
    peers = tmp_path / "peers.crt"  # what the node trusts when it sends: the PACS and URGENT, not ROGUE
    peers.write_text(Path(pacs_crt).read_text() + Path(urgent_crt).read_text())

    node_port = free_port()
    pacs = orthanc_factory({"medclass": {"AET": "MEDCLASS", "Host": HOST, "Port": node_port, "UseDicomTls": True}},
                           tls={"cert": pacs_crt, "key": pacs_key, "trusted": node_crt})
    urgent = storescp_factory("URGENT", tls={"cert": urgent_crt, "key": urgent_key, "trusted": [node_crt]})
    rogue = storescp_factory("ROGUE", tls={"cert": rogue_crt, "key": rogue_key, "trusted": [node_crt]})
    archive = storescp_factory("ARCHIVE")  # plain DICOM
    node = node_factory(
        port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}",
        tls={"cert": node_crt, "key": node_key, "ca": pacs_crt, "peer_ca": str(peers),
             "send": ["ORTHANC", "URGENT", "ROGUE"]},
        forward=[{"when": "pneumonia >= 0.0", "to": f"URGENT@{HOST}:{urgent.port}", "priority": "high"},
                 {"when": "pneumonia >= 0.0", "to": f"ROGUE@{HOST}:{rogue.port}"},
                 {"when": "normal >= 0.0", "to": f"ARCHIVE@{HOST}:{archive.port}"}])

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study_id = pacs.upload(get_testdata_file("CT_small.dcm"))["ParentStudy"]
    pacs.post("/modalities/medclass/store", {"Resources": [study_id], "Synchronous": True})
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1  # received from Orthanc over TLS

    srs = wait_until(lambda: pacs.datasets("SR"), 120, 0.5, "the SR in Orthanc over TLS")
    assert len(srs) == 1
    assert read_classification_sr(srs[0])["study_uid"] == str(ct.StudyInstanceUID)

    def forwards() -> dict[str, dict]:
        return {r["destination"].split("@")[0]: dict(r)
                for r in node.db.query("SELECT destination, state, attempts, last_error FROM outbox "
                                       "WHERE kind='forward'")}

    wait_until(lambda: (f := forwards()) and f["URGENT"]["state"] == f["ARCHIVE"]["state"] == "sent"
               and f["ROGUE"]["attempts"] >= 1, 120, 0.2, "the forwards")
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in urgent.received()] == [str(ct.SOPInstanceUID)]
    assert [str(pydicom.dcmread(p).SOPInstanceUID) for p in archive.received()] == [str(ct.SOPInstanceUID)]
    rogue_row = forwards()["ROGUE"]
    assert rogue_row["state"] == "pending" and "over TLS" in rogue_row["last_error"]
    assert rogue.received() == []

    # The premise: the PACS and URGENT speak TLS only (a plain association is refused).
    for aet, port in (("ORTHANC", pacs.dicom_port), ("URGENT", urgent.port)):
        ae = AE(ae_title="PLAINSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        assert not ae.associate(HOST, port, ae_title=aet).is_established


def test_tls_paths_in_node_toml_are_relative_to_the_file(tmp_path):
    from dicom_node.config import load_config
    from dicom_node.tls import sends_tls

    toml = tmp_path / "node.toml"
    toml.write_text('[tls]\ncert = "pki/node.crt"\nkey = "pki/node.key"\npeer_ca = "pki/peers.crt"\n'
                    'send = ["ORTHANC"]\ncheck_hostname = false\n')
    tls = load_config(toml, checkpoint="model.pt").tls
    assert tls == {"cert": str(tmp_path / "pki/node.crt"), "key": str(tmp_path / "pki/node.key"),
                   "peer_ca": str(tmp_path / "pki/peers.crt"), "send": ["ORTHANC"], "check_hostname": False}
    assert sends_tls(tls, "ORTHANC") and not sends_tls(tls, "URGENT")
    assert sends_tls({**tls, "send": True}, "URGENT") and not sends_tls(None, "ORTHANC")
