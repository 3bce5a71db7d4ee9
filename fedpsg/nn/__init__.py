"""Networks: the classifiers, the matching loss, and how a training set is evaluated."""
