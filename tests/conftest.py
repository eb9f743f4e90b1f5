"""Fixtures shared by several test modules."""

import pytest

from tether.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def lm():
    """(tokenizer, a tiny eval-mode causal LM): the model the generation tests sample from."""
    tok = tiny_tokenizer()
    return tok, tiny_causal_lm(tok, seed=1, hidden=64).eval()
