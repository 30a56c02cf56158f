"""What a BloomRun's pods need from the cluster's network, on real nodes: cluster DNS for
the names under a headless Service (the rendezvous store's, each worker's) and the
`kubernetes` Service's address for the API (the operator's client, the trainer's progress
reports). Both come from tests/cluster/real_network.py (CoreDNS, nft DNAT): no kube-proxy."""

import json
import textwrap

import pytest
from kubernetes import client

pytestmark = [pytest.mark.cluster, pytest.mark.pods]

# Resolves a name the way a worker does (not fully qualified: through the pod's search
# path), fetches from the peer it names, and calls the API with the pod's own token.
CLIENT = textwrap.dedent("""
    import json, socket, ssl, sys, time, urllib.request
    peer = sys.argv[1]
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    found = {"peer_ip": socket.gethostbyname(peer.split(":")[0]),
             "api_ip": socket.gethostbyname("kubernetes.default.svc")}
    for attempt in range(60):  # the server pod's Python may still be starting
        try:
            found["peer_says"] = urllib.request.urlopen(f"http://{peer}/", timeout=10).read().decode()
            break
        except OSError:
            time.sleep(1)
    request = urllib.request.Request("https://kubernetes.default.svc/api",
        headers={"Authorization": "Bearer " + open(sa + "/token").read()})
    context = ssl.create_default_context(cafile=sa + "/ca.crt")
    found["api_kind"] = json.load(urllib.request.urlopen(request, context=context, timeout=10))["kind"]
    print(json.dumps(found))
""")
SERVER = textwrap.dedent("""
    import http.server
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"hello from the peer")
    http.server.HTTPServer(("", 8000), Hello).serve_forever()
""")


def restricted_container(name: str, image: str, script: str, *args: str) -> dict:
    return {"name": name, "image": image, "imagePullPolicy": "Never",
            "command": ["python", "-c", script, *args],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True, "runAsUser": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}}}


def test_pods_resolve_headless_names_and_reach_the_api_service(cluster, real_nodes, images):
    image = images.ref("operator")  # small, with Python: enough for a client and a server
    namespace = cluster.new_namespace("net", pod_security="restricted")
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "peers"},
        "spec": {"clusterIP": "None", "selector": {"app": "peer"}, "publishNotReadyAddresses": True,
                 "ports": [{"name": "http", "port": 8000}]}})
    placement = {"nodeSelector": real_nodes.selector, "tolerations": real_nodes.tolerations}
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "server", "labels": {"app": "peer"}},
        "spec": {"hostname": "server", "subdomain": "peers", "nodeName": real_nodes.names[0],
                 **placement, "containers": [restricted_container("server", image, SERVER)]}})
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "client"},
        "spec": {"restartPolicy": "Never", "nodeName": real_nodes.names[1], **placement,
                 "containers": [restricted_container(
                     "client", image, CLIENT, f"server.peers.{namespace}.svc:8000")]}})
    pod = cluster.wait_for_pod(namespace, "client", lambda p: p.status.phase in ("Succeeded", "Failed"),
                               120, "the client to finish")
    logs = cluster.kubectl("logs", "-n", namespace, "client").stdout
    assert pod.status.phase == "Succeeded", logs
    found = json.loads(logs.strip().splitlines()[-1])
    server_ip = core.read_namespaced_pod("server", namespace).status.pod_ip
    api_ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
    assert found == {"peer_ip": server_ip, "api_ip": api_ip, "peer_says": "hello from the peer",
                     "api_kind": "APIVersions"}
