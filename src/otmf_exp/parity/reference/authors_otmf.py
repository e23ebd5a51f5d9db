"""The reference side of the OTMF rows of ``make parity-authors``: the OTMF authors' mask training,
``compute_sr_mask`` (``src/tasks/shortest_route_mask.py``), driven by their own
``Program.Shortest_Route_Fusion`` (``scripts/clip_optimal_transport_route.py``: α 0.8, masks drawn and
then reset to 1 inside ``compute_sr_mask``, lr 0.01, 100 iterations, the next step's pre task vector
``merged − θ₀``), fed our recorded batches.

It runs in a child process (``python -m otmf_exp.parity.reference.authors_otmf NAME ZOO WORK``, through
:func:`otmf_exp.parity.reference.authors_adamerging._child`) with the clone and its ``scripts/`` first on
``sys.path``: the script imports its ``src`` package and the loop's globals are patched there. Replaced,
as plumbing only: the data (each step's loaders serve the batches our side drew for that step, from
``WORK/case.pt``), the models (the zoo's towers in their ``ImageEncoder``'s place, their task vectors
built as the AdaMerging rows build them), the head tuning ``compute_sr_classification_heads_single``
(returns the head unchanged: it reads the merged weights and never changes them; heads are not
compared), and on CPU their in-place ``RouteMergedModel.merge_weights`` gets a copy of θ₀ first
(``.to(device)`` copies on their GPU, not on CPU, where their ``+=`` would write into θ₀ every
iteration). Recorded: each step's result, the masks it selected (their dicts, restored to the best
iteration's), the Sinkhorn loss of every iteration (their ``geomloss.SamplesLoss`` call, wrapped) and
the batches each step consumed.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from otmf_exp.parity.reference.authors_adamerging import CopiesPretrainedOnMerge, _child, _setup, child_main
from otmf_exp.parity.reference.zoo import Zoo

ALPHA = 0.8  # their Program.mask_alpha
_CACHE: dict[str, dict[str, Tensor]] = {}  # one run of theirs per case.pt serves both float32 rows


def named(r: dict[str, Any], part: str) -> dict[str, Tensor]:
    """The compared tensors of a run (ours or theirs, one layout): ``weights`` (``weights/<t>/<key>``:
    θ₀ + τᵐ_t, ``batch/<t>/<side>/<j>``: the batches step t's loop consumed), ``masks``
    (``mask/<t>/<side>/<key>``: the selected masks, ``loss/<t>``: the OT loss of every iteration,
    ``select/<t>``: the selected iteration, the first with the lowest loss) or ``all``. ``r`` holds per
    fusion step t: ``weights[t]``, ``consumed[t][side]`` and ``fused[t]`` (``masks``, ``losses``)."""
    out: dict[str, Tensor] = {}
    for t in sorted(r["fused"]):
        f = r["fused"][t]
        if part in ("weights", "all"):
            out.update({f"weights/{t}/{k}": v for k, v in r["weights"][t].items()})
            for side, batches in r["consumed"][t].items():
                out.update({f"batch/{t}/{side}/{j:03d}": x for j, x in enumerate(batches)})
        if part in ("masks", "all"):
            for side in ("pre", "post"):
                out.update({f"mask/{t}/{side}/{k}": v for k, v in f["masks"][side].items()})
            losses = torch.tensor(f["losses"], dtype=torch.float64)
            out[f"loss/{t}"] = losses
            out[f"select/{t}"] = torch.tensor([float(losses.argmin())], dtype=torch.float64)
    return out


def _run(name: str, zoo_dir: Path, work_dir: Path, part: str) -> dict[str, Tensor]:
    key = hashlib.sha256((work_dir / "case.pt").read_bytes()).hexdigest() + name
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _child(name, zoo_dir, work_dir, module=__name__, repo="OTMF_REPO")
    prefixes = {"weights": ("weights/", "batch/"), "masks": ("mask/", "loss/", "select/"), "all": ("",)}
    return {k: v for k, v in _CACHE[key].items() if k.startswith(prefixes[part])}


def otmf_sr(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run("otmf_sr", zoo_dir, work_dir, "weights")


def otmf_sr_masks(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run("otmf_sr", zoo_dir, work_dir, "masks")


def otmf_sr_f64(zoo_dir: Path, work_dir: Path) -> dict[str, Tensor]:
    return _run("otmf_sr_f64", zoo_dir, work_dir, "all")


class _Served:
    """A loader serving ``batches`` as ``(images, labels)``, each one logged as it is drawn."""

    def __init__(self, batches: list[Tensor], log: list[Tensor]) -> None:
        self.batches, self.log = batches, log

    def __iter__(self):
        for x in self.batches:
            self.log.append(x)
            yield x, torch.zeros(len(x), dtype=torch.long)


def _route(zoo: Zoo, case: dict) -> dict[str, Tensor]:
    import clip_optimal_transport_route as script

    srm = sys.modules["src.tasks.shortest_route_mask"]  # compute_sr_mask's globals

    class CopyingRouteMergedModel(CopiesPretrainedOnMerge, srm.RouteMergedModel):
        """Their class, θ₀ copied before the in-place merge (see the module's docstring)."""

    losses: list[float] = []
    geomloss = srm.geomloss

    def samples_loss(**kw):
        fn = geomloss.SamplesLoss(**kw)

        def recorded(x, y):
            loss = fn(x, y)
            losses.append(float(loss.detach()))
            return loss

        return recorded

    order, pre, tvs, heads = _setup(zoo, case)
    plans, ours = case["plans"], case["mergeable"]
    steps: list[dict[str, Any]] = []
    real = srm.compute_sr_mask

    def compute_sr_mask(**kw):  # the script passes every argument by name
        t = len(steps) + 2  # their step i fuses datasets[i], datasets[i + 1]: our step t = i + 2
        consumed: dict[str, list[Tensor]] = {"pre": [], "post": []}
        kw["pre_task_dataloader"] = _Served(plans[t]["pre"], consumed["pre"])
        kw["post_task_dataloader"] = _Served(plans[t]["post"], consumed["post"])
        losses.clear()
        merged = real(**kw)
        masks = {
            s: {k: kw[f"masks_{s}"][f"model.{k}"].detach().clone() for k in ours} for s in ("pre", "post")
        }
        steps.append(dict(merged=merged, masks=masks, losses=list(losses), consumed=consumed))
        return merged

    srm.RouteMergedModel = CopyingRouteMergedModel
    srm.geomloss = types.SimpleNamespace(SamplesLoss=samples_loss)
    script.compute_sr_mask = compute_sr_mask
    script.compute_sr_classification_heads_single = lambda **kw: kw["classification_head_pre"]
    prog = object.__new__(script.Program)
    prog.cfg = types.SimpleNamespace(datasets=order)
    prog.device, prog.mask_alpha = torch.device("cpu"), ALPHA
    prog.pretrained_model, prog.task_vectors, prog.classification_heads = pre, tvs, heads
    prog.shuffled_test_loader_iters = {n: None for n in order}  # each step's loaders: compute_sr_mask above
    tmp = Path(tempfile.mkdtemp())
    prog.ckpt_dir, prog.ckpt_path = tmp, tmp / "ckpt.pt"
    prog.Shortest_Route_Fusion()  # a child process: nothing to restore
    r: dict[str, Any] = {"weights": {}, "consumed": {}, "fused": {}}
    for t, s in enumerate(steps, start=2):
        r["weights"][t] = {k: s["merged"][f"model.{k}"] for k in ours}
        r["consumed"][t] = s["consumed"]
        r["fused"][t] = {"masks": s["masks"], "losses": s["losses"]}
    return named(r, "all")


def main(argv: list[str]) -> int:
    """The child process: ``NAME ZOO WORK`` → ``WORK/theirs.child.safetensors``."""
    run = lambda zoo, case, dtype: _route(zoo, case)  # noqa: E731
    return child_main(argv, {"otmf_sr": (run, torch.float32), "otmf_sr_f64": (run, torch.float64)})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
