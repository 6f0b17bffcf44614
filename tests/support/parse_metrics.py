"""Parses a /metrics exposition with the official Python client's parsers.

usage: parse_metrics.py openmetrics|text < exposition
Prints JSON: {"families": {name: type}, "samples": [[name, {labels}, value], ...]}.
Exits non-zero (with the parser's message) when the exposition is not valid.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text


def main() -> int:
    mode = sys.argv[1]
    text = sys.stdin.read()
    parser = parse_openmetrics if mode == "openmetrics" else parse_text
    families = {}
    samples = []
    for family in parser(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples.append([sample.name, dict(sample.labels), sample.value])
    json.dump({"families": families, "samples": samples}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
