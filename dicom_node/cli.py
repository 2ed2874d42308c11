"""``medclass node`` (run the node), ``medclass node status``, ``medclass node resend`` and
``medclass node hash-password`` (a ``password_hash`` for the desk's ``[[users]]``).

``main(argv)`` so that tests pass argument lists; ``medclass.cli`` delegates here.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from medclass.errors import MedClassError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medclass node", description="DICOM triage node: receive studies by C-STORE, "
                                "classify them, send a coded SR back, forward by result. 'medclass node status' "
                                "shows recent studies; 'medclass node resend' queues a given-up report again.")
    p.add_argument("--config", help="node.toml (flags override it)")
    p.add_argument("--ae-title")
    p.add_argument("--port", type=int)
    p.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--checkpoint", help="model for every image series (default: the quickstart model)")
    p.add_argument("--return-to", help="where the SR goes: AET@HOST:PORT")
    p.add_argument("--stable-seconds", type=float, help="a study is complete after this long without instances")
    p.add_argument("--data-dir", help="spool, quarantine, outbox and node.db (default ./medclass-node)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: off)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--inference", help="where the models run: local (default) or triton://HOST[:PORT]/MODEL")
    p.add_argument("--dicom-decoder", choices=["pydicom", "nvimgcodec", "auto"],
                   help="who decodes compressed pixel data: pydicom (default: pylibjpeg, GDCM), nvimgcodec (an "
                   "NVIDIA GPU; pip install -e '.[gpu-decode]') or auto")
    p.add_argument("--scp-processes", type=int,
                   help="processes accepting associations on the port (default 0: one per CPU core, at most 4)")
    p.add_argument("--classify-any-modality", action="store_true", default=None,
                   help="without [[routes]], classify every series, not only the modality and body part the "
                   "model was trained on")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false", default=None,
                   help="pynetdicom's own association loops and pydicom for the file meta (fast_path = false), "
                   "e.g. on a pynetdicom other than the pinned one")
    p.add_argument("--web-port", type=int, help="serve the triage desk on this port (0: off)")
    p.add_argument("--web-bind", help="address the desk listens on (default 127.0.0.1)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def hash_password_main(argv: list[str]) -> int:
    """Read a password (twice at a terminal, once from a pipe) and print its bcrypt hash for [[users]]."""
    import getpass

    from dicom_node.desk.auth import hash_password

    p = argparse.ArgumentParser(prog="medclass node hash-password",
                                description="print the bcrypt hash of a password for password_hash in [[users]] "
                                            "of node.toml; the password is read from the terminal (not echoed) or "
                                            "from standard input, never from the command line")
    p.parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise MedClassError("the two passwords differ", "run it again and type the same password twice")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    print(hash_password(password))
    return 0


def status_main(argv: list[str]) -> int:
    from dicom_node.config import load_config
    from dicom_node.status import format_table, study_rows

    p = argparse.ArgumentParser(prog="medclass node status", description="recent studies of a node")
    p.add_argument("--config")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cfg = load_config(a.config, data_dir=a.data_dir)
    rows = study_rows(cfg.data_dir, a.limit)
    print(json.dumps(rows, indent=2) if a.json else format_table(rows))
    return 0


def resend_main(argv: list[str]) -> int:
    from dicom_node.config import load_config
    from dicom_node.status import resend

    p = argparse.ArgumentParser(prog="medclass node resend",
                                description="queue a study's given-up (dead) reports and forwards again, and classify "
                                            "it again if it failed or was skipped; works while the node runs or not")
    p.add_argument("--config")
    p.add_argument("--data-dir")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("study_uid", nargs="?", help="the Study Instance UID, as 'medclass node status' shows it")
    which.add_argument("--all-dead", action="store_true", help="every dead item of every study")
    a = p.parse_args(argv)
    cfg = load_config(a.config, data_dir=a.data_dir)
    items, studies = resend(cfg.data_dir, None if a.all_dead else a.study_uid)
    if not items and not studies:
        print(f"nothing to resend{'' if a.all_dead else ' for study ' + a.study_uid}: no dead item"
              f"{'' if a.all_dead else ', and the study is not failed or skipped'}")
        return 1
    print(f"queued again: {items} report(s) or forward(s)" + (f", {studies} study to classify" if studies else "")
          + "; a running node sends them within seconds, a stopped one when it starts")
    return 0


def run_main(argv: list[str]) -> int:
    from dicom_node.config import load_config
    from dicom_node.node import DicomNode

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not a.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    cfg = load_config(a.config, ae_title=a.ae_title, port=a.port, bind=a.bind, checkpoint=a.checkpoint,
                      return_to=a.return_to, stable_seconds=a.stable_seconds, data_dir=a.data_dir,
                      metrics_port=a.metrics_port, device=a.device,
                      scp_processes=a.scp_processes, classify_any_modality=a.classify_any_modality,
                      fast_path=a.fast_path, web_port=a.web_port, web_bind=a.web_bind, inference=a.inference,
                      dicom_decoder=a.dicom_decoder)
    if not cfg.checkpoint and not cfg.routes:
        raise MedClassError("no model to classify with", "pass --checkpoint model.pt or run 'medclass quickstart'")
    # Ctrl-C and SIGTERM (systemd, docker stop) only note the request; the main loop sees it and stops the
    # node in order. A KeyboardInterrupt raised wherever the main thread happens to be (starting the
    # ingest processes, inside a lock) could skip or wedge the clean stop.
    requested: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: requested.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        node = DicomNode(cfg).start()
        print(f"medclass node {cfg.ae_title} on port {node.port}, data in {cfg.data_dir}"
              + (f", SR to {cfg.return_to}" if cfg.return_to else ", no --return-to: SRs stay in the outbox")
              + (f", metrics on :{node.metrics_port}/metrics" if node.metrics_port else "")
              + (f", desk on {node.desk.url}" if node.desk else ""), flush=True)
        node.wait(lambda: bool(requested))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "status":
            return status_main(argv[1:])
        if argv and argv[0] == "resend":
            return resend_main(argv[1:])
        if argv and argv[0] == "hash-password":
            return hash_password_main(argv[1:])
        return run_main(argv)
    except MedClassError as e:
        print(f"medclass node: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
