"""The test session runs studyrec under jaxtyping + beartype and strict dtype promotion (see conftest.py)."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from studyrec.models import masks


def test_annotated_shapes_are_checked():
    segments = jnp.array([1, 1, 0, 2, 2], jnp.int32)
    assert masks.individual_mask(segments).shape == (5, 5)
    with pytest.raises(jaxtyping.TypeCheckError):
        masks.individual_mask(segments[None])  # " seq" is one axis


def test_annotated_dtypes_are_checked():
    with pytest.raises(jaxtyping.TypeCheckError):
        masks.individual_mask(jnp.ones(5, jnp.float32))  # Int, not Float


def test_shared_axis_names_must_agree():
    with pytest.raises(jaxtyping.TypeCheckError):
        masks.study_mask(jnp.ones(5, jnp.int32), jnp.ones(4, jnp.int32))  # both " seq"


def test_numpy_rows_are_checked_too():
    # Samples may hold numpy arrays (pack_histories), so the masks take ArrayLike; shapes still count.
    assert masks.individual_mask(np.ones(5, np.int32)).shape == (5, 5)
    with pytest.raises(jaxtyping.TypeCheckError):
        masks.individual_mask(np.ones((1, 5), np.int32))


def test_dtype_promotion_is_strict():
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    with pytest.raises(jax.dtypes.TypePromotionError):
        jnp.ones(3, jnp.int32) + jnp.ones(3, jnp.float32)
