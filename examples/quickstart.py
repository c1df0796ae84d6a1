"""Quick start: make X3D-S continual, stream frames through it, compare with the clip model.

Run:  python examples/quickstart.py
"""
import statistics
import time
import warnings

import torch

import cofx

warnings.filterwarnings("ignore", category=UserWarning)
torch.manual_seed(0)
torch.set_num_threads(2)

from pytorchvideo.models import hub  # noqa: E402  (after the warning filter)

# 1. A real video model, built without downloading weights.
model = hub.x3d_s(pretrained=False).eval()

# 2. One line: the clip length (13) and frame size (160x160) come from the model's head.
co = cofx.convert(model, verbose=True)
print(f"\nreceptive field {co.receptive_field} frames, delay {co.delay}, exact: {co.is_exact}")
for row in co.report.windowed[:3]:
    print(f"  windowed: {row.name:<28} {row.note}")
print(f"  ... {len(co.report.windowed)} squeeze-and-excitation gates in all (see co.report)")

# 3. Equivalence: one clip through the step function equals the clip model.
clip = torch.randn(1, *co.clip_shape[1:])
with torch.no_grad():
    reference = model(clip)
    streamed = co.forward_steps(clip, pad_end=True)[..., -1]
print(f"\nmax |forward_steps(clip) - model(clip)| = {(streamed - reference).abs().max():.2e} "
      f"(output scale {reference.abs().max():.2e}): the measured deviation of the causal "
      "squeeze-and-excitation windows; everything else is exact")

# 4. Stream frames one at a time, against re-running the clip model on a sliding window.
T = co.clip_shape[2]
video = torch.randn(1, 3, co.delay + 30, *co.clip_shape[3:])
co.clean_state()
step_times, clip_times = [], []
with torch.no_grad():
    for t in range(video.shape[2]):
        start = time.perf_counter()
        y = co.forward_step(video[:, :, t])
        step_times.append(time.perf_counter() - start)
        if t >= T - 1 and t % 5 == 0:
            start = time.perf_counter()
            model(video[:, :, t - T + 1:t + 1])
            clip_times.append(time.perf_counter() - start)
steady = step_times[co.delay:]
print(f"forward_step: {1e3 * statistics.median(steady):.1f} ms per frame (median, steady state)")
print(f"clip model on a sliding window: {1e3 * statistics.median(clip_times):.1f} ms per frame")
print(f"last prediction: class {int(y.argmax())}")
