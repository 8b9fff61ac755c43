from tests.conftest_snac import snac_model, snac_weights

__all__ = ["snac_model", "snac_weights"]
