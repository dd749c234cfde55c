"""Host pools for the backend tests, with the page methods of SGLang 0.5.23's own host pools.

SGLang's MHATokenToKVPoolHost / MLATokenToKVPoolHost cannot be built on a CPU-only box: their
package imports sglang.srt.configs, which needs torchvision, and PyPI's torchvision cannot load
against CPU torch ("operator torchvision::nms does not exist"). These classes copy the buffer
shapes and get_data_page / get_dummy_flat_data_page / set_from_flat_data_page bodies of
sglang/srt/mem_cache/pool_host/mha.py and mla.py line for line, so a page's bytes are the ones
SGLang moves.

    MHAHostPool(layout, layers, heads, head_dim, page_size, pages, dtype)
    MLAHostPool(layout, layers, kv_cache_dim, page_size, pages, dtype)
    fill_random(pool, generator)   distinct non-zero bytes in every slot
    page_bytes(pool, slot) -> bytes   the page at `slot` as SGLang's flat page bytes
"""
from __future__ import annotations

import torch


class MHAHostPool:
    def __init__(self, layout="page_first", layers=2, heads=2, head_dim=8, page_size=4, pages=256,
                 dtype=torch.bfloat16):
        self.layout, self.layer_num, self.head_num, self.head_dim = layout, layers, heads, head_dim
        self.v_head_dim = head_dim
        self.page_size, self.page_num, self.size, self.dtype = page_size, pages, pages * page_size, dtype
        self.start_layer, self.end_layer = 0, layers
        self.device, self.pin_memory = "cpu", False
        self.size_per_token = 2 * head_dim * heads * layers * dtype.itemsize
        dims = {"layer_first": (2, layers, self.size, heads, head_dim),
                "page_first": (2, self.size, layers, heads, head_dim),
                "page_first_direct": (2, pages, layers, page_size, heads, head_dim),
                "page_head": (2, pages, heads, page_size, layers, head_dim)}[layout]
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            data_page = self.kv_buffer[:, :, index : index + self.page_size, :, :]
        elif self.layout == "page_first":
            data_page = self.kv_buffer[:, index : index + self.page_size, :, :, :]
        else:
            real_index = index // self.page_size
            data_page = self.kv_buffer[:, real_index : real_index + 1, :, :, :, :]
        return data_page.flatten() if flat else data_page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((2, self.layer_num, self.page_size, self.head_num, self.head_dim),
                           dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        L, P, H, D = self.layer_num, self.page_size, self.head_num, self.head_dim
        if self.layout == "layer_first":
            self.kv_buffer[:, :, index : index + P, :, :] = data_page.reshape(2, L, P, H, D)
        elif self.layout == "page_first":
            self.kv_buffer[:, index : index + P, :, :, :] = data_page.reshape(2, P, L, H, D)
        elif self.layout == "page_first_direct":
            r = index // P
            self.kv_buffer[:, r : r + 1, :, :, :, :] = data_page.reshape(2, 1, L, P, H, D)
        else:
            r = index // P
            self.kv_buffer[:, r : r + 1, :, :, :, :] = data_page.reshape(2, 1, H, P, L, D)


class MLAHostPool:
    def __init__(self, layout="page_first", layers=2, kv_cache_dim=24, page_size=4, pages=64,
                 dtype=torch.bfloat16):
        self.layout, self.layer_num, self.kv_cache_dim = layout, layers, kv_cache_dim
        self.kv_lora_rank, self.qk_rope_head_dim = kv_cache_dim - 8, 8
        self.page_size, self.page_num, self.size, self.dtype = page_size, pages, pages * page_size, dtype
        self.start_layer, self.end_layer = 0, layers
        self.device, self.pin_memory = "cpu", False
        self.size_per_token = kv_cache_dim * layers * dtype.itemsize
        dims = {"layer_first": (layers, self.size, 1, kv_cache_dim),
                "page_first": (self.size, layers, 1, kv_cache_dim),
                "page_first_direct": (pages, layers, page_size, 1, kv_cache_dim)}[layout]
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            data_page = self.kv_buffer[:, index : index + self.page_size, :, :]
        elif self.layout == "page_first":
            data_page = self.kv_buffer[index : index + self.page_size, :, :, :]
        else:
            real_index = index // self.page_size
            data_page = self.kv_buffer[real_index : real_index + 1, :, :, :, :]
        return data_page.flatten() if flat else data_page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros((self.layer_num, self.page_size, 1, self.kv_cache_dim), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        L, P, C = self.layer_num, self.page_size, self.kv_cache_dim
        if self.layout == "layer_first":
            self.kv_buffer[:, index : index + P, :, :] = data_page.reshape(L, P, 1, C)
        elif self.layout == "page_first":
            self.kv_buffer[index : index + P, :, :, :] = data_page.reshape(P, L, 1, C)
        else:
            r = index // P
            self.kv_buffer[r : r + 1, :, :, :, :] = data_page.reshape(1, L, P, 1, C)


def fill_random(pool, generator: torch.Generator) -> None:
    """Random bytes 1..255 in the whole buffer (never zeros: a test must not pass on an empty page)."""
    raw = pool.kv_buffer.view(-1).view(torch.uint8)
    raw.copy_(torch.randint(1, 256, raw.shape, dtype=torch.uint8, generator=generator))


def page_bytes(pool, slot: int) -> bytes:
    return pool.get_data_page(slot, flat=True).contiguous().view(torch.uint8).numpy().tobytes()
