"""`helm template` and `helm lint` from Python, with Helm's own engine (PyPI helm-python-sdk: Helm
4 as a shared library), for scripts/tests/test_helm_chart.py.

Rendering is what `helm template` does inside Helm: an install with the client-only dry run,
releases kept in memory. Values are validated against values.schema.json and the templates
run exactly as a real install would run them (`fail`, `required`, the chart's kubeVersion), but
nothing is sent anywhere: the client-only dry run never opens a connection. To make that a
guarantee rather than a promise, the configuration names an API server on a closed port of
this machine, so a render that did try to reach a cluster would fail, and a developer's own
kubeconfig is never read.

Hooks (templates annotated helm.sh/hook) are not part of the rendered manifest; the chart has
none.
"""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import yaml

# A kubeconfig whose API server is 127.0.0.1:1 (nothing listens there): see the module doc.
NO_CLUSTER_KUBECONFIG = yaml.safe_dump({
    "apiVersion": "v1", "kind": "Config", "current-context": "none",
    "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
    "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
    "users": [{"name": "none", "user": {}}],
})


class RenderError(Exception):
    """The chart refused the values: the schema, or a template's `fail`/`required`."""


class Renderer:
    """Renders `chart` with given values, as `helm template RELEASE CHART -n NAMESPACE`."""

    def __init__(self, chart: Path, release: str = "clipqc", namespace: str = "clipqc"):
        self.chart = helm.Chart.load(chart)
        self.release = release
        self.config = helm.Config(namespace=namespace, storage_driver="memory",
                                  kubeconfig_content=NO_CLUSTER_KUBECONFIG)

    def render(self, values: dict) -> list[dict]:
        """The manifests the chart renders with `values`, as objects; RenderError if refused."""
        try:
            release = self.config.install(self.chart, self.release, values, dry_run="client")
        except helm.HelmError as e:
            raise RenderError(str(e)) from e
        return [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]

    def close(self):
        self.config.close()
        self.chart.close()


def lint(chart: Path, namespace: str = "clipqc") -> list[dict]:
    """`helm lint`'s warnings and errors for the chart ([{"severity", "path", "error"}]); its
    info messages (such as "icon is recommended") are left out."""
    report = helm.lint(chart, namespace=namespace)
    # Severity: 1 info, 2 warning, 3 error (Helm's support.Severity).
    problems = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    problems += [{"severity": 3, "path": "", "error": e} for e in report.get("errors") or []]
    return problems


def versions() -> str:
    """The binding's and Helm's versions, for the test report's header."""
    return f"helm-python-sdk {helm.__version__} (helm-c {helm.helm_c_version()}, Helm {helm.helm_sdk_version()})"
