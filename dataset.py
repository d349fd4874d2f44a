"""
The prepared data on disk, as train.py, sample.py and compare.py read it: data/<dataset>/train.bin and val.bin,
uint16 token ids written by data/<dataset>/prepare.py, and the windows of block_size tokens a batch is cut from.
"""

import os

import numpy as np
import torch


def open_data(data_dir: str, dataset: str, block_size: int) -> dict[str, np.memmap]:
    """The uint16 token files of both splits, checked to exist and to hold more than one block."""
    data = {}
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; run python data/{dataset}/prepare.py "
                                    f"(or set --data_dir to a folder holding train.bin and val.bin)")
        data[split] = np.memmap(path, dtype=np.uint16, mode='r')
        if len(data[split]) <= block_size + 1:
            raise ValueError(f"{path} holds {len(data[split])} tokens, fewer than block_size+1 = {block_size + 1}; "
                             f"use more text or a smaller --block_size")
    return data


def windows(data: np.ndarray, offsets: np.ndarray, block_size: int, device: str = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs data[i : i+T] and targets data[i+1 : i+1+T] for every offset i: (B, T) int64 each."""
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in offsets]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in offsets]))
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def resolve_data_dir(data_dir: str, dataset: str) -> str:
    """data_dir if set, else data/<dataset> next to this script."""
    return data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
