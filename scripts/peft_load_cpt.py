"""Loads a CPT adapter written by softprompt into HF PEFT and writes PEFT's logits for the inputs of
fixtures/peft/smollm2_cpt to ADAPTER/peft_expected.safetensors, in the fixture's layout.

    python scripts/peft_load_cpt.py ADAPTER_DIR [GGUF_FILE]

Then `SOFTPROMPT_CPT_CHECK=ADAPTER_DIR cargo test -p softprompt --test cpt -- --ignored \
peft_logits_of_our_adapter` compares softprompt's logits with them. Needs torch, transformers
(with gguf) and peft; not part of CI.
"""
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

adapter = sys.argv[1]
gguf = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser(
    "~/.cache/softprompt/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
here = os.path.dirname(os.path.abspath(__file__))
inputs = load_file(os.path.join(here, "../fixtures/peft/smollm2_cpt/expected.safetensors"))

base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                            dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter)
model.eval()
config = model.peft_config["default"]
with torch.no_grad():
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
p = config.num_virtual_tokens
lens = inputs["attention_mask"].sum(1)
last = torch.stack([out.logits[r, p + int(lens[r]) - 1] for r in range(len(lens))])
save_file({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
           "last_logits": last.contiguous()}, os.path.join(adapter, "peft_expected.safetensors"))
print(f"PEFT loaded {adapter}: {type(config).__name__}, {type(model.prompt_encoder['default']).__name__}, "
      f"{p} context tokens, opt_weighted_loss_type {config.opt_weighted_loss_type}; wrote peft_expected.safetensors")
