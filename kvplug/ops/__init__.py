"""Tensor ops: each module holds `<op>_ref` (the torch spec) and `<op>` (the dispatcher)."""
