"""The one declaration of every name a run writes in its ``out_dir`` (README "Outputs").

Everything that touches a run dir derives from this table: the link check before any work
(``files.refuse_links``), ownership, set-aside, restore and cleanup of a rerun
(``runtime/manifest.py``) and the sweep-resume check (``runtime/sweep.py``). A new output file is
added here, once, or no part of the package will write, move or delete it.
"""

from __future__ import annotations

#: the result set: replaced as a whole by a rerun (``config.yaml`` belongs to the metrics beside it);
#: ``merged_model/`` is a directory, the rest are files
RESULT_SET = (
    "config.yaml",
    "steps.jsonl",
    "acc_matrix.csv",
    "metrics.json",
    "merged.safetensors",
    "merged_model",
)
#: written last: its presence means the result set is complete
COMPLETE = "metrics.json"
#: the directories among the result set
DIRS = ("merged_model",)
#: the run's own bookkeeping, kept across reruns (checkpoints are resumable, the log appends)
MANIFEST = ".otmf_manifest.json"
PREVIOUS = ".previous"
LOCK = ".lock"
LOG = "run.log"
CHECKPOINTS = "checkpoints"
STATE = (LOCK, LOG, CHECKPOINTS, MANIFEST, PREVIOUS)
#: every name a run writes, appends or deletes in ``out_dir``: none may be a symbolic link
WRITTEN = (*STATE, *RESULT_SET)
