"""Imported by Python at start-up in every process that has this folder on PYTHONPATH: installs
the kill points of `kill_hook` in the training rank the SOHO_KILL_* variables name."""

from kill_hook import install_from_env

install_from_env()
