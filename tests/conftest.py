"""Test session setup: 8 fake CPU devices so sharded code runs without accelerators."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Subprocesses started by tests share one compilation cache, so each step shape compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "studyrec-test-jax-cache"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Frees each module's compiled executables when it ends.

    Every in-process training keeps hundreds of memory maps of compiled code; a whole suite of them
    reaches the kernel's vm.max_map_count (65530) and aborts inside XLA ("Fatal Python error: Aborted").
    """
    yield
    jax.clear_caches()
