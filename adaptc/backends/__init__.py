"""Execution backends for adapted graphs: `triton/` holds one fused inference op per file,
each a torch custom op (namespace `adaptc`) that a lowering pass can call from an FX graph."""
