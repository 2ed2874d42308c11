"""TLS: the node's [tls] config, a pynetdicom SCU trusting its self-signed certificate, and
plain associations refused (certificates made with Debian's openssl in tmp_path)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from .conftest import HOST, wait_until

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
