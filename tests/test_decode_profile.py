"""inference/profile.py's kernel categories, on kernel names an H200 run reported (torch 2.11 + CUDA 13)."""

import pytest

from mtpd_megatron.inference.profile import category


@pytest.mark.parametrize(
    "name, expected",
    [
        ("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT", "gemm"),  # cuBLASLt on Hopper: was "other" before
        ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "gemm"),
        ("aten::mm", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3", "attention"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "norm"),
        ("void at::native::_scatter_gather_elementwise_kernel<128, 4>", "copy/index"),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<float>>", "elementwise"),
        ("aten::cos", "elementwise"),
        ("cudaGraphLaunch", "other"),
    ],
)
def test_kernel_categories(name, expected):
    assert category(name) == expected
