"""`helm test`: the route map answers GET /v1/routes with a route map (model, version, servers).

Reads ROUTEMAP_URL and, when the swarm has a token, LLMSWARM_TOKEN. Exits 0 when the map is valid,
1 with the reason otherwise. Standard library only: it runs in the node image as it is.
"""

import json
import os
import sys
import urllib.error
import urllib.request

url = os.environ["ROUTEMAP_URL"].rstrip("/") + "/v1/routes"
request = urllib.request.Request(url, headers={"Accept": "application/json"})
token = os.environ.get("LLMSWARM_TOKEN")
if token:
    request.add_header("Authorization", "Bearer " + token)
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        routes = json.load(response)
except (urllib.error.URLError, OSError, ValueError) as error:
    sys.exit(f"FAIL: {url}: {error}")
if not isinstance(routes, dict) or not isinstance(routes.get("version"), int) or not isinstance(routes.get("servers"), list):
    sys.exit(f"FAIL: {url} did not answer a route map: {str(routes)[:500]}")
states = {}
for server in routes["servers"]:
    states[server.get("state")] = states.get(server.get("state"), 0) + 1
model = (routes.get("model") or {}).get("name", "no model yet")
print(f"OK: {url}: {model}, version {routes['version']}, servers {states or 'none yet'}")
