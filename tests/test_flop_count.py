"""The benchmarks' matmul FLOP count against the dots of the model's own lowered program."""

from __future__ import annotations

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from benchmarks.common import decoder_flops_per_token
from studyrec.data.packing import Sample
from studyrec.models import MODELS, build
from studyrec.models.config import ModelConfig

_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x .*?: \(tensor<([\dx]+)x\w+>, .*?-> tensor<([\dx]+)x\w+>")
_FUNCTION = re.compile(r"func\.func \w+ @([\w.$-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")


def dot_flops(stablehlo: str) -> int:
    """2 * (output elements) * (contracted size), summed over every dot a lowered program runs: a
    function's dots count once per call."""
    bodies, name = {}, None
    for line in stablehlo.splitlines():
        if found := _FUNCTION.search(line):
            name = found.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)

    def flops(function: str) -> int:
        total = 0
        for line in bodies[function]:
            for contracting, lhs, out in _DOT.findall(line):
                lhs_dims = [int(n) for n in lhs.split("x")]
                contracted = math.prod(lhs_dims[int(i)] for i in contracting.split(",") if i.strip())
                total += 2 * math.prod(int(n) for n in out.split("x")) * contracted
            total += sum(flops(callee) for callee in _CALL.findall(line))
        return total

    return flops("main")


@pytest.mark.parametrize("name", ["study", "study-reference", "individual"])
def test_executed_flops_are_the_dots_the_forward_pass_runs(name):
    seq = 12
    config = ModelConfig(
        vocab_size=40, num_layers=3, d_model=16, qkv_dim=8, num_heads=2, mlp_dim=24, max_len=64,
        copy_head=False, memory_size=0, gap_embedding=False, own_bias=None, dropout=0.0, attention_dropout=0.0,
    )
    model = eqx.nn.inference_mode(build(name, config, key=jax.random.key(0)))
    row = jnp.arange(1, seq + 1, dtype=jnp.int32)
    sample = Sample(row, jnp.ones(seq, jnp.int32), row * 60, jnp.arange(seq, dtype=jnp.int32), jnp.int32(0))
    text = eqx.filter_jit(lambda m, s: m(s)).lower(model, sample).as_text()
    counts = decoder_flops_per_token(config, seq, MODELS[name].streams)
    assert dot_flops(text) == counts["executed_forward"] * seq
    assert (counts["executed_forward"] > counts["forward"]) == (MODELS[name].streams > 1)
