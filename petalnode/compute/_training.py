"""Stateless forward and backward passes of a span, for fine-tuning through the swarm.

A server keeps no per-client training state: `span_backward` recomputes the span's forward from the inputs the
client sends again, then backpropagates the client's output gradient. So any server hosting the blocks can answer
a backward call, which is what lets a training step survive a server dying between forward and backward.
Block weights are frozen; only gradients with respect to the inputs and the deep prompts leave the server.
"""

from __future__ import annotations

import torch


def span_forward(span: torch.nn.Module, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Whole sequences [batch, seq, hidden] through the span, no cache, no autograd graph kept."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    with torch.inference_mode():
        return span.forward_span(hidden, None, positions, prompts)


def span_backward(
    span: torch.nn.Module, hidden: torch.Tensor, grad_output: torch.Tensor, prompts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of <span(hidden, prompts), grad_output> with respect to `hidden` and `prompts`.

    Args:
        hidden: the span's input, exactly as sent to `span_forward` [batch, seq, hidden].
        grad_output: d loss / d output, same shape as `hidden`.
        prompts: the deep prompts used in the forward pass, or None.

    Returns:
        (grad_hidden, grad_prompts); grad_prompts is None when prompts is None.
    """
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    with torch.enable_grad():
        inputs = hidden.detach().requires_grad_(True)
        wrt = [inputs]
        prompt_inputs = None
        if prompts is not None:
            prompt_inputs = prompts.detach().requires_grad_(True)
            wrt.append(prompt_inputs)
        output = span.forward_span(inputs, None, positions, prompt_inputs)
        grads = torch.autograd.grad(output, wrt, grad_outputs=grad_output.to(output.dtype))
    return grads[0], (grads[1] if prompt_inputs is not None else None)
