"""One attention call as every kernel reads it, and the small interface a kernel implements.

A kernel has a ``name``, says why it ``refuses`` a call (a sentence a person can read, or None) and
``run``s the calls it does not refuse. ``attend`` builds one ``AttentionCall`` and runs it on the first
registered kernel (``attnfuse.kernels.registry``) that does not refuse it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from attnfuse.kernels.rows import BiasRows, Triangle, bias_rows
from attnfuse.masking import combined_keep


class Inexact(str):
    """A refusal or failure because the kernel's result would differ from the original's (a rounded
    bias, a masked key's NaN leaking in); the unfused fallback names it in the audit."""


class KernelFailed(Exception):
    """Raised by ``Kernel.run`` when the call turned out, on running, not to be this kernel's (a compile
    failure, a leaked NaN): ``attend`` then runs the next kernel that does not refuse it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class CallFacts:
    """What is learned about one call while it runs, each fact computed at most once: the kernels that
    refused it so far (``(kernel, reason)`` pairs), whether its bias masks a whole row, the call with
    its score function folded into the bias (SDPA's form, which the kernels after SDPA and the rows'
    write-back then read, so that they add the same sum), and the rows without keys (with the combined
    keep-mask) where the SDPA kernel computed them; ``bias_rows`` what one read of the bias ``bias_rows_of`` told
    (``rows.BiasRows``; a folded call adds another bias), and ``far_rows`` the rows below the kernels' range that a
    fused kernel's check let through, to be written back. ``launch``: set by a kernel whose every decision for the
    call came from its shapes, strides, dtypes and flags (no mask, bias or rows to read or fix), the launch
    ``launch(q, k, v, scale)`` that computes any call of the same signature (``attend`` repeats it)."""

    refusals: tuple[tuple[str, str], ...] = ()
    folded: Optional["AttentionCall"] = None
    full_keep: Optional[torch.Tensor] = None
    dead: Optional[torch.Tensor] = None
    dead_known: bool = False
    bias_rows: Optional[BiasRows] = None
    bias_rows_of: Optional[torch.Tensor] = None
    far_rows: Optional[torch.Tensor] = None
    launch: Optional[Callable[..., torch.Tensor]] = None


@dataclass(frozen=True, init=False)
class AttentionCall:
    """``softmax(mods(scale * q k^T) + bias, masked) @ v`` for one call of ``attend``.

    ``q`` is ``(B, H, L, E)``; ``k`` and ``v`` are 4-d with q's batch and ``Hk`` heads dividing ``H``.
    ``keep`` is boolean; ``bias`` is already in the dtype it is added in (``precision.bias_dtype``);
    ``scale`` is the user's (None: ``1 / sqrt(E)``, which SDPA computes itself), ``scale_value`` the
    number. ``allowed`` is the user's kernel restriction.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    causal: Optional[str]
    window: Optional[int]
    softcap: Optional[float]
    bias_fn: Optional[Callable[[tuple], torch.Tensor]]
    scale: Optional[float]
    scale_value: float
    dropout_p: float
    fully_masked_rows: str
    needs_grad: bool
    allowed: Optional[tuple[str, ...]]
    autotune: bool
    on_kernel: Optional[Callable[[str], None]] = field(compare=False)
    facts: CallFacts = field(compare=False, repr=False)  # a fresh ``CallFacts()`` per call
    bias_fill: Optional[float] = None  # the bias holds only 0 and this fill, within the kernels' range (``attend``)

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], causal: Optional[str], window: Optional[int], softcap: Optional[float],
                 bias_fn: Optional[Callable[[tuple], torch.Tensor]], scale: Optional[float], scale_value: float,
                 dropout_p: float, fully_masked_rows: str, needs_grad: bool, allowed: Optional[tuple[str, ...]],
                 autotune: bool, on_kernel: Optional[Callable[[str], None]], facts: CallFacts,
                 bias_fill: Optional[float] = None) -> None:
        # the fields set in one step: a frozen dataclass's generated ``__init__`` sets each through
        # ``object.__setattr__``, a cost every fused call pays (``docs/benchmarks.md``, session 6)
        self.__dict__.update(q=q, k=k, v=v, keep=keep, bias=bias, causal=causal, window=window, softcap=softcap,
                             bias_fn=bias_fn, scale=scale, scale_value=scale_value, dropout_p=dropout_p,
                             fully_masked_rows=fully_masked_rows, needs_grad=needs_grad, allowed=allowed,
                             autotune=autotune, on_kernel=on_kernel, facts=facts, bias_fill=bias_fill)

    def with_positive_scale(self) -> "AttentionCall":
        """The same call with a negative scale folded into q (``-q``, a pass over q): fused kernels track
        the running maximum of the unscaled scores, and ``-q`` with ``|scale|`` is exact."""
        value = self.scale_value
        return self if value >= 0 else replace(self, q=-self.q, scale=-value, scale_value=-value)

    def bias_rows(self, triangle: Optional[Triangle] = None) -> BiasRows:
        """``rows.bias_rows`` of the call's bias: its rows below the kernels' range, its ``-inf`` rows and whether it
        masks a whole row, from one host read per call (remembered for this bias; a folded call reads its own);
        compared with ``triangle`` too in the same read where the bias is read here first."""
        if self.facts.bias_rows_of is not self.bias:
            L, S = self.q.shape[-2], self.k.shape[-2]
            whole = self.facts.full_keep if self.facts.full_keep is not None else \
                combined_keep(self.keep, self.causal, L, S, self.q.device, self.window)
            mode = self.fully_masked_rows
            self.facts.bias_rows = bias_rows(self.bias, whole, self.dropout_p, mode == "nan",
                                             zeroed=mode == "zero" and self.keep is not None, triangle=triangle)
            self.facts.bias_rows_of = self.bias
        return self.facts.bias_rows

    def announce(self, kernel: str) -> None:
        """Tell ``on_kernel`` the kernel that runs; an ``on_kernel`` with a ``refused`` method first gets
        the ``(kernel, reason)`` pairs of the kernels that refused or failed this call."""
        if self.on_kernel is None:
            return
        refused = getattr(self.on_kernel, "refused", None)
        if refused is not None:
            refused(self.facts.refusals)
        self.on_kernel(kernel)


def refused_by_fused_kernels(call: AttentionCall) -> Optional[str]:
    """Why no fused kernel computes ``call`` as the original did, or None."""
    if call.k.shape[-2] == 0:
        return "no key: the original sums over none and gives 0"
    if call.scale_value == 0:
        return "scale 0: every score is 0, nothing to fuse"
    if call.bias is None:
        return None
    rows = call.bias_rows()
    if call.needs_grad and rows.masks_a_row:
        return "a bias masks every key of a row: a fused backward gives that row's gradients S times too large"
    if not rows.exact:
        return Inexact("a bias row beyond the kernels' range")
    if call.facts.far_rows is None:  # the first check's rows are written back (``rows.restore_rows``)
        call.facts.far_rows = rows.far
    return None


def index_grid(B: int, H: int, L: int, S: int, device: torch.device) -> tuple:
    """Broadcastable ``(b, h, i, j)`` index tensors over the scores ``(B, H, L, S)``."""
    return tuple(torch.arange(n, device=device).view([-1 if d == axis else 1 for d in range(4)])
                 for axis, n in enumerate((B, H, L, S)))


class Kernel:
    """A kernel family ``attend`` can run a call on: register an instance (``registry.register``)."""

    name: str = ""
    choices: tuple[str, ...] = ()  # the names a user may force it by (``attend(kernels=...)``)
    # whether it refuses a call without mask, bias or score function from the call's metadata alone, so that a later
    # call of the same signature is refused too (``attend`` may then repeat the launch of a kernel after it)
    refuses_by_metadata: bool = False

    def refuses(self, call: AttentionCall) -> Optional[str]:
        """Why this kernel cannot compute ``call`` as the original did, or None if it can."""
        return None

    def run(self, call: AttentionCall) -> torch.Tensor:
        """The output ``(B, H, L, Ev)`` of a call ``refuses`` let through; announces the kernel that
        runs (``call.announce``); raises ``KernelFailed`` for a call found, on running, not to be its.
        A kernel that rewrites the call for the kernels after it leaves the new form in ``call.facts.folded``."""
        raise NotImplementedError
