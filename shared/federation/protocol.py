"""What passes between the ServerApp and the ClientApps: message types and record keys.

Both sides import these names; nothing else in a Flower message is legal. The client's
privacy allow-list (``client/privacy.py``) is written against the reply keys below, so a
new key has to be added here *and* allowed there before a site will send it.

Message flow of one run::

    query.bundle  server -> site: bundle hash it holds     site -> server: have | need | refused
                  (and whether the run trains)             (+ planned n-fine-tune when it trains)
    query.bundle  server -> site: bundle records (if need) site -> server: have | refused
    train         server -> site: global head              site -> server: local head + counts
    evaluate      server -> site: global head              site -> server: held-out metrics
    query.final   server -> site: final head (+ new bundle) site -> server: reference / local-only /
                                                                            federated metrics

With segmenter rounds (issue 24; run config ``segmenter-rounds`` > 0) the head rounds are preceded by::

    train.segmenter  server -> opted-in sites: the global     site -> server: its fine-tuned weights +
                     segmenter's trainable tensors            masked-case count, loss, pseudo Dice
    query.segmenter  server -> site: the segmenter bundle     site -> server: the three segmenter arms'
                     (sent against the run's bundle)          held-out metrics + its segmenter decision
"""

from __future__ import annotations

import re

from shared.imaging.quality import FLAGS as QUALITY_FLAGS
from shared.plumbing import rules

# -- message types ("<category>.<action>" as Flower's ClientApp dispatches them) ------------
ACTION_BUNDLE = "bundle"
ACTION_FINAL = "final"
QUERY_BUNDLE = f"query.{ACTION_BUNDLE}"
QUERY_FINAL = f"query.{ACTION_FINAL}"
TRAIN = "train"
EVALUATE = "evaluate"
# Segmenter rounds (issue 24): a train action and a query of their own
ACTION_SEGMENTER = "segmenter"
TRAIN_SEGMENTER = f"{TRAIN}.{ACTION_SEGMENTER}"
QUERY_SEGMENTER = f"query.{ACTION_SEGMENTER}"

# -- records in server -> site messages --------------------------------------------------
HEAD = "arrays"  # ArrayRecord: the head, keys HEAD_WEIGHT / HEAD_BIAS
CONFIG = "config"  # ConfigRecord: round, bundle hash, ...
BUNDLE_ARRAYS = "bundle-arrays"  # ArrayRecord from shared.bundle.transport.bundle_to_records
BUNDLE_CONFIG = "bundle-config"  # ConfigRecord from shared.bundle.transport.bundle_to_records
# ArrayRecord: a segmenter's trainable tensors by canonical name (shared.models.segment_weights), both ways
SEGMENTER = "segmenter"

HEAD_WEIGHT = "weight"
HEAD_BIAS = "bias"
HEAD_FEATURES = 512
HEAD_CLASSES = 2
HEAD_SHAPES = {HEAD_WEIGHT: (HEAD_CLASSES, HEAD_FEATURES), HEAD_BIAS: (HEAD_CLASSES,)}
# The only head widths a message may carry: the paper's head on the embedding, and the hybrid head that also
# reads the three standardised log volumes (shared.models.head_inputs). The bundle says which one a run uses.
HEAD_WIDTHS = (HEAD_FEATURES, HEAD_FEATURES + 3)
# Cross-fitted federation: the HEAD record also holds K fold heads, fold k under
# "fold<k>.weight" / "fold<k>.bias". Every site trains fold head k on its fine-tune cases outside
# its own fold k, so the average of fold head k never saw any site's fold-k cases, and a site
# can choose the federated threshold on out-of-fold scores. K = 0: the main head only.
CROSS_FIT_PREFIX = "fold"
MAX_CROSS_FIT_FOLDS = 10


def fold_prefix(k: int) -> str:
    """Key prefix of cross-fit fold head ``k`` in the HEAD record (``"fold3."``)."""
    return f"{CROSS_FIT_PREFIX}{int(k)}."


def head_keys(n_folds: int = 0) -> tuple[str, ...]:
    """Every key of a HEAD record with ``n_folds`` fold heads (main head first)."""
    return tuple(HEAD_SHAPES) + tuple(fold_prefix(k) + key for k in range(n_folds) for key in HEAD_SHAPES)


def cross_fit_folds(keys) -> int | None:
    """K when ``keys`` are exactly ``head_keys(K)`` for some 0 <= K <= MAX_CROSS_FIT_FOLDS, else None."""
    keys = set(keys)
    n, extra = divmod(len(keys) - len(HEAD_SHAPES), len(HEAD_SHAPES))
    if extra or not 0 <= n <= MAX_CROSS_FIT_FOLDS or keys != set(head_keys(n)):
        return None
    return n

# ConfigRecord keys the server sends
CFG_ROUND = "server-round"  # also injected by Flower's FedAvg
CFG_NUM_ROUNDS = "num-rounds"
CFG_BUNDLE_HASH = "bundle-hash"
CFG_DELIVER = "deliver"  # bool: this query.bundle carries the bundle records
# bool: the run will train (a federation, not ``ichfed stats``): the bundle offer's reply then carries
# the site's planned N_FINE_TUNE, or the site refuses with REASON_TOO_FEW before any bundle is sent.
CFG_TRAINS = "trains"
CFG_SEED = "seed"
# train.segmenter: what the site fine-tunes and for how long (shared.training.segment_finetune.FineTuneSpec)
CFG_SEG_TRAINABLE = "segmenter-trainable"
CFG_SEG_EPOCHS = "segmenter-epochs"
CFG_SEG_ITERATIONS = "segmenter-iterations"
CFG_SEG_LEARNING_RATE = "segmenter-learning-rate"
# query.segmenter: the bundle carrying the federated segmenter (sent against CFG_BUNDLE_HASH's bundle)
CFG_SEG_BUNDLE_HASH = "segmenter-bundle-hash"

# -- records in site -> server replies ---------------------------------------------------
METRICS = "metrics"  # MetricRecord
INFO = "info"  # ConfigRecord of short, fixed-vocabulary strings

# INFO keys
INFO_SITE = "site"
INFO_STATUS = "status"
INFO_REASON = "reason"
INFO_BUNDLE_HASH = "bundle-hash"
INFO_ADOPTION = "adoption"  # final reply: what the site did with the federated bundle (ADOPTIONS)
# query.segmenter reply: which segmenter the site goes on with (ADOPTIONS: "activated" = the federated one)
INFO_SEG_ADOPTION = "segmenter-adoption"
REASON_SUFFIX = ".reason"  # "<metric key>.reason" -> one of REASONS

STATUS_OK = "ok"
STATUS_HAVE = "have"
STATUS_NEED = "need"
STATUS_REFUSED = "refused"
STATUSES = (STATUS_OK, STATUS_HAVE, STATUS_NEED, STATUS_REFUSED)

# Reasons are codes, never free text: free text is where a path or case ID would leak.
REASON_BUNDLE_VERIFICATION = "bundle-verification-failed"
REASON_BUNDLE_MISSING = "bundle-missing"
REASON_NO_CASES = "no-usable-cases"
REASON_ONE_CLASS = "one-class-only"
REASON_TOO_FEW = "fewer-cases-than-minimum"
REASON_NO_LESION = "no-segmented-lesion"
REASON_NO_MASKS = "no-reference-masks"
REASON_THRESHOLD_FROM_BUNDLE = "threshold-from-bundle"
REASON_SITE_ERROR = "site-error"
REASON_SEGMENTER_OFF = "segmenter-fine-tune-off"  # a segmenter round asked of a site that did not opt in
REASON_SEGMENTER_BUDGET = "segmenter-budget-exceeded"  # more nnU-Net iterations asked than the site allows
REASONS = (
    REASON_BUNDLE_VERIFICATION,
    REASON_BUNDLE_MISSING,
    REASON_NO_CASES,
    REASON_ONE_CLASS,
    REASON_TOO_FEW,
    REASON_NO_LESION,
    REASON_NO_MASKS,
    REASON_THRESHOLD_FROM_BUNDLE,
    REASON_SITE_ERROR,
    REASON_SEGMENTER_OFF,
    REASON_SEGMENTER_BUDGET,
)

# What a site did with the delivered federated bundle (client/adoption.py): an aggregate code,
# nothing per case. Every "kept-" bundle stays in the site's cache and can be approved by hand.
ADOPTION_ACTIVATED = "activated"
ADOPTION_CLEARLY_WORSE = "kept-clearly-worse"
ADOPTION_ZERO_OPERATING_POINT = "kept-zero-sensitivity-or-specificity"
ADOPTION_INSUFFICIENT = "kept-insufficient-evidence"
ADOPTION_AWAITING_APPROVAL = "kept-awaiting-approval"
ADOPTIONS = (ADOPTION_ACTIVATED, ADOPTION_CLEARLY_WORSE, ADOPTION_ZERO_OPERATING_POINT, ADOPTION_INSUFFICIENT,
             ADOPTION_AWAITING_APPROVAL)

# MetricRecord keys. Training replies: NUM_EXAMPLES (the FedAvg weight), TRAIN_LOSS and the
# split sizes. Evaluation replies: "<model>.<metric>" for the models below.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
N_FINE_TUNE = "n-fine-tune"
N_HELD_OUT = "n-held-out"
N_UNUSABLE = "n-unusable"
SITE_COUNTS = (NUM_EXAMPLES, TRAIN_LOSS, N_FINE_TUNE, N_HELD_OUT, N_UNUSABLE)
# Segmenter rounds: a site's masked fine-tune cases (its FedAvg weight there; also in the bundle offer's
# reply of a site that opted in) and nnU-Net's pseudo Dice of its fine-tune (mean over ICH and PHE)
N_MASKED_FINE_TUNE = "n-masked-fine-tune"
TRAIN_DICE = "train-dice"
SEGMENTER_COUNTS = (N_MASKED_FINE_TUNE, TRAIN_DICE)

MODEL_GLOBAL = "global"  # the head the server sent this round
MODEL_REFERENCE = "reference"  # the bundle's head, no fine-tuning (paper: before fine-tuning)
MODEL_LOCAL = "local"  # last-layer fine-tuning on this site alone (paper: after fine-tuning)
MODEL_FEDERATED = "federated"  # the final federated head
# The bundle's head at the site's own out-of-sample threshold: separates re-thresholding from training.
MODEL_REFERENCE_SITE = "reference-site"
# The segmenter arms of query.segmenter: each segmenter with the bundle's own head, on the held-out cases
SEG_REFERENCE = "segmenter-reference"  # the run's bundle as shipped
SEG_FEDERATED = "segmenter-federated"  # the federated segmenter
SEG_LOCAL = "segmenter-local"  # fine-tuned on this site's masked cases alone, as long as the federation trained
SEGMENTER_ARMS = (SEG_REFERENCE, SEG_FEDERATED, SEG_LOCAL)
MODELS = (MODEL_GLOBAL, MODEL_REFERENCE, MODEL_REFERENCE_SITE, MODEL_LOCAL, MODEL_FEDERATED, *SEGMENTER_ARMS)
# The four arms of the final reply, all scored on the same held-out cases.
FINAL_ARMS = (MODEL_REFERENCE, MODEL_REFERENCE_SITE, MODEL_LOCAL, MODEL_FEDERATED)

# Held-out cases whose segmentation failed a plausibility check (shared.imaging.quality): any flag, and per flag.
N_FLAGGED = "n-flagged"
QUALITY_METRICS = (N_FLAGGED,) + tuple(f"flag-{name}" for name in QUALITY_FLAGS)

SCALAR_METRICS = (
    "n",
    "n-pos",
    "n-neg",
    "n-no-lesion",
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "threshold",
    "tp",
    "fp",
    "tn",
    "fn",
    "dice-ich",
    "dice-phe",
    "withheld",
    "auc-var",  # DeLong variance of this model's AUC
    "auc-minus-reference",  # paired DeLong AUC difference, this model minus the reference head
    "auc-minus-reference-var",
    "auc-minus-local",  # paired DeLong AUC difference, this model minus the local-only head
    "auc-minus-local-var",
    "itt-tp",  # intention to treat: cases with no segmented lesion count as predicted non-neoplastic
    "itt-fp",
    "itt-tn",
    "itt-fn",
    # segmenter arms, over the held-out cases with a reference mask (shared.evaluation.segmentation)
    "n-masked",  # how many
    "ich-components",  # mean number of predicted ICH components
    "largest-on-lesion",  # share whose largest predicted ICH component lies on the true lesion
) + QUALITY_METRICS
# The ROC curve leaves a site only as TPR sampled at these fixed FPRs: a fixed-length
# aggregate, never the per-case scores the full curve is made of.
ROC_FPR_GRID = tuple(round(i / 20, 2) for i in range(21))
ROC_TPR = "roc-tpr"
# Held-out p(neoplastic) per class as counts in SCORE_BINS equal bins of [0, 1] (the server's pooled
# ROC). Fixed bins and a minimum count per class keep a single case's score from being read back.
SCORE_BINS = 50
HIST_NEG = "hist-neg"
HIST_POS = "hist-pos"
LIST_METRICS = {ROC_TPR: len(ROC_FPR_GRID), HIST_NEG: SCORE_BINS, HIST_POS: SCORE_BINS}
# A site config cannot set min_cases_for_metrics below this floor.
MIN_CASES_FLOOR = 5
# Thresholds leave a site only rounded to this grid (and never on an observed score); the rule
# that a site threshold lies on it is shared.plumbing.rules.threshold(..., grid=THRESHOLD_GRID).
THRESHOLD_GRID = rules.THRESHOLD_GRID

SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def metric_key(model: str, metric: str) -> str:
    """``"<model>.<metric>"``, e.g. ``"federated.auc"``."""
    return f"{model}.{metric}"


def split_metric_key(key: str) -> tuple[str, str] | None:
    """Inverse of :func:`metric_key`; None for a key that is not model-scoped."""
    model, sep, metric = key.partition(".")
    if not sep or model not in MODELS:
        return None
    if metric not in SCALAR_METRICS and metric not in LIST_METRICS:
        return None
    return model, metric
