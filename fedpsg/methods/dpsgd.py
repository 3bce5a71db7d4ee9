"""Naive DP-SGD finetuning: the paper's baseline that trains directly on each party's data.

Each party finetunes the shared classifier on its own partition with Opacus: per-example
gradients clipped to ``max_grad_norm``, Gaussian noise of std ``sigma * max_grad_norm`` on
the sum, Poisson-sampled batches. ``sigma`` is calibrated so that the steps actually taken
cost exactly the party's epsilon. Hyper-parameters default to the authors' DP-SGD baseline
(DingfanChen/Private-Set, ``continual_learning/main_dpsgd.py``).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedpsg.dp.accounting import PrivacyRecord, private_record, validate_budget
from fedpsg.dp.mechanisms import add_noise_with_mechanism
from fedpsg.dp.secret import SecretRandomness
from fedpsg.io.progress import Progress
from fedpsg.methods.base import Method, PartyStage, Release, register_method
from fedpsg.nn.evaluation import SMALL_SET_EVALUATION

__all__ = ["DPSGD", "DPSGDConfig", "DPSGDSchedule", "dpsgd_schedule"]


@dataclass(frozen=True)
class DPSGDConfig:
    """Hyper-parameters of DP-SGD finetuning (defaults: the authors' ``main_dpsgd.py``)."""

    epochs: int = 5
    batch_size: int = 256  # expected batch size; batches are Poisson-sampled
    max_grad_norm: float = 0.1  # per-example clipping bound C
    lr: float = 0.01
    momentum: float = 0.0  # the authors use plain SGD
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.max_grad_norm > 0 and self.lr > 0 and self.momentum >= 0):
            raise ValueError("need max_grad_norm > 0, lr > 0 and momentum >= 0")


@dataclass(frozen=True)
class DPSGDSchedule:
    """The Poisson sampling rate and the number of noisy steps a run will take."""

    sample_rate: float
    steps_per_epoch: int
    steps: int


def dpsgd_schedule(num_examples: int, config: DPSGDConfig) -> DPSGDSchedule:
    """The schedule Opacus's Poisson data loader yields for ``num_examples`` examples.

    Opacus derives the sampling rate from a loader of ``batch_size`` as ``1 / len(loader)``
    (= ``1 / ceil(N / B)``, which is ``B / N`` when ``B`` divides ``N``) and then takes
    ``int(1 / sample_rate)`` batches per epoch. We mirror both rather than assume ``N / B``
    steps, because the accountant must see exactly the steps that are run (``int`` of a
    float reciprocal is sometimes one less than ``ceil(N / B)``).
    """
    if num_examples < 1:
        raise ValueError("DP-SGD needs at least one example")
    sample_rate = 1 / math.ceil(num_examples / config.batch_size)
    steps_per_epoch = int(1 / sample_rate)  # as opacus.utils.uniform_sampler.UniformWithReplacementSampler
    return DPSGDSchedule(sample_rate, steps_per_epoch, config.epochs * steps_per_epoch)


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    device: str,
    private: bool,
    progress: Progress,
) -> None:
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            # Poisson sampling can draw an empty batch. A DP step must still be taken on it
            # (Opacus clips an empty set of per-example gradients and releases pure noise,
            # which the accountant charged for); plain SGD simply has nothing to learn from.
            if private or len(labels) > 0:
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
            progress.step()


@register_method
class DPSGD(Method):
    """The naive baseline: finetune the received classifier on the party's data, release the model."""

    name = "dpsgd"
    label = "DP-SGD finetune"
    releases = "model"
    config_class = DPSGDConfig
    presets = {"paper": DPSGDConfig(), "cpu": DPSGDConfig(), "tiny": DPSGDConfig(epochs=1)}
    evaluation = SMALL_SET_EVALUATION  # the classifier's shape; the coordinator tests it as it is

    def plan(self, stage: PartyStage, config: DPSGDConfig) -> PrivacyRecord:
        """Opacus's Poisson schedule over the party's examples; ``epsilon = inf``: non-private."""
        validate_budget(stage.epsilon, stage.delta)
        n = len(stage.data)
        schedule = dpsgd_schedule(n, config)
        private = not math.isinf(stage.epsilon)
        return private_record(
            stage.epsilon,
            stage.delta,
            schedule.sample_rate,
            schedule.steps,
            config.accountant,
            max_grad_norm=config.max_grad_norm if private else None,
            dataset_size=n,
        )

    def steps(self, stage: PartyStage, config: DPSGDConfig) -> int:
        return dpsgd_schedule(len(stage.data), config).steps

    def release(
        self, stage: PartyStage, config: DPSGDConfig, plan: PrivacyRecord, secret: SecretRandomness, progress: Progress
    ) -> Release:
        """Finetune (a copy of) ``stage.model`` on the party's data (real labels) with DP-SGD; release it.

        Which examples each batch holds and Opacus's noise come from ``secret``; there is no public
        randomness, the model to finetune is given. The released state holds the trained weights
        of a plain ``nn.Module`` (no Opacus wrapper, hooks or ``grad_sample`` attributes).
        ``epsilon = inf`` runs non-private SGD with the same Poisson schedule (no clipping, no noise).

        Adjacency is add/remove-one of an example of the data (Poisson-subsampled Gaussian, as
        in Opacus); ``plan`` is what the accountant charges for the steps taken.
        """
        if stage.model is None:
            raise ValueError("DP-SGD finetunes the coordinator's model: the stage has none")
        data, device = stage.data, stage.device
        schedule = dpsgd_schedule(len(data), config)
        private = not math.isinf(stage.epsilon)

        model = copy.deepcopy(stage.model).to(device)  # the stage's model stays as the coordinator sent it
        was_training = model.training
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        # The party's secret generators drive Opacus's Poisson sampler (it takes the loader's
        # generator) and its noise; nothing here depends on the global RNG state.
        loader = DataLoader(
            TensorDataset(data.images, data.labels), batch_size=config.batch_size, generator=secret.sampling
        )

        if private:
            with warnings.catch_warnings():
                # Opacus's secure_mode needs torchcsprng, which has no wheels for current torch; the
                # generators are seeded from OS entropy instead, and the noise is drawn as
                # secure_mode draws it (below).
                warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
                engine = PrivacyEngine(accountant=config.accountant)
            dp_model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=config.max_grad_norm,
                poisson_sampling=True,
                noise_generator=secret.noise,
            )
            # secure_mode's noise (sum of four draws, halved) defeats floating-point attacks; the
            # optimizer reads this flag at every step (as fedpsg.dp.mechanisms.gaussian_mechanism does).
            optimizer.secure_mode = True
            add_noise_with_mechanism(optimizer, plan.sample_rate)  # counted and auditable like every release
            # sigma was calibrated for a planned schedule: it must be exactly what Opacus will run.
            if loader.sample_rate != schedule.sample_rate or len(loader) != schedule.steps_per_epoch:
                raise RuntimeError(
                    f"Opacus's loader ({loader.sample_rate}, {len(loader)}) differs from the plan {schedule}"
                )
        else:
            # Same Poisson batches as the private run, but plain SGD on them.
            dp_model = model
            loader = DPDataLoader.from_data_loader(loader)

        try:
            with warnings.catch_warnings():
                # Opacus's full backward hooks fire on the first layer although the images need no
                # gradient; torch warns about it, but the per-example gradients are right.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                _train(dp_model, optimizer, loader, config.epochs, device, private, progress)
        finally:
            if private:
                dp_model.to_standard_module()  # removes the hooks and per-example gradients from `model`
            for p in params:
                p.grad = None
                if hasattr(p, "summed_grad"):  # set on the parameters by Opacus's DPOptimizer
                    del p.summed_grad
            model.train(was_training)

        return Release(plan, model_state={k: v.detach().cpu() for k, v in model.state_dict().items()})
