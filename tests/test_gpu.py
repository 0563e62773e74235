"""CUDA only (skipped without a GPU; bench/gpu_check.py runs them on one): SDPA's fused kernels against the
float32-softmax math path in fp16 and bf16, the packed and padded paths equal on the GPU, a step's model forward
without host syncs where the batch carries the host's packing indices, the metrics window on device tensors, and
generation on the GPU. test_fused.py holds the fused optimizers and the CUDA generator's resume."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.models.config import ModelConfig
from pretrain.models.decoding import generate
from pretrain.models.fast_paths import attend
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert
from pretrain.objectives import MLM
from pretrain.training.engine import to_device
from pretrain.training.metrics import Window
from tests.test_model import batch as stage_one_batch
from tests.test_palm_model import batch as stage_two_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Attention of unit-variance inputs (|y| <= ~3): each kernel's result against the exact attention of the same
# half-precision inputs (float64), to within the output's rounding (fp16: 2^-11 relative, bf16: 2^-8) and the
# accumulation differences of a fused kernel.
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def test_sdpa_kernels_match_the_exact_attention(dtype, backend):
    if backend == SDPBackend.FLASH_ATTENTION and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs sm80+")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(2, 1, 1, 128, dtype=torch.bool, device="cuda")
    mask[1, ..., -37:] = False
    cases = [(None, False), (None, True)] + ([(mask, False)] if backend != SDPBackend.FLASH_ATTENTION else [])
    for m, causal in cases:  # FlashAttention takes no mask: the encoder passes none when a batch has no padding
        exact, _ = attend(q.double(), k.double(), v.double(), m, causal, 0.0, False, "math")
        with sdpa_kernel(backend):
            fused, _ = attend(q, k, v, m, causal, 0.0, False, "sdpa")
        plain, _ = attend(q, k, v, m, causal, 0.0, False, "math")
        assert fused.dtype == dtype
        torch.testing.assert_close(fused.double(), exact, rtol=0, atol=TOLERANCE[dtype])
        torch.testing.assert_close(plain.double(), exact, rtol=0, atol=TOLERANCE[dtype])


def _loss_and_grads(model_cls, cfg, b, weights):
    torch.manual_seed(0)
    model = model_cls(cfg).cuda().train()
    loss, _ = model(to_device(b, torch.device("cuda")), weights)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_cls", [StructBert, Palm])
def test_packed_and_padded_paths_agree_on_the_gpu(model_cls):
    weights = {"mlm": 1.0, "wso": 1.0, "sso": 1.0} if model_cls is StructBert else {"lm": 1.0, "mlm": 0.5}
    if model_cls is StructBert:
        b = stage_one_batch(b=2, t=12)
        b["attention_mask"][1, 8:] = False
    else:
        b = stage_two_batch()
    out = {}
    for unpad in (True, False):
        cfg = ModelConfig(vocab_size=50, hidden=64, layers=2, heads=4, ffn=128, max_positions=64, decoder_layers=2,
                          dropout=0.0, attn_dropout=0.0, unpad=unpad)  # fmt: skip
        out[unpad] = _loss_and_grads(model_cls, cfg, b, weights)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    for name, grad in out[True][1].items():
        torch.testing.assert_close(grad, out[False][1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_encoder_and_decoder_forward_without_host_syncs():
    """With the host's packing indices (engine.to_device) no layer waits for the device: torch's sync debug mode
    raises on any synchronising call. (The heads select the predicted positions by boolean index, one sync each:
    bench/gpu_check.py counts a whole step's.)"""
    cfg = ModelConfig(vocab_size=50, hidden=64, layers=2, heads=4, ffn=128, max_positions=64, decoder_layers=2)
    torch.manual_seed(0)
    model = Palm(cfg).cuda().train()
    b = to_device(stage_two_batch(), torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        memory = model.encode(b["enc_input_ids"], b["enc_attention_mask"], b["enc_pack_index"])
        h, _ = model.decoder(b["dec_input_ids"], model.encoder.embeddings, memory, b["enc_attention_mask"], None, False,
                             b["dec_attention_mask"], b["dec_pack_index"], b["enc_pack_index"])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert h.shape == (2, 8, 64) and h[1, -2:].abs().max() == 0  # packed: padding rows are zeros


def test_window_reduces_device_tensors():
    window = Window((MLM,))
    for i in range(3):
        window.add({"mlm": (torch.tensor(1.5 * i, device="cuda"), torch.tensor(1.0, device="cuda"), 2)}, 4, 5)
    window.mark_step()
    r = window.reduce()
    assert (r["mlm_loss"], r["mlm_acc"], r["mlm_count"], r["tokens"]) == (4.5 / 6, 3 / 6, 6, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_on_the_gpu(dtype):
    """Greedy decoding on the GPU: fp32 gives the CPU's tokens; bf16 runs and stops within max_new_tokens."""
    cfg = ModelConfig(vocab_size=50, hidden=64, layers=2, heads=4, ffn=128, max_positions=64, decoder_layers=2)
    torch.manual_seed(0)
    model = Palm(cfg).eval()
    src = torch.tensor([[7, 12, 30, 41, 9, 22, 15]])
    cpu = generate(model, src, bos_id=1, eos_id=2, max_new_tokens=12, strategy="greedy")
    gpu = generate(model.cuda().to(dtype), src.cuda(), bos_id=1, eos_id=2, max_new_tokens=12, strategy="greedy")
    assert len(gpu) <= 12
    if dtype == torch.float32:
        assert gpu == cpu
    g = torch.Generator(device="cuda").manual_seed(0)
    sampled = generate(model, src.cuda(), bos_id=1, eos_id=2, max_new_tokens=12, strategy="sample", generator=g)
    assert len(sampled) <= 12
