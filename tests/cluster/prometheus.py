"""A real Prometheus (Debian's build) for metrics and alerting tests."""

import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.cluster.processes import Child, free_port, wait_until

# Short intervals so tests see samples and alert evaluations within seconds.
DEFAULT_GLOBAL = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}


def prometheus_config(scrape_config, rule_files: list[str]) -> dict:
    """A whole Prometheus config from a whole config (dict with scrape_configs) or a list of
    scrape configs, with fast global intervals unless given, and `rule_files` added."""
    whole = dict(scrape_config) if isinstance(scrape_config, dict) else {
        "scrape_configs": list(scrape_config)}
    if "scrape_configs" not in whole:
        raise ValueError("a Prometheus config needs scrape_configs (or pass a list of them)")
    whole["global"] = {**DEFAULT_GLOBAL, **whole.get("global", {})}
    whole["rule_files"] = [*whole.get("rule_files", []), *rule_files]
    return whole


class Prometheus:
    def __init__(self, bin_dir: Path, folder: Path, scrape_config, rule_files: list):
        self.folder = folder
        rules = []
        for index, source in enumerate(rule_files):  # copied so the run is self-contained
            target = folder / f"rules-{index}-{Path(source).name}"
            shutil.copyfile(source, target)
            rules.append(str(target))
        self.config_path = folder / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(prometheus_config(scrape_config, rules)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._child = Child("prometheus", [
            str(bin_dir / "prometheus"), f"--config.file={self.config_path}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ], folder / "prometheus.log")

    def start(self) -> "Prometheus":
        self._child.start()
        self._child.wait_http_ok(f"{self.url}/-/ready", 30, "prometheus /-/ready")
        return self

    def _get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant query's result vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self._get("/api/v1/query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        """Active alerts (pending or firing), each with labels, state and value."""
        return self._get("/api/v1/alerts")["alerts"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def wait_for(self, expr: str, timeout: float = 30) -> list[dict]:
        """Polls `expr` until it returns a non-empty result, and returns it."""
        return wait_until(lambda: self.query(expr), timeout, f"prometheus: {expr}", 0.5)

    def stop(self) -> None:
        self._child.stop()
