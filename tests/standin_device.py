"""A CPU stand-in for an accelerator: tensors that compute on the CPU but behave, for host/device rules, like
tensors on a GPU. Used by tests/test_device.py to find host/device mix-ups without a GPU.

While `standin()` is active, `STANDIN` (torch.device("meta")) names the "device": `module.to(STANDIN)`,
`tensor.to(STANDIN)` and factories with `device=STANDIN` give `DeviceTensor`s that hold a CPU tensor and compute
with it (so values equal a CPU run), while the rules of a real accelerator are enforced:

- `.numpy()` / `np.asarray(t)` / `np.array(t)` raise, as on CUDA ("can't convert cuda:0 device type tensor to
  numpy"); `.cpu()` / `.to("cpu")` give a plain CPU tensor; `float(t)`, `.item()` and `.tolist()` work (a sync).
- an op mixing a device tensor with a CPU tensor of one or more dimensions raises ("Expected all tensors to be
  on the same device"), except where CUDA allows it: copies between devices and CPU index tensors; 0-dim CPU
  tensors mix freely (CUDA treats them as scalars).
- `torch.save` of a device tensor stores a CPU tensor (what `torch.load(map_location="cpu")` gives).

What it cannot catch: anything about real kernels (CUDA-only dtypes or ops, bf16 autocast on CUDA, cuDNN),
streams and non_blocking races, pinned memory, memory use, speed, or code that branches on
`device.type == "cuda"` (the stand-in's type is "meta"). Those need `make gpu-check` on a CUDA machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

STANDIN = torch.device("meta")
_aten = torch.ops.aten
_CROSS_DEVICE_OK = {_aten.copy_.default, _aten._to_copy.default}  # copies between devices are legal
_CPU_INDEX_OK = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default}  # CPU index tensors


class HostDeviceError(RuntimeError):
    """A host/device mix-up that a real accelerator would reject."""


class DeviceTensor(torch.Tensor):
    """A tensor 'on the device': wraps a CPU tensor (`.elem`) and reports device `meta`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> DeviceTensor:
        r = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=STANDIN, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DeviceTensor({self.elem!r})"

    @property
    def is_meta(self) -> bool:  # type: ignore[override]
        return False  # real data: load_state_dict must copy into it (it skips true meta parameters)

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise HostDeviceError("can't convert stand-in device type tensor to numpy. Use Tensor.cpu() to copy the "
                              "tensor to host memory first. (CUDA: 'can't convert cuda:0 device type tensor')")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise HostDeviceError("np.asarray / np.array of a stand-in device tensor (fails on CUDA); use .cpu() first")

    def tolist(self) -> Any:  # type: ignore[override]
        return self.elem.tolist()

    def __reduce_ex__(self, proto: Any) -> Any:  # type: ignore[override]
        return (_plain, (self.elem.detach().clone(),))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten._to_copy.default:
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cpu":  # .cpu(): a plain host tensor
                return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
        if _is_standin(kwargs.get("device")):  # new_zeros, empty_like, ...: created on the host, then wrapped
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func not in _CROSS_DEVICE_OK:
            checked = args[:1] + args[2:] if func in _CPU_INDEX_OK else args
            for t in _tensors((checked, kwargs)):
                if not isinstance(t, DeviceTensor) and t.dim() > 0:
                    raise HostDeviceError(
                        f"Expected all tensors to be on the same device, but found a cpu tensor of shape "
                        f"{tuple(t.shape)} in {func} with stand-in device tensors")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is _aten._local_scalar_dense.default:  # .item() / float(): a Python number, as on CUDA
            return out
        return tree_map(_wrap, out)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t


def _unwrap(x: Any) -> Any:
    return x.elem if isinstance(x, DeviceTensor) else x


def _wrap(x: Any) -> Any:
    return DeviceTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) else x


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda x: found.append(x) if isinstance(x, torch.Tensor) else None, tree)
    return found


def _is_standin(d: Any) -> bool:
    return isinstance(d, (str, torch.device)) and torch.device(d).type == STANDIN.type


class _FactoryMode(TorchDispatchMode):
    """Tensors that C++ code (e.g. autograd formulas) creates with a stand-in tensor's options: on the host."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _is_standin(kwargs.get("device")) and not any(isinstance(t, DeviceTensor) for t in _tensors(args)):
            return tree_map(_wrap, func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def standin() -> Iterator[torch.device]:
    """Activate the stand-in device; yields it (pass it to Method.setup like a CUDA device)."""
    with _FactoryMode():
        yield STANDIN
