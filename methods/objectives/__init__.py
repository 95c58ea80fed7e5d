"""Training objectives any classification task can add to its loss, each a flag, off by default:

- ``rdrop``: R-Drop (Liang et al. 2021), symmetric KL between two dropout passes;
- ``contrastive``: SimCSE-style InfoNCE (Gao et al. 2021), unsupervised or on paraphrase pairs;
- ``smart``: SMART (Jiang et al. 2020), adversarial smoothness on the embeddings and a Bregman
  proximal point term against a momentum teacher;
- ``pool`` (from ``models.pooling``, beside the head that also uses it): ``last`` or ``mean``
  sentence representations, correct under either padding;
- ``combined``: the shared flags (``add_objective_args``) and the wrapper (``build_objective``).
"""

from methods.objectives.combined import (
    Objective,
    ObjectiveSettings,
    add_objective_args,
    build_objective,
    cross_entropy_loss,
)
from methods.objectives.contrastive import (
    PairViewCollator,
    add_pair_views,
    info_nce,
    supervised_pair_loss,
    unsupervised_contrastive_loss,
)
from methods.objectives.rdrop import rdrop_loss, symmetric_kl, two_passes
from methods.objectives.smart import (
    MomentumTeacher,
    adversarial_perturbation,
    perturbed_embeddings,
    proximal_loss,
    smoothness_loss,
)
from models.pooling import POOLINGS, pool

__all__ = [
    "POOLINGS", "MomentumTeacher", "Objective", "ObjectiveSettings", "PairViewCollator", "add_objective_args",
    "add_pair_views",
    "adversarial_perturbation", "build_objective", "cross_entropy_loss", "info_nce", "perturbed_embeddings", "pool",
    "proximal_loss", "rdrop_loss", "smoothness_loss", "supervised_pair_loss", "symmetric_kl", "two_passes",
    "unsupervised_contrastive_loss",
]
