#!/usr/bin/env python3
"""Independent decode tables for the number-format tests, written by PyTorch's own casts
(not by dsflash). Run with the oracle venv:
    ~/.cache/dsv4-oracle/bin/python scripts/make_format_tables.py tests/fixtures/formats
Writes e4m3fn.txt (256 lines: code value, every E4M3FN byte as torch.float8_e4m3fn decodes it)
and e8m0.txt (256 lines: code value, torch.float8_e8m0fnu)."""
import sys, torch
out = sys.argv[1]
codes = torch.arange(256, dtype=torch.uint8)
for name, dt in (("e4m3fn", torch.float8_e4m3fn), ("e8m0", torch.float8_e8m0fnu)):
    vals = codes.view(dt).to(torch.float64)
    with open(f"{out}/{name}.txt", "w") as f:
        for c, v in zip(codes.tolist(), vals.tolist()):
            f.write(f"{c} {v!r}\n")
