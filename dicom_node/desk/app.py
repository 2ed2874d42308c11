"""The desk's web application (Starlette + Jinja2, plain JavaScript, no build step).

Pages name studies by their row id in the job database, never by a UID: a URL ends up in
browser histories, proxy logs and referrers, and the Study Instance UID may identify a
patient's visit. The server writes no access log for the same reason
(:class:`dicom_node.desk.server.DeskServer`).

The client address (for the login rate limit and the audit log) is the TCP peer's, or,
when that peer is ``127.0.0.1`` (a reverse proxy on the same host), the last address of
its ``X-Forwarded-For``: a header from any other peer is ignored, since anyone can send
one. Identity headers (``X-Remote-User`` and the like) are ignored too: single sign-on at
a proxy is an extra gate in front of the desk's own login, never a way around it.

Every page and endpoint but ``/login`` and ``/static`` needs a session; a browser without
one is sent to the login page, a script gets 401. Actions are POST forms carrying the
session's CSRF token and are open to the ``admin`` role only (403 otherwise); each one is
written to the audit log in ``node.db``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dicom_node.desk.auth import Authenticator, Session
from dicom_node.jobs import IllegalTransition, JobDatabase, OutboxState, StudyState

HERE = Path(__file__).parent
SESSION_COOKIE = "medclass_desk"
LOGIN_COOKIE = "medclass_desk_login"  # double-submit token of the login form (the login has no session yet)

#: What an action's redirect may show (by code, so that a crafted link cannot put its own words on the page).
MESSAGES = {
    "reclassify": "queued for classification", "reclassify-refused": "not now: the study is arriving or being classified",
    "resend": "queued to send again", "resend-refused": "already queued",
    "discard": "discarded", "discard-refused": "only a dead item can be discarded",
}

#: The worklist's state filter: the study states, and ``dead`` (a report or forward in the dead letter).
STATE_FILTERS = [s.value for s in StudyState] + ["dead"]
#: The worklist's result filter, beside one entry per class (``label:<class>``).
RESULT_FILTERS = ["urgent", "uncertain"]
#: The one peer whose X-Forwarded-For is believed: a reverse proxy on the same host.
TRUSTED_PROXY = "127.0.0.1"


def client_address(request: Request) -> str:
    """The client's address: the TCP peer, or what a proxy on 127.0.0.1 says it forwarded.

    The proxy appends the address it saw to ``X-Forwarded-For``; the last entry is that one
    (entries before it come from the client and prove nothing). Anything that is not an IP
    address is ignored, so the header cannot write text into the audit log.
    """
    peer = request.client.host if request.client else "?"
    if peer != TRUSTED_PROXY:
        return peer
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[-1].strip()
    try:
        return str(ipaddress.ip_address(forwarded))
    except ValueError:
        return peer

_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                 b"form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),  # patient data must not stay in a shared machine's cache
]


class SecurityHeaders:
    """ASGI middleware adding :data:`_SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: Any, https: bool) -> None:
        self.app = app
        self.headers = list(_SECURITY_HEADERS)
        if https:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [h for h in self.headers if h[0] not in have]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _day(text: str | None) -> float | None:
    """``YYYY-MM-DD`` (the node's local time) as a timestamp; ``None`` for empty or malformed."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").timestamp() if text else None
    except ValueError:
        return None


def is_uncertain(r: dict[str, Any]) -> bool:
    """Whether a result's conformal prediction set holds more, or fewer, than one class.

    The same rule as ``[[forward]] when = "uncertain"`` (:mod:`dicom_node.router`); a result
    without a set (coverage = 0, or a model without calibration) is never uncertain.
    """
    pset = r.get("prediction_set")
    return isinstance(pset, list) and len(pset) != 1


def _result_text(r: dict[str, Any]) -> str:
    """One model's result: its class(es) with the (calibrated) probability, or "uncertain" and its set."""
    probs = r.get("probabilities") or {}
    model = r.get("model", "?")
    if is_uncertain(r):
        pset = r["prediction_set"]
        text = f"{model}: uncertain ({' or '.join(pset) if pset else 'no class'})"
    else:
        label = r.get("label")
        labels = label if isinstance(label, list) else [label] if label is not None else []
        parts = [f"{x} ({probs[x]:.2f})" if isinstance(probs.get(x), (int, float)) else str(x) for x in labels]
        # A multi-label result may name no class: none reached its threshold.
        text = f"{model}: {' + '.join(parts) if parts else ('none' if isinstance(label, list) else '?')}"
    return text + ("" if r.get("complete", True) else " PARTIAL")


def _sends_text(items: list[dict[str, Any]]) -> str:
    """One word for a study's SRs: sent, queued, retrying, dead (or a mix), '-' for none."""
    if not items:
        return "-"
    words = []
    for o in items:
        if o["state"] == OutboxState.PENDING.value:
            words.append("retrying" if o["last_error"] else "queued")
        else:
            words.append(o["state"])
    return ", ".join(dict.fromkeys(words))


def worklist_row(s: dict[str, Any]) -> dict[str, Any]:
    """A study as the worklist shows it (JSON-ready; no patient data beyond the study UID)."""
    results = json.loads(s["result"]) if s["result"] else []
    srs = [o for o in s["outbox"] if o["kind"] == "sr"]
    forwards = [o for o in s["outbox"] if o["kind"] == "forward"]
    state = s["state"]
    if state in (StudyState.SKIPPED.value, StudyState.FAILED.value) and s["error"]:
        state_text = f"{state}: {s['error']}"
    elif state == StudyState.RECEIVING.value:
        state_text = "receiving"
    elif state == StudyState.READY.value:
        state_text = "ready (stable, waiting for the model)"
    else:
        state_text = state
    return {
        "id": s["row_id"],
        "study_uid": s["study_uid"],
        "received": _when(s["first_received"]),
        "last_received": _when(s["last_received"]),
        "modality": s["modalities"] or "",
        "instances": s["n_instances"],
        "state": s["state"],
        "state_text": state_text,
        "result": "; ".join(_result_text(r) for r in results),
        "uncertain": any(is_uncertain(r) for r in results),
        "urgent": bool(s["urgent"]),
        "routed": ", ".join(f"{_where(o['destination'])} {_sends_text([o])}" for o in forwards) or "-",
        "report": _sends_text(srs),
        "dead": any(o["state"] == OutboxState.DEAD.value for o in s["outbox"]),
    }


def _where(destination: str) -> str:
    """A destination in few words: an AE title, or a DICOMweb URL's host and path."""
    if "://" in destination:
        return destination.split("://", 1)[1]
    return destination.split("@")[0]


class HeatMaps:
    """Thumbnails of a series' first usable image with the model's heat map, made once and kept on disk.

    The worker records only a model's file name in the result; the node's configuration says
    which checkpoints that can be. Models are loaded on first use, on ``device``.
    """

    def __init__(self, folder: Path, checkpoints: list[str], device: str = "cpu") -> None:
        self.folder, self.device = folder, device
        self.checkpoints = {Path(c).name: c for c in checkpoints if c}
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def png(self, study: dict[str, Any], series_uid: str, result: dict[str, Any], instances: list[dict]) -> Path:
        """The PNG of ``result``'s model on the series' first usable instance (made when missing)."""
        key = hashlib.sha256(f"{study['study_uid']}|{study['revision']}|{series_uid}|{result.get('checkpoint')}"
                             .encode()).hexdigest()[:32]  # a name that reveals no UID
        out = self.folder / f"{key}.png"
        if out.is_file():
            return out
        checkpoint = self.checkpoints.get(result.get("checkpoint", ""))
        if checkpoint is None:
            raise FileNotFoundError(f"the model {result.get('checkpoint')} is no longer in the node's configuration")
        paths = [i["path"] for i in instances if i["series_uid"] == series_uid and not i["skipped"]]
        if not paths:
            raise FileNotFoundError("no usable image left in the series")
        from medclass.explain import explain, save_overlay
        from medclass.inference import Classifier

        with self._lock:  # one model load and one Grad-CAM at a time: the worker needs the CPU more
            clf = self._models.get(checkpoint)
            if clf is None:
                clf = self._models[checkpoint] = Classifier(checkpoint, self.device)
            ex = explain(clf, clf.read(paths[0]), result.get("label"))
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp.png")
            save_overlay(ex, tmp, title=f"{result.get('model', '')}: {ex.class_name}")
            tmp.replace(out)
        return out


def create_app(db: JobDatabase, auth: Authenticator, https: bool = False,
               on_change: Callable[[], None] = lambda: None, poll_ms: int = 2000,
               heatmaps: HeatMaps | None = None) -> Any:
    """The desk as an ASGI application.

    Parameters
    ----------
    db : JobDatabase
        The node's job database (its connections are per thread).
    auth : Authenticator
        Users and sessions.
    https : bool
        Served over TLS: cookies get the ``Secure`` flag and HSTS is sent.
    on_change : callable
        Called after an action changed the queue (the node wakes its worker and sender).
    poll_ms : int
        How often the worklist asks for fresh rows.
    heatmaps : HeatMaps, optional
        Makes the study page's heat maps (none without it).
    """
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["when"] = _when

    def set_cookie(resp: Response, name: str, value: str, max_age: int) -> None:
        resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=https, path="/")

    def session_of(request: Request) -> Session | None:
        return auth.session(request.cookies.get(SESSION_COOKIE))

    def to_login() -> Response:
        return RedirectResponse("/login", status_code=303)

    def page(request: Request, name: str, session: Session | None, status_code: int = 200, **ctx: Any) -> Response:
        return templates.TemplateResponse(request, name, {"session": session, **ctx}, status_code=status_code)

    # ------------------------------------------------------------------ login

    def login_form(request: Request, message: str = "", status_code: int = 200) -> Response:
        token = secrets.token_urlsafe(32)
        resp = page(request, "login.html", None, status_code, login_token=token, message=message)
        set_cookie(resp, LOGIN_COOKIE, token, 600)
        return resp

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return RedirectResponse("/", status_code=303) if session_of(request) else login_form(request)
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        cookie_token = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie_token or not hmac.compare_digest(cookie_token, str(form.get("login_token", ""))):
            return login_form(request, "The login form expired; please log in again.", 400)
        client = client_address(request)
        now = time.time()
        wait = auth.limiter.wait_seconds(name, client, now)
        if wait > 0:
            return login_form(request, f"Too many failed logins; try again in {int(wait // 60) + 1} min.", 429)
        role = auth.verify(name, password)
        if role is None:
            auth.limiter.failed(name, client, now)
            return login_form(request, "Wrong user name or password.", 401)
        auth.limiter.succeeded(name, client)
        resp = RedirectResponse("/", status_code=303)
        set_cookie(resp, SESSION_COOKIE, auth.open_session(name, role), int(auth.idle_seconds))
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    async def logout(request: Request) -> Response:
        s = session_of(request)
        if s is not None:
            form = await request.form()
            if not hmac.compare_digest(s.csrf, str(form.get("csrf", ""))):
                return PlainTextResponse("the form's token does not match your session; reload the page", 403)
        auth.close_session(request.cookies.get(SESSION_COOKIE))
        resp = to_login()
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # ------------------------------------------------------------------ worklist

    def filters(request: Request) -> dict[str, Any]:
        q = request.query_params
        state = q.get("state", "")
        result = q.get("result", "")
        if not (result in RESULT_FILTERS or (result.startswith("label:") and len(result) > 6)):
            result = ""
        return {"state": state if state in STATE_FILTERS else "", "since": q.get("since", ""),
                "until": q.get("until", ""), "result": result}

    def rows(f: dict[str, Any]) -> list[dict[str, Any]]:
        until = _day(f["until"])
        result = f["result"]
        found = db.worklist(states=[f["state"]] if f["state"] and f["state"] != "dead" else [],
                            since=_day(f["since"]), until=until + 86400 if until is not None else None,
                            dead_only=f["state"] == "dead", urgent_only=result == "urgent",
                            uncertain_only=result == "uncertain",
                            label=result[len("label:"):] if result.startswith("label:") else None)
        return [worklist_row(s) for s in found]

    async def worklist(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return to_login()
        f = filters(request)
        return page(request, "worklist.html", s, rows=rows(f), filters=f, states=STATE_FILTERS, poll_ms=poll_ms,
                    classes=db.result_classes(), audit=db.audit_log(limit=20))

    async def studies_json(request: Request) -> Response:
        if session_of(request) is None:
            return JSONResponse({"error": "log in first"}, status_code=401)
        return JSONResponse({"studies": rows(filters(request)), "at": _when(time.time())})

    # ------------------------------------------------------------------ study page

    def study_or_404(request: Request) -> dict[str, Any] | None:
        try:
            return db.study_by_row(int(request.path_params["row"]))
        except ValueError:
            return None

    async def study(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return to_login()
        st = study_or_404(request)
        if st is None:
            return page(request, "missing.html", s, status_code=404)
        uid = st["study_uid"]
        results = json.loads(st["result"]) if st["result"] else []
        model_of = {}
        for r in results:
            for series_uid in r.get("series", []):
                model_of.setdefault(series_uid, []).append(r)
        series = [dict(se, results=model_of.get(se["series_uid"], [])) for se in db.series_of(uid)]
        from dicom_node.sender import DEAD_REMEDY

        sends = []
        for o in db.outbox(uid):
            remedy = ""
            if o["state"] == OutboxState.DEAD.value:
                remedy = DEAD_REMEDY.format(study=uid) + " (or Resend here)"
            elif o["state"] == OutboxState.PENDING.value and o["last_error"]:
                remedy = f"retried automatically; next attempt at {_when(o['next_attempt'])}"
            sends.append(dict(o, remedy=remedy))
        return page(request, "study.html", s, study=st, row=worklist_row(
            dict(st, modalities=",".join(sorted({se["modality"] or "?" for se in series})),
                 urgent=any(o["urgency"] == "urgent" for o in sends), outbox=sends)),
            results=results, series=series, sends=sends, reports=db.reports(uid),
            quarantined=db.quarantined(uid), audit=db.audit_log(uid, limit=50),
            message=MESSAGES.get(request.query_params.get("done", ""), ""),
            can_reclassify=st["state"] in (StudyState.CLASSIFIED.value, StudyState.SKIPPED.value,
                                           StudyState.FAILED.value))

    def heatmap(request: Request) -> Response:  # sync: Starlette runs it in a worker thread
        if session_of(request) is None:
            return PlainTextResponse("log in first", 401)
        st = study_or_404(request)
        if st is None or heatmaps is None:
            return PlainTextResponse("no such study", 404)
        series = db.series_of(st["study_uid"])
        n = request.path_params["n"]
        results = json.loads(st["result"]) if st["result"] else []
        if n >= len(series):
            return PlainTextResponse("no such series", 404)
        uid = series[n]["series_uid"]
        chosen = [r for r in results if uid in r.get("series", [])]
        if not chosen:
            return PlainTextResponse("the series was not classified", 404)
        try:
            path = heatmaps.png(st, uid, chosen[0], db.instances(st["study_uid"], include_skipped=True))
        except Exception as e:  # a missing model or file: the page shows the alt text
            return PlainTextResponse(f"no heat map: {e}", 404)
        return FileResponse(path, media_type="image/png")

    # ------------------------------------------------------------------ actions (admin)

    async def action(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return to_login()
        form = await request.form()
        if not hmac.compare_digest(s.csrf, str(form.get("csrf", ""))):
            return PlainTextResponse("the form's token does not match your session; reload the page", 403)
        if not s.is_admin:
            return PlainTextResponse("only an administrator may do this", 403)
        st = study_or_404(request)
        if st is None:
            return PlainTextResponse("no such study", 404)
        uid, what = st["study_uid"], request.path_params["what"]
        item = None
        if "item" in request.path_params:
            item = db.outbox_item(int(request.path_params["item"]))
            if item is None or item["study_uid"] != uid:
                return PlainTextResponse("no such report or forward in this study", 404)
        if what == "reclassify":
            try:
                done = db.reclassify(uid)
            except IllegalTransition:
                done = False
            detail = f"state was {st['state']}"
        elif what == "resend" and item is not None:
            done = db.resend_item(item["id"])
            detail = f"{item['kind']} → {item['destination']} (was {item['state']})"
        elif what == "discard" and item is not None:
            done = db.discard_item(item["id"])
            detail = f"{item['kind']} → {item['destination']} (was {item['state']})"
        else:
            return PlainTextResponse("no such action", 404)
        if done:
            db.record_audit(s.user, what, uid, f"{detail} (from {client_address(request)})")
            on_change()
        return RedirectResponse(f"/studies/{st['row_id']}?done={what}{'' if done else '-refused'}", status_code=303)

    routes = [
        Route("/", worklist),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/studies", studies_json),
        Route("/studies/{row:int}", study),
        Route("/studies/{row:int}/series/{n:int}/heatmap.png", heatmap),
        Route("/studies/{row:int}/{what:str}", action, methods=["POST"]),
        Route("/studies/{row:int}/outbox/{item:int}/{what:str}", action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return SecurityHeaders(Starlette(routes=routes), https)
