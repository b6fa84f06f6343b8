"""DLPack between ONNX Runtime OrtValues and other frameworks' tensors, without torch or cupy.

The served `denoise` model of the onnxruntime_onnx / tensorrt_plan layouts keeps the latents on the GPU
while it calls the `unet` model of another backend by BLS (issue 12): the Python backend takes BLS inputs
from any object with `__dlpack__` (`pb_utils.Tensor.from_dlpack`) and hands outputs out as a DLPack
capsule (`Tensor.to_dlpack()`), while onnxruntime's Python API (the CPU and CUDA builds) has no DLPack
of its own: an OrtValue exposes only `data_ptr()`, and I/O binding takes raw device pointers. These two
adapters are the bridge:

    view = OrtValueView(value)                 # __dlpack__ / __dlpack_device__ over an OrtValue (zero copy)
    pb_utils.Tensor.from_dlpack("sample", view)
    ref = borrow(tensor.to_dlpack())           # pointer, shape, dtype, device of a DLPack capsule
    binding.bind_input(name, ref.device, ref.device_id, ref.dtype, ref.shape, ref.pointer)

The structs are DLPack's stable ABI (dlpack.h v0.x: DLManagedTensor, capsule name "dltensor"; a consumer
renames it "used_dltensor" and calls the deleter when done).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

KDL_CPU, KDL_CUDA = 1, 2
_DEVICE_TYPES = {"cpu": KDL_CPU, "cuda": KDL_CUDA}
_DEVICE_NAMES = {v: k for k, v in _DEVICE_TYPES.items()}
# DLDataType codes: 0 int, 1 uint, 2 float, 6 bool
_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_NAME = b"dltensor"

# What a produced capsule keeps alive (the OrtValue, shape array, struct), keyed by the struct's address,
# until its consumer (or the capsule's destructor, when nobody consumed it) calls the deleter.
_LIVE: dict[int, tuple] = {}


@_DELETER
def _delete(managed):
    _LIVE.pop(ctypes.addressof(managed.contents), None)


_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


# The same C functions with raw-pointer arguments, for the destructor (it must not make new references
# to the capsule being destroyed).
_get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(("PyCapsule_GetName", _api))
_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_GetPointer", _api))


@_CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule_address):
    # Called when the capsule dies. Unconsumed (still named "dltensor"): the producer frees its tensor;
    # consumed ("used_dltensor"): the consumer calls the deleter itself.
    if _get_name(capsule_address) == _NAME:
        _LIVE.pop(_get_pointer(capsule_address, _NAME), None)


def _dl_dtype(dtype) -> DLDataType:
    dtype = np.dtype(dtype)
    if dtype.kind not in _CODES:
        raise ValueError(f"no DLPack type for {dtype}")
    return DLDataType(_CODES[dtype.kind], dtype.itemsize * 8, 1)


def _np_dtype(dl: DLDataType) -> np.dtype:
    kinds = {v: k for k, v in _CODES.items()}
    if dl.lanes != 1 or dl.code not in kinds:
        raise ValueError(f"unsupported DLPack dtype code={dl.code} bits={dl.bits} lanes={dl.lanes}")
    if dl.code == _CODES["b"]:
        return np.dtype(np.bool_)
    return np.dtype(f"{kinds[dl.code]}{dl.bits // 8}")


def capsule(pointer: int, shape, dtype, device: str = "cpu", device_id: int = 0, owner=None):
    """A DLPack capsule over `pointer` (C-contiguous `shape` of `dtype` on `device`); `owner` is kept alive
    until the consumer releases the capsule."""
    shape = tuple(int(d) for d in shape)
    dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
    managed = DLManagedTensor()
    managed.dl_tensor = DLTensor(ctypes.c_void_p(pointer), DLDevice(_DEVICE_TYPES[device], device_id), len(shape),
                                 _dl_dtype(dtype), dims, None, 0)
    managed.manager_ctx = None
    managed.deleter = _delete
    address = ctypes.addressof(managed)
    _LIVE[address] = (managed, dims, owner)
    return _api.PyCapsule_New(address, _NAME, ctypes.cast(_capsule_destructor, ctypes.c_void_p))


class OrtValueView:
    """An OrtValue (CPU or CUDA) seen through the DLPack protocol, zero copy. The view and every capsule
    it hands out keep the OrtValue alive."""

    def __init__(self, value, device_id: int = 0):
        self.value = value
        self.device = "cuda" if value.device_name().lower().startswith("cuda") else "cpu"
        self.device_id = 0 if self.device == "cpu" else int(device_id)
        self.shape = tuple(value.shape())
        self.dtype = np.dtype(_ORT_ELEMENT_TYPES[value.data_type()])

    def __dlpack__(self, stream=None, **_):
        # ORT's CUDA EP synchronizes its stream at the end of a run, so the data is ready for any consumer
        # stream: nothing to wait for here.
        return capsule(self.value.data_ptr(), self.shape, self.dtype, self.device, self.device_id, owner=self.value)

    def __dlpack_device__(self):
        return (_DEVICE_TYPES[self.device], self.device_id)


_ORT_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                      "tensor(int32)": np.int32, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
                      "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


@dataclass(frozen=True)
class Borrowed:
    """A DLPack tensor's memory, read from its capsule (not consumed: the producer keeps ownership, and
    `keep` holds the capsule so the memory stays valid while this object lives)."""
    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: str
    device_id: int
    keep: object

    def ort_binding(self) -> tuple:
        """The arguments of IOBinding.bind_input / bind_output after the name."""
        return self.device, self.device_id, self.dtype.type, self.shape, self.pointer


def borrow(dl_capsule_or_tensor) -> Borrowed:
    """Pointer, shape, dtype and device of a DLPack capsule (or of an object with __dlpack__). Refuses
    strided (non C-contiguous) tensors: ORT binds dense buffers only."""
    obj = dl_capsule_or_tensor
    cap = obj.__dlpack__() if hasattr(obj, "__dlpack__") else obj
    if not _api.PyCapsule_IsValid(cap, _NAME):
        raise ValueError("not an unconsumed DLPack capsule (name 'dltensor')")
    managed = ctypes.cast(_api.PyCapsule_GetPointer(cap, _NAME), ctypes.POINTER(DLManagedTensor)).contents
    t = managed.dl_tensor
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides:
        expected, stride = [], 1
        for dim in reversed(shape):
            expected.insert(0, stride)
            stride *= dim
        strides = tuple(t.strides[i] for i in range(t.ndim))
        if any(s != e for s, e, d in zip(strides, expected, shape) if d > 1):
            raise ValueError(f"DLPack tensor with strides {strides} is not C-contiguous")
    if t.device.device_type not in _DEVICE_NAMES:
        raise ValueError(f"DLPack device type {t.device.device_type} is neither CPU nor CUDA")
    return Borrowed(int(t.data or 0) + int(t.byte_offset), shape, _np_dtype(t.dtype),
                    _DEVICE_NAMES[t.device.device_type], int(t.device.device_id), (cap, obj))
