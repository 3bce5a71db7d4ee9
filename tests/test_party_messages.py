"""Only DP outputs leave a party: inspect every reply the ClientApp sends."""

from dataclasses import asdict, fields, replace

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from fedpsg.continual.protocol import REPLY_KEYS, TrainRequest, encode_train_request
from fedpsg.data.datasets import dataset_spec, load_images
from fedpsg.dp.accounting import PrivacyRecord
from fedpsg.methods import get_method
from fedpsg.nn.evaluation import new_classifier

TINY_EVAL = get_method("psg").evaluation["tiny"]
PSG = replace(get_method("psg").presets["tiny"], iterations=1, outer_loop=2, batch_loop=2, inner_loop=2)
CLASSES = [1, 2]  # partition 1 of the default order


@pytest.fixture
def party(monkeypatch, data_dir):
    """A node context for partition 1 and a Flower task identity, as a SuperNode would have."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    node_config = {"partition-id": 1, "num-partitions": 5, "data-dir": str(data_dir), "torch-threads": 2}
    return Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})


def send(content: RecordDict, message_type: str, context: Context) -> Message:
    return client_app(Message(content, dst_node_id=42, message_type=message_type), context)


def test_whoami_reveals_only_the_partition(party):
    reply = send(RecordDict(), "query.whoami", party)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"party"}
    assert dict(reply.content.config_records["party"]) == {"partition-id": 1, "num-partitions": 5}


def test_psg_reply_carries_only_the_dp_set_the_model_and_the_privacy_record(party, data_dir):
    spec = dataset_spec("fmnist")
    model_state = new_classifier(spec, TINY_EVAL, seed=3).state_dict()
    request = TrainRequest(
        "psg", 2, 1, "fmnist", 0, CLASSES, 10.0, 1e-5, 7, asdict(PSG), model_state, TINY_EVAL.architecture
    )
    reply = send(encode_train_request(request), "train", party)
    assert not reply.has_error(), reply.error
    content = reply.content

    # Exactly three records, of the expected kinds; nothing else (no metrics, no extra configs).
    assert set(content.keys()) == REPLY_KEYS
    assert set(content.array_records.keys()) == {"synthetic", "model"}
    assert set(content.config_records.keys()) == {"privacy"}
    assert not content.metric_records

    # The synthetic set: spc images per class of the party's classes, and labels; nothing more.
    synthetic = content.array_records["synthetic"].to_torch_state_dict()
    assert set(synthetic) == {"images", "labels"}
    images, labels = synthetic["images"], synthetic["labels"]
    assert images.shape == (len(CLASSES) * PSG.spc, 1, 28, 28)
    assert sorted(labels.tolist()) == sorted(CLASSES * PSG.spc)
    # No training image (nor any image of the whole training set) is in the reply.
    train = load_images("fmnist", train=True, data_dir=data_dir)
    distances = torch.cdist(images.flatten(1), train.images.flatten(1))
    assert float(distances.min()) > 1.0

    # The model goes back exactly as it came: PSG never trains it on private data.
    returned = content.array_records["model"].to_torch_state_dict()
    assert returned.keys() == model_state.keys()
    assert all(torch.equal(returned[k], model_state[k]) for k in model_state)

    # The privacy record holds the accountant's fields only, and the requested budget.
    privacy = dict(content.config_records["privacy"])
    assert set(privacy) <= {f.name for f in fields(PrivacyRecord)}
    record = PrivacyRecord.from_dict(privacy)
    assert record.epsilon == pytest.approx(10.0, rel=1e-3) and record.epsilon <= 10.0
    assert record.delta == 1e-5 and record.noise_multiplier > 0
    assert record.steps == PSG.iterations * PSG.outer_loop * PSG.batch_loop


def test_party_refuses_a_request_for_another_partition(party):
    spec = dataset_spec("fmnist")
    state = new_classifier(spec, TINY_EVAL).state_dict()
    request = TrainRequest("psg", 1, 0, "fmnist", 0, [5, 6], 10.0, 1e-5, 0, asdict(PSG), state, TINY_EVAL.architecture)
    # In a running SuperNode this exception becomes an error reply to the coordinator.
    with pytest.raises(ValueError, match="partition 0"):
        send(encode_train_request(request), "train", party)


def test_dpsgd_reply_carries_only_the_model_and_the_privacy_record(party):
    spec = dataset_spec("fmnist")
    model_state = new_classifier(spec, TINY_EVAL, seed=3).state_dict()
    dpsgd = replace(get_method("dpsgd").presets["tiny"], epochs=1)
    arch = TINY_EVAL.architecture
    request = TrainRequest("dpsgd", 2, 1, "fmnist", 0, CLASSES, 10.0, 1e-5, 7, asdict(dpsgd), model_state, arch)
    reply = send(encode_train_request(request), "train", party)
    content = reply.content
    assert set(content.keys()) == {"model", "privacy"}
    assert set(content.array_records.keys()) == {"model"} and not content.metric_records
    returned = content.array_records["model"].to_torch_state_dict()
    assert returned.keys() == model_state.keys()
    assert any(not torch.equal(returned[k], model_state[k]) for k in model_state)  # it was DP-trained
    record = PrivacyRecord.from_dict(dict(content.config_records["privacy"]))
    assert record.epsilon == pytest.approx(10.0, rel=1e-3) and record.max_grad_norm == dpsgd.max_grad_norm


def test_dpmerf_reply_carries_generated_samples_not_training_images(party, data_dir):
    spec = dataset_spec("fmnist")
    evaluation = get_method("dpmerf").evaluation["tiny"]
    model_state = new_classifier(spec, evaluation, seed=3).state_dict()
    dpmerf = replace(get_method("dpmerf").presets["tiny"], generator_steps=20, samples_per_class=10)
    request = TrainRequest(
        "dpmerf", 2, 1, "fmnist", 500, CLASSES, 10.0, 1e-5, 7, asdict(dpmerf), model_state, evaluation.architecture
    )
    reply = send(encode_train_request(request), "train", party)
    content = reply.content
    assert set(content.keys()) == REPLY_KEYS and not content.metric_records
    synthetic = content.array_records["synthetic"].to_torch_state_dict()
    assert set(synthetic) == {"images", "labels"} and synthetic["images"].shape == (20, 1, 28, 28)
    train = load_images("fmnist", train=True, data_dir=data_dir)
    assert float(torch.cdist(synthetic["images"].flatten(1), train.images.flatten(1)).min()) > 1.0
    returned = content.array_records["model"].to_torch_state_dict()
    assert all(torch.equal(returned[k], model_state[k]) for k in model_state)
    record = PrivacyRecord.from_dict(dict(content.config_records["privacy"]))
    assert record.epsilon == pytest.approx(10.0, rel=1e-3) and record.steps == 1
    # The party's data is its classes' training images less the evaluator's 500 per class.
    assert record.dataset_size == int(torch.isin(train.labels, torch.tensor(CLASSES)).sum()) - 500 * len(CLASSES)
