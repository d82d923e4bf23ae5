#!/usr/bin/env python3
"""Lint and render a Helm chart with Helm's own Go SDK, then validate what it renders.

    render-chart.py CHART OUT_DIR [--values JSON] [--api-version GROUP/VERSION/KIND ...]

- lint: as `helm lint --strict` (warnings are errors; info findings are printed);
- render: as `helm template` (the chart's values.schema.json applies), with `--values` merged
  over the chart's defaults and `--api-version` added to the cluster's capabilities (so templates
  guarded by `.Capabilities.APIVersions.Has` render);
- validate: every rendered manifest against the Kubernetes OpenAPI schemas, strictly (an unknown
  field is an error). Kinds from CRDs (monitoring.coreos.com) have no schema there and are only
  parsed.

Writes each rendered template to OUT_DIR under its template path and exits 1 on any problem.
Runs in the environment scripts/deploy-tools installs; tests/deploy.rs calls it.
"""

import argparse
import json
import os
import sys

import helm_python
import kubernetes_validate
import yaml
from helm_python import _native

KUBERNETES = "1.30.0"
NO_SCHEMA_GROUPS = ("monitoring.coreos.com/",)


def render(chart, values, api_versions):
    # Chart.render() does not expose the capabilities; helm_render's options do (pinned version).
    options = {
        "name": "samgate",
        "namespace": "security",
        "is_install": True,
        "kube_version": "v" + KUBERNETES,
        "api_versions": api_versions,
        "strict": True,
    }
    raw = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
    return json.loads(raw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chart")
    parser.add_argument("out_dir")
    parser.add_argument("--values", default="{}", help="JSON merged over the chart's values")
    parser.add_argument("--api-version", action="append", default=[], dest="api_versions")
    args = parser.parse_args()

    problems = []
    report = helm_python.lint(args.chart, json.loads(args.values), strict=True, kube_version="v" + KUBERNETES)
    for message in report["messages"]:
        line = f"lint {message['path']}: {message['error']}"
        if message["severity"] >= 2:
            problems.append(line)
        else:
            print(line)
    problems += [f"lint: {error}" for error in report["errors"]]

    chart = helm_python.Chart.load(args.chart)
    try:
        manifests = render(chart, json.loads(args.values), args.api_versions)
    except helm_python.HelmError as error:
        sys.exit(f"render-chart: {error}")

    for path, text in sorted(manifests.items()):
        target = os.path.join(args.out_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as out:
            out.write(text)
        if not path.endswith((".yaml", ".yml")):
            continue
        for document in yaml.safe_load_all(text):
            if not document:
                continue
            kind = f"{document.get('apiVersion')}/{document.get('kind')}"
            if kind.startswith(NO_SCHEMA_GROUPS):
                print(f"parsed {path}: {kind} (a CRD kind: no schema to validate against)")
                continue
            try:
                kubernetes_validate.validate(document, KUBERNETES, strict=True)
                print(f"valid {path}: {kind}")
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{path}: {kind}: {error.message} at {'.'.join(map(str, error.path))}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{path}: {kind}: no such kind in Kubernetes {KUBERNETES}")

    for problem in problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
