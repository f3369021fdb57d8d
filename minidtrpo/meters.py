"""What an update costs: seconds, rows through the model, activation memory, process memory.

`SavedBytes` counts the bytes autograd saves for backward through
`torch.autograd.graph.saved_tensors_hooks`, so it works on any device: a proxy for activation memory
(docs/math.md §6 P7), not a measurement of it. A tensor saved by two operations counts twice, saved
parameters count, and what autograd does not save (forward temporaries, gradients, the allocator's
slack) does not; it grows with what a graph keeps alive for backward, which is what P7 compares.
`Meters` adds forward rows (a forward pre-hook), the process's peak RSS and, on CUDA, the peak
allocation. Used by the online and offline updates, the estimator report and bench/.
"""

import sys
import time

import torch


def elapsed(t0, device) -> float:
    """Seconds since t0 (time.perf_counter()), after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
    return time.perf_counter() - t0


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, alive now and at peak: a proxy for
    activation memory (module docstring).

        with SavedBytes() as meter:
            loss = model(x).sum()  # the forward is where autograd saves tensors
            loss.backward()        # ... and backward frees them
        meter.peak  # bytes

    A tensor stops counting when autograd drops it (after its backward, or with its graph).
    """

    def __init__(self):
        self.alive = self.peak = 0

    def __enter__(self):
        pack, unpack = (lambda t: _Held(t, self)), (lambda held: held.t)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    def __init__(self, t, meter):
        self.t, self.meter, self.nbytes = t, meter, t.numel() * t.element_size()
        meter.alive += self.nbytes
        meter.peak = max(meter.peak, meter.alive)

    def __del__(self):
        self.meter.alive -= self.nbytes


class Meters:
    """Cost of an update: forward rows of `models`, saved bytes, peak RSS, peak CUDA allocation."""

    def __init__(self, device, *models):
        self.device, self.models, self.rows = device, models, 0

    def _count(self, module, args, kwargs):
        self.rows += (args[0] if args else kwargs["tokens"]).shape[0]

    def __enter__(self):
        self.hooks = [m.register_forward_pre_hook(self._count, with_kwargs=True)
                      for m in self.models]
        self.saved = SavedBytes().__enter__()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.saved.__exit__(*exc)
        for h in self.hooks:
            h.remove()

    def summary(self, responses: int) -> dict:
        out = {"passes_per_response": self.rows / max(responses, 1),
               "peak_saved_mb": self.saved.peak / 2**20}
        try:
            import resource  # Unix only; ru_maxrss is in bytes on macOS, in KiB elsewhere
            unit = 1 if sys.platform == "darwin" else 1024
            out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20
        except ImportError:
            pass
        if self.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out
