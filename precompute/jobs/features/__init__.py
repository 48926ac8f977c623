"""SAE-feature job: the neuron job (``precompute/jobs/neurons``) with a stored SAE's features as its
units, one layer, the same accumulator, tables and pages. ``precompute run --jobs features --sae
RUN`` (RUN: the ``train-sae`` run, `precompute runs` lists it) encodes each batch's hook_post of the
SAE's layer and keeps, per feature, what the neuron job keeps per neuron; the rows carry the SAE's
id (``sae_id``), the run's params its ``sae`` entry. Pages: ``/neuron?...&unit=feature``."""

from __future__ import annotations

from dataclasses import replace

from ...sweep import JobSpec
from ..neurons import JOB as NEURONS
from ..neurons import _config as _neurons_config


def _config(args):
    from ...sae.tables import feature_units
    from ...store.db import open_store

    sae_run = getattr(args, "sae", None)
    if sae_run is None:
        raise ValueError("the features job needs --sae RUN: the run of a stored SAE (`precompute train-sae`; "
                         "`precompute runs` lists it as job sae)")
    from ...models import DEFAULT_MODEL, model_name

    with open_store(args.db, create=False).session() as s:
        units = feature_units(s, sae_run)
    units.check_model(model_name(str(getattr(args, "model", None) or DEFAULT_MODEL)))  # before any run row is made
    return replace(_neurons_config(args), layers=None, sae=units)


def _add_args(p) -> None:
    p.add_argument("--sae", type=int, default=None, metavar="RUN",
                   help="features job: the SAE run (`precompute train-sae`) whose features to sweep as units")


JOB = replace(NEURONS, name="features", config=_config, add_args=_add_args, shows={})
