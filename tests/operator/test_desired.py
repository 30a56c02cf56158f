"""Pure builders: the manifests a BloomRun turns into."""

import yaml

from bloomrun.operator import desired
from bloomrun.trainer import elastic
from bloomrun.trainer.config import TrainerConfig

from .conftest import make_run


def test_worker_pod_runs_elastic_torchrun_with_a_unique_rendezvous(run):
    pod = desired.desired_worker(run, 1)
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=2:3", "--nproc-per-node=8"]
    assert "--rdzv-backend=c10d" in command
    assert "--rdzv-endpoint=ablation-rendezvous.ablation.team-a.svc:29400" in command  # the store pod, no worker
    assert any(a.startswith("--rdzv-conf=") and "is_host=false" in a for a in command)
    assert "--rdzv-id=uid-1234" in command  # never the default id shared between jobs
    assert any(a.startswith("--rdzv-conf=last_call_timeout=2") for a in command)
    assert command[-2:] == ["--config", "/etc/bloomrun/config.yaml"]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env["BLOOMRUN_RUN_NAME"] == "ablation" and env["BLOOMRUN_RUN_NAMESPACE"] == "team-a"
    assert not any(e["name"] == "BLOOMRUN_METRICS_PORT_FILE" for e in pod["spec"]["containers"][0]["env"])


def test_torchrun_waits_for_the_sigterm_checkpoint_within_the_pods_grace_period(run):
    spec = desired.desired_worker(run, 0)["spec"]
    timeout = next(a for a in spec["containers"][0]["command"] if a.startswith("--shutdown-timeout="))
    assert int(timeout.split("=")[1]) == elastic.shutdown_timeout(spec["terminationGracePeriodSeconds"])


def test_pods_and_bloomctl_run_launch_torchrun_the_same_way(run, tmp_path):
    """One builder: the pod's command is the local one but for the program, the nodes and
    the rendezvous (the local one's own arguments: --log-dir)."""
    pod = desired.torchrun_launch(run)
    local = elastic.Launch(pod.config_path, pod.rendezvous, pod.nproc, pod.max_restarts,
                           launcher=("python", "-m", "torch.distributed.run"), log_dir=str(tmp_path))
    assert desired.torchrun_command(run)[1:] == [
        a for a in elastic.build_torchrun_command(local)[3:] if not a.startswith("--log-dir=")]


def test_worker_pod_has_stable_identity_and_owner(run):
    pod = desired.desired_worker(run, 2)
    assert pod["metadata"]["name"] == "ablation-worker-2"
    assert pod["spec"]["hostname"] == "ablation-worker-2" and pod["spec"]["subdomain"] == "ablation"
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "uid-1234" and owner["controller"] is True and owner["kind"] == "BloomRun"
    assert pod["metadata"]["labels"][desired.INDEX_LABEL] == "2"
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "bloomrun-operator"


def test_worker_pod_lands_on_the_gpu_pool_with_restricted_security(run):
    spec = desired.desired_worker(run, 0)["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert spec["nodeSelector"] == {"bloomrun.io/pool": "a100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                                            "readOnlyRootFilesystem": True}
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert spec["restartPolicy"] == "Never"


def test_cpu_workers_do_not_ask_for_gpus_or_tolerate_their_taint():
    spec = desired.desired_worker(make_run(gpusPerNode=0), 0)["spec"]
    assert "nvidia.com/gpu" not in str(spec["containers"][0]["resources"])
    assert spec["tolerations"] == []
    assert "--nproc-per-node=1" in spec["containers"][0]["command"]


def test_user_env_is_passed_after_the_operators():
    run = make_run(env=[{"name": "NCCL_DEBUG", "value": "INFO"}])
    env = desired.desired_worker(run, 0)["spec"]["containers"][0]["env"]
    assert env[-1] == {"name": "NCCL_DEBUG", "value": "INFO"}


def test_config_map_holds_the_resolved_trainer_config(run):
    config_map = next(o for o in desired.desired_infra(run) if o["kind"] == "ConfigMap")
    config = TrainerConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert config.checkpoint.dir == "/checkpoints/team-a/ablation/uid-1234"  # the run's own folder
    assert config.training.train_steps == 20


def test_runs_sharing_a_checkpoint_claim_get_folders_by_namespace_name_and_uid():
    """Arms of a study share one claim; a run re-created under the same name (new uid) must
    not find the old run's checkpoints in its folder."""
    spec = make_run(checkpointVolume={"claimName": "bloom-ablations-checkpoints"}).spec
    folders = {desired.pod_trainer_config(desired.Run(name, ns, uid, 1, spec)).checkpoint.dir
               for name, ns, uid in [("arm", "a", "u1"), ("arm", "a", "u2"), ("arm", "b", "u1"), ("arm-2", "a", "u1")]}
    assert len(folders) == 4 and all(f.startswith("/checkpoints/") for f in folders)


def test_a_warm_start_from_another_run_reads_that_runs_folders_on_the_same_volume():
    run = make_run(checkpoint={"initFrom": {"run": "base", "optimizer": True}})
    init_from = desired.pod_trainer_config(run).checkpoint.init_from
    assert (init_from.path, init_from.run, init_from.optimizer) == ("/checkpoints/team-a/base", None, True)


def test_relative_data_paths_in_a_pod_are_inside_the_data_volume():
    run = make_run(data={"sources": [{"path": "corpora/a"}, {"path": "/abs/b"}], "tokenizer": "tok.json"},
                   dataVolume={"claimName": "corpora", "mountPath": "/mnt/data"},
                   checkpointVolume={"mountPath": "/mnt/ckpt"})
    config = desired.pod_trainer_config(run)
    assert [s.path for s in config.data.sources] == ["/mnt/data/corpora/a", "/abs/b"]
    assert config.data.tokenizer == "/mnt/data/tok.json"
    assert config.checkpoint.dir.startswith("/mnt/ckpt/team-a/")


def test_trainer_may_only_patch_its_own_status(run):
    role = next(o for o in desired.desired_infra(run) if o["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["bloomrun.io"], "resources": ["bloomruns/status"],
                              "resourceNames": ["ablation"], "verbs": ["get", "patch"]}]
    pod = desired.desired_worker(run, 0)
    assert pod["spec"]["serviceAccountName"] == "ablation-trainer"


def test_service_is_headless_and_publishes_unready_workers(run):
    service = next(o for o in desired.desired_infra(run) if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]


def test_template_hash_changes_with_the_pod_spec_but_not_with_suspend():
    base = desired.template_hash(make_run())
    assert desired.template_hash(make_run(suspend=True)) == base
    assert desired.template_hash(make_run(image="other:1")) != base
    assert desired.template_hash(make_run(optim={"lr": 1e-4})) != base  # the config changed


def test_queue_label_for_kueue_goes_on_the_workers_only():
    run = make_run(queue="research")
    pod = desired.desired_worker(run, 0)
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    for child in desired.desired_infra(run):  # Kueue admits pods, not ConfigMaps, Services or RBAC
        assert "kueue.x-k8s.io/queue-name" not in child["metadata"]["labels"], child["kind"]


def test_infra_names_are_the_names_of_what_desired_infra_builds(run):
    assert desired.infra_names(run) == {(o["kind"], o["metadata"]["name"]) for o in desired.desired_infra(run)}


def test_the_table_of_child_kinds_says_what_the_builders_build(run):
    built = [*desired.desired_infra(run), desired.desired_worker(run, 0)]
    assert [(o["kind"], o["apiVersion"]) for o in built] == [(c.kind, c.api_version) for c in desired.CHILD_KINDS]


def test_only_the_runs_own_workers_reach_its_ports_and_scrapers_only_the_metrics_port(run):
    """The rendezvous store is unauthenticated: another tenant's pod must not reach it."""
    policy = next(o for o in desired.desired_infra(run) if o["kind"] == "NetworkPolicy")
    pod_labels = desired.desired_worker(run, 0)["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items() and policy["spec"]["policyTypes"] == ["Ingress"]
    own, scrape = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selector}}]}  # every port, own pods only
    assert scrape["ports"] == [{"protocol": "TCP", "port": run.spec.metrics.port}]
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": {desired.SCRAPER_NAMESPACE_LABEL: "true"}}}]
    other = desired.desired_network_policy(make_run(metrics={"port": 0}))
    assert len(other["spec"]["ingress"]) == 1  # no metrics port, no scrape rule


def test_the_rendezvous_store_is_a_pod_of_its_own_reachable_by_name_and_no_worker(run):
    """Losing worker-0 must not take the rendezvous with it (issue 19): the store runs apart."""
    store = next(o for o in desired.desired_infra(run) if o["kind"] == "Deployment")
    pod = store["spec"]["template"]
    assert store["spec"]["replicas"] == 1 and store["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["spec"]["hostname"] == "ablation-rendezvous" and pod["spec"]["subdomain"] == desired.service_name(run)
    assert pod["spec"]["containers"][0]["command"][:3] == ["python", "-m", "bloomrun.trainer.rendezvous_store"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert store["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert desired.RUN_LABEL not in pod["metadata"]["labels"]  # not counted as a worker
    service = next(o for o in desired.desired_infra(run) if o["kind"] == "Service")
    policy = next(o for o in desired.desired_infra(run) if o["kind"] == "NetworkPolicy")
    worker = desired.desired_worker(run, 0)["metadata"]["labels"]
    for selector in (service["spec"]["selector"], policy["spec"]["podSelector"]["matchLabels"]):
        assert selector.items() <= pod["metadata"]["labels"].items() and selector.items() <= worker.items()
    # Evicted from a lost node within seconds, not the default 300 s: no group re-forms without it.
    evicted = {t["key"]: t["tolerationSeconds"] for t in pod["spec"]["tolerations"] if t.get("effect") == "NoExecute"}
    assert evicted == {"node.kubernetes.io/not-ready": 10, "node.kubernetes.io/unreachable": 10}
    assert pod["spec"]["tolerations"][:len(desired.worker_tolerations(run))] == desired.worker_tolerations(run)


def test_the_trainer_image_is_the_specs_or_else_the_operators_default():
    plain = make_run()
    assert plain.spec.image is None
    custom = desired.Run(plain.name, plain.namespace, plain.uid, 1, plain.spec, default_image="registry.corp/trainer:7")
    for run, image in ((plain, desired.DEFAULT_IMAGE), (custom, "registry.corp/trainer:7"),
                       (make_run(image="mine:1"), "mine:1")):
        assert desired.desired_worker(run, 0)["spec"]["containers"][0]["image"] == image
        store = next(o for o in desired.desired_infra(run) if o["kind"] == "Deployment")
        assert store["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_workers_run_hardened_read_only_with_bounded_shared_memory_and_scratch(run):
    pod = desired.desired_worker(run, 0)["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]  # the one writable place, bounded
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "HOME", "value": "/tmp"} in container["env"]  # caches that default to HOME
    # A tag is pulled again (a node's cached private image is not reused); a digest need not be.
    assert container["imagePullPolicy"] == "Always"
    pinned = make_run(image="registry.corp/trainer@sha256:" + "a" * 64)
    assert desired.desired_worker(pinned, 0)["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert desired.desired_worker(make_run(imagePullPolicy="Never"), 0)["spec"]["containers"][0]["imagePullPolicy"] == "Never"
