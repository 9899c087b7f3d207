"""pytest-benchmark: one training step (forward, loss, backward) per strategy and model.

Not part of the default test run (``testpaths = ["tests"]``). Run::

    pytest benchmarks/ -k smoke                  # a quick subset (smallest model)
    pytest benchmarks/ --benchmark-json out.json # everything, recorded

The benchmarked quantity is time; the training-step peak memory (exact on CPU, the CUDA allocator on a
GPU; see effdense.memory) is attached as ``extra_info``. Nothing here asserts on time.
"""

import pytest
import torch

import effdense
from effdense.memory import measure_step, mib, training_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (id, model, batch): the first is the smoke case
CASES = [
    ("smoke-bc10-b8", "densenet_bc_10", 8),
    ("bc40-b16", "densenet_bc_40", 16),
    ("bc100-b16", "densenet_bc_100", 16),
]


@pytest.mark.parametrize("strategy", effdense.STRATEGIES)
@pytest.mark.parametrize("case_id, model_name, batch", CASES, ids=[c[0] for c in CASES])
def test_training_step(benchmark, strategy, case_id, model_name, batch):
    if strategy not in effdense.available_strategies():
        pytest.skip(f"strategy {strategy!r} is not implemented yet")
    torch.manual_seed(0)
    model = effdense.get_model(model_name, strategy=strategy).to(DEVICE)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    mem = measure_step(model, x)
    benchmark.extra_info.update(
        strategy=strategy, model=model_name, batch_size=batch, device=str(DEVICE),
        peak_mib=round(mib(mem.peak), 3), activations_mib=round(mib(mem.activations), 3), memory_mode=mem.mode,
    )  # fmt: skip

    def step():
        model.zero_grad(set_to_none=True)
        training_step(model, x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    rounds = 3 if DEVICE.type == "cpu" else 20
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
