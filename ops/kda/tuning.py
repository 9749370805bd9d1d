"""Tuning of the KDA Triton kernels as data: one frozen :class:`KDATuning`, a module-level current value and
the :func:`kda_tuning` context manager that bench and tests use to try other values.

The defaults are what docs/kda_kernels.md and docs/benchmarks.md measured on an H200 (the numbers behind
each choice are there). Host launchers read :func:`current_tuning` at every launch; nothing else changes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

__all__ = ["KDATuning", "current_tuning", "kda_tuning"]


@dataclasses.dataclass(frozen=True)
class KDATuning:
    # ---- forward
    store_lowp: bool = True       # bf16 inputs: w, u, qg, kg, Aqk stored in bf16 (else float32)
    pass_lowp: bool = True        # bf16 inputs: the pass's dots on bf16 operands (else tf32 on fp32 operands)
    a_lowp: bool = True           # bf16 inputs: Akk / Aqk dots on bf16 operands (else tf32)
    recurrent_max_t: int = 16     # token-loop kernel when T (per sequence) <= this
    span_max: float = 60.0        # largest in-block gate span (nats) for the anchored diagonal path
    intra_warps: int = 4
    intra_bk: int = 32
    intra_maxnreg: Optional[int] = None  # register cap of the intra kernel's fast launch; with prefetch, a cap spills
    intra_prefetch: int = 2       # 1: next key / value block's loads in flight during the current one;
                                  # 2: also the w and u loops' first loads during the inverse / the w loop
    intra_form: str = "tx"        # "tx": the intra kernel stores T, beta and k e^G, the pass forms U;
                                  # "wu": it forms w = T beta k e^G and u = T beta v (the backward's recompute)
    inv_lowp: int = 5             # bf16 inputs, TX form: levels (of 5) of the inverse on bf16 operands (0: tf32)
    intra_slow_group: int = 8     # chunk slots per program of the SLOW relaunch
    intra_slow_min_programs: int = 2048
    pass_bv: int = 32             # value block of the forward pass (128 programs at B=1, H=32)
    pass_warps: int = 4
    pass_stages: int = 3          # next two chunks' loads in flight; fit_stages lowers it where shared memory is smaller
    nonfinite: bool = True        # chunked forward: NaN / inf inputs stay causal and g = -inf is exact (their cost
                                  # on the H200: docs/kda_kernels.md); False: the kernels without the checks
    decode_bv: int = 64
    decode_warps: int = 4
    # ---- backward
    bwd_bk: int = 64              # chunk kernel key / value tiles
    bwd_bv: int = 64
    bwd_warps: int = 8
    bwd_pass_bv: int = 32         # reverse pass
    bwd_pass_warps: int = 8
    bwd_pass_stages: Optional[int] = None  # None: 3 with bf16 intermediates, 1 with float32 ones
    bwd_store_lowp: bool = True   # bf16 inputs: intermediates in bf16, their dots on bf16 operands
    bwd_a_lowp: bool = True
    bwd_pass_lowp: bool = True
    bwd_fpass_bv: int = 32        # the forward pass inside the backward
    bwd_fpass_stages: int = 4
    bwd_fpass_warps: int = 4
    bwd_state_lowp: bool = True   # bf16 inputs: chunk states h, dh' and U, dU stored in bf16 for the chunk kernel


_current = KDATuning()
_FIELDS = frozenset(f.name for f in dataclasses.fields(KDATuning))


def current_tuning() -> KDATuning:
    """The tuning the launchers use now."""
    return _current


@contextlib.contextmanager
def kda_tuning(**overrides) -> Iterator[KDATuning]:
    """``with kda_tuning(pass_bv=64): ...`` runs the block with those fields changed and restores the previous
    tuning afterwards (also on error). An unknown field name raises TypeError naming it."""
    global _current
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise TypeError(f"kda_tuning: unknown KDATuning field(s) {', '.join(unknown)}")
    previous = _current
    _current = dataclasses.replace(previous, **overrides)
    try:
        yield _current
    finally:
        _current = previous
