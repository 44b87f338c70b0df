import pytest
import torch

from kvrag.engines.device import DeviceError, Placement, resolve


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_float32_on_a_cpu(no_cuda) -> None:
    assert resolve() == Placement(torch.device("cpu"), torch.float32)
    assert resolve("cpu", "bfloat16").to_json() == {"device": "cpu", "dtype": "bfloat16"}


def test_auto_is_bfloat16_on_a_cuda_device_that_has_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve("cuda:1") == Placement(torch.device("cuda", 1), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve("auto").dtype == torch.float16
    with pytest.raises(DeviceError, match=r"only 2 CUDA device\(s\) are visible"):
        resolve("cuda:2")


@pytest.mark.parametrize(("device", "dtype", "message"), [
    ("cuda", "auto", "--device cuda: no CUDA device is visible here"),
    ("cuda:0", "auto", "--device cuda:0: no CUDA device is visible here"),
    ("tpu", "auto", "unknown device 'tpu'; use one of auto, cpu, cuda, cuda:N"),
    ("cpu", "fp8", "unknown dtype 'fp8'; use one of auto, float32, bfloat16, float16"),
])
def test_what_cannot_be_had_is_refused_clearly(no_cuda, device, dtype, message) -> None:
    with pytest.raises(DeviceError, match=message):
        resolve(device, dtype)
