"""The host kept at most two steps ahead of the device while someone watches the steps (issue 33, item 5).

With the UNet step a CUDA graph and a deterministic sampler, nothing in the denoising loop waits for the GPU: the
host queues every step in a few milliseconds, so a progress bar fills at once and a server's cancellation (a step
callback that raises) arrives after the whole run is already queued. With callbacks present the pipeline calls
`StepPacing.step()` after each sampler step: it records an event on the current stream and waits on the one
recorded two steps back, so the host stays two steps ahead (enough to keep the GPU fed, as PyTorch's CUDA
semantics notes recommend for overlapping host and device work) and a callback sees the device's progress to
within two steps. Off CUDA, work is synchronous and this does nothing.
"""

from collections import deque

import torch

LAG = 2  # steps the host may run ahead of the device
EVENTS = {"cuda": torch.cuda.Event}  # device type → what records a point in its current stream


class StepPacing:
    """Per run: `step()` after each step records an event, waiting on the one from `lag` steps back."""

    def __init__(self, device: torch.device, lag: int = LAG):
        self.device = torch.device(device)
        self.new_event = EVENTS.get(self.device.type)
        self.lag, self.events = lag, deque()

    def step(self) -> None:
        if self.new_event is None:
            return
        event = self.new_event()
        if self.device.type == "cuda":  # the run's device's stream (a torchrun rank's cuda:N), not the current device's
            event.record(torch.cuda.current_stream(self.device))
        else:
            event.record()
        self.events.append(event)
        if len(self.events) > self.lag:
            self.events.popleft().synchronize()
