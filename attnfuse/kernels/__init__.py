"""The kernels ``attnfuse.attend`` runs a call on, one module a family, tried in the registry's order.

A kernel is a ``Kernel`` (``name``, ``refuses(call)``, ``run(call)``) over one ``AttentionCall``; a new
kernel is a module and one ``register`` line below.
"""
from attnfuse.kernels.call import AttentionCall, CallFacts, Inexact, Kernel, KernelFailed
from attnfuse.kernels.registry import kernels, register, unregister
from attnfuse.kernels.flex import FlexKernel
from attnfuse.kernels.sdpa import SdpaKernel
from attnfuse.kernels.unfused import UnfusedKernel

register(FlexKernel())
register(SdpaKernel())
register(UnfusedKernel())

__all__ = ["AttentionCall", "CallFacts", "Inexact", "Kernel", "KernelFailed", "kernels", "register", "unregister"]
