"""The record contract: every metric key a run logs to MLflow, and the tags the code reads
back, in one place.

The MLflow UI groups a run's charts into sections by the key's path (the part before the
last `/`; keys without one go to a last, unnamed section), and sorts the sections by name;
inside a section, charts sort by name too. The names are
chosen from the reviewer's side so that this order is the order of their questions: the
learning curves first, train and validation of one quantity side by side (`acc/`,
`loss/`), then the learning rate (`opt/`), the gradient check (`rel_error/`, cs231n's
name for it), the speed, and the training-health numbers of the cs231n notes (`units/`,
`weights/`). System metrics (`system/`) have their own tab.

A number a run has once (its summary: the best epoch, the test accuracy, the gradient
check) is logged once, at step SUMMARY_STEP (0): MLflow 3.17's charts draw a key whose
points all sit at step 0 as a bar labelled with its value, and a key with a point at a
step >= 1 as a line over steps (a lone dot, for a single point), in the run's Model
metrics tab and in the runs' chart view alike (`getBaseChartAndSectionConfigs` in the
UI's JavaScript). Curves are logged per epoch, from step 1.

| key | step | meaning |
| --- | --- | --- |
| `acc/train`, `acc/val` | epoch | accuracy on the fixed train subset / on validation |
| `acc/gap` | epoch | acc/train - acc/val (the overfitting gap) |
| `loss/train`, `loss/val` | epoch | mean data loss on the same images |
| `loss/gap` | epoch | loss/val - loss/train |
| `loss/batch` | global step | training loss (data + L2) of one minibatch |
| `acc/best_val`, `acc/best_val_epoch` | 0, once | the run's best validation accuracy, its epoch |
| `acc/test`, `loss/test` | 0, once | the test split, with the best epoch's params |
| `opt/lr` | epoch | learning rate at the epoch's last step |
| `rel_error/max`, `rel_error/<param>` | 0, once | gradient check: worst relative error |
| `rel_error/..._log10` | 0, once | the same as log10 (-11.3), readable in a table cell |
| `rel_error/kinks` | 0, once | coordinates left out of the check because they cross a kink |
| `rel_error/step_<dtype>` | 0, once | the step in its dtype vs the float64 step: worst move error |
| `speed/epoch_s`, `speed/images_per_sec` | epoch | wall time of the epoch's steps |
| `units/layer<k>/dead_frac` | epoch | fraction of units never active (ReLU family) |
| `weights/<param>/norm`, `grad_norm`, `update_ratio` | epoch | cs231n's health numbers |
| `system/*` | sample | MLflow's system metrics (CPU, memory) |
"""

from __future__ import annotations

ACC_TRAIN, ACC_VAL, ACC_GAP = "acc/train", "acc/val", "acc/gap"
LOSS_TRAIN, LOSS_VAL, LOSS_GAP = "loss/train", "loss/val", "loss/gap"
LOSS_BATCH = "loss/batch"
ACC_TEST, LOSS_TEST = "acc/test", "loss/test"
ACC_BEST_VAL, BEST_EPOCH = "acc/best_val", "acc/best_val_epoch"
SUMMARY_STEP = 0  # the step of the numbers a run has once (see the module docstring)
LR = "opt/lr"
EPOCH_TIME, IMAGES_PER_SEC = "speed/epoch_s", "speed/images_per_sec"
GRADCHECK_PREFIX = "rel_error/"
GRADCHECK_MAX = "rel_error/max"
GRADCHECK_KINKS = "rel_error/kinks"
STEP_PRECISION_PREFIX = "rel_error/step_"  # + the dtype that trains: float32
LOG10 = "_log10"  # suffix of a gradient-check error's log10
SYSTEM_PREFIX = "system/"  # MLflow's system metrics: sampled by wall time, not by step

# Tags that sweeps, reports and skipping/resuming read back.
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "mlp.sweep"  # "true" on a sweep's parent run
SWEEP_HASH_TAG = "mlp.sweep.hash"  # the sweep's definition: a re-run reopens the same parent
SWEEP_NAME_TAG = "mlp.sweep.name"  # on the parent and on its children
SWEPT_TAG = "mlp.swept"  # the swept keys; mlp.swept.<key>: their values as written
CONFIG_HASH_TAG = "mlp.config_hash"  # the config without its bookkeeping keys
RECORD_TAG = "mlp.record"  # the receipt: `complete`, or what is missing and where it is kept
RECORD_EXPECTED_TAG = "mlp.record.expected"  # what the store must hold (`receipt.Expected`)

# The training loop's own names for its per-epoch numbers (train.HISTORY_KEYS) -> MLflow.
EPOCH_KEYS = {
    "train_acc": ACC_TRAIN, "val_acc": ACC_VAL, "gap_acc": ACC_GAP,
    "train_loss": LOSS_TRAIN, "val_loss": LOSS_VAL, "gap_loss": LOSS_GAP,
    "lr": LR, "epoch_time": EPOCH_TIME, "images_per_sec": IMAGES_PER_SEC,
}
# The numbers a run has once, at SUMMARY_STEP: its result, then its gradient check.
SUMMARY = (ACC_BEST_VAL, BEST_EPOCH, ACC_TEST, LOSS_TEST)


def is_summary(key: str) -> bool:
    """Whether `key` is one of the numbers a run logs once, at SUMMARY_STEP."""
    return key in SUMMARY or key.startswith(GRADCHECK_PREFIX)

# The training loop's health numbers, `health/<param>/<what>` and `health/layer<k>/dead_frac`,
# go to `weights/...` and `units/...`.
_HEALTH = ("health/", "weights/")
_UNITS = ("health/layer", "units/layer")


def mlflow_key(key: str) -> str:
    """The MLflow key of one of the training loop's per-epoch numbers."""
    if key in EPOCH_KEYS:
        return EPOCH_KEYS[key]
    for old, new in (_UNITS, _HEALTH):
        if key.startswith(old):
            return new + key[len(old):]
    return key


# The order a reviewer reads a run's numbers in (MLflow lists a run's metrics in the order
# their keys were first logged): results, learning curves, then the rest.
READING_ORDER = (ACC_BEST_VAL, ACC_TEST, LOSS_TEST, BEST_EPOCH, "acc/", "loss/", "opt/",
                 GRADCHECK_PREFIX, "speed/", "units/", "weights/")


def reading_order(key: str) -> tuple[int, str]:
    """Sort key: a metric's place in READING_ORDER, then its name."""
    rank = next((i for i, k in enumerate(READING_ORDER)
                 if key == k or (k.endswith("/") and key.startswith(k))), len(READING_ORDER))
    return rank, key
