"""The messages of a federated GAN round, as Flower RecordDicts, and their size on the wire.

fed-gswgan (message type ``train.fed_gswgan``):
    request  config (run, round, partition, public split, budget, hyper-parameters) + ``samples``
             (the generated images in [0, 1] and their labels);
    reply    exactly ``gradients`` (the sanitised gradient w.r.t. each sample) and ``privacy``
             (the party's accountant record and releases made). Never the critic.
fedavg-gan (``train.fedavg_gan``):
    request  config + ``generator`` and ``critic`` parameters;
    reply    ``generator``, ``critic`` (locally trained; non-private) and ``privacy``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedpsg.dp.accounting import PrivacyRecord
from fedpsg.federated_gan.config import FedGANConfig
from fedpsg.runs.settings import config_from_hyperparameters
from fedpsg.runs.wire import check_reply_keys, privacy_config, read_privacy

GRADIENT_REPLY_KEYS = frozenset({"gradients", "privacy"})
MODEL_REPLY_KEYS = frozenset({"generator", "critic", "privacy"})


def message_bytes(content: RecordDict) -> int:
    """Bytes of ``content`` serialised as Flower sends it (its protobuf form)."""
    return recorddict_to_proto(content).ByteSize()


@dataclass(frozen=True)
class RoundRequest:
    """What every request of a round carries besides its payload."""

    run_id: str  # names the party's ledger for this run
    round: int
    partition: int
    dataset: str
    num_parties: int
    split: str
    split_seed: int
    epsilon: float
    delta: float
    config: FedGANConfig

    def to_config_record(self) -> ConfigRecord:
        values = {k: v for k, v in asdict(self).items() if k != "config"}
        values.update({f"hp.{k}": v for k, v in asdict(self.config).items() if v is not None})
        return ConfigRecord(values)

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundRequest:
        hyperparameters = {k[3:]: v for k, v in record.items() if k.startswith("hp.")}
        return cls(
            run_id=str(record["run_id"]),
            round=int(record["round"]),
            partition=int(record["partition"]),
            dataset=str(record["dataset"]),
            num_parties=int(record["num_parties"]),
            split=str(record["split"]),
            split_seed=int(record["split_seed"]),
            epsilon=float(record["epsilon"]),
            delta=float(record["delta"]),
            config=config_from_hyperparameters(FedGANConfig, hyperparameters),
        )


# ----- fed-gswgan ------------------------------------------------------------------------------


def encode_sample_request(request: RoundRequest, images: torch.Tensor, labels: torch.Tensor) -> RecordDict:
    samples = ArrayRecord({"images": images.detach().cpu(), "labels": labels.cpu()})
    return RecordDict({"config": request.to_config_record(), "samples": samples})


def decode_sample_request(content: RecordDict) -> tuple[RoundRequest, torch.Tensor, torch.Tensor]:
    samples = content.array_records["samples"].to_torch_state_dict()
    return RoundRequest.from_config_record(content.config_records["config"]), samples["images"], samples["labels"]


@dataclass(frozen=True)
class GradientReply:
    gradients: torch.Tensor  # sanitised, one per sample of the request, same shape as the images
    privacy: PrivacyRecord  # what the party's whole participation costs (its plan)
    releases: int  # releases the party has made in this run, this one included


def encode_gradient_reply(reply: GradientReply) -> RecordDict:
    return RecordDict(
        {
            "gradients": ArrayRecord({"gradients": reply.gradients.detach().cpu()}),
            "privacy": privacy_config(reply.privacy, releases=reply.releases),
        }
    )


def decode_gradient_reply(content: RecordDict) -> GradientReply:
    check_reply_keys(content, GRADIENT_REPLY_KEYS)
    privacy, values = read_privacy(content)
    gradients = content.array_records["gradients"].to_torch_state_dict()["gradients"]
    return GradientReply(gradients, privacy, int(values["releases"]))


# ----- fedavg-gan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelReply:
    generator: dict[str, torch.Tensor]
    critic: dict[str, torch.Tensor]
    privacy: PrivacyRecord
    releases: int


def encode_model_request(
    request: RoundRequest, generator: dict[str, torch.Tensor], critic: dict[str, torch.Tensor]
) -> RecordDict:
    return RecordDict(
        {"config": request.to_config_record(), "generator": ArrayRecord(generator), "critic": ArrayRecord(critic)}
    )


def decode_model_request(content: RecordDict) -> tuple[RoundRequest, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return (
        RoundRequest.from_config_record(content.config_records["config"]),
        content.array_records["generator"].to_torch_state_dict(),
        content.array_records["critic"].to_torch_state_dict(),
    )


def encode_model_reply(reply: ModelReply) -> RecordDict:
    return RecordDict(
        {
            "generator": ArrayRecord(reply.generator),
            "critic": ArrayRecord(reply.critic),
            "privacy": privacy_config(reply.privacy, releases=reply.releases),
        }
    )


def decode_model_reply(content: RecordDict) -> ModelReply:
    check_reply_keys(content, MODEL_REPLY_KEYS)
    privacy, values = read_privacy(content)
    return ModelReply(
        content.array_records["generator"].to_torch_state_dict(),
        content.array_records["critic"].to_torch_state_dict(),
        privacy,
        int(values["releases"]),
    )
