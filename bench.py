"""Attention benchmark: ``python bench.py [overrides]``, e.g. ``python bench.py bench_preset=cpu``.

The configuration is configs/bench.yaml (presets in configs/bench_preset/); docs/benchmark.md explains the
options and the outputs, which go to Hydra's run directory (outputs/bench/<date>/<time>/).
"""

import hydra
from omegaconf import DictConfig

from benchmarks.attention import run


@hydra.main(config_path="configs", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the sweep described by ``cfg``."""
    run(cfg)


if __name__ == "__main__":
    main()
