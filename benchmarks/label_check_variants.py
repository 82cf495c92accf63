r"""What the uint8 pass of protocl's CPU label check saves (issue 28): the check as shipped against the plain
alternative, on region-like label maps with and without ignored pixels, one thread.

    python benchmarks/label_check_variants.py

- ``uint8``: ``protocl._validation._host_label_violation`` (``aminmax``; when the map holds ``ignore_index``, a
  pass over a uint8 copy in which ``ignore_index`` wraps to 0);
- ``where``: ``aminmax``, then, when the map holds ``ignore_index``, ``aminmax`` of a ``where`` that zeroes it (a
  label-sized int64 temporary);
- ``device_verdict``: the CUDA path's verdict (count and example of bad ids) computed on the CPU and read at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

from protocl import _validation


def where_check(labels: torch.Tensor, num_classes: int, ignore_index: int):
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo >= 0 and hi < num_classes:
        return None
    others = torch.where(labels == ignore_index, torch.zeros((), dtype=labels.dtype), labels)
    lo, hi = (int(v) for v in torch.aminmax(others))
    return lo if lo < 0 else (hi if hi >= num_classes else None)


def device_verdict(labels: torch.Tensor, num_classes: int, ignore_index: int):
    count, example = _validation._device_label_verdict(labels, num_classes, ignore_index).tolist()
    return example if count else None


def region_labels(size: int, ignore_fraction: float, generator: torch.Generator) -> torch.Tensor:
    cells = max(2, size // 32)
    coarse = torch.randint(0, 19, (2, 1, cells, cells), generator=generator).float()
    drop = torch.rand(2, 1, cells, cells, generator=generator) < ignore_fraction
    coarse = torch.where(drop, torch.full_like(coarse, 255), coarse)
    return F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    variants = {"uint8": _validation._host_label_violation, "where": where_check, "device_verdict": device_verdict}
    print("| labels | ignored | " + " | ".join(f"{n} ms" for n in variants) + " |")
    print("| --- | --- |" + " ---: |" * len(variants))
    for size in (365, 730):
        for fraction in (0.0, 0.05):
            y = region_labels(size, fraction, g)
            times = [tb.Timer("fn(y, 19, 255)", globals={"fn": fn, "y": y}, num_threads=1)
                     .blocked_autorange(min_run_time=0.5).median for fn in variants.values()]
            print(f"| (2, {size}, {size}) | {fraction:.0%} | " + " | ".join(f"{1e3 * t:.3f}" for t in times) + " |")


if __name__ == "__main__":
    main()
