"""helm uninstall's pre-delete hook: delete the chart's Swarms and wait until they are gone.

Helm deletes the operator with the rest of the release, and a Swarm carries the operator's finalizer: deleted
after the operator, it would stay Terminating for ever with its servers running. This runs first, while the
operator still runs: it deletes each Swarm named in $SWARMS (in $NAMESPACE) and waits (at most $TIMEOUT seconds)
until the operator has removed its finalizer and the Swarm is gone. Standard library only; in-cluster credentials.
"""

import os
import ssl
import sys
import time
import urllib.error
import urllib.request

ACCOUNT = os.environ.get("SERVICEACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
NAMESPACE = os.environ["NAMESPACE"]
SWARMS = [name for name in os.environ.get("SWARMS", "").split(",") if name]
TIMEOUT = float(os.environ.get("TIMEOUT", "300"))


def api() -> tuple[str, dict[str, str], ssl.SSLContext | None]:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    headers = {"Accept": "application/json", "User-Agent": "llmswarm-uninstall"}
    token = os.path.join(ACCOUNT, "token")
    if os.path.exists(token):
        with open(token) as f:
            headers["Authorization"] = "Bearer " + f.read().strip()
    ca = os.path.join(ACCOUNT, "ca.crt")
    if os.path.exists(ca):
        return f"https://{host}:{port}", headers, ssl.create_default_context(cafile=ca)
    return f"http://{host}:{port}", headers, None  # no CA: an API server without TLS (a test's)


def call(method: str, name: str) -> int:
    base, headers, context = api()
    url = f"{base}/apis/llmswarm.dev/v1alpha1/namespaces/{NAMESPACE}/swarms/{name}"
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return 404
        raise SystemExit(f"{method} swarm {name}: {error.code} {error.read().decode(errors='replace')[:500]}") from None


def main() -> int:
    for name in SWARMS:
        gone = call("DELETE", name) == 404
        print(f"swarm {name}: {'already gone' if gone else 'deleted, waiting for the operator'}", flush=True)
    deadline = time.monotonic() + TIMEOUT
    left = list(SWARMS)
    while left:
        left = [name for name in left if call("GET", name) != 404]
        if not left:
            break
        if time.monotonic() > deadline:
            print(f"still there after {TIMEOUT:g} s: {', '.join(left)}. Is the operator running? Without it, release a "
                  f"Swarm by hand: kubectl -n {NAMESPACE} patch swarm NAME --type=merge "
                  """-p '{"metadata": {"finalizers": null}}'""", file=sys.stderr)
            return 1
        time.sleep(1)
    print("every Swarm of the release is gone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
