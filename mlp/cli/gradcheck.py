"""`mlp-gradcheck [overrides]`: the checks of a config's exact training step, alone,
logged as their own run: its gradients against finite differences (float64), and the step
in the dtype it trains in against the float64 step (`build.run_step_precision`)."""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mlp.cli import build, exits
from mlp.cli.train import Job
from mlp.config import schema as configlib
from mlp.tracking import masking, names
from mlp.tracking import recorder as tracking

configlib.register()


def check(cfg: DictConfig) -> bool:
    """The gradient check and the check of the step in its dtype, for a config, logged as
    their own run; True when both pass."""
    try:
        configlib.validate(cfg)
    except ValueError as e:
        exits.config_error(e)
    job = Job.from_hydra()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    client, experiment_id = exits.connect(cfg, job.launch_dir)
    tags = tracking.environment_tags(job.launch_dir, job.overrides, {}) | {
        "mlp.kind": "gradcheck"}
    name = "gradcheck-" + (cfg.tracking.run_name or names.run_name(resolved))
    recorder = tracking.start_run(client, experiment_id, name, tags)
    with recorder.finishing():
        recorder.log_config(resolved, job.overrides, job.output_dir / ".hydra")
        report = build.run_gradcheck(cfg)
        recorder.log_gradcheck(report)
        precision = build.run_step_precision(cfg)
        recorder.log_step_precision(precision)
    print(report)
    print(f"training step in {precision.dtype}: {precision}")
    print(masking.mask(f"MLflow run {recorder.run_id} at {client.tracking_uri}"))
    return report.passed and precision.passed


@hydra.main(version_base="1.3", config_path="pkg://mlp.conf", config_name="gradcheck")
def _gradcheck_app(cfg: DictConfig) -> None:
    if not check(cfg):
        sys.exit(exits.EXIT_GRADCHECK)


def gradcheck_main() -> None:
    """`mlp-gradcheck [overrides]`: exit 0 when both checks pass, 3 when one fails."""
    masking.install()
    exits.check_command_line_or_exit("gradcheck")
    _gradcheck_app()
