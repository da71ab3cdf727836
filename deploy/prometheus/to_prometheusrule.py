"""Writes deploy/k8s/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yaml.

The rules live once, in alerts.yaml (promtool-tested); the Prometheus Operator's
PrometheusRule is that file's groups wrapped in a Kubernetes object. Run after editing
alerts.yaml:

    python deploy/prometheus/to_prometheusrule.py

``--check`` exits 1 when the committed file differs from what would be written (the
test suite runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy" / "prometheus" / "alerts.yaml"
TARGET = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by deploy/prometheus/to_prometheusrule.py:
# do not edit; edit alerts.yaml and run the script. For the Prometheus Operator.
"""


def render() -> str:
    rules = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "mailer",
            "namespace": "mailer",
            "labels": {"app.kubernetes.io/name": "mailer", "app.kubernetes.io/part-of": "crm"},
        },
        "spec": {"groups": rules["groups"]},
    }
    body = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
