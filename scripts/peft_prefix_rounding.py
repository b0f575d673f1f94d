"""How far PEFT's own f32 logits for the prefix-tuning fixtures are from the same forward in f64.

Usage: python scripts/peft_prefix_rounding.py SMOL_DIR GGUF FIXTURES_DIR
For each fixture (smollm2_prefix_tuning, smollm2_prefix_tuning_projection, smollm2_cartridge,
smollm2_prompt_tuning_text) it loads the adapter with PEFT, runs the fixture's inputs in float32
and float64, and prints the max-abs difference of the last real position's logits between the
two, and between float32 and the fixture's stored `last_logits`. The f32-vs-f64 gap is the
rounding any f32 implementation carries, a floor for conformance tests against the fixture."""
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

d, f, fx = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
for name in ["smollm2_prompt_tuning_text", "smollm2_prefix_tuning", "smollm2_prefix_tuning_projection", "smollm2_cartridge"]:
    exp = load_file(f"{fx}/{name}/expected.safetensors")
    ids, mask = exp["input_ids"].long(), exp["attention_mask"].long()
    last = mask.sum(1) - 1
    out = {}
    for dt in [torch.float32, torch.float64]:
        m = PeftModel.from_pretrained(base.to(dt), f"{fx}/{name}").eval()
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask).logits
        p = logits.shape[1] - ids.shape[1]  # prompt-tuning positions prepended to the output
        out[dt] = torch.stack([logits[r, p + last[r]] for r in range(ids.shape[0])]).double()
        base = m.unload() if hasattr(m, "unload") else m.base_model
    print(json.dumps({"fixture": name,
        "f32_vs_f64": float((out[torch.float32] - out[torch.float64]).abs().max()),
        "f32_vs_fixture": float((out[torch.float32] - exp["last_logits"].double()).abs().max()),
        "f64_vs_fixture": float((out[torch.float64] - exp["last_logits"].double()).abs().max())}))
