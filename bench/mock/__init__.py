"""The mock upstream's APIs, one module each; bench.mock_upstream serves them."""
