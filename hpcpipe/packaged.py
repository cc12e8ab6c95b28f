"""The files hpcpipe ships: sbatch templates, default configs and the jobs' entry modules.

In the source tree they are the top-level ``sbatch/``, ``configs/`` and ``jobs/`` folders, where a
person reads and edits them; an installed wheel carries them as the packages ``hpcpipe.sbatch``,
``hpcpipe.configs`` and ``hpcpipe.jobs`` (setup.cfg maps one onto the other). They are always found
through the installed package, never through a path relative to this file, so hpcpipe works from
any folder. A site can use its own templates with ``slurm.templates``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hpcpipe.errors import ConfigError

#: The module each step's job runs (``python -m hpcpipe.jobs.<step>``).
JOBS_PACKAGE = "hpcpipe.jobs"


def default_config(local: bool) -> Path:
    """The shipped default config: ``local.yaml`` for this machine, ``default.yaml`` for a cluster."""
    path = Path(str(resources.files("hpcpipe.configs") / ("local.yaml" if local else "default.yaml")))
    if not path.is_file():
        raise ConfigError(f"the installed hpcpipe has no {path.name} at {path}; reinstall it "
                          "(pip install .) or pass --config FILE")
    return path


def template(step: str, folder: str | None = None) -> tuple[str, str]:
    """The sbatch template of ``step`` as (text, where it came from).

    ``folder`` is a site's own template folder (``slurm.templates``); None means the shipped one.
    """
    if folder:
        path = Path(folder).expanduser() / f"{step}.sbatch"
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError(
                f"slurm.templates: cannot read the {step} template {path} ({exc.strerror}); the "
                f"folder needs one <step>.sbatch per step (copy them from `{shipped_templates()}`)"
            ) from None
    res = resources.files("hpcpipe.sbatch") / f"{step}.sbatch"
    return res.read_text(encoding="utf-8"), f"hpcpipe.sbatch/{step}.sbatch"


def shipped_templates() -> Path:
    """The folder of the shipped templates, to copy as the start of a site's own."""
    return Path(str(resources.files("hpcpipe.sbatch")))
