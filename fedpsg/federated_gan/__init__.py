"""Federated GAN scenarios: one generator trained across parties that are all online at once.

Unlike the continual scenarios (parties visited one after another, each releasing a set), here
the coordinator keeps a conditional generator and trains it round by round with the parties:

* ``fed-gswgan`` (Fed-GS-WGAN, Chen et al. 2020): the coordinator sends each selected party a
  batch of generated samples; the party's own critic, trained on its data only, answers with the
  gradient of the generator loss w.r.t. each sample, clipped per sample and noised on the party
  (user-level DP against an untrusted coordinator); the coordinator steps the generator.
* ``fedavg-gan``: the baseline that exchanges model parameters (FedAvg of generator and critic
  after local GAN training), non-private; it shows what the sample-gradient exchange saves.

Modules: :mod:`.config` (settings), :mod:`.split` (who holds which data), :mod:`.party` (a
party's answers and its on-disk ledger), :mod:`.protocol` (the messages), :mod:`.coordinator`
(rounds, evaluation, outputs, resume). The command line is ``python -m fedpsg.simulate --scenario
fed_gswgan_mnist`` (:mod:`fedpsg.simulate`, shared with the continual scenarios).
"""
