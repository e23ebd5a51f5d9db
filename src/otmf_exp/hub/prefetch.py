"""List, check or download every hub id a configuration needs, for offline use later.

    python -m otmf_exp.hub.prefetch task_seq=vit8                       # list the ids (B/32 + TA8)
    python -m otmf_exp.hub.prefetch task_seq=vit20 backbone=clip_vit_l14 --download
    python -m otmf_exp.hub.prefetch task_seq=glue8 backbone.variant=lora --download --local-dir /data/hub
    python -m otmf_exp.hub.prefetch task_seq=vit8 --check               # do the ids exist on the hub?
    python -m otmf_exp.hub.prefetch experiment=paper/continual_vision --download   # a whole sweep

A sweep (a preset's ``hydra.sweeper.params`` and/or ``a=x,y`` overrides, expanded as ``otmf_exp.run -m``
would: ``runtime.sweep.plan_jobs``) is read whole: the ids of every job, each listed or fetched once.

``--download`` fills the HF cache (``HF_HOME``; datasets are loaded once so ``datasets`` caches
them), or with ``--local-dir DIR`` writes ``DIR/<id>`` for ``backbone.local_dir=DIR`` /
``task_seq.local_dir=DIR``. open_clip fine-tuned encoders are local files (``checkpoint_dir``)
and are not listed. Arguments without ``--`` are Hydra overrides, as for ``otmf_exp.run``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from otmf_exp.errors import EXIT_USER_ERROR, UserError

#: (repo type, id, dataset config or None, splits to load for the datasets cache)
Ref = tuple[str, str, str | None, tuple[str, ...]]


def required_ids(backbone: Any, task_seq: Any, tasks: list[str] | None = None) -> list[Ref]:
    """Every hub repository a run of ``tasks`` (default: all of ``task_seq``) reads."""
    tasks = list(tasks or task_seq.tasks)
    out: list[Ref] = []
    if backbone.kind in ("hf_clip", "hf_t5"):
        out.append(("model", backbone.model_id, None, ()))
        pattern = backbone.finetuned
        if backbone.kind == "hf_t5" and backbone.variant == "lora":
            pattern = backbone.finetuned_lora
        out += [("model", pattern.format(task=t), None, ()) for t in tasks]
    elif backbone.kind == "open_clip":
        repo = backbone.model_id
        if not repo and backbone.pretrained_tag:
            import open_clip

            hub = open_clip.get_pretrained_cfg(backbone.arch, backbone.pretrained_tag).get("hf_hub", "")
            repo = hub.rstrip("/") if hub.endswith("/") else hub.rsplit("/", 1)[0]
        if repo:
            out.append(("model", repo, None, ()))
    if task_seq.kind == "hf_vision":
        from otmf_exp.data.vision_tasks import VISION_TASKS

        for t in tasks:
            s = VISION_TASKS[t]
            out.append(("dataset", s.dataset, s.config, (s.test_split, s.train_split)))
    elif task_seq.kind == "glue":
        from otmf_exp.data.glue import GLUE_DATASET, PROMPTS

        out += [("dataset", GLUE_DATASET, t, (PROMPTS[t].test_split, "train")) for t in tasks]
    return out


#: override keys that cannot change the ids of a job (``required_ids`` reads backbone, task_seq and
#: task_order only): jobs differing only in these are composed once
NO_IDS = ("method", "seed", "order_seed", "protocol")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0]


def sweep_ids(overrides: list[str]) -> tuple[int, list[Ref]]:
    """(number of jobs, the distinct ids of all of them) of ``python -m otmf_exp.run -m <overrides>``
    (one job when nothing is swept); a dataset read by several jobs keeps the union of their splits."""
    from hydra import compose, initialize_config_module

    from otmf_exp.runtime.sweep import plan_jobs

    jobs = plan_jobs(overrides)
    distinct = dict.fromkeys(tuple(o for o in job if _key(o) not in NO_IDS) for job in jobs)
    refs: dict[tuple[str, str, str | None], tuple[str, ...]] = {}
    with initialize_config_module(config_module="otmf_exp.conf", version_base="1.3"):
        for job in distinct:
            cfg = compose(config_name="run", overrides=list(job))
            order = cfg.task_order if not isinstance(cfg.task_order, str) else None
            for kind, rid, config, splits in required_ids(
                cfg.backbone, cfg.task_seq, list(order) if order else None
            ):
                old = refs.get((kind, rid, config), ())
                refs[(kind, rid, config)] = tuple(dict.fromkeys(old + splits))
    return len(jobs), [(k, r, c, sp) for (k, r, c), sp in refs.items()]


def _need_hub(what: str) -> None:
    """``--download`` / ``--check`` offline: one line before any request (no hub timeouts)."""
    from otmf_exp.hub.resolve import hub_offline

    if hub_offline():
        raise UserError(
            f"{what} needs the hub, which is off here (HF_HUB_OFFLINE=1, or it did not answer): run it "
            "on a machine with the hub, then copy the HF cache (HF_HOME) or the --local-dir over"
        )


def _check(refs: list[Ref]) -> int:
    from huggingface_hub import HfApi

    api, bad = HfApi(), 0
    for kind, rid in dict.fromkeys((k, r) for k, r, _, _ in refs):
        try:
            (api.model_info if kind == "model" else api.dataset_info)(rid)
            print(f"ok       {kind:8s} {rid}")
        except Exception as e:  # report every failure, then exit non-zero
            bad += 1
            print(f"MISSING  {kind:8s} {rid}  ({type(e).__name__})")
    return 1 if bad else 0


def _download(refs: list[Ref], local_dir: str | None) -> None:
    from pathlib import Path

    from huggingface_hub import snapshot_download

    from otmf_exp.hub.resolve import _META

    for kind, rid, config, splits in refs:
        target = str(Path(local_dir) / rid) if local_dir else None
        if kind == "model":  # safetensors when the repo has them, else the *.bin weights
            path = snapshot_download(rid, allow_patterns=_META + ["*.safetensors"], local_dir=target)
            if not any(Path(path).glob("*.safetensors")):
                snapshot_download(rid, allow_patterns=_META + ["*.bin"], local_dir=target)
        elif local_dir:
            snapshot_download(rid, repo_type="dataset", local_dir=target)
        else:
            import datasets

            for split in dict.fromkeys(splits):
                datasets.load_dataset(rid, config, split=split)
        print(f"fetched  {kind:8s} {rid}{'/' + config if config else ''}")


def main(argv: list[str] | None = None) -> int:
    """The CLI, through the shared wrapper (otmf_exp.errors.cli_main): a bad override, an
    unwritable ``--local-dir`` or a hub failure is one ``error:`` line, Ctrl-C exit 130."""
    from otmf_exp.errors import cli_main

    return cli_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="List / check / download the hub ids of a configuration.")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task_seq=vit8 backbone=clip_vit_b16")
    ap.add_argument("--download", action="store_true")
    ap.add_argument("--check", action="store_true", help="query the hub for every id (needs the network)")
    ap.add_argument(
        "--dry-run", action="store_true", help="only list the ids (the default without --download/--check)"
    )
    ap.add_argument("--local-dir", default=None, help="write DIR/<id> instead of the HF cache")
    args = ap.parse_args(argv)

    from otmf_exp.config import register_configs

    register_configs()
    n_jobs, refs = sweep_ids(args.overrides)
    if n_jobs > 1:
        print(f"{n_jobs} jobs, {len(refs)} distinct ids", file=sys.stderr)
    if args.check and not args.dry_run:
        _need_hub("--check")
        return _check(refs)
    if args.download and not args.dry_run:
        _need_hub("--download")
        _download(refs, args.local_dir)
        return 0
    for kind, rid, config, _ in refs:
        print(f"{kind:8s} {rid}" + (f"  (config {config})" if config else ""))
    return 0 if refs else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
