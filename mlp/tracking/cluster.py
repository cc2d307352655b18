"""Where a run ran on a cluster: the tags that link a run to its SLURM job (job id, array
job and task, node, and the job's log files), read from the environment SLURM and submitit
give the job. `sacct` cannot always answer (a cluster without accounting), the run's own
tags always can."""

from __future__ import annotations

import os
from collections.abc import Mapping

# Tag <- the environment variable SLURM sets in every job.
SLURM_VARIABLES = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm.node": "SLURMD_NODENAME",
    "slurm.partition": "SLURM_JOB_PARTITION",
}


def slurm_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The SLURM tags of this process, or of `environ` ({} outside a SLURM job); for this
    process, with the job's stdout and stderr files when submitit started it (submitit's
    `JobEnvironment` reads the process's own environment)."""
    env = os.environ if environ is None else environ
    tags = {tag: env[var] for tag, var in SLURM_VARIABLES.items() if env.get(var)}
    if tags and environ is None and env.get("SUBMITIT_FOLDER"):
        import submitit  # only inside a submitit job, where it is installed and set up

        paths = submitit.JobEnvironment().paths
        tags |= {"slurm.stdout": str(paths.stdout), "slurm.stderr": str(paths.stderr)}
    return tags
