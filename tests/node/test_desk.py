"""The triage desk (dicom_node.desk): its configuration and login rules over HTTP, then a real headless
Chromium (Debian's chromium and chromium-driver, through Selenium) against a real node that receives
from dcmtk and reports to a real Orthanc."""

from __future__ import annotations

import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_node.config import NodeConfig
from dicom_node.desk import DeskServer
from dicom_node.desk.auth import Authenticator, LoginLimiter, hash_password
from dicom_node.jobs import JobDatabase
from medclass.errors import MedClassError
from medclass.sr import read_classification_sr

from .conftest import HOST, copy_study, free_port, needs_dcmtk, needs_orthanc, storescu, wait_until

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

# bcrypt's fewest rounds: the tests check the rules, not the cost factor.
ADMIN = {"name": "admin", "role": "admin", "password": "correct horse"}
VIEWER = {"name": "reader", "role": "viewer", "password": "battery staple"}


def _users(*people: dict) -> list[dict]:
    return [{"name": p["name"], "role": p["role"], "password_hash": hash_password(p["password"], rounds=4)}
            for p in people]


def _instance(sop: str, study: str = "1.2.826.0.1.3680043.8.498.77") -> tuple:
    return (sop, study, study + ".1", "1.2.840.10008.5.1.4.1.1.2", "CT", f"/spool/{sop}.dcm", 10, "SCU")


@pytest.fixture
def desk(tmp_path):
    """A desk on a job database holding one study (no node: the HTTP rules only)."""
    db = JobDatabase(tmp_path / "node.db")
    db.record_instances([_instance("1.2.826.0.1.3680043.8.498.77.1.1")], now=time.time())
    cfg = NodeConfig(checkpoint="unused.pt", data_dir=str(tmp_path), web_port=free_port(), users=_users(ADMIN))
    server = DeskServer(cfg, db).start()
    yield server, db
    server.stop()
    db.close()


def _login(client: httpx.Client, name: str, password: str, headers: dict | None = None) -> httpx.Response:
    form = client.get("/login", headers=headers)
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)[1]
    return client.post("/login", data={"username": name, "password": password, "login_token": token},
                       headers=headers)


# ---------------------------------------------------------------------------------------------- configuration


def test_the_desk_port_may_not_be_the_dicom_or_metrics_port_and_users_are_checked():
    with pytest.raises(MedClassError, match="DICOM port"):
        NodeConfig(checkpoint="m.pt", port=11112, web_port=11112)
    with pytest.raises(MedClassError, match="metrics port"):
        NodeConfig(checkpoint="m.pt", metrics_port=9110, web_port=9110)
    with pytest.raises(MedClassError, match="not one of viewer, admin"):
        NodeConfig(checkpoint="m.pt", users=[{"name": "a", "role": "root", "password_hash": "$2b$" + "x" * 56}])
    with pytest.raises(MedClassError, match="not a bcrypt hash") as e:
        NodeConfig(checkpoint="m.pt", users=[{"name": "a", "role": "admin", "password_hash": "secret"}])
    assert "hash-password" in e.value.remedy
    assert NodeConfig(checkpoint="m.pt").web_bind == "127.0.0.1"  # loopback unless said otherwise


def test_hash_password_reads_stdin_and_prints_a_hash_the_desk_accepts(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "hash-password"], input="s3cret pass\n",
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("$2b$") and "s3cret" not in line
    auth = Authenticator([{"name": "a", "role": "viewer", "password_hash": line}])
    assert auth.verify("a", "s3cret pass") == "viewer"
    assert auth.verify("a", "s3cret pass ") is None and auth.verify("b", "s3cret pass") is None


def test_a_taken_web_port_stops_the_desk_with_one_line(tmp_path):
    import socket

    holder = socket.socket()
    holder.bind((HOST, 0))
    holder.listen(1)
    cfg = NodeConfig(checkpoint="m.pt", web_port=holder.getsockname()[1], users=_users(ADMIN))
    db = JobDatabase(tmp_path / "node.db")
    with pytest.raises(MedClassError, match="cannot listen"):
        DeskServer(cfg, db).start()
    holder.close()
    db.close()


# ---------------------------------------------------------------------------------------------- HTTP rules


def test_nothing_is_visible_without_a_session_and_a_forged_cookie_is_refused(desk):
    server, _ = desk
    with httpx.Client(base_url=server.url.rstrip("/")) as c:
        for path in ("/", "/studies/1"):
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/login"
        assert c.get("/api/studies").status_code == 401
        assert c.post("/studies/1/reclassify", data={"csrf": "x"}).status_code == 303  # to the login, not acted on
        c.cookies.set("medclass_desk", "guess.0123")
        assert c.get("/api/studies").status_code == 401
        c.cookies.clear()
        r = _login(c, ADMIN["name"], ADMIN["password"])
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=28800" in cookie
        assert c.get("/api/studies").json()["studies"][0]["modality"] == "CT"
        token, sig = c.cookies["medclass_desk"].split(".")
        c.cookies.clear()
        c.cookies.set("medclass_desk", token[:-1] + ("A" if token[-1] != "A" else "B") + "." + sig)
        assert c.get("/api/studies").status_code == 401


def test_failed_logins_are_limited_per_user_and_client(desk):
    server, _ = desk
    with httpx.Client(base_url=server.url.rstrip("/")) as c:
        for _ in range(5):
            assert _login(c, ADMIN["name"], "wrong").status_code == 401
        r = _login(c, ADMIN["name"], ADMIN["password"])  # right, but too late
        assert r.status_code == 429 and "Too many failed logins" in r.text
        assert "medclass_desk=" not in r.headers.get("set-cookie", "")
    limiter = LoginLimiter(attempts=2, window_seconds=60)
    for t in (0, 1):
        limiter.failed("admin", "10.0.0.1", t)
    assert limiter.wait_seconds("admin", "10.0.0.1", 2) == 58
    assert limiter.wait_seconds("admin", "10.0.0.2", 2) == 0  # another client
    assert limiter.wait_seconds("other", "10.0.0.1", 2) == 0  # another user
    assert limiter.wait_seconds("admin", "10.0.0.1", 61) == 0  # the window passed


def test_a_session_expires_when_idle_and_csrf_is_checked(desk):
    server, db = desk
    auth = Authenticator(_users(ADMIN), idle_seconds=60, max_seconds=600)
    cookie = auth.open_session("admin", "admin", now=0)
    assert auth.session(cookie, now=59) is not None
    assert auth.session(cookie, now=118) is not None  # each request restarts the idle clock
    assert auth.session(cookie, now=179) is None
    with httpx.Client(base_url=server.url.rstrip("/")) as c:
        _login(c, ADMIN["name"], ADMIN["password"])
        assert c.post("/studies/1/reclassify", data={"csrf": "forged"}).status_code == 403
        assert db.audit_log() == []


def test_the_desk_serves_https_with_the_nodes_tls_certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=medclass",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    cfg = NodeConfig(checkpoint="m.pt", web_port=free_port(), users=_users(ADMIN),
                     tls={"cert": str(cert), "key": str(key)})
    db = JobDatabase(tmp_path / "node.db")
    server = DeskServer(cfg, db).start()
    try:
        assert server.url.startswith("https://")
        with httpx.Client(base_url=server.url.rstrip("/"), verify=ssl.create_default_context(cafile=str(cert))) as c:
            r = _login(c, ADMIN["name"], ADMIN["password"])
            assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
            assert "max-age" in c.get("/").headers["strict-transport-security"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port gets nothing
            httpx.get(server.url.replace("https", "http"), timeout=10)
    finally:
        server.stop()
        db.close()


# ---------------------------------------------------------------------------------------------- real browser


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through chromedriver, on a fresh profile; quit at the end."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (Debian: apt-get install chromium "
                    "chromium-driver; 'make test' installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _log_in(driver, base: str, who: dict) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/login")
    driver.find_element(By.ID, "username").send_keys(who["name"])
    driver.find_element(By.ID, "password").send_keys(who["password"])
    _click_and_wait(driver.find_element(By.ID, "login"))


def _click_and_wait(element) -> None:
    """Click a link or a form's button and wait for the page that answers.

    Without the wait the test may read the URL or the elements of the page it just left (a fresh
    clone's CI run did, on a busy machine).
    """
    element.click()
    wait_until(lambda: _stale(element), 60, 0.05, "the page that answers the click")


def _stale(element) -> bool:
    """Whether ``element`` belongs to a page the browser has left."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    return False


def _rows(driver) -> list[str]:
    # In one script: the page replaces its rows at every poll, so an element found a moment ago may be gone.
    return driver.execute_script("return Array.from(document.querySelectorAll('#worklist-rows tr'))"
                                 ".map(r => r.innerText);")


def _wait_for_heat_map(driver) -> None:
    wait_until(lambda: driver.execute_script("const i = document.querySelector('img.heatmap');"
                                             "return i !== null && i.complete && i.naturalWidth > 100;"), 120, 0.5,
               "the heat map")


def _post_action(driver, path: str) -> int:
    """POST an action from the page's own session (with its CSRF token), as a hand-made form would."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const csrf = document.querySelector('input[name=csrf]').value;"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf}), redirect: 'manual'})"
        ".then(r => done(r.status || 303));", path)


@needs_dcmtk
@needs_orthanc
def test_a_real_browser_logs_in_watches_studies_arrive_and_an_admin_resends(
        browser, node_factory, orthanc_factory, storescp_factory, ct_study, tmp_path, caplog):
    from selenium.webdriver.common.by import By

    caplog.set_level(logging.INFO)
    # Orthanc refuses SRs at first (its Lua filter raising: 0xA700), so the first report goes dead.
    lua = tmp_path / "refuse-sr.lua"
    lua.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                   "  if dicom.Modality == 'SR' then error('this PACS takes no SR') end\n"
                   "  return true\nend\n")
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]}, LuaScripts=[str(lua)])
    urgent = storescp_factory("URGENT")
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}", web_port=free_port(),
                        users=_users(ADMIN, VIEWER),
                        forward=[{"when": "pneumonia >= 0.5", "to": f"URGENT@{HOST}:{urgent.port}",
                                  "priority": "high"}])
    base = node.desk.url.rstrip("/")
    driver = browser

    # No session: every page leads to the login form.
    driver.get(base + "/")
    assert driver.current_url == base + "/login"
    # A wrong password is refused.
    _log_in(driver, base, {"name": ADMIN["name"], "password": "not it"})
    assert "Wrong user name or password" in driver.find_element(By.ID, "login-error").text
    assert driver.current_url == base + "/login"

    _log_in(driver, base, ADMIN)
    assert driver.current_url == base + "/"
    assert _rows(driver) == []
    driver.execute_script("window.notReloaded = true;")  # gone if the page were loaded again

    # A study sent by dcmtk appears by itself; its report, refused by Orthanc, shows as dead.
    study = copy_study(ct_study[:2], tmp_path / "study1")
    uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, study).returncode == 0
    wait_until(lambda: any("CT" in r for r in _rows(driver)), 60, 0.3, "the study on the worklist")
    wait_until(lambda: any("dead" in r and "classified" in r for r in _rows(driver)), 60, 0.3,
               "the refused report shown dead")
    assert driver.execute_script("return window.notReloaded === true;")

    # Open it: the model, its probabilities, the refusal and its remedy.
    # (The worklist replaces its rows at every poll, so the link's going stale is no sign of the study page.)
    driver.find_element(By.CSS_SELECTOR, "#worklist-rows a").click()
    wait_until(lambda: re.fullmatch(re.escape(base) + r"/studies/\d+", driver.current_url), 60, 0.05,
               "the study page")
    assert uid not in driver.current_url
    page = driver.find_element(By.TAG_NAME, "main").text
    assert uid in page and "0xA700" in page and "fix the cause" in page
    result = node.db.study(uid)
    model = __import__("json").loads(result["result"])[0]
    assert model["model"] in driver.find_element(By.ID, "series").text
    assert all(cls in driver.find_element(By.ID, "series").text for cls in model["probabilities"])
    # The heat map of the series' image (Grad-CAM over the spooled file), loaded as a picture.
    _wait_for_heat_map(driver)
    links = driver.execute_script("return Array.from(document.querySelectorAll('[href],[action],[src]'))"
                                  ".map(e => e.getAttribute('href') || e.getAttribute('action') || e.getAttribute('src'));")
    assert links and not [link for link in links if uid in link or any(
        se["series_uid"] in link for se in node.db.series_of(uid))]
    study_url = driver.current_url

    # The administrator fixes the PACS and resends: Orthanc receives the report.
    pacs.stop()
    pacs.settings.pop("LuaScripts")
    pacs.start()
    _click_and_wait(driver.find_element(By.CSS_SELECTOR, "#sends button.resend"))
    assert "queued to send again" in driver.find_element(By.ID, "message").text
    first = wait_until(lambda: pacs.datasets("SR"), 60, 0.5, "the SR in Orthanc after the resend")[0]
    assert first.StudyInstanceUID == uid
    assert "resend" in driver.find_element(By.ID, "audit").text and ADMIN["name"] in driver.find_element(
        By.ID, "audit").text

    # Reclassify: Orthanc gets a new report, which supersedes the first.
    _click_and_wait(driver.find_element(By.ID, "reclassify"))
    second = wait_until(lambda: [s for s in pacs.datasets("SR") if s.SOPInstanceUID != first.SOPInstanceUID], 60,
                        0.5, "the superseding SR")[0]
    assert read_classification_sr(second)["predecessors"] == [first.SOPInstanceUID]
    wait_until(lambda: [o["state"] for o in node.db.outbox(uid) if o["kind"] == "sr"] == ["sent", "sent"], 30,
               what="both SRs sent")

    # A second study, accepted first time, for the worklist's picture.
    study2 = copy_study(ct_study[2:], tmp_path / "study2")
    assert storescu(node.port, study2).returncode == 0
    driver.get(base + "/")
    wait_until(lambda: len(_rows(driver)) == 2 and all("sent" in r for r in _rows(driver)), 60, 0.3,
               "two studies with their reports sent")
    shots = Path(os.environ.get("MEDCLASS_DESK_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shots / "desk-worklist.png"))
    driver.get(study_url)
    _wait_for_heat_map(driver)  # made again for the new revision
    driver.save_screenshot(str(shots / "desk-study.png"))
    assert (shots / "desk-study.png").stat().st_size > 0

    # The audit log survives in node.db.
    actions = [a["action"] for a in node.db.audit_log(uid)]
    assert actions == ["reclassify", "resend"]

    # A viewer sees everything and can do nothing.
    driver.delete_all_cookies()
    _log_in(driver, base, VIEWER)
    driver.get(study_url)
    assert driver.find_elements(By.CSS_SELECTOR, "button.resend") == []
    assert driver.find_elements(By.ID, "reclassify") == []
    row = study_url.rsplit("/", 1)[1]
    item = node.db.outbox(uid)[0]["id"]
    assert _post_action(driver, f"/studies/{row}/outbox/{item}/resend") == 403
    assert _post_action(driver, f"/studies/{row}/reclassify") == 403
    assert [a["action"] for a in node.db.audit_log(uid)] == actions

    # No URL the browser saw, and no log line, holds the Study Instance UID.
    assert not any(uid in r.getMessage() and "desk" in r.name for r in caplog.records)
    assert not [r for r in caplog.records if r.name.startswith("uvicorn.access")]


def test_the_worklist_puts_urgent_routed_studies_on_top_and_filters_by_state_and_date(tmp_path):
    db = JobDatabase(tmp_path / "node.db")
    day = time.mktime(time.strptime("2026-05-10 12:00", "%Y-%m-%d %H:%M"))
    db.record_instances([_instance("1.9.1.1", "1.9.1")], now=day)  # oldest, routed urgently
    db.record_instances([_instance("1.9.2.1", "1.9.2")], now=day + 3600)  # routine
    db.record_instances([_instance("1.9.3.1", "1.9.3")], now=day + 86400)  # next day, still receiving
    db.mark_stable(cutoff=day + 3600, now=day + 3600)
    assert {db.claim_ready(), db.claim_ready()} == {"1.9.1", "1.9.2"}
    for uid, urgency in (("1.9.1", "urgent"), ("1.9.2", "routine")):
        db.finish_classified(uid, 1, [{"model": "m", "label": "a", "probabilities": {"a": 0.9, "b": 0.1}}],
                             "d" + uid, outbox=[dict(key=f"fw:{uid}", kind="forward", destination="URG@h:1",
                                                     path=None, priority=urgency)])
    cfg = NodeConfig(checkpoint="m.pt", web_port=free_port(), users=_users(ADMIN))
    server = DeskServer(cfg, db).start()
    try:
        with httpx.Client(base_url=server.url.rstrip("/")) as c:
            _login(c, ADMIN["name"], ADMIN["password"])

            def uids(**params) -> list[str]:
                return [s["study_uid"] for s in c.get("/api/studies", params=params).json()["studies"]]

            assert uids() == ["1.9.1", "1.9.3", "1.9.2"]  # urgent first, then newest first
            assert c.get("/api/studies").json()["studies"][0]["result"] == "m: a (0.90)"
            assert uids(state="receiving") == ["1.9.3"]
            assert uids(since="2026-05-11") == ["1.9.3"] and uids(until="2026-05-10") == ["1.9.1", "1.9.2"]
            assert uids(state="dead") == []
            db.mark_dead(db.outbox("1.9.2")[0]["id"], 1, "refused", day)
            assert uids(state="dead") == ["1.9.2"]
            assert "1.9.2" not in str(c.get("/").url) and "/studies/" in c.get("/").text

            # An administrator discards the dead forward: kept as history, never sent, and audited.
            row = db.worklist(dead_only=True)[0]["row_id"]
            item = db.outbox("1.9.2")[0]["id"]
            csrf = re.search(r'name="csrf" value="([^"]+)"', c.get(f"/studies/{row}").text)[1]
            # through a reverse proxy on this host: the audit names the client it forwarded for
            r = c.post(f"/studies/{row}/outbox/{item}/discard", data={"csrf": csrf},
                       headers={"X-Forwarded-For": "10.0.0.66"})
            assert r.headers["location"] == f"/studies/{row}?done=discard"
            assert db.audit_log()[0]["detail"].endswith("(from 10.0.0.66)")
            assert db.outbox_item(item)["state"] == "discarded" and db.due(now=1e12)[0]["study_uid"] == "1.9.1"
            r = c.post(f"/studies/{row}/outbox/{item}/discard", data={"csrf": csrf})  # no longer dead
            assert r.headers["location"].endswith("done=discard-refused")
            assert "only a dead item can be discarded" in c.get(r.headers["location"]).text
            assert [(a["user"], a["action"], a["study_uid"]) for a in db.audit_log()] == [("admin", "discard", "1.9.2")]
    finally:
        server.stop()
        db.close()



def test_the_worklist_filters_by_result_and_shows_multi_label_and_uncertain_results(tmp_path):
    db = JobDatabase(tmp_path / "node.db")
    now = time.time() - 60
    results = {  # what the worker stores (dicom_node.worker): label, calibrated probabilities, conformal set
        "1.8.1": [{"model": "m", "label": "pneumonia", "probabilities": {"normal": 0.1, "pneumonia": 0.9},
                   "prediction_set": ["pneumonia"]}],
        "1.8.2": [{"model": "m", "label": "normal", "probabilities": {"normal": 0.55, "pneumonia": 0.45},
                   "prediction_set": ["normal", "pneumonia"]}],  # the model cannot decide
        "1.8.3": [{"model": "ml", "label": ["effusion", "nodule"],  # multi-label: two classes at once
                   "probabilities": {"effusion": 0.81, "nodule": 0.66, "normal": 0.05}}],
        "1.8.4": [{"model": "ml", "label": [], "probabilities": {"effusion": 0.1, "nodule": 0.2, "normal": 0.3}}],
    }
    for k, uid in enumerate(results):
        db.record_instances([_instance(uid + ".1", uid)], now=now + k)
    db.mark_stable(cutoff=now + 10, now=now + 10)
    for uid, res in results.items():
        res[0]["series"] = [uid + ".1"]  # the series the model read (_instance's)
        assert db.claim_ready() == uid
        db.finish_classified(uid, 1, res, "d" + uid, outbox=[dict(key=f"fw:{uid}", kind="forward",
                                                                    destination="https://review.example.org/dicom-web",
                                                                    path=None, priority="urgent")]
                             if uid == "1.8.2" else [])
    cfg = NodeConfig(checkpoint="m.pt", web_port=free_port(), users=_users(VIEWER))
    server = DeskServer(cfg, db).start()
    try:
        with httpx.Client(base_url=server.url.rstrip("/")) as c:
            _login(c, VIEWER["name"], VIEWER["password"])

            def studies(**params) -> dict[str, dict]:
                return {s["study_uid"]: s for s in c.get("/api/studies", params=params).json()["studies"]}

            every = studies()
            assert list(every) == ["1.8.2", "1.8.4", "1.8.3", "1.8.1"]  # urgent first, then newest first
            assert every["1.8.1"]["result"] == "m: pneumonia (0.90)" and not every["1.8.1"]["uncertain"]
            assert every["1.8.2"]["result"] == "m: uncertain (normal or pneumonia)" and every["1.8.2"]["uncertain"]
            assert every["1.8.3"]["result"] == "ml: effusion (0.81) + nodule (0.66)"
            assert every["1.8.4"]["result"] == "ml: none"
            assert every["1.8.2"]["routed"] == "review.example.org/dicom-web queued"  # a DICOMweb destination

            assert list(studies(result="urgent")) == ["1.8.2"]
            assert list(studies(result="uncertain")) == ["1.8.2"]
            assert list(studies(result="label:pneumonia")) == ["1.8.1"]
            assert list(studies(result="label:nodule")) == ["1.8.3"]  # one class of a multi-label result
            assert list(studies(result="label:normal")) == ["1.8.2"]
            assert studies(result="label:absent") == {}
            assert len(studies(result="bogus")) == 4  # an unknown filter is no filter
            assert list(studies(result="uncertain", state="classified")) == ["1.8.2"]  # beside the state filter

            page = c.get("/", params={"result": "label:nodule"}).text  # the server-rendered page filters too
            assert re.findall(r'<option value="label:([^"]+)"', page) == ["effusion", "nodule", "normal", "pneumonia"]
            assert '<option value="label:nodule" selected>' in page
            assert "effusion (0.81) + nodule (0.66)" in page and "pneumonia (0.90)" not in page
            row = db.worklist(uncertain_only=True)[0]["row_id"]
            assert "uncertain: conformal set {normal, pneumonia}" in c.get(f"/studies/{row}").text
            row = db.worklist(label="effusion")[0]["row_id"]
            page = c.get(f"/studies/{row}").text  # the study page of a multi-label result
            assert '<dd id="result" class="">ml: effusion (0.81) + nodule (0.66)</dd>' in page
            assert page.count('class="prob chosen"') == 2  # both classes marked
    finally:
        server.stop()
        db.close()


def test_x_forwarded_for_is_believed_from_a_proxy_on_127_0_0_1_only(desk):
    server, _ = desk
    base = server.url.rstrip("/")
    with httpx.Client(base_url=base) as proxy:  # the TCP peer is 127.0.0.1: a reverse proxy on this host
        for _ in range(5):
            assert _login(proxy, ADMIN["name"], "wrong", {"X-Forwarded-For": "10.0.0.7"}).status_code == 401
        assert _login(proxy, ADMIN["name"], ADMIN["password"], {"X-Forwarded-For": "10.0.0.7"}).status_code == 429
        # another client behind the same proxy is not locked out; a spoofed first entry does not count
        assert _login(proxy, ADMIN["name"], ADMIN["password"],
                      {"X-Forwarded-For": "10.0.0.7, 10.0.0.8"}).status_code == 303
    other = httpx.HTTPTransport(local_address="127.0.0.2")  # any other peer: its header is ignored
    with httpx.Client(base_url=base, transport=other) as direct:
        for k in range(5):
            r = _login(direct, ADMIN["name"], "wrong", {"X-Forwarded-For": f"10.0.1.{k}"})  # a new "client" each time
            assert r.status_code == 401
        assert _login(direct, ADMIN["name"], ADMIN["password"], {"X-Forwarded-For": "10.0.2.1"}).status_code == 429


def test_medclass_node_web_port_serves_the_desk_in_the_node_process_and_stops_with_it(node_process, checkpoint,
                                                                                      tmp_path):
    import signal
    import socket

    web = free_port()
    users = _users(ADMIN)[0]
    toml = tmp_path / "node.toml"
    toml.write_text(f'[[users]]\nname = "{users["name"]}"\nrole = "admin"\npassword_hash = "{users["password_hash"]}"\n')
    node = node_process(["--config", str(toml), "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "data"),
                         "--device", "cpu", "--scp-processes", "1", "--web-port", str(web)], free_port()).start()
    assert f"desk on http://127.0.0.1:{web}/" in node.log_path.read_text()
    with httpx.Client(base_url=f"http://127.0.0.1:{web}") as c:
        assert c.get("/").headers["location"] == "/login"
        assert _login(c, ADMIN["name"], ADMIN["password"]).status_code == 303
        assert c.get("/api/studies").json()["studies"] == []
    os.kill(node.proc.pid, signal.SIGTERM)
    assert node.proc.wait(30) == 0
    assert "Traceback" not in node.log_path.read_text()
    with socket.socket() as s:  # nothing listens on the desk's port any more (TIME_WAIT connections may remain)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, web))
