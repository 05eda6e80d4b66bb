"""The MLflow pyfunc model a promoted policy is served as (MLflow "models from code").

MLflow stores this file's source with every logged model and runs it on load, so a registered
policy loads back (``mlflow.pyfunc.load_model("models:/<name>@champion")``) wherever torch and
transformers are installed: it needs nothing from midpo. Keep it self-contained.

Input: a DataFrame with a ``prompt`` column (user text; the chat template is applied); a plain
list of strings is refused by the logged signature, which names that column. Output: one generated response per prompt. Params: ``max_new_tokens`` (default 64),
``temperature`` (0 = greedy, the default), ``top_p``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class HFPolicyModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts["policy"]
        self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()

    def _render(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            )
        return prompt

    # A DataFrame hint: MLflow infers no schema from it (the logged signature describes the
    # input) and does not warn about a missing hint.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        import torch

        params = params or {}
        if hasattr(model_input, "columns"):
            prompts = [str(p) for p in model_input["prompt"].tolist()]
        else:
            prompts = [str(p) for p in model_input]
        if not prompts:
            return []
        temperature = float(params.get("temperature", 0.0))
        enc = self.tokenizer(
            [self._render(p) for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(params.get("max_new_tokens", 64)),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            kwargs.update(
                do_sample=True, temperature=temperature, top_p=float(params.get("top_p", 1.0))
            )
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        return [str(t) for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


mlflow.models.set_model(HFPolicyModel())
