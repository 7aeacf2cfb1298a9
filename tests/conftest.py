"""Test session setup: 8 fake CPU devices so sharded code runs without accelerators."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Subprocesses started by tests share one compilation cache, so each step shape compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "studyrec-test-jax-cache"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
# Mixing dtypes (int32 with int64, float32 with bfloat16) must be written out, as in Equinox's own tests.
jax.config.update("jax_numpy_dtype_promotion", "strict")

import sys  # noqa: E402

import jaxtyping  # noqa: E402

# Every function and dataclass of studyrec gets `@jaxtyped(typechecker=beartype)`: annotated shapes and
# dtypes are checked at each call. The hook only sees modules imported after it, so nothing may import
# studyrec before this line; CLIs that tests start in child processes run unchecked. `is_pep484_tower`:
# an int passes where a float is annotated, as PEP 484 (and mypy, pyright) read `float`.
assert not any(name == "studyrec" or name.startswith("studyrec.") for name in sys.modules), "studyrec imported before the jaxtyping hook"
jaxtyping.install_import_hook("studyrec", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

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
