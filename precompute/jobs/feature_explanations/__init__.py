"""The explanation job over a feature run (``precompute/jobs/explanations`` unchanged, reading a
``features`` run instead of a ``neurons`` one): `precompute run --jobs features,feature-explanations
--sae RUN`, or `--jobs feature-explanations` alone for the newest stored feature run."""

from __future__ import annotations

from dataclasses import replace

from ..explanations import JOB as EXPLANATIONS

JOB = replace(EXPLANATIONS, name="feature-explanations", after="features", add_args=None, shows={})
