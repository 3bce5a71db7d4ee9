"""The spread of PSG's tiny-profile accuracy over secrets: the margin behind tests/test_psg.py's bar.

    python bench/psg_tiny_margin.py --inits torch,kaiming --secrets 8 [--data-dir DIR]

For each matching-network initialisation, runs PSG's tiny profile on MNIST classes 5 and 6
(eps 10) with secrets 100, 101, ... and prints each set's mean accuracy (the tiny evaluation:
two classifiers, the real test images of 5 and 6) and their mean.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, get_method
from fedpsg.nn.evaluation import evaluate_training_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", default="torch,kaiming")
    parser.add_argument("--secrets", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    method, spec = get_method("psg"), dataset_spec("mnist")
    train = load_images("mnist", True, args.data_dir).only_classes([5, 6])
    test = load_images("mnist", False, args.data_dir).only_classes([5, 6])
    for init in args.inits.split(","):
        config = replace(method.presets["tiny"], init=init)
        accuracies = []
        for k in range(args.secrets):
            stage = PartyStage(train, [5, 6], spec, epsilon=10.0, delta=1e-5, progress_interval=1e9)
            release = method.run(stage, config, SecretRandomness.fixed(100 + k))
            released = ImageSet(release.images, release.labels)
            accuracies.append(evaluate_training_set(released, test, spec, method.evaluation["tiny"]).mean)
        print(
            f"{init}: {[round(a, 3) for a in accuracies]}, mean {statistics.mean(accuracies):.3f}, "
            f"sd {statistics.stdev(accuracies):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
