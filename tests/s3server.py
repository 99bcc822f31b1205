"""A real S3 server for tests: SeaweedFS `weed mini` on 127.0.0.1, checking signatures.

Started and stopped by PID (never by name), data in a temporary directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from granite_ray.localray import free_port

ACCESS_KEY = "granite-test"
SECRET_KEY = "granite-test-secret"


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else (shutil.which("weed") or "weed")


class SeaweedS3:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="granite-weed-"))
        self.s3_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin", "webdav")}
        self.args = [
            weed_binary(), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}", f"-s3.config={config}", "-admin.ui=false",
            *[f"-{name}.port={port}" for name, port in ports.items()],
        ]
        (self.dir / "data").mkdir()
        self.log = open(self.dir / "weed.log", "wb")
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "SeaweedS3":
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        client = self.client()
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                client.list_buckets()
                return self
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("weed mini did not answer S3 requests in time")

    def outage(self, seconds: float) -> float:
        """Stop the server (its data kept), wait, start it again on the same ports; returns how long no
        S3 request could be answered."""
        down = time.time()
        self.proc.terminate()
        self.proc.wait(timeout=20)
        time.sleep(max(0.0, seconds - (time.time() - down)))
        self._launch(60.0)
        return time.time() - down

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "log"):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
