"""What `helm template` produces, read as sentences (kuberay's chart tests are the model)."""

from __future__ import annotations

import json

import pytest

from tests.chart.helm import CHART, DASHBOARD_SOURCE, RELEASE, REPO, helm, of_kind, only, render, render_error

MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


def rbac_rules(objects: list[dict]) -> list[dict]:
    return [rule for obj in objects if obj["kind"] in ("Role", "ClusterRole") for rule in obj["rules"]]


def test_chart_passes_helm_lint_strict():
    out = helm("lint", "--strict", str(CHART), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[INFO]" not in out.stdout, out.stdout  # e.g. "icon is recommended"


def test_should_not_create_monitors_rules_or_dashboard_by_default():
    kinds = {obj["kind"] for obj in render()}
    assert not kinds & set(MONITORING_KINDS)
    assert "ConfigMap" not in kinds


def test_should_create_each_integration_when_enabled():
    objects = render({
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    })
    for kind in MONITORING_KINDS:
        assert len(of_kind(objects, kind)) == 1, kind
    assert only(objects, "ServiceMonitor")["metadata"]["labels"]["release"] == "prom"


def test_should_install_the_generated_crds_unchanged():
    generated = sorted((REPO / "crds").glob("*.yaml"))
    assert generated, "crds/ is empty: run `make crds`"
    copies = CHART / "charts" / "crds" / "crds"
    assert {p.name for p in copies.iterdir()} == {p.name for p in generated}, "run `make chart-crds`"
    for source in generated:
        copy = copies / source.name
        assert copy.exists() and copy.read_text() == source.read_text(), (
            f"{copy.relative_to(REPO)} differs from {source.relative_to(REPO)}: run `make chart-crds`"
        )
    crd_names = {obj["metadata"]["name"] for obj in of_kind(render(), "CustomResourceDefinition")}
    assert {"bloomruns.bloomrun.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= crd_names


def test_should_run_the_operator_under_the_restricted_security_profile():
    pod = only(render(), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_should_probe_kopf_health_endpoint_on_the_port_it_serves():
    container = only(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"]["port"] == "health"
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in container["args"]
    assert f"--metrics-port={ports['metrics']}" in container["args"]
    assert ports["metrics"] == 8080


def test_should_expose_operator_metrics_through_a_service_selecting_the_operator_pod():
    objects = render()
    service = only(objects, "Service")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_should_run_standalone_with_one_replica_and_peer_with_more():
    single = render()
    args = only(single, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and not of_kind(single, "ClusterKopfPeering")

    several = render({"replicaCount": 3})
    deployment = only(several, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=br-bloomrun-operator" in args and "--standalone" not in args
    assert only(several, "ClusterKopfPeering")["metadata"]["name"] == "br-bloomrun-operator"
    kopf_rule = [r for r in rbac_rules(several) if r["apiGroups"] == ["kopf.dev"]]
    assert kopf_rule and kopf_rule[0]["resources"] == ["clusterkopfpeerings"]


def test_should_bind_a_cluster_role_when_no_namespaces_are_listed():
    objects = render()
    args = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [arg for arg in args if arg.startswith("--namespace")]  # every namespace
    binding = only(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "br-bloomrun-operator",
                                    "namespace": "bloomrun-system"}]
    assert not of_kind(objects, "Role")


def test_should_grant_a_role_per_watched_namespace_and_only_reads_cluster_wide():
    objects = render({"watchNamespaces": ["team-a", "team-b"], "replicaCount": 2})
    cluster_rules = only(objects, "ClusterRole")["rules"]
    assert {verb for rule in cluster_rules for verb in rule["verbs"]} == {"get", "list"}
    # kopf's CRD and namespace scanning is off for exact namespaces: nodes are all it reads.
    assert {res for rule in cluster_rules for res in rule["resources"]} == {"nodes"}
    assert only(objects, "ClusterRoleBinding")["roleRef"]["name"] == only(objects, "ClusterRole")["metadata"]["name"]
    assert sorted(role["metadata"]["namespace"] for role in of_kind(objects, "Role")) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")) == ["team-a", "team-b"]
    args = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert len(of_kind(objects, "KopfPeering")) == 2


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["a"]}, {"replicaCount": 2}])
def test_should_never_grant_secrets_or_wildcards(values):
    for rule in rbac_rules(render(values)):
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_should_ship_the_dashboard_unchanged_labelled_for_grafana_sidecar():
    config_map = only(render({"dashboard": {"enabled": True, "namespace": "monitoring"}}), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert json.loads(config_map["data"]["bloomrun.json"]) == json.loads(DASHBOARD_SOURCE.read_text())


def test_should_scrape_trainer_pods_keeping_their_run_labels():
    monitor = only(render({"podMonitor": {"enabled": True}, "watchNamespaces": ["team-a"]}), "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["honorLabels"] is True and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert only(render({"podMonitor": {"enabled": True}}), "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


@pytest.mark.parametrize(("values", "field"), [
    ({"replicaCount": 0}, "replicaCount"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
    ({"prometheusRule": {"alerts": {"stalledFor": "15 minutes"}}}, "stalledFor"),
    ({"serviceMonitr": {"enabled": True}}, "serviceMonitr"),
])
def test_should_refuse_bad_values_naming_the_field(values, field):
    assert field in render_error(values)


def test_pod_monitor_selects_the_worker_pods_the_operator_builds():
    from bloomrun.operator.desired import Run, desired_worker
    from bloomrun.operator.spec import BloomRunSpec

    spec = BloomRunSpec.model_validate({
        "data": {"sources": [{"path": "/data/tiny"}]},
        "training": {"trainSteps": 10, "globalBatchSize": 16, "microBatchSize": 2},  # 1 node x 8 GPUs
    })
    worker = desired_worker(Run(name="r", namespace="team", uid="u-1", generation=1, spec=spec), 0)
    monitor = only(render({"podMonitor": {"enabled": True}}), "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= worker["metadata"]["labels"].items()
    port_names = {port["name"] for c in worker["spec"]["containers"] for port in c.get("ports", [])}
    assert monitor["podMetricsEndpoints"][0]["port"] in port_names


def test_should_name_objects_bloomrun_operator_for_release_bloomrun():
    """The usual fullname rule: a release named like the chart's prefix does not repeat it."""
    assert only(render(release="bloomrun"), "Deployment")["metadata"]["name"] == "bloomrun-operator"
    assert only(render(), "Deployment")["metadata"]["name"] == f"{RELEASE}-bloomrun-operator"


def test_should_take_image_pull_secrets_as_local_object_references():
    pod = only(render({"imagePullSecrets": [{"name": "regcred"}]}), "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullSecrets" in render_error({"imagePullSecrets": ["regcred"]})


def test_should_keep_trainers_to_status_progress_with_the_generated_rule():
    from bloomrun.operator.policy import CHART_FILE, status_expression

    assert (REPO / CHART_FILE).read_text() == status_expression(), "run `make chart-crds`"
    policy = named(render(), "ValidatingAdmissionPolicy", "br-bloomrun-operator-trainer-status")
    assert policy["spec"]["validations"][0]["expression"].strip() == status_expression().strip()
    assert "gpuHours" in status_expression() and ".progress" not in status_expression()
    binding = named(render(), "ValidatingAdmissionPolicyBinding", "br-bloomrun-operator-trainer-status")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    remaining = of_kind(render({"trainerStatusPolicy": {"enabled": False}}), "ValidatingAdmissionPolicy")
    assert [p["metadata"]["name"] for p in remaining] == ["br-bloomrun-operator-runs"]


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def operator_args(values: dict | None = None) -> list[str]:
    return only(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_should_refuse_runs_breaking_the_install_rules_with_the_generated_policy():
    import yaml

    from bloomrun.operator.admission import RunPolicy, render_validations, validations

    objects = render()
    policy = named(objects, "ValidatingAdmissionPolicy", "br-bloomrun-operator-runs")
    assert policy["spec"]["validations"] == validations()
    assert yaml.safe_load(render_validations()) == validations()
    variables = {v["name"]: yaml.safe_load(v["expression"]) for v in policy["spec"]["variables"]}
    default = RunPolicy()  # bloomctl validate's and the operator's defaults
    assert variables == {"allowedPriorityClasses": list(default.allowed_priority_classes),
                         "deniedTaintKeys": list(default.denied_taint_keys),
                         "deniedNodeLabelKeys": list(default.denied_node_label_keys), "maxNodes": default.max_nodes}
    resources = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert resources["resources"] == ["bloomruns"] and resources["operations"] == ["CREATE", "UPDATE"]
    binding = named(objects, "ValidatingAdmissionPolicyBinding", "br-bloomrun-operator-runs")
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert not [p for p in of_kind(render({"runPolicy": {"enabled": False}}), "ValidatingAdmissionPolicy")
                if p["metadata"]["name"].endswith("-runs")]


def test_should_give_the_operator_the_install_rules_as_flags():
    args = operator_args()
    assert "--max-nodes=128" in args and "--allowed-priority-classes=" in args
    assert "--denied-taint-keys=node-role.kubernetes.io/control-plane,node-role.kubernetes.io/master" in args
    custom = operator_args({"runPolicy": {"maxNodes": 16, "allowedPriorityClasses": ["research", "prod"],
                                          "deniedTaintKeys": [], "deniedNodeLabelKeys": ["gpu.corp/reserved"]}})
    assert {"--max-nodes=16", "--allowed-priority-classes=research,prod", "--denied-taint-keys=",
            "--denied-node-label-keys=gpu.corp/reserved"} <= set(custom)
    from bloomrun.operator.__main__ import parse_args, run_policy  # the operator reads them back

    policy = run_policy(parse_args([a for a in custom if a.startswith(("--max", "--allowed", "--denied"))]))
    assert policy.max_nodes == 16 and policy.allowed_priority_classes == ("research", "prod")
    assert policy.denied_taint_keys == () and policy.denied_node_label_keys == ("gpu.corp/reserved",)
    assert "maxNodes" in render_error({"runPolicy": {"maxNodes": 5000}})


def test_should_refuse_to_run_the_operator_as_the_namespaces_default_account():
    for mode in ({}, {"watchNamespaces": ["team-a"]}):
        message = render_error({**mode, "serviceAccount": {"create": False}})
        assert "serviceAccount.name is required when serviceAccount.create is false" in message
    objects = render({"serviceAccount": {"create": False, "name": "ops-bloomrun"}})
    assert not of_kind(objects, "ServiceAccount")
    assert only(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "ops-bloomrun"
    assert only(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-bloomrun"


def test_should_not_grant_reading_single_pods():
    """The operator only lists and watches pods (kube.py never GETs one)."""
    for values in ({}, {"watchNamespaces": ["a"]}):
        pods = [r for r in rbac_rules(render(values)) if "pods" in r["resources"]]
        assert pods and all(set(r["verbs"]) == {"list", "watch", "create", "delete"} for r in pods)


def test_should_pull_images_by_digest_when_one_is_given():
    digest = "sha256:" + "ab" * 32
    objects = render({"image": {"digest": digest, "tag": "ignored"}, "trainerImage": {"digest": digest}})
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/bloomrun/bloomrun-operator@{digest}"
    assert f"--trainer-image=ghcr.io/bloomrun/trainer@{digest}" in container["args"]
    assert "digest" in render_error({"image": {"digest": "latest"}})


def test_should_give_the_operator_the_trainer_image_of_runs_that_name_none():
    """A private registry is one value, not a spec.image in every manifest."""
    args = only(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--trainer-image=ghcr.io/bloomrun/trainer:0.1.0" in args
    custom = render({"trainerImage": {"repository": "registry.corp/ml/trainer", "tag": "7"}})
    assert "--trainer-image=registry.corp/ml/trainer:7" in only(custom, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_should_leave_the_crds_out_when_asked():
    """Clusters where an admin installs CRDs: one value, no --skip-crds to remember."""
    kinds = {o["kind"] for o in render({"crds": {"enabled": False}})}
    assert "CustomResourceDefinition" not in kinds and "Deployment" in kinds
    assert "CustomResourceDefinition" in {o["kind"] for o in render()}
