"""Active learning for image-level classifiers: which unlabelled image to label next.

Written for classifiers, not taken from MONAI Label's segmentation scoring (whose
``EpistemicScoring`` puts BatchNorm in training mode and breaks on 2D
classification). Every front door calls these functions: the MONAI Label app's
scoring and strategies, the Slicer module's "next case", and ``medclass al-sim``,
which measures whether they pay.

Scores, higher = more informative:

=====================  ================================================================
``entropy``            predictive entropy, divided by its maximum (``log K``; per label for
                       multi-label), so it lies in [0, 1]
``margin``             ``1 - (p_top1 - p_top2)`` (multi-label: ``1 - |2p - 1|`` per label)
``least-confidence``   ``(1 - p_top1) * K / (K - 1)`` (multi-label: per label, as binary)
``bald``               mutual information between the prediction and the weights (Houlsby
                       et al. 2011), estimated with MC dropout: only the dropout layers are
                       sampled, BatchNorm keeps its running statistics
=====================  ================================================================

Multi-label scores average the per-label binary quantities (BALD sums them: the
labels are independent Bernoullis, so their informations add). Ordinal tasks are
scored on their grade probabilities, like multi-class ones.

Strategies: ``random``; the four scores (top-k); ``coreset`` (k-center greedy on the
model's embeddings, Sener & Savarese 2018: the diversity strategy for a cold start,
which needs no trustworthy probabilities); ``hybrid`` (the ``4k`` most uncertain, then
k-center among them, so that one batch does not spend its labels on near-duplicates);
``typiclust`` (Hacohen et al. 2022, "Active learning on a budget"): k-means of the pool
into (labelled + k) clusters, then, one pick per cluster with the fewest labelled images
(largest first), the cluster's most typical image, i.e. of highest density (inverse mean
distance to its nearest neighbours). With nothing labelled yet, and on embeddings from a
pretrained encoder (``medclass pretrain``, ImageNet), it picks typical and diverse first
images where uncertainty has no model to ask.

The package's modules: :mod:`~medclass.active.scores` (uncertainty scores and the model
passes that give them), :mod:`~medclass.active.selection` (the strategies) and
:mod:`~medclass.active.simulation` (``medclass al-sim``). Everything public is importable
from ``medclass.active``.
"""

from medclass.active.scores import (
    FALLBACK_DROPOUT,
    SCORE_METHODS,
    bald,
    embeddings,
    mc_dropout_probabilities,
    score_pool,
    uncertainty,
)
from medclass.active.selection import (
    COLD_START,
    HYBRID_FACTOR,
    NEEDS_EMBEDDINGS,
    NEEDS_SCORES,
    STRATEGIES,
    STRATEGY_DESCRIPTIONS,
    k_center_greedy,
    select,
    typiclust,
)
from medclass.active.simulation import (
    SimulationConfig,
    encode,
    fit_labelled,
    labels_to_reach,
    parse_combo,
    probe_auc,
    probe_fit,
    probe_probabilities,
    simulate,
    simulate_embeddings,
    simulate_with_init,
    stratified_subset,
    summarize,
)

__all__ = [
    "COLD_START", "FALLBACK_DROPOUT", "HYBRID_FACTOR", "NEEDS_EMBEDDINGS", "NEEDS_SCORES", "SCORE_METHODS",
    "STRATEGIES", "STRATEGY_DESCRIPTIONS",
    "SimulationConfig", "bald", "embeddings", "encode", "fit_labelled", "k_center_greedy", "labels_to_reach",
    "mc_dropout_probabilities", "parse_combo", "probe_auc", "probe_fit", "probe_probabilities", "score_pool", "select",
    "simulate", "simulate_embeddings", "simulate_with_init", "stratified_subset", "summarize", "typiclust",
    "uncertainty",
]
