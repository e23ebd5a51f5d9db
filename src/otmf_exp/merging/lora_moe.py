"""MINGLE's gated low-rank experts (Qiu et al., "MINGLE: Mixtures of Null-Space Gated Low-Rank Experts
for Test-Time Continual Model Merging", arXiv 2505.11883, NeurIPS 2025): pure maths and forward hooks.

A *site* is one linear map ``y = x·Wᵀ + b`` of the backbone (an ``nn.Linear``, or the q/k/v rows of
an ``nn.MultiheadAttention``'s fused ``in_proj_weight``). After t tasks a site carries
``A [t·r, C]`` and ``B [O, t·r]`` (expert e is ``B_e A_e``, r columns each), a linear gate
``W_g [t, C]``, ``b_g [t]`` and an orthonormal input subspace ``U [C, m]``. With hooks attached, the
site computes ``y = x·W0ᵀ + b0 + Σ_e g_e·(x·A_eᵀ)·B_eᵀ`` with ``g = token-mean(x)·W_gᵀ + b_g`` (no
softmax, no top-k), averaged over the batch too when ``batch_reduce`` (one routing per batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from otmf_exp.models.mha import mha_forward


# ---- maths (tensors in, tensors out) -----------------------------------------------------------
def effective_rank(s: Tensor) -> int:
    """⌊exp(H(p))⌋ with p = s/Σs (singular values ``s`` ≥ 0) and 0·log 0 = 0; 0 for an all-zero ``s``."""
    total = s.double().sum()
    if not total > 0:
        return 0
    p = s.double() / total
    return min(int(math.floor(float(torch.exp(-torch.special.xlogy(p, p).sum())))), len(s))


def project_delta(
    delta: Tensor, previous: Tensor | None, *, zero_diag: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, int]:
    """MINGLE's cleaned task delta ``[O, C]`` and α: with D = ``previous`` = Σ_{e<t} B_e A_e = u s vᵀ,
    P = uᵀΔv gets its top-left α×α block zeroed (α = :func:`effective_rank` of s), and its diagonal
    too with ``zero_diag``; Δ̃ = u P vᵀ. ``previous=None`` (t = 1): Δ̃ = Δ, α = 0.

    The reduced SVD gives the full-SVD result exactly: every zeroed entry lies in the top-left
    min(O, C) block (α ≤ rank D), so Δ̃ = Δ − u_k E v_kᵀ with E those entries of u_kᵀΔv_k.
    """
    if previous is None:
        return delta.clone(), 0
    d, prev = delta.to(dtype), previous.to(dtype)
    u, s, vh = torch.linalg.svd(prev, full_matrices=False)
    a = effective_rank(s)
    p = u.T @ d @ vh.T
    removed = torch.zeros_like(p)
    removed[:a, :a] = p[:a, :a]
    if zero_diag:
        removed.diagonal().copy_(p.diagonal())
    return (d - u @ removed @ vh).to(delta.dtype), a


def low_rank(delta: Tensor, rank: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` truncated SVD of ``delta`` ``[O, C]`` as (A = S_r V_rᵀ ``[r', C]``, B = U_r ``[O, r']``),
    r' = min(rank, O, C)."""
    u, s, vh = torch.linalg.svd(delta.to(dtype), full_matrices=False)
    r = min(rank, len(s))
    return (s[:r, None] * vh[:r]).to(delta.dtype).contiguous(), u[:, :r].to(delta.dtype).contiguous()


def project_gate_grad(g: Tensor, u: Tensor, h: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Soft null-space projection of a gate-row gradient ``g`` ``[n, C]`` against ``u`` ``[C, m]``:
    r_i = mean_rows(|g·u_i| / ‖g_row‖), h ← β·h + (1−β)·r, λ = exp(−γ·h), g ← g − (g·u)·diag(λ)·uᵀ.
    Returns (projected g, new h). γ = 0 is the hard projection (g·u = 0 after)."""
    gu = g @ u
    r = (gu.abs() / (g.norm(dim=1, keepdim=True) + 1e-12)).mean(0)
    h = beta * h + (1.0 - beta) * r
    lam = torch.exp(-gamma * h)
    return g - (gu * lam) @ u.T, h


#: relative residual ‖Σv − λv‖ / λ₁ under which an iterative top-k solution is accepted
SUBSPACE_TOL = 1e-6


def top_subspace(sigma: Tensor, k: int) -> Tensor:
    """The top-``k`` eigenvectors ``[C, k]`` of a symmetric PSD ``sigma`` ``[C, C]``, in float64.

    Only k (= 3) of C (up to 3072) vectors are needed: LOBPCG finds them ~10x faster than a full
    ``eigh`` at ViT width (1.9 s vs 22.9 s for C = 3072 on 2 CPU cores, subspace error 4e-10). A
    solution whose residual is above :data:`SUBSPACE_TOL` (a tiny gap, or too few iterations) is
    replaced by the full ``eigh``, so the result is always the exact top-k subspace to tolerance. LOBPCG
    starts from a fixed draw of its own generator: deterministic, and the global RNG is left alone."""
    if k <= 0:
        return sigma.new_zeros(sigma.shape[0], 0)
    s = sigma.double()
    if 3 * k < s.shape[0]:  # lobpcg needs n >= 3k
        try:
            # a fixed start (not the global RNG): the same Σ gives the same bits, run after run
            x0 = torch.randn(s.shape[0], k, dtype=s.dtype, generator=torch.Generator().manual_seed(0))
            vals, vecs = torch.lobpcg(s, k=k, X=x0.to(s.device), largest=True, niter=200, tol=1e-12)
            residual = (s @ vecs - vecs * vals).norm(dim=0).max() / vals.abs().max().clamp_min(1e-300)
            if float(residual) < SUBSPACE_TOL and torch.isfinite(vecs).all():
                return vecs.to(sigma.dtype)
        except (RuntimeError, ValueError):  # LOBPCG can fail on rank-deficient inputs: use eigh
            pass
    _, vecs = torch.linalg.eigh(s)
    return vecs[:, -k:].flip(-1).to(sigma.dtype)


def grow_subspace(u: Tensor | None, new: Tensor, mode: str = "grow") -> Tensor:
    """``grow``: Q of the reduced QR of [u | new] (at most C columns); ``keep_first``: ``u`` once it
    exists (the T5 code's ``Q[:, :k]``, which spans the first task's directions)."""
    if u is None or u.shape[1] == 0:
        return new.contiguous()
    if mode == "keep_first":
        return u
    q, _ = torch.linalg.qr(torch.cat([u, new], dim=1).double(), mode="reduced")
    return q.to(u.dtype).contiguous()


# ---- sites ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    """One expert site. ``param`` is its mergeable weight (``rows`` a row range of it, for MHA q/k/v);
    ``module`` is the module the hook goes on (the Linear, or the MultiheadAttention for q/k/v)."""

    name: str
    param: str
    module: str
    in_features: int
    out_features: int
    rows: tuple[int, int] | None = None

    def weight(self, sd: Mapping[str, Tensor]) -> Tensor:
        w = sd[self.param]
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]


def find_sites(module: nn.Module, mergeable: set[str], patterns: Sequence[str]) -> list[Site]:
    """Sites whose name contains one of ``patterns`` (the authors' ``lora_layer`` rule): every
    ``nn.Linear`` with a mergeable weight, and an ``nn.MultiheadAttention``'s fused in-projection as
    three virtual linears ``<mha>.q_proj``, ``.k_proj``, ``.v_proj`` (its ``out_proj`` is a Linear)."""
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and f"{name}.in_proj_weight" in mergeable:
            e = mod.embed_dim
            for i, p in enumerate("qkv"):
                site = f"{name}.{p}_proj"
                if any(s in site for s in patterns):
                    out.append(Site(site, f"{name}.in_proj_weight", name, e, e, (i * e, (i + 1) * e)))
        elif (
            isinstance(mod, nn.Linear) and f"{name}.weight" in mergeable and any(s in name for s in patterns)
        ):
            out.append(Site(name, f"{name}.weight", name, mod.in_features, mod.out_features))
    return out


# ---- the gated forward -----------------------------------------------------------------------------------
@dataclass
class Experts:
    """One site's experts and gate rows; ``new_w``/``new_b`` are the rows being trained (appended)."""

    a: Tensor
    b: Tensor
    gate_w: Tensor
    gate_b: Tensor
    new_w: Tensor | None = None
    new_b: Tensor | None = None

    def gates(self) -> tuple[Tensor, Tensor]:
        if self.new_w is None:
            return self.gate_w, self.gate_b
        return torch.cat([self.gate_w, self.new_w]), torch.cat([self.gate_b, self.new_b])

    def delta(self, x: Tensor, batch_reduce: bool) -> Tensor:
        """Σ_e g_e·(x·A_eᵀ)·B_eᵀ for inputs ``x`` ``[B, ..., C]`` (batch first)."""
        w, b = self.gates()
        t = w.shape[0]
        xm = x.mean(dim=tuple(range(1, x.dim() - 1))) if x.dim() > 2 else x
        g = xm @ w.T.to(x.dtype) + b.to(x.dtype)  # [B, t]
        if batch_reduce:
            g = g.mean(0, keepdim=True)
        h = x @ self.a.T.to(x.dtype)  # [B, ..., t·r]
        h = h.unflatten(-1, (t, -1)) * g.view(g.shape[0], *([1] * (x.dim() - 2)), t, 1)
        return h.flatten(-2) @ self.b.T.to(x.dtype)


class CovarianceRecorder:
    """Σ = Σ_tokens x·xᵀ of each site's inputs (float32, on the inputs' device)."""

    def __init__(self) -> None:
        self.sigma: dict[str, Tensor] = {}

    def add(self, name: str, x: Tensor) -> None:
        f = x.detach().reshape(-1, x.shape[-1]).float()
        s = f.T @ f
        self.sigma[name] = s if name not in self.sigma else self.sigma[name] + s


def _site_fn(
    site: Site, experts: Experts, batch_reduce: bool, rec: CovarianceRecorder | None
) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        if rec is not None:
            rec.add(site.name, x)
        return experts.delta(x, batch_reduce)

    return fn


@contextmanager
def attached(
    module: nn.Module,
    sites: Sequence[Site],
    experts: Mapping[str, Experts],
    batch_reduce: bool,
    recorder: CovarianceRecorder | None = None,
) -> Iterator[None]:
    """Within the block, every forward of ``module`` (plain, ``functional_call``, ``generate``) adds the
    experts of ``sites``: forward hooks on Linear sites; MultiheadAttention modules holding a site run
    :func:`otmf_exp.models.mha.mha_forward`, which adds the q/k/v deltas and calls ``out_proj`` as a
    module (PyTorch's own MHA forward reads ``out_proj.weight`` without calling it: no hook would fire)."""
    mods = dict(module.named_modules())
    handles, patched = [], []
    qkv: dict[str, dict[str, Callable[[Tensor], Tensor]]] = {}
    try:
        for site in sites:
            fn = _site_fn(site, experts[site.name], batch_reduce, recorder)
            if site.rows is not None:
                qkv.setdefault(site.module, {})[site.name.rsplit(".", 1)[1][0]] = fn
            else:
                handles.append(mods[site.module].register_forward_hook(_hook(fn)))
        mha_names = set(qkv) | {
            n
            for n, m in mods.items()
            if isinstance(m, nn.MultiheadAttention) and any(s.module.startswith(f"{n}.") for s in sites)
        }
        for n in sorted(mha_names):
            mods[n].forward = partial(mha_forward, mods[n], qkv.get(n, {}))
            patched.append(mods[n])
        yield
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward


def _hook(fn: Callable[[Tensor], Tensor]) -> Callable:
    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out + fn(args[0])

    return hook
