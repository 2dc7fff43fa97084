"""The device policy's CPU allocator setting: applied once where glibc is, refused on request,
and invisible in the numbers (the same training steps give the same weights either way)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cam2mask_lib import device

# two Adam steps of a small classifier; prints whether the allocator was tuned and the weights' sum
STEPS = textwrap.dedent("""
    import json, torch
    from cam2mask_lib.classify import build_classifier
    from cam2mask_lib.device import keep_cpu_buffers, resolve_device
    resolve_device("cpu")
    torch.manual_seed(0)
    m = build_classifier("mobilenetv3_small_050", 4)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x, y = torch.randn(4, 3, 64, 256), torch.randint(0, 2, (4, 4)).float()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(m(x), y).backward()
        opt.step()
    print(json.dumps({"tuned": keep_cpu_buffers(),
                      "weights": [float(p.double().sum()) for p in m.parameters()]}))
""")


def _run(malloc: str) -> dict:
    env = dict(os.environ, CAM2MASK_MALLOC=malloc, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_allocator_setting_changes_no_number_and_can_be_refused():
    tuned, default = _run(""), _run("default")
    assert tuned["tuned"] is True
    assert default["tuned"] is False
    assert tuned["weights"] == default["weights"]


def test_allocator_setting_is_applied_once(monkeypatch):
    first = device.keep_cpu_buffers()
    monkeypatch.setenv("CAM2MASK_MALLOC", "default")  # read only on the first call
    assert device.keep_cpu_buffers() is first
