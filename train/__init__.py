"""The PoD pipeline job (Hydra): ``python train/run.py [conf=<preset>] [key=value ...]``.

One module per stage — :mod:`train.base`, :mod:`train.analyze`, :mod:`train.convert`,
:mod:`train.adapt`, :mod:`train.evaluate`, :mod:`train.export` — each with a function
``run_<stage>(cfg, paths) -> outputs``; :mod:`train.config` holds the typed config schema,
:mod:`train.common` the run folder and stage markers, :mod:`train.rows` corpus access, and
:mod:`train.run` the entry point. Used from the checkout (not installed); see docs/pipeline.md.
"""

from train.common import STAGES, PipelineError, RunPaths, StageInterrupted

__all__ = ["STAGES", "PipelineError", "RunPaths", "StageInterrupted"]
