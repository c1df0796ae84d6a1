"""Property tests: random DAGs of residual, cropped, concat, gated, strided and pooled blocks."""
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import cofx
from guarantees import assert_delay, assert_equivalent, assert_stream_discipline
from random_nets import random_nets, shortest_clip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.integers(0, 5))
def test_random_dags_are_exact(net, extra):
    model, nd = net
    clip = shortest_clip(model, nd, extra)
    co = cofx.convert(model, clip)
    assert co.is_exact
    assert all(r.exact for r in co.report)
    assert_equivalent(co, model, clip)
    stream = torch.randn(2, 2, 2 * (co.receptive_field + co.delay) + 5, *clip.shape[3:], dtype=torch.float64)
    assert_stream_discipline(co, stream)
    assert_delay(co, stream)
