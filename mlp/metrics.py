"""The metric contract: every key a run logs to MLflow, in one place.

The MLflow UI groups a run's charts into sections by the part of the key before `/` and
shows train and validation of one quantity side by side inside a section, so the names
are chosen from the reviewer's side: learning curves first (`acc/*`, `loss/*`), then the
gradient check, the training-health numbers and the machine.

| key | step | meaning |
| --- | --- | --- |
| `acc/train`, `acc/val` | epoch | accuracy on the fixed train subset / on validation |
| `acc/gap` | epoch | acc/train - acc/val (the overfitting gap) |
| `loss/train`, `loss/val` | epoch | mean data loss on the same images |
| `loss/gap` | epoch | loss/val - loss/train |
| `loss/batch` | global step | training loss (data + L2) of one minibatch |
| `acc/test`, `loss/test` | best epoch | the test split, once, with the best epoch's params |
| `acc/best_val`, `best_epoch` | best epoch | the best validation accuracy and its epoch |
| `opt/lr` | epoch | learning rate at the epoch's last step |
| `speed/epoch_s`, `speed/images_per_sec` | epoch | wall time of the epoch's steps |
| `gradcheck/max_rel_error`, `gradcheck/<param>` | 0 | worst relative error (total loss) |
| `gradcheck/..._log10` | 0 | the same as log10, readable in charts at 1e-12 |
| `gradcheck/kinks` | 0 | coordinates left out because they cross a kink |
| `health/<param>/norm`, `grad_norm`, `update_ratio` | epoch | cs231n's health numbers |
| `health/layer<k>/dead_frac` | epoch | fraction of units never active (ReLU family) |
| `system/*` | sample | MLflow's system metrics (CPU, memory) |
"""

from __future__ import annotations

ACC_TRAIN, ACC_VAL, ACC_GAP = "acc/train", "acc/val", "acc/gap"
LOSS_TRAIN, LOSS_VAL, LOSS_GAP = "loss/train", "loss/val", "loss/gap"
LOSS_BATCH = "loss/batch"
ACC_TEST, LOSS_TEST = "acc/test", "loss/test"
ACC_BEST_VAL, BEST_EPOCH = "acc/best_val", "best_epoch"
LR = "opt/lr"
EPOCH_TIME, IMAGES_PER_SEC = "speed/epoch_s", "speed/images_per_sec"
GRADCHECK_MAX = "gradcheck/max_rel_error"
GRADCHECK_KINKS = "gradcheck/kinks"
GRADCHECK_PREFIX = "gradcheck/"
HEALTH_PREFIX = "health/"

# The training loop's own names for its per-epoch numbers (train.HISTORY_KEYS) -> MLflow.
EPOCH_KEYS = {
    "train_acc": ACC_TRAIN, "val_acc": ACC_VAL, "gap_acc": ACC_GAP,
    "train_loss": LOSS_TRAIN, "val_loss": LOSS_VAL, "gap_loss": LOSS_GAP,
    "lr": LR, "epoch_time": EPOCH_TIME, "images_per_sec": IMAGES_PER_SEC,
}
