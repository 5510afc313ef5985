"""The GPU FAISS index goes to the process's current CUDA device (each torchrun rank its own), not GPU 0.

Runs without faiss-gpu and without a GPU: a stand-in faiss module records the device it is given.
"""
import types

import torch

from icons_fast.select import faiss_index


class _Recorder:
    """The few faiss names the GPU branch touches; remembers the device of each GPU index."""

    def __init__(self):
        self.devices = []

        class Config:
            useFloat16 = False
            device = None

        class GpuIndexFlatIP:
            def __init__(idx, res, k, cfg):
                self.devices.append(("flat", cfg.device))
                idx.d = k

            def add(idx, vectors):
                idx.ntotal = vectors.shape[0]

        def index_cpu_to_gpu(res, device, index, co):
            self.devices.append(("cloned", device))
            return index

        self.faiss = types.SimpleNamespace(
            GpuIndexFlatConfig=Config, GpuIndexFlatIP=GpuIndexFlatIP, StandardGpuResources=object,
            GpuClonerOptions=lambda: types.SimpleNamespace(useFloat16=False),
            index_cpu_to_gpu=index_cpu_to_gpu, read_index=lambda path: types.SimpleNamespace(d=4, ntotal=3),
        )


def test_gpu_index_uses_current_device(monkeypatch, tmp_path):
    rec = _Recorder()
    monkeypatch.setattr(faiss_index, "_faiss", lambda: rec.faiss)
    monkeypatch.setattr(faiss_index, "_GPU_RES", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # e.g. LOCAL_RANK 3 after set_device(3)

    faiss_index._flat_ip(torch.randn(5, 4).numpy(), use_gpu=True)
    path = tmp_path / "t.faiss"
    path.write_bytes(b"stand-in")
    faiss_index.load_index(path, use_gpu=True)
    assert rec.devices == [("flat", 3), ("cloned", 3)]
