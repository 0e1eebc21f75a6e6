"""Train a Transformer on a toy task: ``python train.py [task=reverse] [attention=naive] [-m ...]``."""

import hydra
from omegaconf import DictConfig

from transformer.training import train


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return train(cfg)


if __name__ == "__main__":
    main()
