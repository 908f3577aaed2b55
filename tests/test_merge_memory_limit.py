"""A whole merge in a process whose address space (RLIMIT_AS) is well below the size of its largest tensor.

The child process imports torch and langmerge and runs a small merge first (so
that every lazy import, the C kernels, torch's thread pool and the executor's
threads have been set up), measures its address space, and only then sets the
limit: that baseline plus less than the largest tensor. The merge of the big
trio must succeed under it; two controls show that the limit bites: allocating
one copy of the largest tensor fails, and so does the same merge with a budget
large enough that the executor holds whole tensors in memory between passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import langmerge
from langmerge.methods import get_method
from langmerge.synthetic import LlamaShape, make_trio

# The embedding (tied: the output layer is the same tensor) is 16384 x 1024 float32: 64 MiB per model.
BIG = LlamaShape(hidden=1024, intermediate=256, layers=1, heads=8, kv_heads=2, vocab=16384, tie_embeddings=True)
LARGEST = 16384 * 1024 * 4
HEADROOM = 40 << 20  # the address space the merge may add to the baseline: well under one copy of the tensor
BUDGET = 8 << 20  # the executor's memory budget (``--memory``)
HUGE = 2 << 30  # a budget under which the executor holds the big tensor's three inputs whole

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import langmerge
    from langmerge.errors import LangmergeError

    recipe, warm_recipe, out, budget, huge, headroom, largest = json.loads(sys.argv[1])

    def address_space():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    langmerge.merge(warm_recipe, out + "-warm", memory=budget, progress=False)
    baseline = address_space()
    limit = baseline + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    result = {"baseline": baseline, "limit": limit}
    try:
        torch.empty(largest, dtype=torch.uint8)
        result["whole_tensor"] = "allocated"
    except (MemoryError, RuntimeError):
        result["whole_tensor"] = "refused"
    try:
        langmerge.merge(recipe, out + "-huge", memory=huge, progress=False)
        result["huge_budget"] = "merged"
    except (MemoryError, RuntimeError, LangmergeError) as exc:
        result["huge_budget"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    report = langmerge.merge(recipe, out, memory=budget, progress=False)
    result["tensors"] = report.tensors
    result["peak"] = address_space()
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def trios(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlimit")
    return make_trio(root / "big", BIG), make_trio(root / "warm")


def _recipe(method: str, paths) -> dict:
    m = get_method(method)
    params = {"weight": 1.0, **({"density": 0.4} if m.sparsifier else {})}
    return {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "dtype": "float32",
        "parameters": {"seed": 3} if m.randomized else {},
        "models": [{"model": str(paths[k]), "parameters": params} for k in ("ct", "sft")],
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_merge_succeeds_with_address_space_below_the_largest_tensor(trios, tmp_path, method):
    big, warm = trios
    with safe_open(str(big["base"] / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [16384, 1024]
    out = tmp_path / "merged"
    args = [_recipe(method, big), _recipe(method, warm), str(out), BUDGET, HUGE, HEADROOM, LARGEST]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["limit"] - result["baseline"] < LARGEST
    # the controls: the limit leaves no room for one copy of the tensor, nor for a merge that holds tensors whole
    assert result["whole_tensor"] == "refused"
    assert "can't allocate memory" in result["huge_budget"], result["huge_budget"]
    assert not (tmp_path / "merged-huge").exists()  # the failed merge left nothing
    assert result["tensors"] == len(load_file(big["base"] / "model.safetensors"))
    # the merge under the limit wrote what an unlimited merge (default budget, this process) writes

    langmerge.merge(_recipe(method, big), tmp_path / "unlimited", progress=False)
    ours, unlimited = (load_file(folder / "model.safetensors") for folder in (out, tmp_path / "unlimited"))
    assert set(ours) == set(unlimited)
    for name in ours:
        assert torch.equal(ours[name], unlimited[name]), name
