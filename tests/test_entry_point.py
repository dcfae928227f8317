"""``backend="specdiff"`` works in a fresh process that never imports specdiff_fx."""

import subprocess
import sys
import textwrap


def test_registered_backend_in_a_fresh_process():
    script = textwrap.dedent(
        """
        import sys, torch
        from diffusers import SD3Transformer2DModel
        torch.manual_seed(0)
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
            num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
            caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8).eval()
        inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 12),
                      pooled_projections=torch.randn(2, 10), timestep=torch.tensor([500.0, 500.0]))
        assert "specdiff_fx" not in sys.modules
        assert "specdiff" in torch._dynamo.list_backends(exclude_tags=())
        with torch.no_grad():
            ref = model(**inputs).sample
            out = torch.compile(model, backend="specdiff",
                                options={"cache_ratio": 0.5, "inductor": False})(**inputs).sample
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        import specdiff_fx
        print("STATUS", specdiff_fx.last_record().status, "ERR", err)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, err = proc.stdout.split("STATUS ")[1].split(" ERR ")
    assert status == "specdiff" and float(err) <= 1e-4
