"""Robustness of sparse networks: attacks (FGSM, PGD), common corruptions, adversarial training that
plugs into any loop, and a robustness evaluation that returns plain records.

Layer 3: imports core, data, models and train only. Reports and plots: ``sparsenn.report.robustness``.
"""

from .adversarial import AdversarialBatches, adversarial_loss, attacked
from .attacks import ATTACKS, FGSM, NORMS, PGD, fgsm, list_attacks, make_attack, pgd
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt, list_corruptions
from .evaluate import accuracy_under_attack, corruption_accuracy, robustness_eval

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "FGSM",
    "NORMS",
    "PGD",
    "SEVERITIES",
    "AdversarialBatches",
    "accuracy_under_attack",
    "adversarial_loss",
    "attacked",
    "corrupt",
    "corruption_accuracy",
    "fgsm",
    "list_attacks",
    "list_corruptions",
    "make_attack",
    "pgd",
    "robustness_eval",
]
