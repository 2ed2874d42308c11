"""The cross-modal text branch on the 3,955 real IU chest X-ray reports
(normal vs abnormal from their MeSH tags), three seeds. Results: ``bench/results/text.json``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from medclass.reports import load_iu_reports, train_text_classifier  # noqa: E402

if __name__ == "__main__":
    reports = load_iu_reports()
    runs = [train_text_classifier(reports, seed=s) for s in (0, 1, 2)]
    for r in runs:
        print(r)
    write_result("text", {"n_reports": len(reports), "runs": runs})
