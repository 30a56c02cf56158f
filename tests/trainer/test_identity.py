"""Run identity and compatibility fields: which checkpoints a run may resume or start from."""

import json

import pytest

from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.identity import (
    IdentityError,
    RunIdentity,
    check_init_from,
    check_resume,
    compatibility,
    identity_from_env,
)


def config(**model) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"preset": "tiny", **model},
        "data": {"sources": [{"path": "/data/oscar_text_document", "weight": 1.0}]},
        "training": {"globalBatchSize": 8, "microBatchSize": 2, "trainSteps": 10},
    })


ARM_A = RunIdentity(name="arm", namespace="team", uid="uid-a")


def saved(identity: RunIdentity, cfg: TrainerConfig) -> dict:
    """Metadata as a checkpoint stores it: through JSON, as on disk."""
    return json.loads(json.dumps({"run": identity.to_dict(), "compatibility": compatibility(cfg)}))


def test_a_run_resumes_its_own_checkpoint():
    check_resume("ckpt", saved(ARM_A, config()), ARM_A, compatibility(config()))


@pytest.mark.parametrize("other", [
    RunIdentity(name="arm", namespace="team", uid="uid-b"),      # deleted and re-created
    RunIdentity(name="arm", namespace="other-team", uid="uid-a"),
    RunIdentity(name="arm-2", namespace="team", uid="uid-a"),
    RunIdentity(name="arm"),                                      # a local run of that name
])
def test_another_runs_checkpoint_is_refused_naming_both_runs(other):
    with pytest.raises(IdentityError) as err:
        check_resume("ckpt", saved(ARM_A, config()), other, compatibility(config()))
    assert str(ARM_A) in str(err.value) and str(other) in str(err.value)


def test_a_changed_knob_is_refused_naming_the_field_and_both_values():
    with pytest.raises(IdentityError, match=r"model.embeddingLayernorm: True -> False"):
        check_resume("ckpt", saved(ARM_A, config()), ARM_A, compatibility(config(embeddingLayernorm=False)))


def test_a_changed_data_mixture_is_refused_for_resume_but_fine_for_a_warm_start():
    other_data = config().model_copy(update={"data": config().data.model_copy(update={"seed": 7})})
    with pytest.raises(IdentityError, match=r"data.seed: 1234 -> 7"):
        check_resume("ckpt", saved(ARM_A, config()), ARM_A, compatibility(other_data))
    check_init_from("ckpt", saved(ARM_A, config()), other_data)


def test_a_warm_start_refuses_weights_that_do_not_fit():
    with pytest.raises(IdentityError, match=r"model.numLayers: 2 -> 3"):
        check_init_from("ckpt", saved(ARM_A, config()), config(numLayers=3))
    # sequence length matters to weights only through a learned position table
    check_init_from("ckpt", saved(ARM_A, config()), config(seqLength=128))
    with pytest.raises(IdentityError, match="model.seqLength"):
        check_init_from("ckpt", saved(ARM_A, config(position="learned")), config(position="learned", seqLength=128))


def test_a_checkpoint_without_identity_is_refused():
    with pytest.raises(IdentityError, match="no run identity"):
        check_resume("ckpt", {"compatibility": compatibility(config())}, ARM_A, compatibility(config()))


def test_identity_comes_from_the_operators_environment_or_the_manifest_name():
    env = {"BLOOMRUN_RUN_NAMESPACE": "team", "BLOOMRUN_RUN_NAME": "arm", "BLOOMRUN_RUN_UID": "uid-a"}
    assert identity_from_env(env) == ARM_A
    assert identity_from_env({"BLOOMRUN_RUN": "tiny", "BLOOMRUN_NAMESPACE": "local"}) == RunIdentity(name="tiny")
    assert identity_from_env({}) == RunIdentity(name="local")


def test_a_refusal_is_the_pods_termination_message(tmp_path, monkeypatch, capsys):
    """In a pod the kubelet reads /dev/termination-log; the operator puts it in
    status.lastFailure, so a refused checkpoint says why where the user looks."""
    from bloomrun.trainer import train

    log = tmp_path / "termination-log"
    log.touch()  # the kubelet creates the file; outside a pod there is none
    monkeypatch.setattr(train, "TERMINATION_LOG", str(log))
    assert train.refuse("ckpt: written by run team/arm-a (uid u1), not by this run team/arm-b (uid u2)") == 2
    assert log.read_text().startswith("permanent: ckpt: written by run team/arm-a")  # the operator reads the mark
    assert "error: ckpt: written by run" in capsys.readouterr().err
    monkeypatch.setattr(train, "TERMINATION_LOG", str(tmp_path / "absent"))
    assert train.refuse("x") == 2 and not (tmp_path / "absent").exists()
