"""A quantized span keeps only its quantized weights: nothing of the model's files stays mapped.

safetensors hands out tensors that view a mapping of the whole block file; one surviving
view (a 2 KiB norm weight) kept all of its block file resident, so an int8 server of the
30 SmolLM2 blocks held 405 MiB of file pages more than its weights, more than float32.
This checks the cause in-process, in a fresh interpreter (`bench/quantization.py` measures
the resident memory of whole servers).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CODE = """
import json, sys, torch
from llmswarm_core.source import resolve
from llmswarm_node.span_loader import load_span
torch.set_num_threads(1)
source = resolve("smollm2", progress=False)
span = load_span(source, 0, 4, progress=False, quantization=sys.argv[1])
maps = open("/proc/self/maps").read()
print(json.dumps({"mapped": sorted({line.split()[-1] for line in maps.splitlines() if line.endswith(".safetensors")}),
                  "dir": str(source.path)}))
"""


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_a_quantized_span_keeps_no_model_file_mapped(smollm2: object, quantization: str) -> None:
    out = subprocess.run([sys.executable, "-c", CODE, quantization], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["mapped"] == [], f"{quantization} span still maps {result['mapped']}"
