"""What the benchmark measures: parts, iteration plans, the method configurations and the targets."""

from __future__ import annotations

PARTS = ("step", "flat", "ratio", "opcm", "eval", "e2e", "authors")
#: OPCM SVD precisions compared in the opcm part (float64 = the exact reference)
OPCM_SVD = ("float64", "float32", "auto")
#: joint task-wise AdaMerging runs of the ratio part: the FusionBench implementation (the paper's
#: comparator; the memory target is against it) and our default, which backpropagates per task
JOINT = {
    "joint adamerging (task), 8 tasks, summed backward (FusionBench)": "summed",
    "joint adamerging (task), 8 tasks, per-task backward (default)": "per_task",
}
REF_JOINT = next(iter(JOINT))
#: step-part rows that switch one OTMF memory lever back; the 20-step series skips them unless named
LEVER_ROWS = (
    "otmf (checkpoint_blocks=true)",
    "otmf (eval_batches=4)",
    "otmf (best_masks=replay)",
    "otmf (best_masks=copy)",
    "otmf (student_weights=all)",
    "otmf (checkpoint_blocks=false)",
    "otmf (adam_in_backward=false)",
    "otmf (matmul_precision=medium)",
    "otmf (offload=false)",
)
#: step-part row -> its (info) ratio to joint AdaMerging's peak memory
LEVER_RATIOS = {
    "otmf (tensor masks)": "otmf_tensor_vs_joint_adamerging_memory",
    "otmf (best_masks=copy)": "otmf_copy_vs_joint_adamerging_memory",
    "otmf (student_weights=all)": "otmf_all_weights_vs_joint_adamerging_memory",
    "otmf (checkpoint_blocks=false)": "otmf_no_checkpoint_vs_joint_adamerging_memory",
    "otmf (adam_in_backward=false)": "otmf_adam_after_backward_vs_joint_adamerging_memory",
    "otmf (offload=false)": "otmf_resident_vs_joint_adamerging_memory",
}
#: rows of the authors part: ours (one fusion step, head tuning off) beside the authors' compute_sr_mask
AUTHORS_ROWS = ("otmf", "otmf (offload=false)", "otmf (checkpoint_blocks=true)", "otmf (best_masks=replay)")
#: authors-part rows whose time, peak and step's own memory against the authors' are target rows
AUTHORS_TARGET_ROWS = {"otmf": "otmf_vs_authors"}
LIVE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
TARGETS = {
    "otmf_vs_joint_adamerging_memory": 0.5,
    "flat_step_last_vs_step2": 1.05,
    "otmf_vs_continual_adamerging_time": 1.5,
    "eval_vs_raw_forward": 0.9,
    "default_run_warm_s": 120.0,
    "opcm_vs_fusionbench_time": 1.0,
    "opcm_vs_fusionbench_memory": 1.0,
    "opcm_max_abs_diff_vs_float64": 1e-5,
    "otmf_vs_authors_time": 1.0,
    "otmf_vs_authors_memory": 0.5,
    "otmf_vs_authors_own_memory": 1.0,
}


def plan(quick: bool) -> dict:
    """Iteration counts. Full = the paper's OTMF recipe (100 iterations, batch 16) with AdaMerging at
    equal iterations; quick shrinks iteration counts only (never the architecture or the batch)."""
    it_step = 10 if quick else 100  # part step/ratio: OTMF iterations = AdaMerging steps
    it_flat = 2 if quick else 10  # part flat: memory does not depend on the count (>= 2: both OTMF sides)
    return {
        "iterations_step": it_step,
        "iterations_flat": it_flat,
        "batch_size": 16,
        "eval_images": 128 if quick else 512,
        "eval_batch_size": 64 if quick else 128,
    }


def method_runs(iterations: int) -> dict[str, tuple[str, dict]]:
    """name in the tables -> (method, overrides); OTMF rows with its default (cheap) diagnostics."""
    its = {"iterations": iterations}
    return {
        "averaging": ("averaging", {}),
        "task_arithmetic": ("task_arithmetic", {}),
        "ties": ("ties", {}),
        "magmax": ("magmax", {}),
        "opcm": ("opcm", {}),
        "adamerging (task)": ("adamerging", {"granularity": "task", "steps": iterations}),
        "adamerging (layer)": ("adamerging", {"granularity": "layer", "steps": iterations}),
        "otmf": ("otmf", its),
        "otmf (tensor masks)": (
            "otmf",
            its | {"mask.granularity": "tensor"},
        ),
        # OTMF's levers, one row each forcing the other setting (LEVER_ROWS)
        "otmf (checkpoint_blocks=true)": ("otmf", its | {"checkpoint_blocks": True}),
        "otmf (eval_batches=4)": ("otmf", its | {"eval_batches": 4}),
        "otmf (best_masks=replay)": ("otmf", its | {"best_masks": "replay"}),
        "otmf (best_masks=copy)": (
            "otmf",
            its | {"best_masks": "copy"},
        ),
        "otmf (student_weights=all)": (
            "otmf",
            its | {"student_weights": "all", "checkpoint_blocks": False},
        ),
        "otmf (checkpoint_blocks=false)": (
            "otmf",
            its | {"checkpoint_blocks": False},
        ),
        "otmf (adam_in_backward=false)": (
            "otmf",
            its | {"adam_in_backward": False},
        ),
        # the authors' TF32 setting (scripts/_common.py); a top-level key ("/"), not a method field
        "otmf (matmul_precision=medium)": ("otmf", its | {"/matmul_precision": "medium"}),
        # everything resident (offload=auto offloads on the CPU where $TMPDIR is on a disk)
        "otmf (offload=false)": ("otmf", its | {"offload": False}),
        # the authors' 50 adaptation steps at most (memory does not depend on the count)
        "mingle": ("mingle", {"max_steps": min(iterations, 50)}),
        # the methods added for the compared tables (issue 22 / 28); learned loops at equal iterations
        "dop": ("dop", {"steps": iterations}),
        "consensus": ("consensus", {}),
        "wemoe": ("wemoe", {"max_steps": min(iterations, 50)}),
        "continual_finetune": ("continual_finetune", {"steps": iterations}),
        "c_adamerging": (
            "adamerging",
            {"continual": "current_only", "granularity": "layer", "steps": iterations},
        ),
    }
