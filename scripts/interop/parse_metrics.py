#!/usr/bin/env python3
"""Parses a Prometheus text exposition (stdin) with the reference parser of the official
client (PyPI `prometheus-client`) and prints its samples as JSON, one object per sample:
{"family", "type", "name", "labels", "value"}. A malformed exposition raises, so the caller
sees the parser's own error. tests/metrics.rs checks `GET /metrics` through this.

    curl -s localhost:8080/metrics | python scripts/interop/parse_metrics.py
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    out = []
    for family in text_string_to_metric_families(sys.stdin.read()):
        for s in family.samples:
            value = s.value
            if math.isinf(value):
                value = "+Inf" if value > 0 else "-Inf"
            out.append(
                {
                    "family": family.name,
                    "type": family.type,
                    "name": s.name,
                    "labels": s.labels,
                    "value": value,
                }
            )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
