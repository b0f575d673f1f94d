"""Loads a MULTITASK_PROMPT_TUNING adapter written by softprompt into HF PEFT and writes PEFT's
logits for the inputs of fixtures/peft/smollm2_multitask_prompt_tuning (each row with a task id
below the adapter's num_tasks) to ADAPTER/peft_expected.safetensors, in the fixture's layout.

    python scripts/peft_load_mpt.py ADAPTER_DIR [GGUF_FILE]

Then `SOFTPROMPT_MPT_CHECK=ADAPTER_DIR cargo test -p softprompt --test multitask_prompt -- \
--ignored peft_logits_of_our_adapter` compares softprompt's logits with them. Needs torch,
transformers (with gguf) and peft; not part of CI.
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
inputs = load_file(os.path.join(here, "../fixtures/peft/smollm2_multitask_prompt_tuning/expected.safetensors"))

base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                            dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter)
model.eval()
num_tasks = model.peft_config["default"].num_tasks
task_ids = inputs["task_ids"] % num_tasks
with torch.no_grad():
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], task_ids=task_ids)
p = model.peft_config["default"].num_virtual_tokens
lens = inputs["attention_mask"].sum(1)
last = torch.stack([out.logits[r, p + int(lens[r]) - 1] for r in range(len(lens))])
save_file({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "task_ids": task_ids,
           "last_logits": last.contiguous()}, os.path.join(adapter, "peft_expected.safetensors"))
print(f"PEFT loaded {adapter}: {type(model.prompt_encoder['default']).__name__}, num_tasks {num_tasks}, "
      f"task ids {task_ids.tolist()}; wrote peft_expected.safetensors")
