"""soho_scale: SOHO vision-language pre-training from pixels, at cluster scale."""

__version__ = "0.1.0"

# A run stopped by a signal after committing a checkpoint exits with this (EX_TEMPFAIL): the
# launchers, Slurm scripts and Kubernetes Jobs relaunch on it, and the relaunch resumes.
PREEMPTED_EXIT_CODE = 75
